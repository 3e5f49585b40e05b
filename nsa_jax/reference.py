"""Plain-jnp float32 reference of the indexer's device math: the oracle and the ``xla`` backend.

Everything here is memory-bounded: query rows are processed in static chunks (``lax.map``)
so that the [rows, H, keys] intermediate stays under ``_CHUNK_BYTES`` and only the [T, S]
logits themselves are ever whole. T = S = 32768 with H = 64 runs on a 24 GB CPU box.

Bad values are masked, never read out of bounds: a key j is valid for query i iff
``max(ks[i], 0) <= j < min(ke[i], S)``; a paged token whose page id lies outside
``[0, num_pages)`` or past ``block_tables``' width is invalid (-inf).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nsa_jax.quant import FP8_DTYPE

# Budget for one chunk's [rows, H, keys] float32 intermediate.
_CHUNK_BYTES = 256 * 1024 * 1024
PAGE_SIZE = 64
NEG_INF = float("-inf")


def _rows_per_chunk(num_rows: int, bytes_per_row: int, budget: int = _CHUNK_BYTES) -> int:
  """Largest power of two <= num_rows whose rows fit ``budget`` (at least 1). Static."""
  rows = max(1, budget // max(bytes_per_row, 1))
  rows = 1 << (rows.bit_length() - 1)
  return max(1, min(rows, 1 << max(num_rows - 1, 0).bit_length()))


def _map_row_chunks(fn, rows: int, arrays, num_rows: int):
  """Applies ``fn`` to row chunks of ``arrays`` (all sharing leading axis num_rows); concats."""
  n_chunks = math.ceil(num_rows / rows)
  pad = n_chunks * rows - num_rows
  padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
  chunked = [a.reshape(n_chunks, rows, *a.shape[1:]) for a in padded]
  out = jax.lax.map(lambda xs: fn(*xs), chunked)
  return out.reshape(n_chunks * rows, *out.shape[2:])[:num_rows]


def _dot(q, k, fp8_dot: bool):
  """[..., H, D] x [S, D] -> float32 [..., H, S]. fp8 products are exact in float32, so the
  fp8-operand path differs from the float32 one only in summation order."""
  if fp8_dot:
    return jnp.einsum("...hd,sd->...hs", q, k, preferred_element_type=jnp.float32)
  return jnp.einsum("...hd,sd->...hs", q.astype(jnp.float32), k.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def ragged_valid_mask(ks: jax.Array, ke: jax.Array, num_keys: int) -> jax.Array:
  """bool[T, S]: key j valid for query i iff ks[i] <= j < ke[i] (j in [0, S))."""
  j = jnp.arange(num_keys, dtype=jnp.int32)[None, :]
  return (j >= ks[:, None]) & (j < ke[:, None])


def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, *, clean_logits: bool = True,
               fp8_dot: bool = False) -> jax.Array:
  """Ragged-prefill MQA logits.

  ``logits[i, j] = k_scale[j] * sum_h weights[i, h] * relu(q[i, h] . k[j])``.

  Args:
    q_fp8: float8_e4m3fn [T, H, D] (any float dtype works for the reference).
    k_fp8: float8_e4m3fn [S, D].
    k_scale: float32 [S].
    weights: float32 [T, H] (q scales and softmax scale already folded in).
    ks, ke: int32 [T], half-open valid key range per query.
    clean_logits: write -inf outside [ks, ke); if False the raw value is left there.
    fp8_dot: feed the fp8 operands to the dot directly (the ``xla`` backend on GPU).

  Returns:
    float32 [T, S].
  """
  T, H, _ = q_fp8.shape
  S = k_fp8.shape[0]
  k_scale = k_scale.astype(jnp.float32)

  def chunk(q, w, lo, hi):
    s = jnp.maximum(_dot(q, k_fp8, fp8_dot), 0.0)                    # [r, H, S]
    out = jnp.einsum("rhs,rh->rs", s, w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST) * k_scale[None, :]
    if clean_logits:
      out = jnp.where(ragged_valid_mask(lo, hi, S), out, NEG_INF)
    return out

  rows = _rows_per_chunk(T, H * S * 4)
  return _map_row_chunks(chunk, rows, [q_fp8, weights, ks, ke], T)


def paged_valid_mask(context_lens, block_tables, num_pages: int, next_n: int,
                     max_context_len: int) -> jax.Array:
  """bool[B, next_n, L]: token p valid for query t of request b iff p < ctx[b],
  p <= ctx[b] - next_n + t, and p's page entry exists and names a page in [0, num_pages)."""
  p = jnp.arange(max_context_len, dtype=jnp.int32)
  page_col = p // PAGE_SIZE
  max_pages = block_tables.shape[1]
  in_table = page_col < max_pages
  pid = jnp.take(block_tables, jnp.minimum(page_col, max_pages - 1), axis=1)     # [B, L]
  page_ok = in_table[None, :] & (pid >= 0) & (pid < num_pages)
  ctx = context_lens[:, None, None]
  t = jnp.arange(next_n, dtype=jnp.int32)[None, :, None]
  return (p[None, None, :] < ctx) & (p[None, None, :] <= ctx - next_n + t) & page_ok[:, None, :]


