"""The main job, ``python -m nsa_jax demo``, at CI sizes: in process and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from flax import nnx

from nsa_jax import __main__ as cli
from nsa_jax.indexer import Indexer
from nsa_jax.weights import indexer_tensors, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_ARGS = ["--small", "--prefix", "300,0,40", "--extend", "40,90,24", "--decode-steps", "3",
              "--bucket", "128", "--quiet"]


def test_demo_in_process():
  lines = []
  args = cli.build_parser().parse_args(["demo", *SMALL_ARGS, "--next-n", "2", "--backend", "xla"])
  out = cli.demo(args, log=lines.append)
  text = "\n".join(lines)
  for needle in ("memory budget for prefill logits", "chunk plan:", "[prompt prefill]",
                 "[extend prefill]", "[decode] 3 steps, 2 new tokens", "compiles:",
                 "slots consistent"):
    assert needle in text, needle
  assert "INCONSISTENT" not in text
  # Prompt and extend buckets differ (T 384 vs 256), decode is one bucket.
  assert out["programs"]["prefill"] >= 2 and out["programs"]["decode"] >= 1
  cfg = out["config"]
  # Request 0's last prefill token sees 340 keys > top-256: exactly 256 selected.
  last = out["prefill_slots"][40 - 1]
  assert (last >= 0).sum() == cfg.topk
  # Request 1 (no prefix, 90 new tokens): its last token sees all 90.
  assert (out["prefill_slots"][40 + 90 - 1] >= 0).sum() == 90
  dec = out["decode_slots"]
  assert dec.shape[1] == cfg.topk and (dec[1 * 2 + 1] >= 0).sum() == 90 + 3 * 2


def test_demo_cli_with_checkpoint(tmp_path):
  """``python -m nsa_jax demo --checkpoint DIR --layer N`` in a fresh interpreter."""
  cfg = cli.SMALL_CONFIG
  m = Indexer(cfg, rngs=nnx.Rngs(5))
  hf = {"hidden_size": cfg.dim, "q_lora_rank": cfg.q_lora_rank, "index_n_heads": cfg.n_heads,
        "index_head_dim": cfg.head_dim, "index_topk": cfg.topk, "qk_rope_head_dim": 64,
        "rope_theta": 10000, "max_position_embeddings": 163840, "scale_fmt": "ue8m0",
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                         "original_max_position_embeddings": 4096}}
  save_checkpoint(tmp_path, indexer_tensors(m, 2, fp8=True), hf, shards=2)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "nsa_jax", "demo", "--checkpoint", str(tmp_path),
                      "--layer", "2", "--prefix", "200,0", "--extend", "30,50",
                      "--decode-steps", "2", "--bucket", "128", "--quiet"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"checkpoint {tmp_path}, layer 2" in r.stdout
  assert "slots consistent" in r.stdout and "INCONSISTENT" not in r.stdout
  r = subprocess.run([sys.executable, "-m", "nsa_jax", "demo", "--checkpoint", str(tmp_path),
                      "--layer", "5", "--quiet"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "missing tensors" in r.stderr
