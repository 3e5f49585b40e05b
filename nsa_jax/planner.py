"""Static chunk plans for prefill logits, and the bucket ladder for padded sizes.

A plan is a pure function of (num_q, num_k, budget): no array values, no device queries. It is
a frozen, hashable dataclass so it can be a static argument of ``jax.jit``; equal inputs give
equal plans, so a sequence length recompiles only when its bucket (and so its shape) changes.
Rows per chunk come from a ladder of powers of two, which keeps the number of distinct plans
(and compiles) logarithmic in the budget rather than linear.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from nsa_jax import budget as _budget
from nsa_jax.validation import static_int

# Default bucket ladder: powers of two from here up.
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How to split ``num_q`` query rows against ``num_k`` keys into equal static chunks.

  Attributes:
    num_q, num_k: the problem (ints >= 1).
    rows: query rows per chunk (a power of two, or num_q when unchunked).
    num_chunks: number of chunks (>= 1).
    padded_q: rows * num_chunks >= num_q, the rows computed in all. ``prefill_topk`` does not
      pad q to it: it shifts the last chunk back to end at num_q, so the padded_q - num_q
      extra rows are recomputed real rows rather than a padded copy of q.
    budget_bytes: the budget the plan was made for; informational, not part of equality or
      the hash, so two budgets that give the same chunks share one compiled program.
  """

  num_q: int
  num_k: int
  rows: int
  num_chunks: int
  padded_q: int
  budget_bytes: int = dataclasses.field(default=0, compare=False)

  @property
  def chunked(self) -> bool:
    return self.num_chunks > 1

  @property
  def chunk_logits_bytes(self) -> int:
    """Bytes of one chunk's float32 logits, the peak the plan bounds."""
    return self.rows * self.num_k * _budget.BYTES_PER_LOGIT


def _check_int(fn: str, name: str, x, lo: int) -> int:
  return static_int(fn, name, x, lo)


def pow2_floor(n: int) -> int:
  """Largest power of two <= n (n >= 1)."""
  return 1 << (n.bit_length() - 1)


def plan_chunks(num_q: int, num_k: int, budget_bytes: int, *,
                skip_elements: int | None = None) -> ChunkPlan:
  """The static chunk plan for a [num_q, num_k] float32 logits tensor under ``budget_bytes``.

  Unchunked when ``num_q * num_k < skip_elements`` (default ``budget.SKIP_CHUNK_ELEMENTS``,
  read at call time) or when the logits fit the budget. Otherwise rows per chunk is the
  largest power of two <= ``budget // (num_k * 4)``, at least 1 (a budget below one row still
  makes progress, one row at a time).

  Args:
    num_q, num_k, budget_bytes: ints >= 1 (anything ``operator.index`` takes).
    skip_elements: int >= 0 or None.

  Returns:
    :class:`ChunkPlan`.
  """
  fn = "plan_chunks"
  num_q = _check_int(fn, "num_q", num_q, 1)
  num_k = _check_int(fn, "num_k", num_k, 1)
  budget_bytes = _check_int(fn, "budget_bytes", budget_bytes, 1)
  if skip_elements is None:
    skip_elements = _budget.SKIP_CHUNK_ELEMENTS
  skip_elements = _check_int(fn, "skip_elements", skip_elements, 0)
  row_bytes = num_k * _budget.BYTES_PER_LOGIT
  if num_q * num_k < skip_elements or num_q * row_bytes <= budget_bytes:
    return ChunkPlan(num_q, num_k, num_q, 1, num_q, budget_bytes)
  # budget < num_q * row_bytes here, so rows < num_q: at least two chunks.
  rows = pow2_floor(max(1, budget_bytes // row_bytes))
  n = math.ceil(num_q / rows)
  return ChunkPlan(num_q, num_k, rows, n, n * rows, budget_bytes)


def default_buckets(upto: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
  """Powers of two from ``min_bucket`` up to the first one >= ``upto``."""
  out = [min_bucket]
  while out[-1] < upto:
    out.append(out[-1] * 2)
  return tuple(out)


def check_buckets(name: str, buckets, fn: str) -> tuple[int, ...]:
  """Validates a caller-given ladder: a non-empty, strictly increasing sequence of ints >= 1."""
  if isinstance(buckets, np.ndarray):
    buckets = buckets.tolist()
  if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
    raise ValueError(f"{fn}: {name} must be a non-empty sequence of ints >= 1, got {buckets!r}")
  out = []
  for b in buckets:
    try:
      b = static_int(fn, name, b, 1)
    except ValueError:
      raise ValueError(f"{fn}: {name} must hold ints >= 1, got {b!r} in {list(buckets)}"
                       ) from None
    if out and b <= out[-1]:
      raise ValueError(f"{fn}: {name} must be strictly increasing, got {list(buckets)}")
    out.append(b)
  return tuple(out)


def bucket_size(n: int, buckets: Sequence[int] | None = None, *, name: str = "n",
                fn: str = "bucket_size") -> int:
  """The smallest bucket >= n (n >= 0).

  Args:
    n: the real size.
    buckets: strictly increasing ints >= 1, or None for powers of two from ``MIN_BUCKET``.

  Raises:
    ValueError: if n exceeds the largest given bucket.
  """
  n = _check_int(fn, name, n, 0)
  if buckets is None:
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
  ladder = check_buckets(f"buckets for {name}", buckets, fn)
  for b in ladder:
    if b >= n:
      return b
  raise ValueError(f"{fn}: {name}={n} exceeds the largest bucket {ladder[-1]}; "
                   f"add a bucket >= {n}")


__all__ = ["ChunkPlan", "MIN_BUCKET", "bucket_size", "check_buckets", "default_buckets",
           "plan_chunks", "pow2_floor"]
