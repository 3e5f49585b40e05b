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
# # 01 · The lightning indexer, step by step
#
# DeepSeek-V3.2 replaces dense attention with **DeepSeek Sparse Attention (DSA)**: each query
# token attends to only `index_topk = 2048` earlier tokens instead of all of them. Which 2048?
# A small, cheap scorer called the **lightning indexer** decides. For every query `i` and every
# earlier key `j` it computes
#
# $$\text{logits}[i, j] \;=\; \text{k\_scale}[j] \sum_{h=1}^{H} w[i, h]\;\mathrm{relu}\big(q_\text{fp8}[i, h] \cdot k_\text{fp8}[j]\big)$$
#
# a multi-query attention score (H query heads share one key per token) with a ReLU instead of a
# softmax and learned per-token head weights `w`, computed in fp8. It then keeps the top-k keys
# per query. The main attention reads only those.
#
# This notebook walks through the contract (`docs/contract.md`, "The forward of one layer") on a problem
# small enough for a CPU, then runs the same thing through the `Indexer` Flax NNX module and
# draws which keys each query keeps compared with full causal attention.
#
# Sizes here are toy-sized (`dim` 256, `q_lora_rank` 128, 16 heads, top-32);
# DeepSeek-V3.2 uses `dim` 7168, `q_lora_rank` 1536, 64 heads of 128 and top-2048.
# Everything runs on the `xla` backend (plain jitted JAX), which is also what a CPU uses; on a
# Hopper GPU `backend="auto"` would pick the Pallas kernels for the same math.

# %%
# %matplotlib inline
import pathlib
import sys

try:
  import nsa_jax
except ImportError:  # not pip-installed: use the checkout this notebook lives in
  sys.path.insert(0, str(next(p for p in pathlib.Path.cwd().resolve().parents
                              if (p / "pyproject.toml").exists())))
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib.colors import ListedColormap

import nsa_jax
from nsa_jax.indexer import (Indexer, IndexerConfig, IndexerSteps, allocate_block_tables,
                             decode_inputs, prefill_inputs)
from nsa_jax.rope import RopeConfig, inv_frequencies

print("jax", jax.__version__, "| backend:", jax.default_backend(), "| nsa_jax", nsa_jax.__version__)

# %% [markdown]
# ## A small layer and a ragged batch
#
# `IndexerConfig` holds the shapes and numerics; its defaults are DeepSeek-V3.2's. We shrink the
# widths but keep everything else (head dim 128, 64 rope dims with YaRN, `ue8m0` fp8 scales,
# the Hadamard rotation). The layer's weights are random, so *which* keys win below is arbitrary;
# the structure (masks, counts, shapes) is what matters.

# %%
cfg = IndexerConfig(dim=256, q_lora_rank=128, n_heads=16, head_dim=128, topk=32)
H, D, TOPK = cfg.n_heads, cfg.head_dim, cfg.topk
module = Indexer(cfg, rngs=nnx.Rngs(0))
print(cfg)
print("parameters:", jax.tree.map(lambda a: (a.shape, str(a.dtype)), nnx.to_pure_dict(nnx.state(module))))

# %% [markdown]
# Serving packs many requests into one **ragged batch**: the new tokens of all requests along
# one token axis `T`, and every request's full sequence (tokens already in the cache, the
# *prefix*, then the new ones) along one key axis `S`. Each query `i` sees the half-open key
# range `[ks[i], ke[i])`: from the start of its request to itself (causal).
#
# `nsa_jax.build_ragged_batch` computes the packing on the host. The spec's own example: two
# requests extending by 3 and 2 tokens onto prefixes of 7 and 2 tokens:

# %%
example = nsa_jax.build_ragged_batch([3, 2], [7, 2])
print("ks =", example.ks[:example.num_tokens].tolist())
print("ke =", example.ke[:example.num_tokens].tolist())
print(f"padded to T_pad={example.T_pad}, S_pad={example.S_pad} (buckets, so that jit compiles "
      "once per bucket rather than once per length)")

