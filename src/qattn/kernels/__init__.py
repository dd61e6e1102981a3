"""Triton GPU kernels of qattn: K/V quantization and the quantized attention forward."""

from .attention import BlockConfig, attention_forward, attention_forward_varlen, block_config, supports
from .quantize import QuantizedKV, quantize_kv

__all__ = [
    "attention_forward",
    "attention_forward_varlen",
    "supports",
    "block_config",
    "BlockConfig",
    "quantize_kv",
    "QuantizedKV",
]
