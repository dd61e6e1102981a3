"""The cached direct launcher (``qattn.kernels.launch``): its key and cache logic on the
CPU with a stand-in kernel, and on the GPU the same outputs as Triton's own launch path
over calls whose arguments change what Triton specializes on."""

import pytest
import torch

from qattn import PRESETS
from qattn.kernels import launch


def test_argument_key_separates_what_triton_specializes_on():
    base = torch.zeros(64)
    same = torch.zeros(64)
    key = launch.argument_key
    meta = dict(BLOCK=64, num_warps=4)
    assert key((base, 16, 0.5), meta) == key((same, 16, 0.5), meta)  # aligned, same dtype
    assert key((base, 16, 0.5), meta) != key((base[1:], 16, 0.5), meta)  # 4-byte offset
    assert key((base, 16, 0.5), meta) != key((base.half(), 16, 0.5), meta)
    assert key((base, 16, 0.5), meta) != key((base, 17, 0.5), meta)
    assert key((base, 1, 0.5), meta) != key((base, 2, 0.5), meta)
    assert key((base, 16, 0.5), meta) != key((base, 16, 0.5), dict(BLOCK=128, num_warps=4))
    assert key((base, 16, 0.5), meta) != key((base, 16, 0.5), dict(BLOCK=64, num_warps=8))
    assert key((base, 16, None), meta) != key((base, 16, 0.5), meta)


class _FakeCompiled:
    function, packed_metadata = "function-handle", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJIT:
    """A jit function with parameters (X, n, BLOCK: constexpr, FLAG: constexpr = 1)."""

    def __init__(self):
        self.jit_calls = []
        self.compiled = _FakeCompiled()
        self.device_caches = {0: (None, None, None, None, self._bind)}

    @staticmethod
    def _bind(X, n, BLOCK, FLAG=1, **options):
        return dict(X=X, n=n, BLOCK=BLOCK, FLAG=FLAG), [], options

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            return self.compiled
        return call


class _FakeDriver:
    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 1234


@pytest.fixture
def fake_launcher(monkeypatch):
    monkeypatch.setattr(launch, "driver", _FakeDriver)
    monkeypatch.setattr(launch, "_hooks_installed", lambda: False)
    fn = _FakeJIT()
    launcher = launch.CachedLauncher(fn)
    launcher._direct = True  # as on a tested Triton with a GPU
    return fn, launcher


def test_cached_launcher_reuses_the_compiled_kernel_only_for_the_same_key(fake_launcher):
    fn, launcher = fake_launcher
    x = torch.zeros(64)
    launcher[(3,)](x, 32, BLOCK=16, num_warps=4)  # new key: Triton's path
    assert len(fn.jit_calls) == 1 and not fn.compiled.launches
    launcher[(5, 2)](torch.zeros(64), 32, BLOCK=16, num_warps=4)  # same key: direct
    assert len(fn.jit_calls) == 1
    (launched,) = fn.compiled.launches
    assert launched[:9] == (5, 2, 1, 1234, "function-handle", "packed", None, None, None)
    assert launched[10:] == (32, 16, 1)  # n, then BLOCK and FLAG's default
    for args, meta in (((x[1:], 32), dict(BLOCK=16, num_warps=4)),  # misaligned
                       ((x, 33), dict(BLOCK=16, num_warps=4)),
                       ((x.double(), 32), dict(BLOCK=16, num_warps=4)),
                       ((x, 32), dict(BLOCK=32, num_warps=4)),
                       ((x, 32), dict(BLOCK=16, num_warps=8))):
        launcher[(1,)](*args, **meta)
    assert len(fn.jit_calls) == 6 and len(fn.compiled.launches) == 1


def test_cached_launcher_takes_triton_path_for_unkeyable_arguments(fake_launcher):
    fn, launcher = fake_launcher
    unhashable = [1]
    subclass = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    for _ in range(2):
        launcher[(1,)](unhashable, 32, BLOCK=16)
        launcher[(1,)](subclass, 32, BLOCK=16)
    assert len(fn.jit_calls) == 4 and not fn.compiled.launches
    assert not launcher._compiled