# %% [markdown]
# Our batch: three requests. The first two are fresh prompts (96 and 160 new tokens); the third
# already has 80 tokens in the cache and extends by 48. We draw hidden states `x` and query
# low-rank activations `qr` for *every* token of every sequence (the prefix tokens need `x` for
# their keys).

# %%
extend, prefix = [96, 160, 48], [0, 0, 80]
batch = nsa_jax.build_ragged_batch(extend, prefix)
T, S = batch.num_tokens, batch.num_keys
print(f"T = {T} new tokens, S = {S} keys; padded to {batch.T_pad} x {batch.S_pad}")

rng = np.random.default_rng(0)
x_all = jnp.asarray(rng.standard_normal((S, cfg.dim)), jnp.bfloat16)          # every token
qr_all = jnp.asarray(rng.standard_normal((S, cfg.q_lora_rank)), jnp.bfloat16)
new_rows = batch.token_slots[:T]             # where each new token sits on the key axis
x_new, qr_new = x_all[new_rows], qr_all[new_rows]
pos_new = jnp.asarray(batch.positions[:T])   # position of each new token within its request
pos_key = jnp.asarray(batch.key_positions[:S])
ks, ke = jnp.asarray(batch.ks[:T]), jnp.asarray(batch.ke[:T])

# %% [markdown]
# ## Step 1 · projections
#
# `q = wq_b(qr)` gives H heads of D per token; `k = LayerNorm(wk(x))` gives **one** key of D
# per token, shared by all heads (that is the "MQA" in `mqa_logits`). The LayerNorm runs in
# float32, then the key goes back to bf16, as DeepSeek's reference code does.

# %%
bf16, f32 = jnp.bfloat16, jnp.float32
q = module.wq_b(qr_new.astype(bf16)).reshape(T, H, D)
k = module.k_norm(module.wk(x_all.astype(bf16)).astype(f32)).astype(bf16)
print("q", q.shape, q.dtype, "| k", k.shape, k.dtype)

# %% [markdown]
# ## Step 2 · rotary position embedding (NeoX style, YaRN)
#
# The first 64 of the 128 features of each q head and of each k are rotated by an angle
# proportional to the token's position; the other 64 pass through. "NeoX style" means feature
# `f` is paired with feature `f + 32` (half split), not with its neighbour. Because both sides
# are rotated, `q(m) . k(n)` depends only on the distance `m - n`:

# %%
v1 = jnp.asarray(rng.standard_normal((1, D)), f32)
v2 = jnp.asarray(rng.standard_normal((1, D)), f32)
rot = lambda v, p: nsa_jax.apply_rope(v, jnp.asarray([p], jnp.int32), cfg.rope)
for m_, n_ in [(10, 3), (1007, 1000), (3, 10)]:
  print(f"m={m_:5d} n={n_:5d}  m-n={m_ - n_:4d}  q.k = {float(rot(v1, m_)[0] @ rot(v2, n_)[0]):+.5f}")

# %% [markdown]
# V3.2 was trained at 4K context and extended to 160K with **YaRN**: the slow-rotating pairs
# (whose period exceeds the original context) are slowed down further by `rope_factor = 40`,
# the fast ones are kept, with a linear ramp between them.

# %%
plain = inv_frequencies(RopeConfig(factor=1.0))
yarn = inv_frequencies(cfg.rope)
fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(plain, "o-", ms=3, label="plain rope (theta = 10000)")
ax.semilogy(yarn, "o-", ms=3, label="YaRN, factor 40 (V3.2)")
ax.set_xlabel("rotation pair (feature f with f + 32)")
ax.set_ylabel("radians per position")
ax.set_title("Rope frequencies of the 32 rotated pairs")
ax.legend()
plt.show()

q = nsa_jax.apply_rope(q, pos_new, cfg.rope)
k = nsa_jax.apply_rope(k, pos_key, cfg.rope)

# %% [markdown]
# ## Step 3 · Hadamard rotation
#
# Next, q and k are multiplied by an orthonormal Hadamard matrix (entries ±1/√128). Orthonormal
# means dot products do not change, so the *exact* logits are the same; only fp8 rounding
# changes. Activations of trained models often have a few *outlier features*, much larger than
# the rest in every token. A dot product of two such vectors is then dominated by one product
# of two rounded numbers, and its relative error is that of a single fp8 rounding (a few %).
# After the rotation every feature carries a share of the outlier, the 128 rounding errors are
# independent and largely cancel in the sum. Below, q and k share one outlier feature, 40x the
# others:

# %%
def dot_error(a, b):
  """Relative error of all dot products a @ b.T after fp8 quantization of a and b."""
  a8, sa = nsa_jax.act_quant(a, D, cfg.scale_fmt)
  b8, sb = nsa_jax.act_quant(b, D, cfg.scale_fmt)
  approx = nsa_jax.dequant(a8, sa, D) @ nsa_jax.dequant(b8, sb, D).T
  return float(jnp.linalg.norm(approx - a @ b.T) / jnp.linalg.norm(a @ b.T))


spiky_q = jnp.asarray(rng.standard_normal((256, D)), f32).at[:, 5].mul(40.0)
spiky_k = jnp.asarray(rng.standard_normal((256, D)), f32).at[:, 5].mul(40.0)
rq, rk = nsa_jax.hadamard_rotate(spiky_q), nsa_jax.hadamard_rotate(spiky_k)
print(f"fp8 error of q.k, as is:            {dot_error(spiky_q, spiky_k):.4f}")
print(f"fp8 error of q.k, Hadamard-rotated: {dot_error(rq, rk):.4f}")
print("exact dot products unchanged by the rotation, max relative difference:",
      f"{float(jnp.max(jnp.abs(rq @ rk.T - spiky_q @ spiky_k.T)) / jnp.max(jnp.abs(spiky_q @ spiky_k.T))):.1e}")

if cfg.use_hadamard:
  q, k = nsa_jax.hadamard_rotate(q), nsa_jax.hadamard_rotate(k)

# %% [markdown]
# ## Step 4 · fp8 quantization (`act_quant`)
#
# `act_quant` splits the last axis into blocks of 128 (here: one block per head), sets
# `scale = amax / 448` (448 is the largest float8 e4m3fn value) and stores `x / scale` in fp8.
# With `scale_fmt="ue8m0"`, as V3.2 runs, the scale is rounded **up** to a power of two so it
# fits an 8-bit exponent. q gets one scale per (token, head); k one per token. The fp8 keys and
# their scales are what goes into the paged K cache.

# %%
q8, q_scale = nsa_jax.act_quant(q, D, cfg.scale_fmt)       # [T, H, D] fp8, [T, H, 1] f32
k8, k_scale = nsa_jax.act_quant(k, D, cfg.scale_fmt)       # [S, D] fp8,    [S, 1] f32
k_scale = k_scale[:, 0]
print("q8", q8.shape, q8.dtype, "| q_scale", q_scale.shape, "| k8", k8.shape, "| k_scale", k_scale.shape)
print("k scales are powers of two:", bool(jnp.all(jnp.log2(k_scale) == jnp.round(jnp.log2(k_scale)))))
print("fp8 relative error on k:",
      float(jnp.linalg.norm(nsa_jax.dequant(k8, k_scale[:, None], D) - k.astype(f32))
            / jnp.linalg.norm(k.astype(f32))))

# %% [markdown]
# ## Step 5 · head weights, with the q scales folded in
#
# `weights_proj` (float32, never fp8) gives one weight per token and head. It is multiplied by
# `H**-0.5` and by the softmax-style `D**-0.5`, and — the trick that lets the kernel work on raw
# fp8 — by `q_scale`. This is legal because scales are positive and
# `relu(s * a) = s * relu(a)` for `s > 0`: the q scale can leave the ReLU and join `w`. The k
# scale leaves the same way and multiplies the whole sum (it does not depend on the head).

# %%
w = module.weights_proj(x_new.astype(f32)) * H ** -0.5 * q_scale[..., 0] * D ** -0.5     # [T, H]

