"""qattn as a Hugging Face transformers attention implementation.

::

    import qattn.integrations.transformers as qattn_hf
    from transformers import AutoModel

    qattn_hf.register()                                    # name "qattn", default preset
    model = AutoModel.from_pretrained(path, attn_implementation="qattn")
    ...
    print(qattn_hf.report())                               # quantized / fallback counts

    qattn_hf.register("qattn-4b", preset="sage2-4b")      # several names, one preset each
    model.set_attn_implementation("qattn-4b")              # switch a loaded model

Mechanism: ``transformers.AttentionInterface.register(name, fn)`` (the attention
function) and, where transformers has it, ``AttentionMaskInterface.register(name,
sdpa_mask)`` so the model builds its masks exactly as for ``"sdpa"``: ``None`` where
no mask is needed (no padding: the quantized GPU kernels run), else a boolean
[B, 1, Nq, Nk] mask that qattn's reference path takes (on CUDA, a mask falls back to
torch's SDPA until the kernels take masks; :func:`report` says so).

Tested with transformers 5.23 (CPU) and meant for 5.17 (the GPU machine); needs
``AttentionInterface`` (transformers >= 4.48). Before ``AttentionMaskInterface``
(about 4.53) models build their own masks for a custom implementation (additive
float masks), which qattn also takes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..patch import IntegrationRegistration, PatchReport, _Stats, fallback_reason, route_sdpa
from ..presets import QuantConfig, resolve_config

__all__ = ["register", "unregister", "report", "attention_forward", "Registration"]

logger = logging.getLogger("qattn")

_registrations: dict[str, "Registration"] = {}


class Registration(IntegrationRegistration):
    """One registered name: its preset, its counters, ``unregister()``."""

    registry = _registrations
    kind = "registration"

    def __init__(self, name: str, preset: str | QuantConfig | None) -> None:
        super().__init__(name, preset)

        def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    is_causal=None, **kwargs):
            return attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, is_causal=is_causal, preset=self.preset,
                                     _stats=self._stats, **kwargs)

        forward.__name__ = forward.__qualname__ = f"qattn_attention_forward[{name}]"
        self.forward = forward

    def _remove(self) -> None:
        """Remove the name from transformers' registries (models already set to it then
        fail at their next forward; switch them first with ``set_attn_implementation``)."""
        from transformers import AttentionInterface

        AttentionInterface._global_mapping.pop(self.name, None)
        mask_interface = _mask_interface()
        if mask_interface is not None:
            mask_interface._global_mapping.pop(self.name, None)

    def __repr__(self) -> str:
        return f"<qattn transformers registration {self.name!r} preset={self.preset!r}>"


def _mask_interface():
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < ~4.53: models build their own masks
        return None
    return AttentionMaskInterface


def register(name: str = "qattn", preset: str | QuantConfig | None = None) -> Registration:
    """Register qattn with transformers as ``attn_implementation=name``.

    Args:
        name: the implementation name to pass as ``attn_implementation``. Avoid names
            containing "sdpa", "flash" or "flex", and "org/repo" patterns: transformers
            gives those special meanings.
        preset: preset name or :class:`qattn.QuantConfig` for this name's calls
            (default: :func:`qattn.default_preset` at call time).

    Returns:
        A :class:`Registration` (``.report()``, ``.unregister()``). Registering a name
        again replaces the previous registration.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as err:
        raise ImportError(
            "qattn.integrations.transformers needs transformers >= 4.48 (AttentionInterface); "
            f"import failed: {err}"
        ) from err
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name: expected a non-empty implementation name other than 'eager', got {name!r}")
    if any(word in name for word in ("sdpa", "flash", "flex")) or "/" in name:
        raise ValueError(f"name: {name!r} would be taken by transformers for one of its own "
                         "implementations (contains 'sdpa', 'flash', 'flex' or '/'); pick another")
    if preset is not None:
        resolve_config(preset, "sage2-8b")  # fail now on a bad preset
    registration = Registration(name, preset)
    AttentionInterface.register(name, registration.forward)
    mask_interface = _mask_interface()
    if mask_interface is not None:
        from transformers.masking_utils import sdpa_mask

        mask_interface.register(name, sdpa_mask)
    _registrations[name] = registration
    return registration


def unregister(name: str = "qattn") -> None:
    """Undo :func:`register` for ``name`` (no-op if not registered by qattn)."""
    Registration.unregister_name(name)


def report(name: str = "qattn") -> PatchReport:
    """The counters of the registration called ``name``."""
    return Registration.report_name(name)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * groups, N, D], each K/V head repeated ``groups`` times."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _position_bias_mask(position_bias, attention_mask, is_causal, nq, nk, dtype, device):
    """An additive float mask holding ``position_bias`` where attention is allowed."""
    lowest = torch.finfo(dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
        return torch.where(allowed, position_bias, lowest)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, lowest)
    return position_bias + attention_mask


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    preset: str | QuantConfig | None = None,
    _stats: _Stats | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by qattn.

    ``query`` [B, Hq, Nq, D], ``key``/``value`` [B, Hkv, Nk, D]; returns
    (output [B, Nq, Hq, Dv] contiguous, None). Masks, ``is_causal``, ``scaling``,
    ``dropout`` and ``position_bias`` follow transformers' ``"sdpa"`` implementation;
    GQA runs without repeating K/V (``enable_gqa``). Softcapping is refused, as by
    ``"sdpa"``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("qattn attention does not support `softcap`; use `eager` or a flash "
                         "implementation that does")
    if kwargs.get("output_attentions", False):
        _warn_once("qattn attention does not return attention weights (output_attentions=True); "
                   "use attn_implementation='eager' for them")
    cache = kwargs.get("cache")
    if cache is not None:  # paged KV cache (continuous batching): transformers' own path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if _stats is not None:
            _stats.add("fallback", "paged KV cache (transformers' sdpa_attention_forward)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    nq, hq, hkv = query.shape[2], query.shape[1], key.shape[1]
    groups = hq // hkv if hkv and hq != hkv and hq % hkv == 0 else 1

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' sdpa: the flag is for prefill without an explicit mask; a single
    # query token (decoding) sees every cached key.
    is_causal = bool(nq > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > nq:
        # Prefill into an empty static cache: the keys past the queries are unused slots
        # (top-left causal would never reach them).
        key, value = key[:, :, :nq], value[:, :, :nq]

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        position_bias = position_bias[..., : key.shape[2]]
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, nq,
                                             key.shape[2], key.dtype, key.device).contiguous()
        is_causal = False

    enable_gqa = groups > 1
    if enable_gqa and attention_mask is not None and fallback_reason(
            query, key, value, attention_mask, dropout, is_causal, scaling, True) is not None:
        # Going to torch's SDPA, whose fast CUDA kernels take no GQA with a mask (as in
        # transformers' "sdpa"): repeat the K/V heads instead.
        key, value, enable_gqa = _repeat_kv(key, groups), _repeat_kv(value, groups), False

    out = route_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                     is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa,
                     preset=preset, stats=_stats)
    return out.transpose(1, 2).contiguous(), None
