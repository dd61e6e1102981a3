"""Route ``torch.nn.functional.scaled_dot_product_attention`` through :func:`qattn.sdpa`.

::

    import qattn

    with qattn.patch_sdpa(min_seqlen=1024, preset="sage2-8b") as patch:
        images = pipe(prompt)           # any model code that calls F.scaled_dot_product_attention
    print(patch.report())               # how many calls were quantized, fell back, were filtered

    patch = qattn.patch_sdpa()          # or as a plain call ...
    ...
    patch.undo()                        # ... torch's own function object is back in place

Only the attribute ``torch.nn.functional.scaled_dot_product_attention`` is replaced:
code that looks it up at call time (``F.scaled_dot_product_attention(...)``, as
transformers' and diffusers' SDPA paths do) is routed; a reference taken before the
patch (``from torch.nn.functional import scaled_dot_product_attention`` at import
time) keeps calling torch.

The same routing (filter, fallback with its reason, preset, counters) backs the
transformers and diffusers integrations in :mod:`qattn.integrations`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import api
from .presets import QuantConfig, resolve_config

__all__ = ["patch_sdpa", "SDPAPatch", "PatchReport", "is_sdpa_patched", "original_sdpa"]

logger = logging.getLogger("qattn")

SDPAFilter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], bool]


# --------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------


@dataclass
class PatchReport:
    """What happened to the attention calls a patch (or an integration) saw.

    ``quantized``: calls that ran qattn's quantized path. ``fallback``: calls qattn
    handed to torch's SDPA, with the reason from qattn's fallback logic in
    ``fallback_reasons``. ``skipped``: calls the filter sent straight to torch, with
    which test rejected them in ``skip_reasons``.
    """

    preset: str | None = None
    active: bool = False
    quantized: int = 0
    fallback: int = 0
    skipped: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """All calls seen."""
        return self.quantized + self.fallback + self.skipped

    def as_dict(self) -> dict:
        return {
            "preset": self.preset,
            "active": self.active,
            "calls": self.calls,
            "quantized": self.quantized,
            "fallback": self.fallback,
            "skipped": self.skipped,
            "fallback_reasons": dict(self.fallback_reasons),
            "skip_reasons": dict(self.skip_reasons),
        }

    def __str__(self) -> str:
        lines = [
            f"qattn: {self.calls} attention call(s): {self.quantized} quantized "
            f"(preset {self.preset or 'default'}), {self.fallback} fell back to torch SDPA, "
            f"{self.skipped} skipped by the filter"
        ]
        for reason, count in sorted(self.fallback_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  fallback x{count}: {reason}")
        for reason, count in sorted(self.skip_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped  x{count}: {reason}")
        return "\n".join(lines)


class _Stats:
    """Thread-safe counters behind a :class:`PatchReport`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.quantized = 0
        self.fallback: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    def add(self, kind: str, reason: str | None = None) -> None:
        with self._lock:
            if kind == "quantized":
                self.quantized += 1
            elif kind == "fallback":
                self.fallback[reason] += 1
            else:
                self.skipped[reason] += 1

    def reset(self) -> None:
        with self._lock:
            self.quantized = 0
            self.fallback.clear()
            self.skipped.clear()

    def report(self, preset, active: bool) -> PatchReport:
        with self._lock:
            return PatchReport(
                preset=_preset_label(preset),
                active=active,
                quantized=self.quantized,
                fallback=sum(self.fallback.values()),
                skipped=sum(self.skipped.values()),
                fallback_reasons=dict(self.fallback),
                skip_reasons=dict(self.skipped),
            )


def _preset_label(preset) -> str | None:
    if preset is None or isinstance(preset, str):
        return preset
    return repr(preset)


class IntegrationRegistration:
    """What the transformers and diffusers integrations share: a name registered with a
    library, its preset and counters. Subclasses set ``registry`` (their own dict of
    live registrations, by name) and ``kind``, and implement ``_remove()``."""

    registry: dict[str, "IntegrationRegistration"]
    kind: str

    def __init__(self, name: str, preset) -> None:
        self.name = name
        self.preset = preset
        self._stats = _Stats()

    @property
    def active(self) -> bool:
        return self.registry.get(self.name) is self

    def report(self) -> PatchReport:
        """Calls through this registration so far: quantized, fallback (why)."""
        return self._stats.report(self.preset, self.active)

    def reset_report(self) -> None:
        self._stats.reset()

    def unregister(self) -> None:
        """Remove the registration from its library (no-op once removed)."""
        if not self.active:
            return
        self._remove()
        del self.registry[self.name]

    def _remove(self) -> None:
        raise NotImplementedError

    @classmethod
    def unregister_name(cls, name: str) -> None:
        """Undo the registration called ``name`` (no-op if qattn did not register it)."""
        registration = cls.registry.get(name)
        if registration is not None:
            registration.unregister()

    @classmethod
    def report_name(cls, name: str) -> PatchReport:
        """The counters of the registration called ``name``."""
        if name not in cls.registry:
            raise KeyError(f"no qattn {cls.kind} named {name!r}; registered: {sorted(cls.registry)}")
        return cls.registry[name].report()