def test_cached_launcher_orders_keyword_values_as_the_signature(fake_launcher):
    fn, launcher = fake_launcher
    x = torch.zeros(4)
    for _ in range(2):
        launcher[(1,)](x, BLOCK=16, n=32)
    assert len(fn.jit_calls) == 1
    (launched,) = fn.compiled.launches
    assert launched[9] is x and launched[10:] == (32, 16, 1)


def test_cached_launcher_without_direct_path_is_triton_launch(monkeypatch):
    fn = _FakeJIT()
    launcher = launch.CachedLauncher(fn)
    launcher._direct = False
    for _ in range(3):
        launcher[(2,)](torch.zeros(4), 8, BLOCK=16)
    assert len(fn.jit_calls) == 3 and not fn.compiled.launches


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["portable", "portable-tma", "gluon-sm90"])
def test_gpu_direct_launches_match_triton_launches(monkeypatch, path):
    """Calls that alternate what Triton specializes on (dtype, strides, a misaligned view,
    lengths, causal) give bit-identical outputs through the cached launchers and through
    plain ``kernel[grid](...)``, for each attention kernel (TMA descriptors included)."""
    import qattn
    from qattn.kernels import attention as attn
    from qattn.kernels import attention_sm90
    from qattn.kernels import quantize as quant

    launchers = [quant._launch_partial_stats, quant._launch_quantize_kv]
    if path == "gluon-sm90":
        if not attention_sm90.AVAILABLE or torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Gluon kernel runs on sm_90 with a tested Triton only")
        monkeypatch.setattr(attention_sm90, "MIN_WORK", 0)
        launchers.append(attention_sm90._launch_sage_fwd_sm90)
    else:
        monkeypatch.setattr(attn, "_USE_SM90", False)
        monkeypatch.setattr(attn, "_TMA_MIN_WORK", 0 if path == "portable-tma" else 2**62)
        launchers.append(attn._launch_attn_fwd)
    if not launchers[0]._direct:
        pytest.skip(f"direct launches are off on triton {launch.triton.__version__}")
    for launcher in launchers:
        monkeypatch.setattr(launcher, "_compiled", {})
    gen = torch.Generator(device="cuda").manual_seed(7)

    def inputs(dtype, n, d, offset):  # offset: elements before the data (misaligns it)
        flats = [torch.randn(2 * 3 * n * d + offset, device="cuda", generator=gen).to(dtype) for _ in range(3)]
        return [flat[offset:].view(2, 3, n, d) for flat in flats]

    cases = [(torch.bfloat16, 200, 128, 0, False), (torch.bfloat16, 200, 128, 0, True),
             (torch.float16, 200, 128, 0, False), (torch.bfloat16, 200, 128, 1, False),
             (torch.bfloat16, 129, 64, 0, True), (torch.bfloat16, 333, 128, 0, True)]
    cases = [(inputs(dtype, n, d, off), causal) for dtype, n, d, off, causal in cases]
    cases.append(([x.transpose(1, 2).contiguous().transpose(1, 2) for x in cases[0][0]], False))  # NHD strides
    preset = PRESETS["sage2-8b"]
    first = [qattn.sageattn(*qkv, is_causal=causal, preset=preset) for qkv, causal in cases]
    again = [qattn.sageattn(*qkv, is_causal=causal, preset=preset) for qkv, causal in cases]  # keys known
    assert all(launcher._compiled for launcher in launchers)
    for launcher in launchers:
        monkeypatch.setattr(launcher, "_direct", False)
    plain = [qattn.sageattn(*qkv, is_causal=causal, preset=preset) for qkv, causal in cases]
    for a, b, c in zip(first, again, plain):
        assert torch.equal(a, c) and torch.equal(b, c)
