"""Public indexer ops: validation, then the Pallas kernels or the ``xla`` (reference) backend.

Every op takes ``backend="auto" | "pallas" | "xla"`` and ``interpret``:
- ``"auto"`` runs the Pallas kernel on a Hopper GPU when it supports the shapes, else ``xla``;
- ``"pallas"`` always runs the kernel (a ``ValueError`` if it cannot take these shapes);
- ``"xla"`` runs the jitted, memory-bounded reference (the CPU path and the baseline);
- ``interpret=True`` runs the Pallas kernel in interpret mode (CPU tests).
Shapes and dtypes are checked at trace time; values only in checking mode (``validation``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import reference
from nsa_jax.cache import IndexKCache
from nsa_jax.quant import FP8_DTYPE
from nsa_jax.validation import check_values, expect

BACKENDS = ("auto", "pallas", "xla")
_I32 = jnp.int32
_F32 = jnp.float32


@functools.lru_cache(maxsize=None)
def _on_hopper() -> bool:
  """True when the default device is a Hopper GPU (compute capability 9.x): the kernels use
  wgmma and TMA, which older GPUs lack and Blackwell replaced (tcgen05)."""
  if jax.default_backend() != "gpu":
    return False
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  return cc.split(".")[0] == "9"


def resolve_backend(backend: str, interpret: bool, supported, fn: str) -> str:
  """Returns "pallas" or "xla". ``supported()`` returns None or why the kernel can't run."""
  if backend not in BACKENDS:
    raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "xla":
    return "xla"
  why = supported()
  if backend == "pallas" or interpret:
    if why:
      raise ValueError(f"{fn}: the Pallas kernel does not support this input: {why}")
    return "pallas"
  return "pallas" if _on_hopper() and not why else "xla"


# --------------------------------------------------------------------------- ragged prefill

def check_mqa_args(q_fp8, k_fp8, k_scale, weights, ks, ke, fn="mqa_logits"):
  """Validates ragged-logits arguments for op ``fn`` (shared by mqa_logits and prefill_topk).

  Returns the static ``(T, H, D, S)``; raises ValueError on a bad shape or dtype, and, in
  checking mode, on ks/ke values outside 0 <= ks <= ke <= S.
  """
  expect("q_fp8", q_fp8, (None, None, None), FP8_DTYPE, fn)
  T, H, D = q_fp8.shape
  expect("k_fp8", k_fp8, (None, D), FP8_DTYPE, fn)
  S = k_fp8.shape[0]
  expect("k_scale", k_scale, (S,), _F32, fn)
  expect("weights", weights, (T, H), _F32, fn)
  expect("ks", ks, (T,), _I32, fn)
  expect("ke", ke, (T,), _I32, fn)
  if T < 1 or S < 1:
    raise ValueError(f"{fn}: T and S must be >= 1, got q_fp8 {list(q_fp8.shape)} and "
                     f"k_fp8 {list(k_fp8.shape)}")
  check_values(fn, lambda a, b: bool(((a >= 0) & (a <= b) & (b <= S)).all()),
               f"need 0 <= ks <= ke <= S={S} for every query", ks, ke)
  return T, H, D, S


@functools.partial(jax.jit, static_argnames=("clean_logits",))
def _mqa_logits_xla(q_fp8, k_fp8, k_scale, weights, ks, ke, clean_logits):
  return reference.mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke,
                              clean_logits=clean_logits, fp8_dot=True)


def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, *, clean_logits: bool = True,
               backend: str = "auto", interpret: bool = False) -> jax.Array:
  """Ragged-prefill MQA logits (DeepGEMM ``fp8_mqa_logits``).

  ``logits[i, j] = k_scale[j] * sum_h weights[i, h] * relu(q_fp8[i, h] . k_fp8[j])``
  for ``ks[i] <= j < ke[i]``.

  Args:
    q_fp8: float8_e4m3fn [T, H, D].
    k_fp8: float8_e4m3fn [S, D].
    k_scale: float32 [S].
    weights: float32 [T, H].
    ks, ke: int32 [T], half-open range of keys each query sees.
    clean_logits: -inf exactly outside [ks, ke). With False those entries are unspecified
      (the Pallas kernel may leave them unwritten; the xla backend writes raw values).

  Returns:
    float32 [T, S].
  """
  fn = "mqa_logits"
  _, H, D, _ = check_mqa_args(q_fp8, k_fp8, k_scale, weights, ks, ke, fn)

  def supported():
    from kernels_pallas import mqa_logits as kernel
    return kernel.unsupported_reason(H, D)

  if resolve_backend(backend, interpret, supported, fn) == "xla":
    return _mqa_logits_xla(q_fp8, k_fp8, k_scale, weights, ks, ke, clean_logits)
  from kernels_pallas import mqa_logits as kernel
  return kernel.mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke,
                           clean_logits=clean_logits, interpret=interpret)


# --------------------------------------------------------------------------- paged decode

@functools.partial(jax.jit, static_argnames=("max_context_len", "clean_logits"))
def _paged_xla(q_fp8, cache, weights, context_lens, block_tables, max_context_len, clean_logits):
  return reference.paged_mqa_logits(q_fp8, cache.k_fp8, cache.k_scale, weights, context_lens,
                                    block_tables, max_context_len=max_context_len,
                                    clean_logits=clean_logits, fp8_dot=True)


