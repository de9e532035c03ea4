"""The transformer itself: KV cache, the expert seam, the router observer, the tokenizer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.core.spec import ModelSpec  # noqa: E402
from d2moe.model.config import ModelConfig  # noqa: E402
from d2moe.model.moe import DenseExperts, ExpertBackend, route, swiglu  # noqa: E402
from d2moe.model.tokenizer import decode, encode  # noqa: E402
from d2moe.model.transformer import Transformer  # noqa: E402

SPEC = ModelSpec(name="t", layers=3, experts=6, top_k=2, hidden=64, ffn=64, heads=4,
                 kv_heads=2, vocab=256)


def _model(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    m = Transformer(SPEC, cfg)
    m.init_weights(seed, std=0.1)
    return m.eval()


def _tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig(renormalize_topk=False,
                                                            qk_norm=True, tie_embeddings=True)])
def test_cached_decode_equals_full_recompute(cfg: ModelConfig) -> None:
    m, x = _model(cfg), _tokens(2, 20)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(batch=2, max_len=20)
        steps = [m(x[:, :7], cache), m(x[:, 7:12], cache)]  # prefill, then a 5-token chunk
        steps += [m(x[:, i:i + 1], cache) for i in range(12, 20)]  # then single tokens
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_last_only_logits_are_the_last_row_and_leave_the_cache_the_same() -> None:
    m, x = _model(), _tokens(2, 9)
    with torch.no_grad():
        full_cache, last_cache = m.new_cache(batch=2, max_len=12), m.new_cache(batch=2, max_len=12)
        full = m(x, full_cache)  # [2, 9, V]
        last = m(x, last_cache, last_only=True)  # [2, 1, V]
        assert last.shape == (2, 1, full.shape[-1])
        assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
        nxt = _tokens(2, 1, seed=1)  # the caches continue alike
        assert torch.allclose(m(nxt, last_cache), m(nxt, full_cache), atol=1e-5)
        ragged = m.forward_ragged([x[0, :4], x[1]], [m.new_cache(max_len=9),
                                                     m.new_cache(max_len=9)], last_only=True)
        assert [r.shape[0] for r in ragged] == [1, 1]
        assert torch.allclose(ragged[1][0], full[1, -1], atol=1e-5)


def test_attention_is_causal() -> None:
    m, x = _model(), _tokens(1, 12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256  # change only the future of position 7
    with torch.no_grad():
        assert torch.allclose(m(x)[0, :8], m(y)[0, :8], atol=1e-6)
        assert not torch.allclose(m(x)[0, 8:], m(y)[0, 8:], atol=1e-3)


def test_cache_overflow_is_a_user_error() -> None:
    m = _model()
    cache = m.new_cache(max_len=4)
    with pytest.raises(UserError, match="exceed the KV cache"):
        m(_tokens(1, 5), cache)


class Recorder:
    """An ExpertBackend that records every call and delegates to DenseExperts."""

    def __init__(self, inner: DenseExperts) -> None:
        self.inner, self.calls = inner, []

    def run_layer(self, layer, x, ids, weights):
        self.calls.append((layer, tuple(x.shape), tuple(ids.shape), ids.dtype,
                           tuple(weights.shape)))
        return self.inner.run_layer(layer, x, ids, weights)


def test_backend_sees_every_layer_once_per_forward_with_right_shapes() -> None:
    m = _model()
    rec = Recorder(m.experts)
    assert isinstance(rec, ExpertBackend) and isinstance(m.experts, ExpertBackend)
    x = _tokens(2, 5)
    with torch.no_grad():
        want = m(x)
        got = m(x, backend=rec)
    assert torch.equal(got, want)
    assert [c[0] for c in rec.calls] == list(range(SPEC.layers))
    for _, xs, ids_s, ids_dtype, ws in rec.calls:  # B*T = 10 tokens, top-2
        assert xs == (10, SPEC.hidden) and ids_s == (10, 2) and ws == (10, 2)
        assert ids_dtype == torch.int64


def test_backend_output_is_what_the_model_uses() -> None:
    m = _model()

    class Zero:
        def run_layer(self, layer, x, ids, weights):
            return torch.zeros_like(x)

    with torch.no_grad():
        assert not torch.allclose(m(_tokens(1, 6), backend=Zero()), m(_tokens(1, 6)))


def test_model_without_experts_needs_a_backend() -> None:
    m = Transformer(SPEC, with_experts=False)
    assert m.experts is None
    with pytest.raises(UserError, match="without expert weights"):
        m(_tokens(1, 3))
    full = _model()
    m.load_state_dict({k: v for k, v in full.state_dict().items()
                       if not k.startswith("experts.")})
    with torch.no_grad():
        assert torch.allclose(m(_tokens(1, 4), backend=full.experts), full(_tokens(1, 4)))


def test_observer_records_router_output_per_layer() -> None:
    m, seen = _model(), []
    with torch.no_grad():
        m(_tokens(1, 7), observer=lambda layer, ids, w: seen.append((layer, ids, w)))
    assert [s[0] for s in seen] == [0, 1, 2]
    for _, ids, w in seen:
        assert ids.shape == (7, 2) and ids.dtype == torch.int64
        assert ((ids >= 0) & (ids < SPEC.experts)).all()
        assert (ids[:, 0] != ids[:, 1]).all()  # top-k picks distinct experts
        assert torch.allclose(w.sum(-1), torch.ones(7))  # Mixtral style
        assert (w[:, 0] >= w[:, 1]).all()  # sorted by weight


def test_dense_experts_equal_a_naive_per_token_loop() -> None:
    torch.manual_seed(3)
    experts = DenseExperts(SPEC)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(9, SPEC.hidden)
    weights, ids = route(torch.randn(9, SPEC.experts), SPEC.top_k, renormalize=True)
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(SPEC.top_k):
            e = int(ids[t, j])
            w1, w3, w2 = experts.w1[1, e], experts.w3[1, e], experts.w2[1, e]
            h = torch.nn.functional.silu(w1 @ x[t]) * (w3 @ x[t])  # SwiGLU, one token
            want[t] += weights[t, j] * (w2 @ h)
    with torch.no_grad():
        got = experts.run_layer(1, x, ids, weights)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(swiglu(x[:1], experts.w1[1, 0], experts.w3[1, 0], experts.w2[1, 0])[0],
                          experts.w2[1, 0] @ (torch.nn.functional.silu(experts.w1[1, 0] @ x[0])
                                              * (experts.w3[1, 0] @ x[0])), atol=1e-5)


def test_route_styles() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w_mix, ids = route(logits, 2, renormalize=True)
    w_olmoe, ids2 = route(logits, 2, renormalize=False)
    assert ids.tolist() == ids2.tolist() == [[0, 1]]
    assert torch.allclose(w_mix, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    assert torch.allclose(w_olmoe, torch.softmax(logits, -1)[:, :2])


def test_tokenizer_round_trip() -> None:
    text = "def fib(n):\n    return n  # ünïcødé ✓\n"
    ids = encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert decode(ids) == text
    assert encode(b"\x00\xff") == [0, 255]
    assert decode([0xff]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
    # bytes that are not UTF-8 reach argv as surrogates (os.fsdecode): the same bytes back
    import os

    assert encode(os.fsdecode(b"\xff\xfe\x80a")) == [0xff, 0xfe, 0x80, ord("a")]
