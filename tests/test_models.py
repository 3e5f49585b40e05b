"""Beyond DeepSeek-V3.2: GLM-5 configs and checkpoints, IndexShare, top-512 / top-1024.

Every top-k here is checked against float64 logits of the same fp8 inputs (computed with numpy
from what the layer wrote to its cache), allowing only swaps between keys whose logits agree
to float32 rounding: the kernels and the xla backend sum in different orders.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from helpers import (assert_same_inf_pattern, calc_diff, paged_mqa_logits_np, paged_problem,
                     random_problem)
from nsa_jax import ops
from nsa_jax.config import MODELS, IndexerConfig, index_sources, indexer_layer_types
from nsa_jax.indexer import (Indexer, IndexerSteps, allocate_block_tables, decode_inputs,
                             prefill_inputs)
from nsa_jax.topk_slots import paged_topk_slots
from nsa_jax.weights import (HF_PREFIX, indexer_tensors, load_indexer, load_indexer_params,
                             load_indexers, read_header, save_checkpoint)

# The indexer fields of zai-org/GLM-5-FP8's config.json (plus what else it says that the
# parser must ignore).
GLM5_HF = {**MODELS["glm-5"], "architectures": ["GlmMoeDsaForCausalLM"], "head_dim": 64,
           "kv_lora_rank": 512, "qk_nope_head_dim": 192, "v_head_dim": 256,
           "rope_interleave": True, "num_attention_heads": 64,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                   "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}


def bf16(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def mqa_logits_np(q, k, k_scale, weights, ks, ke, rows=32):
  """float64 ragged logits [T, S], -inf outside [ks, ke): the helpers' oracle, computed a few
  rows at a time through matmul (large problems would not fit, or take minutes, at once)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  w, sc = np.asarray(weights, np.float64), np.asarray(k_scale, np.float64)
  T, H, D = q.shape
  out = np.empty((T, k.shape[0]))
  for a in range(0, T, rows):
    s = np.maximum(q[a:a + rows].reshape(-1, D) @ k.T, 0).reshape(-1, H, k.shape[0])
    out[a:a + rows] = np.einsum("ths,th->ts", s, w[a:a + rows], optimize=True) * sc
  j = np.arange(k.shape[0])
  valid = (j[None] >= np.asarray(ks)[:, None]) & (j[None] < np.asarray(ke)[:, None])
  return np.where(valid, out, -np.inf)


def assert_topk_close(result, logits, ks, ke, k, rel=1e-5):
  """``result`` [rows, k] is a top-k of ``logits`` (float64 [rows, S]) over [ks, ke) up to
  float32 rounding: it holds min(k, valid) distinct keys in range, -1 after them, every key
  above the k-th value by more than eps, and none below it by more than eps."""
  result, logits = np.asarray(result), np.asarray(logits, np.float64)
  for i in range(result.shape[0]):
    lo, hi = int(ks[i]), int(ke[i])
    n = min(k, max(hi - lo, 0))
    row = result[i]
    assert (row[n:] == -1).all(), f"row {i}: expected -1 after {n} entries"
    got = row[:n]
    assert len(set(got.tolist())) == n and ((got >= lo) & (got < hi)).all(), f"row {i}: {got}"
    if hi - lo <= k:
      continue
    vals = logits[i, lo:hi]
    thr = np.sort(vals)[::-1][k - 1]
    eps = rel * max(np.abs(vals).max(), 1e-30)
    must = set((np.flatnonzero(vals > thr + eps) + lo).tolist())
    assert must <= set(got.tolist()), f"row {i}: misses {sorted(must - set(got.tolist()))[:8]}"
    assert (logits[i, got] >= thr - eps).all(), f"row {i}: picked keys below the k-th logit"


# --------------------------------------------------------------------------- config

def test_glm5_config_json_builds_a_glm_indexer(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(GLM5_HF))
  cfg = IndexerConfig.from_hf_config(tmp_path)
  assert (cfg.dim, cfg.q_lora_rank, cfg.n_heads, cfg.head_dim, cfg.topk) == (6144, 2048, 32, 128,
                                                                              2048)
  assert cfg.rope_interleave and cfg.rope.interleave
  assert (cfg.rope_theta, cfg.rope_factor, cfg.max_position) == (1e6, 1.0, 202752)
  # GLM's configs name no scale format: sglang's and vLLM's indexers use ue8m0 for every model.
  assert cfg.scale_fmt == "ue8m0" and cfg.use_hadamard
  assert cfg == IndexerConfig.for_model("glm-5")
  assert IndexerConfig.for_model("deepseek-v3.2") == IndexerConfig()
  assert IndexerConfig.from_hf_config(tmp_path / "config.json", topk=512).topk == 512
  # Absent index fields take transformers' GlmMoeDsaConfig defaults.
  bare = {"model_type": "glm_moe_dsa", "rope_parameters": {"rope_theta": 8000000}}
  assert IndexerConfig.from_hf_config(bare) == cfg.replace(rope_theta=8e6, rope_interleave=False)


