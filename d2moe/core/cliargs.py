"""Build argparse options from a frozen config dataclass: defaults live in one place.

Each field becomes `--field-name` with the field's default; `help` comes from the field's
metadata (`field(default=..., metadata={"help": "..."})`), with "(default: X)" appended
unless the help states its default itself or the default is empty (`default_note`).
`metadata={"aliases": ("--other",)}` adds other spellings of the same option: the name
other verbs give the same thing (`--batch` beside `--batch-size`), so either works everywhere.
`metadata={"choices": (...)}` restricts the values as argparse's `choices` does (its refusal
names the option and lists the choices). A field without a default is a required option (the
dataclass cannot be built without it either); its type is its annotation's (int, float, else
str), and its help gets no default note.

An output path (a string field named `out`) whose default is not empty must not be given
empty: `--out ''` would write into the current directory, or below `/` where the verb joins
it as `{out}/sub`. It is a UserError naming the option, raised while parsing (`out_path`).
Where `out` defaults to empty, empty means "the default place" and the help says which. A
required `out` (no default) is checked alike; `metadata={"example": "..."}` is the path its fix
suggests (else the default, else OUT).

The stored bit range, int fields named `b1` and `bK` (a config describing a store's layout),
is one option, `--store-bits B1:BK`, as in every verb (`d2moe quantize`, `eval ppl`),
setting both fields; its default is theirs. `--b1 N` and `--bK N`, the older spelling, still
set one end each. Both spellings naming one end with different values is a UserError naming
both, raised while parsing (`_StoreBits`). Whether the range is valid is the layout's check
(`d2moe.core.sizes.layout_from_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

from d2moe.core.errors import UserError
from d2moe.core.sizes import parse_bits_range

T = TypeVar("T")

STORE_BITS = ("b1", "bK")  # the fields `--store-bits B1:BK` sets (`add_fields`)
_GIVEN = "_spellings_given"  # namespace attribute: field -> (spelling, value) as given


# a default shown as is in help; any other string (spaces, brackets, quotes, a newline) is
# shown quoted, as Python writes it, so where it ends is plain
_PLAIN_DEFAULT = re.compile(r"[\w.,:;/%+<>@*=-]+")
# help that states its own default ("(default: the file name ...)", "1 by default: ...")
_STATES_DEFAULT = re.compile(r"\bdefault:")


def default_note(help_text: str, default: Any) -> str:
    """The " (default: X)" appended to an option's help: none where the help states its
    default itself or the default is empty or None (the help then says what empty means);
    a string default that is not one plain word is quoted; `%` is escaped for argparse."""
    if default is None or default == "" or _STATES_DEFAULT.search(help_text):
        return ""
    shown = str(default)
    if isinstance(default, str) and not _PLAIN_DEFAULT.fullmatch(default):
        shown = repr(default)
    return f" (default: {shown})".replace("%", "%%")  # argparse %-formats help strings


def out_path(option: str, example: str) -> Callable[[str], str]:
    """The argparse `type` of an output path option (`example`: a path to suggest, its default):
    an empty value is a UserError naming `option`, not a write into the current directory."""

    def check(text: str) -> str:
        if not text:
            raise UserError("must not be empty (it would write into the current directory "
                            "or the filesystem root)", field=option,
                            fix=f"pass a path, e.g. --{option} {example}")
        return text

    return check


def add_out_option(parser: argparse.ArgumentParser, *, default: str, help_text: str,
                   metavar: str | None = None) -> None:
    """`--out` added by hand (a verb without a config dataclass), as `add_fields` adds a
    config's `out` field: the same default note and the same check against an empty path."""
    parser.add_argument("--out", type=out_path("out", default), default=default,
                        metavar=metavar, help=help_text + default_note(help_text, default))


def _set_once(namespace: argparse.Namespace, name: str, spelling: str, value: Any, *,
              field: str, fix: str, what: str = "") -> None:
    """Set `name` to `value`, given as `spelling`: a UserError naming `field` and both
    spellings if another spelling gave it a different value before (`what`: the first
    value's label; the same spelling given twice: the last wins, as argparse)."""
    given: dict[str, tuple[str, Any]] = getattr(namespace, _GIVEN, None) or {}
    before, was = given.get(name, (spelling, value))
    if before != spelling and was != value:
        raise UserError(f"{before} gives {what}{was}, {spelling} gives {value}", field=field,
                        fix=fix)
    given[name] = (spelling, value)
    setattr(namespace, _GIVEN, given)
    setattr(namespace, name, value)