def paged_mqa_logits(q_fp8, k_pages, k_scale_pages, weights, context_lens, block_tables, *,
                     max_context_len: int, clean_logits: bool = True,
                     fp8_dot: bool = False) -> jax.Array:
  """Paged-decode MQA logits.

  Args:
    q_fp8: float8_e4m3fn [B, next_n, H, D].
    k_pages: float8_e4m3fn [num_pages, 64, D]; k_scale_pages: float32 [num_pages, 64].
    weights: float32 [B * next_n, H].
    context_lens: int32 [B]; block_tables: int32 [B, max_pages].
    max_context_len: static output width L.

  Returns:
    float32 [B * next_n, L]; token p of request b is ``k_pages[block_tables[b, p // 64], p % 64]``.
  """
  B, n, H, _ = q_fp8.shape
  P = k_pages.shape[0]
  L = max_context_len
  p = jnp.arange(L, dtype=jnp.int32)
  max_pages = block_tables.shape[1]
  w = weights.reshape(B, n, H)
  valid = paged_valid_mask(context_lens, block_tables, P, n, L)

  def one(q, wb, table, ok):
    pid = jnp.clip(table[jnp.minimum(p // PAGE_SIZE, max_pages - 1)], 0, P - 1)
    kb = k_pages[pid, p % PAGE_SIZE]                                   # [L, D]
    sb = k_scale_pages[pid, p % PAGE_SIZE].astype(jnp.float32)       # [L]
    s = jnp.maximum(_dot(q, kb, fp8_dot), 0.0)                       # [n, H, L]
    out = jnp.einsum("nhl,nh->nl", s, wb.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST) * sb[None, :]
    return jnp.where(ok, out, NEG_INF) if clean_logits else out

  out = jax.lax.map(lambda xs: one(*xs), (q_fp8, w, block_tables, valid))
  return out.reshape(B * n, L)


def sortable_keys(x: jax.Array) -> jax.Array:
  """int32 keys ordered like float32 x (NaN ranks as -inf); monotone, so top-k on keys is
  top-k on values. Lets invalid slots take INT32_MIN, strictly below every valid key."""
  x = jnp.where(jnp.isnan(x), NEG_INF, x.astype(jnp.float32))
  x = jnp.where(x == 0, 0.0, x)  # -0.0 and +0.0 tie
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i >= 0, i, i ^ jnp.int32(0x7FFFFFFF))


def topk_indices(logits, ks, ke, *, k: int = 2048) -> jax.Array:
  """Indices of the k largest logits within [ks, ke) per row.

  Args:
    logits: float32 [T, S] (-inf outside the range is fine but not required).
    ks, ke: int32 [T].
    k: static number of indices.

  Returns:
    int32 [T, k], absolute key indices sorted by descending logit; -1 fills the slots past
    the number of valid keys. Every valid key ranks above every invalid one, so a row with
    <= k valid keys returns all of them whatever their values. NaN ranks as -inf. Ties: the
    lower key index wins.
  """
  T, S = logits.shape
  width = max(S, k)

  def chunk(x, lo, hi):
    keys = jnp.where(ragged_valid_mask(lo, hi, S), sortable_keys(x), jnp.iinfo(jnp.int32).min)
    if width > S:
      keys = jnp.pad(keys, ((0, 0), (0, width - S)), constant_values=jnp.iinfo(jnp.int32).min)
    _, idx = jax.lax.top_k(keys, k)
    n_valid = jnp.clip(jnp.minimum(hi, S) - jnp.maximum(lo, 0), 0, k)
    return jnp.where(jnp.arange(k)[None, :] < n_valid[:, None], idx, -1).astype(jnp.int32)

  rows = _rows_per_chunk(T, width * 16)
  return _map_row_chunks(chunk, rows, [logits, ks, ke], T)


__all__ = ["FP8_DTYPE", "PAGE_SIZE", "mqa_logits", "paged_mqa_logits", "topk_indices",
           "ragged_valid_mask", "paged_valid_mask", "sortable_keys"]
