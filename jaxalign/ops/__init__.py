"""Numerical ops on model outputs: memory-lean token log-probs."""

from jaxalign.ops.logprobs import DEFAULT_CHUNK_SIZE
from jaxalign.ops.logprobs import gather_scored
from jaxalign.ops.logprobs import naive_token_logprobs
from jaxalign.ops.logprobs import sequence_logps
from jaxalign.ops.logprobs import token_logprobs
from jaxalign.ops.logprobs import vocab_parallel_token_logprobs

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "gather_scored",
    "naive_token_logprobs",
    "sequence_logps",
    "token_logprobs",
    "vocab_parallel_token_logprobs",
]
