"""The shipped tiny checkpoint, its perplexity, training, generation and the CLI verbs."""

from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from d2moe.core.cliargs import from_args  # noqa: E402
from d2moe.core.errors import UserError  # noqa: E402
from d2moe.core.spec import load_spec  # noqa: E402
from d2moe.model import cmd, load  # noqa: E402
from d2moe.model.corpus import load_corpus  # noqa: E402
from d2moe.model.generate import generate  # noqa: E402
from d2moe.model.perplexity import perplexity, unigram_perplexity  # noqa: E402
from d2moe.model.tokenizer import encode  # noqa: E402
from d2moe.model.train import TrainConfig, balance_loss, train_tiny  # noqa: E402

SHIPPED = (load.tiny_dir() / "model.safetensors").is_file()
needs_tiny = pytest.mark.skipif(not SHIPPED, reason="tiny checkpoint not built yet")


@pytest.fixture(scope="module")
def tiny():
    model, spec = load.load_tiny()
    return model, spec


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(1 << 20, 16 << 10)


@needs_tiny
def test_tiny_matches_its_spec(tiny) -> None:
    model, spec = tiny  # (how fast it loads is no pass/fail matter: timings vary)
    assert spec == load_spec("tiny") and model.spec == spec
    size = (load.tiny_dir() / "model.safetensors").stat().st_size
    assert size <= 10 * 1024 * 1024
    assert spec.ffn % 64 == 0 and spec.hidden % 64 == 0  # quantization groups of 64
    prov = load.tiny_provenance()
    assert prov["source"] == "measured" and prov["heldout_ppl_per_byte"] < \
        prov["unigram_ppl_per_byte"]


@needs_tiny
def test_tiny_heldout_perplexity_beats_unigram(tiny, corpus) -> None:
    model, _ = tiny
    held = corpus.heldout[:8192]
    ppl = perplexity(model, held, ctx=256)
    uni = unigram_perplexity(corpus.train, held[1:])  # same predicted bytes, roughly
    assert ppl.tokens_scored == 32 * 255
    assert ppl.ppl < 0.5 * uni.ppl, (ppl.ppl, uni.ppl)


@needs_tiny
def test_perplexity_takes_any_backend(tiny, corpus) -> None:
    model, _ = tiny
    held = corpus.heldout[:2048]

    class FirstExpertOnly:  # a deliberately wrong backend: every token to expert 0
        def run_layer(self, layer, x, ids, weights):
            return model.experts.run_layer(layer, x, torch.zeros_like(ids), weights)

    good = perplexity(model, held, ctx=256)
    assert perplexity(model, held, ctx=256, backend=model.experts).ppl == pytest.approx(good.ppl)
    assert perplexity(model, held, ctx=256, backend=FirstExpertOnly()).ppl > good.ppl


@needs_tiny
def test_generate_greedy_with_cache_equals_recompute(tiny) -> None:
    model, _ = tiny
    prompt = encode("def fib(")
    gen = generate(model, prompt, 12)
    assert len(gen.new_ids) == 12
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # no cache: full recompute each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(gen.new_ids) == ids[len(prompt):]


def test_missing_tiny_checkpoint_points_to_train_tiny(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(load, "tiny_dir", lambda: tmp_path / "nothing")
    with pytest.raises(UserError, match="d2moe model train-tiny"):
        load.load_tiny()


def test_balance_loss_is_one_when_balanced() -> None:
    # Switch loss E * sum_e f_e P_e: 1 when dispatch is even, above 1 when it is skewed.
    even = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    assert balance_loss(even, 2).item() == pytest.approx(1.0)
    skewed = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(8, 1)
    assert balance_loss(skewed, 2).item() > 1.5


def test_train_tiny_runs_and_loss_goes_down(tmp_path) -> None:
    tc = TrainConfig(steps=8, batch_size=4, ctx_len=64, train_kb=64, heldout_kb=4,
                     warmup_steps=1, out=str(tmp_path), progress=False)
    res = train_tiny(tc)
    assert len(res.losses) == 8
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.5, res.losses
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["training_steps"] == 8 and prov["source"] == "measured"
    assert "--steps 8" in prov["command"]
    from d2moe.model.hf import load_hf

    model, spec = load_hf(tmp_path)  # what it wrote loads back as an HF Mixtral checkpoint
    assert spec.name == "tiny" and spec.experts == load_spec("tiny").experts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2moe")
    cmd.register(parser.add_subparsers(dest="verb"))
    return parser


def test_cli_train_tiny_defaults_come_from_train_config() -> None:
    args = _parser().parse_args(["model", "train-tiny", "--steps", "3"])
    assert from_args(TrainConfig, args) == TrainConfig(steps=3)


@needs_tiny
def test_cli_info_and_generate(capsys) -> None:
    p = _parser()
    args = p.parse_args(["model", "info"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "experts" in out and "held-out ppl/byte" in out
    args = p.parse_args(["generate", "--prompt", "import ", "--max-new-tokens", "8"])
    assert args.func(args) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("import ") and "tokens/s" in cap.err


def test_cli_bad_model_is_a_user_error(tmp_path) -> None:
    args = _parser().parse_args(["model", "info", "--model", str(tmp_path)])
    with pytest.raises(UserError, match="config.json"):
        args.func(args)


@pytest.mark.parametrize("option,value,field", [
    ("--threads", "-1", "threads"), ("--lr", "nan", "lr"), ("--lr", "inf", "lr"),
    ("--weight-decay", "-1", "weight-decay"), ("--balance-coef", "-1", "balance-coef"),
    ("--warmup-steps", "-5", "warmup-steps"), ("--min-lr-frac", "nan", "min-lr-frac")])
def test_cli_train_tiny_rejects_bad_numbers_before_training(option, value, field, tmp_path,
                                                            capsys, monkeypatch) -> None:
    from d2moe.cli import main

    monkeypatch.setattr("d2moe.model.train.train_tiny",
                        lambda cfg: pytest.fail("training started"))
    assert main(["model", "train-tiny", option, value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"field '{field}'" in err and "fix:" in err
