"""benchmarks/kernels.py on the CPU, on one small shape: its rows and its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "kernels.py"


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the benchmark")
@pytest.mark.parametrize("models", [[], ["--models", "llama-moe-3.5b"]])
def test_cpu_table_times_llama_moe_shapes_without_models(tmp_path, monkeypatch, capsys,
                                                         models):
    """Without --models the CPU run times LLaMA-MoE's shapes, as its help says (it timed
    none: the absent option was split into the one model name 'None')."""
    bench = _script(monkeypatch)
    monkeypatch.setattr(bench, "SHAPES", {("llama-moe-3.5b", "w1"): (64, 128),
                                          ("mixtral-8x7b", "w1"): (64, 128)})
    out = tmp_path / "k.json"
    assert bench.main(["--kinds", "bitplane", "--bits", "2", "--tokens", "1",
                       "--json", str(out), *models]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["kind"], r["bits"], r["tokens"]) for r in rows] == \
        [("llama-moe-3.5b", "bitplane", 2, 1)]
    assert rows[0]["numpy_path_us"] > 0 and rows[0]["fused_us"] > 0  # both paths timed
    out = capsys.readouterr().out
    assert "| llama-moe-3.5b | w1 64x128 | bitplane | 2 | 1 |" in out
    assert "| CPU path us | numpy path us | x numpy path |" in out
