"""Budget cache: formulas, one query per device, cold-cache tracing, reset, thread safety."""

import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import budget

GiB = 2 ** 30


@pytest.fixture(autouse=True)
def clean_budget(monkeypatch):
  monkeypatch.delenv(budget.FREE_MEM_FRACTION_ENV, raising=False)
  budget.reset()
  yield
  budget.configure(mem_fraction_static=None, free_fraction=None,
                   total_fraction=budget.TOTAL_MEM_FRACTION, host_budget_bytes=None,
                   device_total_bytes=None)
  budget.reset()


@pytest.fixture
def fake_memory(monkeypatch):
  """Replaces the one device-memory query with a counter returning a settable reading."""
  state = dict(free=40 * GiB, total=60 * GiB, calls=0, delay=0.0)

  def fake(device):
    state["calls"] += 1
    if state["delay"]:
      time.sleep(state["delay"])
    return state["free"], state["total"]

  monkeypatch.setattr(budget, "query_device_memory", fake)
  return state


def test_constants_match_sglang():
  assert budget.BYTES_PER_LOGIT == 4
  assert budget.SKIP_CHUNK_ELEMENTS == 8_000_000
  assert budget.DEFAULT_FREE_MEM_FRACTION == 0.5
  assert budget.TOTAL_MEM_FRACTION == 0.3
  assert budget.FREE_MEM_FRACTION_ENV == "NSA_JAX_MQA_LOGITS_FREE_MEM_FRACTION"


def test_query_device_memory_is_none_on_cpu():
  assert budget.query_device_memory(jax.devices("cpu")[0]) is None


def test_query_device_memory_reads_xla_pool():
  class Dev:
    def memory_stats(self):
      return {"bytes_limit": 100, "bytes_in_use": 30, "peak_bytes_in_use": 50}
  assert budget.query_device_memory(Dev()) == (70, 100)


def test_static_and_measured_formulas():
  total = 80 * GiB
  assert budget.static_budget(total) == int(0.3 * total)
  budget.configure(mem_fraction_static=0.8)
  assert budget.static_budget(total) == int(min(0.5 * total * (1 - 0.8), 0.3 * total))
  assert budget.measured_budget(10 * GiB, total) == int(min(0.5 * 10 * GiB, 0.5 * total * (1 - 0.8)))
  assert budget.measured_budget(0, total) == 1          # never zero
  budget.configure(mem_fraction_static=1.0)
  assert budget.static_budget(total) == 1


def test_free_fraction_env_override(monkeypatch, fake_memory):
  monkeypatch.setenv(budget.FREE_MEM_FRACTION_ENV, "0.2")
  assert budget.prime() == int(0.2 * fake_memory["free"])
  monkeypatch.setenv(budget.FREE_MEM_FRACTION_ENV, "1.5")
  with pytest.raises(ValueError, match=budget.FREE_MEM_FRACTION_ENV):
    budget.free_fraction()
  budget.configure(free_fraction=0.1)               # configure beats the env variable
  assert budget.free_fraction() == 0.1


def test_prime_queries_once_and_calls_never_query(fake_memory):
  b = budget.prime()
  assert fake_memory["calls"] == 1
  assert b == int(min(0.5 * fake_memory["free"], 0.3 * fake_memory["total"]))
  assert budget.prime() == b and fake_memory["calls"] == 1
  for _ in range(10):
    assert budget.budget_bytes() == b
  assert fake_memory["calls"] == 1


def test_prefill_calls_after_prime_make_no_query(fake_memory):
  budget.prime()
  rng = np.random.default_rng(0)
  T, S, H, D = 24, 40, 2, 128
  q = jnp.asarray(rng.standard_normal((T, H, D)), jnp.float8_e4m3fn)
  k = jnp.asarray(rng.standard_normal((S, D)), jnp.float8_e4m3fn)
  w = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
  sc = jnp.ones((S,), jnp.float32)
  for n in range(6):
    ks = rng.integers(0, S, T).astype(np.int32)
    ke = np.minimum(ks + rng.integers(0, S, T), S).astype(np.int32)
    nsa_jax.prefill_topk(q, k, sc, w, jnp.asarray(ks), jnp.asarray(ke), k=8).block_until_ready()
  jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=8))(q, k, sc, w, jnp.asarray(ks),
                                                     jnp.asarray(ke)).block_until_ready()
  assert fake_memory["calls"] == 1


def test_eager_cold_call_primes(fake_memory):
  assert budget.cached_budget() is None
  b = budget.budget_bytes()
  assert fake_memory["calls"] == 1 and budget.cached_budget() == b


