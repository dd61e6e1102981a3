"""The benchmark's options, tables, files and shared bookkeeping, from synthetic rows
and CPU calls (the timing of attention itself needs a GPU)."""

import json

import pytest
import torch

from qattn.benchmark import (
    FULL_GRID_N,
    _accuracy,
    _rows,
    _time_methods,
    decode_markdown_table,
    markdown_table,
    resolve_args,
    varlen_lengths,
    varlen_markdown_table,
    write_results,
)
from qattn.cli import build_parser
from qattn.cli import main as cli_main


def _bench_args(*argv):
    return resolve_args(build_parser().parse_args(["bench", *argv]))


def _rows_grid():
    rows = []
    for n, (q_ms, c_ms) in {1024: (1.0, 2.0), 4096: (8.0, 10.0)}.items():
        for method, ms in (("qattn sage2-8b", q_ms), ("SDPA cuDNN", c_ms)):
            row = {"method": method, "head_dim": 128, "causal": False, "seqlen": n, "ms": ms,
                   "tops": 100.0 / ms, "vs_cudnn": c_ms / ms, "baseline": "SDPA cuDNN"}
            if method.startswith("qattn"):
                row.update(acc_cosine=0.99931, acc_rel_l1=0.0371)
            rows.append(row)
    return rows


def test_markdown_table_has_ratios_and_accuracy():
    table = markdown_table(_rows_grid())
    assert "### D=128, non-causal" in table
    assert "| N | qattn sage2-8b | SDPA cuDNN | qattn cosine / rel. L1 |" in table
    assert "| 1024 | 100 (2.00x) | 50 (1.00x) | 0.99931 / 0.0371 |" in table
    assert "| 4096 | 12 (1.25x) | 10 (1.00x) |" in table


def test_markdown_table_names_the_fallback_baseline():
    # cuDNN refused D=256: ratios are to the fastest SDPA backend that ran.
    cases = {"qattn sage2-8b": 1.0, "SDPA flash": 1.5, "SDPA cuDNN": None}
    rows = _rows({"head_dim": 256, "causal": True, "seqlen": 8192}, cases, {}, 1e12)
    table = markdown_table(rows)
    assert "| 8192 (x vs SDPA flash) | 1000 (1.50x) | 667 (1.00x) | - |" in table


