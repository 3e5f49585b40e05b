"""Every argument check: shapes/dtypes at trace time, values in checking mode, backends."""

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
    nsa_jax.mqa_logits(*mqa, backend="pallas")


def test_value_checks_are_opt_in(mqa):
  args = list(mqa)
  args[4] = jnp.array([0, 5, 2, 0], jnp.int32)
  args[5] = jnp.array([3, 4, 2, 11], jnp.int32)  # ks > ke on row 1, ke > S on row 3
  nsa_jax.mqa_logits(*args, backend="xla")  # unchecked: runs, masks
  with nsa_jax.checking():
    with pytest.raises(ValueError, match=r"0 <= ks <= ke <= S=10"):
      nsa_jax.mqa_logits(*args, backend="xla")
    with pytest.raises(Exception, match=r"0 <= ks <= ke <= S=10"):
      jax.block_until_ready(jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="xla"))(*args))


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
    call(L=0)
  with pytest.raises(ValueError, match=r"head dim D=128"):
    call(cache=IndexKCache.create(4, head_dim=64))
  bad = np.asarray(p["block_tables"]).copy()
  bad[1, 0] = 99
  call(bt=jnp.asarray(bad))
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"page id in \[0, "):
    call(bt=jnp.asarray(bad))


def test_cache_errors():
  with pytest.raises(ValueError, match=r"k_fp8 must be \[num_pages, page_size, D\]"):
    IndexKCache(jnp.zeros((4, 64), F8), jnp.zeros((4, 64)))
  with pytest.raises(ValueError, match=r"k_fp8 must be float8_e4m3fn"):
    IndexKCache(jnp.zeros((4, 64, 128)), jnp.zeros((4, 64)))
  with pytest.raises(ValueError, match=r"k_scale must be \[num_pages, page_size\]"):
    IndexKCache(jnp.zeros((4, 64, 128), F8), jnp.zeros((4, 63)))
  with pytest.raises(ValueError, match=r"k_scale must be float32"):
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
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"0 <= ks <= ke <= S=5"):
    nsa_jax.topk_indices(x, z, z + 6, backend="xla")
