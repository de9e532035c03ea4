"""`d2moe <verb>`: the one entry point. Each subsystem registers its verbs from a `cmd` module.

User errors (`UserError`) print one line, prefixed with the full verb (`d2moe trace synth:`),
and exit 2. An OSError that no command turned into
a UserError (a path that cannot be read or written) does the same: a safety net, so a bad
path never ends in a traceback. Nothing else is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from d2moe.core.errors import UserError
from d2moe.core.signals import Terminated, sigterm_raises

# Modules exposing `register(subparsers)`; each adds its verbs and sets `func` on them.
COMMAND_MODULES = (
    "d2moe.sim.cmd",
    "d2moe.traces.cmd",
    "d2moe.demo",
    "d2moe.sweep.cmd",
    "d2moe.analysis.cmd",
    "d2moe.env",
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


PROG_KEY = "_prog"  # the namespace attribute naming the deepest (sub-)verb parsed


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error rule: a bad option or value is one line naming it
    and where the fix is (exit 2), not the whole usage block. Sub-verbs inherit the class.

    Each parser records its `prog` in the namespace unless a sub-verb's parser did first, so
    the deepest one wins: an unknown option points at that verb's --help, and `main` prefixes
    errors with the full verb. A UserError raised by an option's `type` (an empty `--out`:
    d2moe.core.cliargs) is one line of that verb's too."""

    def error(self, message: str) -> NoReturn:
        m = re.match(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message)
        if m:  # argparse reads a value that starts with '-' (-5%, -1,1) as another option
            self.exit(2, f"{self.prog}: error: {message} (fix: give it a value; one that "
                         f"starts with '-' goes after '=': {m.group(1)}=-5)\n")
        self.exit(2, f"{self.prog}: error: {message} (fix: see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        try:
            ns, extras = super().parse_known_args(args, namespace)
        except UserError as exc:
            self.exit(2, f"{self.prog}: error: {exc}\n")
        if not hasattr(ns, PROG_KEY):
            setattr(ns, PROG_KEY, self.prog)
        return ns, extras

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse reports them from the top parser: name the verb's --help
            prog = getattr(ns, PROG_KEY, self.prog)
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} "
                         f"(fix: see {prog} --help)\n")
        return ns


def version() -> str:
    """The installed distribution's version, else the package's `__version__` (a source
    tree on PYTHONPATH that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("d2moe")
    except PackageNotFoundError:
        import d2moe

        return str(getattr(d2moe, "__version__", "unknown"))


class _VersionAction(argparse.Action):
    """`d2moe --version`: looks the version up only when asked (every other call skips the
    package-metadata scan), prints it on stdout and exits 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the installed version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"d2moe {version()}")  # on stdout, as argparse's own version action
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The `d2moe` parser: every command module registers its verbs; an optional one whose
    imports are missing (torch) is named in the epilog instead."""
    parser = OneLineParser(
        prog="d2moe",
        description="Serve and study MoE models on memory-starved devices: nested-bit-width "
                    "experts, HEBF scheduling, a simulator and a real executor that run the "
                    "same policies.")
    parser.add_argument("--version", action=_VersionAction)
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
    """Run one `d2moe` verb; returns the exit status (a UserError or OSError: one line, no
    traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    prog = _prog(args)
    try:
        # SIGTERM unwinds like Ctrl-C (temp files and dirs go), unless the verb keeps the
        # default, dying at once (a sweep: its rows are durable, and unwinding a process
        # pool from a signal could hang in CPython 3.11's pool shutdown)
        terminate = sigterm_raises() if getattr(args, "sigterm_unwinds", True) \
            else contextlib.nullcontext()
        with terminate:
            return int(args.func(args) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc} "
              "(fix: check the path and its permissions)", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _prog(args: Any) -> str:
    """The full verb that parsed `args` (`d2moe trace synth`), for error lines."""
    return str(getattr(args, PROG_KEY, None) or f"d2moe {args.verb}")


if __name__ == "__main__":
    sys.exit(main())
