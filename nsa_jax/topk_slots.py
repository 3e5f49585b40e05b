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
from nsa_jax.validation import expect

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
  idx = ops.topk_indices(logits, ks, ke, k=k, backend=backend, interpret=interpret)  # [rows, k]
  tables = jnp.repeat(block_tables.astype(_I32), next_n, axis=0)                   # [rows, P]
  return table_slots(tables, idx, num_pages)


def paged_topk_slots(logits, context_lens, block_tables, *, next_n: int, k: int = 2048,
                     num_pages: int | None = None, backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Top-k of paged-decode logits, returned as physical cache slots.

  Args:
    logits: float32 [B * next_n, L], as ``paged_mqa_logits`` returns (row b * next_n + t is
      query t of request b; -inf at invalid tokens is fine but not required).
    context_lens: int32 [B].
    block_tables: int32 [B, max_pages]; entries past a request's last page are never read
      for a chosen token.
    next_n: static number of query tokens per request (1, or 2 with speculative decoding).
    k: static top-k count (DeepSeek-V3.2: 2048).
    num_pages: static cache size; when given, tokens on a page id outside [0, num_pages)
      (their logits are -inf) come back as -1 instead of a slot.
    backend, interpret: as for :func:`nsa_jax.topk_indices`.

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
  if not isinstance(next_n, int) or next_n < 1:
    raise ValueError(f"{fn}: next_n must be a static int >= 1, got {next_n!r}")
  if logits.shape[0] != B * next_n:
    raise ValueError(f"{fn}: logits must have B * next_n = {B * next_n} rows, got "
                     f"{list(logits.shape)}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"{fn}: k must be a static int >= 1, got {k!r}")
  return _paged_topk_slots(logits, context_lens, block_tables, next_n=next_n, k=k,
                           num_pages=num_pages, backend=backend, interpret=interpret)


__all__ = ["paged_topk_slots", "decode_key_range"]
