"""Command line: ``python -m nsa_jax demo`` runs the indexer pipeline on a V3.2-shaped problem."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax


def _timed(fn, *args, repeats=3):
  out = jax.block_until_ready(fn(*args))  # compile + first run
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return out, (time.perf_counter() - t0) / repeats


def demo(args) -> None:
  rng = np.random.default_rng(args.seed)
  H, D, topk = 64, 128, args.topk
  ext = [int(x) for x in args.extend.split(",")]
  prefix = [int(x) for x in args.prefix.split(",")]
  total = [e + p for e, p in zip(ext, prefix)]
  print(f"nsa_jax {nsa_jax.__version__} | jax {jax.__version__} | {jax.devices()[0].device_kind}"
        f" | backend={args.backend}")
  print(f"requests: extend {ext} tokens onto prefixes {prefix} (H={H}, D={D}, top-{topk})")

  ks, ke, start = [], [], 0
  for e, t in zip(ext, total):
    ks += [start] * e
    ke += [start + t - e + p + 1 for p in range(e)]
    start += t
  ks, ke = jnp.asarray(ks, jnp.int32), jnp.asarray(ke, jnp.int32)
  T, S = len(ks), start
  q = jnp.asarray(rng.standard_normal((T, H, D)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((S, D)), jnp.bfloat16)
  q = nsa_jax.hadamard_rotate(nsa_jax.apply_rope(q, jnp.arange(T)))
  k = nsa_jax.hadamard_rotate(nsa_jax.apply_rope(k, jnp.arange(S)))
  q8, qs = nsa_jax.act_quant(q, scale_fmt="ue8m0")
  k8, kscale = nsa_jax.act_quant(k, scale_fmt="ue8m0")
  w = jnp.asarray(rng.standard_normal((T, H)), jnp.float32) * H ** -0.5 * qs[..., 0] * D ** -0.5

  logits_fn = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend=args.backend))
  topk_fn = jax.jit(lambda x, a, b: nsa_jax.topk_indices(x, a, b, k=topk, backend=args.backend))
  logits, t_logits = _timed(logits_fn, q8, k8, kscale[:, 0], w, ks, ke)
  idx, t_topk = _timed(topk_fn, logits, ks, ke)
  valid = int(jnp.sum(jnp.clip(ke - ks, 0)))
  tflops = 2 * valid * H * D / t_logits / 1e12
  print(f"prefill logits [{T} x {S}]: {t_logits * 1e3:8.2f} ms  ({tflops:.3f} useful TFLOP/s)")
  print(f"top-{topk} [{T} x {S}]:      {t_topk * 1e3:8.2f} ms")
  n_sel = np.asarray((idx >= 0).sum(1))
  print(f"selected keys per query: min {n_sel.min()}, mean {n_sel.mean():.0f}, max {n_sel.max()}"
        f" (queries with fewer than {topk} valid keys keep them all)")

  # Decode: each request scores its whole context from a paged cache.
  B = len(total)
  pages = [-(-t // 64) for t in total]
  P = sum(pages)
  tables = np.zeros((B, max(pages)), np.int32)
  perm, c, slots = rng.permutation(P), 0, []
  for b, (n_p, t) in enumerate(zip(pages, total)):
    tables[b, :n_p] = perm[c:c + n_p]
    c += n_p
  kc = jnp.asarray(rng.standard_normal((P * 64, D)), jnp.bfloat16)
  kc8, kcs = nsa_jax.act_quant(kc)
  cache = nsa_jax.IndexKCache(kc8.reshape(P, 64, D), kcs.reshape(P, 64))
  qd8, qds = nsa_jax.act_quant(jnp.asarray(rng.standard_normal((B, 1, H, D)), jnp.bfloat16))
  wd = jnp.asarray(rng.standard_normal((B, H)), jnp.float32) * H ** -0.5 * qds.reshape(B, H) * D ** -0.5
  L = max(total)
  paged_fn = jax.jit(lambda *a: nsa_jax.paged_mqa_logits(*a, max_context_len=L, backend=args.backend))
  dl, t_dec = _timed(paged_fn, qd8, cache, wd, jnp.asarray(total, jnp.int32), jnp.asarray(tables))
  didx = nsa_jax.topk_indices(dl, jnp.zeros(B, jnp.int32), jnp.asarray(total, jnp.int32), k=topk,
                              backend=args.backend)
  print(f"decode logits [{B} x {L}] over {P} pages: {t_dec * 1e3:.2f} ms;"
        f" first request's top keys: {np.asarray(didx[0, :8]).tolist()}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m nsa_jax", description=__doc__)
  sub = parser.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo", help="run the indexer pipeline on a random V3.2-shaped problem")
  d.add_argument("--extend", default="384,256,128", help="new tokens per request")
  d.add_argument("--prefix", default="2048,0,512", help="cached prefix length per request")
  d.add_argument("--topk", type=int, default=2048)
  d.add_argument("--backend", default="auto", choices=nsa_jax.ops.BACKENDS)
  d.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.cmd == "demo":
    demo(args)


if __name__ == "__main__":
  main()
