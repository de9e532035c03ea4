"""Expert statistics of a real model from calibration text: similarity of expert OUTPUTS and
importance from routing.

Calibration text is a slice of the training split of the tiny model's corpus
(`d2moe.model.corpus`), never the held-out split that perplexity is scored on. It runs
through the model in windows; at every MoE layer a capturing backend records the router's
top-k and weights and a strided sample of the layer's input hidden states as the experts see
them (after the post-attention RMSNorm), then hands the tokens to the real experts so the
next layer's input is the model's own.

Similarity: every expert of a layer runs on the same sampled tokens, and
similarity[e][f] = mean over tokens of cosine(out_e(x_t), out_f(x_t)). Outputs, not
weights: a SwiGLU expert's hidden units can be permuted (rows of w1 and w3 with the columns
of w2) without changing the function, and experts trained from different initialisations
have no shared unit order, so the cosine between two experts' weight matrices measures an
arbitrary alignment and is meaningless; two experts' outputs on the same inputs are what a
substitution actually exchanges. Sampling all tokens (not only those routed to e or f) asks
how alike the experts behave on the layer's input distribution.

Importance: per expert, routed-token share x mean router weight over the same text,
normalised per layer (`measures.importance_from`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2moe.core.cliargs import check_at_least
from d2moe.core.errors import UserError
from d2moe.core.progress import progress_bar
from d2moe.experts.measures import RoutingTally, mean_token_cosine
from d2moe.policies.stats import ExpertStats

if TYPE_CHECKING:
    import torch

    from d2moe.core.spec import ModelSpec
    from d2moe.model.moe import DenseExperts
    from d2moe.model.transformer import Transformer

OUTPUT_SOURCE = "expert outputs on calibration text"


def calibration_ids(model_ref: str, spec: ModelSpec, kib: int) -> list[int]:
    """The first `kib` KiB of the corpus's training split as token ids (bytes for a byte
    vocabulary; an HF model's tokenizer.json otherwise)."""
    from d2moe.model.corpus import load_corpus

    if kib < 1:
        raise UserError(f"need at least 1 KiB, got {kib}", field="calib_kib",
                        fix="e.g. --calib-kib 32")
    from d2moe.model.tokenizer import text_codec

    text = load_corpus(kib * 1024, 1).train  # held-out split: 1 byte, unused
    encode, _ = text_codec(model_ref, spec.vocab)
    return list(encode(text))


class _Capture:
    """An ExpertBackend that records each layer's routing and sampled inputs, then runs the
    layer's experts in `inner`."""

    def __init__(self, inner: Any, layers: int, experts: int, stride: int) -> None:
        self.inner, self.stride = inner, stride
        self.tally = RoutingTally(layers, experts)
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        self.tally.add(layer, ids.cpu().numpy(), weights.float().cpu().numpy())
        self.samples[layer].append(x[::self.stride].detach().float().cpu())  # [T/stride, D]
        return self.inner.run_layer(layer, x, ids, weights)


def expert_outputs(experts: DenseExperts, layer: int, x: torch.Tensor) -> np.ndarray:
    """Every expert of `layer` on the same tokens x [T, D] (computed in float32) -> float64
    [E, T, D]."""
    import torch

    from d2moe.model.moe import swiglu

    with torch.inference_mode():
        outs = [swiglu(x.float(), *(w.float() for w in experts.expert(layer, e)))
                for e in range(experts.w1.shape[1])]
    return torch.stack(outs).double().cpu().numpy()


def stats_from_model(model: Transformer, spec: ModelSpec, ids: list[int],
                     experts: DenseExperts, *, ctx: int = 256, batch: int = 8,
                     sample_tokens: int = 1024, progress: bool = False,
                     meta: dict[str, Any] | None = None) -> ExpertStats:
    """ExpertStats from running `ids` through `model` with `experts` (float weights: the
    model's own or a store's, dequantized) as its expert backend; see the module docstring.

    `sample_tokens` caps the tokens per layer the experts are compared on (evenly strided
    over the whole text).
    """
    import torch

    for name, value, low in (("ctx", ctx, 2), ("batch", batch, 1),
                             ("sample_tokens", sample_tokens, 1)):
        check_at_least(value, low, name)  # each names its own option
    from d2moe.model.generate import check_window

    check_window(model, ctx)
    n_win = len(ids) // ctx
    if n_win == 0:
        raise UserError(f"{len(ids)} calibration tokens are fewer than one window of {ctx}",
                        field="calib_kib", fix="use more calibration text or a smaller ctx")
    windows = torch.tensor(ids[: n_win * ctx], dtype=torch.long).view(n_win, ctx)
    stride = max(1, n_win * ctx // sample_tokens)  # at least sample_tokens sampled
    capture = _Capture(experts, spec.layers, spec.experts, stride)
    starts = range(0, n_win, batch)
    bar = progress_bar(len(starts) + spec.layers, progress, "expert stats", "step")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in starts:
                model(windows[s:s + batch].to(device), backend=capture)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
    similarity = []
    sampled = 0
    for layer in range(spec.layers):
        x = torch.cat(capture.samples[layer])[:sample_tokens]  # [T, D]
        sampled = int(x.shape[0])
        similarity.append(mean_token_cosine(expert_outputs(experts, layer,
                                                           x.to(experts.w1.device))))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    info = {"calibration_tokens": int(n_win * ctx), "sampled_tokens": sampled, "ctx": ctx,
            "split": "train", **(meta or {})}
    return ExpertStats.from_lists(capture.tally.importance(), similarity,
                                  source=OUTPUT_SOURCE, meta=info)