# Check the folding on a few queries: the fp8 form against the de-quantized inputs.
i_, j_ = slice(0, 4), slice(0, 40)
raw_w = module.weights_proj(x_new[i_].astype(f32)) * H ** -0.5 * D ** -0.5
q_deq = nsa_jax.dequant(q8[i_], q_scale[i_], D)
k_deq = nsa_jax.dequant(k8[j_], k_scale[j_, None], D)
unfolded = jnp.einsum("th,ths->ts", raw_w, jax.nn.relu(jnp.einsum("thd,sd->ths", q_deq, k_deq)))
folded = k_scale[j_] * jnp.einsum(
    "th,ths->ts", w[i_], jax.nn.relu(jnp.einsum("thd,sd->ths", q8[i_].astype(f32), k8[j_].astype(f32))))
print("max |folded - unfolded| / max |unfolded| =",
      float(jnp.max(jnp.abs(folded - unfolded)) / jnp.max(jnp.abs(unfolded))))

# %% [markdown]
# ## Step 6 · logits over the ragged batch (`mqa_logits`)
#
# `nsa_jax.mqa_logits` has DeepGEMM's `fp8_mqa_logits` interface. With `clean_logits=True`
# (the default) every key outside a query's `[ks, ke)` is exactly `-inf`, so the top-k can never
# pick it. The picture of which entries are finite is the ragged causal mask: a lower triangle
# per request, and for the third request a full block on its left for the 80 cached prefix keys.

# %%
logits = nsa_jax.mqa_logits(q8, k8, k_scale, w, ks, ke, backend="xla")
print("logits", logits.shape, logits.dtype)
valid = np.asarray(jnp.isfinite(logits))
j = np.arange(S)
assert (valid == ((j >= np.asarray(ks)[:, None]) & (j < np.asarray(ke)[:, None]))).all()
print("finite exactly on [ks, ke):", True)

fig, ax = plt.subplots(figsize=(5, 4))
ax.imshow(valid, cmap="Greys", interpolation="nearest", aspect="auto")
ax.set_xlabel("key j (packed key axis)")
ax.set_ylabel("query i (packed token axis)")
ax.set_title("finite logits (black): the -inf pattern of a ragged batch")
plt.show()

# %% [markdown]
# How close is the fp8 pipeline to exact math? The spec's measure (DeepGEMM's) is
# `1 - 2 Σxy / Σ(x² + y²)` with `-inf` set to 0 on both sides; it must stay below `1e-3`
# against float32 logits computed from the un-quantized bf16 q and k.

# %%
w_exact = module.weights_proj(x_new.astype(f32)) * H ** -0.5 * D ** -0.5
# mqa_logits takes fp8 only; the float32 oracle it is tested against lives in nsa_jax.reference.
exact = nsa_jax.reference.mqa_logits(q.astype(f32), k.astype(f32), jnp.ones((S,), f32), w_exact,
                                     ks, ke)


def spec_diff(x, y):
  x, y = (np.where(np.isfinite(a), a, 0.0).astype(np.float64) for a in (np.asarray(x), np.asarray(y)))
  return float(1 - 2 * np.sum(x * y) / np.sum(x * x + y * y))


print(f"diff(fp8 logits, exact float32 logits) = {spec_diff(logits, exact):.2e}  (spec: < 1e-3)")

# %% [markdown]
# ## Step 7 · top-k (`topk_indices`)
#
# For each query, the indices of its `k` largest logits among its valid keys; `-1` fills the
# slots when a query has fewer than `k` valid keys (the first 31 tokens of a fresh prompt,
# here). The xla backend returns them by descending logit; ties go to the lower key index.

# %%
idx = nsa_jax.topk_indices(logits, ks, ke, k=TOPK, backend="xla")        # int32 [T, TOPK]
n_sel = np.asarray((idx >= 0).sum(1))
print("idx", idx.shape, idx.dtype)
print("query 0 (sees 1 key):   ", np.asarray(idx[0, :6]).tolist(), "...")
print("query 5 (sees 6 keys):  ", np.asarray(idx[5, :8]).tolist(), "...")
print("query 95 (sees 96 keys):", np.asarray(idx[95, :8]).tolist(), "...")
print("queries with fewer than", TOPK, "valid keys:", int((n_sel < TOPK).sum()))

