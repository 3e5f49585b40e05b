"""Bad input to every public function and class of ``nsa_jax.__all__``: the library's own
ValueError naming the function and the argument, what was expected and what came (one table,
one row per bad input); static ints from numpy; the empty-batch rule."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import nsa_jax
from nsa_jax import budget
from nsa_jax.indexer import PrefillInputs
from nsa_jax.planner import plan_chunks
from tests.helpers import paged_problem, random_problem

F8 = jnp.float8_e4m3fn
CFG = nsa_jax.IndexerConfig(dim=128, q_lora_rank=128, n_heads=4, head_dim=128, topk=8)


# --------------------------------------------------------------------------- shared inputs

class Inputs:
  """Small valid arguments, built once; each table row breaks one of them."""

  def __init__(self):
    p = random_problem(np.random.default_rng(0), 4, 10, H=4)
    self.mqa = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
    self.paged = paged_problem(np.random.default_rng(1), [70, 3], H=4)
    self.logits = jnp.zeros((4, 10), jnp.float32)
    self.cache = nsa_jax.IndexKCache.create(4)
    self.batch = nsa_jax.build_ragged_batch([5, 3], [2, 0])
    self.tables, self.num_pages = nsa_jax.allocate_block_tables([7, 3])
    self.prefill = nsa_jax.prefill_inputs(self.batch, self.tables, num_pages=self.num_pages)
    self.decode = nsa_jax.decode_inputs([8, 4], self.tables, num_pages=self.num_pages)
    self.steps = nsa_jax.IndexerSteps(nsa_jax.Indexer(CFG, rngs=nnx.Rngs(0)), backend="xla")
    self.x = jnp.zeros((self.batch.T_pad, CFG.dim), jnp.bfloat16)
    self.mesh = nsa_jax.make_mesh()


_inputs = None


def I() -> Inputs:  # noqa: E743  (built on first use: collection stays fast)
  global _inputs
  if _inputs is None:
    _inputs = Inputs()
  return _inputs


def mqa(i, value):
  """The valid ragged-prefill arguments with argument i replaced."""
  args = list(I().mqa)
  args[i] = value
  return args


def paged(**o):
  p = I().paged
  return nsa_jax.paged_mqa_logits(
      o.get("q", p["q_fp8"]), o.get("cache", p["cache"]), o.get("w", p["weights"]),
      o.get("ctx", p["context_lens"]), o.get("bt", p["block_tables"]),
      max_context_len=o.get("L", p["max_context_len"]), backend=o.get("backend", "xla"),
      interpret=o.get("interpret", False))


def slots(**o):
  p = I().paged
  logits = jnp.zeros((2, p["max_context_len"]), jnp.float32)
  kw = dict(next_n=1, k=4, backend="xla")
  kw.update(o)
  return nsa_jax.paged_topk_slots(kw.pop("logits", logits), p["context_lens"],
                                  p["block_tables"], **kw)


def cpu(arrays):
  """The arrays on a CPU device, so that the off-GPU rows hold on a GPU host too."""
  return jax.device_put(arrays, jax.devices("cpu")[0])


def traced(fn):
  """Calls fn(tracer) under jax.jit: host-side builders must refuse traced values."""
  I()  # the shared inputs are built outside the trace (their jnp calls would be traced)
  return jax.jit(lambda a: fn(a) and a)(jnp.arange(2, dtype=jnp.int32))


def text_file(path, text: str):
  path.write_text(text)
  return path


def safetensors_file(path, header_bytes: bytes):
  path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes)
  return str(path)


def two_axis_mesh():
  return Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("a", "b"))


# --------------------------------------------------------------------------- the table
# (id, call(tmp_path), regex). The regex names the function and the argument, what was
# expected and what came.

CASES = [
    # act_quant / dequant
    ("act_quant-list", lambda t: nsa_jax.act_quant([[1.0] * 128]),
     r"^act_quant: x must be a float array \[\.\.\., N\], got list"),
    ("act_quant-int-array", lambda t: nsa_jax.act_quant(jnp.ones((2, 128), jnp.int32)),
     r"^act_quant: x must be a float array \[\.\.\., N\], got int32\[2, 128\]"),
    ("act_quant-block-0", lambda t: nsa_jax.act_quant(jnp.ones((2, 128)), block_size=0),
     r"^act_quant: block_size must be a static int >= 1, got 0$"),
    ("act_quant-block-float", lambda t: nsa_jax.act_quant(jnp.ones((2, 128)), block_size=64.0),
     r"^act_quant: block_size must be a static int >= 1, got float 64.0$"),
    ("act_quant-block-str", lambda t: nsa_jax.act_quant(jnp.ones((2, 128)), block_size="128"),
     r"^act_quant: block_size must be a static int >= 1, got str '128'$"),
    ("act_quant-not-multiple", lambda t: nsa_jax.act_quant(jnp.ones((2, 100))),
     r"^act_quant: x's last axis must be a multiple of block_size=128, got float32\[2, 100\]"),
    ("act_quant-scale-fmt", lambda t: nsa_jax.act_quant(jnp.ones((2, 128)), scale_fmt="e8m0"),
     r"^act_quant: scale_fmt must be one of \(None, 'ue8m0'\), got 'e8m0'$"),
    ("dequant-scale-shape", lambda t: nsa_jax.dequant(jnp.zeros((2, 256), F8), jnp.ones((2, 1))),
     r"^dequant: scale must have shape \[2, 2\] .* got float32\[2, 1\]"),
    ("dequant-list", lambda t: nsa_jax.dequant([1.0], jnp.ones((1,))),
     r"^dequant: x_fp8 must be a float array"),
    # rope, hadamard
    ("apply_rope-positions", lambda t: nsa_jax.apply_rope(jnp.ones((4, 2, 128)),
                                                          jnp.arange(3)),
     r"^apply_rope: positions must have shape \[4\] .*got int32\[3\]"),
    ("apply_rope-positions-float", lambda t: nsa_jax.apply_rope(jnp.ones((4, 2, 128)),
                                                                jnp.ones(4)),
     r"^apply_rope: positions must have dtype int32\|"),
    ("apply_rope-x-1d", lambda t: nsa_jax.apply_rope(jnp.ones(128), jnp.arange(1)),
     r"^apply_rope: x must be a float array \[T, \.\.\., D\], got float32\[128\]"),
    ("apply_rope-narrow", lambda t: nsa_jax.apply_rope(jnp.ones((4, 32)), jnp.arange(4)),
     r"^apply_rope: x's last axis must hold at least rope_dim=64 features, got float32\[4, 32\]"),
    ("apply_rope-cfg", lambda t: nsa_jax.apply_rope(jnp.ones((4, 128)), jnp.arange(4), {}),
     r"^apply_rope: cfg must be a RopeConfig, got dict$"),
    ("RopeConfig-odd", lambda t: nsa_jax.RopeConfig(rope_dim=63),
     r"^RopeConfig: rope_dim must be even"),
    ("RopeConfig-theta", lambda t: nsa_jax.RopeConfig(theta="1e4"),
     r"^RopeConfig: theta must be a finite positive number, got str '1e4'$"),
    ("RopeConfig-max-position", lambda t: nsa_jax.RopeConfig(max_position=0),
     r"^RopeConfig: max_position must be a static int >= 1, got 0$"),
    ("hadamard_rotate-not-pow2", lambda t: nsa_jax.hadamard_rotate(jnp.ones((2, 100))),
     r"^hadamard_rotate: x's last axis must be a power of two, got float32\[2, 100\]"),
    ("hadamard_rotate-list", lambda t: nsa_jax.hadamard_rotate([1.0, 2.0]),
     r"^hadamard_rotate: x must be a float array \[\.\.\., n\], got list"),
    # IndexKCache
    ("IndexKCache-lists", lambda t: nsa_jax.IndexKCache([[1]], [[1]]),
     r"^IndexKCache: k_fp8 must be float8_e4m3fn \[num_pages, page_size, D\], got list"),
    ("IndexKCache-scale-list", lambda t: nsa_jax.IndexKCache(jnp.zeros((2, 64, 128), F8), [1]),
     r"^IndexKCache: k_scale must be float32 \[num_pages, page_size\] = \[2, 64\], got list"),
    ("IndexKCache.create-negative", lambda t: nsa_jax.IndexKCache.create(-1),
     r"^IndexKCache\.create: num_pages must be a static int >= 1, got -1$"),
    ("IndexKCache.create-zero", lambda t: nsa_jax.IndexKCache.create(0),
     r"^IndexKCache\.create: num_pages must be a static int >= 1, got 0$"),
    ("IndexKCache.create-str", lambda t: nsa_jax.IndexKCache.create("4"),
     r"^IndexKCache\.create: num_pages must be a static int >= 1, got str '4'$"),
    ("IndexKCache.create-head-dim", lambda t: nsa_jax.IndexKCache.create(4, head_dim=0),
     r"^IndexKCache\.create: head_dim must be a static int >= 1, got 0$"),
    ("IndexKCache.write-rows", lambda t: I().cache.write(
        jnp.arange(3), jnp.zeros((2, 128), F8), jnp.ones(2)),
     r"^IndexKCache\.write: k_fp8 must have shape \[3, 128\] \(float8_e4m3fn\), got "
     r"float8_e4m3fn\[2, 128\]$"),
    ("IndexKCache.write-float32-keys", lambda t: I().cache.write(
        jnp.arange(2), jnp.zeros((2, 128)), jnp.ones(2)),
     r"^IndexKCache\.write: k_fp8 must have dtype float8_e4m3fn \(shape \[2, 128\]\), got "
     r"float32\[2, 128\]$"),
    ("IndexKCache.write-scale-rows", lambda t: I().cache.write(
        jnp.arange(2), jnp.zeros((2, 128), F8), jnp.ones(3)),
     r"^IndexKCache\.write: k_scale must have shape \[2\] \(float32\), got float32\[3\]$"),
    ("IndexKCache.write-float-slots", lambda t: I().cache.write(
        jnp.ones(2), jnp.zeros((2, 128), F8), jnp.ones(2)),
     r"^IndexKCache\.write: slots must be an int array \[N\], got float32\[2\]$"),
    ("IndexKCache.write-list-slots", lambda t: I().cache.write(
        [0, 1], jnp.zeros((2, 128), F8), jnp.ones(2)),
     r"^IndexKCache\.write: slots must be an int array \[N\], got list"),
    ("IndexKCache.from_bytes-list", lambda t: nsa_jax.IndexKCache.from_bytes([1, 2]),
     r"^IndexKCache\.from_bytes: data must be a uint8 array \[num_pages, 8448\], got list"),
    ("IndexKCache.from_bytes-width", lambda t: nsa_jax.IndexKCache.from_bytes(
        jnp.zeros((4, 100), jnp.uint8)),
     r"^IndexKCache\.from_bytes: data must be uint8\[num_pages, 8448\], got uint8\[4, 100\]$"),
    # mqa_logits
    ("mqa_logits-pallas-on-cpu", lambda t: nsa_jax.mqa_logits(*cpu(I().mqa), backend="pallas"),
     r"^mqa_logits: backend='pallas' runs the GPU kernel, but this call runs on cpu; pass "
     r"interpret=True to run the kernel in interpret mode, or backend='xla'"),
    ("mqa_logits-backend", lambda t: nsa_jax.mqa_logits(*I().mqa, backend="cuda"),
     r"^mqa_logits: backend must be one of \('auto', 'pallas', 'xla'\), got 'cuda'$"),
    ("mqa_logits-interpret", lambda t: nsa_jax.mqa_logits(*I().mqa, interpret="yes"),
     r"^mqa_logits: interpret must be a bool, got str 'yes'$"),
    ("mqa_logits-clean", lambda t: nsa_jax.mqa_logits(*I().mqa, clean_logits=None),
     r"^mqa_logits: clean_logits must be a bool, got NoneType None$"),
    ("mqa_logits-q-list", lambda t: nsa_jax.mqa_logits([[1.0]], *I().mqa[1:]),
     r"^mqa_logits: q_fp8 must be an array float8_e4m3fn\[\?, \?, \?\], got list"),
    ("mqa_logits-ks-numpy-int64", lambda t: nsa_jax.mqa_logits(
        *I().mqa[:4], np.zeros(4, np.int64), I().mqa[5]),
     r"^mqa_logits: ks must have dtype int32 \(shape \[4\]\), got int64\[4\]$"),
    # paged_mqa_logits
    ("paged-max-context-negative", lambda t: paged(L=-1),
     r"^paged_mqa_logits: max_context_len must be a static int >= 0, got -1$"),
    ("paged-max-context-float", lambda t: paged(L=192.0),
     r"^paged_mqa_logits: max_context_len must be a static int >= 0, got float 192.0$"),
    ("paged-cache-type", lambda t: paged(cache=I().paged["cache"].k_fp8),
     r"^paged_mqa_logits: cache must be an IndexKCache, got ArrayImpl$"),
    ("paged-pallas-on-cpu", lambda t: paged(q=cpu(I().paged["q_fp8"]), backend="pallas"),
     r"^paged_mqa_logits: backend='pallas' runs the GPU kernel, but this call runs on cpu"),
    ("paged-context-lens-list", lambda t: paged(ctx=[70, 3]),
     r"^paged_mqa_logits: context_lens must be an array int32\[2\], got list"),
    # topk_indices
    ("topk-k-zero", lambda t: nsa_jax.topk_indices(I().logits, *I().mqa[4:], k=0),
     r"^topk_indices: k must be a static int >= 1, got 0$"),
    ("topk-k-bool", lambda t: nsa_jax.topk_indices(I().logits, *I().mqa[4:], k=True),
     r"^topk_indices: k must be a static int >= 1, got True$"),
    ("topk-k-float", lambda t: nsa_jax.topk_indices(I().logits, *I().mqa[4:], k=16.0),
     r"^topk_indices: k must be a static int >= 1, got float 16.0$"),
    ("topk-k-traced", lambda t: jax.jit(lambda k: nsa_jax.topk_indices(
        I().logits, *I().mqa[4:], k=k))(4),
     r"^topk_indices: k must be a static int >= 1, got a traced value"),
    ("topk-ascending", lambda t: nsa_jax.topk_indices(I().logits, *I().mqa[4:], ascending=1),
     r"^topk_indices: ascending must be a bool, got int 1$"),
    ("topk-pallas-on-cpu", lambda t: nsa_jax.topk_indices(*cpu((I().logits, *I().mqa[4:])),
                                                          backend="pallas"),
     r"^topk_indices: backend='pallas' runs the GPU kernel, but this call runs on cpu"),
    # prefill_topk (and its mesh)
    ("prefill-k-zero", lambda t: nsa_jax.prefill_topk(*I().mqa, k=0),
     r"^prefill_topk: k must be a static int >= 1, got 0$"),
    ("prefill-budget-zero", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, budget_bytes=0),
     r"^prefill_topk: budget_bytes must be a static int >= 1 or None, got 0$"),
    ("prefill-budget-float", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, budget_bytes=1e9),
     r"^prefill_topk: budget_bytes must be a static int >= 1 or None, got float 1000000000.0$"),
    ("prefill-pallas-on-cpu", lambda t: nsa_jax.prefill_topk(*cpu(I().mqa), k=4,
                                                             backend="pallas"),
     r"^prefill_topk: backend='pallas' runs the GPU kernel, but this call runs on cpu"),
    ("prefill-split-without-mesh", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, split="keys"),
     r"^prefill_topk: split applies only with a mesh; got split='keys' and mesh=None$"),
    ("prefill-split", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, mesh=I().mesh,
                                                     split="rows"),
     r"^prefill_topk: split must be one of \('queries', 'keys'\), got 'rows'$"),
    ("prefill-mesh-list", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, mesh=jax.devices()),
     r"^prefill_topk: mesh must be a jax\.sharding\.Mesh, got list$"),
    ("prefill-mesh-2-axes", lambda t: nsa_jax.prefill_topk(*I().mqa, k=4, mesh=two_axis_mesh()),
     r"^prefill_topk: mesh must have exactly one axis, got axes \('a', 'b'\)"),
    ("prefill-weights-shape", lambda t: nsa_jax.prefill_topk(*mqa(3, jnp.zeros((3, 4))), k=4),
     r"^prefill_topk: weights must have shape \[4, 4\] \(float32\), got float32\[3, 4\]$"),
    # paged_topk_slots
    ("slots-next-n", lambda t: slots(next_n=0),
     r"^paged_topk_slots: next_n must be a static int >= 1, got 0$"),
    ("slots-k", lambda t: slots(k="4"),
     r"^paged_topk_slots: k must be a static int >= 1, got str '4'$"),
    ("slots-num-pages", lambda t: slots(num_pages=0),
     r"^paged_topk_slots: num_pages must be a static int >= 1 or None, got 0$"),
    ("slots-backend", lambda t: slots(backend="gpu"),
     r"^paged_topk_slots: backend must be one of \('auto', 'pallas', 'xla'\), got 'gpu'$"),
    ("slots-rows", lambda t: slots(logits=jnp.zeros((3, 128))),
     r"^paged_topk_slots: logits must have B \* next_n = 2 rows, got \[3, 128\]$"),
    # build_ragged_batch, planner
    ("build_ragged_batch-traced", lambda t: traced(
        lambda a: nsa_jax.build_ragged_batch(a, [0, 0])),
     r"^build_ragged_batch: extend_lens must be host values \(ints: numpy or a list\), got a "
     r"traced array"),
    ("build_ragged_batch-negative", lambda t: nsa_jax.build_ragged_batch([3, -1], [0, 0]),
     r"^build_ragged_batch: extend_lens must be >= 0, got \[-1\] at requests \[1\]$"),
    ("build_ragged_batch-float", lambda t: nsa_jax.build_ragged_batch([3.5], [0]),
     r"^build_ragged_batch: extend_lens must hold integers, got dtype float64"),
    ("build_ragged_batch-ragged-list", lambda t: nsa_jax.build_ragged_batch([[1], [1, 2]], [0]),
     r"^build_ragged_batch: extend_lens must be ints \(numpy or a list\), got list"),
    ("build_ragged_batch-lengths", lambda t: nsa_jax.build_ragged_batch([3, 1], [0]),
     r"^build_ragged_batch: extend_lens and prefix_lens must have the same length, got 2 and 1$"),
    ("build_ragged_batch-buckets", lambda t: nsa_jax.build_ragged_batch(
        [3], [0], token_buckets=[16, 8]),
     r"^build_ragged_batch: buckets for sum\(extend_lens\) must be strictly increasing"),
    ("build_ragged_batch-bucket-str", lambda t: nsa_jax.build_ragged_batch(
        [3], [0], token_buckets="16"),
     r"^build_ragged_batch: buckets for sum\(extend_lens\) must be a non-empty sequence of "
     r"ints >= 1, got '16'$"),
    ("plan_chunks-zero", lambda t: plan_chunks(0, 10, 100),
     r"^plan_chunks: num_q must be a static int >= 1, got 0$"),
    ("plan_chunks-budget-str", lambda t: plan_chunks(4, 10, "1GB"),
     r"^plan_chunks: budget_bytes must be a static int >= 1, got str '1GB'$"),
    # meshes, budget, checking
    ("make_mesh-empty", lambda t: nsa_jax.make_mesh([]),
     r"^make_mesh: devices must be a non-empty list of jax\.Device, got \[\]$"),
    ("make_mesh-ints", lambda t: nsa_jax.make_mesh([0, 1]),
     r"^make_mesh: devices must hold jax\.Device objects, got int 0$"),
    ("make_mesh-str", lambda t: nsa_jax.make_mesh("cpu"),
     r"^make_mesh: devices must be a list of jax\.Device or None, got str 'cpu'$"),
    ("make_mesh-axis", lambda t: nsa_jax.make_mesh(axis_name=3),
     r"^make_mesh: axis_name must be a non-empty str, got int 3$"),
    ("prime_mesh-list", lambda t: nsa_jax.prime_mesh(jax.devices()),
     r"^prime_mesh: mesh must be a jax\.sharding\.Mesh, got list$"),
    ("prime_mesh-2-axes", lambda t: nsa_jax.prime_mesh(two_axis_mesh()),
     r"^prime_mesh: mesh must have exactly one axis"),
    ("budget.configure-fraction", lambda t: budget.configure(free_fraction=2.0),
     r"^budget\.configure: free_fraction must be a float in \(0, 1\], got 2\.0$"),
    ("budget.configure-bytes", lambda t: budget.configure(host_budget_bytes=0),
     r"^budget\.configure: host_budget_bytes must be a static int >= 1 or None, got 0$"),
    ("budget.prime-device", lambda t: budget.prime("cuda:0"),
     r"^budget: device must be a jax\.Device or None, got str$"),
    ("checking-enabled", lambda t: nsa_jax.checking("yes"),
     r"^checking: enabled must be a bool, got str 'yes'$"),
    # IndexerConfig, Indexer, IndexerSteps
    ("IndexerConfig-topk", lambda t: nsa_jax.IndexerConfig(topk=0),
     r"^IndexerConfig: topk must be a static int >= 1, got 0$"),
    ("IndexerConfig-topk-str", lambda t: nsa_jax.IndexerConfig(topk="2048"),
     r"^IndexerConfig: topk must be a static int >= 1, got str '2048'$"),
    ("IndexerConfig-head-dim", lambda t: nsa_jax.IndexerConfig(head_dim=96),
     r"^IndexerConfig: head_dim must be a power of two"),
    ("IndexerConfig-dtype", lambda t: nsa_jax.IndexerConfig(dtype="float16"),
     r"^IndexerConfig: dtype must be 'bfloat16' or 'float32', got 'float16'$"),
    ("from_hf_config-missing", lambda t: nsa_jax.IndexerConfig.from_hf_config(t / "none.json"),
     r"^IndexerConfig\.from_hf_config: cannot read a config\.json from '.*none\.json'"),
    ("from_hf_config-bad-json", lambda t: nsa_jax.IndexerConfig.from_hf_config(
        text_file(t / "config.json", "{oops")),
     r"^IndexerConfig\.from_hf_config: cannot read a config\.json from '.*config\.json': "
     r"Expecting property name"),
    ("from_hf_config-list", lambda t: nsa_jax.IndexerConfig.from_hf_config([1]),
     r"^IndexerConfig\.from_hf_config: config must be a dict or a path to config\.json, got "
     r"list$"),
    ("Indexer-config", lambda t: nsa_jax.Indexer({}, rngs=nnx.Rngs(0)),
     r"^Indexer: config must be an IndexerConfig, got dict$"),
    ("IndexerSteps-indexer", lambda t: nsa_jax.IndexerSteps(CFG),
     r"^IndexerSteps: indexer must be an nsa_jax\.Indexer, got IndexerConfig$"),
    ("IndexerSteps-budget", lambda t: nsa_jax.IndexerSteps(
        nsa_jax.Indexer(CFG, rngs=nnx.Rngs(0)), budget_bytes=-5),
     r"^IndexerSteps: budget_bytes must be a static int >= 1 or None, got -5$"),
    ("IndexerSteps.prefill-ragged-batch", lambda t: I().steps.prefill(
        I().x, I().x, I().batch, I().cache),
     r"^IndexerSteps\.prefill: inputs must be PrefillInputs \(from nsa_jax\.prefill_inputs\("
     r"batch, block_tables\)\), got RaggedBatch$"),
    ("IndexerSteps.prefill-x-list", lambda t: I().steps.prefill(
        [[0.0]], I().x, I().prefill, I().cache),
     r"^IndexerSteps\.prefill: x must be a float array, got list"),
    ("IndexerSteps.prefill-cache", lambda t: I().steps.prefill(
        I().x, I().x, I().prefill, I().cache.k_fp8),
     r"^IndexerSteps\.prefill: cache must be an IndexKCache, got ArrayImpl$"),
    ("IndexerSteps.decode-prefill-inputs", lambda t: I().steps.decode(
        I().x, I().x, I().prefill, I().cache),
     r"^IndexerSteps\.decode: inputs must be DecodeInputs \(from nsa_jax\.decode_inputs\("
     r"context_lens, block_tables\)\), got PrefillInputs$"),
    # IndexShare
    ("IndexShareSteps-indexers", lambda t: nsa_jax.IndexShareSteps([], [0]),
     r"^IndexShareSteps: indexers must be a dict \{layer: Indexer\}, got list$"),
    ("IndexShareSteps-sources", lambda t: nsa_jax.IndexShareSteps({}, "abc"),
     r"^IndexShareSteps: sources must be a sequence of ints \(one per layer\), got str$"),
    ("IndexShareSteps-sources-float", lambda t: nsa_jax.IndexShareSteps({}, [0, 0.5]),
     r"^IndexShareSteps: sources\[i\] must be a static int >= 0, got float 0\.5$"),
    ("index_sources-int", lambda t: nsa_jax.index_sources(5),
     r"^index_sources: config_or_types must be a config\.json \(dict, file or directory\) or "
     r"a sequence of layer types, got int$"),
    ("index_sources-types", lambda t: nsa_jax.index_sources(["shared"]),
     r"^index_sources: layer types must be 'full' / 'shared' starting with 'full', got "
     r"\['shared'\]$"),
    ("indexer_layer_types-num-layers", lambda t: nsa_jax.indexer_layer_types(
        {"model_type": "glm_moe_dsa"}, num_layers=0),
     r"^indexer_layer_types: num_layers must be a static int >= 1, got 0$"),
    ("indexer_layer_types-missing", lambda t: nsa_jax.indexer_layer_types(t / "nope.json"),
     r"^indexer_layer_types: cannot read a config\.json from '.*nope\.json'"),
    ("load_indexers-missing", lambda t: nsa_jax.load_indexers(t / "nope"),
     r"^load_indexers: checkpoint '.*nope' does not exist$"),
    ("load_indexers-no-config", lambda t: nsa_jax.load_indexers(t),
     r"^load_indexers: '.*' has no config\.json"),
    # compile cache
    ("enable_compile_cache-directory", lambda t: nsa_jax.enable_compile_cache(5),
     r"^enable_compile_cache: directory must be a path \(str or os\.PathLike\) or None, got "
     r"int$"),
    ("enable_compile_cache-secs", lambda t: nsa_jax.enable_compile_cache(t, min_compile_secs=-1),
     r"^enable_compile_cache: min_compile_secs must be a number >= 0, got -1$"),
    # host-side builders
    ("prefill_inputs-batch", lambda t: nsa_jax.prefill_inputs({}, I().tables),
     r"^prefill_inputs: batch must be a RaggedBatch \(nsa_jax\.build_ragged_batch\), got dict$"),
    ("prefill_inputs-traced", lambda t: traced(
        lambda a: nsa_jax.prefill_inputs(I().batch, a[None, :1].repeat(2, 0))),
     r"^prefill_inputs: block_tables must be host values .* got a traced array"),
    ("prefill_inputs-num-pages", lambda t: nsa_jax.prefill_inputs(I().batch, I().tables,
                                                                  num_pages=0),
     r"^prefill_inputs: num_pages must be a static int >= 1 or None, got 0$"),
    ("decode_inputs-traced", lambda t: traced(lambda a: nsa_jax.decode_inputs(a, I().tables)),
     r"^decode_inputs: context_lens must be host values .* got a traced array; decode_inputs "
     r"runs on the host, outside jax\.jit"),
    ("decode_inputs-negative", lambda t: nsa_jax.decode_inputs([-1, 3], I().tables),
     r"^decode_inputs: context_lens must be >= 0, got \[-1, 3\]$"),
    ("decode_inputs-too-long", lambda t: nsa_jax.decode_inputs([500, 3], I().tables),
     r"^decode_inputs: block_tables has 1 pages per row, but request 0 needs 8 for 500 tokens$"),
    ("allocate_block_tables-negative", lambda t: nsa_jax.allocate_block_tables([5, -1]),
     r"^allocate_block_tables: capacities must be a 1-D sequence of ints >= 0, got list"),
    ("allocate_block_tables-traced", lambda t: traced(nsa_jax.allocate_block_tables),
     r"^allocate_block_tables: capacities must be host values .* got a traced array"),
    ("allocate_block_tables-seed", lambda t: nsa_jax.allocate_block_tables([5], seed="a"),
     r"^allocate_block_tables: seed must be a static int >= 0 or None, got str 'a'$"),
    # checkpoints
    ("load_indexer-missing-dir", lambda t: nsa_jax.load_indexer(t / "nope", 0),
     r"^load_indexer: checkpoint '.*nope' does not exist$"),
    ("load_indexer-no-config", lambda t: nsa_jax.load_indexer(t, 0),
     r"^load_indexer: '.*' has no config\.json; pass config=IndexerConfig\(\.\.\.\) or add the "
     r"model's config\.json$"),
    ("load_indexer-file-no-config", lambda t: nsa_jax.load_indexer(
        safetensors_file(t / "a.safetensors", b"{}"), 0),
     r"^load_indexer: config is required when checkpoint is a file, got '.*a\.safetensors'$"),
    ("load_indexer-none", lambda t: nsa_jax.load_indexer(None, 0),
     r"^load_indexer: checkpoint must be a path \(str or os\.PathLike\), got NoneType$"),
    ("load_indexer_params-bad-json", lambda t: nsa_jax.load_indexer_params(
        safetensors_file(t / "b.safetensors", b"{not json}"), 0, CFG),
     r"^read_header: .*b\.safetensors is not a safetensors file \(its 10-byte header is not "
     r"JSON: "),
    ("load_indexer_params-json-list", lambda t: nsa_jax.load_indexer_params(
        safetensors_file(t / "c.safetensors", b"[1, 2]"), 0, CFG),
     r"^read_header: .*c\.safetensors is not a safetensors file \(its header is a JSON list, "
     r"not an object\)$"),
    ("load_indexer_params-layer", lambda t: nsa_jax.load_indexer_params(t, -1, CFG),
     r"^load_indexer_params: layer must be a static int >= 0, got -1$"),
    ("load_indexer_params-config", lambda t: nsa_jax.load_indexer_params(t, 0, {}),
     r"^load_indexer_params: config must be an IndexerConfig, got dict$"),
    ("load_indexer_params-missing", lambda t: nsa_jax.load_indexer_params(t / "nope", 0, CFG),
     r"^load_indexer_params: checkpoint must be a directory of \.safetensors shards or one "
     r"\.safetensors file, got '.*nope' \(not found\)$"),
    ("load_indexer_params-none", lambda t: nsa_jax.load_indexer_params(None, 0, CFG),
     r"^load_indexer_params: checkpoint must be a path \(str or os\.PathLike\), got NoneType$"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_bad_input_is_the_librarys_error(call, match, tmp_path):
  with pytest.raises(ValueError, match=match) as e:
    call(tmp_path)
  assert type(e.value) is ValueError, type(e.value)   # not a jax error that subclasses it


def test_the_table_covers_the_public_api():
  """Every public function and class has at least one row (the CLI is tested elsewhere)."""
  ids = " ".join(i for i, _, _ in CASES)
  not_called = {"budget",              # a module: its functions have rows
                "ChunkPlan",           # plan_chunks' result type; plan_chunks has rows
                "RaggedBatch"}         # build_ragged_batch's result type; it has rows
  aliases = {"mqa_logits": "mqa_logits-", "paged_mqa_logits": "paged-",
             "topk_indices": "topk-", "prefill_topk": "prefill-",
             "paged_topk_slots": "slots-"}
  missing = [n for n in nsa_jax.__all__ if n not in not_called and
             aliases.get(n, n) not in ids]
  assert not missing, missing


# --------------------------------------------------------------------------- static ints

def test_static_ints_take_numpy_ints():
  """Numpy ints (what arithmetic on numpy lengths gives) work wherever a static int goes, and
  share the Python int's compiled program."""
  from tests.test_prefill_topk import count_compiles
  i = I()
  ref = nsa_jax.topk_indices(i.logits, *i.mqa[4:], k=16, backend="xla")
  ks = (np.int64(16), np.int32(16), np.uint8(16), jnp.asarray(16))
  with count_compiles() as compiles:
    for k in ks:
      np.testing.assert_array_equal(nsa_jax.topk_indices(i.logits, *i.mqa[4:], k=k,
                                                         backend="xla"), ref)
  assert compiles == []
  p = i.paged
  L = p["max_context_len"]
  a = nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                               p["block_tables"], max_context_len=np.int64(L), backend="xla")
  b = nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                               p["block_tables"], max_context_len=L, backend="xla")
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      nsa_jax.prefill_topk(*i.mqa, k=np.int64(4), budget_bytes=np.int64(1 << 20)),
      nsa_jax.prefill_topk(*i.mqa, k=4, budget_bytes=1 << 20))
  np.testing.assert_array_equal(slots(next_n=np.int64(1), k=np.int64(4), num_pages=np.int64(9)),
                                slots(next_n=1, k=4, num_pages=9))
  q8, s = nsa_jax.act_quant(jnp.ones((2, 128)), block_size=np.int64(64))
  assert s.shape == (2, 2)
  assert nsa_jax.IndexKCache.create(np.int64(3), head_dim=np.int32(64)).k_fp8.shape == (3, 64, 64)
  plan = nsa_jax.plan_chunks(np.int64(64), np.int64(256), np.int64(4096))
  assert plan == nsa_jax.plan_chunks(64, 256, 4096) and type(plan.rows) is int
  cfg = nsa_jax.IndexerConfig(topk=np.int64(512), n_heads=np.int32(32))
  assert cfg == nsa_jax.IndexerConfig(topk=512, n_heads=32) and type(cfg.topk) is int
  assert hash(cfg) == hash(nsa_jax.IndexerConfig(topk=512, n_heads=32))
  assert nsa_jax.RopeConfig(rope_dim=np.int64(32)) == nsa_jax.RopeConfig(rope_dim=32)
  b = nsa_jax.build_ragged_batch(np.array([5, 3]), np.array([2, 0]),
                                 token_buckets=np.array([8, 16]), key_buckets=[np.int64(16)])
  assert (b.T_pad, b.S_pad) == (8, 16)
  tables, n = nsa_jax.allocate_block_tables(np.array([70]), seed=np.int64(1),
                                            extra_pages=np.int8(2))
  assert n == 4 and tables.shape == (1, 2)
  budget.configure(host_budget_bytes=np.int64(1 << 30))
  try:
    assert budget.prime() == 1 << 30
  finally:
    budget.configure(host_budget_bytes=None)


