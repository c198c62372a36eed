"""Models: the Llama-family transformer, scalar heads and HF checkpoint interop."""

from jaxalign.models.transformer import (
    RopeScaling,
    Transformer,
    TransformerConfig,
    attention_core,
    forward,
    forward_cached,
    init,
    init_cache,
    is_axes_leaf,
    logical_axes,
    logits,
)

__all__ = [
    "RopeScaling",
    "Transformer",
    "TransformerConfig",
    "attention_core",
    "forward",
    "forward_cached",
    "init",
    "init_cache",
    "is_axes_leaf",
    "logical_axes",
    "logits",
]
