"""The main job, ``python -m nsa_jax demo``, at CI sizes: in process and as a subprocess; its
flag errors (one line, no traceback), its help, and its compile cache (a second run compiles
nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax
import pytest
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
                 "[extend prefill]", "[decode] 3 steps, 2 new tokens", "programs:",
                 "slots consistent", "lowest selected positions", "random weights: which keys"):
    assert needle in text, needle
  assert "INCONSISTENT" not in text
  assert out["compiled"] + out["loaded"] <= 3, "only the steps compile (no host-side setup)"
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
  r = run_cli(["demo", "--checkpoint", str(tmp_path), "--layer", "2", "--prefix", "200,0",
               "--extend", "30,50", "--decode-steps", "2", "--bucket", "128", "--quiet",
               "--no-compile-cache"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"checkpoint {tmp_path}, layer 2" in r.stdout
  assert "slots consistent" in r.stdout and "INCONSISTENT" not in r.stdout
  assert "random weights" not in r.stdout
  r = run_cli(["demo", "--checkpoint", str(tmp_path), "--layer", "5", "--quiet",
               "--no-compile-cache"])
  assert r.returncode == 1 and "missing tensors" in r.stderr
  assert_one_line(r.stderr)


def run_cli(argv, cache_dir=None):
  """``python -m nsa_jax ARGV`` in a fresh interpreter on the CPU."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  return subprocess.run([sys.executable, "-m", "nsa_jax", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_one_line(err: str):
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err


# --------------------------------------------------------------------------- flag errors

