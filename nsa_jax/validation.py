"""Argument checks: shapes and dtypes at trace time, values only in the opt-in checking mode.

Every bad argument raises a ``ValueError`` that names the function and the argument, what was
expected and what came. Three kinds of checks:

- Python values and static arguments (ints, strings, configs): always, when the function is
  called. A static int accepts anything ``operator.index`` accepts (``np.int64`` included)
  except bool, and is normalized to a Python int.
- Shapes and dtypes: always, at trace time (so once per compile under ``jax.jit``).
- Array values (ks > ke, ke > S, page ids outside the cache, a context longer than its block
  table row) would need the values on the host, i.e. a device sync per call. They are checked
  where the values are on the host anyway (the host-side batch builders) and otherwise only
  in checking mode (:func:`checking`, or ``NSA_JAX_CHECK_VALUES=1`` at import). Unchecked
  bad values never read out of bounds: kernels and the reference clamp key ranges to [0, S)
  and mask pages outside the cache (see ``reference``).

Empty batches: a zero-size batch axis (T = 0 queries, B = 0 requests, S = 0 keys, a zero
``max_context_len``) is valid everywhere and gives the documented output shape with a zero
in it, or all -1 for top-k indices when there are no keys; no kernel is launched for it.

Checking mode is part of what ``jax.jit`` keys its caches on (a JAX config state with
``include_in_jit_key``), so a function traced outside :func:`checking` is traced again,
with checks, the first time it is called inside, and the checked program is never used
outside. Under a trace the checks run in a host callback that records a failure, which
:func:`checking` raises as the ``ValueError`` when its block exits (the library's own jitted
entry points raise it at the call). With ``NSA_JAX_CHECK_VALUES=1`` and no block, such a
failure is logged (logger ``nsa_jax``) and raised by the next library entry point or block.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
# jax has no public way to add a config state that jit keys its caches on; jax is pinned
# (pyproject), and tests/test_validation.py fails if this stops keying the trace caches.
from jax._src import config as _jax_config


def _env_default() -> bool:
  val = os.environ.get("NSA_JAX_CHECK_VALUES", "0").strip().lower()
  return val not in ("", "0", "false", "no", "off")


_CHECK_VALUES = _jax_config.State(
    "nsa_jax_check_values", _env_default(),
    "nsa_jax value checks (ks/ke ranges, page ids, context lengths) in host callbacks.",
    parser=bool, include_in_jit_key=True, include_in_trace_context=True)


def checking_enabled() -> bool:
  """True inside :func:`checking` (or with ``NSA_JAX_CHECK_VALUES=1`` at import)."""
  return bool(_CHECK_VALUES.value)


class checking:  # noqa: N801  (a context manager used like a function: nsa_jax.checking())
  """Switches value checks on (or off) for the calls made inside the block, in this thread.

  ``with nsa_jax.checking(): ...`` or ``@nsa_jax.checking()`` on a function. Inside, every op
  checks its array values and raises a ``ValueError`` naming the op, the argument and the
  first offending row or value:
  - called on concrete arrays (eagerly), right at the call, before anything runs;
  - called by the library's jitted entry points (``IndexerSteps.prefill`` / ``decode``), at
    the call, which then waits for its result (a device sync: debugging only);
  - called inside a user's ``jax.jit``, when the block exits (it waits for the device). The
    check runs in a host callback that only records the failure: a callback that raised
    would stop one device of a sharded program and leave the others waiting in a collective.
    The program itself finishes as unchecked bad values always do (masked, never out of
    bounds).
  The mode is part of jit's cache key: functions traced before the block are traced again
  inside it, and nothing traced inside runs checks outside. AOT-compiled executables
  (``jax.jit(f).lower(...).compile()``) keep the mode they were lowered in.

  Args:
    enabled: True (default) to check, False to switch checks off inside the block.
  """

  def __init__(self, enabled: bool = True):
    if not isinstance(enabled, (bool, np.bool_)):
      raise ValueError(f"checking: enabled must be a bool, got {describe(enabled)}")
    self._enabled = bool(enabled)
    self._entered = []

  def __enter__(self):
    global _open_blocks
    ctx = _CHECK_VALUES(self._enabled)
    ctx.__enter__()
    self._entered.append(ctx)
    with _failures_lock:
      _open_blocks += 1
    return self

  def __exit__(self, exc_type, exc, tb):
    global _open_blocks
    try:
      if self._enabled:
        jax.effects_barrier()   # every callback of the calls made inside has run
    finally:
      self._entered.pop().__exit__(None, None, None)
      with _failures_lock:
        _open_blocks -= 1
    err = take_failure() if self._enabled else None
    if err is not None and exc is None:
      raise err
    return False

  def __call__(self, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      with checking(self._enabled):
        return fn(*args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------- failed checks

_failures: list[str] = []     # recorded by host callbacks (any thread), oldest first
_failures_lock = threading.Lock()
_open_blocks = 0              # checking() blocks open in any thread
_log = logging.getLogger("nsa_jax")


def _record(message: str) -> None:
  with _failures_lock:
    _failures.append(message)
    unattended = _open_blocks == 0
  if unattended:  # NSA_JAX_CHECK_VALUES=1 with no block to raise it: say it now
    _log.error("nsa_jax value check failed: %s", message)


def take_failure() -> ValueError | None:
  """The first value check recorded by a callback since the last take, as a ValueError (None
  if none failed); forgets all of them."""
  with _failures_lock:
    msgs = list(_failures)
    _failures.clear()
  if not msgs:
    return None
  more = f" (and {len(msgs) - 1} more failed checks)" if len(msgs) > 1 else ""
  return ValueError(msgs[0] + more)


def call_checked(fn, *args, **kwargs):
  """Calls a jitted library entry point; in checking mode waits for it and raises a value
  check that failed inside as the ValueError, at the call. Otherwise just the call."""
  if not checking_enabled():
    return fn(*args, **kwargs)
  out = fn(*args, **kwargs)
  jax.block_until_ready(out)
  jax.effects_barrier()
  err = take_failure()
  if err is not None:
    raise err
  return out


def check_values(fn: str, find_error, *arrays) -> None:
  """In checking mode, raises ``ValueError(f"{fn}: {msg}")`` when ``find_error(*np_arrays)``
  returns a message ``msg`` (None: the values are fine). No-op otherwise.

  Concrete arrays are checked right here; under a trace the check becomes a host callback
  that records a failure for :func:`checking` (or :func:`call_checked`) to raise.
  """
  if not checking_enabled():
    return

  def host_check(*xs):
    msg = find_error(*[np.asarray(x) for x in xs])
    if msg is not None:
      _record(f"{fn}: {msg}")

  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    jax.debug.callback(host_check, *arrays)
    return
  msg = find_error(*[np.asarray(a) for a in arrays])
  if msg is not None:
    raise ValueError(f"{fn}: {msg}")


# --------------------------------------------------------------------------- value checks

def key_range_error(ks: np.ndarray, ke: np.ndarray, S: int) -> str | None:
  """The first row breaking 0 <= ks <= ke <= S, described; None if every row holds it."""
  bad = (ks < 0) | (ks > ke) | (ke > S)
  if not bad.any():
    return None
  i = int(np.argmax(bad))
  rule = f"need 0 <= ks <= ke <= S={S} for every row"
  if ks[i] < 0:
    return f"{rule}; got ks[{i}] = {int(ks[i])} < 0"
  if ke[i] > S:
    return f"{rule}; got ke[{i}] = {int(ke[i])} > S={S}"
  return f"{rule}; got ks[{i}] = {int(ks[i])} > ke[{i}] = {int(ke[i])}"


def paged_context_error(context_lens: np.ndarray, block_tables: np.ndarray,
                        max_context_len: int, num_pages: int | None,
                        page_size: int) -> str | None:
  """The first request whose context length or used page ids are bad, described."""
  ctx = context_lens.astype(np.int64)
  width = block_tables.shape[1]
  for cond, what in (
      (ctx < 0, lambda b: f"context_lens[{b}] = {int(ctx[b])} < 0"),
      (ctx > max_context_len,
       lambda b: f"context_lens[{b}] = {int(ctx[b])} > max_context_len={max_context_len}"),
      (ctx > width * page_size,
       lambda b: f"context_lens[{b}] = {int(ctx[b])} needs {-(-int(ctx[b]) // page_size)} "
                 f"pages, but block_tables rows hold {width} ({width * page_size} tokens)")):
    if cond.any():
      return what(int(np.argmax(cond)))
  used = np.arange(width)[None, :] < -(-ctx // page_size)[:, None]
  outside = block_tables < 0
  if num_pages is not None:
    outside |= block_tables >= num_pages
  bad = used & outside
  if bad.any():
    b, j = (int(v) for v in np.argwhere(bad)[0])
    cache = "" if num_pages is None else f" [0, {num_pages})"
    return (f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is not a page of the "
            f"cache{cache}, and request {b} uses it (context_lens[{b}] = {int(ctx[b])})")
  return None


# --------------------------------------------------------------------------- arguments

def _fmt(a) -> str:
  return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def describe(x) -> str:
  """How a bad argument is shown in a message: dtype[shape] for arrays, else repr/type."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    try:
      return _fmt(x)
    except TypeError:
      pass
  r = repr(x)
  return f"{type(x).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def expect(name: str, a, shape: tuple, dtypes, fn: str) -> None:
  """Raises ValueError unless ``a`` has ``shape`` (None = any size) and one of ``dtypes``."""
  dtypes = tuple(jnp.dtype(d) for d in (dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)))
  exp = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
  names = "|".join(d.name for d in dtypes)
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise ValueError(f"{fn}: {name} must be an array {names}{exp}, got {describe(a)}")
  if len(a.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
    raise ValueError(f"{fn}: {name} must have shape {exp} ({names}), got {_fmt(a)}")
  if jnp.dtype(a.dtype) not in dtypes:
    raise ValueError(f"{fn}: {name} must have dtype {names} (shape {exp}), got {_fmt(a)}")


def static_int(fn: str, name: str, x, lo: int | None = None, *,
               none_ok: bool = False) -> int | None:
  """``x`` as a Python int (anything ``operator.index`` takes, not bool), >= ``lo``.

  Raises ValueError naming ``fn`` and ``name`` otherwise (a traced value included: static
  arguments must be known at trace time). ``none_ok``: None passes through.
  """
  if x is None and none_ok:
    return None
  bound = "" if lo is None else f" >= {lo}"
  what = f"a static int{bound}{' or None' if none_ok else ''}"
  if isinstance(x, (bool, np.bool_)):
    raise ValueError(f"{fn}: {name} must be {what}, got {x!r}")
  if isinstance(x, jax.core.Tracer):
    raise ValueError(f"{fn}: {name} must be {what}, got a traced value (pass it as a "
                     f"static argument of jax.jit)")
  try:
    v = operator.index(x)
  except TypeError:
    raise ValueError(f"{fn}: {name} must be {what}, got {describe(x)}") from None
  if lo is not None and v < lo:
    raise ValueError(f"{fn}: {name} must be {what}, got {v}")
  return int(v)


def static_bool(fn: str, name: str, x) -> bool:
  """``x`` as a Python bool (bool or numpy bool); ValueError otherwise."""
  if not isinstance(x, (bool, np.bool_)):
    raise ValueError(f"{fn}: {name} must be a bool, got {describe(x)}")
  return bool(x)


def host_array(fn: str, name: str, x, *, what: str = "ints") -> np.ndarray:
  """``x`` as a numpy array for a host-side builder; ValueError for traced arrays (host-side
  functions look at values, so they run before jax.jit, not inside it)."""
  if isinstance(x, jax.core.Tracer):
    raise ValueError(f"{fn}: {name} must be host values ({what}: numpy or a list), got a "
                     f"traced array; {fn} runs on the host, outside jax.jit")
  try:
    return np.asarray(x)
  except Exception as e:  # ragged lists, objects numpy cannot take
    raise ValueError(f"{fn}: {name} must be {what} (numpy or a list), got {describe(x)}: "
                     f"{e}") from None


__all__ = ["call_checked", "check_values", "checking", "checking_enabled", "describe",
           "expect", "host_array", "key_range_error", "paged_context_error", "static_bool",
           "static_int", "take_failure"]