# The same selection from a plain numpy sort, as a check.
lg = np.asarray(logits)
for i in range(0, T, 7):
  lo, hi = int(ks[i]), int(ke[i])
  want = set((lo + np.argsort(-lg[i, lo:hi], kind="stable")[:TOPK]).tolist())
  assert set(np.asarray(idx[i])[np.asarray(idx[i]) >= 0].tolist()) == want
print("matches numpy's argsort on every 7th query")

# %% [markdown]
# ## Which keys does each query read?
#
# Full causal attention reads every valid key (left). DSA reads only the indexer's top-k
# (right): at most 32 per query here, 2048 in V3.2. Short queries keep everything they see;
# from the 33rd token of a request on, the fraction read falls as `32 / (position + 1)`.
# With V3.2's 2048 out of, say, 128K keys, that fraction is 1.6%.

# %%
selected = np.zeros((T, S), bool)
rows = np.repeat(np.arange(T), TOPK)
cols = np.asarray(idx).reshape(-1)
selected[rows[cols >= 0], cols[cols >= 0]] = True
assert not (selected & ~valid).any()   # never outside the causal range

# 0: not visible (white), 1: visible but not selected (light gray), 2-4: selected, by request.
request_of_key = batch.key_request[:S]
colored = np.where(selected, request_of_key[None, :] + 2, np.where(valid, 1, 0))
cmap = ListedColormap(["white", "#dddddd", "tab:blue", "tab:orange", "tab:green"])

fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw=dict(width_ratios=[1, 1, 0.9]))
axes[0].imshow(valid, cmap=ListedColormap(["white", "dimgray"]), interpolation="nearest",
               aspect="auto")
axes[0].set_title(f"full causal attention: {valid.sum():,} pairs")
axes[1].imshow(colored, cmap=cmap, vmin=0, vmax=4, interpolation="nearest", aspect="auto")
axes[1].set_title(f"indexer top-{TOPK}: {selected.sum():,} pairs "
                  f"({100 * selected.sum() / valid.sum():.0f}%)")
for a in axes[:2]:
  a.set_xlabel("key j")
  a.set_ylabel("query i")
frac = n_sel / valid.sum(1)
axes[2].plot(frac, lw=1)
axes[2].set_xlabel("query i")
axes[2].set_ylabel("share of its valid keys kept")
axes[2].set_title("kept / visible, per query")
axes[2].set_ylim(0, 1.05)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The `Indexer` module end to end
#
# Everything above is what `Indexer.prefill` does, plus the bookkeeping of a server:
#
# - keys live in a **paged cache** (`IndexKCache`: pages of 64 tokens, fp8 keys + float32
#   scales, byte-compatible with sglang/DeepGEMM); each request owns a list of pages, its
#   *block table*;
# - the host turns lengths and block tables into bucket-padded int32 arrays
#   (`prefill_inputs`, `decode_inputs`), so that inside `jit` only shapes matter;
# - `IndexerSteps` jits the prefill and decode steps once per bucket and donates the cache.
#
# First, a prefill of the 80 prefix tokens of request 3 (think: an earlier chunk of its prompt),
# then the batch from above, then one decode step. The results come back as key indices
# (`output="keys"`), token positions, or physical cache slots (`output="slots"`, what the
# sparse attention reads).

# %%
capacity = [e + p + 1 for e, p in zip(extend, prefix)]     # room for one decode token each
tables, num_pages = allocate_block_tables(capacity, seed=0)  # pages scattered over the cache
cache = nsa_jax.IndexKCache.create(num_pages, D)
steps = IndexerSteps(module, backend="xla")
print("block tables (page ids per request, -1 = unused):\n", tables)


def rows_of(b, arr):
  """Bucket-padded [b.T_pad, ...] rows of `arr` for the new tokens of batch b. `arr` holds
  every token along the full key axis of `batch` above (request starts: batch.key_starts)."""
  out = np.zeros((b.T_pad,) + arr.shape[1:], arr.dtype)
  real = b.token_request >= 0
  out[real] = np.asarray(arr)[batch.key_starts[b.token_request[real]] + b.positions[real]]
  return jnp.asarray(out)


