"""`d2moe quantize`: an HF safetensors MoE checkpoint -> a nested store (tensor by tensor,
`--jobs` experts at once)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from d2moe.core.cliargs import add_fields, from_args
from d2moe.core.errors import UserError, bare
from d2moe.core.sizes import (
    DEFAULT_STORE_BITS,
    QuantLayout,
    fmt_bytes,
    layout_from_options,
    parse_bits_range,
)
from d2moe.model.hf_names import expert_key
from d2moe.quant.mwq import PLANE_FITS
from d2moe.quant.nested import NESTED_KINDS, NestedMatrix, quantize_matrix
from d2moe.quant.source import source_record
from d2moe.quant.store import TENSORS, StoreWriter

DEFAULT_FORMAT = QuantLayout.kind  # measured on the tiny model: docs/results/mwq.md (verdict)
# --jobs 0: a thread per core, at most this many: each holds one float32 matrix and its
# block's temporaries while it works, and its expert's planes until written (Mixtral: ~0.6 GB)
MAX_AUTO_JOBS = 8
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `d2moe quantize` (the CLI is built from these fields; `--model` and `--out`
    have no default: required). The layout's defaults are QuantLayout's, the fit MWQ's."""

    model: str = field(metadata={
        "help": "`tiny` (the built-in model) or an HF checkpoint directory "
                "(config.json + *.safetensors)"})
    out: str = field(metadata={"help": "store directory to write", "example": "out/store"})
    store_bits: str = field(default=DEFAULT_STORE_BITS, metadata={
        "help": f"B1:BK, smallest and largest bit-width stored (default: "
                f"{DEFAULT_STORE_BITS}; --bits is its older spelling)",
        "aliases": ("--bits",), "metavar": "B1:BK"})
    group: int = field(default=QuantLayout.group, metadata={
        "help": "weights per scale group along the input dimension"})
    format: str = field(default=DEFAULT_FORMAT, metadata={
        "help": f"nested format (default: {DEFAULT_FORMAT}; mwq is the paper's)",
        "choices": NESTED_KINDS})
    fit: str = field(default=PLANE_FITS[0], metadata={
        "help": f"MWQ plane-scale fit (default: {PLANE_FITS[0]}, the paper's closed form; "
                "see docs/results/mwq.md)",
        "choices": PLANE_FITS})
    progress: bool = field(default=True, metadata={
        "help": "progress bar on a terminal, as every other verb"})
    jobs: int = field(default=0, metadata={
        "help": "experts quantized at once, in threads (0: one per core, at most "
                f"{MAX_AUTO_JOBS}); the store is the same whatever the count"})


def find_expert_tensors(model_dir: Path) -> dict[tuple[int, int, str], tuple[Path, str]]:
    """{(hf_layer, expert, tensor): (file, hf_name)} over the directory's *.safetensors;
    a damaged file is a UserError naming it."""
    from safetensors import safe_open

    from d2moe.model.hf import reading_checkpoint

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError("no *.safetensors files", path=str(model_dir),
                        fix="point --model at an HF checkpoint directory")
    found: dict[tuple[int, int, str], tuple[Path, str]] = {}
    for path in files:
        with reading_checkpoint(path), safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                key = expert_key(name)
                if key is not None:
                    found[key] = (path, name)
    if not found:
        raise UserError("no expert weights found (looked for Mixtral "
                        "block_sparse_moe.experts.E.w1/w2/w3 and OLMoE "
                        "mlp.experts.E.gate_proj/up_proj/down_proj names)",
                        path=str(model_dir), fix="is this an MoE checkpoint?")
    return found


