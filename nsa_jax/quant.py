"""Block-wise fp8 (e4m3fn) activation quantization, as DeepSeek-V3.2's ``act_quant``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.validation import describe, static_int

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FORMATS = (None, "ue8m0")


def act_quant(x: jax.Array, block_size: int = 128, scale_fmt: str | None = None):
  """Quantizes the last axis of ``x`` to fp8 e4m3fn in blocks of ``block_size``.

  Args:
    x: float array [..., N], N a multiple of ``block_size`` (leading sizes may be 0).
    block_size: static int >= 1, elements that share one scale.
    scale_fmt: None (scale = amax / 448) or ``"ue8m0"`` (that scale rounded up to a power
      of two, so the scale is exactly representable as an 8-bit exponent).

  Returns:
    ``(x_fp8 float8_e4m3fn[..., N], scale float32[..., N // block_size])`` with
    ``x ~= x_fp8 * scale`` per block. amax is clamped to >= 1e-4 so zero blocks are safe.
  """
  fn = "act_quant"
  if not isinstance(scale_fmt, (str, type(None))) or scale_fmt not in SCALE_FORMATS:
    raise ValueError(f"{fn}: scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
  block_size = static_int(fn, "block_size", block_size, 1)
  _check_float_array(fn, "x", x, "[..., N]")
  if x.ndim < 1 or x.shape[-1] % block_size:
    raise ValueError(f"{fn}: x's last axis must be a multiple of block_size={block_size}, got "
                     f"{describe(x)}")
  xf = x.astype(jnp.float32)
  blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
  amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1), AMAX_FLOOR)
  scale = amax / FP8_MAX
  if scale_fmt == "ue8m0":
    scale = _pow2_ceil(scale)
  # The clip only matters for rounding at the top of the range; x / scale <= 448 by construction.
  q = jnp.clip(blocks / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
  return q.reshape(x.shape), scale


def _check_float_array(fn: str, name: str, x, shape: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{fn}: {name} must be a float array {shape}, got {describe(x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn}: {name} must be a float array {shape}, got {describe(x)}")


def _pow2_ceil(x: jax.Array) -> jax.Array:
  """2**ceil(log2(x)) for positive normal float32 x, exactly (exp2/log2 are not exact in XLA):
  clear the mantissa and bump the exponent unless x already is a power of two."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  exp_bits = bits & jnp.int32(0x7F800000)
  bumped = jnp.where(bits & jnp.int32(0x007FFFFF), exp_bits + jnp.int32(1 << 23), exp_bits)
  return jax.lax.bitcast_convert_type(bumped, jnp.float32)


def dequant(x_fp8: jax.Array, scale: jax.Array, block_size: int = 128) -> jax.Array:
  """Inverse of :func:`act_quant`: float32[..., N] from fp8[..., N] and float32[..., N // block]."""
  fn = "dequant"
  block_size = static_int(fn, "block_size", block_size, 1)
  _check_float_array(fn, "x_fp8", x_fp8, "[..., N]")
  if x_fp8.ndim < 1 or x_fp8.shape[-1] % block_size:
    raise ValueError(f"{fn}: x_fp8's last axis must be a multiple of block_size={block_size}, "
                     f"got {describe(x_fp8)}")
  want = tuple(x_fp8.shape[:-1]) + (x_fp8.shape[-1] // block_size,)
  _check_float_array(fn, "scale", scale, list(want))
  if tuple(scale.shape) != want:
    raise ValueError(f"{fn}: scale must have shape {list(want)} (x_fp8 {list(x_fp8.shape)} in "
                     f"blocks of {block_size}), got {describe(scale)}")
  blocks = x_fp8.astype(jnp.float32).reshape(*x_fp8.shape[:-1], -1, block_size)
  return (blocks * scale[..., None]).reshape(x_fp8.shape)