def test_write_results(tmp_path):
    meta = {"gpu": "Test GPU", "command": "qattn bench", "torch": "x", "triton": "y", "date": "d"}
    write_results(_rows_grid(), tmp_path, meta)
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["meta"]["gpu"] == "Test GPU" and len(data["rows"]) == 4
    assert "Command: `qattn bench`" in (tmp_path / "attention.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_suite_defaults():
    grid = _bench_args()
    assert grid.suite == "grid" and grid.seqlens == list(FULL_GRID_N) and grid.batch == 4
    assert grid.head_dims == [64, 128] and grid.causal == "both" and grid.key_padding == 0.0
    assert grid.decode_q is None and grid.varlen_total is None
    decode = _bench_args("--suite", "decode")
    assert decode.seqlens == [1024, 4096, 16384, 32768] and decode.decode_q == [1, 4, 16]
    assert (decode.batch, decode.heads, decode.kv_heads, decode.head_dims) == (8, 32, 8, [128])
    assert decode.key_padding is None and decode.causal is None
    varlen = _bench_args("--suite", "varlen")
    assert (varlen.varlen_total, varlen.varlen_max, varlen.head_dims) == (49152, 8192, [64, 128])
    assert varlen.seqlens is None and varlen.batch is None


def test_suite_options_given():
    decode = _bench_args("--suite", "decode", "--decode-q", "1", "8", "--kv-heads", "4",
                         "--seqlens", "2048", "--head-dims", "256", "--batch", "2")
    assert (decode.decode_q, decode.kv_heads, decode.seqlens) == ([1, 8], 4, [2048])
    assert (decode.head_dims, decode.batch) == ([256], 2)
    varlen = _bench_args("--suite", "varlen", "--varlen-total", "4096", "--varlen-max", "512",
                         "--causal", "yes")
    assert (varlen.varlen_total, varlen.varlen_max, varlen.causal) == (4096, 512, "yes")
    grid = _bench_args("--key-padding", "0.25", "--head-dims", "256")
    assert grid.key_padding == 0.25 and grid.head_dims == [256]


@pytest.mark.parametrize("argv, message", [
    (("--suite", "decode", "--key-padding", "0.25"), "--key-padding is an option of --suite grid"),
    (("--suite", "varlen", "--seqlens", "1024"), "--seqlens is an option of --suite grid"),
    (("--suite", "decode", "--causal", "no"), "--causal is an option of --suite grid"),
    (("--decode-q", "4",), "--decode-q is an option of --suite decode"),
    (("--varlen-max", "512",), "--varlen-max is an option of --suite varlen"),
    (("--suite", "decode", "--kv-heads", "5"), "--kv-heads 5 must divide --heads 32"),
])
def test_options_that_do_not_apply_are_refused(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        _bench_args(*argv)
    # The command says so and exits 2 before it looks for a GPU.
    assert cli_main(["bench", *argv]) == 2
    assert message in capsys.readouterr().out


@pytest.mark.parametrize("argv", [("--suite", "prefill"), ("--suite", "decode", "--decode-q", "0"),
                                  ("--suite", "varlen", "--varlen-total", "-5")])
def test_bad_values_are_argparse_errors(argv):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", *argv])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("suite", ["grid", "decode", "varlen"])
def test_bench_without_cuda_exits_2(suite, capsys):
    assert cli_main(["bench", "--suite", suite]) == 2
    assert f"qattn bench --suite {suite} needs a CUDA GPU" in capsys.readouterr().out


def test_varlen_lengths_are_fixed_with_the_requested_total_and_max():
    lengths = varlen_lengths(49152, 8192)
    assert lengths == varlen_lengths(49152, 8192)
    assert sum(lengths) == 49152 and max(lengths) == 8192 and min(lengths) >= 1
    assert 10 < len(lengths) < 100 and sum(n <= 64 for n in lengths) >= 2
    assert varlen_lengths(49152, 8192, seed=1) != lengths
    small = varlen_lengths(1000, 300)
    assert sum(small) == 1000 and max(small) == 300
    assert varlen_lengths(100, 8192) == [100]  # the total caps the longest sequence


def test_rows_ratio_falls_back_to_the_fastest_sdpa_and_counts_kv_bandwidth():
    times = {"qattn auto": 0.5, "qattn quantized": 2.0, "SDPA flash": None, "SDPA cuDNN": None,
             "SDPA efficient": 1.0}
    acc = {"qattn quantized": {"cosine": 0.999, "rel_l1": 0.04, "rmse": 0.01}}
    rows = {r["method"]: r for r in _rows({"q_len": 1, "seqlen": 4096}, times, acc, 2e9,
                                          kv_bytes=10**9)}
    assert rows["qattn auto"]["baseline"] == "SDPA efficient"
    assert rows["qattn auto"]["vs_cudnn"] == pytest.approx(2.0)
    assert rows["qattn auto"]["gbps"] == pytest.approx(2000.0)
    assert rows["qattn quantized"]["tops"] == pytest.approx(1.0)  # 2e9 operations in 2 ms
    assert rows["qattn quantized"]["acc_cosine"] == 0.999 and "acc_cosine" not in rows["qattn auto"]
    assert rows["SDPA cuDNN"]["ms"] is None and rows["SDPA cuDNN"]["vs_cudnn"] is None


def test_time_methods_records_a_refusal_and_accuracy_skips_it(capsys):
    x = torch.ones(4)
    sets = [(x,), (x + 1,)]

    def refuse(_):
        raise RuntimeError("no kernel for this shape")

    methods = {"qattn ok": (lambda t: t * 2, sets), "qattn broken": (refuse, sets),
               "SDPA cuDNN": (torch.neg, sets)}
    times = _time_methods(methods, repeats=2, label="D=64 N=16")
    assert times["qattn ok"] >= 0 and times["SDPA cuDNN"] >= 0 and times["qattn broken"] is None
    assert capsys.readouterr().out == ("qattn broken D=64 N=16: RuntimeError: "
                                       "no kernel for this shape\n")
    acc = _accuracy({"qattn ok": lambda: x * 2, "qattn broken": lambda: refuse(x),
                     "SDPA cuDNN": lambda: -x}, times, x * 2)
    assert list(acc) == ["qattn ok"] and acc["qattn ok"]["cosine"] == pytest.approx(1.0)


def _rows_decode():
    times = {4096: {"qattn auto": 0.1, "qattn quantized": 0.4, "SDPA flash": 0.12,
                    "SDPA cuDNN": 0.11, "SDPA efficient": None},
             32768: {"qattn auto": 0.8, "qattn quantized": 2.0, "SDPA flash": 0.9,
                     "SDPA cuDNN": None, "SDPA efficient": None}}
    acc = {"qattn auto": {"cosine": 0.99999, "rel_l1": 0.0021, "rmse": 0.0},
           "qattn quantized": {"cosine": 0.99925, "rel_l1": 0.0391, "rmse": 0.0}}
    rows = []
    for nk, by_method in times.items():
        case = {"head_dim": 128, "causal": True, "q_len": 4, "seqlen": nk, "batch": 8,
                "heads": 32, "kv_heads": 8, "dtype": "bf16"}
        kv_bytes = 2 * 8 * 8 * nk * 128 * 2
        rows += _rows(case, by_method, acc, 4 * 8 * 32 * (4 * nk - 6) * 128, kv_bytes=kv_bytes)
    return rows


def test_decode_table():
    table = decode_markdown_table(_rows_decode())
    assert "### D=128, Nq=4, B=8, Hq=32, Hkv=8, causal" in table
    assert ("| Nk | qattn auto | qattn quantized | SDPA flash | SDPA cuDNN | SDPA efficient "
            "| qattn auto cosine / rel. L1 | qattn quantized cosine / rel. L1 |") in table
    # K+V of 4096 keys = 2*8*8*4096*128*2 bytes = 134 MB; in 0.1 ms = 1342 GB/s.
    assert ("| 4096 | 0.100 ms, 1342 GB/s (1.10x) | 0.400 ms, 336 GB/s (0.27x) | "
            "0.120 ms, 1118 GB/s (0.92x) | 0.110 ms, 1220 GB/s (1.00x) | - | "
            "0.99999 / 0.0021 | 0.99925 / 0.0391 |") in table
    assert "| 32768 (x vs SDPA flash) | 0.800 ms, 1342 GB/s (1.12x) |" in table


def _rows_varlen():
    times = {"qattn sage2-8b": 2.0, "SDPA nested flash": 3.0, "SDPA nested cuDNN": 2.5,
             "SDPA nested efficient": None, "SDPA padded cuDNN": 10.0,
             "SDPA padded efficient": 20.0}
    acc = {"qattn sage2-8b": {"cosine": 0.99928, "rel_l1": 0.0384, "rmse": 0.0}}
    case = {"head_dim": 128, "causal": True, "sequences": 33, "tokens": 49152,
            "max_seqlen": 8192, "heads": 32, "dtype": "bf16"}
    return _rows(case, times, acc, 4e12, preferred="SDPA nested cuDNN")


def test_varlen_rows_and_table():
    rows = {r["method"]: r for r in _rows_varlen()}
    assert rows["qattn sage2-8b"]["baseline"] == "SDPA nested cuDNN"
    assert rows["qattn sage2-8b"]["vs_cudnn"] == pytest.approx(1.25)
    table = varlen_markdown_table(list(rows.values()))
    assert "### D=128, causal: 33 sequences, 49152 tokens (longest 8192), H=32" in table
    assert "| method | ms | TOPS | qattn sage2-8b speedup | qattn cosine / rel. L1 |" in table
    assert "| qattn sage2-8b | 2.000 | 2000 | 1.00x | 0.99928 / 0.0384 |" in table
    assert "| SDPA nested cuDNN | 2.500 | 1600 | 1.25x |  |" in table
    assert "| SDPA nested efficient | - | - | - |  |" in table
    assert "| SDPA padded efficient | 20.000 | 200 | 10.00x |  |" in table


@pytest.mark.parametrize("suite, rows, stem", [("decode", _rows_decode, "decode"),
                                               ("varlen", _rows_varlen, "varlen")])
def test_write_results_per_suite(tmp_path, suite, rows, stem):
    meta = {"gpu": "Test GPU", "command": f"qattn bench --suite {suite}", "torch": "x",
            "triton": "y", "date": "d", "note": "what was measured"}
    write_results(rows(), tmp_path, meta, stem, suite)
    assert len(json.loads((tmp_path / f"{stem}.json").read_text())["rows"]) == len(rows())
    text = (tmp_path / f"{stem}.md").read_text()
    assert "what was measured" in text and ("| Nk |" in text) == (suite == "decode")
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
