"""Launching compiled Triton kernels with less host time than ``kernel[grid](...)``.

``kernel[grid](*args, **meta)`` binds and specializes every argument on every call
(~20-27 us of host time per launch on the H200's host for our kernels with 17-35
arguments, triton 3.6), which is most of what a short attention call costs: at
[4, 32, 1024, 128] the GPU work of a call is shorter than its host time. Calling the
compiled kernel's launcher directly takes ~5-7 us.

:class:`CachedLauncher` does that safely: the first call with a new *argument key* goes
through Triton's JIT (which compiles if needed, launches, and returns the compiled
kernel); the key then maps to that compiled kernel. The key holds everything Triton
specializes on: every other argument by value (Triton specializes integers on being 1,
divisible by 16 and fitting 32 bits), every tensor by dtype and by its address modulo 16
(pointer alignment), the keyword arguments (constexprs and launch options) by name and
value, Triton's debug switch and the current device. So a cached kernel is only reused
for calls that Triton itself would send to the same compiled kernel, provided each
argument position keeps its type from call to call (a ``True`` where an earlier call
passed ``1`` would look the same; every call site here passes fixed types). Host TMA
descriptors are keyed by what they are built from (the launcher encodes them on every
launch, as Triton's path does). Unhashable arguments and tensor subclasses make the call
take the JIT path.

Only on the Triton versions this was tested on (:data:`TESTED_TRITON`), not under the
interpreter, and not while a launch hook is installed (profilers such as proton need
Triton's own path); otherwise every call is a plain ``kernel[grid](...)``.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime import driver

__all__ = ["CachedLauncher", "TESTED_TRITON", "argument_key", "cdiv", "interpreting"]

# Triton releases whose launch internals (CompiledKernel.run's arguments) this follows.
TESTED_TRITON = ("3.6.",)
_MAX_ENTRIES = 256  # argument keys kept per kernel (a new sequence length is a new key)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code (``triton.cdiv`` is a constexpr function there,
    ~2 us a call on triton 3.6)."""
    return -(-a // b)


# Read once, as Triton itself decides at import (when kernels are decorated) whether they
# run in its interpreter; reading the environment costs ~1 us a call.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when
    qattn's kernels were imported)."""
    return _INTERPRETING


def _descriptor_types() -> tuple[type, ...]:
    types = []
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        types.append(TensorDescriptor)
    except ImportError:  # pragma: no cover - older triton
        pass
    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
        types.append(GluonTensorDescriptor)
    except ImportError:  # pragma: no cover - a Triton without Gluon
        pass
    return tuple(types)


_DESCRIPTORS = _descriptor_types()


def _descriptor_key(d) -> tuple:
    """A host TMA descriptor by everything it is built from (its layout, for Gluon's)."""
    return (d.base.dtype, d.base.data_ptr() & 15, tuple(d.shape), tuple(d.strides), tuple(d.block_shape),
            getattr(d, "layout", None), d.padding)


def argument_key(args: tuple, meta: dict) -> tuple:
    """What Triton specializes a launch on (see the module docstring), as a tuple."""
    return (tuple([(a.dtype, a.data_ptr() & 15) if type(a) is torch.Tensor
                   else _descriptor_key(a) if type(a) in _DESCRIPTORS else a for a in args]),
            tuple(meta.items()), triton.knobs.runtime.debug)


def _hooks_installed() -> bool:
    runtime = triton.knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


class CachedLauncher:
    """``launcher[grid](*args, **meta)`` launches ``fn`` like ``fn[grid](*args, **meta)``.

    ``args``: the kernel's leading parameters, positional; ``meta``: the rest by name
    (constexprs, plain values) and the launch options (``num_warps`` ...).
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, tuple] = {}
        self._direct = triton.__version__.startswith(TESTED_TRITON) and not _INTERPRETING

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args: tuple, meta: dict) -> None:
        if not self._direct or _hooks_installed():
            self.fn[grid](*args, **meta)
            return
        device = driver.active.get_current_device()
        key = (device, argument_key(args, meta))
        try:
            entry = self._compiled.get(key)
        except TypeError:  # an unhashable argument: Triton's own path
            self.fn[grid](*args, **meta)
            return
        if entry is None:
            self._first_launch(device, key, grid, args, meta)
            return
        kernel, later_values = entry
        grid = (*grid, 1, 1)
        kernel.run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *later_values)

    def _first_launch(self, device, key, grid, args, meta) -> None:
        kernel = self.fn[grid](*args, **meta)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args):
            return  # a tensor subclass is keyed by identity: caching it would only leak it
        # The launcher takes every parameter in signature order, constexprs and defaults
        # included: keep the values after the positional arguments (fixed by the key).
        binder = self.fn.device_caches[device][4]
        values = list(binder(*args, **meta)[0].values())
        if len(self._compiled) >= _MAX_ENTRIES:
            self._compiled.clear()
        self._compiled[key] = (kernel, tuple(values[len(args):]))
