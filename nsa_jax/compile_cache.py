"""JAX's persistent compilation cache for nsa_jax's programs (on by default in the CLI).

A DeepSeek-V3.2 indexer step takes seconds to compile (each prefill bucket, the decode step),
and a fresh process compiles them all again. JAX can keep compiled executables on disk and load
them in the next process; it only needs a directory, and by default it skips programs that
compiled in under a second, which on a GPU drops many of ours. :func:`enable_compile_cache`
sets both. Library users call it once, before the first compile:

    import nsa_jax
    nsa_jax.enable_compile_cache()          # or a directory of your own

(equivalent to ``jax.config.update("jax_compilation_cache_dir", DIR)`` plus
``jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)``). A second process then
traces the steps (Python, milliseconds per step) but loads their executables instead of
compiling them. The cache key covers the program, the jax/jaxlib version, the device kind and
the compile options, so a stale entry is never loaded; deleting the directory is always safe.
"""

from __future__ import annotations

import os

import jax

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"  # jax's own variable; it wins over our default


def default_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/nsa_jax/jax-compile``
  (``~/.cache/nsa_jax/jax-compile``)."""
  if os.environ.get(ENV_DIR):
    return os.environ[ENV_DIR]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nsa_jax", "jax-compile")


def enable_compile_cache(directory: str | os.PathLike | None = None, *,
                         min_compile_secs: float = 0.0) -> str:
  """Turns on JAX's persistent compilation cache; returns the directory used.

  Call it before the process compiles anything: jax reads these settings at its first
  compile and keeps them for the life of the process.

  Args:
    directory: where executables are stored (created if missing); None for
      :func:`default_dir`.
    min_compile_secs: programs that compiled faster than this are not stored (jax's default
      is 1 s; 0 stores everything, so a second run compiles nothing).

  Raises:
    ValueError: ``directory`` cannot be created or is not writable.
  """
  fn = "enable_compile_cache"
  if directory is not None and not isinstance(directory, (str, os.PathLike)):
    raise ValueError(f"{fn}: directory must be a path (str or os.PathLike) or None, got "
                     f"{type(directory).__name__}")
  path = os.path.abspath(os.path.expanduser(os.fspath(directory) if directory is not None
                                            else default_dir()))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{fn}: cannot create the cache directory {path!r}: {e.strerror}") from None
  if not os.access(path, os.W_OK):
    raise ValueError(f"{fn}: the cache directory {path!r} is not writable")
  if isinstance(min_compile_secs, bool) or not isinstance(min_compile_secs, (int, float)) or \
      min_compile_secs < 0:
    raise ValueError(f"{fn}: min_compile_secs must be a number >= 0, got {min_compile_secs!r}")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path


__all__ = ["ENV_DIR", "default_dir", "enable_compile_cache"]