def paged_mqa_logits(q_fp8, cache: IndexKCache, weights, context_lens, block_tables, *,
                     max_context_len: int, clean_logits: bool = True, backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Paged-decode MQA logits (DeepGEMM ``fp8_paged_mqa_logits``).

  Query t of request b sees token p iff ``p < context_lens[b]`` and
  ``p <= context_lens[b] - next_n + t``.

  Args:
    q_fp8: float8_e4m3fn [B, next_n, H, D].
    cache: :class:`IndexKCache` with k_fp8 [num_pages, 64, D] and k_scale [num_pages, 64].
    weights: float32 [B * next_n, H].
    context_lens: int32 [B].
    block_tables: int32 [B, max_pages]; entries past a request's last page are never read.
    max_context_len: static int, the output width.
    clean_logits: -inf exactly at invalid tokens; with False those are unspecified.

  Returns:
    float32 [B * next_n, max_context_len].
  """
  fn = "paged_mqa_logits"
  if not isinstance(cache, IndexKCache):
    raise ValueError(f"{fn}: cache must be an IndexKCache, got {type(cache).__name__}")
  expect("q_fp8", q_fp8, (None, None, None, None), FP8_DTYPE, fn)
  B, n, H, D = q_fp8.shape
  if cache.head_dim != D:
    raise ValueError(f"{fn}: cache.k_fp8 must have head dim D={D} (from q_fp8), got "
                     f"{list(cache.k_fp8.shape)}")
  if cache.page_size != reference.PAGE_SIZE:
    raise ValueError(f"{fn}: cache pages must hold {reference.PAGE_SIZE} tokens, got "
                     f"{cache.page_size}")
  expect("weights", weights, (B * n, H), _F32, fn)
  expect("context_lens", context_lens, (B,), _I32, fn)
  expect("block_tables", block_tables, (B, None), _I32, fn)
  if not isinstance(max_context_len, int) or max_context_len < 1:
    raise ValueError(f"{fn}: max_context_len must be a static int >= 1, got {max_context_len!r}")
  P = cache.num_pages
  check_values(fn, lambda c, t: bool((c >= 0).all() and (c <= max_context_len).all() and all(
      ((row[: -(-int(cl) // 64)] >= 0) & (row[: -(-int(cl) // 64)] < P)).all()
      for row, cl in zip(t, c))),
      f"need 0 <= context_lens <= max_context_len={max_context_len} and every used page id "
      f"in [0, {P})", context_lens, block_tables)

  def supported():
    from kernels_pallas import paged_mqa_logits as kernel
    return kernel.unsupported_reason(n, H, D)

  if resolve_backend(backend, interpret, supported, fn) == "xla":
    return _paged_xla(q_fp8, cache, weights, context_lens, block_tables, max_context_len,
                      clean_logits)
  from kernels_pallas import paged_mqa_logits as kernel
  return kernel.paged_mqa_logits(q_fp8, cache.k_fp8, cache.k_scale, weights, context_lens,
                                 block_tables, max_context_len=max_context_len,
                                 clean_logits=clean_logits, interpret=interpret)


# --------------------------------------------------------------------------- top-k

@functools.partial(jax.jit, static_argnames=("k",))
def _topk_xla(logits, ks, ke, k):
  return reference.topk_indices(logits, ks, ke, k=k)


def topk_indices(logits, ks, ke, *, k: int = 2048, backend: str = "auto",
                 interpret: bool = False, ascending: bool = False) -> jax.Array:
  """Per row, the indices of the k largest logits among keys in [ks, ke).

  Args:
    logits: float32 [T, S].
    ks, ke: int32 [T].
    k: static count (DeepSeek-V3.2: 2048). May exceed S.
    ascending: pallas, list each row in ascending index (a slower write pass); xla,
      no change. Either way equal logits then come in ascending index, which a merge of
      several candidate lists by ``lax.top_k`` needs to keep the tie rule.

  Returns:
    int32 [T, k]: absolute key indices in [ks, ke); -1 fills the slots past the number of
    valid keys. Every valid key ranks above every invalid one (a row with <= k valid keys
    returns all of them); NaN ranks as -inf. On ties at the threshold the lowest key indices
    win on both backends. Order within the k: xla, descending by value; pallas,
    unspecified unless ``ascending`` (a row with <= k valid keys: ascending, then -1).
  """
  fn = "topk_indices"
  expect("logits", logits, (None, None), _F32, fn)
  T, S = logits.shape
  expect("ks", ks, (T,), _I32, fn)
  expect("ke", ke, (T,), _I32, fn)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"{fn}: k must be a static int >= 1, got {k!r}")
  check_values(fn, lambda a, b: bool(((a >= 0) & (a <= b) & (b <= S)).all()),
               f"need 0 <= ks <= ke <= S={S} for every row", ks, ke)

  def supported():
    from kernels_pallas import topk as kernel
    return kernel.unsupported_reason(S, k)

  if resolve_backend(backend, interpret, supported, fn) == "xla":
    return _topk_xla(logits, ks, ke, k)
  from kernels_pallas import topk as kernel
  return kernel.topk_indices(logits, ks, ke, k=k, interpret=interpret, ascending=ascending)
