"""Ragged-prefill MQA logits: reference and xla backend against float64 numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from tests.helpers import (assert_same_inf_pattern, calc_diff, causal_ragged, dequantized,
                           mqa_logits_np, random_problem)


def _ragged_cases(rng):
  # (name, T, S, ks, ke)
  ks, ke, S = causal_ragged([3, 2], [10, 4])
  yield "spec_example", len(ks), S, ks, ke
  assert ks.tolist() == [0, 0, 0, 10, 10] and ke.tolist() == [8, 9, 10, 13, 14]
  ks, ke, S = causal_ragged([37, 1, 50, 13], [100, 1, 50, 29])
  yield "multi_request", len(ks), S, ks, ke
  S = 211
  ks = rng.integers(0, S, 41).astype(np.int32)
  ke = np.minimum(ks + rng.integers(1, 90, 41), S).astype(np.int32)
  yield "context_parallel", 41, S, ks, ke  # non-monotone ranges, as one CP rank sees them
  ks = np.array([0, 5, 7, 7], np.int32)
  ke = np.array([0, 5, 9, 7], np.int32)
  yield "empty_rows", 4, 9, ks, ke
  yield "T1", 1, 77, np.array([3], np.int32), np.array([70], np.int32)


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_ragged_logits_match_float64(backend):
  rng = np.random.default_rng(1)
  for name, T, S, ks, ke in _ragged_cases(rng):
    p = random_problem(rng, T, S, H=64, ks=ks, ke=ke)
    args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
    if backend == "reference":
      out = reference.mqa_logits(*args)
    else:
      out = nsa_jax.mqa_logits(*args, backend="xla")
    qd, kd = dequantized(p)
    ref = mqa_logits_np(qd, kd, p["k_scale"], p["weights"], ks, ke)
    assert out.shape == (T, S) and out.dtype == jnp.float32
    assert_same_inf_pattern(out, ref)
    assert calc_diff(out, ref) < 5e-6, name
    # Against the un-quantized bf16 inputs (DeepGEMM's looser bound).
    w_true = p["w_raw"] * 64 ** -0.5 * 128 ** -0.5
    ref_bf16 = mqa_logits_np(p["q"], p["k"], np.ones(S), w_true, ks, ke)
    # calc_diff is a statistic: the 1e-3 bound holds on many pairs, not on a handful.
    if np.isfinite(ref_bf16).sum() >= 256:
      assert calc_diff(out, ref_bf16) < 1e-3, name


def test_unclean_logits_leave_raw_values():
  rng = np.random.default_rng(2)
  p = random_problem(rng, 6, 33, H=8)
  args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
  clean = reference.mqa_logits(*args)
  raw = reference.mqa_logits(*args, clean_logits=False)
  valid = ~np.isneginf(np.asarray(clean))
  np.testing.assert_array_equal(np.asarray(raw)[valid], np.asarray(clean)[valid])
  assert np.isfinite(np.asarray(raw)).all()


def test_out_of_range_ks_ke_are_clamped_not_read():
  rng = np.random.default_rng(3)
  p = random_problem(rng, 3, 20, H=8, ks=np.array([-5, 15, 12]), ke=np.array([4, 99, 3]))
  out = np.asarray(nsa_jax.mqa_logits(p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"],
                                      p["ks"], p["ke"], backend="xla"))
  assert np.isfinite(out[0, :4]).all() and np.isneginf(out[0, 4:]).all()
  assert np.isfinite(out[1, 15:]).all() and np.isneginf(out[1, :15]).all()
  assert np.isneginf(out[2]).all()


@pytest.mark.slow
def test_reference_is_memory_bounded_at_32k():
  """T = S = 32768, H = 64 must compile to a program whose temporaries are far below the
  [T, H, S] (256 GiB) intermediate: only the logits and one chunk are live."""
  T = S = 32768
  f = jax.jit(lambda *a: reference.mqa_logits(*a, fp8_dot=True))
  shapes = (jax.ShapeDtypeStruct((T, 64, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S,), jnp.float32), jax.ShapeDtypeStruct((T, 64), jnp.float32),
            jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32))
  mem = f.trace(*shapes).lower().compile().memory_analysis()
  logits_bytes = T * S * 4
  assert mem.temp_size_in_bytes + mem.output_size_in_bytes < 3 * logits_bytes, mem
