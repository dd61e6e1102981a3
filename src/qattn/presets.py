"""Quantization settings: one frozen dataclass, and the named presets users pick from.

A :class:`QuantConfig` says exactly what the attention call quantizes and how; the
reference (``qattn.reference``) and the GPU kernels read the same object, so a preset
means the same numbers on the CPU and on the GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "QKDtype",
    "Granularity",
    "PVDtype",
    "PVAccum",
    "QuantConfig",
    "PRESETS",
    "get_preset",
    "resolve_config",
]


class QKDtype(str, Enum):
    """Integer type of the quantized Q and K (symmetric, zero point 0)."""

    INT8 = "int8"  # values in [-127, 127]
    INT4 = "int4"  # values in [-7, 7]


class Granularity(str, Enum):
    """How many rows share one quantization scale.

    ``BLOCK``: Q in groups of 128 rows, K in groups of 64 tokens (SageAttention v1).
    ``WARP``: Q in groups of 16 rows (the rows one warp of a Hopper/Ampere MMA owns),
    K in groups of 64 tokens (SageAttention2's per-warp mode).
    ``TOKEN``: one scale per row of Q and per token of K (finest).
    """

    BLOCK = "block"
    WARP = "warp"
    TOKEN = "token"


class PVDtype(str, Enum):
    """Type of P~ and V in the second matrix product."""

    FP16 = "fp16"  # P~ and V rounded to fp16, unscaled
    FP8 = "fp8"  # E4M3: P~ times the static 448, V scaled per channel to [-448, 448]


class PVAccum(str, Enum):
    """How each K/V block's product P~ V is accumulated into the fp32 output."""

    FP32 = "fp32"  # fresh fp32 buffer per block, added in fp32 (two-level accumulation)
    FP16 = "fp16"  # the block's product is accumulated in fp16, then added in fp32 (v1)


# Rows per scale group for each granularity: (Q rows, K tokens).
_GROUP_ROWS = {
    Granularity.BLOCK: (128, 64),
    Granularity.WARP: (16, 64),
    Granularity.TOKEN: (1, 1),
}

# Q rows that share one mean when Q is smoothed (SageAttention2-4b's Q block).
SMOOTH_Q_BLOCK = 128


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides the numbers of a quantized attention call.

    Build one by hand (``QuantConfig(qk_dtype="int4", smooth_q=True)``), take a named
    preset (``get_preset("sage2-8b")``), or derive one (``dataclasses.replace``).
    String values are accepted for every enum field and converted.
    """

    qk_dtype: QKDtype = QKDtype.INT8
    granularity: Granularity = Granularity.WARP
    smooth_k: bool = True
    smooth_q: bool = False
    pv_dtype: PVDtype = PVDtype.FP8
    pv_accum: PVAccum = PVAccum.FP32
    smooth_v: bool = False

    def __post_init__(self) -> None:
        for field, enum in (
            ("qk_dtype", QKDtype),
            ("granularity", Granularity),
            ("pv_dtype", PVDtype),
            ("pv_accum", PVAccum),
        ):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum(value))
            except ValueError:
                accepted = ", ".join(repr(e.value) for e in enum)
                raise ValueError(
                    f"QuantConfig.{field}: got {value!r}; accepted: {accepted}"
                ) from None
        for field in ("smooth_k", "smooth_q", "smooth_v"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(
                    f"QuantConfig.{field}: got {getattr(self, field)!r}; accepted: True or False"
                )
        if self.pv_dtype is PVDtype.FP8 and self.pv_accum is PVAccum.FP16:
            raise ValueError(
                "QuantConfig.pv_accum: 'fp16' accumulation is only defined for pv_dtype='fp16'; "
                "FP8 P~V always uses two-level fp32 accumulation ('fp32')"
            )

    @property
    def qk_max(self) -> int:
        """Largest quantized magnitude: 127 for INT8, 7 for INT4."""
        return 127 if self.qk_dtype is QKDtype.INT8 else 7

    @property
    def q_group(self) -> int:
        """Q rows that share one scale."""
        return _GROUP_ROWS[self.granularity][0]

    @property
    def k_group(self) -> int:
        """K tokens that share one scale."""
        return _GROUP_ROWS[self.granularity][1]

    def replace(self, **changes) -> "QuantConfig":
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)


# A constant (not computed per call) so torch.compile traces resolve_config.
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(QuantConfig))

PRESETS: dict[str, QuantConfig] = {
    # SageAttention v1: INT8 QK per block, smooth K, FP16 P~V with fp16 block accumulation.
    "sage1": QuantConfig(
        qk_dtype="int8",
        granularity="block",
        smooth_k=True,
        pv_dtype="fp16",
        pv_accum="fp16",
    ),
    # SageAttention2-8b: INT8 QK per warp, smooth K, FP8 P~V, two-level accumulation.
    "sage2-8b": QuantConfig(
        qk_dtype="int8",
        granularity="warp",
        smooth_k=True,
        pv_dtype="fp8",
        pv_accum="fp32",
    ),
    # SageAttention2-4b: INT4 QK per warp, smooth Q and K, FP8 P~V, two-level accumulation.
    "sage2-4b": QuantConfig(
        qk_dtype="int4",
        granularity="warp",
        smooth_k=True,
        smooth_q=True,
        pv_dtype="fp8",
        pv_accum="fp32",
    ),
}


def get_preset(name: str) -> QuantConfig:
    """The preset called ``name`` (see ``PRESETS``)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset: got {name!r}; accepted: {', '.join(map(repr, PRESETS))}")
    return PRESETS[name]


# Keyword names of the original SageAttention's ``sageattn`` that map onto our fields.
_ORIGINAL_GRANULARITY = {"per_warp": "warp", "per_thread": "token", "per_block": "block"}
_ORIGINAL_PV_ACCUM = {"fp32": "fp32", "fp32+fp32": "fp32", "fp32+fp16": "fp32", "fp16": "fp16"}


def resolve_config(
    preset: str | QuantConfig | None, default: str | QuantConfig, **options
) -> QuantConfig:
    """Turn ``sageattn``'s ``preset=`` and keyword options into one QuantConfig.

    ``options`` may name any QuantConfig field, or the original SageAttention's
    ``qk_quant_gran`` ('per_warp', 'per_thread') and ``pv_accum_dtype``
    ('fp32', 'fp32+fp32', 'fp16'). Anything else is a TypeError naming it.
    """
    if preset is None:
        preset = default
    if isinstance(preset, QuantConfig):
        config = preset
    else:
        config = get_preset(preset)

    for original, field, mapping in (
        ("qk_quant_gran", "granularity", _ORIGINAL_GRANULARITY),
        ("pv_accum_dtype", "pv_accum", _ORIGINAL_PV_ACCUM),
    ):
        if original in options:
            value = options.pop(original)
            if value not in mapping:
                raise ValueError(
                    f"{original}: got {value!r}; accepted: {', '.join(map(repr, mapping))}"
                )
            options[field] = mapping[value]

    fields = _FIELD_NAMES
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"unexpected option(s) {', '.join(map(repr, unknown))}; accepted: preset, "
            f"{', '.join(sorted(fields))}, qk_quant_gran, pv_accum_dtype"
        )
    return config.replace(**options) if options else config
