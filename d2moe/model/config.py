"""ModelConfig (what a runnable transformer needs beyond `ModelSpec`) and TrainConfig.

No torch here: the CLI builds its options from these without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2moe.core.cliargs import check_threads
from d2moe.core.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture details that `d2moe.core.spec.ModelSpec` (sizes only) does not carry.

    `renormalize_topk`: True is Mixtral's router (softmax over the top-k logits, i.e. the
    top-k probabilities renormalised to sum to 1); False is OLMoE's and Qwen-MoE's default
    (softmax over all experts, then top-k, weights left as they are: `norm_topk_prob=False`).
    """

    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    renormalize_topk: bool = True
    tie_embeddings: bool = False
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections
    qkv_bias: bool = False  # Qwen-MoE: biases on q, k, v
    shared_expert_gate: bool = False  # Qwen-MoE: sigmoid(x @ g) scales the shared expert
    arch: str = "mixtral"  # HF tensor naming used to save and load: mixtral | olmoe | qwen2_moe
    max_positions: int = 0  # HF max_position_embeddings: the longest sequence (0: unknown)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `d2moe model train-tiny` (defaults: the shipped checkpoint)."""

    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step",
                                                  "aliases": ("--batch",)})
    ctx_len: int = field(default=256, metadata={"help": "tokens (bytes) per sequence",
                                                "aliases": ("--ctx",)})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    min_lr_frac: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices)"})
    balance_coef: float = field(default=0.01, metadata={"help": "load-balancing loss weight"})
    train_kb: int = field(default=4096, metadata={"help": "KiB of stdlib source to train on",
                                                  "aliases": ("--train-kib",)})
    heldout_kb: int = field(default=128, metadata={"help": "KiB of held-out source to score",
                                                   "aliases": ("--heldout-kib",)})
    seed: int = field(default=0, metadata={"help": "seed of init and batch sampling"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    out: str = field(default="", metadata={
        "help": "output directory; empty (the default): the installed package's "
                "d2moe/model/tiny, OVERWRITING the shipped checkpoint that `--model tiny` "
                "loads (how it was made); pass a directory to keep it", "metavar": "DIR"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ctx_len", "train_kb", "heldout_kb"):
            if getattr(self, name) <= 0:
                raise UserError(f"must be positive, got {getattr(self, name)}",
                                field=name.replace("_", "-"), fix="pass a positive value")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"must be a number > 0, got {self.lr}", field="lr",
                            fix="e.g. --lr 3e-3")
        if not 0 <= self.min_lr_frac <= 1:
            raise UserError(f"must be in [0, 1], got {self.min_lr_frac}", field="min-lr-frac",
                            fix="e.g. --min-lr-frac 0.1")
        for name in ("weight_decay", "balance_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"must be a number >= 0, got {value}",
                                field=name.replace("_", "-"), fix="pass 0 or more")
        if self.warmup_steps < 0:
            raise UserError(f"must be >= 0, got {self.warmup_steps}", field="warmup-steps",
                            fix="pass 0 or more")
        check_threads(self.threads)
