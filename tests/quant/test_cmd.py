"""`d2moe quantize` on small fake Mixtral- and OLMoE-named safetensors checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import expert_bytes
from d2moe.quant import cmd
from d2moe.quant.store import StoreReader

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from d2moe.quant.reference import dequantize  # noqa: E402

NAMES = {
    "mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.{t}.weight",
    "olmoe": "model.layers.{l}.mlp.experts.{e}.{t}.weight",
}
TENSOR_NAMES = {"mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"},
                "olmoe": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}}


def _checkpoint(tmp_path, family):
    hidden, ffn, layers, experts = 64, 32, 2, 2
    cfg = {"model_type": family, "num_hidden_layers": layers, "hidden_size": hidden,
           "intermediate_size": ffn, "num_attention_heads": 2, "num_key_value_heads": 1,
           "vocab_size": 32, "num_experts_per_tok": 1,
           ("num_local_experts" if family == "mixtral" else "num_experts"): experts}
    model = tmp_path / family
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    weights = {}
    shapes = {"w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn)}
    for layer in range(layers):
        for e in range(experts):
            for t, shape in shapes.items():
                name = NAMES[family].format(l=layer, e=e, t=TENSOR_NAMES[family][t])
                weights[name] = torch.randn(shape, dtype=torch.bfloat16)
    weights["model.embed_tokens.weight"] = torch.randn(32, hidden)
    half = len(weights) // 2  # two shards
    items = list(weights.items())
    safetensors_torch.save_file(dict(items[:half]), str(model / "a.safetensors"))
    safetensors_torch.save_file(dict(items[half:]), str(model / "b.safetensors"))
    return model, weights


def _parse(argv):
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_quantize_checkpoint(tmp_path, family, capsys):
    model, weights = _checkpoint(tmp_path, family)
    out = tmp_path / "store"
    args = _parse(["quantize", "--model", str(model), "--out", str(out), "--bits", "3:6",
                   "--group", "32", "--no-progress"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    with StoreReader(out) as reader:
        assert (reader.layout.kind, reader.layout.b1, reader.layout.bK) == \
            (cmd.DEFAULT_FORMAT, 3, 6)
        assert reader.expert_nbytes(1, 1, 0, 6) == expert_bytes(reader.spec, 6, reader.layout)
        name = NAMES[family].format(l=1, e=1, t=TENSOR_NAMES[family]["w2"])
        w = weights[name].float()
        got = dequantize(reader.read_expert(1, 1, 6)["w2"], 6)
        assert float((got - w).norm() / w.norm()) < 0.05


def test_quantize_errors(tmp_path):
    for argv, match in [(["--model", str(tmp_path / "nope")], "no such directory"),
                        (["--model", str(tmp_path), "--bits", "2-8"], "bit range"),
                        (["--model", str(tmp_path), "--bits", "4:2"], "b1 <= bK")]:
        args = _parse(["quantize", "--out", str(tmp_path / "o"), *argv])
        with pytest.raises(UserError, match=match):
            args.func(args)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 8,
         "num_attention_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1,
         "intermediate_size": 8, "vocab_size": 8}))
    safetensors_torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "m" / "a.safetensors"))
    args = _parse(["quantize", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no expert weights"):
        args.func(args)
    with pytest.raises(UserError, match="plane-scale fit"):
        cmd.quantize_checkpoint("tiny", tmp_path / "o", cmd.QuantLayout(), fit="best")


def test_quantize_refuses_a_model_type_the_loader_cannot_run(tmp_path, capsys):
    """A store of a checkpoint `generate` and `run` refuse would be of no use: same message."""
    from d2moe.cli import main

    model, _ = _checkpoint(tmp_path, "mixtral")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'config.json'}: field 'model_type': model_type 'llama' is not supported" \
        in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()
    from d2moe.model.hf import load_hf

    with pytest.raises(UserError) as loaded:  # what generate and run say of it
        load_hf(model)
    assert str(loaded.value) in err


@pytest.mark.parametrize("fmt", ["bitplane", "mwq"])
def test_quantize_tiny(tmp_path, fmt, capsys):
    """`--model tiny` quantizes the shipped checkpoint; the store holds its experts bit-exactly."""
    from d2moe.model.load import load_tiny
    from d2moe.quant.nested import quantize_matrix

    out = tmp_path / "store"
    args = _parse(["quantize", "--model", "tiny", "--out", str(out), "--bits", "2:5",
                   "--format", fmt, "--no-progress"])
    assert args.func(args) == 0
    assert fmt in capsys.readouterr().out
    model, spec = load_tiny()
    with StoreReader(out) as reader:
        assert (reader.spec.layers, reader.spec.experts, reader.spec.hidden) == \
            (spec.layers, spec.experts, spec.hidden)
        assert (reader.layout.kind, reader.bits_stored) == (fmt, 5)
        assert len({(e.layer, e.expert) for e in reader.entries.values()}) == \
            spec.layers * spec.experts
        w = model.experts.w2[3, 7].detach().numpy()
        got = reader.read_expert(3, 7, 5)["w2"]
    want = quantize_matrix(w, reader.layout)
    assert torch.equal(dequantize(got, 5), dequantize(want, 5))
    err = [float((dequantize(got, b) - torch.from_numpy(w)).norm() / torch.from_numpy(w).norm())
           for b in (2, 3, 4, 5)]
    assert err == sorted(err, reverse=True) and err[-1] < 0.1


def test_quantize_mwq_fit(tmp_path):
    """`--fit halve` writes other plane scales than the paper's mean and a lower 8-bit error."""
    from d2moe.model.load import load_tiny

    model, _ = load_tiny()
    w = model.experts.w1[0, 0].detach()
    errs = {}
    for fit in ("mean", "halve"):
        out = tmp_path / fit
        args = _parse(["quantize", "--model", "tiny", "--out", str(out), "--format", "mwq",
                       "--fit", fit, "--no-progress"])
        assert args.func(args) == 0
        with StoreReader(out) as reader:
            errs[fit] = float((dequantize(reader.read_expert(0, 0, 8)["w1"], 8) - w).norm()
                              / w.norm())
    assert errs["halve"] < errs["mean"]


