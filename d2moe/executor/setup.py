"""What every command that runs a real model under a budget sets up the same way: the store
(given, or the tiny model's built once), the model without its experts matched against it,
the policy's storage on that store, its expert statistics, and the budget in bytes."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError, bare
from d2moe.core.fileio import cache_dir
from d2moe.core.sizes import QuantLayout


def tiny_store(layout: Any) -> Path:
    """The tiny model's nested store, quantized once into the cache directory.

    Quantized again when it is not the shipped checkpoint's (a tiny model trained since, or
    a store written before stores recorded their source). What was kept beside it (a
    router, expert statistics) stays if the new store's bytes are the old one's, and is
    otherwise moved aside with a note. A store from before sources in a cache that cannot
    be written is used as it is."""
    from d2moe.model.load import tiny_dir
    from d2moe.quant.cmd import quantize_checkpoint
    from d2moe.quant.source import expert_sha256
    from d2moe.quant.store import StoreReader

    path = cache_dir() / f"tiny-{layout.kind}-{layout.b1}-{layout.bK}-g{layout.group}"
    old, legacy = None, False
    if (path / "index.json").is_file():
        try:
            with StoreReader(path) as reader:
                if reader.source is not None and \
                        reader.source["expert_sha256"] == expert_sha256(tiny_dir()):
                    return path
                old, legacy = _checksums(reader), reader.source is None
        except UserError:  # damaged: built again, nothing beside it trusted
            pass
    try:
        if old is not None and not legacy:  # another tiny's: its router cannot stay
            _set_aside(path)
        quantize_checkpoint(tiny_dir(), path, layout, progress=False)  # keeps what is beside
        with StoreReader(path) as reader:
            if old != _checksums(reader):
                _set_aside(path)
    except (UserError, OSError) as exc:
        if legacy:  # read-only, say: as before stores recorded their source
            return path
        why = bare(exc) if isinstance(exc, UserError) else exc.strerror
        fix = getattr(exc, "fix", None)
        raise UserError(f"cannot build the tiny model's store in {path}: {why}",
                        path=str(cache_dir()), field="D2MOE_CACHE",
                        fix=f"{fix}, or point D2MOE_CACHE elsewhere" if fix else
                        "point D2MOE_CACHE at a writable directory") from None
    return path


def _checksums(reader: Any) -> dict[Any, int]:
    """Every stored level's CRC-32, by (layer, expert, tensor, bits)."""
    return {key: e.crc32 for key, e in reader.entries.items()}


def _set_aside(store: Path) -> None:
    """Move what a store holds besides its own files (made from the store it replaced:
    a router, expert statistics) to `cache_dir()/stale/`, saying so."""
    import time

    from d2moe.quant.store_files import is_store_file

    others = [p for p in store.iterdir() if not is_store_file(p.name)]
    if not others:
        return
    aside = cache_dir() / "stale" / f"{store.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for p in others:
        p.rename(aside / p.name)
    print(f"note: {store}: rebuilt from the shipped tiny checkpoint; moved "
          f"{', '.join(p.name for p in others)}, made from the store before, to {aside}",
          file=sys.stderr)


def resolve_store(model: str, store: str, layout: QuantLayout | None = None) -> Path:
    """`store` when given; for the tiny model its cached store in `layout` (default: the
    default layout), built once."""
    from d2moe.model.load import check_model_ref

    check_model_ref(model)  # 'nope' is no such model, before no store for it
    if store:
        return Path(store)
    if model == "tiny":
        return tiny_store(layout or QuantLayout())
    raise UserError("no store given for this model", field="store",
                    fix=f"quantize it first: d2moe quantize --model {model} --out STORE, then "
                        "pass --store STORE")


def open_model(model: str, store_path: Path, *, direct_io: bool,
               dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(model without its experts, in `dtype` (a name of cliargs.DTYPES), its spec, the
    store's reader), checked to match."""
    import torch

    from d2moe.core.cliargs import check_dtype
    from d2moe.model.load import load_model
    from d2moe.quant.store import StoreReader

    torch_dtype = getattr(torch, check_dtype(dtype))
    reader = StoreReader(store_path, direct=direct_io)
    net, spec = load_model(model, with_experts=False, dtype=torch_dtype)
    check_match(spec, reader, store_path, model)
    return net, spec, reader


def check_match(spec: Any, store: Any, path: str | Path, model: str) -> None:
    """The store must hold this model's experts: layers, experts and shapes, and, where the
    store recorded its source checkpoint, the same expert weights (`quant.source`)."""
    from d2moe.quant.source import check_source

    for name in ("layers", "experts", "hidden", "ffn"):
        mine, theirs = getattr(spec, name), getattr(store.spec, name)
        if mine != theirs:
            raise UserError(f"store has {name}={theirs}, the model has {mine}",
                            path=str(path), field=f"spec.{name}",
                            fix=f"quantize this model: d2moe quantize --model {model} "
                                "--out STORE")
    from d2moe.model.load import checkpoint_dir

    check_source(checkpoint_dir(model), store.source, path, model)


def expert_budget(spec: Any, layout: QuantLayout, budget: str, bits: int,
                  widest: int | None = None) -> int:
    """`budget` (bytes, % or fraction of every expert at `bits`) in bytes; it must hold one
    expert at `widest` bits (the most a run can use; default `bits`)."""
    from d2moe.core.sizes import all_experts_bytes, fmt_bytes, parse_budget

    layout.check_bits(bits)
    nbytes = parse_budget(budget, all_experts_bytes(spec, bits, layout))
    widest = widest or bits
    layout.check_bits(widest)
    one = all_experts_bytes(spec, widest, layout) // (spec.layers * spec.experts)
    if nbytes < one:
        raise UserError(f"budget {budget} = {fmt_bytes(nbytes)} is smaller than one expert at "
                        f"{widest} bits ({fmt_bytes(one)})", field="budget",
                        fix=f"give at least {one} bytes, e.g. a larger percentage (a bare "
                            "number above 1 counts bytes)")
    return nbytes


def store_layout(pcfg: Any, run: QuantLayout) -> QuantLayout:
    """The nested store a policy runs on: its own nested kind, or bitplane for the layouts
    of separate copies (emulated on a bitplane store: see `check_store_layout`)."""
    layout = pcfg.quant_layout(run)
    return layout if layout.nested else replace(run, kind="bitplane")


def check_store_layout(pcfg: Any, name: str, layout: QuantLayout, path: Path) -> bool:
    """Whether the policy's layout is separate copies, checking the store can serve it.

    Copies are emulated on a bitplane store: its b-bit prefix is a b-bit asymmetric code
    with the bytes of a b-bit RTN copy; without nesting, raising an expert reloads it whole.
    """
    want = pcfg.quant_layout(layout)
    if want.nested:
        if want.kind != layout.kind:
            raise UserError(f"policy {name} runs on a {want.kind} store, this one is "
                            f"{layout.kind}", path=str(path), field="layout",
                            fix=f"quantize with --layout {want.kind}, or pick another policy")
        return False
    if layout.kind != "bitplane":
        raise UserError(f"policy {name} keeps separate copies per bit-width, which the executor "
                        f"emulates on a bitplane store; this one is {layout.kind}",
                        path=str(path), field="layout", fix="quantize with --layout bitplane")
    return True


def expert_stats(pcfg: Any, option: str, model: str, store_path: Path) -> Any:
    """The expert statistics a policy needs (None when it needs none)."""
    if not pcfg.needs_stats:
        return None
    from d2moe.experts.store import find_or_build_stats

    return find_or_build_stats(option, model=model, store=store_path)
