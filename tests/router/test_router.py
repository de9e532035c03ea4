"""The bit-width router: gradients reach the gate, alpha moves the preferred bits, inference
is deterministic, the saved router round-trips and a mismatched one is refused."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.router.experts import BitRoutedExperts, MixExperts  # noqa: E402
from d2moe.router.gate import BitGate, BitRouter  # noqa: E402
from d2moe.router.loss import router_loss  # noqa: E402
from d2moe.router.store import load_router, save_router  # noqa: E402
from d2moe.router.train import RouterTrainConfig, train_router  # noqa: E402

BITS = (2, 3, 4)


@pytest.fixture(scope="module")
def tiny():
    model, spec = load_tiny()
    return model.eval().requires_grad_(False), spec


def _batch(seed=0, b=2, t=48):
    return torch.randint(0, 256, (b, t + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slots", [0, 2])
def test_gradients_reach_every_layers_gate_through_the_quantized_experts(tiny, widths, slots):
    model, spec = tiny
    gate = BitGate(spec.layers, spec.hidden, len(BITS), slots=slots)
    mix = MixExperts(widths, gate, (0.3, 0.4, 0.3))
    batch = _batch()
    with torch.no_grad():
        teacher = model(batch[:, :-1]).reshape(-1, spec.vocab)
    logits = model(batch[:, :-1], backend=mix).reshape(-1, spec.vocab)
    parts = router_loss(logits, teacher, mix.probs, BITS, alpha=0.0)  # CE alone
    parts.total.backward()
    for lin in gate.proj:
        assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
        assert lin.weight.grad.abs().sum() > 0
    if slots:
        assert gate.slope.grad.abs().sum() > 0 and gate.rank_bias.grad.abs().sum() > 0
    # forward is the hard choice: counts match the capacities exactly in every layer
    want = [58, 77, 57] if slots else [29, 38, 29]  # 192 slots or 96 tokens
    for idx in mix.index:
        assert idx.dim() == (2 if slots else 1)
        assert torch.bincount(idx.flatten(), minlength=3).tolist() == want
    # the one-hot forward equals the resident backend at the same widths
    chosen = iter(mix.index)

    class Replay:
        def choose_index(self, layer, x, weights):
            return next(chosen)

    with torch.no_grad():
        again = model(batch[:, :-1], backend=BitRoutedExperts(widths, Replay()))
    assert torch.allclose(again.reshape(-1, spec.vocab), logits.detach(), atol=1e-4)


def _train(store, tmp_path, alpha, **kw):
    cfg = RouterTrainConfig(store=str(store), bits="2,3,4", capacity="1,1,1", alpha=alpha,
                            steps=5, batch=2, ctx=48, lr=0.05, train_kib=64, val_kib=0,
                            out=str(tmp_path / f"r{alpha}"), progress=False, **kw)
    return train_router(cfg)


def test_alpha_zero_prefers_the_most_bits_and_a_large_alpha_the_fewest(store, tmp_path):
    free = _train(store, tmp_path, 0.0)
    cheap = _train(store, tmp_path, 2.0)
    assert free.preferred_bits >= 3.5 and free.mean_bits[-1] > free.mean_bits[0]
    assert cheap.preferred_bits <= 2.2 and cheap.mean_bits[-1] < 2.5
    assert cheap.expected_bits[-1] < free.expected_bits[-1]
    meta = json.loads((free.out_dir / "router.json").read_text())
    assert meta["bits"] == [2, 3, 4] and meta["alpha"] == 0.0 and len(meta["sha256"]) == 64
    assert meta["train"]["source"] == "measured"


@pytest.mark.parametrize("slots", [0, 2])
def test_inference_is_deterministic_and_respects_capacities(tiny, widths, tmp_path, store,
                                                            slots):
    model, spec = tiny
    save_router(tmp_path / "r", BitGate(spec.layers, spec.hidden, 3, seed=3, slots=slots),
                {"bits": list(BITS), "capacities": [0.3, 0.4, 0.3], "alpha": 0.0,
                 "window": 8, "layers": spec.layers, "hidden": spec.hidden, "slots": slots})
    runs = []
    for _ in range(2):
        router = load_router(tmp_path / "r", spec=spec, store_bits=(2, 4))
        backend = BitRoutedExperts(widths, router)
        backend.reset()
        with torch.no_grad():
            logits = model(_batch(1, b=2, t=50)[:, :-1], backend=backend)
        runs.append((logits, backend.token_bits()))
        assert router.granularity == ("slot" if slots else "token")
        rows = backend.last_index[0] if slots else backend.last_index[0][:, 0]  # 100 tokens
        want = [60, 80, 60] if slots else [30, 40, 30]
        assert torch.bincount(rows.flatten(), minlength=3).tolist() == want
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert set(runs[0][1].unique().tolist()) == set(BITS)


def _save(tmp_path, spec, bits=BITS, hidden=None, layers=None):
    path = tmp_path / "bad"
    save_router(path, BitGate(layers or spec.layers, hidden or spec.hidden, len(bits)),
                {"bits": list(bits), "capacities": [1.0] * len(bits), "alpha": 0.0,
                 "layers": layers or spec.layers, "hidden": hidden or spec.hidden})
    return path


def test_a_mismatched_or_damaged_router_is_refused(tiny, tmp_path):
    _, spec = tiny
    with pytest.raises(UserError, match="chooses 5 bits, the store serves 2..4"):
        load_router(_save(tmp_path, spec, bits=(3, 4, 5)), spec=spec, store_bits=(2, 4))
    with pytest.raises(UserError, match="hidden=128, the model 'tiny' has 192"):
        load_router(_save(tmp_path, spec, hidden=128), spec=spec)
    with pytest.raises(UserError, match="layers=2"):
        load_router(_save(tmp_path, spec, layers=2), spec=spec)
    path = _save(tmp_path, spec)
    (path / "gate.safetensors").write_bytes((path / "gate.safetensors").read_bytes()[:-4] + b"xxxx")
    with pytest.raises(UserError, match="checksum mismatch"):
        load_router(path)
    with pytest.raises(UserError, match="no trained router"):
        load_router(tmp_path / "nowhere")
    with pytest.raises(UserError, match="needs a store"):
        load_router("auto")
    with pytest.raises(UserError, match="sum to >= 1"):
        BitRouter(BitGate(1, 4, 2), (2, 3), (0.2, 0.2))
    with pytest.raises(UserError, match="target"):
        RouterTrainConfig(target="soft")


def test_training_refuses_widths_the_store_cannot_serve(store, tmp_path):
    with pytest.raises(UserError, match="5 bits is outside the store's 2..4"):
        train_router(RouterTrainConfig(store=str(store), bits="3,4,5", capacity="1,1,1",
                                       steps=1, out=str(tmp_path / "x"), progress=False))


def test_router_cli_trains_one_step_and_describes_it(store, tmp_path, capsys):
    from d2moe.cli import main

    out = tmp_path / "cli"
    assert main(["router", "train", "--store", str(store), "--steps", "1", "--batch", "1",
                 "--ctx", "16", "--train-kib", "16", "--val-kib", "1", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "saved the gate of step" in printed
    saved = int(printed.split("saved the gate of step ")[1].split(":")[0])
    assert ("note: no training step beat the untrained gate" in printed) == (saved == 0)
    from d2moe.quant.store import StoreReader

    with StoreReader(store) as reader:  # the weights it was trained on, for later checks
        assert json.loads((out / "router.json").read_text())["expert_sha256"] == \
            reader.source["expert_sha256"]
    assert main(["router", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '"capacities": [\n  0.3,' in printed and "granularity slot" in printed
    assert main(["router", "train", "--store", str(store), "--capacity", "0.5,0.5",
                 "--out", str(out)]) == 2


def test_a_fresh_per_slot_gate_sends_the_lightest_slots_to_the_fewest_bits(tiny, widths):
    model, spec = tiny
    gate = BitGate(spec.layers, spec.hidden, 3, slots=spec.top_k)
    with torch.no_grad():  # no hidden-state term: the router weights alone decide
        for p in gate.proj.parameters():
            p.zero_()
    router = BitRouter(gate, BITS, (0.3, 0.4, 0.3), window=50)  # one batch: exact counts
    x = torch.randn(50, spec.hidden, generator=torch.Generator().manual_seed(1))
    w = torch.softmax(torch.randn(50, spec.top_k, generator=torch.Generator().manual_seed(2)), -1)
    bits = router.choose(0, x, w)  # [50, k]
    assert bits.shape == (50, spec.top_k)
    assert [int((bits == b).sum()) for b in BITS] == [30, 40, 30]
    assert w[bits == 2].max() <= w[bits == 3].min() and w[bits == 3].max() <= w[bits == 4].min()


def test_a_per_slot_router_for_another_top_k_is_refused(tiny, tmp_path):
    _, spec = tiny
    path = tmp_path / "k3"
    save_router(path, BitGate(spec.layers, spec.hidden, 3, slots=3),
                {"bits": list(BITS), "capacities": [1.0] * 3, "alpha": 0.0, "slots": 3,
                 "layers": spec.layers, "hidden": spec.hidden})
    with pytest.raises(UserError, match="top_k=3, the model 'tiny' has 2"):
        load_router(path, spec=spec)


def test_the_saved_gate_is_the_best_validated_checkpoint(store, tiny, widths, tmp_path):
    from d2moe.model.corpus import load_corpus
    from d2moe.router.train import _Validation

    alpha = 0.05
    cfg = RouterTrainConfig(store=str(store), bits="2,3,4", capacity="1,1,1", alpha=alpha,
                            steps=4, batch=2, ctx=48, lr=0.2, train_kib=32, val_kib=2,
                            val_every=2, out=str(tmp_path / "v"), progress=False)
    res = train_router(cfg)
    assert [row[0] for row in res.val] == [0, 2, 4]  # the start, every 2 steps, the end
    scores = {step: ce + alpha * bits for step, ce, bits in res.val}
    assert res.best_step == min(scores, key=lambda st: (scores[st], st))
    meta = json.loads((res.out_dir / "router.json").read_text())
    assert meta["train"]["validation"]["saved_step"] == res.best_step
    # the saved gate scores exactly its validation row on the same held-back text
    model, spec = tiny
    text = torch.frombuffer(bytearray(load_corpus(32 * 1024, 1024).train), dtype=torch.uint8)
    val = _Validation(model, spec, text[-2048:], cfg, widths, BITS, (1.0, 1.0, 1.0))
    ce, bits = val.score(load_router(res.out_dir, spec=spec).gate)
    _, want_ce, want_bits = next(row for row in res.val if row[0] == res.best_step)
    assert ce == pytest.approx(want_ce, rel=1e-5) and bits == pytest.approx(want_bits)


@pytest.mark.parametrize("option,value,field", [
    ("--threads", "-1", "threads"), ("--lr", "nan", "lr"), ("--tau", "inf", "tau"),
    ("--alpha", "nan", "alpha"), ("--alpha", "-1", "alpha")])
def test_router_cli_rejects_bad_numbers_before_training(option, value, field, tmp_path, capsys,
                                                        monkeypatch):
    from d2moe.cli import main

    monkeypatch.setattr("d2moe.router.train.train_router",
                        lambda cfg: pytest.fail("training started"))
    assert main(["router", "train", option, value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"field '{field}'" in err and "fix:" in err


def test_a_router_trains_on_an_hf_checkpoint_through_its_tokenizer(tmp_path, capsys):
    """The corpus reaches an HF model as its own tokenizer's ids (before, router training
    took byte-vocabulary models only; the corpus's bytes, up to 126, would not even index
    this model's 97 embeddings), and `d2moe run --router auto` serves with the gate."""
    from d2moe.cli import main
    from tests.model.test_tokenizer import hf_checkpoint

    model_dir, store, words = hf_checkpoint(tmp_path)
    cfg = RouterTrainConfig(model=str(model_dir), store=str(store), steps=2, batch=2, ctx=16,
                            train_kib=8, val_kib=1, val_every=1, progress=False)
    result = train_router(cfg)
    record = json.loads((store / "router" / "router.json").read_text())
    assert result.out_dir == store / "router" and record["spec"] == "mixtral"
    assert [s for s, _, _ in result.val] == [0, 1, 2]
    capsys.readouterr()
    assert main(["run", "--model", str(model_dir), "--store", str(store), "--router", "auto",
                 "--prompt", "def fib(n) :", "--max-new-tokens", "3", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out.splitlines()[0]
    new = text.removeprefix("def fib(n) :").split()  # the tokenizer's words, not bytes
    assert text.startswith("def fib(n) :") and 1 <= len(new) <= 3, text
    assert all(w in words for w in new), text
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())["meta"]
    assert meta["router"] == str(store / "router")