def test_rope_layouts_of_hf_configs():
  glm = dict(GLM5_HF, rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                       "original_max_position_embeddings": 32768,
                                       "beta_fast": 16, "beta_slow": 2})
  cfg = IndexerConfig.from_hf_config(glm)
  assert (cfg.rope_theta, cfg.rope_factor, cfg.original_max_position, cfg.beta_fast,
          cfg.beta_slow) == (5e5, 4.0, 32768, 16.0, 2.0)
  # transformers v5 writes V3.2's YaRN into rope_parameters as well.
  v32 = {k: v for k, v in MODELS["deepseek-v3.2"].items() if k not in ("rope_scaling",
                                                                       "rope_theta")}
  v32["rope_parameters"] = dict(MODELS["deepseek-v3.2"]["rope_scaling"], rope_type="deepseek_yarn",
                                rope_theta=10000.0)
  assert IndexerConfig.from_hf_config(v32) == IndexerConfig()
  no_theta = {k: v for k, v in GLM5_HF.items() if k != "rope_parameters"}
  with pytest.raises(ValueError, match="glm_moe_dsa config must give rope_parameters.rope_theta"):
    IndexerConfig.from_hf_config(no_theta)
  assert IndexerConfig.from_hf_config(dict(no_theta, rope_theta=1e6)) == cfg.replace(
      rope_theta=1e6, rope_factor=1.0, original_max_position=202752, beta_fast=32.0,
      beta_slow=1.0)
  with pytest.raises(ValueError, match="rope type must be"):
    IndexerConfig.from_hf_config(dict(GLM5_HF, rope_parameters={"rope_type": "llama3",
                                                                "rope_theta": 1e6}))


@pytest.mark.parametrize("model_type, match", [
    ("deepseek_v4", "model_type 'deepseek_v4' is not supported: DeepSeek-V4's indexer scores "
                    "compressed KV rows"),
    ("deepseek_v3", "model_type 'deepseek_v3' is not supported: DeepSeek-V3 has no indexer"),
    ("llama", r"model_type 'llama' is not supported; nsa_jax reads \['deepseek_v32', "
              r"'glm_moe_dsa'\]"),
])
def test_unsupported_model_types_are_named(model_type, match):
  with pytest.raises(ValueError, match=match):
    IndexerConfig.from_hf_config(dict(MODELS["deepseek-v3.2"], model_type=model_type))


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="cannot read a config.json"):
    IndexerConfig.from_hf_config(tmp_path)
  with pytest.raises(ValueError, match=r"for_model: name must be one of \['deepseek-v3.2', "
                                       r"'glm-5'\], got 'glm-6'"):
    IndexerConfig.for_model("glm-6")
  with pytest.raises(ValueError, match="rope_interleave must be a bool"):
    IndexerConfig(rope_interleave=1)


# --------------------------------------------------------------------------- IndexShare

def test_index_share_schedule():
  # GLM-5.2's fields: freq 4, offset 3 over 78 layers (+ an MTP layer by the same formula).
  hf = {"num_hidden_layers": 78, "index_topk_freq": 4, "index_skip_topk_offset": 3}
  types = indexer_layer_types(hf)
  full = [i for i, t in enumerate(types) if t == "full"]
  assert full == [0, 1, 2] + list(range(6, 78, 4)) and len(full) == 21
  src = index_sources(hf)
  assert src[:12] == (0, 1, 2, 2, 2, 2, 6, 6, 6, 6, 10, 10) and src[77] == 74
  assert indexer_layer_types(hf, num_layers=79)[78] == "full"
  # indexer_types wins over the formula, then the pattern; no fields: every layer computes.
  listed = ["full", "shared", "full", "shared"]
  assert indexer_layer_types(dict(hf, num_hidden_layers=4, indexer_types=listed)) == tuple(listed)
  assert index_sources({"num_hidden_layers": 4, "index_topk_pattern": "FSSF"}) == (0, 0, 0, 3)
  assert index_sources({"num_hidden_layers": 3, "index_topk_pattern": listed[:3]}) == (0, 0, 2)
  assert index_sources(MODELS["glm-5"]) == tuple(range(78))
  assert index_sources(["full", "shared", "shared"]) == (0, 0, 0)
  # transformers' defaults (freq 1, offset 2) make every layer full.
  assert set(indexer_layer_types({"num_hidden_layers": 9, "index_skip_topk_offset": 5})) == {"full"}


