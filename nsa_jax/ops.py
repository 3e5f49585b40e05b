"""Public indexer ops: validation, then the Pallas kernels or the ``xla`` (reference) backend.

Every op takes ``backend="auto" | "pallas" | "xla"`` and ``interpret``:
- ``"auto"`` runs the Pallas kernel on a Hopper GPU when it supports the shapes, else ``xla``;
- ``"pallas"`` always runs the kernel (a ``ValueError`` if it cannot take these shapes, or if
  the call runs on no GPU: on a CPU use ``interpret=True``; to lower for a GPU from a CPU host,
  trace under ``jax.sharding.use_abstract_mesh`` with a GPU ``AbstractDevice``);
- ``"xla"`` runs the jitted, memory-bounded reference (the CPU path and the baseline);
- ``interpret=True`` runs the Pallas kernel in interpret mode (CPU tests).
Shapes and dtypes are checked at trace time; values only in checking mode (``validation``).
Empty batches (T = 0, B = 0, S = 0) give empty results without a kernel (``validation``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import reference
from nsa_jax.cache import IndexKCache
from nsa_jax.quant import FP8_DTYPE
from nsa_jax.validation import (check_values, expect, key_range_error, paged_context_error,
                                static_bool, static_int)

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


def _target_platform(arrays) -> str:
  """Where the call will run: the device of a concrete input, else the abstract mesh's
  device (cross-lowering sets one), else the default backend."""
  for a in arrays:
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
      try:
        return next(iter(a.devices())).platform
      except Exception:  # deleted arrays: let the op's own error speak
        break
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def check_backend(backend, interpret, fn: str) -> tuple[str, bool]:
  """Validates ``backend`` and ``interpret``; returns them (interpret as a Python bool)."""
  if not isinstance(backend, str) or backend not in BACKENDS:
    raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
  return backend, static_bool(fn, "interpret", interpret)


def resolve_backend(backend: str, interpret: bool, supported, fn: str, arrays=()) -> str:
  """Returns "pallas" or "xla". ``supported()`` returns None or why the kernel can't run."""
  backend, interpret = check_backend(backend, interpret, fn)
  if backend == "xla":
    return "xla"
  if backend == "pallas" and not interpret:
    platform = _target_platform(arrays)
    if platform not in ("gpu", "cuda"):
      raise ValueError(
          f"{fn}: backend='pallas' runs the GPU kernel, but this call runs on {platform}; "
          f"pass interpret=True to run the kernel in interpret mode, or backend='xla' (to "
          f"lower for a GPU from here, trace under jax.sharding.use_abstract_mesh with a GPU "
          f"AbstractDevice)")
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
  checking mode, on the first row with ks/ke outside 0 <= ks <= ke <= S.
  """
  expect("q_fp8", q_fp8, (None, None, None), FP8_DTYPE, fn)
  T, H, D = q_fp8.shape
  expect("k_fp8", k_fp8, (None, D), FP8_DTYPE, fn)
  S = k_fp8.shape[0]
  expect("k_scale", k_scale, (S,), _F32, fn)
  expect("weights", weights, (T, H), _F32, fn)
  expect("ks", ks, (T,), _I32, fn)
  expect("ke", ke, (T,), _I32, fn)
  if H < 1 or D < 1:
    raise ValueError(f"{fn}: q_fp8 must have H >= 1 heads of D >= 1, got "
                     f"{list(q_fp8.shape)}")
  check_values(fn, lambda a, b: key_range_error(a, b, S), ks, ke)
  return T, H, D, S


def mqa_logits_supported(H: int, D: int):
  """``supported`` for :func:`resolve_backend`: None or why the logits kernel can't run."""
  def supported():
    from kernels_pallas import mqa_logits as kernel
    return kernel.unsupported_reason(H, D)
  return supported


@functools.partial(jax.jit, static_argnames=("clean_logits",))
def _mqa_logits_xla(q_fp8, k_fp8, k_scale, weights, ks, ke, clean_logits):
  return reference.mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke,
                              clean_logits=clean_logits, fp8_dot=True)


def mqa_logits_unchecked(q_fp8, k_fp8, k_scale, weights, ks, ke, *, clean_logits: bool,
                         backend: str, interpret: bool, fn: str = "mqa_logits") -> jax.Array:
  """:func:`mqa_logits` for arguments its caller validated (``prefill_topk`` per chunk)."""
  T, H, D = q_fp8.shape
  S = k_fp8.shape[0]
  if T == 0 or S == 0:
    return jnp.zeros((T, S), _F32)
  if resolve_backend(backend, interpret, mqa_logits_supported(H, D), fn,
                     (q_fp8, k_fp8)) == "xla":
    return _mqa_logits_xla(q_fp8, k_fp8, k_scale, weights, ks, ke, clean_logits)
  from kernels_pallas import mqa_logits as kernel
  return kernel.mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke,
                           clean_logits=clean_logits, interpret=interpret)


