"""Loading indexer layers from DeepSeek-V3.2 / GLM-5 safetensors shards (and writing tiny ones).

Tensor names (HF checkpoint, torch ``[out, in]`` Linear weights), the same in DeepSeek-V3.2 and
the GLM-5 family (``glm_moe_dsa``; H = 32 there):

    model.layers.{i}.self_attn.indexer.wq_b.weight             [H * D, q_lora_rank]  fp8 or bf16
    model.layers.{i}.self_attn.indexer.wq_b.weight_scale_inv   [ceil(out/128), ceil(in/128)] f32
    model.layers.{i}.self_attn.indexer.wk.weight               [D, dim]              fp8 or bf16
    model.layers.{i}.self_attn.indexer.wk.weight_scale_inv     (likewise)
    model.layers.{i}.self_attn.indexer.k_norm.weight           [D]
    model.layers.{i}.self_attn.indexer.k_norm.bias             [D]
    model.layers.{i}.self_attn.indexer.weights_proj.weight     [H, dim]              bf16

An fp8 weight is de-quantized block by block, ``w = fp8 * weight_scale_inv`` over 128 x 128
blocks (DeepSeek's ``weight_dequant``; ``quantization_config.weight_block_size`` when the
config.json names another), then rounded to the layer's dtype. The released checkpoints:
V3.2 and GLM-5-FP8 store ``wq_b`` / ``wk`` in fp8 and ``weights_proj`` in bf16 (no scales);
GLM-5's bf16 release stores all four in bf16. Any float dtype is accepted for every tensor.

GLM-5.2's IndexShare layers (``indexer_types`` "shared") have no indexer tensors at all:
:func:`load_indexer` says so for such a layer, and :func:`load_indexers` loads just the
layers that compute.

safetensors' own numpy loader has no fp8 dtype (numpy lacks one), so the few tensors needed
are read here straight from the file format (an 8-byte header length, a JSON header, raw
little-endian data) through a memory map with ml_dtypes' fp8: only the bytes of one layer's
indexer are touched, whatever the shard size.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Mapping, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nsa_jax.config import index_sources, read_hf_config
from nsa_jax.indexer import Indexer, IndexerConfig
from nsa_jax.validation import static_int

HF_PREFIX = "model.layers.{layer}.self_attn.indexer."
WEIGHT_BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


# --------------------------------------------------------------------------- safetensors

def read_header(path: str) -> dict:
  """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}} (+ metadata)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"read_header: {path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise ValueError(f"read_header: {path} is not a safetensors file (header length {n} "
                       f"past the file's {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:  # bad JSON or bad UTF-8
      raise ValueError(f"read_header: {path} is not a safetensors file (its {n}-byte header "
                       f"is not JSON: {e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"read_header: {path} is not a safetensors file (its header is a JSON "
                     f"{type(header).__name__}, not an object)")
  header["__data_start__"] = 8 + n
  return header


def read_tensor(path: str, header: dict, name: str) -> np.ndarray:
  """One tensor of a .safetensors file as a numpy array (fp8 and bf16 via ml_dtypes)."""
  info = header[name]
  if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or
      not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list)
      or len(info["data_offsets"]) != 2):
    raise ValueError(f"read_tensor: {name} in {path} has a malformed header entry (want dtype, "
                     f"shape and two data_offsets), got {info!r}")
  if info["dtype"] not in _DTYPES:
    raise ValueError(f"read_tensor: {name} in {path} has dtype {info['dtype']}, not one of "
                     f"{sorted(_DTYPES)}")
  dtype = np.dtype(_DTYPES[info["dtype"]])
  begin, end = info["data_offsets"]
  shape = tuple(info["shape"])
  count = int(np.prod(shape, dtype=np.int64))
  if end - begin != count * dtype.itemsize:
    raise ValueError(f"read_tensor: {name} in {path} has {end - begin} bytes, expected "
                     f"{count * dtype.itemsize} for {info['dtype']}{list(shape)}")
  mm = np.memmap(path, dtype=np.uint8, mode="r", offset=header["__data_start__"] + begin,
                 shape=(end - begin,)) if count else np.zeros(0, np.uint8)
  return np.array(mm.view(dtype).reshape(shape))  # copy: the map closes with the array


