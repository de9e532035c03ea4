"""`d2moe router train | info`: train the bit-width gate; describe a trained one."""

from __future__ import annotations

import argparse
import json

from d2moe.core.cliargs import add_fields, from_args, require_modules


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `router` verb (ImportError without torch)."""
    require_modules("torch", "safetensors", verb="router")
    from d2moe.router.train import RouterTrainConfig

    router = subparsers.add_parser(
        "router", help="the token-adaptive bit-width router (dual routing): train, inspect",
        description="The bit-width router picks each token's expert bit-widths under "
                    "capacities: train one (train) or print a trained one's record (info).")
    verbs = router.add_subparsers(dest="router_verb", metavar="ROUTER_VERB")
    train = verbs.add_parser(
        "train", help="train the gate with the base model frozen (minutes on 2 cores for tiny)",
        description="Train a per-layer gate (hidden state -> bit-width logits) on the model's "
                    "training split with the loss CE(p, q) + (alpha/L) sum_l sum_k p_k^l b_k "
                    "(docs/router.md), the experts running at the chosen widths from the "
                    "nested store, capacities enforced; save it beside the store "
                    "(<store>/router) or to --out.")
    add_fields(train, RouterTrainConfig)
    train.set_defaults(func=_train)
    info = verbs.add_parser("info", help="print a trained router's record",
                            description="Print a trained router's record (model, store, "
                                        "widths, capacities, gate) and how it was trained.")
    info.add_argument("path", metavar="DIR", help="router directory (or STORE/router)")
    info.set_defaults(func=_info)
    router.set_defaults(func=lambda args: (router.print_help(), 2)[1])


def _train(args: argparse.Namespace) -> int:
    from d2moe.router.train import RouterTrainConfig, train_router

    cfg = from_args(RouterTrainConfig, args)
    r = train_router(cfg)
    tail = max(1, min(20, len(r.ce)))
    print(f"wrote {r.out_dir} ({len(r.ce)} steps in {r.seconds:.0f} s, measured)")
    print(f"last {tail} steps: CE {sum(r.ce[-tail:]) / tail:.4f} nats/token, chosen bits "
          f"{sum(r.mean_bits[-tail:]) / tail:.3f} (capacities {cfg.capacity} over {cfg.bits}), "
          f"expected bits {sum(r.expected_bits[-tail:]) / tail:.3f}, gate's first choice "
          f"{r.preferred_bits:.3f} bits")
    if r.val:
        step, ce, bits = next(row for row in r.val if row[0] == r.best_step)
        print(f"saved the gate of step {step}: validation CE {ce:.4f} at {bits:.3f} bits, the "
              f"lowest CE + alpha x bits of {len(r.val)} validations on {cfg.val_kib} KiB "
              "held back")
        if step == 0 and len(r.val) > 1:
            print("note: no training step beat the untrained gate (its initial ordering by "
                  "router weight) on the held-back text, so that gate is the one saved; on "
                  "the tiny model at fixed capacities this is expected, and free capacities "
                  "(--capacities 1,1,1) let training move the average bits "
                  "(docs/results/router.md, 'Where the gain comes from')")
    return 0


def _info(args: argparse.Namespace) -> int:
    from d2moe.router.store import load_router

    router = load_router(args.path)
    meta = {k: v for k, v in router.meta.items() if k != "train"}
    print(json.dumps(meta, indent=1))
    train = router.meta.get("train", {})
    val = train.get("validation") or {}
    saved = f", saved step {val['saved_step']}" if val.get("rows") else ""
    print(f"trained: {train.get('command')} at {train.get('date_utc')} in "
          f"{train.get('seconds')} s; final CE {train.get('final_ce')}, chosen bits "
          f"{train.get('final_mean_bits')}{saved}; granularity "
          f"{router.granularity}")
    return 0
