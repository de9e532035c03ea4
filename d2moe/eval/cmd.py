"""`d2moe eval ppl`: held-out perplexity per uniform bit-width of the quantized experts."""

from __future__ import annotations

import argparse

from d2moe.core.cliargs import add_fields, from_args, group_usage, require_modules


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` verb and its `ppl` sub-verb (ImportError without torch)."""
    require_modules("torch", "safetensors", verb="eval")
    from d2moe.eval.ppl import PplConfig

    ev = subparsers.add_parser("eval", help="quality of quantized models (perplexity)",
                               description="The quality side of quantization: held-out "
                                           "perplexity per bit-width and format (ppl).")
    verbs = ev.add_subparsers(dest="eval_verb", metavar="EVAL_VERB")
    ppl = verbs.add_parser(
        "ppl", help="held-out perplexity at each uniform bit-width (and fp)",
        description="Quantize (or read from --store) every routed expert, dequantize it at "
                    "each --bits width into a resident backend, and print the held-out "
                    "perplexity per width and format next to the unquantized model's.")
    add_fields(ppl, PplConfig)
    ppl.set_defaults(func=_ppl)
    ev.set_defaults(func=group_usage(ev))


def _ppl(args: argparse.Namespace) -> int:
    from d2moe.eval.ppl import PplConfig, eval_ppl

    cfg = from_args(PplConfig, args)
    routed: list[str] = []
    if cfg.router:  # first, so a mismatched router fails before the table's work
        from d2moe.router.evaluate import router_report

        routed = router_report(cfg.model, cfg.store, cfg.router, heldout_kib=cfg.heldout_kib,
                               ctx=cfg.ctx, batch=cfg.batch)
    table = eval_ppl(cfg)
    print(f"held-out perplexity per token of {table.model} on {table.tokens_scored:,d} scored "
          f"tokens ({cfg.heldout_kib} KiB, windows of {cfg.ctx}); experts from {table.source}; "
          "measured, % above fp in brackets")
    print(table.render())
    if routed:
        print("bit-widths chosen per token or per expert slot (measured, same tokens):")
        for line in routed:
            print("  " + line)
    return 0
