# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The memory budget, chunk plans and `jit`
#
# In a prefill, the indexer scores every new token against every key of its request: a
# `[T, S]` float32 logits tensor before the top-k reduces it to `[T, 2048]`. That tensor gets
# big fast. sglang (PR #25299) bounds it by a **budget** derived from device memory and, when
# the logits would not fit, computes them a **chunk** of queries at a time, taking each chunk's
# top-k before the next one.
#
# In JAX there is one more constraint: chunk sizes are array *shapes*, and shapes must be known
# when `jax.jit` traces. So the budget has to be a plain Python int before tracing, read from a
# cache, never queried per call. This notebook shows:
#
# 1. how the budget is computed from device memory (`nsa_jax.budget`), and that it is measured
#    once and cached;
# 2. what happens when a function is traced under `jit` before the cache is filled;
# 3. the chunk plans (`nsa_jax.plan_chunks`) across sequence lengths;
# 4. how many times `prefill_topk` compiles over a sweep of ragged batches (once per bucket).
#
# Everything runs on a CPU. A CPU has no device-memory statistics, so we **fake** the memory
# query with an H100-like reading; the code path is the one a GPU takes.

# %%
# %matplotlib inline
import pathlib
import sys
import warnings

try:
  import nsa_jax
except ImportError:  # not pip-installed: use the checkout this notebook lives in
  sys.path.insert(0, str(next(p for p in pathlib.Path.cwd().resolve().parents
                              if (p / "pyproject.toml").exists())))
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

import nsa_jax
from nsa_jax import budget

GiB = 2 ** 30
print("jax", jax.__version__, "| backend:", jax.default_backend(), "| device:", jax.devices()[0])

# %% [markdown]
# ## Why a budget
#
# One long prompt of `L` tokens needs `L x L x 4` bytes of logits (a bit under half of it is
# masked to `-inf` by causality, but the tensor is dense):

# %%
for L in (8_192, 32_768, 65_536, 131_072):
  print(f"L = {L:7,d}: logits {L * L * budget.BYTES_PER_LOGIT / GiB:6.1f} GiB")

# %% [markdown]
# An H100 has 80 GB, most of it already taken by weights and the KV cache. So the logits get a
# budget, and the queries are chunked to stay under it.
#
# ## The formulas
#
# From the contract (`docs/contract.md`, "The memory budget for prefill logits"), with sglang's constants:
#
# - **static budget** = `min(free_fraction * total * (1 - mem_fraction_static), total_fraction * total)`,
#   or just `total_fraction * total` when `mem_fraction_static` is unset;
# - **measured budget** = `min(free_fraction * free_now, static budget)`;
#
# with `free_fraction = 0.5` (configurable, later sglang uses 0.2), `total_fraction = 0.3`, and
# `mem_fraction_static` the share of memory the server reserved for weights and KV cache. Here
# `total` is what XLA may use: by default 75% of the card, 60 GiB on an 80 GiB H100.

# %%
total = 60 * GiB
free = np.linspace(0, total, 121)
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for mfs in (None, 0.5, 0.85):
  budget.configure(mem_fraction_static=mfs)
  b = [budget.measured_budget(int(f), total) for f in free]
  ax.plot(free / GiB, np.asarray(b) / GiB,
          label=f"mem_fraction_static = {mfs}  (static {budget.static_budget(total) / GiB:.1f} GiB)")