def load_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor of a checkpoint file as float32 (a damaged file: a UserError naming it)."""
    from safetensors import safe_open

    from d2moe.model.hf import reading_checkpoint

    with reading_checkpoint(path), safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def quantize_checkpoint(model_dir: str | Path, out: str | Path, layout: QuantLayout,
                        progress: bool = True, fit: str = "mean", jobs: int = 1) -> Path:
    """Quantize every expert of an HF checkpoint (or `tiny`) into a nested store at `out`.

    `fit` is MWQ's plane-scale fit (d2moe.quant.mwq.PLANE_FITS); bitplane ignores it.
    `jobs` experts of a layer are read and quantized at once, in threads (numpy releases the
    GIL in its array loops), and written in order: the same store whatever `jobs` (0: one per
    core, at most `MAX_AUTO_JOBS`).
    """
    from d2moe.core.spec import load_spec, read_hf_config
    from d2moe.model.hf_names import check_model_type

    if fit not in PLANE_FITS:
        raise UserError(f"unknown plane-scale fit {fit!r}", field="fit",
                        fix=f"use one of {', '.join(PLANE_FITS)}")
    jobs = check_jobs(jobs)
    from d2moe.model.load import check_model_ref

    tiny = str(model_dir) == "tiny"
    model_dir = check_model_ref(model_dir)
    if tiny and not (model_dir / "config.json").is_file():
        raise UserError("the built-in tiny checkpoint is missing", path=str(model_dir),
                        fix="train it: d2moe model train-tiny")
    spec = load_spec(model_dir)  # config.json is there: load_spec read it
    check_model_type(read_hf_config(model_dir / "config.json"),
                     path=str(model_dir / "config.json"))
    found = find_expert_tensors(model_dir)
    hf_layers = sorted({k[0] for k in found})
    if len(hf_layers) != spec.layers:
        raise UserError(f"config.json says {spec.layers} MoE layers, the checkpoint has expert "
                        f"weights in {len(hf_layers)}", path=str(model_dir),
                        fix="check the checkpoint is complete")

    def quantized(key: tuple[int, int]) -> dict[str, NestedMatrix]:
        hf_layer, e = key
        mats = {}
        for t in TENSORS:
            if (hf_layer, e, t) not in found:
                raise UserError(f"missing expert weight (layer {hf_layer}, expert {e}, {t})",
                                path=str(model_dir), fix="check the checkpoint")
            file, name = found[(hf_layer, e, t)]
            try:
                mats[t] = quantize_matrix(load_tensor(file, name), layout, fit=fit)
            except UserError as exc:  # the matrix's own checks: name its tensor and file
                if exc.path:
                    raise
                raise UserError(bare(exc), path=str(file), field=name, fix=exc.fix) from None
        return mats

    def experts_of(hf_layer: int) -> Iterator[tuple[int, dict[str, NestedMatrix]]]:
        keys = [(hf_layer, e) for e in range(spec.experts)]
        for (_, e), mats in _in_order(quantized, keys, jobs):
            yield e, mats
            bar.update(1)

    kept = _kept_unchecked(Path(out))
    # an error or Ctrl-C before close() removes the unfinished store; an old one stays
    with StoreWriter(out, spec, layout, source=source_record(model_dir)) as writer:
        bar = _progress(spec.layers * spec.experts, progress)
        for layer, hf_layer in enumerate(hf_layers):
            writer.write_layer(layer, experts_of(hf_layer))
        bar.close()
        index = writer.close()
    if kept:
        print(f"note: {out}: kept {', '.join(kept)} from the store before, which recorded no "
              "source: whether they were made from these weights cannot be checked",
              file=sys.stderr)
    return index


def check_jobs(jobs: int) -> int:
    """`--jobs`: 0 is one per core (at most MAX_AUTO_JOBS); below 0 is a UserError."""
    if jobs < 0:
        raise UserError(f"must be >= 0, got {jobs}", field="jobs",
                        fix="pass 0 (one per core) or a count of experts at once")
    return jobs or max(1, min(os.cpu_count() or 1, MAX_AUTO_JOBS))


def _in_order(work: Callable[[T], R], items: Sequence[T], jobs: int) -> Iterator[tuple[T, R]]:
    """(item, work(item)) in the order of `items`, `jobs` of them computed at once in
    threads, at most jobs + 1 results held at a time; an error is raised where its item's
    turn comes, the items not started then are cancelled."""
    if jobs == 1:
        yield from ((item, work(item)) for item in items)
        return
    with ThreadPoolExecutor(jobs, thread_name_prefix="d2moe-quantize") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                if len(pending) > jobs:  # jobs at work while the consumer takes one
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:  # an error or a close: start nothing more
                future.cancel()


def _kept_unchecked(out: Path) -> list[str]:
    """What a store at `out` written before stores recorded their source holds besides its
    own files (StoreWriter carries it into the new store without a check)."""
    from d2moe.quant.store_files import beside_store

    old = beside_store(out)
    return old[1] if old is not None and old[0] is None else []


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):  # -> tqdm or _NoBar
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="expert", desc="quantize")


def _run(args: argparse.Namespace) -> int:
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise UserError(f"{exc.name} is not installed", field="quantize",
                        fix="pip install 'd2moe[executor]'") from None
    cfg = from_args(QuantizeConfig, args)
    b1, bK = parse_bits_range(cfg.store_bits)
    layout = layout_from_options(cfg.format, b1, bK, cfg.group, kind_option="format")
    index = quantize_checkpoint(cfg.model, cfg.out, layout, progress=cfg.progress, fit=cfg.fit,
                                jobs=cfg.jobs)
    from d2moe.quant.store import StoreReader

    with StoreReader(index.parent) as reader:
        total = sum(e.nbytes for e in reader.entries.values())
    fit = f", plane fit {cfg.fit}" if layout.kind == "mwq" else ""
    print(f"wrote {index.parent} ({layout.kind}{fit}, bits {b1}..{bK}, group {cfg.group}): "
          f"{fmt_bytes(total)} of planes")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `quantize` verb."""
    p = subparsers.add_parser(
        "quantize", help="quantize an MoE checkpoint into a nested store",
        description="Quantize every routed expert of an HF safetensors MoE checkpoint (or the "
                    "built-in tiny model) into a nested store of bit-widths b1..bK, reading "
                    "it tensor by tensor (--jobs experts at once), for `d2moe run`, `serve`, "
                    "`validate` and `eval ppl`.")
    add_fields(p, QuantizeConfig)
    p.add_argument("--quiet", dest="progress", action="store_false",
                   help=argparse.SUPPRESS)  # the earlier spelling of --no-progress
    p.set_defaults(func=_run)
