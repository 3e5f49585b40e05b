"""The compiled prefill and decode steps of an :class:`~nsa_jax.Indexer`, and their host cost.

:class:`IndexerSteps` turns one layer into two jitted functions of plain arrays,

    prefill(x, qr, inputs, cache) -> (indices, cache)      decode(x, qr, inputs, cache) -> ...

with the paged cache donated (its buffers are reused for the returned cache), one compiled
program per input bucket, and programs shared by every layer with the same config.

Why it is built the way it is (docs/architecture.md, "Host overhead"): a decode step of the
V3.2 layer runs for ~0.05 ms on an H200, so what the host spends per call matters as much as
the kernels. The first version jitted a module-level function with the NNX graph definition
as a static argument: every call hashed that graph definition (a nested Python structure),
flattened the ``nnx.State`` through Python callbacks and merged the module. Here all of that
is done once, in ``__init__``:

- the layer is split once and its parameters kept as a flat tuple of arrays (a plain pytree
  that jit flattens in C++);
- the jitted function for each (step, output format) is looked up once per instance in a
  registry keyed by everything the program depends on (graph definition, parameter tree,
  backend, budget), so equal layers share one function and therefore one compiled program;
- a steady call is one positional call of that function, which jax dispatches in C++: the
  method does a dict lookup and a few type checks first (about 0.3 us of Python on the CI
  CPU), no static arguments to hash, no keyword processing, no ``nnx.merge`` outside the
  trace. Everything else (the first call per output format, numpy or traced arguments,
  checking mode, bad input) takes the checked path, which names a bad argument.
  ``tests/test_steps.py`` fails if a steady call runs any Python frame of jax or flax.

What is left of a standalone call's wall time beyond its device time is jax's and the GPU's:
in one run on an H200 (jax 0.11.2, V3.2 decode, B = 1, 4K context, device ~0.044 ms), a jit
of the same arguments doing nothing costs ~0.07 ms of wall time (dispatch, donation,
waiting for the result); the step's ~24 kernels run as XLA command buffers (CUDA graphs:
with them off, the same step kept the GPU busy 0.131 ms instead of 0.045), which add
~0.03 ms, and ~0.03 ms more when a buffer address changes between calls (XLA then re-records
the graph: a new output buffer while the last one is alive, new activations, or another
layer's parameters and cache). ``out=`` removes the first of these: the spent indices are
donated and aliased to the new ones. Longer steps cost more beyond their device time
(prefill 4K: ~0.3 ms), as a plain-jax program of the same length does: jax is told that a
program finished by a host function the CUDA driver runs after the GPU is done, then two
thread hand-offs, and those wake late after a long wait (no setting of jax 0.11.2 or of the
machine changed that; benchmarks/NOTES.md). Each kernel of the graph adds ~1.5-3.5 us to a
standalone call. ``benchmarks/bench_host_overhead.py`` reports each part.

The same pure functions are exposed (:meth:`IndexerSteps.prefill_fn`,
:meth:`IndexerSteps.decode_fn`) for running every layer of a model inside one jit of the
user's own, where the per-layer dispatch disappears altogether (README, "Every layer in one
jit").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx

from nsa_jax import budget as _budget
from nsa_jax import ops
from nsa_jax.cache import IndexKCache
from nsa_jax.indexer import OUTPUTS, DecodeInputs, Indexer, PrefillInputs
from nsa_jax.validation import call_checked, checking_enabled, describe, static_int

_CACHE_ARG = 4  # position of ``cache`` in (params, x, qr, inputs, cache[, out])
_OUT_ARG = 5


@dataclasses.dataclass(frozen=True)
class _Program:
  """What one jitted step depends on besides its array arguments (the registry key)."""

  kind: str                 # "prefill" | "decode"
  graphdef: nnx.GraphDef    # the layer's structure and config
  treedef: object           # the tree of its parameters (jax.tree.flatten of nnx.state)
  output: str
  backend: str
  interpret: bool
  budget_bytes: int | None  # prefill only: explicit budget, None = the cached device budget


def _pure(p: _Program) -> Callable:
  """(params, x, qr, inputs, cache) -> (indices, new cache), traceable inside any jit."""

  def step(params, x, qr, inputs, cache):
    layer = nnx.merge(p.graphdef, jax.tree.unflatten(p.treedef, list(params)))
    if p.kind == "prefill":
      return layer.prefill(x, qr, inputs, cache, output=p.output, backend=p.backend,
                           interpret=p.interpret, budget_bytes=p.budget_bytes)
    return layer.decode(x, qr, inputs, cache, output=p.output, backend=p.backend,
                        interpret=p.interpret)

  step.__name__ = step.__qualname__ = f"indexer_{p.kind}_step"
  return step


def _into_out(kind: str, pure: Callable) -> Callable:
  """The step with a sixth argument ``out``, donated: the indices take its buffer."""

  def step_into(params, x, qr, inputs, cache, out):
    idx, cache = pure(params, x, qr, inputs, cache)
    # Checked at trace time (once per shape): jax would only warn that a mismatched buffer
    # could not be reused.
    if not hasattr(out, "shape") or (tuple(out.shape), out.dtype) != (idx.shape, idx.dtype):
      raise ValueError(f"IndexerSteps.{kind}: out must be int32{list(idx.shape)} (indices "
                       f"this step returned for the same shapes), got {describe(out)}")
    return idx, cache

  step_into.__name__ = step_into.__qualname__ = f"indexer_{kind}_step_into"
  # keep_unused: ``out`` is not read, and jit drops unused arguments (and their donation).
  return jax.jit(step_into, donate_argnums=(_CACHE_ARG, _OUT_ARG), keep_unused=True)


# Program -> [pure function, its jit, its jit with ``out`` (made on first use)]. Module level
# so that every IndexerSteps of an equal layer gets the same jitted functions, hence the same
# compiled programs.
_REGISTRY: dict[_Program, list] = {}


def _lookup(p: _Program) -> list:
  hit = _REGISTRY.get(p)
  if hit is None:
    pure = _pure(p)
    hit = _REGISTRY[p] = [pure, jax.jit(pure, donate_argnums=(_CACHE_ARG,)), None]
  return hit


# Concrete jax array types that the fast path takes for x and qr by a set lookup (cheaper
# than isinstance against jax.Array's ABC); filled by the checked path from what it accepted.
_ARRAY_TYPES: set[type] = set()


def _check_args(fn, x, qr, cache):
  """What jit itself would refuse in its own words (the slow path only)."""
  if not hasattr(x, "dtype") or not hasattr(qr, "dtype"):
    name, a = ("x", x) if not hasattr(x, "dtype") else ("qr", qr)
    raise ValueError(f"{fn}: {name} must be a float array, got {describe(a)}")
  if type(cache) is not IndexKCache:
    raise ValueError(f"{fn}: cache must be an IndexKCache, got {type(cache).__name__}")
  for a in (x, qr):
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
      _ARRAY_TYPES.add(type(a))


def _name_deleted(fn, cache, out):
  """Raise our own error when jax refused an argument because it was donated before."""
  what = dict(cache="pass the cache that the previous call returned",
              out="pass each returned indices array as out once")
  for name, a in (("cache", getattr(cache, "k_fp8", None)), ("out", out)):
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.is_deleted():
      raise ValueError(f"{fn}: {name} was already donated or deleted ({what[name]})") from None


def _check_out(fn, out):
  """``out`` must be a live jax array (its shape and dtype are checked when tracing)."""
  if not isinstance(out, jax.Array):
    raise ValueError(f"{fn}: out must be a jax array of indices an earlier call returned (it is "
                     f"donated), got {type(out).__module__.split('.')[0]}."
                     f"{type(out).__name__} {describe(out)}")
  if not isinstance(out, jax.core.Tracer):
    _name_deleted(fn, None, out)
    _ARRAY_TYPES.add(type(out))


class IndexerSteps:
  """The jit-compiled prefill and decode steps of one :class:`~nsa_jax.Indexer`.

  A step compiles once per input bucket (T_pad, S_pad for prefill; B_pad, next_n and pages
  for decode) and per ``output``; the programs are shared by every layer with the same config.
  The cache argument is donated: pass the returned cache to the next call. The memory budget
  is primed here, before any tracing (one device query). The steps hold the layer's parameters
  as they are when the steps are made; make new steps after changing them.

  Args:
    indexer: the :class:`~nsa_jax.Indexer`.
    backend, interpret: kernel choice for every op (``"auto"``: Pallas on a GPU).
    budget_bytes: explicit prefill logits budget (int), else the cached device budget.
    device: the device whose budget is primed (default: the default device).

  Attributes:
    params: tuple of the layer's parameter arrays (``jax.tree.leaves(nnx.state(indexer))``),
      the first argument of :meth:`prefill_fn` / :meth:`decode_fn`.
    budget_bytes: the prefill logits budget in bytes (a Python int).
  """

  def __init__(self, indexer: Indexer, *, backend: str = "auto", interpret: bool = False,
               budget_bytes: int | None = None, device=None):
    fn = "IndexerSteps"
    if not isinstance(indexer, Indexer):
      raise ValueError(f"{fn}: indexer must be an nsa_jax.Indexer, got {type(indexer).__name__}")
    backend, interpret = ops.check_backend(backend, interpret, fn)
    budget_bytes = static_int(fn, "budget_bytes", budget_bytes, 1, none_ok=True)
    self.config = indexer.config
    self.backend, self.interpret = backend, interpret
    self._explicit_budget = budget_bytes
    self.budget_bytes = budget_bytes if budget_bytes is not None else _budget.prime(device)
    graphdef, state = nnx.split(indexer)
    leaves, treedef = jax.tree.flatten(state)
    self.params = tuple(leaves)
    self._graphdef, self._treedef = graphdef, treedef
    # (kind, output) -> the registry's entry; filled on first use, so a steady call never
    # hashes graphdef.
    self._fns: dict[tuple[str, str], list] = {}
    # output -> jitted step, what a steady call looks up (filled by the first checked call).
    self._prefill: dict[str, Callable] = {}
    self._decode: dict[str, Callable] = {}
    self._prefill_into: dict[str, Callable] = {}   # the same with ``out``
    self._decode_into: dict[str, Callable] = {}

  def _get(self, kind: str, output: str) -> list:
    if output not in OUTPUTS:  # before hashing it: a list must get this error too
      raise ValueError(f"IndexerSteps.{kind}: output must be one of {OUTPUTS}, got {output!r}")
    hit = self._fns.get((kind, output))
    if hit is None:
      hit = self._fns[(kind, output)] = _lookup(_Program(
          kind, self._graphdef, self._treedef, output, self.backend, self.interpret,
          self._explicit_budget if kind == "prefill" else None))
    return hit

  # ------------------------------------------------------------------ the jitted steps

  def prefill(self, x, qr, inputs: PrefillInputs, cache: IndexKCache, *,
              output: str = "slots", out=None):
    """Jitted :meth:`Indexer.prefill <nsa_jax.Indexer.prefill>`; donates ``cache``.

    Args:
      x: float [T_pad, dim]; qr: float [T_pad, q_lora_rank] (rows past the batch's tokens
        are padding).
      inputs: :class:`~nsa_jax.indexer.PrefillInputs` from ``prefill_inputs`` (numpy, or
        already on the device via ``jax.device_put``).
      cache: the :class:`~nsa_jax.IndexKCache` (donated).
      output: "slots" | "positions" | "keys".
      out: optional int32 [T_pad, topk] jax array you no longer need, typically the indices
        an earlier call of the same shapes returned. It is donated (deleted) and the new
        indices are written into its buffer, so that the step's buffers keep their addresses
        from call to call and XLA launches its CUDA graph without updating it first
        (docs/architecture.md, "Host overhead").

    Returns:
      ``(int32 [T_pad, topk] indices, -1 padded; the new IndexKCache)``.
    """
    fn = (self._prefill if out is None else self._prefill_into).get(output) \
        if type(output) is str else None
    # The fast path: one dict lookup, a few type checks, one config read, then jax's C++
    # dispatch. Anything else (first call, numpy or traced arguments, checking mode, bad
    # input) takes _call, which checks and names a bad argument. decode repeats it rather
    # than sharing a helper: a helper is one more Python frame on every steady call.
    if (fn is None or type(inputs) is not PrefillInputs or type(cache) is not IndexKCache
        or type(x) not in _ARRAY_TYPES or type(qr) not in _ARRAY_TYPES
        or (out is not None and type(out) not in _ARRAY_TYPES) or checking_enabled()):
      return self._call("prefill", PrefillInputs, x, qr, inputs, cache, output, out)
    try:  # costs nothing unless it raises
      if out is None:
        return fn(self.params, x, qr, inputs, cache)
      return fn(self.params, x, qr, inputs, cache, out)
    except RuntimeError:
      _name_deleted("IndexerSteps.prefill", cache, out)
      raise

  def decode(self, x, qr, inputs: DecodeInputs, cache: IndexKCache, *, output: str = "slots",
             out=None):
    """Jitted :meth:`Indexer.decode <nsa_jax.Indexer.decode>`; donates ``cache``.

    Args:
      x: float [B_pad * next_n, dim]; qr: float [B_pad * next_n, q_lora_rank], request-major;
        next_n in 1..4 (speculative decoding; the tested range).
      inputs: :class:`~nsa_jax.indexer.DecodeInputs` from ``decode_inputs`` (B_pad rows).
      cache: the :class:`~nsa_jax.IndexKCache` (donated).
      output: "slots" | "positions" | "keys".
      out: optional int32 [B_pad * next_n, topk] jax array you no longer need (donated; the
        new indices take its buffer), as in :meth:`prefill`.

    Returns:
      ``(int32 [B_pad * next_n, topk] indices, -1 padded; the new IndexKCache)``.
    """
    fn = (self._decode if out is None else self._decode_into).get(output) \
        if type(output) is str else None
    if (fn is None or type(inputs) is not DecodeInputs or type(cache) is not IndexKCache
        or type(x) not in _ARRAY_TYPES or type(qr) not in _ARRAY_TYPES
        or (out is not None and type(out) not in _ARRAY_TYPES) or checking_enabled()):
      return self._call("decode", DecodeInputs, x, qr, inputs, cache, output, out)
    try:  # costs nothing unless it raises
      if out is None:
        return fn(self.params, x, qr, inputs, cache)
      return fn(self.params, x, qr, inputs, cache, out)
    except RuntimeError:
      _name_deleted("IndexerSteps.decode", cache, out)
      raise

  def _call(self, kind, inputs_type, x, qr, inputs, cache, output, out):
    """The checked path: first call per output, numpy arguments, checking mode, bad input."""
    fn_name = f"IndexerSteps.{kind}"
    if type(inputs) is not inputs_type:
      made_by = ("nsa_jax.prefill_inputs(batch, block_tables)" if kind == "prefill" else
                 "nsa_jax.decode_inputs(context_lens, block_tables)")
      raise ValueError(f"{fn_name}: inputs must be {inputs_type.__name__} (from "
                       f"{made_by}), got {type(inputs).__name__}")
    _check_args(fn_name, x, qr, cache)
    if out is None:
      fn = self._get(kind, output)[1]
      (self._prefill if kind == "prefill" else self._decode)[output] = fn
      args = (self.params, x, qr, inputs, cache)
    else:
      _check_out(fn_name, out)
      hit = self._get(kind, output)
      if hit[2] is None:
        hit[2] = _into_out(kind, hit[0])
      fn = hit[2]
      (self._prefill_into if kind == "prefill" else self._decode_into)[output] = fn
      args = (self.params, x, qr, inputs, cache, out)
    try:
      # call_checked: in checking mode, a value check that failed inside raises here.
      return call_checked(fn, *args)
    except RuntimeError:
      _name_deleted(fn_name, cache, out)
      raise

  # ------------------------------------------------------------------ inside your own jit

  def prefill_fn(self, output: str = "slots") -> Callable:
    """The un-jitted prefill step, ``(params, x, qr, inputs, cache) -> (indices, cache)``.

    A pure function for use inside a jit of your own (e.g. every layer of a model in one
    program). ``params`` is :attr:`params` of any :class:`IndexerSteps` whose layer has this
    one's config; shapes and dtypes as :meth:`prefill`. The chunk plan comes from the budget
    primed when these steps were made (a Python int at trace time: no memory query inside
    your jit).
    """
    return self._get("prefill", output)[0]

  def decode_fn(self, output: str = "slots") -> Callable:
    """The un-jitted decode step, ``(params, x, qr, inputs, cache) -> (indices, cache)``;
    as :meth:`prefill_fn`, shapes and dtypes as :meth:`decode`."""
    return self._get("decode", output)[0]

  # ------------------------------------------------------------------ host-side helpers

  def plan(self, inputs: PrefillInputs):
    """The :class:`~nsa_jax.ChunkPlan` the prefill step uses for these inputs (host only)."""
    from nsa_jax.prefill import plan_for
    return plan_for(int(inputs.ks.shape[0]), int(inputs.key_slots.shape[0]),
                    budget_bytes=self._explicit_budget)

  @staticmethod
  def cache_sizes() -> dict:
    """Compiled programs held per step kind, over all IndexerSteps (jax's jit cache sizes)."""
    sizes = dict(prefill=0, decode=0)
    for p, (_, jitted, into) in _REGISTRY.items():
      sizes[p.kind] += jitted._cache_size() + (into._cache_size() if into is not None else 0)
    return sizes


__all__ = ["IndexerSteps"]
