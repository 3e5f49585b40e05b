"""The paged cache of fp8 index keys, and its sglang/DeepGEMM byte layout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nsa_jax.quant import FP8_DTYPE
from nsa_jax.validation import describe, expect, static_int

PAGE_SIZE = 64


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


@dataclasses.dataclass(frozen=True)
class IndexKCache:
  """One layer's paged index-K cache (a pytree, so it can be donated and jitted).

  Attributes:
    k_fp8: float8_e4m3fn [num_pages, page_size, D], token-major within a page.
    k_scale: float32 [num_pages, page_size], one scale per token.

  A token at cache slot ``s`` lives at page ``s // page_size``, offset ``s % page_size``;
  request b's token p is slot ``block_tables[b, p // page_size] * page_size + p % page_size``.
  Building one checks the two arrays' shapes and dtypes (ValueError); jax's own rebuilding of
  the pytree (under jit, with placeholder leaves) skips the check.
  """

  k_fp8: jax.Array
  k_scale: jax.Array

  def __post_init__(self):
    kf, sc = self.k_fp8, self.k_scale
    if not _is_array(kf) or kf.ndim != 3 or kf.dtype != FP8_DTYPE:
      raise ValueError(f"IndexKCache: k_fp8 must be float8_e4m3fn [num_pages, page_size, D], "
                       f"got {describe(kf)}")
    want = list(kf.shape[:2])
    if not _is_array(sc) or list(sc.shape) != want or sc.dtype != jnp.float32:
      raise ValueError(f"IndexKCache: k_scale must be float32 [num_pages, page_size] = {want}, "
                       f"got {describe(sc)}")

  @property
  def num_pages(self) -> int:
    return self.k_fp8.shape[0]

  @property
  def page_size(self) -> int:
    return self.k_fp8.shape[1]

  @property
  def head_dim(self) -> int:
    return self.k_fp8.shape[2]

  @classmethod
  def create(cls, num_pages: int, head_dim: int = 128, page_size: int = PAGE_SIZE) -> "IndexKCache":
    """An all-zero cache of ``num_pages`` pages (static ints >= 1) of ``page_size`` tokens."""
    fn = "IndexKCache.create"
    num_pages = static_int(fn, "num_pages", num_pages, 1)
    head_dim = static_int(fn, "head_dim", head_dim, 1)
    page_size = static_int(fn, "page_size", page_size, 1)
    return cls(jnp.zeros((num_pages, page_size, head_dim), FP8_DTYPE),
               jnp.zeros((num_pages, page_size), jnp.float32))

  def write(self, slots: jax.Array, k_fp8: jax.Array, k_scale: jax.Array) -> "IndexKCache":
    """Returns the cache with token rows written at ``slots``.

    Args:
      slots: int [N] (any int dtype) flat slot ids (page * page_size + offset); a slot
        outside [0, num_pages * page_size), e.g. -1 for a padding token, is skipped.
      k_fp8: float8_e4m3fn [N, D]; k_scale: float32 [N] (or [N, 1]). N may be 0.
    """
    fn = "IndexKCache.write"
    if not hasattr(slots, "shape") or not hasattr(slots, "dtype"):
      raise ValueError(f"{fn}: slots must be an int array [N], got {describe(slots)}")
    if slots.ndim != 1 or not jnp.issubdtype(slots.dtype, jnp.integer):
      raise ValueError(f"{fn}: slots must be an int array [N], got {describe(slots)}")
    N = slots.shape[0]
    expect("k_fp8", k_fp8, (N, self.head_dim), FP8_DTYPE, fn)
    if hasattr(k_scale, "shape") and k_scale.ndim == 2:
      expect("k_scale", k_scale, (N, 1), jnp.float32, fn)
    else:
      expect("k_scale", k_scale, (N,), jnp.float32, fn)
    n_slots = self.num_pages * self.page_size
    slots = slots.astype(jnp.int32)
    # Out-of-range slots are mapped past the end so that mode="drop" skips them.
    safe = jnp.where((slots >= 0) & (slots < n_slots), slots, n_slots)
    flat_k = self.k_fp8.reshape(n_slots, self.head_dim).at[safe].set(k_fp8, mode="drop")
    flat_s = self.k_scale.reshape(n_slots).at[safe].set(
        k_scale.reshape(-1).astype(jnp.float32), mode="drop")
    return IndexKCache(flat_k.reshape(self.k_fp8.shape), flat_s.reshape(self.k_scale.shape))

  def to_bytes(self) -> jax.Array:
    """uint8 [num_pages, page_size * (D + 4)]: sglang/DeepGEMM's layout (the page's fp8 keys,
    token-major, then its page_size float32 scales, little-endian)."""
    P, page, D = self.k_fp8.shape
    kb = jax.lax.bitcast_convert_type(self.k_fp8, jnp.uint8).reshape(P, page * D)
    sb = jax.lax.bitcast_convert_type(self.k_scale, jnp.uint8).reshape(P, page * 4)
    return jnp.concatenate([kb, sb], axis=1)

  @classmethod
  def from_bytes(cls, data: jax.Array, head_dim: int = 128, page_size: int = PAGE_SIZE
                 ) -> "IndexKCache":
    """Inverse of :meth:`to_bytes`; ``data`` is uint8 [num_pages, page_size * (head_dim + 4)]."""
    fn = "IndexKCache.from_bytes"
    head_dim = static_int(fn, "head_dim", head_dim, 1)
    page_size = static_int(fn, "page_size", page_size, 1)
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
      raise ValueError(f"{fn}: data must be a uint8 array [num_pages, "
                       f"{page_size * (head_dim + 4)}], got {describe(data)}")
    if data.ndim != 2 or data.shape[1] != page_size * (head_dim + 4) or data.dtype != jnp.uint8:
      raise ValueError(
          f"IndexKCache.from_bytes: data must be uint8[num_pages, {page_size * (head_dim + 4)}], "
          f"got {data.dtype}{list(data.shape)}")
    P = data.shape[0]
    kb = data[:, : page_size * head_dim].reshape(P, page_size, head_dim)
    sb = data[:, page_size * head_dim:].reshape(P, page_size, 4)
    return cls(jax.lax.bitcast_convert_type(kb, FP8_DTYPE),
               jax.lax.bitcast_convert_type(sb, jnp.float32))


def _flatten_with_keys(c: IndexKCache):
  return ((jax.tree_util.GetAttrKey("k_fp8"), c.k_fp8),
          (jax.tree_util.GetAttrKey("k_scale"), c.k_scale)), None


def _unflatten(_, leaves) -> IndexKCache:
  # Not through __init__: jax rebuilds pytrees with placeholder leaves (None, object(),
  # in_axes ints) that the user-facing check would refuse.
  c = object.__new__(IndexKCache)
  object.__setattr__(c, "k_fp8", leaves[0])
  object.__setattr__(c, "k_scale", leaves[1])
  return c


jax.tree_util.register_pytree_with_keys(
    IndexKCache, _flatten_with_keys, _unflatten,
    flatten_func=lambda c: ((c.k_fp8, c.k_scale), None))


def token_slots(block_tables: jax.Array, requests: jax.Array, positions: jax.Array,
                page_size: int = PAGE_SIZE) -> jax.Array:
  """Cache slots of tokens given by (request, position), jit-friendly (device-side).

  Args:
    block_tables: int32 [B, max_pages]; request b's token p lives in page
      ``block_tables[b, p // page_size]`` at offset ``p % page_size``.
    requests: int32 [N], the request of each token.
    positions: int32 [N], the token's position within its request.

  Returns:
    int32 [N] slots for :meth:`IndexKCache.write`; -1 (skipped by ``write``) for a request
    outside [0, B), a negative position, a position past the table's width, or a negative
    page id. A decode step's new tokens are ``positions = context_lens - next_n + t``.
  """
  B, max_pages = block_tables.shape
  requests = requests.astype(jnp.int32)
  positions = positions.astype(jnp.int32)
  col = positions // page_size
  ok = (requests >= 0) & (requests < B) & (positions >= 0) & (col < max_pages)
  page = block_tables[jnp.clip(requests, 0, B - 1), jnp.clip(col, 0, max_pages - 1)]
  ok &= page >= 0
  return jnp.where(ok, page * page_size + positions % page_size, -1).astype(jnp.int32)


def table_slots(tables: jax.Array, positions: jax.Array, num_pages: int | None = None,
                page_size: int = PAGE_SIZE) -> jax.Array:
  """Cache slots of logical positions, one block table per row (device-side, jit-friendly).

  Args:
    tables: int32 [R, max_pages], the block table of each row's request.
    positions: int32 [R] or [R, K], logical token positions of row r's request.
    num_pages: static cache size; when given, a page id >= num_pages also gives -1.

  Returns:
    int32, positions' shape: ``tables[r, p // page_size] * page_size + p % page_size``, or -1
    where p is negative, past the table's width, or on a negative (or, with num_pages,
    out-of-cache) page id.
  """
  max_pages = tables.shape[1]
  col = positions // page_size
  cols = jnp.clip(col, 0, max_pages - 1)
  page = jnp.take_along_axis(tables, cols if cols.ndim == 2 else cols[:, None], axis=1)
  page = page.reshape(positions.shape)
  ok = (positions >= 0) & (col < max_pages) & (page >= 0)
  if num_pages is not None:
    ok &= page < num_pages
  return jnp.where(ok, page * page_size + positions % page_size, -1).astype(jnp.int32)
