"""Paged-decode top-k as physical cache slots: what sparse attention reads next.

After ``paged_mqa_logits`` each decode query has logits over its request's logical token
positions [0, L); sparse attention wants the chosen tokens' physical slots in the paged cache,
``block_tables[b, p // 64] * 64 + p % 64`` (sglang's ``page_table_1``-style slot ids). The top-k
runs on the logical row (the Pallas kernel or the xla backend, through ``topk_indices``) with
each query's causal range as [0, ke), and the slots come from one small gather of the block
table afterwards: [rows, k] int32, negligible next to the logits read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax.cache import table_slots
from nsa_jax.reference import PAGE_SIZE
from nsa_jax.validation import check_values, expect, paged_context_error, static_int

_I32 = jnp.int32


def decode_key_range(context_lens, next_n: int, max_context_len: int) -> jax.Array:
  """int32 [B * next_n]: ke of each decode query (keys [0, ke) are valid).

  Query t of request b sees p < ctx[b] and p <= ctx[b] - next_n + t, i.e.
  ``ke = ctx[b] - next_n + t + 1``, clamped to [0, min(ctx[b], max_context_len)].
  """
  t = jnp.arange(next_n, dtype=_I32)[None, :]
  ctx = context_lens.astype(_I32)[:, None]
  ke = jnp.clip(ctx - next_n + t + 1, 0, jnp.minimum(ctx, max_context_len))
  return ke.reshape(-1)


@functools.partial(jax.jit, static_argnames=("next_n", "k", "num_pages", "backend", "interpret"))
def _paged_topk_slots(logits, context_lens, block_tables, *, next_n, k, num_pages, backend,
                      interpret):
  rows, L = logits.shape
  ke = decode_key_range(context_lens, next_n, L)
  ks = jnp.zeros_like(ke)
  idx = ops.topk_indices_unchecked(logits, ks, ke, k=k, backend=backend, interpret=interpret,
                                   fn="paged_topk_slots")                          # [rows, k]
  tables = jnp.repeat(block_tables.astype(_I32), next_n, axis=0)                   # [rows, P]
  return table_slots(tables, idx, num_pages)


def paged_topk_slots(logits, context_lens, block_tables, *, next_n: int, k: int = 2048,
                     num_pages: int | None = None, backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Top-k of paged-decode logits, returned as physical cache slots.

  Args:
    logits: float32 [B * next_n, L], as ``paged_mqa_logits`` returns (row b * next_n + t is
      query t of request b; -inf at invalid tokens is fine but not required).
    context_lens: int32 [B] in [0, min(L, max_pages * 64)] (checked in checking mode); B may
      be 0.
    block_tables: int32 [B, max_pages]; entries past a request's last page are never read
      for a chosen token.
    next_n: static number of query tokens per request, in 1..4 (``ops.MAX_NEXT_N``, the
      tested range): 1, or up to 4 with speculative decoding.
    k: static top-k count (DeepSeek-V3.2: 2048).
    num_pages: static cache size; when given, tokens on a page id outside [0, num_pages)
      (their logits are -inf) come back as -1 instead of a slot (an error in checking mode).
    backend, interpret: as for :func:`nsa_jax.topk_indices`.
    The static ints take anything ``operator.index`` takes.

  Returns:
    int32 [B * next_n, k]: ``block_tables[b, p // 64] * 64 + p % 64`` for each chosen logical
    position p of query row b * next_n + t, -1 padded (rows with <= k valid tokens return all
    of them). Order and tie rule are those of the top-k backend.
  """
  fn = "paged_topk_slots"
  expect("logits", logits, (None, None), jnp.float32, fn)
  expect("context_lens", context_lens, (None,), _I32, fn)
  B = context_lens.shape[0]
  expect("block_tables", block_tables, (B, None), _I32, fn)
  next_n = static_int(fn, "next_n", next_n, 1)
  ops.check_next_n(fn, "the next_n argument", next_n)
  if logits.shape[0] != B * next_n:
    raise ValueError(f"{fn}: logits must have B * next_n = {B * next_n} rows, got "
                     f"{list(logits.shape)}")
  k = static_int(fn, "k", k, 1)
  num_pages = static_int(fn, "num_pages", num_pages, 1, none_ok=True)
  backend, interpret = ops.check_backend(backend, interpret, fn)
  L = logits.shape[1]
  check_values(fn, lambda c, t: paged_context_error(c, t, L, num_pages, PAGE_SIZE),
               context_lens, block_tables)
  return paged_topk_slots_unchecked(logits, context_lens, block_tables, next_n=next_n, k=k,
                                    num_pages=num_pages, backend=backend, interpret=interpret)


def paged_topk_slots_unchecked(logits, context_lens, block_tables, *, next_n: int, k: int,
                               num_pages: int | None, backend: str, interpret: bool):
  """:func:`paged_topk_slots` for arguments its caller validated (``Indexer.decode``, whose
  ``paged_mqa_logits`` call checked the same context lengths and tables)."""
  rows, L = logits.shape
  if rows == 0 or L == 0:
    return jnp.full((rows, k), -1, _I32)
  ops.resolve_backend(backend, interpret, ops.topk_supported(L, k), "paged_topk_slots",
                      (logits,))
  return _paged_topk_slots(logits, context_lens, block_tables, next_n=next_n, k=k,
                           num_pages=num_pages, backend=backend, interpret=interpret)


__all__ = ["decode_key_range", "paged_topk_slots", "paged_topk_slots_unchecked"]