budget.configure(mem_fraction_static=None)
ax.set_xlabel("free device memory at measurement (GiB)")
ax.set_ylabel("logits budget (GiB)")
ax.set_title("Measured budget on a 60 GiB XLA pool (H100)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Measured once, then cached
#
# `nsa_jax.budget` asks the device for its memory in exactly one place,
# `budget.query_device_memory(device)`. In sglang a per-call `torch.cuda.mem_get_info` cost a
# host sync and 6-10% of prefill latency; here it happens once per device:
#
# - `budget.prime(device)` measures and caches (a server calls it at start-up, after loading
#   the weights);
# - `budget.budget_bytes(device)` returns the cached Python int (priming first if needed,
#   outside tracing);
# - `budget.reset()` forgets, `budget.configure(...)` changes the knobs (and forgets).
#
# To see it on a CPU, we replace the query with a fake H100 reading that counts its calls.

# %%
queries = []


def fake_query(device):
  """An H100 as XLA sees it: a 60 GiB pool with 40 GiB free."""
  queries.append(device)
  return 40 * GiB, 60 * GiB


real_query = budget.query_device_memory
budget.query_device_memory = fake_query      # restored at the end of the notebook
budget.configure(mem_fraction_static=0.85)   # a server that reserved 85% for weights + KV cache
budget.reset()

dev = jax.devices()[0]
print("cached before prime:", budget.cached_budget(dev))
b = budget.prime(dev)
print(f"prime -> {b / GiB:.2f} GiB, queries so far: {len(queries)}")
for _ in range(3):
  budget.budget_bytes(dev)
print(f"3 x budget_bytes -> {budget.budget_bytes(dev) / GiB:.2f} GiB, queries so far: {len(queries)}")
budget.reset()
print(f"after reset, budget_bytes measures again: {budget.budget_bytes(dev) / GiB:.2f} GiB, "
      f"queries so far: {len(queries)}")

# %% [markdown]
# ## A cold cache under `jit`
#
# `prefill_topk` reads the budget while it is being traced, to choose its chunk shapes. If
# nothing was primed, it must not query the device then (in sglang the equivalent is CUDA-graph
# capture, where a sync is not allowed; in JAX a value read at trace time would be baked into
# the compiled program anyway). Instead it uses the **static budget** computed from an estimate
# of the device's size, does not cache it, and warns once. On this CPU we tell it to assume a
# 60 GiB device (`configure(device_total_bytes=...)`); on a GPU it reads the size from the
# device kind.

# %%
rng = np.random.default_rng(0)


def problem(T, S, H=2, D=128, ks=None, ke=None):
  """Random fp8 inputs of a causal prefill, placed with device_put (no per-shape compiles)."""
  ks = np.zeros(T, np.int32) if ks is None else ks
  ke = (np.arange(T, dtype=np.int32) + S - T + 1) if ke is None else ke
  host = (rng.standard_normal((T, H, D)).astype(ml_dtypes.float8_e4m3fn),
          rng.standard_normal((S, D)).astype(ml_dtypes.float8_e4m3fn),
          rng.uniform(0.5, 1.5, S).astype(np.float32),
          rng.standard_normal((T, H)).astype(np.float32), ks, ke)
  return tuple(jax.device_put(x) for x in host)


budget.configure(mem_fraction_static=0.85, device_total_bytes=60 * GiB)   # also clears the cache
args = problem(64, 128)
step = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=16))
n_before = len(queries)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  step(*args).block_until_ready()
for w in caught:
  print(f"{w.category.__name__}: {w.message}")
print("queries while tracing:", len(queries) - n_before, "| cached afterwards:",
      budget.cached_budget(dev))

# %% [markdown]
# The static budget assumes no memory is in use beyond the reserved share. It can be larger than
# what a measurement would have given, so a cold trace may plan bigger chunks than intended.
# For a 64K-token prompt:

# %%
T = S = 65_536
cold = nsa_jax.plan_chunks(T, S, budget.static_budget(60 * GiB))
budget.configure(mem_fraction_static=0.85, device_total_bytes=60 * GiB)
def busy_query(device):
  """The same card with only 6 GiB free (a busy server)."""
  queries.append(device)
  return 6 * GiB, 60 * GiB