def test_quiet_is_the_earlier_spelling_of_no_progress():
    from d2moe.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["quantize", "--model", "tiny", "--out", "s"]).progress is True
    for flag in ("--no-progress", "--quiet"):
        assert parse(["quantize", "--model", "tiny", "--out", "s", flag]).progress is False


def test_quantize_jobs_write_the_same_store_and_pass_errors_on(tmp_path, monkeypatch):
    """Experts quantized in threads are written in order: the store is byte for byte the
    one-at-a-time one; a worker's error reaches the caller, and no store is left."""
    model, _ = _checkpoint(tmp_path, "mixtral")
    layout = cmd.QuantLayout(kind="mwq", b1=2, bK=5, group=32)
    stores = {}
    for jobs in (1, 3):
        out = tmp_path / f"store{jobs}"
        cmd.quantize_checkpoint(model, out, layout, progress=False, jobs=jobs)
        stores[jobs] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    assert stores[1] == stores[3] and len(stores[1]) >= 3  # index + a data file per layer
    seen = []
    real = cmd.quantize_matrix

    def failing(w, layout, *, fit="mean"):
        seen.append(w.shape)
        if len(seen) == 4:  # the second expert's first matrix
            raise UserError("boom", field="weight", fix="none")
        return real(w, layout, fit=fit)

    monkeypatch.setattr(cmd, "quantize_matrix", failing)
    with pytest.raises(UserError, match="boom"):
        cmd.quantize_checkpoint(model, tmp_path / "bad", layout, progress=False, jobs=2)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="field 'jobs': must be >= 0"):
        cmd.quantize_checkpoint(model, tmp_path / "bad", layout, progress=False, jobs=-1)


def test_in_order_keeps_order_and_bounds_the_results_held():
    import threading
    import time

    held, peak, lock = [0], [0], threading.Lock()

    def work(i):
        time.sleep(0.001 * ((7 * i) % 5))  # finish out of order
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return i * i

    out = []
    for i, r in cmd._in_order(work, list(range(20)), 3):
        out.append((i, r))
        with lock:
            held[0] -= 1
    assert out == [(i, i * i) for i in range(20)]
    assert 1 <= peak[0] <= 4  # jobs + 1 results at most
