"""Argument checks: shapes and dtypes at trace time, values only in the opt-in checking mode.

Shape and dtype errors are ``ValueError`` naming the argument, what was expected and what came.
Value errors (ks > ke, ke > S, page ids out of range) would need the values on the host, i.e. a
device sync per call, so they are only checked where the values are on the host anyway (the
batch builders) or when checking is switched on (:func:`checking`, or the environment variable
``NSA_JAX_CHECK_VALUES=1``). Unchecked bad values never read out of bounds: kernels and the
reference clamp ranges to [0, S) and mask pages outside the cache (see ``reference``).
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

_state = threading.local()


def checking_enabled() -> bool:
  flag = getattr(_state, "enabled", None)
  if flag is None:
    return os.environ.get("NSA_JAX_CHECK_VALUES", "0") not in ("", "0", "false", "False")
  return flag


@contextlib.contextmanager
def checking(enabled: bool = True):
  """Context manager that switches value checks on (or off) for calls made inside it.

  Under ``jax.jit`` the checks run as a host callback (a device sync: debugging only); on
  concrete arrays they run directly on the host.
  """
  old = getattr(_state, "enabled", None)
  _state.enabled = enabled
  try:
    yield
  finally:
    _state.enabled = old


def _fmt(a) -> str:
  return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def expect(name: str, a, shape: tuple, dtypes, fn: str) -> None:
  """Raises ValueError unless ``a`` has ``shape`` (None = any size) and one of ``dtypes``."""
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise ValueError(f"{fn}: {name} must be an array, got {type(a).__name__}")
  dtypes = tuple(jnp.dtype(d) for d in (dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)))
  exp = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
  names = "|".join(d.name for d in dtypes)
  if len(a.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
    raise ValueError(f"{fn}: {name} must have shape {exp} ({names}), got {_fmt(a)}")
  if jnp.dtype(a.dtype) not in dtypes:
    raise ValueError(f"{fn}: {name} must have dtype {names} (shape {exp}), got {_fmt(a)}")


def check_values(fn: str, predicate, message: str, *arrays) -> None:
  """In checking mode, raises ValueError(f"{fn}: {message}") where ``predicate(*np_arrays)``
  is False. ``predicate`` takes numpy arrays and returns a bool. No-op otherwise."""
  if not checking_enabled():
    return

  def host_check(*xs):
    if not bool(predicate(*[np.asarray(x) for x in xs])):
      raise ValueError(f"{fn}: {message}")

  if any(isinstance(a, jax.core.Tracer) for a in arrays):
    jax.debug.callback(host_check, *arrays, ordered=True)
  else:
    host_check(*arrays)