budget.query_device_memory = busy_query
warm = nsa_jax.plan_chunks(T, S, budget.prime(dev))
budget.query_device_memory = fake_query
for name, p in [("cold trace (static budget)", cold), ("primed, 6 GiB free", warm)]:
  print(f"{name:27s} budget {p.budget_bytes / GiB:5.2f} GiB -> {p.num_chunks:3d} chunks of "
        f"{p.rows:5d} rows, {p.chunk_logits_bytes / GiB:.2f} GiB of logits per chunk")
print("\nThe fix: call nsa_jax.budget.prime() (or nsa_jax.prime_mesh(mesh)) before jax.jit traces.")
budget.configure(device_total_bytes=None)

# %% [markdown]
# ## Chunk plans across sequence lengths
#
# `nsa_jax.plan_chunks(num_q, num_k, budget)` is a pure host function returning a frozen,
# hashable `ChunkPlan`:
#
# - unchunked when the logits fit the budget, or when there are fewer than 8M of them
#   (sglang's threshold: below it chunking costs more than it saves);
# - otherwise `rows` = the largest **power of two** `<= budget // (num_k * 4)`, and
#   `num_chunks = ceil(num_q / rows)`. Powers of two keep the number of distinct plans, and so
#   of compiled programs, small.
#
# Below: one causal prompt of `L` tokens (`num_q = num_k = L`) under three budgets.

# %%
lengths = np.unique(np.logspace(np.log10(2_048), np.log10(163_840), 60).astype(int))
budgets = {"1 GiB": 1 * GiB, "4.5 GiB (H100, mfs 0.85)": int(4.5 * GiB), "18 GiB (0.3 x 60)": 18 * GiB}
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for label, bb in budgets.items():
  plans = [nsa_jax.plan_chunks(int(L), int(L), bb) for L in lengths]
  axes[0].loglog(lengths, [p.rows for p in plans], ".-", label=label)
  axes[1].loglog(lengths, [p.num_chunks for p in plans], ".-", label=label)
  axes[2].loglog(lengths, [p.chunk_logits_bytes / GiB for p in plans], ".-", label=label)
axes[2].loglog(lengths, lengths.astype(float) ** 2 * 4 / GiB, "k--", lw=1, label="unchunked logits")
for a, t in zip(axes, ["query rows per chunk", "number of chunks", "logits held at once (GiB)"]):
  a.set_title(t)
  a.set_xlabel("prompt length L (num_q = num_k)")
  a.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The rows per chunk fall in powers of two as `L` grows, and the memory held at once stays under
# the budget (the sawtooth on the right) while the unchunked tensor grows as `L²`.
#
# Inside `prefill_topk` the plan drives a `lax.scan` over the chunks. The last chunk is shifted
# back to end at row `T` rather than padding q, so a few rows are computed twice, identically.
# The result does not depend on the plan:

# %%
from nsa_jax.prefill import chunked_topk   # prefill_topk's body, for a given plan

args = problem(300, 500, H=4)
# skip_elements=0: plan even below sglang's 8M-logit threshold, so that toy sizes get chunked.
plans = [nsa_jax.plan_chunks(300, 500, bb, skip_elements=0)
         for bb in (1 << 40, 100 * 500 * 4, 7 * 500 * 4)]
outs = [chunked_topk(*args, plan=p, k=32, backend="xla") for p in plans]
for p, o in zip(plans, outs):
  print(f"budget {p.budget_bytes:>14,d} B -> {p.num_chunks:2d} chunk(s) of {p.rows:3d} rows; "
        f"same indices as unchunked: {bool((o == outs[0]).all())}")

# %% [markdown]
# ## Compiles per bucket
#
# A server sees every prompt length. If each length were a new shape, `jit` would compile for
# each one. `nsa_jax.build_ragged_batch` pads the packed token axis (`T`) and key axis (`S`) to
# **buckets**, powers of two from 16 up by default, so a new length compiles only when its batch
# lands in a `(T_pad, S_pad)` bucket not seen before. And because the plan depends only on
# those shapes and the cached budget, the plan cannot add compiles of its own.
#
# We count XLA compiles with a `jax.monitoring` listener over 60 random ragged batches (1-3
# requests, up to 200 new tokens onto prefixes of up to 300), with a small budget so that the
# larger buckets are chunked.

