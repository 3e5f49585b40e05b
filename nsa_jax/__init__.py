"""nsa_jax: DeepSeek-V3.2's lightning indexer (sglang's NSA / DSA indexer) in JAX.

Also serves the GLM-5 family's indexer (docs/models.md). Public API: :func:`act_quant`,
:func:`mqa_logits`, :func:`paged_mqa_logits`, :func:`topk_indices`, :class:`IndexKCache`; the
math pieces :func:`apply_rope`, :func:`hadamard_rotate`; and :func:`checking` for opt-in value
checks.
"""

from nsa_jax.cache import IndexKCache
from nsa_jax.hadamard import hadamard_rotate
from nsa_jax.ops import mqa_logits, paged_mqa_logits, topk_indices
from nsa_jax.quant import act_quant, dequant
from nsa_jax.rope import RopeConfig, apply_rope
from nsa_jax.validation import checking
from nsa_jax import budget  # noqa: F401  (nsa_jax.budget.prime / reset / configure)
from nsa_jax.batch import RaggedBatch, build_ragged_batch
from nsa_jax.planner import ChunkPlan, plan_chunks
from nsa_jax import prefill  # noqa: F401  (the single-device routine, no meshes)
from nsa_jax.sharding import make_mesh, prefill_topk, prime_mesh
from nsa_jax.topk_slots import paged_topk_slots
from nsa_jax.config import IndexerConfig, index_sources, indexer_layer_types
from nsa_jax.indexer import Indexer, allocate_block_tables, decode_inputs, prefill_inputs
from nsa_jax.steps import IndexerSteps
from nsa_jax.index_share import IndexShareSteps
from nsa_jax.weights import load_indexer, load_indexer_params, load_indexers
from nsa_jax.compile_cache import enable_compile_cache

__version__ = "0.1.0"

__all__ = ["IndexKCache", "RopeConfig", "act_quant", "apply_rope", "checking", "dequant",
           "hadamard_rotate", "mqa_logits", "paged_mqa_logits", "topk_indices",
           "budget", "ChunkPlan", "RaggedBatch", "build_ragged_batch", "make_mesh",
           "plan_chunks", "prefill_topk", "prime_mesh", "paged_topk_slots",
           "Indexer", "IndexerConfig", "IndexerSteps", "allocate_block_tables", "decode_inputs",
           "load_indexer", "load_indexer_params", "prefill_inputs", "IndexShareSteps",
           "index_sources", "indexer_layer_types", "load_indexers", "enable_compile_cache"]
