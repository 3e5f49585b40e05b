"""Host-side ragged batch builder: request lengths (numpy) -> bucket-padded arrays and ks/ke.

Serving sees every sequence length; jit would compile once per length. Here the packed token
axis (T) and the packed key axis (S) are padded to buckets, so a new length compiles only when
it crosses a bucket. Values are on the host already, so this is where bad lengths are caught,
at no cost: a ``ValueError`` naming the argument.

Packing (docs/contract.md, "Valid keys"): the key axis holds each request's full
sequence (cached prefix, then its new tokens) back to back; new token p of request b sees keys
``[start_b, start_b + prefix_b + p + 1)``. Example: extend lens [3, 2] with prefix lens [7, 2]
(total 10 and 4) give ks = [0, 0, 0, 10, 10], ke = [8, 9, 10, 13, 14]. Padding rows get the
empty range [0, 0), so their top-k comes back as -1.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nsa_jax import planner
from nsa_jax.validation import host_array


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedBatch:
  """A bucket-padded ragged prefill batch (numpy arrays and ints; host side).

  Attributes:
    positions: int32 [T_pad], position of each new token within its request's full sequence
      (prefix_len + offset among its new tokens); 0 for padding.
    ks, ke: int32 [T_pad], half-open key range in the packed key axis; [0, 0) for padding.
    token_request: int32 [T_pad], request id of each new token; -1 for padding.
    token_slots: int32 [T_pad], slot of each new token's own key in the packed key axis
      (where its freshly computed key goes); -1 for padding.
    key_positions: int32 [S_pad], position of each packed key within its request; -1 padding.
    key_request: int32 [S_pad], request id of each packed key; -1 for padding.
    key_starts: int32 [B], start of each request's sequence in the packed key axis.
    num_tokens, num_keys: real (unpadded) counts.
    T_pad, S_pad: the bucketed sizes, the arrays' lengths.
  """

  positions: np.ndarray
  ks: np.ndarray
  ke: np.ndarray
  token_request: np.ndarray
  token_slots: np.ndarray
  key_positions: np.ndarray
  key_request: np.ndarray
  key_starts: np.ndarray
  num_tokens: int
  num_keys: int
  T_pad: int
  S_pad: int

  @property
  def num_requests(self) -> int:
    return int(self.key_starts.shape[0])

  @property
  def token_mask(self) -> np.ndarray:
    """bool [T_pad], True for real tokens."""
    return self.token_request >= 0

  @property
  def key_mask(self) -> np.ndarray:
    """bool [S_pad], True for real key slots."""
    return self.key_request >= 0


def _lengths(name: str, x, fn: str) -> np.ndarray:
  arr = host_array(fn, name, x)
  if arr.ndim != 1:
    raise ValueError(f"{fn}: {name} must be a 1-D sequence of ints, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{fn}: {name} must hold integers, got dtype {arr.dtype}: {arr.tolist()}")
  arr = arr.astype(np.int64)
  if (arr < 0).any():
    bad = np.flatnonzero(arr < 0)
    raise ValueError(f"{fn}: {name} must be >= 0, got {arr[bad].tolist()} at requests "
                     f"{bad.tolist()}")
  return arr


def build_ragged_batch(extend_lens, prefix_lens, *, token_buckets: Sequence[int] | None = None,
                       key_buckets: Sequence[int] | None = None) -> RaggedBatch:
  """Packs a ragged prefill batch into bucket-padded arrays.

  Args:
    extend_lens: ints [B] >= 0, new tokens per request (numpy or a list).
    prefix_lens: ints [B] >= 0, tokens already in the cache per request.
    token_buckets, key_buckets: strictly increasing ints >= 1 for T_pad and S_pad, or None for
      powers of two from ``planner.MIN_BUCKET``.

  Returns:
    :class:`RaggedBatch` with T_pad >= sum(extend_lens) and S_pad >= sum(prefix + extend).

  Raises:
    ValueError: lengths not 1-D non-negative ints of equal length, a total past int32, or a
      count above the largest given bucket.
  """
  fn = "build_ragged_batch"
  ext = _lengths("extend_lens", extend_lens, fn)
  pre = _lengths("prefix_lens", prefix_lens, fn)
  if ext.shape != pre.shape:
    raise ValueError(f"{fn}: extend_lens and prefix_lens must have the same length, got "
                     f"{ext.shape[0]} and {pre.shape[0]}")
  total = ext + pre
  num_tokens, num_keys = int(ext.sum()), int(total.sum())
  if num_keys > np.iinfo(np.int32).max:
    raise ValueError(f"{fn}: the packed key axis must fit int32, got "
                     f"sum(prefix_lens + extend_lens) = {num_keys}")
  T_pad = planner.bucket_size(num_tokens, token_buckets, name="sum(extend_lens)", fn=fn)
  S_pad = planner.bucket_size(num_keys, key_buckets, name="sum(prefix_lens + extend_lens)",
                              fn=fn)
  B = ext.shape[0]
  starts = np.zeros(B, np.int64)
  if B:
    starts[1:] = np.cumsum(total)[:-1]

  # Token axis: request id and offset among its new tokens, without a Python loop per token.
  tok_req = np.repeat(np.arange(B), ext)
  tok_first = np.zeros(B, np.int64)
  if B:
    tok_first[1:] = np.cumsum(ext)[:-1]
  offset = np.arange(num_tokens) - tok_first[tok_req]
  pos = pre[tok_req] + offset

  def padded(values, size, fill):
    out = np.full(size, fill, np.int32)
    out[: values.shape[0]] = values
    return out

  key_req = np.repeat(np.arange(B), total)
  key_pos = np.arange(num_keys) - starts[key_req]
  return RaggedBatch(
      positions=padded(pos, T_pad, 0),
      ks=padded(starts[tok_req], T_pad, 0),
      ke=padded(starts[tok_req] + pos + 1, T_pad, 0),
      token_request=padded(tok_req, T_pad, -1),
      token_slots=padded(starts[tok_req] + pos, T_pad, -1),
      key_positions=padded(key_pos, S_pad, -1),
      key_request=padded(key_req, S_pad, -1),
      key_starts=starts.astype(np.int32),
      num_tokens=num_tokens, num_keys=num_keys, T_pad=T_pad, S_pad=S_pad)


__all__ = ["RaggedBatch", "build_ragged_batch"]
