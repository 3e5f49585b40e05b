"""The small math pieces: act_quant, Hadamard rotation, NeoX rope with YaRN."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nsa_jax import act_quant, apply_rope, dequant, hadamard_rotate
from nsa_jax.hadamard import hadamard_matrix
from nsa_jax.rope import RopeConfig, inv_frequencies

floats = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=True, width=32)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([128, 256])),
                    elements=floats),
       fmt=st.sampled_from([None, "ue8m0"]))
def test_act_quant_properties(x, fmt):
  q, s = act_quant(jnp.asarray(x), scale_fmt=fmt)
  assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
  assert s.shape == (x.shape[0], x.shape[1] // 128)
  blocks = x.reshape(x.shape[0], -1, 128).astype(np.float64)
  amax = np.maximum(np.abs(blocks).max(-1), 1e-4)
  s = np.asarray(s, np.float64)
  if fmt is None:
    np.testing.assert_allclose(s, np.float32(amax) / np.float32(448.0), rtol=1e-6)
  else:
    lo = amax / 448.0
    assert (s >= lo * (1 - 1e-6)).all() and (s < 2 * lo * (1 + 1e-6)).all()
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))  # a power of two
  deq = np.asarray(dequant(q, jnp.asarray(s, jnp.float32)), np.float64).reshape(blocks.shape)
  assert np.isfinite(deq).all()
  # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 on normals; absolute error below the
  # smallest normal (2**-6 in units of scale) covers subnormals and zeros.
  err = np.abs(deq - blocks)
  assert (err <= np.abs(blocks) * 2 ** -4 + s[..., None] * 2 ** -6 * 1.01).all()


def test_act_quant_zeros_and_tiny_values():
  x = jnp.zeros((2, 128)).at[1, 3].set(1e-30)
  q, s = act_quant(x)
  np.testing.assert_allclose(np.asarray(s), 1e-4 / 448.0, rtol=1e-6)
  assert np.isfinite(np.asarray(q.astype(jnp.float32))).all()
  assert float(np.abs(np.asarray(dequant(q, s))).max()) < 1e-20


def test_act_quant_rejects_bad_args():
  with pytest.raises(ValueError, match="scale_fmt"):
    act_quant(jnp.ones((128,)), scale_fmt="e4m3")
  with pytest.raises(ValueError, match="multiple of block_size"):
    act_quant(jnp.ones((100,)))


@pytest.mark.parametrize("n", [1, 2, 64, 128])
def test_hadamard_orthonormal(n):
  h = hadamard_matrix(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
  x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
  y = np.asarray(hadamard_rotate(jnp.asarray(x)))
  np.testing.assert_allclose(y, x @ h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_hadamard_rejects_non_power_of_two():
  with pytest.raises(ValueError, match="power of two"):
    hadamard_matrix(96)


def test_rope_matches_textbook_neox():
  cfg = RopeConfig()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 3, 128)).astype(np.float32)
  pos = np.array([0, 1, 7, 4095, 100000])
  y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  f = inv_frequencies(cfg)
  ref = x.astype(np.float64).copy()
  for t in range(5):
    for i in range(32):
      a = pos[t] * f[i]
      x1, x2 = x[t, :, i].astype(np.float64), x[t, :, i + 32].astype(np.float64)
      ref[t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
      ref[t, :, i + 32] = x1 * math.sin(a) + x2 * math.cos(a)
  np.testing.assert_allclose(y[:3], ref[:3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[3], ref[3], rtol=1e-3, atol=1e-3)
  # float32 angles (as DeepSeek computes them) lose ~pos * 2**-24 rad at large positions.
  np.testing.assert_allclose(y[4], ref[4], rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(y[..., 64:], x[..., 64:])


def test_yarn_frequencies():
  cfg = RopeConfig()
  f = inv_frequencies(cfg)
  base = 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64))
  # Highest frequencies untouched, lowest divided by the factor, monotone in between.
  np.testing.assert_allclose(f[:8], base[:8])
  np.testing.assert_allclose(f[-4:], base[-4:] / 40.0)
  assert (np.diff(f) < 0).all()
  plain = inv_frequencies(RopeConfig(factor=1.0))
  np.testing.assert_allclose(plain, base)


def test_rope_relative_position_property():
  # <rope(q, m), rope(k, n)> depends only on m - n.
  cfg = RopeConfig()
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
  dots = [float((apply_rope(q, jnp.array([m + 10]), cfg) * apply_rope(k, jnp.array([m]), cfg)).sum())
          for m in (0, 50, 300)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_rope_interleaved_matches_textbook_gptj():
  # GLM-5's indexer: pairs (2i, 2i + 1) rotate by frequency i; the rest passes through.
  cfg = RopeConfig(theta=1e6, factor=1.0, interleave=True)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 2, 128)).astype(np.float32)
  pos = np.array([0, 3, 900, 20000])
  y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  f = 1.0 / (1e6 ** (np.arange(0, 64, 2) / 64))
  ref = x.astype(np.float64).copy()
  for t in range(4):
    for i in range(32):
      a = pos[t] * f[i]
      x1, x2 = x[t, :, 2 * i].astype(np.float64), x[t, :, 2 * i + 1].astype(np.float64)
      ref[t, :, 2 * i] = x1 * math.cos(a) - x2 * math.sin(a)
      ref[t, :, 2 * i + 1] = x1 * math.sin(a) + x2 * math.cos(a)
  np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(y[:2], ref[:2], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y[..., 64:], x[..., 64:])
  # Not the NeoX layout: the same input rotates differently.
  neox = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), RopeConfig(theta=1e6, factor=1.0)))
  assert np.abs(neox[1:, :, :64] - y[1:, :, :64]).max() > 0.1
