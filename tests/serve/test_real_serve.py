"""Serving on the real executor (tiny model): ragged batching computes what each request
alone would, and `d2moe serve --backend real` runs end to end."""

from __future__ import annotations

import pytest
import torch

from d2moe.core.sizes import all_experts_bytes
from d2moe.eval.ppl import dense_backend, store_matrices
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.generate import generate
from d2moe.model.load import load_tiny
from d2moe.policies import make_policy
from d2moe.quant.reference import dequantize
from d2moe.quant.store import StoreReader
from d2moe.serve.arrivals import ArrivalConfig, Request
from d2moe.serve.cmd import ServeConfig, serve
from d2moe.serve.metrics import serve_metrics
from d2moe.serve.real import PROMPT_TEXT, fix_steps, make_prompts, serve_model

BITS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads thrash (results are equal)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store_path(tiny_store_path):
    return tiny_store_path


def _alone(model, ids, n_decode, feed):
    """Logits of one request through the normal forward: prefill, then `feed` tokens."""
    cache = model.new_cache(max_len=len(ids) + n_decode + 1)
    out = [model(torch.tensor([ids]), cache)[0]]
    for tok in feed[:n_decode]:
        out.append(model(torch.tensor([[tok]]), cache)[0])
    return out


def test_ragged_forward_gives_each_requests_own_logits():
    model, _ = load_tiny()
    model.eval()
    prompts = [[5, 70, 101, 102, 40], [100, 101, 102, 32, 102, 105, 98, 40, 110], [35, 10]]
    feed = [[97, 98, 99], [120, 121, 122], [65, 66, 67]]
    with torch.no_grad():
        want = [_alone(model, p, 3, f) for p, f in zip(prompts, feed, strict=True)]
        caches = [model.new_cache(max_len=len(p) + 4) for p in prompts]
        got = [[] for _ in prompts]
        # requests 0 and 1 prefill together, both decode once, then 2 joins mid-stream
        for i, lg in zip((0, 1), model.forward_ragged(
                [torch.tensor(prompts[i]) for i in (0, 1)], caches[:2]), strict=True):
            got[i].append(lg)
        for i, lg in zip((0, 1), model.forward_ragged(
                [torch.tensor(feed[i][:1]) for i in (0, 1)], caches[:2]), strict=True):
            got[i].append(lg)
        got[2].append(model.forward_ragged([torch.tensor(prompts[2])], caches[2:])[0])
        for j in range(2):  # everyone decodes; request 2 is one token behind
            lgs = model.forward_ragged([torch.tensor(feed[0][1 + j:2 + j]),
                                        torch.tensor(feed[1][1 + j:2 + j]),
                                        torch.tensor(feed[2][j:j + 1])], caches)
            for i, lg in enumerate(lgs):
                got[i].append(lg)
    for i in range(3):
        assert len(got[i]) == (4 if i < 2 else 3)
        for g, w in zip(got[i], want[i], strict=False):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert [c.length for c in caches] == [len(prompts[0]) + 3, len(prompts[1]) + 3,
                                          len(prompts[2]) + 2]


def test_prompts_are_the_texts_bytes_within_the_models_vocabulary():
    reqs = [Request(0, 0.0, 6, 4), Request(1, 0.0, 40, 3)]
    tiny, small = make_prompts(reqs), make_prompts(reqs, vocab=97)
    assert tiny[1][:3] == list(PROMPT_TEXT.encode()[7:10])  # request i starts at byte 7i
    assert [len(tiny[r.id]) for r in reqs] == [6, 40]
    for r in reqs:  # an HF model of 97 tokens: every id valid, the same text underneath
        assert small[r.id] == [b % 97 for b in tiny[r.id]] and max(small[r.id]) < 97
    assert max(tiny[1]) >= 97  # (so the modulo was needed)


def test_served_tokens_equal_each_request_generated_alone(store_path):
    model, spec = load_tiny(with_experts=False)
    store = StoreReader(store_path)
    nested = store_matrices(store)
    dense = dense_backend(spec, lambda key: dequantize(nested[key], BITS))
    reqs = [Request(0, 0.0, 6, 4), Request(1, 0.0, 9, 3), Request(2, 0.0, 4, 5)]
    prompts = make_prompts(reqs)
    budget = all_experts_bytes(spec, BITS, store.layout) // 4
    pool = ExpertPool(spec, store.layout, budget, torch.device("cpu"))
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS)
    try:
        served = serve_model(model, backend, reqs, prompts, max_batch=2, clock=backend.clock)
    finally:
        tl = backend.finish()
    for r in reqs:
        alone = generate(model, prompts[r.id], r.output_tokens, backend=dense)
        assert served.outputs[r.id] == list(alone.new_ids), r
    assert pool.accounting.peak_bytes <= budget
    assert served.phases.count("prefill") >= 2  # request 2 waits for a free slot
    steps = [e for e in fix_steps(tl.events, served) if e.lane == "step"]
    assert [e.kind for e in steps] == served.phases


def test_real_serve_end_to_end(store_path, tmp_path):
    res = serve(ServeConfig(backend="real", store=str(store_path), policy="fifo", max_batch=2,
                            out=str(tmp_path)),
                ArrivalConfig(rate=200, requests=3, prompt_tokens="4", output_tokens="3"))
    tl = res["timelines"][0]
    m = serve_metrics(tl)
    assert m.requests == 3 and m.output_tokens == 9 and m.latency_p99_ms > 0
    steps = [e for e in tl.events if e.lane == "step"]
    assert sum(e.tokens for e in steps if e.kind == "prefill") == 12
    assert sum(e.tokens for e in steps if e.kind == "decode") == 6
    arrivals = {e.step: e.start_us for e in tl.events if e.kind == "request"}
    for e in steps:
        assert e.end_us >= e.start_us
    # waits for arrivals belong to no step: serving starts no earlier than the first arrival
    assert min(e.start_us for e in steps) >= min(arrivals.values())
    assert (tmp_path / "events-fifo.npz").is_file() and (tmp_path / "summary.json").is_file()
    assert "fifo" in res["table"]


def test_real_serve_refuses_requests_past_the_models_positions(store_path, tmp_path):
    from d2moe.core.errors import UserError

    with pytest.raises(UserError, match="maximum of 4096 positions") as err:
        serve(ServeConfig(backend="real", store=str(store_path), policy="fifo",
                          out=str(tmp_path)),
              ArrivalConfig(rate=200, requests=2, prompt_tokens="4", output_tokens="4100"))
    assert err.value.field == "output-tokens" and "4092 or less" in str(err.value)
