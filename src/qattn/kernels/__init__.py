"""GPU kernels of qattn: K/V quantization and the quantized attention forward, in
Triton (portable) and in Gluon (Hopper, chosen by dispatch where it applies)."""

from .attention import (
    BlockConfig,
    attention_forward,
    attention_forward_varlen,
    block_config,
    kernel_name,
    softmax_block,
    supports,
)
from .quantize import QuantizedKV, quantize_kv

__all__ = [
    "attention_forward",
    "attention_forward_varlen",
    "supports",
    "block_config",
    "BlockConfig",
    "kernel_name",
    "softmax_block",
    "quantize_kv",
    "QuantizedKV",
]
