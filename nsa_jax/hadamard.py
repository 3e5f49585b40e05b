"""Orthonormal Hadamard rotation of the last axis (DeepSeek-V3.2's ``rotate_activation``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.validation import describe


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """Sylvester Hadamard matrix float64[n, n] scaled by n**-0.5 (orthonormal, symmetric)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def hadamard_rotate(x: jax.Array) -> jax.Array:
  """Returns ``x @ H_n`` for x [..., n] (n a power of two), in x's dtype, computed in float32.

  The rotation is orthonormal, so dot products between rotated q and k equal the unrotated
  ones; it only spreads outliers across the block before fp8 rounding.
  """
  fn = "hadamard_rotate"
  if (not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim < 1 or
      not jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"{fn}: x must be a float array [..., n], got {describe(x)}")
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"{fn}: x's last axis must be a power of two, got {describe(x)}")
  h = jnp.asarray(hadamard_matrix(x.shape[-1]), jnp.float32)
  y = jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
