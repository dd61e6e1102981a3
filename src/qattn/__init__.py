"""qattn: plug-and-play quantized attention (SageAttention, SageAttention2) for PyTorch."""

__version__ = "0.1.0"

from . import metrics, reference
from .api import (
    DECODE_MAX_Q,
    TensorLayout,
    default_preset,
    sageattn,
    sageattn_varlen,
    sdpa,
    set_default_preset,
)
from .patch import PatchReport, SDPAPatch, is_sdpa_patched, patch_sdpa
from .presets import (
    PRESETS,
    Granularity,
    PVAccum,
    PVDtype,
    QKDtype,
    QuantConfig,
    get_preset,
)

__all__ = [
    "__version__",
    "sageattn",
    "sageattn_varlen",
    "sdpa",
    "DECODE_MAX_Q",
    "TensorLayout",
    "default_preset",
    "set_default_preset",
    "patch_sdpa",
    "SDPAPatch",
    "PatchReport",
    "is_sdpa_patched",
    "QuantConfig",
    "QKDtype",
    "Granularity",
    "PVDtype",
    "PVAccum",
    "PRESETS",
    "get_preset",
    "metrics",
    "reference",
]
