"""The benchmark's table and files, from synthetic rows (the timing itself needs a GPU)."""

import json

import pytest

from qattn.benchmark import markdown_table, write_results


def _rows():
    rows = []
    for n, (q_ms, c_ms) in {1024: (1.0, 2.0), 4096: (8.0, 10.0)}.items():
        for method, ms in (("qattn sage2-8b", q_ms), ("SDPA cuDNN", c_ms)):
            row = {"method": method, "head_dim": 128, "causal": False, "seqlen": n, "ms": ms,
                   "tops": 100.0 / ms, "vs_cudnn": c_ms / ms}
            if method.startswith("qattn"):
                row.update(acc_cosine=0.99931, acc_rel_l1=0.0371)
            rows.append(row)
    return rows


def test_markdown_table_has_ratios_and_accuracy():
    table = markdown_table(_rows())
    assert "### D=128, non-causal" in table
    assert "| 1024 | 100 (2.00x) | 50 (1.00x) | 0.99931 / 0.0371 |" in table
    assert "| 4096 | 12 (1.25x) | 10 (1.00x) |" in table


def test_write_results(tmp_path):
    meta = {"gpu": "Test GPU", "command": "qattn bench", "torch": "x", "triton": "y", "date": "d"}
    write_results(_rows(), tmp_path, meta)
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["meta"]["gpu"] == "Test GPU" and len(data["rows"]) == 4
    assert "Command: `qattn bench`" in (tmp_path / "attention.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "attention.png").stat().st_size > 1000
