"""IndexerSteps: what a call costs on the host (no merge, no memory query, no transfer, no
recompile), programs shared by equal layers, and every layer of a model in one jit of the
user's own (README, "Every layer in one jit")."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import budget
from nsa_jax.config import IndexerConfig
from nsa_jax.indexer import Indexer, allocate_block_tables, decode_inputs, prefill_inputs
from nsa_jax.steps import IndexerSteps
from tests.helpers import CompileCounter

# Tiny shapes of their own: the programs here are cheap to compile on the CI CPU.
CFG = IndexerConfig(dim=64, q_lora_rank=32, n_heads=4, head_dim=32, topk=16, rope_head_dim=16)
LAYERS = 3


COMPILES = CompileCounter()


def bf16(rng, *shape):
  return jax.device_put(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16))


@pytest.fixture(scope="module")
def model():
  """LAYERS indexer layers of one config, their steps, block tables for 3 requests."""
  layers = [Indexer(CFG, rngs=nnx.Rngs(i)) for i in range(LAYERS)]
  steps = [IndexerSteps(m, backend="xla") for m in layers]
  tables, P = allocate_block_tables([200, 90, 130], seed=3)
  return layers, steps, tables, P


@pytest.fixture
def memory_queries(monkeypatch):
  calls = []
  real = budget.query_device_memory
  monkeypatch.setattr(budget, "query_device_memory", lambda d: calls.append(d) or real(d))
  return calls


def fresh_caches(P):
  return [nsa_jax.IndexKCache.create(P, CFG.head_dim) for _ in range(LAYERS)]


def test_equal_layers_share_programs(model):
  _, steps, tables, P = model
  rng = np.random.default_rng(0)
  d = jax.device_put(decode_inputs([40, 10, 70], tables, num_pages=P))
  rows = d.context_lens.shape[0]
  x, qr = bf16(rng, rows, CFG.dim), bf16(rng, rows, CFG.q_lora_rank)
  before = IndexerSteps.cache_sizes()["decode"]
  for s, cache in zip(steps, fresh_caches(P)):
    jax.block_until_ready(s.decode(x, qr, d, cache))
  assert IndexerSteps.cache_sizes()["decode"] - before <= 1, "one program for all layers"
  assert steps[0].decode_fn() is steps[2].decode_fn()


def _steady_args(tables, P, seed):
  """A 3-request prefill (x, qr, inputs) and a decode step over the same requests (x, qr,
  inputs; 4 rows: B_pad = 4), all on the device."""
  rng = np.random.default_rng(seed)
  b = nsa_jax.build_ragged_batch([30, 20, 10], [0, 0, 0])
  inp = jax.device_put(prefill_inputs(b, tables, num_pages=P))
  x, qr = bf16(rng, b.T_pad, CFG.dim), bf16(rng, b.T_pad, CFG.q_lora_rank)
  d = jax.device_put(decode_inputs([31, 21, 11], tables, num_pages=P))
  xd, qd = bf16(rng, 4, CFG.dim), bf16(rng, 4, CFG.q_lora_rank)
  return x, qr, inp, xd, qd, d


def test_steady_call_merges_nothing_queries_nothing_transfers_nothing(model, memory_queries,
                                                                       monkeypatch):
  """A call in an already compiled bucket: no nnx.merge (no trace), no memory query, no
  compile, no implicit host<->device transfer; the cache is donated."""
  _, steps, tables, P = model
  s = steps[0]
  cache = fresh_caches(P)[0]
  x, qr, inp, xd, qd, d = _steady_args(tables, P, seed=1)
  out, cache = s.prefill(x, qr, inp, cache)               # compiles (or finds) the bucket
  out_d, cache = s.decode(xd, qd, d, cache)
  jax.block_until_ready((out, out_d))

  merges = []
  real_merge = nnx.merge
  monkeypatch.setattr(nnx, "merge", lambda *a, **k: merges.append(1) or real_merge(*a, **k))
  c0, q0 = COMPILES.n, len(memory_queries)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      old = cache
      out, cache = s.prefill(x, qr, inp, cache)
      assert old.k_fp8.is_deleted(), "the cache must be donated"
      out_d, cache = s.decode(xd, qd, d, cache)
    jax.block_until_ready((out, out_d, cache))
  assert COMPILES.n == c0 and not merges and len(memory_queries) == q0


# Python functions a steady call may run: the method itself, the checking-mode read, and the
# IndexKCache pytree's flatten and unflatten (jax calls those for a custom pytree node).
STEADY_PY_CALLS = 4


def python_calls(call):
  """(Python functions entered, as 'file:function') while ``call()`` runs, via sys.setprofile."""
  seen = []

  def prof(frame, event, _arg):
    if event == "call":
      seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

  sys.setprofile(prof)
  try:
    out = call()
  finally:
    sys.setprofile(None)
  return seen, out


def test_steady_call_is_jax_cpp_dispatch(model):
  """A steady call runs a few Python functions of nsa_jax and goes straight to jax's C++
  dispatch: not one Python frame of jax or flax (a Python fallback, a cache miss, a retrace,
  a pytree flattened through Python callbacks of nnx all show up here)."""
  _, steps, tables, P = model
  s = steps[1]
  cache = fresh_caches(P)[1]
  x, qr, inp, xd, qd, d = _steady_args(tables, P, seed=4)
  for _ in range(2):  # compiles (or finds) both programs, then one steady call each
    out, cache = s.prefill(x, qr, inp, cache)
    out_d, cache = s.decode(xd, qd, d, cache)
  jax.block_until_ready((out, out_d))
  for name, call in (("prefill", lambda c: s.prefill(x, qr, inp, c)),
                     ("decode", lambda c: s.decode(xd, qd, d, c))):
    with nsa_jax.checking(False):  # steady = unchecked, also under NSA_JAX_CHECK_VALUES=1
      out, cache = call(cache)
      seen, (out, cache) = python_calls(lambda: call(cache))
    jax.block_until_ready(out)
    ours = [f for f in seen if "/nsa_jax/" in f]
    others = [f for f in seen if "/nsa_jax/" not in f and not f.endswith("test_steps.py:<lambda>")]
    assert not others, f"{name}: a steady call ran Python outside nsa_jax: {others}"
    assert len(ours) <= STEADY_PY_CALLS, f"{name}: {len(ours)} Python calls: {ours}"


def test_checking_mode_after_steady_calls_still_checks(model):
  """The fast path must not skip checking mode: a bad page id after steady calls (the
  fast path taken) raises at the call inside checking(), and steady calls still work after."""
  _, steps, tables, P = model
  s = steps[2]
  rng = np.random.default_rng(5)
  cache = fresh_caches(P)[2]
  d = jax.device_put(decode_inputs([31, 21, 11], tables, num_pages=P))
  xd, qd = bf16(rng, 4, CFG.dim), bf16(rng, 4, CFG.q_lora_rank)
  for _ in range(2):
    out, cache = s.decode(xd, qd, d, cache)
  bad_tables = np.array(d.block_tables)
  bad_tables[0, 0] = P + 5
  bad = nsa_jax.indexer.DecodeInputs(context_lens=d.context_lens,
                                     block_tables=jax.device_put(bad_tables))
  with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = %d is not a page" % (P + 5)):
    with nsa_jax.checking():
      out, cache = s.decode(xd, qd, bad, cache)
  cache = fresh_caches(P)[2]
  out, cache = s.decode(xd, qd, d, cache)
  assert out.shape == (4, CFG.topk)


def test_numpy_arguments_take_the_checked_path(model):
  """x and qr as numpy arrays (not on the device) still work and give the same indices."""
  _, steps, tables, P = model
  s = steps[0]
  rng = np.random.default_rng(6)
  d = jax.device_put(decode_inputs([31, 21, 11], tables, num_pages=P))
  xd, qd = bf16(rng, 4, CFG.dim), bf16(rng, 4, CFG.q_lora_rank)
  ref, _ = s.decode(xd, qd, d, fresh_caches(P)[0])
  out, _ = s.decode(np.asarray(xd), np.asarray(qd), d, fresh_caches(P)[0])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_inputs_of_the_wrong_kind_are_named(model):
  _, steps, tables, P = model
  b = nsa_jax.build_ragged_batch([3, 3, 3], [0, 0, 0])
  cache = fresh_caches(P)[0]
  x = jnp.zeros((b.T_pad, CFG.dim), jnp.bfloat16)
  qr = jnp.zeros((b.T_pad, CFG.q_lora_rank), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"IndexerSteps.prefill: inputs must be PrefillInputs .* "
                                       r"got RaggedBatch"):
    steps[0].prefill(x, qr, b, cache)
  with pytest.raises(ValueError, match="IndexerSteps.decode: inputs must be DecodeInputs"):
    steps[0].decode(x, qr, prefill_inputs(b, tables), cache)
  with pytest.raises(ValueError, match="IndexerSteps.decode: output must be one of"):
    steps[0].decode(x, qr, decode_inputs([3, 3, 3], tables), cache, output="ids")
  with pytest.raises(ValueError, match="IndexerSteps: indexer must be an nsa_jax.Indexer"):
    IndexerSteps(nnx.split(Indexer(CFG, rngs=nnx.Rngs(0)))[1])


def test_out_is_donated_and_takes_the_indices(model, memory_queries):
  """``out=``: the given indices array is donated and aliased to the new indices (so the
  step's buffers keep their addresses); results equal the plain call's; steady calls with
  ``out`` compile nothing, query nothing, move nothing and run no Python frame of jax."""
  _, steps, tables, P = model
  s = steps[1]
  x, qr, inp, xd, qd, d = _steady_args(tables, P, seed=7)
  ref_p, c = s.prefill(x, qr, inp, fresh_caches(P)[1])
  ref_d, _ = s.decode(xd, qd, d, c)
  ref_p, ref_d = np.asarray(ref_p), np.asarray(ref_d)
  cache = fresh_caches(P)[1]
  # Never converted to numpy before being donated: on the CPU np.asarray shares the buffer,
  # and a shared buffer is copied rather than donated.
  out, cache = s.prefill(x, qr, inp, cache)
  out_d, cache = s.decode(xd, qd, d, cache)
  for _ in range(2):  # the first calls with out= compile (or find) their programs
    old, old_d = out, out_d
    out, cache = s.prefill(x, qr, inp, cache, out=out)
    out_d, cache = s.decode(xd, qd, d, cache, out=out_d)
    assert old.is_deleted() and old_d.is_deleted(), "out must be donated"
  c0, q0 = COMPILES.n, len(memory_queries)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      out, cache = s.prefill(x, qr, inp, cache, out=out)
      out_d, cache = s.decode(xd, qd, d, cache, out=out_d)
    jax.block_until_ready((out, out_d, cache))
  assert COMPILES.n == c0 and len(memory_queries) == q0
  with nsa_jax.checking(False):
    seen, (out_d, cache) = python_calls(lambda: s.decode(xd, qd, d, cache, out=out_d))
  others = [f for f in seen if "/nsa_jax/" not in f and not f.endswith("test_steps.py:<lambda>")]
  assert not others and len(seen) - 1 <= STEADY_PY_CALLS, seen
  np.testing.assert_array_equal(np.asarray(out), ref_p)
  np.testing.assert_array_equal(np.asarray(out_d), ref_d)
  # The alias is in the program: out (the last argument) is output 0, the indices.
  into = [e[2] for p, e in nsa_jax.steps._REGISTRY.items()
          if p.kind == "decode" and e[2] is not None and e[0] is s.decode_fn()][0]
  main = next(l for l in into.lower(s.params, xd, qd, d, cache, out_d).as_text().splitlines()
              if "func public @main(" in l)
  assert main.rstrip().split("%arg")[-1].count("tf.aliasing_output = 0 "), main


def test_bad_out_and_reused_donations_are_named(model):
  _, steps, tables, P = model
  s = steps[2]
  x, qr, inp, xd, qd, d = _steady_args(tables, P, seed=8)
  cache = fresh_caches(P)[2]
  out, cache = s.decode(xd, qd, d, cache)
  out, cache = s.decode(xd, qd, d, cache, out=out)   # the fast path from here on
  for bad, what in ((np.zeros((4, CFG.topk), np.int32), r"a jax array .* got numpy"),
                    (jnp.zeros((4, CFG.topk + 1), jnp.int32), r"int32\[4, 16\] .* got int32\[4, 17\]"),
                    (jnp.zeros((4, CFG.topk), jnp.float32), r"int32\[4, 16\] .* got float32")):
    with pytest.raises(ValueError, match=r"IndexerSteps.decode: out must be " + what):
      s.decode(xd, qd, d, cache, out=bad)
  old = out
  out, cache = s.decode(xd, qd, d, cache, out=out)
  with pytest.raises(ValueError, match=r"IndexerSteps.decode: out was already donated"):
    s.decode(xd, qd, d, cache, out=old)                # fast path
  with pytest.raises(ValueError, match=r"IndexerSteps.prefill: out was already donated"):
    s.prefill(x, qr, inp, cache, out=old)              # checked path (first prefill with out)
  old_cache = cache
  out, cache = s.decode(xd, qd, d, cache, out=out)
  with pytest.raises(ValueError, match=r"IndexerSteps.decode: cache was already donated"):
    s.decode(xd, qd, d, old_cache)


def test_every_layer_in_one_jit(model, memory_queries):
  """The README's pattern: the plan and budget are made once on the host, every layer's step
  runs inside one jit of the user's. One compile per bucket; steady calls compile nothing,
  query no memory and move nothing implicitly; results equal the per-layer steps'."""
  layers, steps, tables, P = model
  prefill = steps[0].prefill_fn()
  decode = steps[0].decode_fn()
  params = [s.params for s in steps]

  @functools.partial(jax.jit, donate_argnums=(4,))
  def model_prefill(params, xs, qrs, inputs, caches):
    outs, new = [], []
    for p, x, qr, cache in zip(params, xs, qrs, caches):
      out, cache = prefill(p, x, qr, inputs, cache)
      outs.append(out)
      new.append(cache)
    return outs, new

  @functools.partial(jax.jit, donate_argnums=(4,))
  def model_decode(params, xs, qrs, inputs, caches):
    outs, new = [], []
    for p, x, qr, cache in zip(params, xs, qrs, caches):
      out, cache = decode(p, x, qr, inputs, cache)
      outs.append(out)
      new.append(cache)
    return outs, new

  rng = np.random.default_rng(2)
  pre = [150, 40, 100]
  b = nsa_jax.build_ragged_batch(pre, [0, 0, 0])
  inp = jax.device_put(prefill_inputs(b, tables, num_pages=P))
  xs = [bf16(rng, b.T_pad, CFG.dim) for _ in range(LAYERS)]
  qrs = [bf16(rng, b.T_pad, CFG.q_lora_rank) for _ in range(LAYERS)]
  caches, ref_caches = fresh_caches(P), fresh_caches(P)
  outs, caches = model_prefill(params, xs, qrs, inp, caches)
  for l in range(LAYERS):
    ref, ref_caches[l] = steps[l].prefill(xs[l], qrs[l], inp, ref_caches[l])
    np.testing.assert_array_equal(np.asarray(outs[l]), np.asarray(ref))

  # Decode steps: the host makes each step's inputs (numpy) and puts them on the device
  # explicitly; the jitted model sees only device arrays.
  ctx = list(pre)
  host_steps = []
  for _ in range(4):
    ctx = [c + 1 for c in ctx]
    d = decode_inputs(ctx, tables, num_pages=P)
    rows = d.context_lens.shape[0]
    host_steps.append((jax.device_put(d), [bf16(rng, rows, CFG.dim) for _ in range(LAYERS)],
                       [bf16(rng, rows, CFG.q_lora_rank) for _ in range(LAYERS)]))
  d, xd, qd = host_steps[0]
  outs, caches = model_decode(params, xd, qd, d, caches)       # the one decode compile
  jax.block_until_ready(outs)
  c0, q0 = COMPILES.n, len(memory_queries)
  with jax.transfer_guard("disallow"):
    for d, xd, qd in host_steps[1:]:
      outs, caches = model_decode(params, xd, qd, d, caches)
    jax.block_until_ready((outs, caches))
  assert COMPILES.n == c0, f"{COMPILES.n - c0} compiles in steady decode steps"
  assert len(memory_queries) == q0, "a memory query inside the model's jit"

  refs = [None] * LAYERS
  for d, xd, qd in host_steps:
    for l in range(LAYERS):
      refs[l], ref_caches[l] = steps[l].decode(xd[l], qd[l], d, ref_caches[l])
  for l in range(LAYERS):
    np.testing.assert_array_equal(np.asarray(outs[l]), np.asarray(refs[l]))
    np.testing.assert_array_equal(np.asarray(caches[l].k_fp8.view(jnp.uint8)),
                                  np.asarray(ref_caches[l].k_fp8.view(jnp.uint8)))


@pytest.mark.gpu
def test_gpu_out_matches_the_plain_call_with_pallas_kernels():
  """On the GPU with the Pallas kernels: ``out=`` (outputs poisoned first) gives exactly the
  plain call's indices, prefill and decode, call after call, and every ``out`` is donated."""
  cfg = IndexerConfig(dim=512, q_lora_rank=256, n_heads=64, head_dim=128, topk=2048)
  s = IndexerSteps(Indexer(cfg, rngs=nnx.Rngs(3)), backend="pallas")
  rng = np.random.default_rng(12)
  pre, ext = [0, 3000, 700], [2500, 1000, 1]
  tables, P = allocate_block_tables([p + e + 2 for p, e in zip(pre, ext)], seed=5)
  b = nsa_jax.build_ragged_batch(ext, pre)
  inp = jax.device_put(prefill_inputs(b, tables, num_pages=P))
  x, qr = bf16(rng, b.T_pad, cfg.dim), bf16(rng, b.T_pad, cfg.q_lora_rank)
  d = jax.device_put(decode_inputs([p + e + 1 for p, e in zip(pre, ext)], tables, num_pages=P))
  rows = d.context_lens.shape[0]
  xd, qd = bf16(rng, rows, cfg.dim), bf16(rng, rows, cfg.q_lora_rank)

  def cache0():  # random fp8 keys for the prefixes (zeros would tie every logit)
    k = rng.integers(0, 256, (P, 64, cfg.head_dim), dtype=np.uint8) & np.uint8(0xBF)
    return jax.device_put(nsa_jax.IndexKCache(k.view(ml_dtypes.float8_e4m3fn),
                                              np.full((P, 64), 1 / 64, np.float32)))
  base = cache0()
  ref_p, c = s.prefill(x, qr, inp, jax.tree.map(jnp.copy, base))
  ref_d, _ = s.decode(xd, qd, d, c)
  ref_p, ref_d = np.asarray(ref_p), np.asarray(ref_d)
  assert (ref_p >= 0).any() and (ref_d >= 0).any()
  out = jnp.full(ref_p.shape, 12345, jnp.int32)  # poison: every entry must be written
  out_d = jnp.full(ref_d.shape, 12345, jnp.int32)
  for _ in range(3):
    cache = jax.tree.map(jnp.copy, base)
    old, old_d = out, out_d
    out, cache = s.prefill(x, qr, inp, cache, out=out)
    out_d, cache = s.decode(xd, qd, d, cache, out=out_d)
    assert old.is_deleted() and old_d.is_deleted()
    np.testing.assert_array_equal(np.asarray(out), ref_p)
    np.testing.assert_array_equal(np.asarray(out_d), ref_d)