@pytest.mark.parametrize("hf, match", [
    ({"num_hidden_layers": 3, "indexer_types": ["shared", "full", "full"]}, "layer 0 must compute"),
    ({"num_hidden_layers": 3, "indexer_types": ["full", "dense", "full"]}, "'full' or 'shared'"),
    ({"num_hidden_layers": 3, "index_topk_pattern": "FXS"}, "index_topk_pattern must be"),
    ({"num_hidden_layers": 3, "index_topk_freq": 0}, "index_topk_freq must be an int >= 1"),
    ({}, "no num_hidden_layers"),
])
def test_index_share_schedule_errors(hf, match):
  with pytest.raises(ValueError, match=match):
    indexer_layer_types(hf)


SHARE_CFG = IndexerConfig(dim=256, q_lora_rank=128, n_heads=32, head_dim=128, topk=48,
                          rope_theta=1e6, rope_factor=1.0, original_max_position=202752,
                          max_position=202752, rope_interleave=True)


def _share_setup(rng):
  hf = {"num_hidden_layers": 7, "index_topk_freq": 3, "index_skip_topk_offset": 2}
  sources = index_sources(hf)
  assert sources == (0, 1, 1, 1, 4, 4, 4)
  indexers = {i: Indexer(SHARE_CFG, rngs=nnx.Rngs(10 + i)) for i in (0, 1, 4)}
  return sources, indexers


def test_index_share_steps_run_only_the_computing_layers():
  rng = np.random.default_rng(3)
  sources, indexers = _share_setup(rng)
  share = nsa_jax.IndexShareSteps(indexers, sources, backend="xla")
  assert share.computing == (0, 1, 4)
  ext, pre = [90, 60], [0, 0]
  tables, P = allocate_block_tables([e + 4 for e in ext], seed=1)
  caches = share.create_caches(P)
  assert sorted(caches) == [0, 1, 4]           # sharing layers keep no K cache
  batch = nsa_jax.build_ragged_batch(ext, pre, token_buckets=(256,), key_buckets=(256,))
  inp = prefill_inputs(batch, tables, num_pages=P)
  acts = {i: (bf16(rng, batch.T_pad, SHARE_CFG.dim), bf16(rng, batch.T_pad, SHARE_CFG.q_lora_rank))
          for i in share.computing}
  before = IndexerSteps.cache_sizes()["prefill"]
  out, caches = share.prefill_all(acts, inp, caches)
  # One program for the three computing layers (equal configs), none for the other four.
  assert IndexerSteps.cache_sizes()["prefill"] - before <= 1
  assert len(out) == 7
  for i, s in enumerate(sources):
    assert out[i] is out[s]                    # the source's array itself: nothing computed
  # Each computing layer equals that layer run on its own.
  for i in share.computing:
    ref, _ = IndexerSteps(indexers[i], backend="xla").prefill(
        *acts[i], inp, nsa_jax.IndexKCache.create(P, 128))
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(ref))
  assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))
  # Decode: the same schedule; each computing layer's cache got its own keys.
  d = decode_inputs([e + 1 for e in ext], tables, num_pages=P)
  rows = d.context_lens.shape[0]
  dacts = {i: (bf16(rng, rows, SHARE_CFG.dim), bf16(rng, rows, SHARE_CFG.q_lora_rank))
           for i in share.computing}
  dout, caches = share.decode_all(dacts, d, caches)
  assert [dout[i] is dout[s] for i, s in enumerate(sources)] == [True] * 7
  assert (np.asarray(dout[4])[:2] >= 0).sum(1).tolist() == [min(48, e + 1) for e in ext]
  k0, k4 = (np.asarray(caches[i].k_scale) for i in (0, 4))
  assert not np.array_equal(k0, k4)
  # Layer by layer, as a model calls it: a sharing layer needs its source's indices.
  idx1, caches = share.prefill(1, *acts[1], inp, caches)
  same, caches2 = share.prefill(3, None, None, inp, caches, reuse=idx1)
  assert same is idx1 and caches2 is caches
  with pytest.raises(ValueError, match="layer 1 computes its own indices; reuse must be None"):
    share.prefill(1, *acts[1], inp, caches, reuse=idx1)
  with pytest.raises(ValueError, match="layer 3 reuses layer 1's indices; pass them as reuse="):
    share.prefill(3, None, None, inp, caches)
  with pytest.raises(ValueError, match=r"layer must be an int in \[0, 7\)"):
    share.decode(7, None, None, d, caches)
  with pytest.raises(ValueError, match="no K cache for computing layer 4"):
    share.prefill(4, *acts[4], inp, {0: caches[0]})
  with pytest.raises(ValueError, match=r"missing \[4\]"):
    share.prefill_all({0: acts[0], 1: acts[1]}, inp, caches)


def test_index_share_steps_argument_errors():
  sources, indexers = _share_setup(np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"exactly the computing layers \(0, 1, 4\), got \[0, 1\]"):
    nsa_jax.IndexShareSteps({0: indexers[0], 1: indexers[1]}, sources)
  with pytest.raises(ValueError, match="sources must name"):
    nsa_jax.IndexShareSteps(indexers, (0, 2, 1, 1, 4, 4, 4))