BAD_FLAGS = [
    # (argv after "demo", exit status, a piece of the message)
    (["--prefix", "0,0", "--extend", "0,0"], 2, "--extend must give at least one request"),
    (["--topk", "-5"], 2, "--topk must be an int >= 1, got -5"),
    (["--topk", "0"], 2, "--topk must be an int >= 1, got 0"),
    (["--topk", "x"], 2, "argument --topk: invalid int value: 'x'"),
    (["--seed", "-1"], 2, "--seed must be an int >= 0, got -1"),
    (["--decode-steps", "-1"], 2, "--decode-steps must be an int >= 0"),
    (["--bucket", "-3"], 2, "--bucket must be an int >= 0"),
    (["--budget-bytes", "0"], 2, "--budget-bytes must be an int >= 1"),
    (["--next-n", "5"], 2, "invalid choice: 5"),
    (["--prefix", "1,2"], 2, "must name the same number of requests, got 2 and 3"),
    (["--prefix", "1,-2,3"], 2, "--prefix must be comma-separated ints >= 0"),
    (["--extend", "a,b"], 2, "--extend must be comma-separated ints >= 0"),
    (["--layer", "2"], 2, "--layer needs --checkpoint"),
    (["--layer", "-1"], 2, "--layer must be an int >= 0"),
    (["--checkpoint", "/nonexistent"], 2, "'/nonexistent' does not exist"),
    (["--small", "--checkpoint", "/nonexistent"], 2, "exclude each other"),
    (["--compile-cache", "/x", "--no-compile-cache"], 2, "exclude each other"),
    (["--prefix", "99999999999", "--extend", "1"], 2, "more than int32 slot ids address"),
    (["--prefix", "300000000", "--extend", "1"], 2, "of host memory, more than"),
    (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv,code,needle", BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_bad_flag_one_line(argv, code, needle, capsys):
  """Each bad flag: exit status, one line on stderr naming the flag, nothing on stdout."""
  try:
    rc = cli.main(["demo", *argv])
  except SystemExit as e:  # argparse's own errors exit from parse_args
    rc = e.code
  out, err = capsys.readouterr()
  assert rc == code, (rc, err)
  assert needle in err, err
  assert_one_line(err)
  assert err.startswith("python -m nsa_jax demo: error: ") and out == ""


def test_checkpoint_without_config(tmp_path, capsys):
  (tmp_path / "model.safetensors").write_bytes(b"")
  assert cli.main(["demo", "--checkpoint", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "has no config.json" in err
  assert_one_line(err)
  file = tmp_path / "model.safetensors"
  assert cli.main(["demo", "--checkpoint", str(file)]) == 2
  assert "is a file" in capsys.readouterr().err


def test_bad_checkpoint_config(tmp_path, capsys):
  (tmp_path / "config.json").write_text("{not json")
  assert cli.main(["demo", "--checkpoint", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert f"--checkpoint {str(tmp_path)!r}" in err
  assert_one_line(err)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="pallas runs on a GPU")
def test_pallas_backend_without_gpu(capsys):
  assert cli.main(["demo", "--backend", "pallas"]) == 2
  err = capsys.readouterr().err
  assert "--backend pallas needs a CUDA GPU" in err and "jax runs on cpu" in err
  assert_one_line(err)


def test_sizes_are_checked_before_allocating(capsys, monkeypatch):
  """The size check refuses what the device cannot hold, from its free memory, before any
  allocation (the estimate itself is a lower bound: it grows with every size flag)."""
  small = cli.SMALL_CONFIG
  est = lambda **kw: cli.estimate_bytes(small, [1000], [100], **dict(
      dict(decode_steps=8, next_n=1, bucket=256, budget_bytes=1 << 30), **kw))
  h0, d0 = est()
  assert est(bucket=0)[1] >= d0 * 0.5 and est(decode_steps=8000)[1] > d0
  assert cli.estimate_bytes(small, [100000], [100], decode_steps=8, next_n=1, bucket=256,
                            budget_bytes=1 << 30)[0] > h0
  # A device that reports 1 MiB free: the --small default demo does not fit.
  monkeypatch.setattr(cli._budget, "query_device_memory", lambda device: (1 << 20, 1 << 30))
  assert cli.main(["demo", "--small", "--budget-bytes", "1000000"]) == 2
  err = capsys.readouterr().err
  assert "of memory on" in err and "free" in err
  assert_one_line(err)


# --------------------------------------------------------------------------- help

def test_no_command_prints_usage(capsys):
  assert cli.main([]) == 2
  err = capsys.readouterr().err
  assert "usage:" in err and "demo" in err and "name a command" in err


def test_help_shows_program_defaults_and_steps(capsys, monkeypatch):
  monkeypatch.setattr(sys, "argv", [os.path.join("venv", "bin", "nsa-jax")])
  with pytest.raises(SystemExit) as e:
    cli.main(["demo", "--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
  assert text.startswith("usage: nsa-jax demo")
  for needle in ("(default: 2560,0,1024)", "(default: 256,384,128)", "(default: 8)",
                 "(default: auto)", "1. layer", "4. extend", "5. decode", "--no-compile-cache",
                 "nsa-jax demo --small"):
    assert needle in text, needle
  monkeypatch.setattr(sys, "argv", ["/x/nsa_jax/__main__.py"])
  assert cli.build_parser().prog == "python -m nsa_jax"


# --------------------------------------------------------------------------- compile cache

_PROGRAMS = re.compile(r"programs: (\d+) compiled, (\d+) loaded from the compile cache "
                       r"\(prefill step: (\d+) buckets?, decode step: (\d+)\)")


def test_second_run_compiles_nothing(tmp_path):
  """The first run compiles the steps and nothing else (no host-side setup programs); the
  second, with the same persistent cache, loads every program and compiles none."""
  argv = ["demo", "--small", "--prefix", "60,0", "--extend", "20,30", "--decode-steps", "2",
          "--bucket", "128", "--quiet"]
  runs = []
  for _ in range(2):
    t0 = time.perf_counter()
    r = run_cli(argv, cache_dir=tmp_path / "cc")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"compile cache: {tmp_path / 'cc'}" in r.stdout
    m = _PROGRAMS.search(r.stdout)
    assert m, r.stdout[-2000:]
    runs.append(tuple(map(int, m.groups())) + (time.perf_counter() - t0,))
  (c1, l1, pf, dc, t1), (c2, l2, _, _, t2) = runs
  assert (pf, dc) == (1, 1), "prompt and extend share one bucket; decode is one program"
  assert c1 == pf + dc and l1 == 0, f"the first run compiled {c1} programs, not just the steps"
  assert c2 == 0 and l2 == c1, f"the second run compiled {c2}, loaded {l2}"
  print(f"demo wall time: first run {t1:.1f} s, second run {t2:.1f} s")
  r = run_cli(argv + ["--no-compile-cache"], cache_dir=tmp_path / "cc")
  assert "compile cache: off" in r.stdout and _PROGRAMS.search(r.stdout).group(2) == "0"
