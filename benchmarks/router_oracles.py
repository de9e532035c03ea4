"""How much a per-slot bit-width choice can win at fixed capacities, by oracles (issue #7).

At V1 (bits 2,3,4, capacities 0.3/0.4/0.3 over (token, slot) rows, exactly 3.000 bits) each
batch of held-out windows is allocated by a score computed with information no router has at
inference, then scored at those widths:

- `first-order (teacher)`: the loss change of moving a row to each width, to first order
  around the 3-bit model, of the CE to the full-precision model's distribution: the signal
  straight-through training follows (docs/router.md);
- `first-order (label)`: the same with the true next token: a leaky bound (it picks widths
  whose noise happens to favour the right token);
- `output error`: the squared error of the row's weighted output against its 8-bit output (a
  proxy of full precision); rows where few bits hurt most get the most;
- `router weight`: the per-slot gate's starting point (light slots to few bits); no oracle;
- `uniform 3`: every row at 3 bits.

The allocation is the router's own rule (`capacity.assign`) on softmax(-score / mean |score|).
Prints the perplexity of each and the ratio against uniform 3 bits, measured in the same run.

    python benchmarks/router_oracles.py --heldout-kib 64
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from d2moe.eval.ppl import heldout_ids
from d2moe.model.load import load_tiny
from d2moe.router.capacity import assign, capacity_counts
from d2moe.router.experts import WidthWeights
from d2moe.router.train import open_store

BITS = (2, 3, 4)
PROXY_BITS = 8  # stands in for full precision in `output error`
CAPS = (0.3, 0.4, 0.3)
MID = 1  # index of 3 bits: the point the first-order scores linearize around


def expert_out(weights: WidthWeights, k: int, layer: int, e: int, x: torch.Tensor
               ) -> torch.Tensor:
    """SwiGLU of expert e of `layer` at width index k: x [n, D] -> [n, D]."""
    w1, w3, w2 = weights.expert(k, layer, e)
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


class AllWidths:
    """Runs every slot at 3 bits; keeps each slot's output at every width (and the proxy) and
    the layer's output as a leaf, so the loss's gradient per layer can be read."""

    def __init__(self, weights: WidthWeights) -> None:
        self.weights, self.kept = weights, {}

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
                  ) -> torch.Tensor:
        n_w = len(self.weights.bits)
        ys = torch.zeros(n_w, *ids.shape, x.shape[1])  # [K+1, T, k, D]
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            for k in range(n_w):
                ys[k, tok, slot] = expert_out(self.weights, k, layer, e, x[tok].detach())
        out = (ys[MID] * w[..., None]).sum(1).detach().requires_grad_(True)  # [T, D]
        self.kept[layer] = (out, ys, w.detach())
        return out


class FixedWidths:
    """Runs each (token, slot) at the width index given per layer [T, k]."""

    def __init__(self, weights: WidthWeights, index: dict[int, torch.Tensor]) -> None:
        self.weights, self.index = weights, index

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
                  ) -> torch.Tensor:
        idx, out = self.index[layer], torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            for k in range(len(BITS)):
                tok, slot = ((ids == e) & (idx == k)).nonzero(as_tuple=True)
                if len(tok):
                    y = expert_out(self.weights, k, layer, e, x[tok])
                    out.index_add_(0, tok, y * w[tok, slot, None])
        return out


def allocate(cost: torch.Tensor) -> torch.Tensor:
    """cost [T, k, K] (lower: that width hurts less) -> width index [T, k] at CAPS."""
    rows = cost.reshape(-1, cost.shape[-1])
    prefs = torch.softmax(-rows / rows.abs().mean().clamp_min(1e-12), -1)
    return assign(prefs, capacity_counts(CAPS, rows.shape[0])).view(cost.shape[:-1])


def by_weight(w: torch.Tensor) -> torch.Tensor:
    """Width index [T, k] from the rank of each slot's router weight (light: few bits)."""
    r = w.reshape(-1).argsort().argsort().float() / max(w.numel() - 1, 1)  # [R] in 0..1
    prefs = torch.stack([1 - r, 0.5 - (r - 0.5).abs(), r], 1)
    return assign(prefs, capacity_counts(CAPS, w.numel())).view(w.shape)


def first_order(model, inp, target, weights) -> dict[int, torch.Tensor]:
    """Per layer [T, k, K]: the first-order loss change of each row at each width."""
    be = AllWidths(weights)
    with torch.enable_grad():
        logp = torch.log_softmax(model(inp, backend=be).reshape(target.shape[0], -1).float(), -1)
        loss = -(target * logp).sum() if target.dim() == 2 else F.nll_loss(logp, target,
                                                                            reduction="sum")
        layers = sorted(be.kept)
        grads = torch.autograd.grad(loss, [be.kept[lay][0] for lay in layers])
    out = {}
    for lay, g in zip(layers, grads, strict=True):
        _, ys, w = be.kept[lay]
        delta = (ys[:len(BITS)] - ys[MID:MID + 1]) * w[None, ..., None]  # [K, T, k, D]
        out[lay] = torch.einsum("td,ktjd->tjk", g, delta)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout-kib", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="windows per capacity batch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, spec = load_tiny()
    model.eval().requires_grad_(False)
    ids = torch.tensor(heldout_ids("tiny", spec, args.heldout_kib))
    reader, _ = open_store("tiny", "")
    weights = WidthWeights.from_store(reader, (*BITS, PROXY_BITS))
    reader.close()
    n = len(ids) // args.ctx
    windows = ids[:n * args.ctx].view(n, args.ctx)  # [N, ctx]
    names = ("uniform 3", "router weight", "output error", "first-order (teacher)",
             "first-order (label)")
    nll, count = dict.fromkeys(names, 0.0), 0
    for s in range(0, n, args.batch):
        wb = windows[s:s + args.batch]
        inp, label = wb[:, :-1], wb[:, 1:].reshape(-1)
        with torch.no_grad():
            teacher = torch.softmax(model(inp).reshape(label.shape[0], -1).float(), -1)
        probe = AllWidths(weights)
        with torch.no_grad():
            model(inp, backend=probe)
        err = {lay: (((ys[:len(BITS)] - ys[-1:]) * w[None, ..., None]) ** 2).sum(-1)
               .permute(1, 2, 0) for lay, (_, ys, w) in probe.kept.items()}  # [T, k, K]
        plans = {
            "uniform 3": {lay: torch.full_like(w, MID, dtype=torch.long)
                          for lay, (_, _, w) in probe.kept.items()},
            "router weight": {lay: by_weight(w) for lay, (_, _, w) in probe.kept.items()},
            "output error": {lay: allocate(c) for lay, c in err.items()},
            "first-order (teacher)": {lay: allocate(c) for lay, c in
                                      first_order(model, inp, teacher, weights).items()},
            "first-order (label)": {lay: allocate(c) for lay, c in
                                    first_order(model, inp, label, weights).items()},
        }
        with torch.no_grad():
            for name, index in plans.items():
                logits = model(inp, backend=FixedWidths(weights, index))
                nll[name] += F.cross_entropy(logits.reshape(label.shape[0], -1).float(), label,
                                             reduction="sum").item()
        count += label.numel()
    base = math.exp(nll["uniform 3"] / count)
    print(f"tiny model, {count:,d} held-out tokens, bits {BITS} at capacities {CAPS} per "
          "(token, slot), 3.000 bits on average (measured, this run)")
    for name in names:
        ppl = math.exp(nll[name] / count)
        print(f"{name:>22}: perplexity {ppl:.4f}  ({100 * (ppl / base - 1):+.2f}% vs uniform 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
