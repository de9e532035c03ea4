"""`d2moe <verb>`: the one entry point. Each subsystem registers its verbs from a `cmd` module.

User errors (`UserError`) print one line and exit 2. An OSError that no command turned into
a UserError (a path that cannot be read or written) does the same: a safety net, so a bad
path never ends in a traceback. Nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from d2moe.core.errors import UserError
from d2moe.core.signals import Terminated, sigterm_raises

# Modules exposing `register(subparsers)`; each adds its verbs and sets `func` on them.
COMMAND_MODULES = (
    "d2moe.sim.cmd",
    "d2moe.traces.cmd",
    "d2moe.demo",
    "d2moe.sweep.cmd",
)
OPTIONAL_COMMAND_MODULES = (  # need torch; skipped (with a note in --help) when it is missing
    "d2moe.quant.cmd",
    "d2moe.model.cmd",
    "d2moe.executor.cmd",
    "d2moe.eval.cmd",
    "d2moe.router.cmd",
    "d2moe.profiles.cmd",
    "d2moe.executor.validate",
    "d2moe.experts.cmd",
    "d2moe.serve.cmd",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error rule: a bad option or value is one line naming it
    and where the fix is (exit 2), not the whole usage block. Sub-verbs inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (fix: see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="d2moe",
        description="Serve and study MoE models on memory-starved devices: nested-bit-width "
                    "experts, HEBF scheduling, a simulator and a real executor that run the "
                    "same policies.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    missing = []
    for name in OPTIONAL_COMMAND_MODULES:
        try:
            importlib.import_module(name).register(sub)
        except ImportError as exc:
            missing.append(f"{name} ({exc.name} not installed)")
    if missing:
        parser.epilog = "unavailable here: " + ", ".join(missing) + \
            " -- install the executor extra: pip install 'd2moe[executor]'"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temp files and dirs go
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"d2moe {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"d2moe {args.verb}: error: {where}{exc.strerror or exc} "
              "(fix: check the path and its permissions)", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
