"""qattn as a diffusers attention backend.

::

    import qattn.integrations.diffusers as qattn_diffusers

    qattn_diffusers.register()                     # backend "qattn", default preset
    pipe.transformer.set_attention_backend("qattn")
    image = pipe(prompt).images[0]
    print(qattn_diffusers.report())

    from diffusers import attention_backend        # or for a block of code
    with attention_backend("qattn"):
        image = pipe(prompt).images[0]

Mechanism and its limits. diffusers (0.35+, tested on 0.42.1) picks backends through
``diffusers.models.attention_dispatch``: the registry ``_AttentionBackendRegistry``
is keyed by members of the closed enum ``AttentionBackendName``, and both
``set_attention_backend`` and ``attention_backend`` accept only values of that enum.
There is no public hook for a third-party backend, so :func:`register` adds one enum
member (``AttentionBackendName("qattn")``, the way ``aenum.extend_enum`` does; checked
right after, with a clear error if a diffusers or Python version lays its enum out
differently) and registers qattn's function for it through the registry's own
``_AttentionBackendRegistry.register`` decorator. No diffusers function is replaced,
and no existing backend changes. :func:`unregister` removes both again.

What it covers: models whose attention processors call ``dispatch_attention_fn``
(Flux, SD3, Wan, QwenImage, HunyuanVideo, LTX, ... in 0.42). Older-style processors
(``AttnProcessor2_0`` in UNets) call ``torch.nn.functional.scaled_dot_product_attention``
directly and ignore backends: run them under :func:`qattn.patch_sdpa`, which also
routes diffusers' default ``"native"`` backend. Context parallelism and
``return_lse`` are not supported by this backend (it says so).
"""

from __future__ import annotations

import re

import torch

from ..patch import IntegrationRegistration, PatchReport, route_sdpa
from ..presets import QuantConfig, resolve_config

__all__ = ["register", "unregister", "report", "Registration"]

_registrations: dict[str, "Registration"] = {}


def _dispatch_module():
    try:
        from diffusers.models import attention_dispatch
    except ImportError as err:
        raise ImportError(
            "qattn.integrations.diffusers needs diffusers with attention backends "
            f"(diffusers.models.attention_dispatch, 0.35+); import failed: {err}"
        ) from err
    return attention_dispatch


def _add_enum_member(enum_cls, name: str, value: str):
    """Add ``name = value`` to the str-valued Enum ``enum_cls``; return the member."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python 3.13+: attribute + map
    if add_member is not None:
        add_member(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


def _remove_enum_member(enum_cls, member) -> None:
    enum_cls._value2member_map_.pop(member._value_, None)
    enum_cls._member_map_.pop(member._name_, None)
    if member._name_ in enum_cls._member_names_:
        enum_cls._member_names_.remove(member._name_)
    if enum_cls.__dict__.get(member._name_) is member:
        type.__delattr__(enum_cls, member._name_)


class Registration(IntegrationRegistration):
    """One registered backend: its enum member, preset, counters, ``unregister()``."""

    registry = _registrations
    kind = "backend"

    def __init__(self, name: str, preset, member) -> None:
        super().__init__(name, preset)
        self.member = member

    def _remove(self) -> None:
        """Remove the backend and its enum member; models or the global active backend
        still set to it go back to ``"native"``."""
        dispatch = _dispatch_module()
        registry, names = dispatch._AttentionBackendRegistry, dispatch.AttentionBackendName
        if registry._active_backend is self.member:
            registry.set_active_backend(names.NATIVE)
        for table in (registry._backends, registry._constraints, registry._supported_arg_names):
            table.pop(self.member, None)
        registry._supports_context_parallel.discard(self.name)
        _remove_enum_member(names, self.member)

    def __repr__(self) -> str:
        return f"<qattn diffusers backend {self.name!r} preset={self.preset!r}>"


def _make_backend(registration: Registration):
    def qattn_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _parallel_config=None,
    ) -> torch.Tensor:
        # diffusers' backends take [B, S, H, D] ("NHD") and return the same layout.
        if return_lse:
            raise ValueError("the qattn attention backend does not return the LSE (return_lse=True)")
        if _parallel_config is not None:
            raise ValueError("the qattn attention backend does not support context parallelism")
        if (attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape[0] == query.shape[0]
                and attn_mask.shape[1] == key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]  # [B, Sk] -> [B, 1, 1, Sk], as "native"
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = route_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, preset=registration.preset,
                         stats=registration._stats)
        return out.transpose(1, 2)

    qattn_attention.__qualname__ = f"qattn_attention[{registration.name}]"
    return qattn_attention


def register(name: str = "qattn", preset: str | QuantConfig | None = None) -> Registration:
    """Register qattn as the diffusers attention backend ``name``.

    Args:
        name: backend name for ``set_attention_backend`` / ``attention_backend``;
            lower case (diffusers lower-cases names), and not one of diffusers' own.
        preset: preset name or :class:`qattn.QuantConfig` for this backend's calls
            (default: :func:`qattn.default_preset` at call time).

    Returns:
        A :class:`Registration` (``.report()``, ``.unregister()``). Registering the
        same name again replaces the function and preset (same enum member).
    """
    dispatch = _dispatch_module()
    names, registry = dispatch.AttentionBackendName, dispatch._AttentionBackendRegistry
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
        raise ValueError(f"name: expected a lower-case backend name ([a-z][a-z0-9_-]*), got {name!r}")
    if preset is not None:
        resolve_config(preset, "sage2-8b")  # fail now on a bad preset

    previous = _registrations.get(name)
    if previous is not None:
        member = previous.member
    else:
        if name in names._value2member_map_:
            raise ValueError(f"name: {name!r} is one of diffusers' own attention backends; "
                             "qattn registers under a new name (e.g. 'qattn')")
        attr = re.sub(r"\W", "_", name).upper()
        if attr in names._member_map_ or hasattr(names, attr):
            attr = f"QATTN_{attr}"
        member = _add_enum_member(names, attr, name)
        if not (names(name) is member and isinstance(member, names)
                and name in {m.value for m in names.__members__.values()}):
            _remove_enum_member(names, member)
            raise RuntimeError(
                "qattn could not add a member to diffusers' AttentionBackendName on this "
                "Python/diffusers version; use qattn.patch_sdpa() with the 'native' backend instead"
            )

    registration = Registration(name, preset, member)
    registry.register(member, constraints=[])(_make_backend(registration))
    _registrations[name] = registration
    return registration


def unregister(name: str = "qattn") -> None:
    """Undo :func:`register` for ``name`` (no-op if not registered by qattn)."""
    Registration.unregister_name(name)


def report(name: str = "qattn") -> PatchReport:
    """The counters of the backend called ``name``."""
    return Registration.report_name(name)
