"""What one indexer layer is (:class:`IndexerConfig`) and how to read it from a model's config.json.

The lightning indexer is the same computation in every model nsa_jax serves; the models differ
in its sizes, its rope and which layers run it (docs/models.md). This module turns a Hugging
Face ``config.json`` into those facts:

- :meth:`IndexerConfig.from_hf_config`: one layer's shapes and numerics. Serves
  ``model_type`` ``"deepseek_v32"`` (DeepSeek-V3.2, also DeepSeek's inference-repo config,
  which has no ``model_type``) and ``"glm_moe_dsa"`` (GLM-5, GLM-5.1, GLM-5.2); any other
  ``model_type`` is refused by name.
- :func:`indexer_layer_types` / :func:`index_sources`: GLM-5.2's IndexShare, which layers
  compute indices and which reuse those of an earlier layer.
- :data:`MODELS` / :meth:`IndexerConfig.for_model`: the released models' indexer fields, for
  random-weight runs (the demo's ``--model``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from nsa_jax.quant import SCALE_FORMATS
from nsa_jax.rope import RopeConfig
from nsa_jax.validation import static_int

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")

# Model types that carry an indexer nsa_jax cannot run as such; the error says why.
_UNSERVED = {
    "deepseek_v3": "DeepSeek-V3 has no indexer (dense MLA)",
    "deepseek_v4": ("DeepSeek-V4's indexer scores compressed KV rows (one per 4 tokens, built by "
                    "a learned compressor nsa_jax does not implement); only its top-k sizes "
                    "(512, 1024) are supported, through IndexerConfig(topk=...)"),
}

# The indexer fields of the released models' config.json (the rest of the model is not read).
# deepseek-v3.2: deepseek-ai/DeepSeek-V3.2(-Exp). glm-5: zai-org/GLM-5(-FP8), which GLM-5.1
# shares (same architecture, new weights).
MODELS: dict[str, dict[str, Any]] = {
    "deepseek-v3.2": {
        "model_type": "deepseek_v32", "hidden_size": 7168, "q_lora_rank": 1536,
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "qk_rope_head_dim": 64,
        "rope_theta": 10000, "max_position_embeddings": 163840, "num_hidden_layers": 61,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    },
    "glm-5": {
        "model_type": "glm_moe_dsa", "hidden_size": 6144, "q_lora_rank": 2048,
        "index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048, "qk_rope_head_dim": 64,
        "indexer_rope_interleave": True, "max_position_embeddings": 202752,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
        "num_hidden_layers": 78,
    },
}

# transformers' GlmMoeDsaConfig defaults, applied when a glm_moe_dsa config.json omits a field
# (as transformers itself does when it loads that file).
_GLM_DEFAULTS = {"hidden_size": 6144, "q_lora_rank": 2048, "index_n_heads": 32,
                 "index_head_dim": 128, "index_topk": 2048, "qk_rope_head_dim": 64,
                 "max_position_embeddings": 202752}

_INT_FIELDS = ("dim", "q_lora_rank", "n_heads", "head_dim", "topk", "rope_head_dim",
               "original_max_position", "max_position")


# --------------------------------------------------------------------------- the config

@dataclasses.dataclass(frozen=True)
class IndexerConfig:
  """Shapes and numerics of one indexer layer; the defaults are DeepSeek-V3.2's (671B).

  Attributes:
    dim: hidden size (input width of ``wk`` and ``weights_proj``).
    q_lora_rank: input width of ``wq_b`` (the MLA query's low-rank activations).
    n_heads, head_dim: index heads H and their dim D (a power of two: Hadamard, one fp8
      block per head). DeepSeek-V3.2: 64 x 128; GLM-5: 32 x 128.
    topk: keys kept per query (``index_topk``): 2048 (V3.2, GLM-5), 512 / 1024 (DeepSeek-V4).
    rope_head_dim: rotated features at the start of each head.
    rope_theta, rope_factor, original_max_position, beta_fast, beta_slow, max_position:
      YaRN rope; ``rope_factor`` 1 means plain rope.
    rope_interleave: rotate feature pairs (2i, 2i + 1) (GLM-5's indexer) instead of
      NeoX's (i, i + rope_head_dim / 2) (V3.2's).
    scale_fmt: fp8 scale format of ``act_quant``: None or "ue8m0" (power-of-two scales).
    use_hadamard: rotate q and k before quantizing (V3.2 does).
    dtype: activation and ``wq_b``/``wk`` dtype name ("bfloat16" as V3.2 runs; "float32").
    norm_eps: LayerNorm epsilon of ``k_norm``.
  """

  dim: int = 7168
  q_lora_rank: int = 1536
  n_heads: int = 64
  head_dim: int = 128
  topk: int = 2048
  rope_head_dim: int = 64
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  original_max_position: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  max_position: int = 163840
  scale_fmt: str | None = "ue8m0"
  use_hadamard: bool = True
  dtype: str = "bfloat16"
  norm_eps: float = 1e-6
  rope_interleave: bool = False

  def __post_init__(self):
    fn = "IndexerConfig"
    for name in _INT_FIELDS:
      object.__setattr__(self, name, static_int(fn, name, getattr(self, name), 1))
    D = self.head_dim
    if D & (D - 1):
      raise ValueError(f"{fn}: head_dim must be a power of two (Hadamard rotation, one fp8 "
                       f"block per head), got {D}")
    if self.rope_head_dim > D or self.rope_head_dim % 2:
      raise ValueError(f"{fn}: rope_head_dim must be even and <= head_dim={D}, got "
                       f"{self.rope_head_dim}")
    if self.scale_fmt not in SCALE_FORMATS:
      raise ValueError(f"{fn}: scale_fmt must be one of {SCALE_FORMATS}, got {self.scale_fmt!r}")
    if self.dtype not in ("bfloat16", "float32"):
      raise ValueError(f"{fn}: dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
    if not isinstance(self.rope_interleave, bool):
      raise ValueError(f"{fn}: rope_interleave must be a bool, got {self.rope_interleave!r}")

  @property
  def rope(self) -> RopeConfig:
    return RopeConfig(rope_dim=self.rope_head_dim, theta=float(self.rope_theta),
                      factor=float(self.rope_factor),
                      original_max_position=self.original_max_position,
                      beta_fast=float(self.beta_fast), beta_slow=float(self.beta_slow),
                      max_position=self.max_position, interleave=self.rope_interleave)

  @property
  def act_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "IndexerConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def for_model(cls, name: str, **overrides) -> "IndexerConfig":
    """The indexer of a released model by name (a key of :data:`MODELS`), e.g. "glm-5"."""
    if name not in MODELS:
      raise ValueError(f"IndexerConfig.for_model: name must be one of {sorted(MODELS)}, got "
                       f"{name!r}")
    return cls.from_hf_config(MODELS[name], **overrides)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike,
                     **overrides) -> "IndexerConfig":
    """Builds one indexer layer's config from a HF ``config.json`` (a dict, the file, or its dir).

    ``model_type`` "deepseek_v32" (or absent, as in DeepSeek's inference-repo config):
    reads ``hidden_size`` (``dim``), ``q_lora_rank``, ``index_n_heads``, ``index_head_dim``,
    ``index_topk`` (all required), ``qk_rope_head_dim``, ``rope_theta``, ``rope_scaling``
    (YaRN ``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``;
    ``mscale`` only scales MLA's softmax, not the indexer) or DeepSeek's ``rope_factor``,
    ``original_seq_len``, ``beta_*``, ``max_position_embeddings`` (``max_seq_len``) and
    ``scale_fmt`` (top level or in ``quantization_config``).

    ``model_type`` "glm_moe_dsa" (GLM-5, 5.1, 5.2): the same index fields, defaulting to
    transformers' ``GlmMoeDsaConfig`` values (H 32, D 128, top-2048, hidden 6144,
    q_lora_rank 2048) when absent; rope from ``rope_parameters`` (``rope_theta``,
    ``rope_type``) or the top-level ``rope_theta``, required (no default would be right);
    ``indexer_rope_interleave`` (GLM-5's configs say true; absent means NeoX, as sglang and
    vLLM read it); ``scale_fmt`` "ue8m0" unless the config names one (GLM's configs do not;
    sglang's and vLLM's indexers quantize with ue8m0 scales for every DSA model).

    Any other ``model_type`` raises ValueError naming it. ``overrides`` replace fields.
    """
    fn = "IndexerConfig.from_hf_config"
    config = read_hf_config(config, fn)
    model_type = config.get("model_type")
    if model_type in _UNSERVED:
      raise ValueError(f"{fn}: model_type {model_type!r} is not supported: "
                       f"{_UNSERVED[model_type]}")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"{fn}: model_type {model_type!r} is not supported; nsa_jax reads "
                       f"{list(SUPPORTED_MODEL_TYPES)} configs (or DeepSeek's inference config "
                       f"without model_type)")
    glm = model_type == "glm_moe_dsa"
    if glm:
      config = {**_GLM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}

    missing: list[str] = []

    def pick(*names, default=None, required=False):
      for n in names:
        if config.get(n) is not None:
          return config[n]
      if required:
        missing.append("/".join(names))
      return default

    fields: dict[str, Any] = dict(
        dim=pick("hidden_size", "dim", required=True),
        q_lora_rank=pick("q_lora_rank", required=True),
        n_heads=pick("index_n_heads", required=True),
        head_dim=pick("index_head_dim", required=True),
        topk=pick("index_topk", required=True),
        rope_head_dim=pick("qk_rope_head_dim", "rope_head_dim", default=64),
        rope_interleave=bool(config.get("indexer_rope_interleave") or False),
    )
    if missing:
      raise ValueError(f"{fn}: config lacks the indexer fields {missing} (is this a "
                       f"DeepSeek-V3.2 config?); got keys {sorted(config)}")
    max_pos = pick("max_position_embeddings", "max_seq_len", default=163840)
    fields.update(_rope_fields(config, max_pos, glm, fn))
    fields["max_position"] = max_pos
    quant = config.get("quantization_config") or {}
    fields["scale_fmt"] = config.get("scale_fmt", quant.get("scale_fmt",
                                                            "ue8m0" if glm else None))
    for name in _INT_FIELDS:
      fields[name] = int(fields[name])
    for name in ("rope_theta", "rope_factor", "beta_fast", "beta_slow"):
      if name in fields:
        fields[name] = float(fields[name])
    fields.update(overrides)
    return cls(**fields)


def read_hf_config(config, fn: str = "read_hf_config") -> dict:
  """A config.json as a dict: ``config`` itself (a mapping), or the file, or ``DIR/config.json``."""
  if isinstance(config, (str, os.PathLike)):
    path = os.fspath(config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{fn}: cannot read a config.json from {path!r}: {e}") from None
  if not isinstance(config, Mapping):
    raise ValueError(f"{fn}: config must be a dict or a path to config.json, got "
                     f"{type(config).__name__}")
  return dict(config)


def _rope_fields(config: Mapping, max_pos: int, glm: bool, fn: str) -> dict:
  """rope_theta and the YaRN fields, from whichever of the three layouts the config uses:
  transformers v5's ``rope_parameters`` (theta inside; preferred when both are present, as
  transformers 5 does), v4's ``rope_theta`` + ``rope_scaling``, or DeepSeek's inference
  config (``rope_factor``, ``original_seq_len``)."""
  params = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  rope = params or scaling
  theta = rope.get("rope_theta", config.get("rope_theta"))
  if theta is None:
    if glm:
      raise ValueError(f"{fn}: a glm_moe_dsa config must give rope_parameters.rope_theta (or "
                       f"rope_theta); got keys {sorted(config)}")
    theta = 10000.0
  kind = rope.get("rope_type", rope.get("type", "yarn" if scaling else "default"))
  if rope and kind in ("yarn", "deepseek_yarn"):
    return dict(rope_theta=theta, rope_factor=rope.get("factor", 1.0),
                original_max_position=rope.get("original_max_position_embeddings", max_pos),
                beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0))
  if rope and kind != "default":
    raise ValueError(f"{fn}: rope type must be 'default', 'yarn' or 'deepseek_yarn', got "
                     f"{kind!r}")
  if "rope_factor" in config:  # DeepSeek's inference config
    return dict(rope_theta=theta, rope_factor=config["rope_factor"],
                original_max_position=config.get("original_seq_len", 4096),
                beta_fast=config.get("beta_fast", 32.0), beta_slow=config.get("beta_slow", 1.0))
  return dict(rope_theta=theta, rope_factor=1.0, original_max_position=max_pos)


# --------------------------------------------------------------------------- IndexShare

def indexer_layer_types(config: Mapping[str, Any] | str | os.PathLike,
                        num_layers: int | None = None) -> tuple[str, ...]:
  """Per decoder layer, "full" (computes its own top-k) or "shared" (reuses an earlier one's).

  GLM-5.2's IndexShare (arXiv 2603.12201): most layers carry no indexer weights and reuse the
  indices of the last "full" layer before them. The schedule is, in order of precedence:
  ``indexer_types`` (one "full" / "shared" per layer); ``index_topk_pattern`` ("F" / "S" per
  layer); else ``index_topk_freq`` f (default 1) and ``index_skip_topk_offset`` o (default 2),
  layer i full iff ``max(i - o + 1, 0) % f == 0`` (transformers' formula; GLM-5.2 ships f 4,
  o 3: layers 0, 1, 2, 6, 10, ..., 74 of 78 are full). Configs without these fields (V3.2,
  GLM-5, GLM-5.1) have every layer full.

  Args:
    config: a config.json (dict, file or directory) of a supported ``model_type``.
    num_layers: layers to cover (default ``num_hidden_layers``). Layers past
      ``indexer_types`` / the pattern (an MTP layer, say) follow the freq / offset formula.

  Returns:
    tuple of "full" / "shared", one per layer; layer 0 is always "full".
  """
  fn = "indexer_layer_types"
  config = read_hf_config(config, fn)
  if num_layers is None:
    num_layers = config.get("num_hidden_layers")
    if num_layers is None:
      raise ValueError(f"{fn}: config has no num_hidden_layers; pass num_layers=")
  num_layers = static_int(fn, "num_layers", num_layers, 1)
  listed = config.get("indexer_types")
  if listed is None and config.get("index_topk_pattern") is not None:
    pattern = config["index_topk_pattern"]
    if isinstance(pattern, str) and set(pattern) <= {"F", "S"}:
      listed = ["full" if c == "F" else "shared" for c in pattern]
    elif not isinstance(pattern, str) and all(p in ("full", "shared") for p in pattern):
      listed = list(pattern)
    else:
      raise ValueError(f"{fn}: index_topk_pattern must be a string of 'F' / 'S' or a list of "
                       f"'full' / 'shared', got {pattern!r}")
  if listed is not None:
    bad = [t for t in listed if t not in ("full", "shared")]
    if bad:
      raise ValueError(f"{fn}: indexer_types entries must be 'full' or 'shared', got {bad[:4]}")
  freq = config.get("index_topk_freq")
  freq = 1 if freq is None else freq
  offset = config.get("index_skip_topk_offset")
  offset = 2 if offset is None else offset
  if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
    raise ValueError(f"{fn}: index_topk_freq must be an int >= 1, got {freq!r}")
  if isinstance(offset, bool) or not isinstance(offset, int):
    raise ValueError(f"{fn}: index_skip_topk_offset must be an int, got {offset!r}")
  types = tuple(
      listed[i] if listed is not None and i < len(listed)
      else ("full" if max(i - offset + 1, 0) % freq == 0 else "shared")
      for i in range(num_layers))
  if types[0] != "full":
    raise ValueError(f"{fn}: layer 0 must compute its own indices (there is no earlier layer "
                     f"to reuse), got {types[:4]}...")
  return types


def index_sources(config_or_types, num_layers: int | None = None) -> tuple[int, ...]:
  """Per layer, the layer whose top-k it uses: itself when it computes, else the last
  computing layer before it (IndexShare).

  Args:
    config_or_types: a config.json (dict, file or directory), or the sequence
      :func:`indexer_layer_types` returns.
    num_layers: as for :func:`indexer_layer_types` (config only).

  Returns:
    tuple of ints: ``sources[i] == i`` for layers that compute, ``sources[i] < i`` otherwise.
  """
  if isinstance(config_or_types, (Mapping, str, os.PathLike)):
    types = indexer_layer_types(config_or_types, num_layers)
  else:
    if not hasattr(config_or_types, "__iter__"):
      raise ValueError(f"index_sources: config_or_types must be a config.json (dict, file or "
                       f"directory) or a sequence of layer types, got "
                       f"{type(config_or_types).__name__}")
    types = tuple(config_or_types)
    if not types or types[0] != "full" or any(t not in ("full", "shared") for t in types):
      raise ValueError(f"index_sources: layer types must be 'full' / 'shared' starting with "
                       f"'full', got {list(types)[:6]}")
  sources, last = [], 0
  for i, t in enumerate(types):
    if t == "full":
      last = i
    sources.append(last)
  return tuple(sources)


def computing_layers(sources: Sequence[int]) -> tuple[int, ...]:
  """The layers of ``sources`` (from :func:`index_sources`) that compute their own indices."""
  return tuple(i for i, s in enumerate(sources) if s == i)


__all__ = ["IndexerConfig", "MODELS", "SUPPORTED_MODEL_TYPES", "computing_layers",
           "index_sources", "indexer_layer_types", "read_hf_config"]
