"""A model's indexer layers under IndexShare: only the layers that compute indices cost anything.

GLM-5.2 runs the indexer on about one layer in four; the others reuse the top-k of the last
layer that ran it (``nsa_jax.config.index_sources``). :class:`IndexShareSteps` holds one
:class:`~nsa_jax.IndexerSteps` per computing layer and nothing for the others: a sharing
layer has no weights, no K cache and no program, and its call returns its source layer's
indices untouched (the same device array: no copy, no compile, no launch).

Every layer uses the same block tables (one page allocator per request, as sglang's per-layer
pools do), so "slots" output from a source layer addresses the same tokens in any layer.
Layers with equal configs share their compiled programs (``IndexerSteps``), so a model with 21
computing layers still compiles one prefill program per bucket.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax

from nsa_jax.cache import IndexKCache
from nsa_jax.config import computing_layers
from nsa_jax.indexer import DecodeInputs, Indexer, IndexerSteps, PrefillInputs
from nsa_jax.validation import static_int


class IndexShareSteps:
  """The jitted indexer steps of all of a model's layers, running only the computing ones.

  Args:
    indexers: {layer: :class:`~nsa_jax.Indexer`} for exactly the layers with
      ``sources[layer] == layer``.
    sources: per layer, the layer whose indices it uses (``nsa_jax.index_sources(config)``;
      ``range(L)`` for a model where every layer computes).
    backend, interpret, budget_bytes, device: as for :class:`~nsa_jax.IndexerSteps`.
  """

  def __init__(self, indexers: Mapping[int, Indexer], sources: Sequence[int], *,
               backend: str = "auto", interpret: bool = False,
               budget_bytes: int | None = None, device=None):
    fn = "IndexShareSteps"
    if not isinstance(indexers, Mapping):
      raise ValueError(f"{fn}: indexers must be a dict {{layer: Indexer}}, got "
                       f"{type(indexers).__name__}")
    if isinstance(sources, (str, bytes)) or not hasattr(sources, "__iter__"):
      raise ValueError(f"{fn}: sources must be a sequence of ints (one per layer), got "
                       f"{type(sources).__name__}")
    sources = tuple(static_int(fn, "sources[i]", s, 0) for s in sources)
    if not sources or any(not 0 <= s <= i or sources[s] != s for i, s in enumerate(sources)):
      raise ValueError(f"{fn}: sources must name, for each layer, itself or an earlier layer "
                       f"that computes (sources[s] == s), got {list(sources)[:12]}")
    need = computing_layers(sources)
    if set(indexers) != set(need):
      raise ValueError(f"{fn}: indexers must be given for exactly the computing layers {need}, "
                       f"got {sorted(indexers)}")
    for layer, m in indexers.items():
      if not isinstance(m, Indexer):
        raise ValueError(f"{fn}: indexers[{layer}] must be an Indexer, got {type(m).__name__}")
    self.sources = sources
    self.computing = need
    self.steps = {layer: IndexerSteps(indexers[layer], backend=backend, interpret=interpret,
                                      budget_bytes=budget_bytes, device=device)
                  for layer in need}

  @property
  def num_layers(self) -> int:
    return len(self.sources)

  def create_caches(self, num_pages: int) -> dict[int, IndexKCache]:
    """Empty K caches of ``num_pages`` pages, one per computing layer (sharing layers have none)."""
    return {layer: IndexKCache.create(num_pages, self.steps[layer].config.head_dim)
            for layer in self.computing}

  def _check_layer(self, layer, fn) -> int:
    layer = static_int(fn, "layer", layer, 0)
    if layer >= self.num_layers:
      raise ValueError(f"{fn}: layer must be an int in [0, {self.num_layers}), got {layer}")
    return layer

  def _run(self, kind, layer, x, qr, inputs, caches, reuse, output):
    fn = f"IndexShareSteps.{kind}"
    layer = self._check_layer(layer, fn)
    src = self.sources[layer]
    if src != layer:
      if reuse is None:
        raise ValueError(f"{fn}: layer {layer} reuses layer {src}'s indices; pass them as "
                         f"reuse= (x and qr are not read)")
      return reuse, caches
    if reuse is not None:
      raise ValueError(f"{fn}: layer {layer} computes its own indices; reuse must be None")
    if layer not in caches:
      raise ValueError(f"{fn}: caches has no K cache for computing layer {layer} (keys: "
                       f"{sorted(caches)}); make them with create_caches()")
    step = getattr(self.steps[layer], kind)
    idx, new = step(x, qr, inputs, caches[layer], output=output)
    return idx, {**caches, layer: new}

  def prefill(self, layer: int, x, qr, inputs: PrefillInputs, caches: Mapping[int, IndexKCache],
              *, reuse=None, output: str = "slots"):
    """Layer ``layer``'s prefill top-k.

    A computing layer runs :meth:`IndexerSteps.prefill` on its own activations and cache
    (donated, as there). A sharing layer computes nothing: it returns ``reuse``, the indices
    its source layer ``sources[layer]`` returned, and the caches unchanged.

    Args:
      layer: decoder layer index.
      x, qr: the layer's float [T_pad, dim] / [T_pad, q_lora_rank] (None for sharing layers).
      inputs: :class:`~nsa_jax.indexer.PrefillInputs` (the same for every layer).
      caches: {computing layer: IndexKCache}, from :meth:`create_caches` or the last call.
      reuse: int32 [T_pad, topk] indices of ``sources[layer]`` (sharing layers only).
      output: "slots" | "positions" | "keys".

    Returns:
      ``(int32 [T_pad, topk] indices, the caches dict with this layer's cache replaced)``.
    """
    return self._run("prefill", layer, x, qr, inputs, caches, reuse, output)

  def decode(self, layer: int, x, qr, inputs: DecodeInputs, caches: Mapping[int, IndexKCache],
             *, reuse=None, output: str = "slots"):
    """Layer ``layer``'s decode top-k; as :meth:`prefill`, with :meth:`IndexerSteps.decode`
    (x, qr: float [B_pad * next_n, dim] / [B_pad * next_n, q_lora_rank])."""
    return self._run("decode", layer, x, qr, inputs, caches, reuse, output)

  def _all(self, kind, activations, inputs, caches, output):
    fn = f"IndexShareSteps.{kind}_all"
    missing = [layer for layer in self.computing if layer not in activations]
    if missing:
      raise ValueError(f"{fn}: activations must hold (x, qr) for every computing layer; "
                       f"missing {missing}")
    out: list[jax.Array] = []
    for layer in range(self.num_layers):
      src = self.sources[layer]
      x, qr = activations[layer] if src == layer else (None, None)
      idx, caches = self._run(kind, layer, x, qr, inputs, caches,
                              out[src] if src != layer else None, output)
      out.append(idx)
    return out, caches

  def prefill_all(self, activations: Mapping[int, tuple], inputs: PrefillInputs,
                  caches: Mapping[int, IndexKCache], *, output: str = "slots"):
    """Every layer's prefill top-k in layer order, for activations known up front (tests,
    benchmarks; a real model calls :meth:`prefill` layer by layer as its activations appear).

    Args:
      activations: {computing layer: (x, qr)}; sharing layers need none.

    Returns:
      ``(list of L index arrays, one per layer, a sharing layer's being its source's array
      itself; the new caches dict)``.
    """
    return self._all("prefill", activations, inputs, caches, output)

  def decode_all(self, activations: Mapping[int, tuple], inputs: DecodeInputs,
                 caches: Mapping[int, IndexKCache], *, output: str = "slots"):
    """Every layer's decode top-k in layer order; as :meth:`prefill_all`."""
    return self._all("decode", activations, inputs, caches, output)


__all__ = ["IndexShareSteps"]
