"""Checkpoint loading: a tiny synthetic DeepSeek-V3.2-style checkpoint written by the test."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nsa_jax.indexer import Indexer, IndexerConfig
from nsa_jax.weights import (HF_PREFIX, indexer_tensors, load_indexer, load_indexer_params,
                             quant_weight, read_header, save_checkpoint)

# dim 200: wk's in-features end in a partial 128-block, so the ceil() scale shapes matter.
CFG = IndexerConfig(dim=200, q_lora_rank=128, n_heads=16, head_dim=128, topk=32)
HF = {"hidden_size": 200, "q_lora_rank": 128, "index_n_heads": 16, "index_head_dim": 128,
      "index_topk": 32, "qk_rope_head_dim": 64, "rope_theta": 10000,
      "max_position_embeddings": 163840,
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
      "scale_fmt": "ue8m0"}
LAYER = 3


def as_np(module):
  return jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32)),
                      nnx.to_pure_dict(nnx.state(module)))


@pytest.fixture(scope="module")
def module():
  m = Indexer(CFG, rngs=nnx.Rngs(0))
  # weights_proj is f32 in the module but bf16 in checkpoints: make it bf16-exact, and give
  # k_norm non-trivial values, so that a round trip must reproduce every bit.
  rng = np.random.default_rng(0)
  m.weights_proj.kernel[...] = m.weights_proj.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
  m.k_norm.scale[...] = jnp.asarray(1 + 0.1 * rng.standard_normal(128), jnp.float32)
  m.k_norm.bias[...] = jnp.asarray(0.1 * rng.standard_normal(128), jnp.float32)
  return m


def other_tensors(layer):
  """Tensors of the rest of the model that the loader must ignore."""
  return {f"model.layers.{layer}.self_attn.wq_a.weight": np.ones((8, 4), ml_dtypes.bfloat16),
          f"model.layers.{layer + 1}.self_attn.indexer.wk.weight": np.ones((2, 2), np.float32),
          "model.embed_tokens.weight": np.zeros((4, 4), np.float32)}


def test_round_trip_bf16_sharded(tmp_path, module):
  tensors = {**indexer_tensors(module, LAYER), **other_tensors(LAYER)}
  save_checkpoint(tmp_path, tensors, HF, shards=3)
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 3
  loaded = load_indexer(tmp_path, LAYER)
  assert loaded.config == CFG
  ref, got = as_np(module), as_np(loaded)
  jax.tree.map(np.testing.assert_array_equal, got, ref)
  assert loaded.wq_b.kernel.dtype == jnp.bfloat16 and loaded.weights_proj.kernel.dtype == jnp.float32
  # Same module, same forward.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, CFG.dim)), jnp.bfloat16)
  qr = jnp.asarray(rng.standard_normal((8, CFG.q_lora_rank)), jnp.bfloat16)
  pos = jnp.arange(8, dtype=jnp.int32)
  project = jax.jit(lambda g, s, *a: nnx.merge(g, s).project(*a))
  a = project(*nnx.split(module), x, qr, pos)
  b = project(*nnx.split(loaded), x, qr, pos)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u.astype(jnp.float32)), np.asarray(v.astype(jnp.float32)))


def _dequant_loop(w8, s):
  """Block-by-block de-quantization, written as plainly as possible (the oracle)."""
  w = w8.astype(np.float32)
  out = np.empty_like(w)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
      out[blk] = w[blk] * s[i, j]
  return out


def test_fp8_weights_dequantized(tmp_path, module):
  tensors = indexer_tensors(module, LAYER, fp8=True)
  pre = HF_PREFIX.format(layer=LAYER)
  assert tensors[pre + "wq_b.weight"].dtype == ml_dtypes.float8_e4m3fn
  assert tensors[pre + "wq_b.weight_scale_inv"].shape == (16, 1)
  assert tensors[pre + "wk.weight_scale_inv"].shape == (1, 2)
  save_checkpoint(tmp_path, tensors)          # no config.json: pass the config
  # The file really stores fp8 (safetensors dtype F8_E4M3).
  shard = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")][0]
  assert read_header(os.path.join(tmp_path, shard))[pre + "wk.weight"]["dtype"] == "F8_E4M3"
  params = load_indexer_params(tmp_path, LAYER, CFG)
  for short in ("wq_b", "wk"):
    exp = _dequant_loop(tensors[pre + short + ".weight"], tensors[pre + short + ".weight_scale_inv"])
    exp = exp.T.astype(ml_dtypes.bfloat16)
    assert params[short]["kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params[short]["kernel"], exp)
    orig = as_np(module)[short]["kernel"]
    err = np.abs(params[short]["kernel"].astype(np.float32) - orig).max() / np.abs(orig).max()
    assert err < 1.0 / 16  # e4m3 keeps 3 mantissa bits
  np.testing.assert_array_equal(params["weights_proj"]["kernel"], as_np(module)["weights_proj"]["kernel"])


def test_single_file_and_no_index(tmp_path, module):
  from safetensors.numpy import save_file
  path = os.path.join(tmp_path, "one.safetensors")
  save_file(indexer_tensors(module, 0), path)
  p1 = load_indexer_params(path, 0, CFG)
  os.makedirs(tmp_path / "dir")
  save_file(indexer_tensors(module, 0), os.path.join(tmp_path, "dir", "a.safetensors"))
  p2 = load_indexer_params(tmp_path / "dir", 0, CFG)   # no index file: headers are scanned
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  with pytest.raises(ValueError, match="config is required"):
    load_indexer(path, 0)


def test_errors_list_every_problem(tmp_path, module):
  pre = HF_PREFIX.format(layer=LAYER)
  tensors = indexer_tensors(module, LAYER, fp8=True)
  del tensors[pre + "k_norm.bias"]
  del tensors[pre + "wk.weight_scale_inv"]
  tensors[pre + "weights_proj.weight"] = np.zeros((16, 201), ml_dtypes.bfloat16)
  tensors[pre + "wq_b.weight_scale_inv"] = np.ones((16, 2), np.float32)
  save_checkpoint(tmp_path, tensors, HF)
  with pytest.raises(ValueError) as e:
    load_indexer(tmp_path, LAYER)
  msg = str(e.value)
  assert f"{pre}k_norm.bias [128]" in msg
  assert f"{pre}wk.weight_scale_inv [1, 2] (the scales of fp8 {pre}wk.weight)" in msg
  assert f"{pre}weights_proj.weight: expected shape [16, 200], got [16, 201]" in msg
  assert f"{pre}wq_b.weight_scale_inv: expected shape [16, 1], got [16, 2]" in msg
  assert "layer 3" in msg
  with pytest.raises(ValueError, match=r"missing tensors:\n  model.layers.7.self_attn.indexer.wq_b"):
    load_indexer_params(tmp_path, 7, CFG)
  with pytest.raises(ValueError, match="not found"):
    load_indexer_params(tmp_path / "nope", 0, CFG)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\xff" * 16)
  with pytest.raises(ValueError, match="not a safetensors file"):
    read_header(str(bad))


def test_quant_weight_round_trip():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((300, 130)).astype(np.float32)
  q, s = quant_weight(w)
  assert q.shape == w.shape and s.shape == (3, 2)
  back = _dequant_loop(q, s)
  assert np.abs(back - w).max() <= np.abs(w).max() / 16