class _StoreBits(argparse.Action):
    """`--store-bits B1:BK` (dest store_bits: sets the fields b1 and bK) and the older
    `--b1 N`, `--bK N` (one each). A field given in both spellings with different values is a
    UserError naming both, whichever came first; one spelling given twice: the last wins."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        spelling = option_string or self.dest
        ends = dict(zip(STORE_BITS, values, strict=True)) if self.dest == "store_bits" \
            else {self.dest: values}
        for name, value in ends.items():
            _set_once(namespace, name, spelling, value, field="store-bits", what=f"{name} ",
                      fix="give the range once: --store-bits B1:BK (--b1 and --bK are its "
                          "older spelling)")


class _OneSpelling(argparse.Action):
    """Store the value; an option given under two of its spellings (`aliases`) with different
    values is a UserError naming both (one spelling given twice: the last wins, as argparse)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        name = self.option_strings[0]
        _set_once(namespace, self.dest, option_string or name, values, field=name.lstrip("-"),
                  fix=f"give {name} once ({', '.join(self.option_strings[1:])}: its other "
                      "spelling)")


def _add_store_bits(parser: argparse.ArgumentParser, low: dataclasses.Field[Any],
                    high: dataclasses.Field[Any]) -> None:
    """`--store-bits B1:BK` for the fields b1 and bK (their defaults its default), then
    their own options, the older spelling (`add_fields`)."""
    shown = f"{low.default}:{high.default}"
    parser.add_argument("--store-bits", dest="store_bits", action=_StoreBits,
                        default=argparse.SUPPRESS, metavar="B1:BK",
                        type=lambda text: parse_bits_range(text, "store-bits"),
                        help=f"stored bit range: lowest and highest bit-width, as in "
                             f"quantize and eval ppl (default: {shown})")
    for f in (low, high):
        help_text = f.metadata.get("help", "")
        parser.add_argument(f"--{f.name}", dest=f.name, default=f.default, type=int,
                            action=_StoreBits, metavar="N",
                            help=f"older spelling of --store-bits: the {help_text} alone "
                                 f"(default: {f.default})")