# 1) the cached prefix of request 3
pre_batch = nsa_jax.build_ragged_batch([0, 0, prefix[2]], [0, 0, 0])
_, cache = steps.prefill(rows_of(pre_batch, x_all), rows_of(pre_batch, qr_all),
                         prefill_inputs(pre_batch, tables, num_pages=num_pages), cache)
# 2) the ragged batch of the walkthrough
inputs = prefill_inputs(batch, tables, num_pages=num_pages)
idx_mod, cache = steps.prefill(rows_of(batch, x_all), rows_of(batch, qr_all), inputs, cache,
                               output="keys")
idx_mod = np.asarray(idx_mod)[:T]
same = np.mean([set(a[a >= 0]) == set(b[b >= 0]) for a, b in zip(idx_mod, np.asarray(idx))])
print(f"module vs step-by-step: identical top-{TOPK} sets for {100 * same:.1f}% of queries")

# %% [markdown]
# The two agree (a rare difference would come from bf16 rounding in a different order under
# `jit`, moving a logit across a near-tie). The same selection as physical cache slots, which
# is what sparse attention gathers from:

# %%
# Re-running the step rewrites the same keys into the cache (the cache is donated: always
# continue with the returned one).
slots, cache = steps.prefill(rows_of(batch, x_all), rows_of(batch, qr_all), inputs, cache,
                             output="slots")
i = T - 1
print(f"last token of request 3: keys {idx_mod[i][:6].tolist()} ...\n"
      f"                   -> cache slots {np.asarray(slots)[i][:6].tolist()} ...\n"
      f"(page = slot // 64; request 3's pages are {tables[2][tables[2] >= 0].tolist()})")

# %% [markdown]
# A decode step: one new token per request. `context_lens` counts the new token too; each new
# token sees its whole request (its own key included) and nothing else.

# %%
total = np.asarray(extend) + np.asarray(prefix)
dec = decode_inputs(total + 1, tables, num_pages=num_pages)
B_pad = dec.context_lens.shape[0]
x_dec = jnp.asarray(rng.standard_normal((B_pad, cfg.dim)), jnp.bfloat16)
qr_dec = jnp.asarray(rng.standard_normal((B_pad, cfg.q_lora_rank)), jnp.bfloat16)
pos_dec, cache = steps.decode(x_dec, qr_dec, dec, cache, output="positions")
pos_dec = np.asarray(pos_dec)
for b in range(len(extend)):
  print(f"request {b}: context {total[b] + 1:3d} tokens, picks positions "
        f"{sorted(pos_dec[b][pos_dec[b] >= 0].tolist())[:10]} ... (max {pos_dec[b].max()})")
print("padding request (B_pad =", B_pad, "):", pos_dec[-1][:4].tolist(), "...")
# prefill: the prefix batch's bucket, the main batch's bucket, and that bucket again for the
# second `output` format (a static argument); decode: one bucket.
print("compiled programs per step:", steps.cache_sizes())

# %% [markdown]
# ## Summary
#
# | step | function | shapes (this notebook) |
# | --- | --- | --- |
# | projections | `wq_b`, `wk` + LayerNorm, `weights_proj` | q [T, H, D], k [S, D], w [T, H] |
# | rope (NeoX, YaRN) | `nsa_jax.apply_rope` | first 64 of 128 features |
# | Hadamard | `nsa_jax.hadamard_rotate` | exact logits unchanged, smaller fp8 error |
# | fp8 | `nsa_jax.act_quant` | one scale per (token, head) for q, per token for k |
# | head weights | q scale, `H**-0.5`, `D**-0.5` folded in | [T, H] float32 |
# | logits | `nsa_jax.mqa_logits` | [T, S] float32, -inf outside [ks, ke) |
# | top-k | `nsa_jax.topk_indices` | [T, k] int32, -1 padded |
# | all of it, with a paged cache | `Indexer.prefill` / `.decode`, `IndexerSteps` | |
#
# Next: `02_budget_and_chunking` (how `prefill_topk` keeps the [T, S] logits within a memory
# budget under `jit`) and `03_kernel_performance` (the Pallas kernels on an H100).
