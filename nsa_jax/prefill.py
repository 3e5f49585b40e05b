"""Ragged-prefill top-k under a memory budget: logits one query chunk at a time.

``prefill_topk`` = ``topk_indices(mqa_logits(...))`` without ever holding the whole [T, S]
logits: the queries are split into the static chunks of a :class:`~nsa_jax.planner.ChunkPlan`
made from the cached budget (a Python int, see ``budget``), and a ``lax.scan`` computes each
chunk's logits and takes its top-k before the next, so peak logits memory is one chunk.
The plan is made on the host when the function is traced; nothing in the loop looks at
memory or at array values. One device only: ``sharding`` builds the mesh-aware entry point
(``nsa_jax.prefill_topk(..., mesh=...)``) on top of this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import budget as _budget
from nsa_jax import ops
from nsa_jax import planner
from nsa_jax import reference
from nsa_jax.validation import static_int

_I32_MIN = jnp.iinfo(jnp.int32).min


def _chunk_topk(q, k_fp8, k_scale, w, ks, ke, *, k, backend, interpret, with_keys):
  """One chunk: logits [r, S] -> top-k indices [r, k] (and their sortable keys [r, k])."""
  # Unchecked ops: prefill_topk validated the whole problem once (a chunk's rows would
  # otherwise be checked again, and named by their row within the chunk).
  logits = ops.mqa_logits_unchecked(q, k_fp8, k_scale, w, ks, ke, clean_logits=True,
                                    backend=backend, interpret=interpret, fn="prefill_topk")
  # The key-split merge (with_keys) relies on equal logits coming in ascending index.
  idx = ops.topk_indices_unchecked(logits, ks, ke, k=k, backend=backend, interpret=interpret,
                                   ascending=with_keys, fn="prefill_topk")
  if not with_keys:
    return idx
  # The key-split merge ranks candidates from different devices, so it needs their values;
  # empty slots get INT32_MIN, below every valid key (even one whose logit is -inf).
  vals = jnp.take_along_axis(logits, jnp.maximum(idx, 0), axis=1)
  return idx, jnp.where(idx >= 0, reference.sortable_keys(vals), _I32_MIN)


def chunked_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, *, plan: planner.ChunkPlan, k: int,
                 backend: str = "auto", interpret: bool = False, with_keys: bool = False):
  """The traced body of :func:`prefill_topk` for a given plan (no validation, no budget).

  Args:
    q_fp8: float8_e4m3fn [T, H, D]; k_fp8: float8_e4m3fn [S, D]; k_scale: float32 [S];
    weights: float32 [T, H]; ks, ke: int32 [T]. ``plan.num_q == T`` and ``plan.num_k == S``.
    plan: the static chunk plan.
    k: static top-k count.
    with_keys: also return the int32 sortable keys (``reference.sortable_keys``) of the
      chosen logits, INT32_MIN at -1 slots (the key-split merge needs them).

  Returns:
    int32 [T, k] indices (and int32 [T, k] keys when ``with_keys``).
  """
  if (plan.num_q, plan.num_k) != (q_fp8.shape[0], k_fp8.shape[0]):
    raise ValueError(f"chunked_topk: plan must be made for T={q_fp8.shape[0]} queries and "
                     f"S={k_fp8.shape[0]} keys, got a plan for {plan.num_q} x {plan.num_k}")
  one = functools.partial(_chunk_topk, k_fp8=k_fp8, k_scale=k_scale, k=k, backend=backend,
                          interpret=interpret, with_keys=with_keys)
  if not plan.chunked:
    return one(q_fp8, w=weights, ks=ks, ke=ke)
  T, rows = plan.num_q, plan.rows
  # Instead of padding q (a copy of all of it) the last chunk is shifted back to end at row T;
  # its rows shared with the previous chunk are computed twice and written twice, identically.
  # ks/ke/weights/q are sliced in place per chunk: no per-chunk metadata is rebuilt.

  def body(carry, i):
    start = jnp.minimum(i * rows, T - rows)
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows, axis=0)
    res = one(take(q_fp8), w=take(weights), ks=take(ks), ke=take(ke))
    res = res if isinstance(res, tuple) else (res,)
    carry = tuple(jax.lax.dynamic_update_slice_in_dim(c, r, start, axis=0)
                  for c, r in zip(carry, res))
    return carry, None

  init = tuple(jnp.zeros((T, k), jnp.int32) for _ in range(2 if with_keys else 1))
  out, _ = jax.lax.scan(body, init, jnp.arange(plan.num_chunks, dtype=jnp.int32))
  return out if with_keys else out[0]


_chunked_topk_jit = jax.jit(chunked_topk,
                            static_argnames=("plan", "k", "backend", "interpret", "with_keys"))


def _is_tracer(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def _devices_of(x):
  """The devices a concrete jax.Array lives on, or None (tracers, numpy)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    try:
      return tuple(x.devices())
    except Exception:  # deleted or otherwise unplaced arrays: fall back to the default
      return None
  return None