class _Checkpoint:
  """Which file holds which tensor: the HF index file, else every shard's header."""

  def __init__(self, path: str):
    if not isinstance(path, (str, os.PathLike)):
      raise ValueError(f"load_indexer_params: checkpoint must be a path (str or os.PathLike), "
                       f"got {type(path).__name__}")
    path = os.fspath(path)
    self.path = path
    self._index = None
    if os.path.isfile(path):
      files = [path]
    elif os.path.isdir(path):
      index = os.path.join(path, INDEX_FILE)
      if os.path.isfile(index):
        try:
          with open(index) as f:
            self._index = {k: os.path.join(path, v)
                           for k, v in json.load(f)["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
          raise ValueError(f"load_indexer_params: {index} is not a safetensors index (a JSON "
                           f"object with a weight_map of names to files): {e!r}") from None
        files = sorted(set(self._index.values()))
      else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
      raise ValueError(f"load_indexer_params: checkpoint must be a directory of .safetensors "
                       f"shards or one .safetensors file, got {path!r} (not found)")
    if not files:
      raise ValueError(f"load_indexer_params: no .safetensors files in {path!r}")
    self._files = files
    self._headers: dict[str, dict] = {}

  def _header(self, file: str) -> dict:
    if file not in self._headers:
      self._headers[file] = read_header(file)
    return self._headers[file]

  def find(self, name: str):
    """(file, header) holding ``name``, or None."""
    if self._index is not None:
      file = self._index.get(name)
      if file is None:
        return None
      header = self._header(file)
      return (file, header) if name in header else None
    for file in self._files:
      header = self._header(file)
      if name in header:
        return file, header
    return None


# --------------------------------------------------------------------------- de-quantization

def _block_pair(block) -> tuple[int, int]:
  bo, bi = (block, block) if isinstance(block, (int, np.integer)) else tuple(block)
  return int(bo), int(bi)


def dequant_weight(w: np.ndarray, scale_inv: np.ndarray, block=WEIGHT_BLOCK) -> np.ndarray:
  """float32 [out, in] from an fp8 weight [out, in] and its block scales
  [ceil(out / bo), ceil(in / bi)] (``w * scale`` per block, DeepSeek's weight_dequant).
  ``block``: bo = bi, or the pair (bo, bi) (``weight_block_size``)."""
  bo, bi = _block_pair(block)
  out_f, in_f = w.shape
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, 0), bi, 1)[:out_f, :in_f]
  return w.astype(np.float32) * s


