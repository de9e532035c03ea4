"""Simulator fidelity: real executor against the simulator on the same recorded trace, per
(policy, budget): real and simulated tokens/s and the error in %, lane busy and bubble time,
hit rate; then mean and worst |error| and whether the policy ranking agrees per budget.

The real runs are measured in this invocation. The profile is the shipped one measured on a
machine like this (`d2moe validate --profile auto`: cpu-2core-xeon or cpu-2core) unless
--measure, which measures a fresh profile before each of the --repeats passes over the rows
and simulates with their median (on a machine shared with other work, costs drift between a
profile taken earlier and the runs; interleaving them keeps both under the same load).

Usage:
  python benchmarks/fidelity.py [--measure] [--tokens 32] [--repeats 3]
  python benchmarks/fidelity.py --mixtral [--layers 2] [--tokens 3] [--measure]
      (random-weight Mixtral-8x7B-shaped model, bitplane 2..4 bits; slow on a CPU)
  python benchmarks/fidelity.py --device cuda --measure [--sync-rows]   (on a GPU)
  python benchmarks/fidelity.py --measure --rounds 8
      (eight comparisons in a row, each with its own profiles, pooled: the simulator's bias
      per (policy, budget) with two standard errors, apart from the machine's drift)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import torch

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import load_spec
from d2moe.executor.profile_choice import chosen_profile
from d2moe.executor.validate import ValidateConfig, validate_rounds
from d2moe.quant.store import StoreReader

MIXTRAL_LAYOUT = QuantLayout(kind="bitplane", b1=2, bK=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixtral", action="store_true", help="the random Mixtral-shaped model")
    ap.add_argument("--layers", type=int, default=2, help="Mixtral-shaped layers")
    ap.add_argument("--tokens", type=int, default=0, help="new tokens (0: 32 tiny, 3 mixtral)")
    ap.add_argument("--repeats", type=int, default=1, help="real runs per row (median kept)")
    ap.add_argument("--budgets", default="", help="default 25%%,50%%,100%% (mixtral 50%%,100%%)")
    ap.add_argument("--policies", default="fifo,hebf")
    ap.add_argument("--profile", default="auto",
                    help="profile name or YAML; auto: the shipped one of a machine like this")
    ap.add_argument("--measure", action="store_true", help="measure a fresh profile first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--sync-rows", action="store_true",
                    help="CUDA: rows end after the GPU's work (d2moe validate --sync-rows); "
                         "the profile under --measure too")
    ap.add_argument("--store", default="", help="Mixtral: directory to keep the store in")
    ap.add_argument("--rounds", type=int, default=1,
                    help="whole comparisons in a row (each with its own profile under "
                         "--measure), pooled: the simulator's bias per row")
    ap.add_argument("--out", default="out/fidelity")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"fidelity.py --device {args.device}: torch sees no CUDA device "
                   "(fix: --device cpu)\n")
    t0 = time.perf_counter()
    device = torch.device(args.device)
    try:
        profile = None if args.measure else chosen_profile(ValidateConfig(
            profile=args.profile, device=args.device, threads=args.threads))
    except UserError as exc:
        ap.error(str(exc))
    if profile and args.mixtral:  # before a store of gigabytes is written for nothing
        spec = dataclasses.replace(load_spec("mixtral-8x7b"), layers=args.layers)
        try:
            profile.run_us(spec, 4, 1, MIXTRAL_LAYOUT)
            profile.non_expert_us(spec, 1)
        except UserError as exc:
            ap.error(f"{exc} -- pass --measure (the shipped profiles time the tiny model only)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.mixtral:
            model, spec, store, prompt = _mixtral(args, Path(tmp))
            tokens, budgets = args.tokens or 3, args.budgets or "50%,100%"
        else:
            model, spec, store, prompt = _tiny(Path(tmp))
            tokens, budgets = args.tokens or 32, args.budgets or "25%,50%,100%"
        model.to(device)
        cfg = ValidateConfig(policies=args.policies, budgets=budgets, max_new_tokens=tokens,
                             device=args.device, threads=args.threads, repeats=args.repeats,
                             rounds=args.rounds, out=args.out, sync_rows=args.sync_rows)
        print(f"machine: {platform.machine()}, {platform.node()}; torch {torch.__version__}; "
              + (f"profile {profile.name} ({profile.source.kind}, {profile.source.date})"
                 if profile else "profiles measured between the runs of each round (--measure)"))
        result = validate_rounds(model, spec, store, profile, cfg, prompt,
                                 command="benchmarks/fidelity.py --measure"
                                 + (" --sync-rows" if args.sync_rows else ""), **(
                                     {"tokens": "1,8", "bits": "4", "repeats": 3,
                                      "probe_experts": 3}
                                     if args.mixtral else {}))
        print(result["report"])
        print(f"figures and timelines in {args.out}; took {time.perf_counter() - t0:.0f} s")

def _tiny(tmp: Path):
    from d2moe.model.load import load_tiny, tiny_dir
    from d2moe.model.tokenizer import encode
    from d2moe.quant.cmd import quantize_checkpoint

    path = tmp / "store"
    quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
    model, spec = load_tiny()
    return model, spec, StoreReader(path, direct=True), list(encode("def fib(n):\n    return"))


def _mixtral(args: argparse.Namespace, tmp: Path):
    from d2moe.model.transformer import Transformer
    from d2moe.profiles.probe_store import write_random_store

    spec = dataclasses.replace(load_spec("mixtral-8x7b"), layers=args.layers)
    path = Path(args.store) if args.store else tmp / "store"
    if not (path / "index.json").is_file():
        print(f"writing a random {spec.layers}-layer Mixtral-shaped store to {path}")
        write_random_store(path, spec, MIXTRAL_LAYOUT)
    model = Transformer(spec, with_experts=False)
    model.init_weights(seed=0)
    return model, spec, StoreReader(path, direct=True), list(range(1, 9))


if __name__ == "__main__":
    main()