# %%
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
compiles = []


def on_event(name, secs, **kw):
  if name == COMPILE_EVENT:
    compiles.append(secs)


jax.monitoring.register_event_duration_secs_listener(on_event)

budget.configure(mem_fraction_static=None)


def tiny_query(device):
  """A device with 512 KiB free: a budget of 256 KiB, so that toy-sized batches get chunked."""
  queries.append(device)
  return 2 * 64 * 512 * 4, 60 * GiB


budget.query_device_memory = tiny_query
budget.reset()
budget.prime(dev)                               # one query, before anything is traced
queries_at_start = len(queries)
saved_skip, budget.SKIP_CHUNK_ELEMENTS = budget.SKIP_CHUNK_ELEMENTS, 0   # toy sizes: chunk them
print(f"budget {budget.budget_bytes(dev):,d} bytes")

sweep_rng = np.random.default_rng(1)
log = []
try:
  for call in range(60):
    n = int(sweep_rng.integers(1, 4))
    ext, pre = sweep_rng.integers(1, 200, n), sweep_rng.integers(0, 300, n)
    b = nsa_jax.build_ragged_batch(ext, pre)
    before = len(compiles)
    out = nsa_jax.prefill_topk(*problem(b.T_pad, b.S_pad, ks=b.ks, ke=b.ke), k=16)
    assert (np.asarray(out)[~b.token_mask] == -1).all()   # padding rows select nothing
    plan = nsa_jax.plan_chunks(b.T_pad, b.S_pad, budget.budget_bytes(dev))
    log.append(dict(T=b.num_tokens, S=b.num_keys, T_pad=b.T_pad, S_pad=b.S_pad,
                    chunks=plan.num_chunks, new_compiles=len(compiles) - before))
finally:
  budget.SKIP_CHUNK_ELEMENTS = saved_skip
  jax.monitoring.unregister_event_duration_listener(on_event)

lengths_seen = len({(r["T"], r["S"]) for r in log})
buckets_seen = {(r["T_pad"], r["S_pad"]): r["chunks"] for r in log}
print(f"{len(log)} calls, {lengths_seen} distinct (T, S) sizes, {len(buckets_seen)} buckets, "
      f"{sum(r['new_compiles'] for r in log)} compiles, "
      f"{len(queries) - queries_at_start} memory queries after the prime")
print("bucket (T_pad, S_pad) -> chunks:", dict(sorted(buckets_seen.items())))

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
calls = np.arange(1, len(log) + 1)
ax.plot(calls, calls, "k:", lw=1, label="one compile per new length (no buckets)")
ax.plot(calls, np.cumsum([r["new_compiles"] for r in log]), ".-", label="XLA compiles (measured)")
seen, distinct = set(), []
for r in log:
  seen.add((r["T_pad"], r["S_pad"]))
  distinct.append(len(seen))
ax.plot(calls, distinct, "--", label="distinct buckets so far")
ax.set_xlabel("prefill call")
ax.set_ylabel("cumulative count")
ax.set_title("prefill_topk over random ragged batches")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Compiles track the number of distinct buckets, not the number of distinct lengths, and the
# memory was queried once. Padding rows (`ks = ke = 0`) select nothing (`-1`), so bucketing does
# not change the result of the real rows.
#
# In the `Indexer` module (notebook 01) the same holds for a whole layer step:
# `IndexerSteps.cache_sizes()` reports the compiled programs per step.

# %%
budget.query_device_memory = real_query
budget.configure(mem_fraction_static=None, device_total_bytes=None)   # defaults, empty cache
print("restored:", budget.query_device_memory is real_query, "| cache:", budget.cached_budget(dev))
