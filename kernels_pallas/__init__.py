"""Pallas GPU kernels for the DeepSeek-V3.2 lightning indexer (device code only).

One kernel per module, each with a frozen config dataclass, the kernel body and one launcher
taking validated arrays: ``mqa_logits`` (ragged prefill), ``paged_mqa_logits`` (paged decode),
``topk`` (top-k selection). Validation, backend choice and model logic live in ``nsa_jax``.
"""
