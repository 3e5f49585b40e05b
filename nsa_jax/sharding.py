"""Several devices: prefill top-k sharded over a one-axis ``jax.sharding.Mesh``, and the public
``prefill_topk`` that takes ``mesh=`` (one floor above the single-device ``prefill`` module,
which knows nothing of meshes).

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

Any one-axis mesh works: ``jax.make_mesh`` (Explicit axes by default, or Auto),
``jax.sharding.Mesh(...)`` and :func:`make_mesh` (Auto), with inputs unsharded, committed to
one device, or sharded over the mesh, eagerly or inside a user's ``jax.jit``. Inside, inputs
are laid out with ``reshard`` on an Explicit mesh and ``with_sharding_constraint`` on an
Auto one (each API refuses the other axis type).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nsa_jax import budget as _budget
from nsa_jax import prefill as _prefill
from nsa_jax.validation import describe

SPLITS = ("queries", "keys")
_I32_MIN = jnp.iinfo(jnp.int32).min


def make_mesh(devices=None, axis_name: str = "x") -> Mesh:
  """A one-axis mesh (Auto axis type) over ``devices`` (default: all devices of the default
  backend). ``jax.make_mesh((n,), (name,))`` works with ``prefill_topk`` as well."""
  fn = "make_mesh"
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f"{fn}: axis_name must be a non-empty str, got {describe(axis_name)}")
  if devices is not None and (isinstance(devices, (str, bytes)) or
                              not hasattr(devices, "__iter__")):
    raise ValueError(f"{fn}: devices must be a list of jax.Device or None, got "
                     f"{describe(devices)}")
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError(f"{fn}: devices must be a non-empty list of jax.Device, got []")
  bad = [d for d in devices if not isinstance(d, jax.Device)]
  if bad:
    raise ValueError(f"{fn}: devices must hold jax.Device objects, got {describe(bad[0])}")
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


def _explicit(mesh: Mesh) -> bool:
  return tuple(mesh.axis_types) == (AxisType.Explicit,)


def _place(x, mesh: Mesh, spec: P):
  """``x`` laid out as ``spec`` over ``mesh``, inside jit."""
  sharding = NamedSharding(mesh, spec)
  if _explicit(mesh):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _onto_mesh(x, mesh: Mesh):
  """A concrete array committed to devices other than the mesh's is copied onto the mesh
  (replicated), since one jit cannot take both. Others pass unchanged."""
  if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed and
      x.sharding.device_set != set(mesh.devices.flat)):
    return jax.device_put(x, NamedSharding(mesh, P()))
  return x


def _rows_out(out, T: int, mesh: Mesh):
  """The [Tp, k] result (Tp = T rounded up to the mesh size, sharded by rows) cut to T rows.
  Explicit sharding cannot split T rows unevenly: such a result comes back replicated."""
  axis = mesh.axis_names[0]
  if out.shape[0] == T:
    return _place(out, mesh, P(axis, None))
  if _explicit(mesh):
    return _place(out, mesh, P())[:T]
  # Cutting the padding makes T uneven over the mesh; keep it sharded, not replicated.
  return jax.lax.with_sharding_constraint(out[:T], NamedSharding(mesh, P(axis, None)))


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
  q, w, lo, hi = (_place(_pad_rows(a, Tp), mesh, P(axis)) for a in (q_fp8, weights, ks, ke))
  kf, ksc = _place(k_fp8, mesh, P()), _place(k_scale, mesh, P())

  def local(q, w, lo, hi, kf, ksc):
    return _prefill.chunked_topk(q, kf, ksc, w, lo, hi, plan=plan, k=k, backend=backend,
                                 interpret=interpret)

  # check_vma off: the Pallas kernels inside carry no varying-axis annotations.
  out = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P(axis), P(), P()),
                      out_specs=P(axis), check_vma=False)(q, w, lo, hi, kf, ksc)
  return _rows_out(out, T, mesh)


@functools.partial(jax.jit, static_argnames=("plan", "mesh", "k", "backend", "interpret"))
def _by_keys(q_fp8, k_fp8, k_scale, weights, ks, ke, *, plan, mesh, k, backend, interpret):
  axis, n = mesh.axis_names[0], mesh.size
  T, S, s_loc = q_fp8.shape[0], k_fp8.shape[0], plan.num_k
  # Query rows are padded to a multiple of n as well, so that the merge can shard them
  # evenly (Explicit meshes require it); padding rows have the empty range [0, 0).
  Tp = plan.num_q
  q, w, lo, hi = (_place(_pad_rows(a, Tp), mesh, P()) for a in (q_fp8, weights, ks, ke))
  # Padding keys sit past S, and ke is clamped to S below, so they are never valid.
  kf = _place(_pad_rows(k_fp8, s_loc * n), mesh, P(axis))
  ksc = _place(_pad_rows(k_scale, s_loc * n), mesh, P(axis))
  hi = jnp.minimum(hi, S)

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
                                q, w, lo, hi, kf, ksc)
  # [Tp, n * k] candidates, device d's in columns d*k..(d+1)*k, equal keys in ascending index
  # within (chunked_topk asks the top-k for that order when with_keys). Re-shard by
  # rows so each device merges its own queries; XLA does the all-to-all.
  idx = _place(idx, mesh, P(axis, None))
  keys = _place(keys, mesh, P(axis, None))
  # top_k prefers the lower column among equal keys, i.e. the lower device, whose keys have
  # lower indices: ties go to the lower key index, as on one device.
  top, pos = jax.lax.top_k(keys, k)
  out = jnp.where(top == _I32_MIN, -1, jnp.take_along_axis(idx, pos, axis=1))
  return _rows_out(out, T, mesh)


def sharded_prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, *, mesh, split: str, k: int,
                         backend: str = "auto", interpret: bool = False,
                         budget_bytes: int | None = None, tracing: bool | None = None):
  """``prefill_topk`` over a one-axis mesh, for arguments :func:`prefill_topk` validated
  (T, S >= 1, ``k`` and ``budget_bytes`` Python ints), plus ``tracing`` (None: detect) for
  the budget lookup.

  Returns:
    int32 [T, k], sharded along T over the mesh axis when T is a multiple of the mesh size;
    otherwise replicated on an Explicit mesh, and as XLA lays it out on an Auto one.
  """
  T, S, n = q_fp8.shape[0], k_fp8.shape[0], mesh.size
  devices = tuple(mesh.devices.flat)
  if split == "queries":
    plan = _prefill.plan_for(math.ceil(T / n), S, devices=devices, budget_bytes=budget_bytes,
                             tracing=tracing)
    impl = _by_queries
  else:
    # The key split pads the query rows to a multiple of n too (see _by_keys).
    plan = _prefill.plan_for(math.ceil(T / n) * n, math.ceil(S / n), devices=devices,
                             budget_bytes=budget_bytes, tracing=tracing)
    impl = _by_keys
  args = (_onto_mesh(a, mesh) for a in (q_fp8, k_fp8, k_scale, weights, ks, ke))
  return impl(*args, plan=plan, mesh=mesh, k=k, backend=backend, interpret=interpret)


def prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, *, k: int = 2048,
                 backend: str = "auto", interpret: bool = False, budget_bytes: int | None = None,
                 mesh=None, split: str = "queries") -> jax.Array:
  """Top-k keys per query of a ragged prefill, logits computed one budgeted chunk at a time,
  on one device or over a mesh.

  Same result as ``topk_indices(mqa_logits(q_fp8, ...), ks, ke, k=k)``. Callable eagerly and
  inside a user's ``jax.jit`` (the plan only needs static shapes and the cached budget). Call
  ``nsa_jax.budget.prime()`` (or ``nsa_jax.prime_mesh(mesh)``) before tracing; with a cold
  cache, tracing uses the static budget and warns once.

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
    mesh: None (one device), or a one-axis ``jax.sharding.Mesh`` to shard over: from
      ``jax.make_mesh`` (Explicit or Auto axis), ``Mesh(...)`` or ``nsa_jax.make_mesh``.
    split: with a mesh, "queries" (data parallel: each device takes T / n queries against all
      keys) or "keys" (context parallel: each device scores S / n keys for every query, and
      the per-device top-k candidates are merged).

  Returns:
    int32 [T, k]: key indices in [ks, ke), -1 past the number of valid keys; order as
    ``topk_indices`` with this backend (xla: descending logit, ties to the lower index).
    With a mesh, sharded over the mesh axis along T when T is a multiple of the mesh size
    (bucketed sizes are); otherwise replicated on an Explicit mesh, and as XLA lays it out
    on an Auto one.
  """
  fn = "prefill_topk"
  if mesh is None:
    if split != "queries":
      raise ValueError(f"{fn}: split applies only with a mesh; got split={split!r} and "
                       f"mesh=None")
    return _prefill.prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, k=k, backend=backend,
                                 interpret=interpret, budget_bytes=budget_bytes)
  T, S, k, backend, interpret, budget_bytes = _prefill.check_prefill_args(
      q_fp8, k_fp8, k_scale, weights, ks, ke, k=k, backend=backend, interpret=interpret,
      budget_bytes=budget_bytes, fn=fn)
  axis = mesh_axis(mesh, fn)
  if not isinstance(split, str) or split not in SPLITS:
    raise ValueError(f"{fn}: split must be one of {SPLITS}, got {split!r}")
  if T == 0 or S == 0:
    out = jnp.full((T, k), -1, jnp.int32)
    if T % mesh.size == 0 and not isinstance(q_fp8, jax.core.Tracer):
      out = jax.device_put(out, NamedSharding(mesh, P(axis, None)))
    return out
  tracing = True if any(isinstance(x, jax.core.Tracer)
                        for x in (q_fp8, k_fp8, k_scale, weights, ks, ke)) else None
  return sharded_prefill_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, mesh=mesh, split=split,
                              k=k, backend=backend, interpret=interpret,
                              budget_bytes=budget_bytes, tracing=tracing)


__all__ = ["SPLITS", "make_mesh", "mesh_axis", "prefill_topk", "prime_mesh",
           "sharded_prefill_topk"]