def check_budget_arg(fn: str, budget_bytes) -> int | None:
  """``budget_bytes`` as a Python int >= 1, or None; ValueError otherwise."""
  return static_int(fn, "budget_bytes", budget_bytes, 1, none_ok=True)


def plan_for(num_q: int, num_k: int, *, devices=None, budget_bytes: int | None = None,
             tracing: bool | None = None) -> planner.ChunkPlan:
  """The chunk plan :func:`prefill_topk` uses for a [num_q, num_k] problem.

  Args:
    num_q, num_k: ints >= 1 (per-device sizes for a sharded call).
    devices: devices whose smallest cached budget applies (default: the default device).
    budget_bytes: explicit budget (int), overriding the cache.
    tracing: passed to :func:`budget.budget_bytes` (None: detect).
  """
  if budget_bytes is None:
    budget_bytes = min(_budget.budget_bytes(d, tracing=tracing) for d in (devices or (None,)))
  return planner.plan_chunks(num_q, num_k, budget_bytes)


def check_prefill_args(q_fp8, k_fp8, k_scale, weights, ks, ke, *, k, backend, interpret,
                       budget_bytes, fn: str = "prefill_topk"):
  """Validates :func:`prefill_topk`'s arguments (values in checking mode).

  Returns ``(T, S, k, backend, interpret, budget_bytes)`` with the statics normalized.
  """
  T, H, D, S = ops.check_mqa_args(q_fp8, k_fp8, k_scale, weights, ks, ke, fn)
  k = static_int(fn, "k", k, 1)
  backend, interpret = ops.check_backend(backend, interpret, fn)
  budget_bytes = check_budget_arg(fn, budget_bytes)
  if T and S:  # so that a kernel that cannot run is named here, not in a chunk
    arrays = (q_fp8, k_fp8)
    ops.resolve_backend(backend, interpret, ops.mqa_logits_supported(H, D), fn, arrays)
    ops.resolve_backend(backend, interpret, ops.topk_supported(S, k), fn, arrays)
  return T, S, k, backend, interpret, budget_bytes


def prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, *, k: int = 2048,
                 backend: str = "auto", interpret: bool = False,
                 budget_bytes: int | None = None) -> jax.Array:
  """Top-k keys per query of a ragged prefill on one device, logits one budgeted chunk at a
  time. ``nsa_jax.prefill_topk`` (``sharding.prefill_topk``) adds ``mesh=`` on top.

  Same result as ``topk_indices(mqa_logits(q_fp8, ...), ks, ke, k=k)``. Callable eagerly and
  inside a user's ``jax.jit`` (the plan only needs static shapes and the cached budget). Call
  ``nsa_jax.budget.prime()`` before tracing; with a cold cache, tracing uses the static
  budget and warns once.

  Args:
    q_fp8: float8_e4m3fn [T, H, D]; T may be 0 (an empty batch).
    k_fp8: float8_e4m3fn [S, D]; S may be 0 (then every slot is -1).
    k_scale: float32 [S].
    weights: float32 [T, H].
    ks, ke: int32 [T], half-open key range of each query; an empty range gives all -1.
    k: static top-k count >= 1 (DeepSeek-V3.2: 2048; anything ``operator.index`` takes);
      may exceed S.
    backend, interpret: passed to ``mqa_logits`` and ``topk_indices`` for every chunk.
    budget_bytes: int overriding the cached budget for the logits of one chunk.

  Returns:
    int32 [T, k]: key indices in [ks, ke), -1 past the number of valid keys; order as
    ``topk_indices`` with this backend (xla: descending logit, ties to the lower index).
  """
  T, S, k, backend, interpret, budget_bytes = check_prefill_args(
      q_fp8, k_fp8, k_scale, weights, ks, ke, k=k, backend=backend, interpret=interpret,
      budget_bytes=budget_bytes)
  if T == 0 or S == 0:
    return jnp.full((T, k), -1, jnp.int32)
  tracing = True if _is_tracer(q_fp8, k_fp8, k_scale, weights, ks, ke) else None
  plan = plan_for(T, S, devices=_devices_of(q_fp8), budget_bytes=budget_bytes, tracing=tracing)
  return _chunked_topk_jit(q_fp8, k_fp8, k_scale, weights, ks, ke, plan=plan, k=k,
                           backend=backend, interpret=interpret, with_keys=False)


__all__ = ["check_prefill_args", "chunked_topk", "plan_for", "prefill_topk"]
