"""An expert's gate and up projections in one launch (`triton_launch.gate_up`) against the
launches it replaces (w1, w3, silu, mul), both timed in the same run; and whole experts
(`dispatch.expert_swiglu`, w2 included) with `fused` off and on.

Per Mixtral-8x7B / LLaMA-MoE-3.5B expert shape, format, bit-width and token count: the
planes of w1, w3 and w2 sit at shuffled places of one buffer (as in the CUDA pool's level
blocks), outputs are checked to agree, then each form is timed eagerly
(`triton.testing.do_bench`: L2 flushed, one Python call per launch, as the executor runs
them); the ratio separate / fused is printed, > 1 where fusing pays. This is the measurement
that decides `dispatch.FUSED_GATE_UP`. Needs CUDA (the interpreter's timings mean nothing).

Usage: python benchmarks/gate_up.py [--bits 2,4,8] [--kinds bitplane,mwq] [--tokens 1,4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plane_views import scattered  # noqa: E402

from d2moe.core.cliargs import split_list  # noqa: E402
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.kernels.dispatch import expert_swiglu  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.kernels.triton_launch import gate_up, nested_matmul  # noqa: E402
from d2moe.profiles.probe_store import random_matrix  # noqa: E402

# (ffn, hidden): w1 and w3 are [ffn, hidden], w2 [hidden, ffn]
SHAPES = {"mixtral-8x7b": (14336, 4096), "llama-moe-3.5b": (688, 4096)}


def separate(x: torch.Tensor, w1: PackedExpertMatrix, w3: PackedExpertMatrix,
             bits: int) -> torch.Tensor:
    """The baseline: two products, then silu and the product in torch (four launches)."""
    return torch.nn.functional.silu(nested_matmul(x, w1, bits)) * nested_matmul(x, w3, bits)


def time_case(x: torch.Tensor, w1: PackedExpertMatrix, w3: PackedExpertMatrix,
              w2: PackedExpertMatrix, bits: int, bench) -> tuple[float, ...] | None:
    """(separate, fused, expert, expert fused) times in ms by `bench`; None when the fused
    output disagrees with the separate one (fp16 sums in another order: loose tolerance)."""
    a, b = separate(x, w1, w3, bits), gate_up(x, w1, w3, bits)
    if not torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-2):
        return None
    return (bench(lambda: separate(x, w1, w3, bits)), bench(lambda: gate_up(x, w1, w3, bits)),
            bench(lambda: expert_swiglu(x, w1, w3, w2, bits, fused=False)),
            bench(lambda: expert_swiglu(x, w1, w3, w2, bits, fused=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--kinds", default="bitplane,mwq")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--models", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gate_up.py needs CUDA: it times the kernels on a GPU")
    from triton.testing import do_bench

    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; fp16; eager, "
          "L2 flushed (do_bench medians)")
    print("| model | kind | bits | tokens | w1+w3+silu*mul us | gate_up us | ratio "
          "| expert us | expert fused us | ratio |")
    print("|" + "---|" * 10)
    ratios: dict[str, list[float]] = {"gate_up": [], "expert": []}
    for model in split_list(args.models, "models", example="--models llama-moe-3.5b"):
        ffn, hidden = SHAPES[model]
        for kind in split_list(args.kinds, "kinds", example="--kinds bitplane,mwq"):
            layout = QuantLayout(kind=kind, b1=2, bK=8)
            w1, w3, w2 = (scattered(PackedExpertMatrix.from_nested(
                random_matrix(rng, r, c, layout), device=dev), rng)
                for r, c in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
            for bits in (int(b) for b in split_list(args.bits, "bits", example="--bits 2,4")):
                for tokens in (int(t) for t in split_list(args.tokens, "tokens",
                                                          example="--tokens 1,8")):
                    x = torch.randn(tokens, hidden, device=dev, dtype=torch.float16)
                    t = time_case(x, w1, w3, w2, bits, do_bench)
                    if t is None:
                        sys.exit(f"outputs differ: {model} {kind} {bits} bits {tokens} tokens")
                    ratios["gate_up"].append(t[0] / t[1])
                    ratios["expert"].append(t[2] / t[3])
                    print(f"| {model} | {kind} | {bits} | {tokens} | {t[0] * 1e3:.1f} | "
                          f"{t[1] * 1e3:.1f} | {t[0] / t[1]:.2f}x | {t[2] * 1e3:.1f} | "
                          f"{t[3] * 1e3:.1f} | {t[2] / t[3]:.2f}x |", flush=True)
    for name, r in ratios.items():
        geo = float(np.exp(np.mean(np.log(r))))
        print(f"geomean separate / fused, {name}: {geo:.2f}x over {len(r)} cases "
              f"({min(r):.2f}-{max(r):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