def add_fields(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one option per dataclass field of `cls` (bools become --flag / --no-flag; the
    fields b1 and bK: --store-bits B1:BK, with --b1 and --bK kept)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bit_range = all(n in fields and n not in skip and isinstance(fields[n].default, int)
                    for n in STORE_BITS)
    for f in fields.values():
        if f.name in skip or f.name.startswith("_"):
            continue
        if bit_range and f.name in STORE_BITS:
            if f.name == STORE_BITS[0]:
                _add_store_bits(parser, fields[STORE_BITS[0]], fields[STORE_BITS[1]])
            continue
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        option = f.name.replace("_", "-")
        names = ["--" + option, *f.metadata.get("aliases", ())]
        help_text = f.metadata.get("help", "")
        help_text += default_note(help_text, default)
        if isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, default=default,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind: Callable[[str], Any] = (type(default) if isinstance(default, (int, float))
                                      else _annotated_type(f.type) if required else str)
        if f.name == "out" and (default or required):
            kind = out_path(option, f.metadata.get("example") or default or option.upper())
        extra: dict[str, Any] = {"required": True} if required else {"default": default}
        if len(names) > 1:
            extra["action"] = _OneSpelling
        parser.add_argument(*names, dest=f.name, type=kind, help=help_text,
                            metavar=f.metadata.get("metavar"),
                            choices=f.metadata.get("choices"), **extra)


def _annotated_type(annotation: Any) -> Callable[[str], Any]:
    """int or float for a field annotated so (a class or, under postponed annotations, its
    name), else str: the type of a required option, which has no default to take it from."""
    return {int: int, float: float, "int": int, "float": float}.get(annotation, str)


def model_field(note: str = "", *, help_text: str = "", metavar: str | None = None) -> Any:
    """The `--model` option every verb that loads a real model shares, its default `tiny`
    (`note`: what this verb accepts beyond the built-in tiny model and a checkpoint directory;
    `help_text`, `metavar`: a verb's own wording of it, in place of the shared one)."""
    help_text = help_text or ("`tiny` (built in) or an HF checkpoint directory"
                              + (f" ({note})" if note else ""))
    metadata = {"help": help_text} | ({"metavar": metavar} if metavar else {})
    return dataclasses.field(default="tiny", metadata=metadata)


DTYPES = ("float32", "bfloat16", "float16")  # --dtype of the verbs that run a real model


def dtype_field(experts: str = "the streamed experts keep their stored bits") -> Any:
    """The `--dtype` option of the verbs that run a real model: its non-expert weights,
    activations and KV cache; `experts` says what becomes of its experts in this verb."""
    return dataclasses.field(default="float32", metadata={"choices": DTYPES, "help": (
        "dtype of the non-expert weights, activations and KV cache (bfloat16, float16: half "
        f"float32's memory, for a small GPU); {experts}")})


def check_dtype(name: str) -> str:
    """`name` when it is one of DTYPES, else a UserError naming --dtype."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}", field="dtype",
                        fix="use " + ", ".join(DTYPES[:-1]) + " or " + DTYPES[-1])
    return name


def sync_rows_field(note: str = "") -> Any:
    """The `--sync-rows` option shared by the verbs that run the executor, off by default
    (`note`: what it means for this verb)."""
    return dataclasses.field(default=False, metadata={"help": (
        "CUDA: wait for the GPU before each timeline row ends, so expert and non-expert rows "
        "hold the kernels' time rather than their launches (it gives up the launches' "
        "overlap with the GPU; no effect on the CPU, whose rows are synchronous)"
        + (f"; {note}" if note else ""))})


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Instantiate `cls` from parsed args (fields missing from args keep their defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def group_usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The `func` of a verb group (`d2moe eval`, `d2moe model`) run without a sub-verb: it
    prints the group's help, listing the sub-verbs, and returns exit status 2."""
    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return usage


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


def split_list(text: str | None, field: str, *, example: str, path: str | None = None,
               unique: bool = True, allow_none: bool = False) -> list[str]:
    """The stripped items of a comma-separated option, in order: the one splitter of every
    list a user writes. An empty item ('a,,b', a trailing comma) and, when `unique`, an item
    given twice are UserErrors naming `field` (and `path`): dropping or repeating them
    silently hides a typo. Nothing at all is [] when `allow_none`, else an error too.
    `example` (the option written right, e.g. '--policy fifo,hebf') goes in the fix. None
    (an option left unset) is nothing given, never the one item 'None'."""
    text = "" if text is None else str(text)
    if not text.strip():
        if allow_none:
            return []
        raise UserError("nothing given", path=path, field=field, fix=f"write e.g. {example}")
    items = [item.strip() for item in text.split(",")]
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


def once_each(values: list[T], texts: list[str], field: str, *, example: str,
              path: str | None = None) -> list[T]:
    """`values` parsed from the items `texts` of one list, in order, checked that no value is
    named twice in other words ('2,02', '4KiB,4096', '50%,0.5'): a UserError naming both."""
    for i, v in enumerate(values):
        if v in values[:i]:
            first = texts[values.index(v)]
            raise UserError(f"{first!r} and {texts[i]!r} are the same value, given twice",
                            path=path, field=field, fix=f"name each value once, e.g. {example}")
    return values


def int_ranges(text: str, field: str, *, example: str) -> list[int]:
    """'2-4,8' -> [2, 3, 4, 8]: a comma list of whole numbers and LOW-HIGH ranges, in the
    order written (the bit-width lists of several verbs). A number listed twice, also
    through overlapping ranges ('2-4,3'), is a UserError naming it, as `split_list` refuses
    an item given twice; so is an empty range ('4-2') or an item that is no number."""
    out: list[int] = []
    for part in split_list(text, field, example=example):
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise UserError(f"cannot read {part!r} in {text!r} as a number or a range",
                            field=field, fix=f"write e.g. {example}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"empty range {part!r}", field=field, fix="write LOW-HIGH")
        for n in range(lo, hi + 1):
            if n in out:
                raise UserError(f"{n} is given twice in {text!r}", field=field,
                                fix=f"name each value once, e.g. {example}")
            out.append(n)
    return out
