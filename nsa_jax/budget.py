"""Host-side memory budget for prefill logits: queried once per device, read as a Python int.

sglang (PR #25299) bounds the [num_q, num_k] float32 logits of a ragged prefill by a budget
derived from free device memory, and chunks the queries when they would not fit. Asking the
device for its free memory every call cost a host sync (6-10% of prefill latency), so the
value is taken once per device and cached. Here the same holds with one more reason: the
budget decides chunk *shapes*, which must be static when ``jax.jit`` traces, so it has to be
a plain Python int before tracing starts.

Flow: ``prime(device)`` (or the first eager call) asks :func:`query_device_memory` once,
computes the measured budget and caches it; :func:`budget_bytes` then returns the cached int.
While tracing with a cold cache (sglang: CUDA-graph capture) nothing is queried and nothing
is cached: the static budget, computed from an estimate of the device's size, is used
instead, with a one-time warning.

Formulas (docs/contract.md, "The memory budget for prefill logits"):
  static   = min(free_fraction * total * (1 - mem_fraction_static), total_fraction * total)
             (only total_fraction * total when mem_fraction_static is unset), at least 1 byte;
  measured = min(free_fraction * free_now, static), at least 1 byte.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings

import jax
import numpy as np

from nsa_jax.validation import static_int

# sglang's constants (nsa_indexer.py, PR #25299).
BYTES_PER_LOGIT = 4
# Below this many logits chunking costs more than it saves; prefill runs unchunked.
SKIP_CHUNK_ELEMENTS = 8_000_000
# Share of the *free* memory the logits may take (later sglang versions default to 0.2).
DEFAULT_FREE_MEM_FRACTION = 0.5
FREE_MEM_FRACTION_ENV = "NSA_JAX_MQA_LOGITS_FREE_MEM_FRACTION"
# Cap as a share of the *total* memory, whatever is free.
TOTAL_MEM_FRACTION = 0.3

# XLA's GPU pool takes this share of the card by default (XLA_PYTHON_CLIENT_MEM_FRACTION);
# only used to estimate the pool size on the cold tracing path, where nothing may be queried.
_XLA_DEFAULT_POOL_FRACTION = 0.75
# Card sizes by device kind, for the same estimate. Kinds that name their size ("... 80GB")
# are parsed; these cover the ones that don't. Unknown cards get the conservative fallback.
_KNOWN_CARD_BYTES = {"H200": 141 * 10**9, "H100": 80 * 2**30, "H20": 96 * 2**30,
                     "GH200": 96 * 2**30, "A100": 40 * 2**30, "B200": 180 * 2**30}
_FALLBACK_CARD_BYTES = 16 * 2**30

_UNSET = object()


class _Settings:
  """Process-wide knobs; read at prime time so that tests and servers can change them."""

  def __init__(self):
    self.mem_fraction_static: float | None = None
    self.free_fraction: float | None = None     # None: env override or the default
    self.total_fraction: float = TOTAL_MEM_FRACTION
    self.host_budget_bytes: int | None = None   # explicit budget for devices without stats
    self.device_total_bytes: int | None = None  # explicit total for the cold tracing path


_settings = _Settings()
_lock = threading.RLock()
_cache: dict = {}        # device -> measured budget in bytes
_warned: set = set()     # devices whose cold-trace warning was shown


def _check_fraction(name: str, x, *, allow_zero: bool) -> float:
  ok = (not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, float, np.integer, np.floating))
        and not math.isnan(x))
  ok = ok and ((x >= 0) if allow_zero else (x > 0)) and x <= 1
  if not ok:
    rng = "[0, 1]" if allow_zero else "(0, 1]"
    raise ValueError(f"budget.configure: {name} must be a float in {rng}, got {x!r}")
  return float(x)


def configure(*, mem_fraction_static=_UNSET, free_fraction=_UNSET, total_fraction=_UNSET,
              host_budget_bytes=_UNSET, device_total_bytes=_UNSET) -> None:
  """Sets the budget knobs and clears the cache (cached budgets used the old knobs).

  Args:
    mem_fraction_static: float in [0, 1] or None, the share of device memory reserved for
      weights and KV cache (sglang's ``--mem-fraction-static``). None: unset.
    free_fraction: float in (0, 1] or None: share of free memory the logits may take.
      None: the env variable ``NSA_JAX_MQA_LOGITS_FREE_MEM_FRACTION``, else 0.5.
    total_fraction: float in (0, 1]: cap as a share of total memory (default 0.3).
    host_budget_bytes: int >= 1 or None: the budget for devices without memory stats (CPU);
      None: derive it from host RAM.
    device_total_bytes: int >= 1 or None: the total memory assumed on the cold tracing path;
      None: estimate it from the device kind.
  """
  with _lock:
    if mem_fraction_static is not _UNSET:
      _settings.mem_fraction_static = (None if mem_fraction_static is None else
                                       _check_fraction("mem_fraction_static",
                                                       mem_fraction_static, allow_zero=True))
    if free_fraction is not _UNSET:
      _settings.free_fraction = (None if free_fraction is None else
                                 _check_fraction("free_fraction", free_fraction,
                                                 allow_zero=False))
    if total_fraction is not _UNSET:
      _settings.total_fraction = _check_fraction("total_fraction", total_fraction,
                                                 allow_zero=False)
    for name, val in (("host_budget_bytes", host_budget_bytes),
                      ("device_total_bytes", device_total_bytes)):
      if val is _UNSET:
        continue
      setattr(_settings, name, static_int("budget.configure", name, val, 1, none_ok=True))
    _cache.clear()


def free_fraction() -> float:
  """The free-memory fraction in force: ``configure`` > env override > 0.5."""
  if _settings.free_fraction is not None:
    return _settings.free_fraction
  env = os.environ.get(FREE_MEM_FRACTION_ENV, "").strip()
  if not env:
    return DEFAULT_FREE_MEM_FRACTION
  try:
    val = float(env)
  except ValueError:
    val = -1.0
  if not 0 < val <= 1:
    raise ValueError(f"{FREE_MEM_FRACTION_ENV} must be a float in (0, 1], got {env!r}")
  return val


def static_budget(total_bytes: int) -> int:
  """The budget from the device's size alone (no free-memory reading). int bytes, >= 1."""
  cap = _settings.total_fraction * total_bytes
  mfs = _settings.mem_fraction_static
  if mfs is not None:
    cap = min(free_fraction() * total_bytes * (1.0 - mfs), cap)
  return max(1, int(cap))


def measured_budget(free_bytes: int, total_bytes: int) -> int:
  """The budget from one reading of free and total memory. int bytes, >= 1."""
  return max(1, min(int(free_fraction() * free_bytes), static_budget(total_bytes)))


def query_device_memory(device) -> tuple[int, int] | None:
  """(free_bytes, total_bytes) of XLA's memory pool on ``device``, or None without stats.

  The ONLY place that asks a device about memory. It reads ``device.memory_stats()``:
  ``bytes_limit`` (the pool XLA may use, not the card's raw size) and ``bytes_in_use``.
  CPU devices have no stats and give None.
  """
  stats = device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  total = int(stats["bytes_limit"])
  return max(0, total - int(stats.get("bytes_in_use", 0))), total


def _host_memory() -> tuple[int, int]:
  """(available_bytes, total_bytes) of host RAM, for devices without memory stats."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if avail is None:
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  return int(avail), int(total)


def _estimated_total(device) -> int:
  """The device's memory as XLA would see it, guessed without asking the device."""
  if _settings.device_total_bytes is not None:
    return _settings.device_total_bytes
  if device.platform == "cpu":
    return _host_memory()[1]
  kind = getattr(device, "device_kind", "") or ""
  m = re.search(r"(\d+)\s*GB", kind)
  card = None
  if m:
    card = int(m.group(1)) * 2**30
  else:
    # Longest name first, so that "GH200" wins over "H200".
    for name in sorted(_KNOWN_CARD_BYTES, key=len, reverse=True):
      if name in kind:
        card = _KNOWN_CARD_BYTES[name]
        break
  if card is None:
    card = _FALLBACK_CARD_BYTES
  try:
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", _XLA_DEFAULT_POOL_FRACTION))
  except ValueError:
    frac = _XLA_DEFAULT_POOL_FRACTION
  return int(card * frac)


def _resolve(device):
  if device is None:
    default = jax.config.jax_default_device
    if isinstance(default, jax.Device):
      return default
    return jax.local_devices()[0]
  if not isinstance(device, jax.Device):
    raise ValueError(f"budget: device must be a jax.Device or None, got {type(device).__name__}")
  return device


def _is_tracing() -> bool:
  from jax._src import core  # trace_state_clean has no public alias in jax 0.11
  return not core.trace_state_clean()


def prime(device=None) -> int:
  """Fills the cache for ``device`` (default: the default device) and returns its budget.

  Call it before tracing (a server at start-up, after loading weights). One call to
  :func:`query_device_memory`, none if the device is cached already (use :func:`reset` to
  measure again). Devices without memory stats use ``host_budget_bytes`` or host RAM.

  Returns:
    int, the budget in bytes (>= 1).
  """
  device = _resolve(device)
  with _lock:
    if device in _cache:
      return _cache[device]
    mem = query_device_memory(device)
    if mem is None:
      if _settings.host_budget_bytes is not None:
        budget = _settings.host_budget_bytes
      else:
        budget = measured_budget(*_host_memory())
    else:
      budget = measured_budget(*mem)
    _cache[device] = budget
    return budget


def budget_bytes(device=None, *, tracing: bool | None = None) -> int:
  """The logits budget for ``device`` in bytes, as a Python int (static under jit).

  Warm cache: the cached value, no query. Cold cache: outside tracing, primes the device
  (one query); while tracing (``tracing=None`` detects it), the static budget from an
  estimate of the device's size, neither queried nor cached, with a one-time warning.
  """
  device = _resolve(device)
  with _lock:
    if device in _cache:
      return _cache[device]
  if tracing is None:
    tracing = _is_tracing()
  if not tracing:
    return prime(device)
  budget = (_settings.host_budget_bytes
            if device.platform == "cpu" and _settings.host_budget_bytes is not None
            else static_budget(_estimated_total(device)))
  with _lock:
    first = device not in _warned
    _warned.add(device)
  if first:
    warnings.warn(
        f"nsa_jax.budget: no cached memory budget for {device} while tracing; using the "
        f"static budget {budget} bytes. Call nsa_jax.budget.prime() (or prime_mesh) before "
        f"jax.jit traces prefill_topk.", RuntimeWarning, stacklevel=3)
  return budget


def cached_budget(device=None) -> int | None:
  """The cached budget for ``device``, or None when cold. Never queries."""
  device = _resolve(device)
  with _lock:
    return _cache.get(device)


def reset(device=None) -> None:
  """Forgets the cached budget of ``device``, or of every device when None."""
  with _lock:
    if device is None:
      _cache.clear()
      _warned.clear()
    else:
      device = _resolve(device)
      _cache.pop(device, None)
      _warned.discard(device)


__all__ = ["BYTES_PER_LOGIT", "DEFAULT_FREE_MEM_FRACTION", "FREE_MEM_FRACTION_ENV",
           "SKIP_CHUNK_ELEMENTS", "TOTAL_MEM_FRACTION", "budget_bytes", "cached_budget",
           "configure", "free_fraction", "measured_budget", "prime", "query_device_memory",
           "reset", "static_budget"]