# --------------------------------------------------------------------------- checkpoints

def _glm_checkpoint(tmp_path, cfg, layers, hf_extra, fp8=True, block=128):
  """A GLM-5-style checkpoint: fp8 wq_b / wk with block scales, bf16 weights_proj and k_norm,
  indexer tensors only on the computing layers, other tensors around them."""
  hf = {**GLM5_HF, "hidden_size": cfg.dim, "q_lora_rank": cfg.q_lora_rank,
        "index_n_heads": cfg.n_heads, "index_topk": cfg.topk, "num_hidden_layers": layers,
        **hf_extra}
  if block != 128:
    hf["quantization_config"] = dict(hf["quantization_config"], weight_block_size=[block, block])
  sources = index_sources(hf)
  mods, tensors = {}, {}
  for i in range(layers):
    tensors[f"model.layers.{i}.self_attn.q_a_proj.weight"] = np.ones((4, 4), ml_dtypes.bfloat16)
    if sources[i] == i:
      m = Indexer(cfg, rngs=nnx.Rngs(i))
      rng = np.random.default_rng(i)
      # weights_proj is f32 in the module, bf16 on disk: make it bf16-exact (and k_norm too).
      m.weights_proj.kernel[...] = m.weights_proj.kernel[...].astype(jnp.bfloat16).astype(
          jnp.float32)
      m.k_norm.scale[...] = jnp.asarray(1 + 0.1 * rng.standard_normal(cfg.head_dim),
                                        jnp.bfloat16).astype(jnp.float32)
      m.k_norm.bias[...] = jnp.asarray(0.1 * rng.standard_normal(cfg.head_dim),
                                       jnp.bfloat16).astype(jnp.float32)
      mods[i] = m
      tensors.update(indexer_tensors(m, i, fp8=fp8, weight_block=block,
                                     norm_dtype=ml_dtypes.bfloat16))
  save_checkpoint(tmp_path, tensors, hf, shards=2)
  return hf, sources, mods, tensors


def _np_state(module):
  return jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32)),
                      nnx.to_pure_dict(nnx.state(module)))


def test_glm5_checkpoint_round_trips(tmp_path):
  cfg = IndexerConfig.for_model("glm-5", dim=320, q_lora_rank=256)
  hf, sources, mods, tensors = _glm_checkpoint(
      tmp_path, cfg, 6, {"index_topk_freq": 2, "index_skip_topk_offset": 2})
  assert sources == (0, 1, 1, 3, 3, 5)
  pre = HF_PREFIX.format(layer=3)
  shard = sorted(p for p in tmp_path.iterdir() if p.suffix == ".safetensors")
  dtypes = {}
  for f in shard:
    h = read_header(str(f))
    dtypes.update({n: h[n]["dtype"] for n in h if n.startswith(pre)})
  assert dtypes == {pre + "wq_b.weight": "F8_E4M3", pre + "wq_b.weight_scale_inv": "F32",
                    pre + "wk.weight": "F8_E4M3", pre + "wk.weight_scale_inv": "F32",
                    pre + "weights_proj.weight": "BF16", pre + "k_norm.weight": "BF16",
                    pre + "k_norm.bias": "BF16"}
  loaded = load_indexer(tmp_path, 3)
  assert loaded.config == cfg
  got, want = _np_state(loaded), _np_state(mods[3])
  for name in ("weights_proj", "k_norm"):
    jax.tree.map(np.testing.assert_array_equal, got[name], want[name])
  for name in ("wq_b", "wk"):          # fp8: within e4m3's 3 mantissa bits of the original
    err = np.abs(got[name]["kernel"] - want[name]["kernel"]).max()
    assert err <= np.abs(want[name]["kernel"]).max() / 16
  # Same layer from bf16 tensors: exact.
  bf_dir = tmp_path / "bf16"
  _glm_checkpoint(bf_dir, cfg, 6, {"index_topk_freq": 2, "index_skip_topk_offset": 2}, fp8=False)
  jax.tree.map(np.testing.assert_array_equal, _np_state(load_indexer(bf_dir, 3)), want)
  # A sharing layer has no weights, and says whose indices it uses.
  with pytest.raises(ValueError, match="layer 4 has no indexer weights: .* reuse layer 3's"):
    load_indexer(tmp_path, 4)
  srcs, all_mods = load_indexers(tmp_path)
  assert srcs == sources and sorted(all_mods) == [0, 1, 3, 5]
  assert sorted(load_indexers(tmp_path, layers=[2, 3, 4])[1]) == [3]
  jax.tree.map(np.testing.assert_array_equal, _np_state(all_mods[3]), got)
  share = nsa_jax.IndexShareSteps(all_mods, srcs, backend="xla")
  assert share.computing == (0, 1, 3, 5)
  with pytest.raises(ValueError, match=r"layers must be ints in \[0, 6\)"):
    load_indexers(tmp_path, layers=[6])