# --------------------------------------------------------------------------- empty batches

def test_empty_batches_give_empty_results():
  """One rule: a zero-size batch axis (T = 0 queries, B = 0 requests, S = 0 keys, zero
  max_context_len) is valid and gives the documented shape with the zero in it, or -1 slots
  for a top-k without keys; eager and under jit alike."""
  i = I()
  q, kf, sc, w, ks, ke = i.mqa
  no_rows = (q[:0], kf, sc, w[:0], ks[:0], ke[:0])
  no_keys = (q, kf[:0], sc[:0], w, 0 * ks, 0 * ke)
  for f in (lambda g: g, jax.jit):
    out = f(lambda *a: nsa_jax.mqa_logits(*a))(*no_rows)
    assert out.shape == (0, 10) and out.dtype == jnp.float32
    assert f(lambda *a: nsa_jax.mqa_logits(*a))(*no_keys).shape == (4, 0)
    out = f(lambda *a: nsa_jax.prefill_topk(*a, k=8))(*no_rows)
    assert out.shape == (0, 8) and out.dtype == jnp.int32
    np.testing.assert_array_equal(f(lambda *a: nsa_jax.prefill_topk(*a, k=8))(*no_keys),
                                  np.full((4, 8), -1))
    assert f(lambda l, a, b: nsa_jax.topk_indices(l, a, b, k=3))(
        i.logits[:0], ks[:0], ke[:0]).shape == (0, 3)
    np.testing.assert_array_equal(
        f(lambda l, a, b: nsa_jax.topk_indices(l, a, b, k=3))(i.logits[:, :0], 0 * ks, 0 * ke),
        np.full((4, 3), -1))
  p = i.paged
  L = p["max_context_len"]
  empty = (p["q_fp8"][:0], p["cache"], p["weights"][:0], p["context_lens"][:0],
           p["block_tables"][:0])
  out = nsa_jax.paged_mqa_logits(*empty, max_context_len=L)
  assert out.shape == (0, L) and out.dtype == jnp.float32
  out = nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], 0 * p["context_lens"],
                                 p["block_tables"], max_context_len=0)
  assert out.shape == (2, 0)
  assert nsa_jax.paged_topk_slots(jnp.zeros((0, L)), p["context_lens"][:0],
                                  p["block_tables"][:0], next_n=1, k=4).shape == (0, 4)
  np.testing.assert_array_equal(slots(logits=jnp.zeros((2, 0))), np.full((2, 4), -1))
  x8, s = nsa_jax.act_quant(jnp.zeros((0, 128)))
  assert x8.shape == (0, 128) and s.shape == (0, 1)


def test_empty_batches_through_the_layer():
  """The layer follows the same rule: a prefill of no tokens and a decode of no requests."""
  from flax import nnx as _nnx
  m = nsa_jax.Indexer(CFG, rngs=_nnx.Rngs(0))
  cache = nsa_jax.IndexKCache.create(4)
  z = jnp.zeros((0,), jnp.int32)
  inputs = PrefillInputs(positions=z, ks=z, ke=z, token_slots=z, key_slots=z, key_positions=z)
  x = jnp.zeros((0, CFG.dim), jnp.bfloat16)
  idx, cache2 = m.prefill(x, x, inputs, cache, backend="xla")
  assert idx.shape == (0, CFG.topk) and idx.dtype == jnp.int32
  dec = nsa_jax.indexer.DecodeInputs(context_lens=z, block_tables=jnp.zeros((0, 1), jnp.int32))
  idx, _ = m.decode(x, x, dec, cache2, backend="xla")
  assert idx.shape == (0, CFG.topk)