def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, *, clean_logits: bool = True,
               backend: str = "auto", interpret: bool = False) -> jax.Array:
  """Ragged-prefill MQA logits (DeepGEMM ``fp8_mqa_logits``).

  ``logits[i, j] = k_scale[j] * sum_h weights[i, h] * relu(q_fp8[i, h] . k_fp8[j])``
  for ``ks[i] <= j < ke[i]``.

  Args:
    q_fp8: float8_e4m3fn [T, H, D]; T may be 0 (an empty batch).
    k_fp8: float8_e4m3fn [S, D]; S may be 0.
    k_scale: float32 [S].
    weights: float32 [T, H].
    ks, ke: int32 [T], half-open range of keys each query sees.
    clean_logits: -inf exactly outside [ks, ke). With False those entries are unspecified
      (the Pallas kernel may leave them unwritten; the xla backend writes raw values).

  Returns:
    float32 [T, S] (no kernel runs when T or S is 0).
  """
  fn = "mqa_logits"
  check_mqa_args(q_fp8, k_fp8, k_scale, weights, ks, ke, fn)
  clean_logits = static_bool(fn, "clean_logits", clean_logits)
  backend, interpret = check_backend(backend, interpret, fn)
  return mqa_logits_unchecked(q_fp8, k_fp8, k_scale, weights, ks, ke,
                              clean_logits=clean_logits, backend=backend,
                              interpret=interpret, fn=fn)


# --------------------------------------------------------------------------- paged decode

# Query tokens per request in one decode step: 1, or 2..4 with speculative decoding (MTP
# draft tokens). 4 is the range the tests cover (reference, xla and interpret-mode kernel
# path), not a limit of the math: the xla backend would take any next_n.
MAX_NEXT_N = 4


def check_next_n(fn: str, what: str, n: int) -> None:
  """Raises ValueError naming ``fn`` unless 1 <= next_n <= MAX_NEXT_N; ``what`` says where
  next_n came from (e.g. ``"q_fp8 [B, next_n, H, D] ... got [2, 5, 64, 128]"``)."""
  if not 1 <= n <= MAX_NEXT_N:
    raise ValueError(f"{fn}: next_n must be in 1..{MAX_NEXT_N} (the tested range), got "
                     f"next_n={n} from {what}")


@functools.partial(jax.jit, static_argnames=("max_context_len", "clean_logits"))
def _paged_xla(q_fp8, cache, weights, context_lens, block_tables, max_context_len, clean_logits):
  return reference.paged_mqa_logits(q_fp8, cache.k_fp8, cache.k_scale, weights, context_lens,
                                    block_tables, max_context_len=max_context_len,
                                    clean_logits=clean_logits, fp8_dot=True)


@functools.partial(jax.jit, static_argnames=("max_context_len", "clean_logits", "interpret"))
def _paged_pallas(q_fp8, cache, weights, context_lens, block_tables, *, max_context_len,
                  clean_logits, interpret):
  from kernels_pallas import paged_mqa_logits as kernel
  return kernel.paged_mqa_logits(q_fp8, cache.k_fp8, cache.k_scale, weights, context_lens,
                                 block_tables, max_context_len=max_context_len,
                                 clean_logits=clean_logits, interpret=interpret)


