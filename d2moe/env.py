"""`d2moe env`: what this installation runs on, for a bug report or before a measurement:
versions, CPU and GPUs, which CPU kernel runs, the cache directory and whether its disk
takes O_DIRECT reads (the executor's real I/O lane; without it reads come from the page
cache and a timeline's loads are not the disk's)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "numpy", "simpy", "safetensors", "tokenizers", "tqdm",
            "matplotlib", "transformers")  # transformers: the tests' oracle only


def register(subparsers: Any) -> None:
    """Add the `env` verb."""
    p = subparsers.add_parser(
        "env", help="versions, devices, CPU kernel and cache of this installation",
        description="Print what this installation runs on: d2moe's and its packages' "
                    "versions, the CPU and the GPUs, which CPU kernel runs (it is compiled "
                    "on first use), the cache directory and whether its disk takes O_DIRECT "
                    "reads.")
    p.set_defaults(func=_main)


def _main(_args: argparse.Namespace) -> int:
    print(env_report())
    return 0


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def direct_io_ok(directory: Path) -> bool:
    """Whether a file in `directory` opens with O_DIRECT (tmpfs and some others refuse it;
    the store reader then falls back to buffered reads)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".d2moe-odirect-") as f:
        try:
            fd = os.open(f.name, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return False
        os.close(fd)
        return True


def env_report() -> str:
    """The report's lines (builds the CPU kernel if it is not built yet)."""
    from d2moe.cli import version
    from d2moe.core.fileio import cache_dir

    lines = [f"d2moe {version()} ({Path(__file__).parent}), Python {platform.python_version()}"
             f" on {platform.platform()}"]
    lines.append("packages: " + ", ".join(f"{p} {_version(p)}" for p in PACKAGES))
    try:
        import torch
    except ImportError:
        lines.append("torch: not installed (the simulator runs; the executor does not)")
        torch = None
    if torch is not None:
        from d2moe.kernels import cpu_native
        from d2moe.profiles.measure import device_name

        lines.append(f"CPU: {device_name(torch.device('cpu'))}")
        lines.append(f"CPU kernel: {cpu_native.status()}")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                lines.append(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                             f"{props.multi_processor_count} SMs")
        else:
            lines.append(f"GPU: none (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', a CPU build'})")
    cache = cache_dir()
    where = cache if cache.is_dir() else next(p for p in cache.parents if p.is_dir())
    free = shutil.disk_usage(where).free / 2**30
    built = sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []
    lines.append(f"cache: {cache} ({free:.1f} GiB free; built: {', '.join(built) or 'nothing'})")
    if os.access(where, os.W_OK):
        ok = direct_io_ok(where)
        lines.append(f"O_DIRECT reads on the cache's disk: {'yes' if ok else 'no'}"
                     + ("" if ok else " (the store reader falls back to buffered reads: "
                        "loads then come from the page cache, not the disk)"))
    lines.append(f"threads: {os.cpu_count()} cores; torch's default "
                 f"{torch.get_num_threads() if torch is not None else '-'} "
                 f"(the executor's verbs run 1 unless --threads); executable {sys.executable}")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in lines)
