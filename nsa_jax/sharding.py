"""Several devices: prefill top-k sharded over a one-axis ``jax.sharding.Mesh``.

Two splits, both written with ``jax.shard_map`` and sharding constraints (XLA inserts the
communication):
- ``"queries"`` (data parallel): the T queries are split across the devices; keys are
  replicated. Each device runs the budgeted chunk loop on its T / n rows.
- ``"keys"`` (context parallel, one very long sequence): the S keys are split; each device
  scores its S / n keys for every query and keeps its own top-k candidates (with their
  values); the n * k candidates per query are then re-sharded by query rows and merged with
  one more top-k. Ties keep the lower key index, as the single-device xla backend does.
The budget is per device: the plan uses the smallest cached budget among the mesh's devices,
so :func:`prime_mesh` before tracing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsa_jax import budget as _budget
from nsa_jax import prefill as _prefill

SPLITS = ("queries", "keys")
_I32_MIN = jnp.iinfo(jnp.int32).min


def make_mesh(devices=None, axis_name: str = "x") -> Mesh:
  """A one-axis mesh over ``devices`` (default: all devices of the default backend)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: devices must be a non-empty list of jax.Device, got []")
  return Mesh(np.asarray(devices), (axis_name,))


def mesh_axis(mesh, fn: str = "prefill_topk") -> str:
  """The axis name of a one-axis mesh; ValueError for anything else."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if len(mesh.axis_names) != 1:
    raise ValueError(f"{fn}: mesh must have exactly one axis, got axes {mesh.axis_names} "
                     f"with shape {dict(mesh.shape)}")
  return mesh.axis_names[0]


def prime_mesh(mesh) -> int:
  """Primes the budget cache for every device of ``mesh``; returns the smallest budget (int)."""
  mesh_axis(mesh, "prime_mesh")
  return min(_budget.prime(d) for d in mesh.devices.flat)


def _pad_rows(a, n: int, value=0):
  pad = n - a.shape[0]
  if pad == 0:
    return a
  return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value)


@functools.partial(jax.jit, static_argnames=("plan", "mesh", "k", "backend", "interpret"))
def _by_queries(q_fp8, k_fp8, k_scale, weights, ks, ke, *, plan, mesh, k, backend, interpret):
  axis = mesh.axis_names[0]
  T, Tp = q_fp8.shape[0], plan.num_q * mesh.size
  # Padding rows get the empty range [0, 0): all -1, then cut off.
  q, w, lo, hi = (_pad_rows(a, Tp) for a in (q_fp8, weights, ks, ke))

  def local(q, w, lo, hi, kf, ksc):
    return _prefill.chunked_topk(q, kf, ksc, w, lo, hi, plan=plan, k=k, backend=backend,
                                 interpret=interpret)

  # check_vma off: the Pallas kernels inside carry no varying-axis annotations.
  out = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P(axis), P(), P()),
                      out_specs=P(axis), check_vma=False)(q, w, lo, hi, k_fp8, k_scale)
  # Cutting the padding makes T uneven over the mesh; keep it sharded, not replicated.
  return jax.lax.with_sharding_constraint(out[:T], NamedSharding(mesh, P(axis, None)))


@functools.partial(jax.jit, static_argnames=("plan", "mesh", "k", "backend", "interpret"))
def _by_keys(q_fp8, k_fp8, k_scale, weights, ks, ke, *, plan, mesh, k, backend, interpret):
  axis = mesh.axis_names[0]
  S, s_loc = k_fp8.shape[0], plan.num_k
  # Padding keys sit past S, and ke is clamped to S below, so they are never valid.
  kf, ksc = _pad_rows(k_fp8, s_loc * mesh.size), _pad_rows(k_scale, s_loc * mesh.size)
  ke = jnp.minimum(ke, S)

  def local(q, w, lo, hi, kf, ksc):
    off = jax.lax.axis_index(axis) * s_loc
    lo_l = jnp.clip(lo - off, 0, s_loc)
    hi_l = jnp.maximum(jnp.clip(hi - off, 0, s_loc), lo_l)
    idx, keys = _prefill.chunked_topk(q, kf, ksc, w, lo_l, hi_l, plan=plan, k=k,
                                      backend=backend, interpret=interpret, with_keys=True)
    return jnp.where(idx >= 0, idx + off, -1), keys

  idx, keys = jax.shard_map(local, mesh=mesh,
                            in_specs=(P(), P(), P(), P(), P(axis), P(axis)),
                            out_specs=(P(None, axis), P(None, axis)), check_vma=False)(
                                q_fp8, weights, ks, ke, kf, ksc)
  # [T, n * k] candidates, device d's in columns d*k..(d+1)*k, equal keys in ascending index
  # within (chunked_topk asks the top-k for that order when with_keys). Re-shard by
  # rows so each device merges its own queries; XLA does the all-to-all.
  rows = NamedSharding(mesh, P(axis, None))
  idx = jax.lax.with_sharding_constraint(idx, rows)
  keys = jax.lax.with_sharding_constraint(keys, rows)
  # top_k prefers the lower column among equal keys, i.e. the lower device, whose keys have
  # lower indices: ties go to the lower key index, as on one device.
  top, pos = jax.lax.top_k(keys, k)
  out = jnp.where(top == _I32_MIN, -1, jnp.take_along_axis(idx, pos, axis=1))
  return jax.lax.with_sharding_constraint(out, rows)


def sharded_prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, *, mesh, split: str, k: int,
                         backend: str = "auto", interpret: bool = False,
                         budget_bytes: int | None = None, tracing: bool | None = None):
  """``prefill_topk`` over a one-axis mesh; call it through ``prefill_topk(..., mesh=mesh)``.

  Arguments as :func:`nsa_jax.prefill_topk` (already validated there), plus ``tracing``
  (None: detect) for the budget lookup.

  Returns:
    int32 [T, k], sharded along T over the mesh axis (replicated when T is not a multiple of
    the mesh size: jax arrays cannot be sharded unevenly).
  """
  fn = "prefill_topk"
  mesh_axis(mesh, fn)
  if split not in SPLITS:
    raise ValueError(f"{fn}: split must be one of {SPLITS}, got {split!r}")
  T, S, n = q_fp8.shape[0], k_fp8.shape[0], mesh.size
  devices = tuple(mesh.devices.flat)
  if split == "queries":
    plan = _prefill.plan_for(math.ceil(T / n), S, devices=devices, budget_bytes=budget_bytes,
                             tracing=tracing)
    impl = _by_queries
  else:
    plan = _prefill.plan_for(T, math.ceil(S / n), devices=devices, budget_bytes=budget_bytes,
                             tracing=tracing)
    impl = _by_keys
  return impl(q_fp8, k_fp8, k_scale, weights, ks, ke, plan=plan, mesh=mesh, k=k,
              backend=backend, interpret=interpret)


__all__ = ["SPLITS", "make_mesh", "mesh_axis", "prime_mesh", "sharded_prefill_topk"]