def paged_mqa_logits(q_fp8, cache: IndexKCache, weights, context_lens, block_tables, *,
                     max_context_len: int, clean_logits: bool = True, backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
  """Paged-decode MQA logits (DeepGEMM ``fp8_paged_mqa_logits``).

  Query t of request b sees token p iff ``p < context_lens[b]`` and
  ``p <= context_lens[b] - next_n + t``.

  The Pallas kernel takes all ``next_n`` query tokens of a request in one launch and reads
  each cache page once (one wgmma per group of ``128 // H`` query tokens on the page).

  Args:
    q_fp8: float8_e4m3fn [B, next_n, H, D], next_n in 1..4 (``MAX_NEXT_N``, the tested
      range); B may be 0 (an empty batch).
    cache: :class:`IndexKCache` with k_fp8 [num_pages, 64, D] and k_scale [num_pages, 64].
    weights: float32 [B * next_n, H].
    context_lens: int32 [B], in [0, min(max_context_len, max_pages * 64)] (checked in
      checking mode).
    block_tables: int32 [B, max_pages]; entries past a request's last page are never read.
    max_context_len: static int >= 0 (anything ``operator.index`` takes), the output width.
    clean_logits: -inf exactly at invalid tokens; with False those are unspecified.

  Returns:
    float32 [B * next_n, max_context_len], row ``b * next_n + t`` for query t of request b
    (no kernel runs when either is 0).
  """
  fn = "paged_mqa_logits"
  if not isinstance(cache, IndexKCache):
    raise ValueError(f"{fn}: cache must be an IndexKCache, got {type(cache).__name__}")
  expect("q_fp8", q_fp8, (None, None, None, None), FP8_DTYPE, fn)
  B, n, H, D = q_fp8.shape
  if n < 1 or H < 1:
    raise ValueError(f"{fn}: q_fp8 must be [B, next_n >= 1, H >= 1, D], got "
                     f"{list(q_fp8.shape)}")
  check_next_n(fn, f"q_fp8 [B, next_n, H, D] = {list(q_fp8.shape)}", n)
  if cache.head_dim != D:
    raise ValueError(f"{fn}: cache.k_fp8 must have head dim D={D} (from q_fp8), got "
                     f"{list(cache.k_fp8.shape)}")
  if cache.page_size != reference.PAGE_SIZE:
    raise ValueError(f"{fn}: cache pages must hold {reference.PAGE_SIZE} tokens, got "
                     f"{cache.page_size}")
  expect("weights", weights, (B * n, H), _F32, fn)
  expect("context_lens", context_lens, (B,), _I32, fn)
  expect("block_tables", block_tables, (B, None), _I32, fn)
  max_context_len = static_int(fn, "max_context_len", max_context_len, 0)
  clean_logits = static_bool(fn, "clean_logits", clean_logits)
  backend, interpret = check_backend(backend, interpret, fn)
  P = cache.num_pages
  check_values(fn, lambda c, t: paged_context_error(c, t, max_context_len, P,
                                                    reference.PAGE_SIZE),
               context_lens, block_tables)
  if B == 0 or max_context_len == 0:
    return jnp.zeros((B * n, max_context_len), _F32)

  def supported():
    from kernels_pallas import paged_mqa_logits as kernel
    return kernel.unsupported_reason(n, H, D)

  if resolve_backend(backend, interpret, supported, fn, (q_fp8, cache.k_fp8)) == "xla":
    return _paged_xla(q_fp8, cache, weights, context_lens, block_tables, max_context_len,
                      clean_logits)
  return _paged_pallas(q_fp8, cache, weights, context_lens, block_tables,
                       max_context_len=max_context_len, clean_logits=clean_logits,
                       interpret=interpret)


# --------------------------------------------------------------------------- top-k

def topk_supported(S: int, k: int):
  """``supported`` for :func:`resolve_backend`: None or why the top-k kernel can't run."""
  def supported():
    from kernels_pallas import topk as kernel
    return kernel.unsupported_reason(S, k)
  return supported


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_xla(logits, ks, ke, k):
  return reference.topk_indices(logits, ks, ke, k=k)


def topk_indices_unchecked(logits, ks, ke, *, k: int, backend: str, interpret: bool,
                           ascending: bool = False, fn: str = "topk_indices") -> jax.Array:
  """:func:`topk_indices` for arguments its caller validated (``k`` a Python int)."""
  T, S = logits.shape
  if T == 0 or S == 0:
    return jnp.full((T, k), -1, _I32)
  if resolve_backend(backend, interpret, topk_supported(S, k), fn, (logits,)) == "xla":
    return _topk_xla(logits, ks, ke, k)
  from kernels_pallas import topk as kernel
  return kernel.topk_indices(logits, ks, ke, k=k, interpret=interpret, ascending=ascending)


def topk_indices(logits, ks, ke, *, k: int = 2048, backend: str = "auto",
                 interpret: bool = False, ascending: bool = False) -> jax.Array:
  """Per row, the indices of the k largest logits among keys in [ks, ke).

  Args:
    logits: float32 [T, S]; T and S may be 0.
    ks, ke: int32 [T].
    k: static count >= 1 (DeepSeek-V3.2: 2048; anything ``operator.index`` takes). May
      exceed S.
    ascending: pallas, list each row in ascending index, -1 last (one XLA sort of the
      [T, k] result); xla, no change. Either way equal logits then come in ascending
      index, which a merge of several candidate lists by ``lax.top_k`` needs to keep the
      tie rule.

  Returns:
    int32 [T, k]: absolute key indices in [ks, ke); -1 fills the slots past the number of
    valid keys (all of them when S = 0). Every valid key ranks above every invalid one (a
    row with <= k valid keys returns all of them); NaN ranks as -inf. On ties at the
    threshold the lowest key indices win on both backends. Order within the k: xla,
    descending by value; pallas, deterministic (thread-major) but unspecified unless
    ``ascending`` (rows of S <= 32768 keys with <= k valid keys: ascending, then -1).
  """
  fn = "topk_indices"
  expect("logits", logits, (None, None), _F32, fn)
  T, S = logits.shape
  expect("ks", ks, (T,), _I32, fn)
  expect("ke", ke, (T,), _I32, fn)
  k = static_int(fn, "k", k, 1)
  ascending = static_bool(fn, "ascending", ascending)
  backend, interpret = check_backend(backend, interpret, fn)
  check_values(fn, lambda a, b: key_range_error(a, b, S), ks, ke)
  return topk_indices_unchecked(logits, ks, ke, k=k, backend=backend, interpret=interpret,
                                ascending=ascending, fn=fn)