def quant_weight(w: np.ndarray, block=WEIGHT_BLOCK):
  """Inverse of :func:`dequant_weight` for writing test checkpoints: (fp8 e4m3 [out, in],
  float32 scales [ceil(out / bo), ceil(in / bi)]), scale = block amax / 448."""
  bo, bi = _block_pair(block)
  w = np.asarray(w, np.float32)
  out_f, in_f = w.shape
  nb_o, nb_i = -(-out_f // bo), -(-in_f // bi)
  pad = np.zeros((nb_o * bo, nb_i * bi), np.float32)
  pad[:out_f, :in_f] = w
  amax = np.abs(pad.reshape(nb_o, bo, nb_i, bi)).max(axis=(1, 3))
  scale = np.maximum(amax, 1e-4) / 448.0
  q = (w / np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out_f, :in_f])
  return np.clip(q, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


# --------------------------------------------------------------------------- loading

def _expected(config: IndexerConfig) -> dict[str, tuple[int, ...]]:
  H, D = config.n_heads, config.head_dim
  return {"wq_b.weight": (H * D, config.q_lora_rank), "wk.weight": (D, config.dim),
          "k_norm.weight": (D,), "k_norm.bias": (D,), "weights_proj.weight": (H, config.dim)}


def load_indexer_params(checkpoint, layer: int, config: IndexerConfig, *,
                        prefix: str | None = None, weight_block=WEIGHT_BLOCK) -> dict:
  """Reads one layer's indexer weights into the nested dict of ``nnx.state(Indexer)``.

  Args:
    checkpoint: a directory of safetensors shards (with or without
      ``model.safetensors.index.json``) or one .safetensors file.
    layer: the decoder layer index i.
    config: the :class:`IndexerConfig` the shapes are checked against.
    prefix: tensor name prefix with ``{layer}``; default
      ``"model.layers.{layer}.self_attn.indexer."``.
    weight_block: the fp8 weights' scale block, an int or (out, in) (``weight_block_size``).

  Returns:
    ``{"wq_b": {"kernel": [q_lora_rank, H*D]}, "wk": {"kernel": [dim, D]},
    "k_norm": {"scale": [D], "bias": [D]}, "weights_proj": {"kernel": [dim, H]}}`` of numpy
    arrays: Linear kernels transposed to [in, out], ``wq_b``/``wk`` in ``config.dtype``, the
    rest float32. fp8 weights are de-quantized with their ``weight_scale_inv``.

  Raises:
    ValueError: listing every missing tensor (including the scale of an fp8 weight) and every
      tensor with the wrong shape or a non-float dtype, with expected and found.
  """
  fn = "load_indexer_params"
  layer = static_int(fn, "layer", layer, 0)
  if not isinstance(config, IndexerConfig):
    raise ValueError(f"{fn}: config must be an IndexerConfig, got {type(config).__name__}")
  bo, bi = _block_pair(weight_block)
  if bo < 1 or bi < 1:
    raise ValueError(f"{fn}: weight_block must be >= 1, got {weight_block!r}")
  ckpt = _Checkpoint(checkpoint)
  pre = (prefix or HF_PREFIX).format(layer=layer)
  missing, wrong, tensors = [], [], {}

  def fetch(name, shape, note=""):
    """The tensor, or None after recording it as missing or mis-shaped."""
    hit = ckpt.find(name)
    if hit is None:
      missing.append(f"{name} {list(shape)}{note}")
      return None
    t = read_tensor(*hit, name)
    if t.shape != shape:
      wrong.append(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
      return None
    return t

  for short, shape in _expected(config).items():
    name = pre + short
    t = fetch(name, shape)
    if t is None:
      continue
    if not (np.issubdtype(t.dtype, np.floating) or t.dtype in _FP8 or
            t.dtype == np.dtype(ml_dtypes.bfloat16)):
      wrong.append(f"{name}: expected a float dtype, got {t.dtype}")
      continue
    if t.dtype in _FP8:
      if t.ndim != 2:
        wrong.append(f"{name}: fp8 is only supported for 2-D weights, got {list(t.shape)}")
        continue
      sname = name[: -len("weight")] + "weight_scale_inv"
      sshape = (-(-shape[0] // bo), -(-shape[1] // bi))
      s = fetch(sname, sshape, f" (the scales of fp8 {name})")
      if s is None:
        continue
      t = dequant_weight(t, s, (bo, bi))
    tensors[short] = t
  if missing or wrong:
    lines = [f"{fn}: checkpoint {ckpt.path!r}, layer {layer}, does not match {config}:"]
    if missing:
      lines.append("missing tensors:\n  " + "\n  ".join(missing))
    if wrong:
      lines.append("wrong tensors:\n  " + "\n  ".join(wrong))
    raise ValueError("\n".join(lines))
  act = np.dtype(config.act_dtype)
  f32 = np.float32
  return {
      "wq_b": {"kernel": tensors["wq_b.weight"].astype(f32).T.astype(act)},
      "wk": {"kernel": tensors["wk.weight"].astype(f32).T.astype(act)},
      "k_norm": {"scale": tensors["k_norm.weight"].astype(f32),
                 "bias": tensors["k_norm.bias"].astype(f32)},
      "weights_proj": {"kernel": tensors["weights_proj.weight"].astype(f32).T.copy()},
  }


def _checkpoint_config(checkpoint, fn: str) -> dict:
  if not isinstance(checkpoint, (str, os.PathLike)):
    raise ValueError(f"{fn}: checkpoint must be a path (str or os.PathLike), got "
                     f"{type(checkpoint).__name__}")
  path = os.fspath(checkpoint)
  if not os.path.exists(path):
    raise ValueError(f"{fn}: checkpoint {path!r} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"{fn}: config is required when checkpoint is a file, got {path!r}")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"{fn}: {path!r} has no config.json; pass config=IndexerConfig(...) or "
                     f"add the model's config.json")
  return read_hf_config(checkpoint, fn)


def _weight_block(hf: Mapping | None):
  block = ((hf or {}).get("quantization_config") or {}).get("weight_block_size")
  return tuple(block) if block else WEIGHT_BLOCK


def _build(config: IndexerConfig, params: dict) -> Indexer:
  # eval_shape: no random initialization of weights that are overwritten right away.
  module = nnx.eval_shape(lambda: Indexer(config, rngs=nnx.Rngs(0)))
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, {k: {n: jnp.asarray(v) for n, v in d.items()}
                                   for k, d in params.items()})
  nnx.update(module, state)
  return module


def load_indexer(checkpoint, layer: int, config: IndexerConfig | None = None, *,
                 prefix: str | None = None, **overrides) -> Indexer:
  """An :class:`Indexer` with layer ``layer``'s weights.

  Args:
    checkpoint: a checkpoint directory (its ``config.json`` gives the config when ``config``
      is None) or one .safetensors file (then ``config`` is required).
    layer: decoder layer index. With config.json, a GLM-5.2 IndexShare layer (one that reuses
      an earlier layer's indices and so has no indexer weights) is refused by name.
    config: the layer's config, or None to read ``config.json``.
    prefix: as for :func:`load_indexer_params`.
    overrides: IndexerConfig fields replacing those of ``config.json`` (e.g. ``topk=``).
  """
  fn = "load_indexer"
  layer = static_int(fn, "layer", layer, 0)
  hf = None
  if config is None:
    hf = _checkpoint_config(checkpoint, fn)
    config = IndexerConfig.from_hf_config(hf, **overrides)
    layers = hf.get("num_hidden_layers")
    if layers:
      src = index_sources(hf, max(int(layers), layer + 1))[layer]
      if src != layer:
        raise ValueError(f"{fn}: layer {layer} has no indexer weights: its config.json "
                         f"(IndexShare) has it reuse layer {src}'s indices; load layer {src}, "
                         f"or use load_indexers() for every computing layer")
  elif overrides:
    config = config.replace(**overrides)
  if hf is None and os.path.isdir(os.fspath(checkpoint)) and os.path.isfile(
      os.path.join(os.fspath(checkpoint), "config.json")):
    hf = read_hf_config(checkpoint, fn)
  params = load_indexer_params(checkpoint, layer, config, prefix=prefix,
                               weight_block=_weight_block(hf))
  return _build(config, params)


def load_indexers(checkpoint, layers: Sequence[int] | None = None, *,
                  prefix: str | None = None, **overrides) -> tuple[tuple[int, ...],
                                                                   dict[int, Indexer]]:
  """The indexer layers of a whole checkpoint that compute indices (IndexShare-aware).

  Args:
    checkpoint: a checkpoint directory with ``config.json`` (its ``num_hidden_layers`` and
      IndexShare fields give the layer schedule, see ``nsa_jax.index_sources``).
    layers: the layers wanted (default all); the computing layers among them are loaded.
    prefix: as for :func:`load_indexer_params`.
    overrides: IndexerConfig fields replacing those of ``config.json``.

  Returns:
    ``(sources, {layer: Indexer})``: ``sources`` per model layer (``index_sources``), and
    one Indexer per computing layer among ``layers``; ready for
    ``nsa_jax.IndexShareSteps(indexers, sources)`` when every layer is loaded.
  """
  fn = "load_indexers"
  hf = _checkpoint_config(checkpoint, fn)
  config = IndexerConfig.from_hf_config(hf, **overrides)
  sources = index_sources(hf)
  wanted = range(len(sources)) if layers is None else layers
  def ok(i):
    try:
      return 0 <= static_int(fn, "layers", i, 0) < len(sources)
    except ValueError:
      return False

  bad = [i for i in wanted if not ok(i)]
  if bad:
    raise ValueError(f"{fn}: layers must be ints in [0, {len(sources)}), got {bad[:8]}")
  wanted = [int(i) for i in wanted]
  block = _weight_block(hf)
  return sources, {i: _build(config, load_indexer_params(checkpoint, i, config, prefix=prefix,
                                                          weight_block=block))
                   for i in sorted(set(wanted)) if sources[i] == i}


# --------------------------------------------------------------------------- writing

def indexer_tensors(indexer: Indexer, layer: int, *, fp8: bool = False,
                    prefix: str | None = None, weight_block=WEIGHT_BLOCK,
                    norm_dtype=np.float32) -> dict[str, np.ndarray]:
  """The layer's weights under the checkpoints' tensor names (numpy, torch [out, in] layout).

  With ``fp8``, ``wq_b`` and ``wk`` are quantized to e4m3 with ``weight_block`` block scales
  (``weight_scale_inv``), as V3.2's and GLM-5-FP8's releases store them; otherwise bf16.
  ``weights_proj`` is bf16; ``k_norm`` is ``norm_dtype``.
  """
  pre = (prefix or HF_PREFIX).format(layer=layer)
  p = nnx.to_pure_dict(nnx.state(indexer))
  np32 = lambda a: np.asarray(jnp.asarray(a, jnp.float32))
  out = {}
  for short in ("wq_b", "wk"):
    w = np32(p[short]["kernel"]).T
    if fp8:
      out[pre + short + ".weight"], out[pre + short + ".weight_scale_inv"] = quant_weight(
          w, weight_block)
    else:
      out[pre + short + ".weight"] = np.ascontiguousarray(w).astype(ml_dtypes.bfloat16)
  out[pre + "k_norm.weight"] = np32(p["k_norm"]["scale"]).astype(norm_dtype)
  out[pre + "k_norm.bias"] = np32(p["k_norm"]["bias"]).astype(norm_dtype)
  out[pre + "weights_proj.weight"] = np.ascontiguousarray(
      np32(p["weights_proj"]["kernel"]).T).astype(ml_dtypes.bfloat16)
  return out


def save_checkpoint(directory, tensors: Mapping[str, np.ndarray], config: Mapping | None = None,
                    *, shards: int = 1) -> None:
  """Writes ``tensors`` as HF-style safetensors shards plus ``model.safetensors.index.json``
  (and ``config.json`` when given) into ``directory``. For tests and demos."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: np.ascontiguousarray(tensors[n]) for n in names[s::shards]}
    save_file(part, os.path.join(directory, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
  if config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(dict(config), f, indent=1)


__all__ = ["HF_PREFIX", "dequant_weight", "indexer_tensors", "load_indexer",
           "load_indexer_params", "load_indexers", "quant_weight", "read_header", "read_tensor",
           "save_checkpoint"]