# --------------------------------------------------------------------------------------
# The routing every integration shares
# --------------------------------------------------------------------------------------

def _torch_function(fn):
    """torch's SDPA behind ``fn`` when ``fn`` is qattn's own (it would recurse)."""
    if fn is api.sdpa or getattr(fn, "__qattn_patch__", False):
        return torch._C._nn.scaled_dot_product_attention
    return fn


# What ``F.scaled_dot_product_attention`` was before the first active patch (put back
# by the last undo), and what fallbacks call: the same, unless that was qattn.sdpa
# itself (assigned by hand), whose own fallback would come back here.
_saved_sdpa = F.scaled_dot_product_attention
_original_sdpa = _torch_function(_saved_sdpa)

# Per-thread depth of qattn.sdpa calls made by this module: an SDPA call arriving while
# one runs is qattn's own fallback, and must reach torch, not the patch again.
_local = threading.local()

def original_sdpa() -> Callable:
    """The ``scaled_dot_product_attention`` in place before qattn patched it (torch's own)."""
    if not _state.patches and F.scaled_dot_product_attention is not _dispatch:
        return _torch_function(F.scaled_dot_product_attention)
    return _original_sdpa


def fallback_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False, preset=None) -> str | None:
    """Why :func:`qattn.sdpa` would hand this call to torch's SDPA, or None (quantized).

    Asks qattn's own fallback logic (``qattn.api._sdpa_fallback_reason``).
    """
    return api._sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal,
                                     enable_gqa, preset)


def _qattn_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, preset):
    return api.sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, preset=preset)


def route_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, *, preset=None, stats: _Stats | None = None,
               torch_sdpa: Callable | None = None):
    """One SDPA call the qattn way: quantized when qattn can, else torch's SDPA.

    Same arguments and result as ``torch.nn.functional.scaled_dot_product_attention``.
    Counts the outcome (and the fallback reason) in ``stats``. ``torch_sdpa`` is what a
    fallback calls (default: :func:`original_sdpa`).
    """
    torch_sdpa = torch_sdpa or original_sdpa()
    gqa = {"enable_gqa": enable_gqa} if enable_gqa else {}
    reason = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             preset)
    if reason is None:
        depth = getattr(_local, "depth", 0)
        _local.depth, _local.inner_fallback = depth + 1, False
        try:
            out = _qattn_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, preset)
        finally:
            _local.depth = depth
        if _local.inner_fallback:  # qattn.sdpa fell back for a reason it did not tell us
            reason = "qattn.sdpa fell back internally (see the 'qattn' logger)"
            _local.inner_fallback = False
        if stats is not None:
            stats.add("fallback" if reason else "quantized", reason)
        return out
    if stats is not None:
        stats.add("fallback", reason)
    log_once = getattr(api, "_log_once", None)
    if log_once is not None:
        log_once(f"qattn.sdpa: using torch SDPA: {reason}")
    return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                      is_causal=is_causal, scale=scale, **gqa)


# --------------------------------------------------------------------------------------
# The patch
# --------------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.patches: tuple[SDPAPatch, ...] = ()  # innermost last


_state = _State()


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while patched."""
    gqa = {"enable_gqa": enable_gqa} if enable_gqa else {}
    if getattr(_local, "depth", 0):  # qattn.sdpa's own fallback: straight to torch
        _local.inner_fallback = True
        return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, **gqa)
    # Innermost patch first; a call it filters out goes to the next one out, then torch.
    for patch in reversed(_state.patches):
        skip = patch._skip_reason(query, key, value, attn_mask, is_causal)
        if skip is None:
            return route_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                              enable_gqa, preset=patch.preset, stats=patch._stats,
                              torch_sdpa=_original_sdpa)
        patch._stats.add("skipped", skip)
    return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, **gqa)


_dispatch.__qattn_patch__ = True  # type: ignore[attr-defined]


def is_sdpa_patched() -> bool:
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is qattn's."""
    return F.scaled_dot_product_attention is _dispatch


