"""Build argparse options from a frozen config dataclass: defaults live in one place.

Each field becomes `--field-name` with the field's default; `help` comes from the field's
metadata (`field(default=..., metadata={"help": "..."})`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from d2moe.core.errors import UserError

T = TypeVar("T")


def add_fields(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one option per dataclass field of `cls` (bools become --flag / --no-flag)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        shown = str(default).replace("%", "%%")  # argparse %-formats help strings
        help_text = f.metadata.get("help", "") + f" (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            kind = type(default) if isinstance(default, (int, float)) else str
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                metavar=f.metadata.get("metavar"))


def model_field(note: str = "") -> Any:
    """The `--model` option every verb that loads a real model shares (`note`: what this
    verb accepts beyond the built-in tiny model and a checkpoint directory)."""
    help_text = "`tiny` (built in) or an HF checkpoint directory" + (f" ({note})" if note else "")
    return dataclasses.field(default="tiny", metadata={"help": help_text})


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Instantiate `cls` from parsed args (fields missing from args keep their defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def require_modules(*names: str, verb: str) -> None:
    """Raise ImportError (the CLI then lists `verb` as unavailable) unless every module in
    `names` is installed; finds them without importing, so `d2moe --help` stays fast."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"{name} is required by d2moe {verb}", name=name)


def check_threads(n: int) -> int:
    """`--threads`, the torch intra-op thread count of every verb that sets one: 0 leaves
    torch's own setting; a negative count is a UserError (torch would raise at run time)."""
    if n < 0:
        raise UserError(f"must be >= 0, got {n}", field="threads", fix="pass 1, or 0 for default")
    return n


def check_at_least(value: int, low: int, field: str, *, note: str = "") -> int:
    """`value` of the count option `field` (a config field name), or a UserError naming
    `--field` when it is below `low`: the one range check of counts, so every verb words it
    alike. `note` says what `low` means (e.g. '0: all')."""
    if value < low:
        flag = field.replace("_", "-")
        shown = f"{low} ({note})" if note else str(low)
        raise UserError(f"must be >= {low}, got {value}", field=flag,
                        fix=f"pass --{flag} {shown} or more")
    return value


def split_list(text: str, field: str, *, example: str, path: str | None = None,
               unique: bool = True, allow_none: bool = False) -> list[str]:
    """The stripped items of a comma-separated option, in order: the one splitter of every
    list a user writes. An empty item ('a,,b', a trailing comma) and, when `unique`, an item
    given twice are UserErrors naming `field` (and `path`): dropping or repeating them
    silently hides a typo. Nothing at all is [] when `allow_none`, else an error too.
    `example` (the option written right, e.g. '--policy fifo,hebf') goes in the fix."""
    if not str(text).strip():
        if allow_none:
            return []
        raise UserError("nothing given", path=path, field=field, fix=f"write e.g. {example}")
    items = [item.strip() for item in str(text).split(",")]
    if "" in items:
        raise UserError(f"empty item in {text!r}", path=path, field=field,
                        fix=f"drop the extra comma, e.g. {example}")
    if unique:
        seen: set[str] = set()
        for item in items:
            if item in seen:
                raise UserError(f"{item!r} is given twice in {text!r}", path=path, field=field,
                                fix=f"name {item!r} once")
            seen.add(item)
    return items
