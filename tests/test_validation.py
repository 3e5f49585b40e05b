"""Every argument check: shapes/dtypes at trace time, values in checking mode, backends."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import IndexKCache
from tests.helpers import paged_problem, random_problem

F8 = jnp.float8_e4m3fn


@pytest.fixture(scope="module")
def mqa():
  p = random_problem(np.random.default_rng(0), 4, 10, H=8)
  return [p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"]]


@pytest.mark.parametrize("pos,bad,match", [
    (0, jnp.zeros((4, 8), F8), r"q_fp8 must have shape \[\?, \?, \?\]"),
    (0, jnp.zeros((4, 8, 128), jnp.bfloat16), r"q_fp8 must have dtype float8_e4m3fn"),
    (1, jnp.zeros((10, 64), F8), r"k_fp8 must have shape \[\?, 128\].*got float8_e4m3fn\[10, 64\]"),
    (2, jnp.zeros((9,), jnp.float32), r"k_scale must have shape \[10\]"),
    (3, jnp.zeros((4, 8), jnp.bfloat16), r"weights must have dtype float32"),
    (4, jnp.zeros((4,), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32), r"ks must have dtype int32"),
    (5, jnp.zeros((3,), jnp.int32), r"ke must have shape \[4\]"),
])
def test_mqa_logits_shape_errors(mqa, pos, bad, match):
  args = list(mqa)
  args[pos] = bad
  with pytest.raises(ValueError, match=match):
    nsa_jax.mqa_logits(*args, backend="xla")
  with pytest.raises(ValueError, match=match):  # at trace time, too
    jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="xla")).trace(*args)


def test_bad_backend(mqa):
  with pytest.raises(ValueError, match=r"backend must be one of"):
    nsa_jax.mqa_logits(*mqa, backend="cuda")


def test_pallas_backend_rejects_unsupported_heads(mqa):
  # H = 8 is no shape the Pallas kernels take: a clear error, not a wrong answer.
  with pytest.raises(ValueError, match=r"Pallas kernel does not support"):
    nsa_jax.mqa_logits(*mqa, backend="pallas", interpret=True)


def _bad_ranges(mqa):
  args = list(mqa)
  args[4] = jnp.array([0, 5, 2, 0], jnp.int32)
  args[5] = jnp.array([3, 4, 2, 11], jnp.int32)  # ks > ke on row 1, ke > S on row 3
  return args


def test_value_checks_are_opt_in(mqa):
  args = _bad_ranges(mqa)
  nsa_jax.mqa_logits(*args, backend="xla")  # unchecked: runs, masks
  with nsa_jax.checking():
    with pytest.raises(ValueError, match=r"mqa_logits: need 0 <= ks <= ke <= S=10 for every "
                                         r"row; got ks\[1\] = 5 > ke\[1\] = 4"):
      nsa_jax.mqa_logits(*args, backend="xla")
  args[4] = jnp.array([0, 1, 2, 0], jnp.int32)
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"ke\[3\] = 11 > S=10"):
    nsa_jax.mqa_logits(*args, backend="xla")
  args[4] = jnp.array([0, 1, -2, 0], jnp.int32)
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"ks\[2\] = -2 < 0"):
    nsa_jax.mqa_logits(*args, backend="xla")


def _has_callback(f, *args) -> bool:
  return "callback" in str(jax.make_jaxpr(f)(*args))


@pytest.fixture
def count_checks(monkeypatch):
  """Counts runs of the ks/ke value check (on the host, or in a callback)."""
  from nsa_jax import ops
  calls = []
  real = ops.key_range_error

  def counting(*a):
    calls.append(1)
    return real(*a)

  monkeypatch.setattr(ops, "key_range_error", counting)
  return calls


def test_checking_checks_exactly_the_calls_inside(mqa, count_checks):
  """The mode is part of jit's cache key: whatever was traced before, calls inside are checked
  and calls outside are not (no callback, no sync)."""
  args = _bad_ranges(mqa)

  def fn(*a):
    return nsa_jax.mqa_logits(*a, backend="xla") * 2

  f = jax.jit(fn)
  f(*args).block_until_ready()                    # traced and compiled outside: unchecked
  assert not _has_callback(fn, *args) and count_checks == []
  finished = []
  with pytest.raises(ValueError, match=r"^mqa_logits: .*ks\[1\] = 5 > ke\[1\] = 4$"):
    with nsa_jax.checking():
      np.asarray(f(*args))                        # same jitted function, now checked: it
      finished.append(1)                          # runs to its end, the block exit raises
  assert finished
  with pytest.raises(ValueError, match=r"ks\[1\] = 5 > ke\[1\] = 4"):
    with nsa_jax.checking():
      jax.jit(fn)(*args)                          # a fresh jit of the same function
  with nsa_jax.checking():
    assert _has_callback(fn, *args)
    good = list(mqa)
    f(*good).block_until_ready()                  # good values pass, checked
  n = len(count_checks)
  assert n >= 3
  f(*args).block_until_ready()                    # outside again: the unchecked program
  jax.jit(fn)(*args).block_until_ready()
  assert len(count_checks) == n


def test_traced_inside_is_unchecked_outside(mqa, count_checks):
  args = _bad_ranges(mqa)
  g = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="xla") + 1)
  with pytest.raises(ValueError, match=r"ks\[1\] = 5 > ke\[1\] = 4"):
    with nsa_jax.checking():
      g(*args)                                    # first traced inside
  n = len(count_checks)
  with jax.transfer_guard("disallow"):
    out = g(*args)                                # outside: no check, no device-to-host copy
  out.block_until_ready()
  assert len(count_checks) == n
  with nsa_jax.checking(), nsa_jax.checking(False):
    g(*args).block_until_ready()                  # switched off inside: unchecked
  assert len(count_checks) == n


def test_checking_as_decorator_and_argument_check(mqa):
  args = _bad_ranges(mqa)
  step = nsa_jax.checking()(jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="xla")))
  with pytest.raises(ValueError, match=r"ks\[1\] = 5 > ke\[1\] = 4"):
    step(*args)
  with pytest.raises(ValueError, match=r"checking: enabled must be a bool, got str"):
    nsa_jax.checking("yes")


def test_checking_other_ops_under_jit(mqa):
  x = jnp.zeros((3, 5))
  ks = jnp.zeros((3,), jnp.int32)
  f = jax.jit(lambda l, a, b: nsa_jax.topk_indices(l, a, b, k=2, backend="xla"))
  f(x, ks, ks + 6)
  with pytest.raises(ValueError, match=r"^topk_indices: .*ke\[0\] = 6 > S=5$"):
    with nsa_jax.checking():
      f(x, ks, ks + 6)
  q, kf, sc, w, a, b = _bad_ranges(mqa)
  nsa_jax.budget.prime()
  p = jax.jit(lambda *z: nsa_jax.prefill_topk(*z, k=4, backend="xla"))
  p(q, kf, sc, w, a, b)
  with pytest.raises(ValueError, match=r"^prefill_topk: .*ks\[1\] = 5 > ke\[1\] = 4$"):
    with nsa_jax.checking():
      p(q, kf, sc, w, a, b)


def test_paged_context_longer_than_its_block_table_row():
  """500 tokens need 8 pages; a table row of 3 pages holds 192. Unchecked: masked to the 192
  keys the table holds; checked: a ValueError naming the request, eager and jitted."""
  p = paged_problem(np.random.default_rng(1), [150, 3], H=8, max_context_len=512)
  bt = np.asarray(p["block_tables"])[:, :3]
  ctx = np.array([500, 3], np.int32)
  args = (p["q_fp8"], p["cache"], p["weights"], jnp.asarray(ctx), jnp.asarray(bt))
  call = lambda *a: nsa_jax.paged_mqa_logits(*a, max_context_len=512, backend="xla")
  out = np.asarray(call(*args))
  assert np.isfinite(out[0, :150]).all() and np.isneginf(out[0, 192:]).all()
  msg = (r"^paged_mqa_logits: context_lens\[0\] = 500 needs 8 pages, but block_tables rows "
         r"hold 3 \(192 tokens\)$")
  with nsa_jax.checking(), pytest.raises(ValueError, match=msg):
    call(*args)
  f = jax.jit(call)
  f(*args)
  with pytest.raises(ValueError, match=msg):
    with nsa_jax.checking():
      f(*args)
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"context_lens\[1\] = 600 > "
                                                          r"max_context_len=512"):
    call(*args[:3], jnp.asarray([100, 600], jnp.int32), jnp.asarray(p["block_tables"]))


def test_paged_errors():
  p = paged_problem(np.random.default_rng(0), [70, 3], H=8)
  call = lambda **o: nsa_jax.paged_mqa_logits(
      o.get("q", p["q_fp8"]), o.get("cache", p["cache"]), o.get("w", p["weights"]),
      o.get("ctx", p["context_lens"]), o.get("bt", p["block_tables"]),
      max_context_len=o.get("L", p["max_context_len"]), backend="xla")
  with pytest.raises(ValueError, match="cache must be an IndexKCache"):
    call(cache=p["cache"].k_fp8)
  with pytest.raises(ValueError, match=r"q_fp8 must have shape \[\?, \?, \?, \?\]"):
    call(q=p["q_fp8"][0])
  with pytest.raises(ValueError, match=r"weights must have shape \[2, 8\]"):
    call(w=p["weights"][:1])
  with pytest.raises(ValueError, match=r"context_lens must have dtype int32"):
    call(ctx=p["context_lens"].astype(jnp.float32))
  with pytest.raises(ValueError, match=r"block_tables must have shape \[2, \?\]"):
    call(bt=p["block_tables"][0])
  with pytest.raises(ValueError, match=r"max_context_len must be a static int"):
    call(L=-1)
  with pytest.raises(ValueError, match=r"head dim D=128"):
    call(cache=IndexKCache.create(4, head_dim=64))
  bad = np.asarray(p["block_tables"]).copy()
  bad[1, 0] = 99
  call(bt=jnp.asarray(bad))
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"block_tables\[1, 0\] = 99 is not "
                                                          r"a page of the cache \[0, 6\)"):
    call(bt=jnp.asarray(bad))


def test_cache_errors():
  with pytest.raises(ValueError, match=r"k_fp8 must be float8_e4m3fn \[num_pages, page_size, "
                                       r"D\], got float8_e4m3fn\[4, 64\]"):
    IndexKCache(jnp.zeros((4, 64), F8), jnp.zeros((4, 64)))
  with pytest.raises(ValueError, match=r"k_fp8 must be float8_e4m3fn .*got float32"):
    IndexKCache(jnp.zeros((4, 64, 128)), jnp.zeros((4, 64)))
  with pytest.raises(ValueError, match=r"k_scale must be float32 \[num_pages, page_size\] = "
                                       r"\[4, 64\], got float32\[4, 63\]"):
    IndexKCache(jnp.zeros((4, 64, 128), F8), jnp.zeros((4, 63)))
  with pytest.raises(ValueError, match=r"k_scale must be float32 .*got bfloat16"):
    IndexKCache(jnp.zeros((4, 64, 128), F8), jnp.zeros((4, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"data must be uint8\[num_pages, 8448\]"):
    IndexKCache.from_bytes(jnp.zeros((4, 100), jnp.uint8))


def test_topk_errors():
  x = jnp.zeros((3, 5))
  z = jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match=r"logits must have dtype float32"):
    nsa_jax.topk_indices(x.astype(jnp.bfloat16), z, z, backend="xla")
  with pytest.raises(ValueError, match=r"ks must have shape \[3\]"):
    nsa_jax.topk_indices(x, z[:2], z, backend="xla")
  with pytest.raises(ValueError, match=r"k must be a static int >= 1"):
    nsa_jax.topk_indices(x, z, z, k=0, backend="xla")
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"0 <= ks <= ke <= S=5 for every "
                                                          r"row; got ke\[0\] = 6 > S=5"):
    nsa_jax.topk_indices(x, z, z + 6, backend="xla")


def test_indexer_steps_check_inside_an_already_compiled_bucket():
  """IndexerSteps.prefill / decode compile once per bucket; a call inside checking() is
  checked anyway, and the failed check is a ValueError raised by the call itself."""
  from flax import nnx
  cfg = nsa_jax.IndexerConfig(dim=128, q_lora_rank=128, n_heads=4, head_dim=128, topk=8)
  steps = nsa_jax.IndexerSteps(nsa_jax.Indexer(cfg, rngs=nnx.Rngs(0)), backend="xla")
  batch = nsa_jax.build_ragged_batch([5, 3], [2, 0])
  tables, num_pages = nsa_jax.allocate_block_tables([7, 3])
  inputs = nsa_jax.prefill_inputs(batch, tables, num_pages=num_pages)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch.T_pad, 128)), jnp.bfloat16)
  qr = jnp.asarray(rng.standard_normal((batch.T_pad, 128)), jnp.bfloat16)
  cache = nsa_jax.IndexKCache.create(num_pages)
  _, cache = steps.prefill(x, qr, inputs, cache)          # compiles the bucket, unchecked
  ke = np.array(inputs.ke)
  ke[2] = 1_000_000
  bad = dataclasses.replace(inputs, ke=ke)
  _, cache = steps.prefill(x, qr, bad, cache)             # unchecked: masked, no error
  with nsa_jax.checking():
    with pytest.raises(ValueError, match=r"^prefill_topk: .*ke\[2\] = 1000000 > S=16$"):
      steps.prefill(x, qr, bad, nsa_jax.IndexKCache.create(num_pages))
  dec = nsa_jax.decode_inputs([8, 4], tables, num_pages=num_pages)
  xd, qd = x[:dec.context_lens.shape[0]], qr[:dec.context_lens.shape[0]]
  _, cache = steps.decode(xd, qd, dec, cache)
  ctx = np.array(dec.context_lens)
  ctx[1] = 200                                            # past its row of 1 page
  with nsa_jax.checking():
    with pytest.raises(ValueError, match=r"^paged_mqa_logits: context_lens\[1\] = 200 > "
                                         r"max_context_len=64$"):
      steps.decode(xd, qd, dataclasses.replace(dec, context_lens=ctx),
                   nsa_jax.IndexKCache.create(num_pages))


def test_check_values_env_variable():
  """NSA_JAX_CHECK_VALUES=1 switches checking on for the whole process (read at import):
  eager calls raise; a failure inside a user's jit, with no block to raise it, is logged."""
  import os
  import subprocess
  import sys
  script = """
import logging, jax, jax.numpy as jnp, nsa_jax
logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
x, z = jnp.zeros((3, 5)), jnp.zeros((3,), jnp.int32)
try:
  nsa_jax.topk_indices(x, z, z + 6, k=2, backend="xla")
except ValueError as e:
  print("raised:", e)
jax.block_until_ready(jax.jit(lambda a, b, c: nsa_jax.topk_indices(a, b, c, k=2))(x, z, z + 7))
jax.effects_barrier()
"""
  env = dict(os.environ, NSA_JAX_CHECK_VALUES="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert "raised: topk_indices: need 0 <= ks <= ke <= S=5 for every row; got ke[0] = 6 > S=5" \
      in out.stdout
  assert "nsa_jax: nsa_jax value check failed: topk_indices: need 0 <= ks <= ke <= S=5 for " \
         "every row; got ke[0] = 7 > S=5" in out.stderr


@pytest.mark.gpu
def test_checking_on_gpu_with_the_pallas_kernels():
  """On the GPU the program runs asynchronously: the failure recorded by the callback still
  comes out of the block (its exit waits for the device), eager and jitted, with the kernels."""
  p = random_problem(np.random.default_rng(3), 64, 300, H=64)
  ks = np.asarray(p["ks"]).copy()
  ke = np.asarray(p["ke"]).copy()
  ks[9], ke[9] = 7, 5
  args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], jnp.asarray(ks), jnp.asarray(ke))
  f = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="pallas"))
  f(*args).block_until_ready()
  msg = r"^mqa_logits: .*ks\[9\] = 7 > ke\[9\] = 5$"
  with pytest.raises(ValueError, match=msg):
    with nsa_jax.checking():
      f(*args)
  with nsa_jax.checking(), pytest.raises(ValueError, match=msg):
    nsa_jax.mqa_logits(*args, backend="pallas")
  g = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=2048, backend="pallas"))
  g(*args).block_until_ready()
  with pytest.raises(ValueError, match=r"^prefill_topk: .*ks\[9\] = 7 > ke\[9\] = 5$"):
    with nsa_jax.checking():
      g(*args)
