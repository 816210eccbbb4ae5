"""Routing core: per-sample traces, their wire format, and the token order each Megatron router sees."""

from mindspeed_rl_r3.routing.codec import decode, decode_group, encode, encode_group, encoded_words, payload_words
from mindspeed_rl_r3.routing.trace import (
    MoEModelSpec,
    RoutingError,
    RoutingTrace,
    compact_dtype,
    token_fingerprint,
    validate_batch,
    validate_trace,
)

__all__ = [
    "MoEModelSpec",
    "RoutingError",
    "RoutingTrace",
    "compact_dtype",
    "decode",
    "decode_group",
    "encode",
    "encode_group",
    "encoded_words",
    "payload_words",
    "token_fingerprint",
    "validate_batch",
    "validate_trace",
]
