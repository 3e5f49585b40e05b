"""Rotary embedding with DeepSeek's YaRN frequency correction, NeoX (half-split) or interleaved.

The two layouts pair different features of the first ``rope_dim`` ones: NeoX rotates
(x[i], x[i + rope_dim/2]) by frequency i (DeepSeek-V3.2's indexer), interleaved (GPT-J) rotates
(x[2i], x[2i + 1]) (the GLM-5 family's indexer, ``indexer_rope_interleave: true`` in its config).
Both use the same frequencies; only which features form a pair differs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.validation import describe, expect, static_int


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary settings; the defaults are DeepSeek-V3.2's (64 rope dims, YaRN factor 40, NeoX).

  ``interleave``: pair features (2i, 2i + 1) (GPT-J) instead of (i, i + rope_dim / 2) (NeoX).
  """

  rope_dim: int = 64
  theta: float = 10000.0
  factor: float = 40.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  max_position: int = 163840
  interleave: bool = False

  def __post_init__(self):
    fn = "RopeConfig"
    rope_dim = static_int(fn, "rope_dim", self.rope_dim, 0)
    if rope_dim % 2:
      raise ValueError(f"{fn}: rope_dim must be even (features rotate in pairs), got "
                       f"{rope_dim}")
    if not isinstance(self.interleave, (bool, np.bool_)):
      raise ValueError(f"{fn}: interleave must be a bool, got {describe(self.interleave)}")
    object.__setattr__(self, "interleave", bool(self.interleave))
    object.__setattr__(self, "rope_dim", rope_dim)
    for name in ("original_max_position", "max_position"):
      object.__setattr__(self, name, static_int(fn, name, getattr(self, name), 1))
    for name, positive in (("theta", True), ("factor", True), ("beta_fast", False),
                           ("beta_slow", False)):
      v = getattr(self, name)
      if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer,
                                                                 np.floating))
          or not math.isfinite(v) or (positive and v <= 0)):
        raise ValueError(f"{fn}: {name} must be a finite{' positive' if positive else ''} "
                         f"number, got {describe(v)}")
      object.__setattr__(self, name, float(v))


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: RopeConfig) -> np.ndarray:
  """float64[rope_dim // 2]: per-pair angular frequencies, YaRN-blended when extended.

  YaRN keeps the high frequencies (many rotations within the original context) as they are
  and divides the low ones by ``factor``, with a linear ramp between the two correction dims.
  """
  dim = cfg.rope_dim
  freqs = 1.0 / (cfg.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.factor == 1.0 or cfg.max_position <= cfg.original_max_position:
    return freqs
  low = max(math.floor(_correction_dim(cfg.beta_fast, dim, cfg.theta, cfg.original_max_position)), 0)
  high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.theta, cfg.original_max_position)),
             dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  smooth = 1.0 - ramp
  return freqs / cfg.factor * (1.0 - smooth) + freqs * smooth


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig = RopeConfig()) -> jax.Array:
  """Rotates the first ``cfg.rope_dim`` features of x, NeoX or interleaved (``cfg.interleave``).

  Args:
    x: float [T, ..., D] with D >= rope_dim; the leading axis matches ``positions``.
    positions: int [T], each token's position in its sequence.

  Returns:
    x's shape and dtype; features ``rope_dim:`` pass through. Angles are float32.
  """
  fn = "apply_rope"
  if not isinstance(cfg, RopeConfig):
    raise ValueError(f"{fn}: cfg must be a RopeConfig, got {type(cfg).__name__}")
  if (not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim < 2 or
      not jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"{fn}: x must be a float array [T, ..., D], got {describe(x)}")
  if x.shape[-1] < cfg.rope_dim:
    raise ValueError(f"{fn}: x's last axis must hold at least rope_dim={cfg.rope_dim} "
                     f"features, got {describe(x)}")
  expect("positions", positions, (x.shape[0],),
         (jnp.int32, jnp.int64, jnp.int16, jnp.int8, jnp.uint32, jnp.uint16, jnp.uint8), fn)
  r = cfg.rope_dim
  freqs = jnp.asarray(inv_frequencies(cfg), jnp.float32)
  ang = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, r/2]
  ang = ang.reshape(ang.shape[:1] + (1,) * (x.ndim - 2) + ang.shape[1:])
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xr = x[..., :r].astype(jnp.float32)
  if cfg.interleave:
    pairs = xr.reshape(*xr.shape[:-1], r // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rot = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(xr.shape)
  else:
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return jnp.concatenate([rot.astype(x.dtype), x[..., r:]], axis=-1)