def test_weight_block_size_from_config(tmp_path):
  # A checkpoint quantized with 64 x 64 blocks (config.json says so): scales [ceil(/64)].
  cfg = IndexerConfig.for_model("glm-5", dim=200, q_lora_rank=128, topk=64)
  _, _, mods, tensors = _glm_checkpoint(tmp_path, cfg, 1, {}, block=64)
  pre = HF_PREFIX.format(layer=0)
  assert tensors[pre + "wk.weight_scale_inv"].shape == (2, 4)
  got = _np_state(load_indexer(tmp_path, 0))["wk"]["kernel"]
  want = _np_state(mods[0])["wk"]["kernel"]
  assert np.abs(got - want).max() <= np.abs(want).max() / 16
  with pytest.raises(ValueError, match=r"wk.weight_scale_inv: expected shape \[1, 2\], got \[2, 4\]"):
    load_indexer_params(tmp_path, 0, cfg)              # the default 128 blocks do not fit


# --------------------------------------------------------------------------- GLM-5 layer

def _interleaved_forward_np(module, cfg, x, qr, pos):
  """float64 q [T,H,D], k [T,D], head weights [T,H] of a GLM-5 layer, written from the model
  code's description (interleaved rope on the first 64 dims, Hadamard, no fp8)."""
  p = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64),
                   nnx.to_pure_dict(nnx.state(module)))
  x, qr = np.asarray(x, np.float64), np.asarray(qr, np.float64)
  T, H, D, r = x.shape[0], cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
  q = (qr @ p["wq_b"]["kernel"]).reshape(T, H, D)
  k = x @ p["wk"]["kernel"]
  k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + cfg.norm_eps)
  k = k * p["k_norm"]["scale"] + p["k_norm"]["bias"]
  freqs = cfg.rope_theta ** (-np.arange(0, r, 2) / r)
  ang = np.asarray(pos, np.float64)[:, None] * freqs[None]

  def rope(v):
    a = ang.reshape(T, *([1] * (v.ndim - 2)), r // 2)
    ev, od = v[..., 0:r:2], v[..., 1:r:2]
    out = v.copy()
    out[..., 0:r:2] = ev * np.cos(a) - od * np.sin(a)
    out[..., 1:r:2] = ev * np.sin(a) + od * np.cos(a)
    return out

  h = np.ones((1, 1))
  while h.shape[0] < D:
    h = np.block([[h, h], [h, -h]])
  h /= math.sqrt(D)
  w = (x @ p["weights_proj"]["kernel"]) * H ** -0.5 * D ** -0.5
  return rope(q) @ h, rope(k) @ h, w


def _run_glm_layer(module, backend, interpret, pre, ext, next_n, seed, prompt_backend=None):
  """Prompt prefill (on ``prompt_backend``, default ``backend``: it only fills the cache, with
  keys that do not depend on the backend), extend prefill, one decode step; returns the
  host-side pieces the oracles need."""
  cfg = module.config
  rng = np.random.default_rng(seed)
  steps = IndexerSteps(module, backend=backend, interpret=interpret)
  prompt_steps = steps if prompt_backend is None else IndexerSteps(module, backend=prompt_backend)
  tables, P = allocate_block_tables([p + e + next_n for p, e in zip(pre, ext)], seed=seed)
  cache = nsa_jax.IndexKCache.create(P, cfg.head_dim)
  ladder = dict(token_buckets=range(128, 16385, 128), key_buckets=range(128, 16385, 128))
  b0 = nsa_jax.build_ragged_batch(pre, [0] * len(pre), **ladder)
  _, cache = prompt_steps.prefill(bf16(rng, b0.T_pad, cfg.dim),
                                  bf16(rng, b0.T_pad, cfg.q_lora_rank),
                                  prefill_inputs(b0, tables), cache)
  b1 = nsa_jax.build_ragged_batch(ext, pre, **ladder)
  inp = prefill_inputs(b1, tables)
  x1, q1 = bf16(rng, b1.T_pad, cfg.dim), bf16(rng, b1.T_pad, cfg.q_lora_rank)
  pf, cache = steps.prefill(x1, q1, inp, cache, output="keys")
  pf_cache = jax.tree.map(np.asarray, cache)
  d = decode_inputs([p + e + next_n for p, e in zip(pre, ext)], tables)
  rows = d.context_lens.shape[0] * next_n
  xd, qd = bf16(rng, rows, cfg.dim), bf16(rng, rows, cfg.q_lora_rank)
  dc, cache = steps.decode(xd, qd, d, cache, output="keys")
  return dict(batch=b1, inp=inp, x=x1, qr=q1, prefill=np.asarray(pf), prefill_cache=pf_cache,
              dec_inputs=d, xd=xd, qd=qd, decode=np.asarray(dc), cache=cache, tables=tables)


def _check_glm_layer(module, run, next_n):
  """Prefill and decode top-k against float64 logits of what the layer computed."""
  cfg = module.config
  project = jax.jit(module.project)
  b, inp = run["batch"], run["inp"]
  n = b.num_tokens
  q8, _, _, w = project(run["x"], run["qr"], jnp.asarray(inp.positions))
  kf = run["prefill_cache"].k_fp8.reshape(-1, cfg.head_dim)
  ksc = run["prefill_cache"].k_scale.reshape(-1)
  slots = np.maximum(inp.key_slots, 0)
  exact = mqa_logits_np(np.asarray(q8.astype(jnp.float32))[:n],
                        np.asarray(kf[slots].astype(np.float32)), ksc[slots],
                        np.asarray(w)[:n], b.ks[:n], b.ke[:n])
  assert_topk_close(run["prefill"][:n], exact, b.ks[:n], b.ke[:n], cfg.topk)
  assert (run["prefill"][n:] == -1).all()
  d = run["dec_inputs"]
  B = d.context_lens.shape[0]
  pos = (d.context_lens[:, None] - next_n + np.arange(next_n)[None]).reshape(-1)
  qd8, _, _, wd = project(run["xd"], run["qd"], jnp.asarray(np.maximum(pos, 0), jnp.int32))
  L = d.block_tables.shape[1] * 64
  logits = paged_mqa_logits_np(dict(
      q_fp8=qd8.reshape(B, next_n, cfg.n_heads, cfg.head_dim), cache=run["cache"], weights=wd,
      context_lens=d.context_lens, block_tables=d.block_tables, max_context_len=L))
  ke = np.clip(np.repeat(d.context_lens, next_n) - next_n + np.tile(np.arange(next_n), B) + 1,
               0, np.repeat(d.context_lens, next_n))
  assert_topk_close(run["decode"], logits, np.zeros_like(ke), ke, cfg.topk)
  return exact


def _glm_module(tmp_path, topk, dim=6144, q_lora_rank=2048, seed=0):
  """A GLM-5-shaped layer built from a config.json (hidden 6144, 32 heads of 128)."""
  (tmp_path / "config.json").write_text(json.dumps(dict(GLM5_HF, index_topk=topk,
                                                        hidden_size=dim,
                                                        q_lora_rank=q_lora_rank)))
  cfg = IndexerConfig.from_hf_config(tmp_path)
  assert (cfg.n_heads, cfg.dim, cfg.topk, cfg.rope_interleave) == (32, dim, topk, True)
  return Indexer(cfg, rngs=nnx.Rngs(seed))


def test_glm5_layer_forward_matches_float64_oracle(tmp_path):
  """The projections with GLM-5's interleaved rope against an independent float64 forward."""
  m = _glm_module(tmp_path, 512)
  rng = np.random.default_rng(5)
  T = 96
  x, qr = bf16(rng, T, 6144), bf16(rng, T, 2048)
  pos = jnp.asarray(np.sort(rng.integers(0, 5000, T)), jnp.int32)
  q8, k8, ksc, w = jax.jit(m.project)(x, qr, pos)
  q, k, wo = _interleaved_forward_np(m, m.config, x.astype(jnp.float32),
                                     qr.astype(jnp.float32), pos)
  ks, ke = np.zeros(T, np.int32), np.full(T, T, np.int32)
  mine = mqa_logits_np(np.asarray(q8.astype(jnp.float32)), np.asarray(k8.astype(jnp.float32)),
                       np.asarray(ksc), np.asarray(w), ks, ke)
  exact = mqa_logits_np(q, k, np.ones(T), wo, ks, ke)
  assert calc_diff(mine, exact) < 1e-3
  # NeoX rope on the same weights is measurably further away: the layout matters.
  neox = Indexer(m.config.replace(rope_interleave=False), rngs=nnx.Rngs(0))
  q8n, k8n, kscn, wn = jax.jit(neox.project)(x, qr, pos)
  wrong = mqa_logits_np(np.asarray(q8n.astype(jnp.float32)), np.asarray(k8n.astype(jnp.float32)),
                        np.asarray(kscn), np.asarray(wn), ks, ke)
  assert calc_diff(wrong, exact) > 10 * calc_diff(mine, exact)


@pytest.mark.parametrize("backend, interpret, topk, pre, ext", [
    ("xla", False, 512, [600, 0, 200], [90, 130, 20]),
    ("xla", False, 1024, [1100, 0], [60, 40]),
    ("pallas", True, 512, [560, 0], [40, 24]),
])
def test_glm5_layer_prefill_decode_cpu(tmp_path, backend, interpret, topk, pre, ext):
  """A GLM-5-shaped layer (config.json: hidden 6144, H 32, interleaved rope) with top-512 /
  top-1024: prefill onto cached prefixes and a decode step, on the xla backend and the Pallas
  kernels in interpret mode (whose prompt prefill runs on xla: interpret mode is slow), each
  against float64 logits of its own fp8 inputs."""
  next_n = 2 if interpret else 1
  m = _glm_module(tmp_path, topk)
  run = _run_glm_layer(m, backend, interpret, pre, ext, next_n, seed=7,
                       prompt_backend="xla" if interpret else None)
  exact = _check_glm_layer(m, run, next_n)
  # Rows with more than k keys exist, so the top-k really cut.
  assert ((run["batch"].ke - run["batch"].ks)[:run["batch"].num_tokens] > topk).any()
  assert np.isfinite(exact[exact > -np.inf]).all()


# --------------------------------------------------------------------------- top-512 / 1024

@pytest.mark.parametrize("k", [512, 1024])
@pytest.mark.parametrize("mode", ["xla", "interpret"])
def test_prefill_topk_512_1024(k, mode, monkeypatch):
  monkeypatch.setattr(nsa_jax.budget, "SKIP_CHUNK_ELEMENTS", 0)
  rng = np.random.default_rng(k)
  ext, pre = ([200, 40], [1100, 0]) if mode == "xla" else ([24, 8], [1100, 0])
  b = nsa_jax.build_ragged_batch(ext, pre)
  p = random_problem(rng, b.T_pad, b.S_pad, H=16, ks=b.ks, ke=b.ke)
  args = [p[n] for n in ("q_fp8", "k_fp8", "k_scale", "weights", "ks", "ke")]
  kw = dict(backend="pallas", interpret=True) if mode == "interpret" else dict(backend="xla")
  # A budget of a few rows makes it chunk.
  out = np.asarray(nsa_jax.prefill_topk(*args, k=k, budget_bytes=16 * b.S_pad * 4, **kw))
  assert out.shape == (b.T_pad, k)
  q, kk = (np.asarray(a.astype(jnp.float32)) for a in (p["q_fp8"], p["k_fp8"]))
  exact = mqa_logits_np(q, kk, p["k_scale"], p["weights"], b.ks, b.ke)
  assert_topk_close(out, exact, b.ks, b.ke, k)
  assert ((b.ke - b.ks) > k).sum() > 4
  if mode == "xla":   # the reference op chain, exactly
    ref = ops.topk_indices(ops.mqa_logits(*args, backend="xla"), args[4], args[5], k=k,
                           backend="xla")
    np.testing.assert_array_equal(out, np.asarray(ref))


@pytest.mark.parametrize("k", [512, 1024])
@pytest.mark.parametrize("mode", ["xla", "interpret"])
def test_paged_topk_slots_512_1024(k, mode):
  rng = np.random.default_rng(k + 1)
  p = paged_problem(rng, [1300, 700, 40], next_n=2, H=16)
  logits = nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                                    p["block_tables"], max_context_len=p["max_context_len"],
                                    backend="xla")
  kw = dict(backend="pallas", interpret=True) if mode == "interpret" else dict(backend="xla")
  slots = np.asarray(paged_topk_slots(logits, p["context_lens"], p["block_tables"], next_n=2,
                                      k=k, num_pages=p["cache"].num_pages, **kw))
  assert slots.shape == (6, k)
  logits = np.asarray(logits, np.float64)
  tables, ctx = np.asarray(p["block_tables"]), np.asarray(p["context_lens"])
  for r in range(6):
    b, t = divmod(r, 2)
    ke = min(int(ctx[b]) - 2 + t + 1, int(ctx[b]))
    order = np.argsort(-logits[r, :ke], kind="stable")[:k]
    want = {int(tables[b, q // 64]) * 64 + q % 64 for q in order}
    got = slots[r][slots[r] >= 0]
    assert len(got) == min(k, ke) and set(got.tolist()) == want, f"row {r}"


def test_demo_glm5_top512():
  from nsa_jax import __main__ as cli
  lines = []
  args = cli.build_parser().parse_args(
      ["demo", "--model", "glm-5", "--small", "--topk", "512", "--prefix", "600,0",
       "--extend", "40,70", "--decode-steps", "2", "--bucket", "128", "--backend", "xla",
       "--quiet"])
  out = cli.demo(args, log=lines.append)
  text = "\n".join(lines)
  assert "random weights (glm-5 shapes, --small)" in text and "H 32" in text
  assert "rope interleaved theta 1e+06" in text and "INCONSISTENT" not in text
  cfg = out["config"]
  assert (cfg.n_heads, cfg.topk, cfg.dim) == (32, 512, cli.SMALL_CONFIG.dim)
  assert (out["prefill_slots"][39] >= 0).sum() == 512          # 640 keys > 512
  assert (out["prefill_slots"][40 + 69] >= 0).sum() == 70
  assert (out["decode_slots"][0] >= 0).sum() == 512


# --------------------------------------------------------------------------- GPU

def _check_kernels(module, run, next_n, backend):
  """The ops under the layer on ``backend``, fed the q / weights that a standalone ``project``
  gives and the keys the layer cached, in two layers: the logits kernels against float64
  logits of exactly those inputs (exact -inf pattern, DeepGEMM's calc_diff: fp8 wgmma sums
  with about 14 mantissa bits, so single logits may differ from float64 by more than float32
  rounding), and the top-k against the kernels' own logits, exactly up to float32 rounding."""
  cfg = module.config
  project = jax.jit(module.project)
  b, inp = run["batch"], run["inp"]
  n, D = b.num_tokens, cfg.head_dim
  q8, _, _, w = project(run["x"], run["qr"], jnp.asarray(inp.positions))
  slots = np.maximum(inp.key_slots, 0)
  kf = np.asarray(run["prefill_cache"].k_fp8).reshape(-1, D)[slots]
  ksc = np.asarray(run["prefill_cache"].k_scale).reshape(-1)[slots]
  args = (q8, jnp.asarray(kf), jnp.asarray(ksc), w, jnp.asarray(inp.ks), jnp.asarray(inp.ke))
  idx = nsa_jax.prefill_topk(*args, k=cfg.topk, backend=backend)
  mine = np.asarray(nsa_jax.mqa_logits(*args, backend=backend))[:n]
  exact = mqa_logits_np(np.asarray(q8.astype(jnp.float32))[:n], kf.astype(np.float32), ksc,
                        np.asarray(w)[:n], b.ks[:n], b.ke[:n])
  assert_same_inf_pattern(mine, exact)
  finite = ~np.isneginf(exact)
  assert calc_diff(np.where(finite, mine, 0), np.where(finite, exact, 0)) < 5e-6
  assert_topk_close(np.asarray(idx)[:n], mine, b.ks[:n], b.ke[:n], cfg.topk)
  d, cache = run["dec_inputs"], run["cache"]
  B = d.context_lens.shape[0]
  pos = (d.context_lens[:, None] - next_n + np.arange(next_n)[None]).reshape(-1)
  qd8, _, _, wd = project(run["xd"], run["qd"], jnp.asarray(np.maximum(pos, 0), jnp.int32))
  qd8 = qd8.reshape(B, next_n, cfg.n_heads, D)
  L = d.block_tables.shape[1] * 64
  ctx, tables = jnp.asarray(d.context_lens), jnp.asarray(d.block_tables)
  logits = nsa_jax.paged_mqa_logits(qd8, cache, wd, ctx, tables, max_context_len=L,
                                    backend=backend)
  ke = np.clip(np.repeat(d.context_lens, next_n) - next_n + np.tile(np.arange(next_n), B) + 1,
               0, np.repeat(d.context_lens, next_n))
  didx = ops.topk_indices(logits, jnp.zeros(len(ke), jnp.int32), jnp.asarray(ke, jnp.int32),
                          k=cfg.topk, backend=backend)
  exact = paged_mqa_logits_np(dict(q_fp8=qd8, cache=cache, weights=wd, context_lens=ctx,
                                   block_tables=tables, max_context_len=L))
  mine = np.asarray(logits)
  valid = np.arange(mine.shape[1])[None] < ke[:, None]
  assert calc_diff(np.where(valid, mine, 0), np.where(valid, exact, 0)) < 5e-6
  assert_topk_close(np.asarray(didx), np.where(valid, mine, -np.inf), np.zeros_like(ke), ke,
                    cfg.topk)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("topk", [2048, 512])
def test_gpu_glm5_layer_pallas_matches_reference(tmp_path, next_n, topk):
  """GLM-5's real layer shape (hidden 6144, q_lora_rank 2048, 32 heads of 128, interleaved
  rope) on the Pallas kernels: a ragged prefill onto cached prefixes, then a decode step.

  The layer against the same layer on the xla (reference) backend, same inputs: the kernels
  sum in another order, and the two programs' bf16 projections may round differently, so
  near-tied keys may swap; >= 99.9% of the selected keys must agree and every row must keep
  as many. The Pallas ops under the layer against float64 logits of their own inputs, exactly
  up to float32 rounding."""
  m = _glm_module(tmp_path, topk)
  pre, ext = [3000, 0, 5000], [1000, 2500, 700]
  runs = {b: _run_glm_layer(m, b, False, pre, ext, next_n, seed=11) for b in ("pallas", "xla")}
  n = runs["xla"]["batch"].num_tokens
  for key, rows in (("prefill", n), ("decode", None)):
    agree = total = 0
    for g, r in zip(runs["pallas"][key][:rows], runs["xla"][key][:rows]):
      g, r = set(g[g >= 0].tolist()), set(r[r >= 0].tolist())
      assert len(g) == len(r)
      agree += len(g & r)
      total += len(r)
    assert agree >= 0.999 * total, f"{key}: {agree} of {total} selected keys agree"
  _check_kernels(m, runs["pallas"], next_n, "pallas")
