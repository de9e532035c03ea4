"""`d2moe router train`: train the bit-width gate offline with the base model frozen.

Per step: a batch of random windows of the model's training split; the frozen model gives the
target q (its full-precision distribution, or the next token); the same model with
`MixExperts` (every expert dequantized at each candidate width from the nested store, mixed by
the straight-through one-hot of the capacity-constrained choice) gives p; the loss is
`loss.router_loss` (method.md part 1); Adam updates the gate only.

Checkpoint selection: the last `val_kib` KiB of the training text are held back; at the start
and every `val_every` steps the gate runs as inference runs it (`BitRouter`, hard widths under
the capacities) over them, and the gate with the lowest CE + alpha x mean chosen bits is saved
(the start counts: the per-slot gate's initial router-weight ordering is a candidate too).
Why: the straight-through gradient is a first-order estimate of swapping widths and can make
the hard choice worse (measured: training CE rising over 150 steps at fixed capacities,
docs/results/router.md).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import check_threads, model_field
from d2moe.core.errors import UserError
from d2moe.core.progress import progress_bar


@dataclass(frozen=True)
class RouterTrainConfig:
    """Options of `d2moe router train` (the CLI is built from these fields)."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store of this model (d2moe quantize); empty: for tiny, the cached one"})
    bits: str = field(default="2,3,4", metadata={"help": "candidate bit-widths, increasing"})
    capacity: str = field(default="0.3,0.4,0.3", metadata={
        "help": "capacity per width: the largest share of a batch's tokens (sum >= 1)",
        "aliases": ("--capacities",)})
    alpha: float = field(default=0.01, metadata={"help": "weight of the bit-cost term"})
    target: str = field(default="distill", metadata={
        "help": "distill (the frozen fp model's distribution) or next (the next token)"})
    relax: str = field(default="st", metadata={
        "help": "st (straight-through) or gumbel (straight-through Gumbel-softmax)"})
    granularity: str = field(default="slot", metadata={
        "help": "slot: one width per (token, expert slot); token: one per token (docs/router.md)"})
    gate_width: int = field(default=0, metadata={
        "help": "gate hidden width: 0 = linear hidden -> K, else a two-layer MLP"})
    tau: float = field(default=1.0, metadata={"help": "softmax temperature of the backward"})
    window: int = field(default=64, metadata={
        "help": "tokens per capacity window for calls smaller than it (decode)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch: int = field(default=8, metadata={"help": "windows per step"})
    ctx: int = field(default=128, metadata={"help": "tokens per window"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate of the gate"})
    train_kib: int = field(default=1024, metadata={"help": "KiB of the training split to use"})
    val_kib: int = field(default=16, metadata={
        "help": "KiB at the end of that text held back to pick the best checkpoint (0: keep "
                "the last step's gate)"})
    val_every: int = field(default=25, metadata={"help": "steps between validations"})
    seed: int = field(default=0, metadata={"help": "seed of gate init, batches and noise"})
    threads: int = field(default=1, metadata={
        "help": "torch threads (0: torch's default; 1 is fastest on a shared 2-core VM)"})
    out: str = field(default="", metadata={
        "help": "output directory; empty: <store>/router, beside the store (replacing a "
                "router there)", "metavar": "DIR"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal"})

    def __post_init__(self) -> None:
        from d2moe.router.gate import RELAXATIONS
        from d2moe.router.loss import TARGETS
        from d2moe.traces.schema import GRANULARITIES

        if self.gate_width < 0:
            raise UserError(f"must be >= 0, got {self.gate_width}", field="gate-width",
                            fix="0 (linear) or e.g. 32")
        for name in ("steps", "batch", "window", "train_kib", "val_every"):
            if getattr(self, name) < 1:
                raise UserError(f"must be positive, got {getattr(self, name)}",
                                field=name.replace("_", "-"), fix="pass a positive value")
        if self.val_kib < 0:
            raise UserError(f"must be >= 0, got {self.val_kib}", field="val-kib",
                            fix="e.g. --val-kib 16 (0: no checkpoint selection)")
        if self.ctx < 2:
            raise UserError(f"need ctx >= 2, got {self.ctx}", field="ctx", fix="e.g. --ctx 128")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):  # nan fails too
            raise UserError(f"must be a number >= 0, got {self.alpha}", field="alpha",
                            fix="e.g. --alpha 0.01")
        for name, example in (("lr", 0.01), ("tau", 1)):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"must be a number > 0, got {value}", field=name,
                                fix=f"e.g. --{name} {example}")
        check_threads(self.threads)
        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}", field="target",
                            fix=f"use {' or '.join(TARGETS)}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r}", field="granularity",
                            fix=f"use {' or '.join(GRANULARITIES)}")
        if self.relax not in RELAXATIONS:
            raise UserError(f"unknown relaxation {self.relax!r}", field="relax",
                            fix=f"use {' or '.join(RELAXATIONS)}")


@dataclass(frozen=True)
class RouterTrainResult:
    """What a run measured and where it wrote the router."""

    out_dir: Path
    ce: tuple[float, ...]  # per step
    mean_bits: tuple[float, ...]  # per step: mean chosen bits over rows and layers
    expected_bits: tuple[float, ...]  # per step: (1/L) Σ_l Σ_k p_k^l b_k
    preferred_bits: float  # last step: mean bits of each row's top gate choice
    seconds: float
    val: tuple[tuple[int, float, float], ...] = ()  # (step, CE, mean bits) per validation
    best_step: int = -1  # the saved gate's step (-1: the last, no validation)


def open_store(model: str, store: str) -> tuple[Any, Path]:
    """The StoreReader for `store`, or for tiny the cached store (built once)."""
    from d2moe.executor.setup import resolve_store
    from d2moe.quant.store import StoreReader

    path = resolve_store(model, store)  # a bad --model is named before a missing store
    return StoreReader(path), path


def check_store(reader: Any, spec: Any, bits: tuple[int, ...], path: Path, model: str) -> None:
    """UserError unless the store is this model's and serves every width in `bits`."""
    from d2moe.executor.setup import check_match

    check_match(spec, reader, path, model)
    lo, hi = reader.layout.b1, reader.bits_stored
    bad = [b for b in bits if not lo <= b <= hi]
    if bad:
        raise UserError(f"{','.join(map(str, bad))} bits is outside the store's {lo}..{hi}",
                        path=str(path), field="bits",
                        fix="choose widths the store serves or re-quantize with "
                            "--store-bits LOW:HIGH")


def train_router(cfg: RouterTrainConfig) -> RouterTrainResult:
    """Train the gate per `cfg` and save it (store.save_router)."""
    import torch

    from d2moe.model.corpus import load_corpus
    from d2moe.model.load import load_model
    from d2moe.model.tokenizer import text_codec
    from d2moe.router.capacity import check_capacities, parse_bits, parse_floats
    from d2moe.router.experts import MixExperts, WidthWeights
    from d2moe.router.gate import BitGate
    from d2moe.router.loss import router_loss
    from d2moe.router.store import DEFAULT_DIR, save_router

    bits = parse_bits(cfg.bits)
    caps = check_capacities(parse_floats(cfg.capacity, "capacity"), len(bits))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, spec = load_model(cfg.model)
    encode, _ = text_codec(cfg.model, spec.vocab)  # bytes for tiny; else its tokenizer.json
    reader, store_path = open_store(cfg.model, cfg.store)
    try:
        check_store(reader, spec, bits, store_path, cfg.model)
        weights = WidthWeights.from_store(reader, bits)
        layout = dataclasses.asdict(reader.layout)
        source = reader.source
    finally:
        reader.close()
    model.eval().requires_grad_(False)
    text = load_corpus(cfg.train_kib * 1024, 1024).train
    n_val = cfg.val_kib * 1024  # the text's last n_val bytes, encoded apart
    cut = max(len(text) - n_val, 0)
    data = torch.tensor(encode(text[:cut]), dtype=torch.long)  # [tokens]
    val_data = torch.tensor(encode(text[cut:]) if n_val else [], dtype=torch.long)
    if len(data) <= cfg.ctx + 1 or (n_val and len(val_data) <= cfg.ctx + 1):
        raise UserError("training text shorter than one window after holding back "
                        f"{cfg.val_kib} KiB for validation", field="train-kib",
                        fix="raise --train-kib, or lower --val-kib or --ctx")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    slots = spec.top_k if cfg.granularity == "slot" else 0
    gate = BitGate(spec.layers, spec.hidden, len(bits), seed=cfg.seed, width=cfg.gate_width,
                   slots=slots)
    opt = torch.optim.Adam(gate.parameters(), lr=cfg.lr)
    mix = MixExperts(weights, gate, caps, tau=cfg.tau, relax=cfg.relax, generator=gen)
    val = _Validation(model, spec, val_data, cfg, weights, bits, caps) if n_val else None
    best: tuple[float, int, dict] | None = None  # (score, step, gate state)
    val_rows: list[tuple[int, float, float]] = []

    def validate(step: int) -> None:
        nonlocal best
        ce, mean = val.score(gate)
        val_rows.append((step, ce, mean))
        score = ce + cfg.alpha * mean
        if best is None or score < best[0]:
            best = (score, step, copy.deepcopy(gate.state_dict()))

    offsets = torch.arange(cfg.ctx + 1)
    bits_t = torch.tensor(bits, dtype=torch.float32)
    steps: Any = range(cfg.steps)
    bar = progress_bar(cfg.steps, cfg.progress, "router train", "step")
    ce_l, mean_l, exp_l = [], [], []
    t0 = time.perf_counter()
    for step in steps:
        if val is not None and step % cfg.val_every == 0:
            validate(step)
        starts = torch.randint(0, len(data) - cfg.ctx - 1, (cfg.batch,), generator=gen)
        batch = data[starts[:, None] + offsets].long()  # [B, ctx+1]
        inp = batch[:, :-1]  # [B, ctx]
        if cfg.target == "distill":
            with torch.no_grad():
                target = model(inp).reshape(-1, spec.vocab)  # [N, V] teacher logits
        else:
            target = batch[:, 1:].reshape(-1)  # [N]
        mix.clear()
        logits = model(inp, backend=mix).reshape(-1, spec.vocab)  # [N, V]
        parts = router_loss(logits, target, mix.probs, bits, cfg.alpha)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
        chosen = torch.stack([bits_t[i] for i in mix.index]).mean().item()
        ce_l.append(parts.ce.item())
        mean_l.append(chosen)
        exp_l.append(parts.bit_cost.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ce=f"{ce_l[-1]:.4f}", bits=f"{chosen:.2f}", exp=f"{exp_l[-1]:.2f}")
    preferred = torch.stack([bits_t[p.argmax(-1)] for p in mix.probs]).mean().item()
    if val is not None:
        validate(cfg.steps)
        gate.load_state_dict(best[2])
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    out = Path(cfg.out) if cfg.out else store_path / DEFAULT_DIR
    tail = max(1, min(20, len(ce_l)))
    meta = {
        "bits": list(bits), "capacities": list(caps), "alpha": cfg.alpha,
        "window": cfg.window, "layers": spec.layers, "hidden": spec.hidden,
        "gate_width": cfg.gate_width, "granularity": cfg.granularity, "slots": slots,
        "model": cfg.model, "spec": spec.name, "store": str(store_path), "layout": layout,
        **({"expert_sha256": source["expert_sha256"]} if source else {}),
        "target": cfg.target, "relax": cfg.relax, "tau": cfg.tau,
        "train": {"source": "measured", "command": _command(cfg),
                  "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(),
                              "python": sys.version.split()[0], "torch": torch.__version__},
                  "config": asdict(cfg), "seconds": round(seconds, 1),
                  "final_ce": round(sum(ce_l[-tail:]) / tail, 5),
                  "final_mean_bits": round(sum(mean_l[-tail:]) / tail, 4),
                  "final_expected_bits": round(sum(exp_l[-tail:]) / tail, 4),
                  "final_preferred_bits": round(preferred, 4),
                  "validation": {"kib": cfg.val_kib, "every": cfg.val_every,
                                 "rows": [[s_, round(c, 5), round(b, 4)]
                                          for s_, c, b in val_rows],
                                 "saved_step": best[1] if best else cfg.steps}},
    }
    save_router(out, gate, meta)
    return RouterTrainResult(out_dir=out, ce=tuple(ce_l), mean_bits=tuple(mean_l),
                             expected_bits=tuple(exp_l), preferred_bits=preferred,
                             seconds=seconds, val=tuple(val_rows),
                             best_step=best[1] if best else -1)


class _Validation:
    """The held-back windows, their targets, and the score of a gate run as inference runs
    it: hard widths under the capacities (`BitRouter`), every forward one capacity batch."""

    def __init__(self, model: Any, spec: Any, text: Any, cfg: RouterTrainConfig,
                 weights: Any, bits: tuple[int, ...], caps: tuple[float, ...]) -> None:
        import torch

        n = (len(text) - 1) // cfg.ctx
        win = torch.stack([text[i * cfg.ctx:(i + 1) * cfg.ctx + 1] for i in range(n)]).long()
        self.batches = list(torch.split(win, max(cfg.batch, 16)))  # [b, ctx+1] each
        self.model, self.spec, self.cfg = model, spec, cfg
        self.weights, self.bits, self.caps = weights, bits, caps
        with torch.no_grad():
            self.targets = [model(b[:, :-1]).reshape(-1, spec.vocab) if cfg.target == "distill"
                            else b[:, 1:].reshape(-1) for b in self.batches]

    def score(self, gate: Any) -> tuple[float, float]:
        """(mean CE against the targets, mean chosen bits) of `gate` on the held-back text."""
        import torch

        from d2moe.router.experts import BitRoutedExperts
        from d2moe.router.gate import BitRouter
        from d2moe.router.loss import target_ce

        router = BitRouter(copy.deepcopy(gate), self.bits, self.caps, window=self.cfg.window)
        backend = BitRoutedExperts(self.weights, router)
        backend.reset()
        total, n = 0.0, 0
        with torch.no_grad():
            for batch, target in zip(self.batches, self.targets, strict=True):
                logits = self.model(batch[:, :-1], backend=backend).reshape(-1, self.spec.vocab)
                ce = target_ce(logits, target)
                total, n = total + float(ce) * len(logits), n + len(logits)
        return total / n, backend.average_bits()


def _command(cfg: RouterTrainConfig) -> str:
    defaults = RouterTrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
             if v != getattr(defaults, k) and k != "progress"]
    return " ".join(["d2moe router train", *flags])