def test_cold_cache_tracing_queries_nothing_caches_nothing_warns_once(fake_memory):
  rng = np.random.default_rng(1)

  def args(T, S):
    return (jnp.asarray(rng.standard_normal((T, 2, 128)), jnp.float8_e4m3fn),
            jnp.asarray(rng.standard_normal((S, 128)), jnp.float8_e4m3fn),
            jnp.ones((S,), jnp.float32), jnp.ones((T, 2), jnp.float32),
            jnp.zeros((T,), jnp.int32), jnp.full((T,), S, jnp.int32))

  f = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=4))
  with pytest.warns(RuntimeWarning, match="no cached memory budget"):
    f.lower(*args(8, 16))
  with warnings.catch_warnings():
    warnings.simplefilter("error")                  # a second cold trace does not warn again
    f.lower(*args(16, 16))
  assert fake_memory["calls"] == 0
  assert budget.cached_budget() is None
  # The static budget while tracing comes from the device's estimated size.
  budget.configure(device_total_bytes=10 * GiB, host_budget_bytes=None)
  dev = jax.devices()[0]
  assert budget.budget_bytes(dev, tracing=True) == budget.static_budget(10 * GiB)
  assert fake_memory["calls"] == 0 and budget.cached_budget(dev) is None


def test_reset_then_prime_picks_up_new_free_memory(fake_memory):
  fake_memory["free"] = 4 * GiB
  assert budget.prime() == 2 * GiB
  fake_memory["free"] = 2 * GiB
  assert budget.prime() == 2 * GiB                 # cached: no new reading
  budget.reset()
  assert budget.cached_budget() is None
  assert budget.prime() == 1 * GiB
  assert fake_memory["calls"] == 2


def test_per_device_cache(fake_memory):
  devs = jax.devices()
  assert len(devs) == 4
  fake_memory["free"] = 4 * GiB
  budget.prime(devs[0])
  assert budget.cached_budget(devs[1]) is None
  fake_memory["free"] = 2 * GiB
  assert budget.prime(devs[1]) == GiB and budget.cached_budget(devs[0]) == 2 * GiB
  budget.reset(devs[0])
  assert budget.cached_budget(devs[0]) is None and budget.cached_budget(devs[1]) == GiB
  mesh = nsa_jax.make_mesh(devs)
  budget.reset()
  calls = fake_memory["calls"]
  assert nsa_jax.prime_mesh(mesh) == GiB
  assert fake_memory["calls"] == calls + 4
  assert all(budget.cached_budget(d) == GiB for d in devs)


def test_thread_safe_single_query(fake_memory):
  fake_memory["delay"] = 0.05
  results = []
  threads = [threading.Thread(target=lambda: results.append(budget.budget_bytes()))
             for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert fake_memory["calls"] == 1 and len(set(results)) == 1 and len(results) == 8


def test_cpu_budget_from_setting_or_host_ram():
  cpu = jax.devices("cpu")[0]
  b = budget.prime(cpu)                             # real CPU: no stats, so host RAM
  assert 1 <= b <= 0.3 * budget._host_memory()[1]
  budget.configure(host_budget_bytes=12345)
  assert budget.cached_budget(cpu) is None          # configure clears the cache
  assert budget.prime(cpu) == 12345
  budget.reset()
  with pytest.warns(RuntimeWarning, match="no cached memory budget"):
    assert budget.budget_bytes(cpu, tracing=True) == 12345


def test_estimated_total_from_device_kind(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)

  class Dev:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"
  assert budget._estimated_total(Dev()) == int(80 * GiB * 0.75)
  Dev.device_kind = "NVIDIA H200"
  assert budget._estimated_total(Dev()) == int(141 * 10**9 * 0.75)
  Dev.device_kind = "NVIDIA GH200 480GB"
  assert budget._estimated_total(Dev()) == int(480 * GiB * 0.75)


@pytest.mark.parametrize("kw, match", [
    (dict(mem_fraction_static=1.5), "mem_fraction_static"),
    (dict(free_fraction=0.0), "free_fraction"),
    (dict(total_fraction="x"), "total_fraction"),
    (dict(host_budget_bytes=0), "host_budget_bytes"),
    (dict(device_total_bytes=1.5), "device_total_bytes"),
])
def test_configure_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    budget.configure(**kw)


def test_bad_device_argument():
  with pytest.raises(ValueError, match="device must be a jax.Device"):
    budget.prime("cpu:0")


@pytest.mark.gpu
def test_gpu_query_reads_pool_and_primes():
  dev = jax.devices()[0]
  mem = budget.query_device_memory(dev)
  assert mem is not None and 0 < mem[0] <= mem[1]
  b = budget.prime(dev)
  assert 1 <= b <= 0.3 * mem[1] + 1