class SDPAPatch:
    """Handle of one :func:`patch_sdpa`: ``undo()``, ``report()``, context manager.

    Patches nest: the innermost active one sees a call first; a call its filter rejects
    goes to the next one out, and finally to torch. ``undo()`` may come in any order
    and twice; torch's own function object is put back when the last one is undone.
    """

    def __init__(self, filter: SDPAFilter | None = None, preset: str | QuantConfig | None = None,
                 *, min_seqlen: int | None = None, self_attention_only: bool = False) -> None:
        if filter is not None and not callable(filter):
            raise TypeError(f"filter: expected a callable (query, key, value, attn_mask, "
                            f"is_causal) -> bool, got {type(filter).__name__}")
        if min_seqlen is not None and (isinstance(min_seqlen, bool) or not isinstance(min_seqlen, int)
                                       or min_seqlen < 0):
            raise TypeError(f"min_seqlen: expected a non-negative int or None, got {min_seqlen!r}")
        if not isinstance(self_attention_only, bool):
            raise TypeError(f"self_attention_only: expected True or False, got {self_attention_only!r}")
        if preset is not None:
            resolve_config(preset, "sage2-8b")  # a bad name fails here, not at the first call
        self.filter = filter
        self.preset = preset
        self.min_seqlen = min_seqlen
        self.self_attention_only = self_attention_only
        self._stats = _Stats()

    # -- routing --

    def _skip_reason(self, query, key, value, attn_mask, is_causal) -> str | None:
        if not all(isinstance(x, torch.Tensor) for x in (query, key, value)) or query.dim() < 2:
            return None  # let qattn's fallback logic name the problem
        lq, lk = query.shape[-2], key.shape[-2]
        if self.min_seqlen is not None and min(lq, lk) < self.min_seqlen:
            return f"sequence length < min_seqlen={self.min_seqlen}"
        if self.self_attention_only and lq != lk:
            return "query and key lengths differ (self_attention_only)"
        if self.filter is not None and not self.filter(query, key, value, attn_mask, is_causal):
            return "rejected by filter"
        return None

    # -- life cycle --

    @property
    def active(self) -> bool:
        return self in _state.patches

    def apply(self) -> "SDPAPatch":
        """Install (again); a no-op while active."""
        global _saved_sdpa, _original_sdpa
        with _state.lock:
            if self.active:
                return self
            if not _state.patches:
                current = F.scaled_dot_product_attention
                if current is not _dispatch:
                    _saved_sdpa, _original_sdpa = current, _torch_function(current)
                F.scaled_dot_product_attention = _dispatch
            elif F.scaled_dot_product_attention is not _dispatch:
                logger.warning("qattn.patch_sdpa: torch.nn.functional.scaled_dot_product_attention "
                               "was replaced by someone else while qattn's patch was active; "
                               "calls reach qattn only through that replacement")
            _state.patches = (*_state.patches, self)
        return self

    def undo(self) -> None:
        """Remove this patch; the last one out restores torch's function. Idempotent."""
        with _state.lock:
            if not self.active:
                return
            _state.patches = tuple(p for p in _state.patches if p is not self)
            if _state.patches:
                return
            if F.scaled_dot_product_attention is _dispatch:
                F.scaled_dot_product_attention = _saved_sdpa
            else:
                logger.warning("qattn.patch_sdpa: torch.nn.functional.scaled_dot_product_attention "
                               "was replaced by someone else after qattn patched it; leaving "
                               "that replacement in place (qattn's part of it now passes calls "
                               "straight to torch)")

    def report(self) -> PatchReport:
        """Counts so far: quantized, fallback (with reasons), skipped by the filter."""
        return self._stats.report(self.preset, self.active)

    def reset_report(self) -> None:
        self._stats.reset()

    def __enter__(self) -> "SDPAPatch":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return (f"<qattn.SDPAPatch {state} preset={self.preset!r} min_seqlen={self.min_seqlen} "
                f"self_attention_only={self.self_attention_only} filter={self.filter!r}>")


def patch_sdpa(filter: SDPAFilter | None = None, preset: str | QuantConfig | None = None, *,
               min_seqlen: int | None = None, self_attention_only: bool = False) -> SDPAPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through :func:`qattn.sdpa`.

    Active as soon as it is called; also a context manager (undone on exit).

    Args:
        filter: ``filter(query, key, value, attn_mask, is_causal) -> bool``; calls it
            returns False for go to torch's original function untouched.
        preset: preset name or :class:`qattn.QuantConfig` for the patched calls
            (default: :func:`qattn.default_preset`). Only the patched calls use it; the
            process-wide default is left as it was.
        min_seqlen: only calls whose query length and key length are both at least
            this (e.g. 1024: leave short sequences, decoding steps, and short text
            cross-attention to torch).
        self_attention_only: only calls whose query and key lengths are equal (a shape
            test: cross-attention to a different-length context and decoding with a KV
            cache go to torch).

    Returns:
        An :class:`SDPAPatch`: ``.undo()``, ``.report()``, ``with``.

    Calls that pass the filter still fall back to torch's SDPA where qattn cannot
    take them (dropout, inputs that require grad, masks on CUDA, ...); ``report()``
    counts each reason.
    """
    return SDPAPatch(filter, preset, min_seqlen=min_seqlen,
                     self_attention_only=self_attention_only).apply()
