"""The arrival process: requests with Poisson arrival times and fixed or ranged lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from d2moe.core.errors import UserError


@dataclass(frozen=True)
class Request:
    """One serving request: when it arrives, its prompt length, how many tokens it wants."""

    id: int
    arrival_us: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ArrivalConfig:
    """The arrival process (the CLI is built from these fields)."""

    rate: float = field(default=20.0, metadata={
        "help": "mean arrivals per second (Poisson process; inf: all arrive at time 0)"})
    requests: int = field(default=8, metadata={"help": "number of requests"})
    prompt_tokens: str = field(default="8:16", metadata={
        "help": "prompt length: N, or MIN:MAX drawn uniformly (inclusive)", "metavar": "A[:B]"})
    output_tokens: str = field(default="4:8", metadata={
        "help": "tokens each request generates (the first comes from its prefill): N or "
                "MIN:MAX", "metavar": "A[:B]"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same requests"})

    def __post_init__(self) -> None:
        if not (self.rate > 0):  # also rejects NaN
            raise UserError(f"must be > 0, got {self.rate}", field="rate",
                            fix="pass requests per second, e.g. --rate 20 (inf: all at once)")
        if self.requests < 1:
            raise UserError(f"must be >= 1, got {self.requests}", field="requests",
                            fix="pass e.g. --requests 8")
        if self.seed < 0:
            raise UserError(f"must be >= 0, got {self.seed}", field="seed", fix="e.g. 0")
        parse_range(self.prompt_tokens, "prompt_tokens")
        parse_range(self.output_tokens, "output_tokens")

    @property
    def prompt_range(self) -> tuple[int, int]:
        """(min, max) prompt tokens."""
        return parse_range(self.prompt_tokens, "prompt_tokens")

    @property
    def output_range(self) -> tuple[int, int]:
        """(min, max) output tokens."""
        return parse_range(self.output_tokens, "output_tokens")


def parse_range(text: str, name: str) -> tuple[int, int]:
    """`N` -> (N, N); `A:B` -> (A, B); both >= 1 and A <= B."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if len(parts) > 2 or not 1 <= lo <= hi:
        raise UserError(f"cannot read {text!r} as N or MIN:MAX with 1 <= MIN <= MAX",
                        field=name, fix="e.g. 16 or 8:32")
    return lo, hi


def make_requests(cfg: ArrivalConfig) -> list[Request]:
    """The requests of `cfg`, by arrival (ids in arrival order); deterministic per seed.

    Inter-arrival gaps are exponential with mean 1/rate, the first counted from time 0."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.requests
    if math.isinf(cfg.rate):
        arrivals = np.zeros(n)
    else:
        arrivals = np.cumsum(rng.exponential(1e6 / cfg.rate, size=n))
    (p_lo, p_hi), (o_lo, o_hi) = cfg.prompt_range, cfg.output_range
    prompts = rng.integers(p_lo, p_hi + 1, size=n)
    outputs = rng.integers(o_lo, o_hi + 1, size=n)
    return [Request(i, float(a), int(p), int(o))
            for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))]
