"""The ``qattn`` command, in-process, on the CPU."""

import json

import torch
from helpers import make_qkv

from qattn.cli import main


def test_check_json_reports_every_preset_and_passes(capsys):
    assert main(["check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in data["rows"]}
    assert {"sage1", "sage2-8b", "sage2-4b"} <= methods
    judged = [r for r in data["rows"] if r["pass"] is not None]
    assert judged and all(r["pass"] for r in judged)
    assert all(0.9 < r["cosine"] <= 1.0 + 1e-9 for r in data["rows"])


def test_check_on_user_inputs(tmp_path, capsys):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32)
    path = tmp_path / "qkv.pt"
    torch.save({"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2),
                "tensor_layout": "NHD", "is_causal": True}, path)
    assert main(["check", "--inputs", str(path), "--preset", "sage1"]) == 0
    out = capsys.readouterr().out
    assert "sage1" in out and "sage2-4b" not in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] == torch.__version__ and set(data["presets"]) == {"sage1", "sage2-8b", "sage2-4b"}
