"""Run a sweep: skip finished cells, run the rest in parallel, append each row as it lands.

Workers only compute; the parent alone writes the table, one complete fsynced line per
finished cell, so a killed sweep loses at most the cells still running.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from d2moe.core.errors import UserError, bare
from d2moe.core.fileio import check_outside_store
from d2moe.core.progress import progress_bar
from d2moe.sweep.cells import (
    Cell,
    ensure_trace,
    expand,
    oracle_available,
    oracle_hit_rate,
    run_cell,
)
from d2moe.sweep.grid import load_grid
from d2moe.sweep.table import (
    CSV_NAME,
    TABLE_NAME,
    TableWriter,
    exclusive,
    finished_ids,
    latest,
    read_rows,
    write_csv,
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SweepConfig:
    """Options of `d2moe sweep` (the CLI is built from these fields)."""

    out: str = field(default="out/sweep", metadata={
        "help": "output directory: table.jsonl (appended, resumable), table.csv, traces/"})
    jobs: int = field(default=0, metadata={
        "help": "worker processes (0: one per CPU; 1: run in this process)"})
    ray: str = field(default="", metadata={
        "help": "run the cells as Ray tasks on this cluster address ('auto', 'local', "
                "ray://HOST:PORT) instead of local processes (pip install 'd2moe[ray]'); empty: "
                "local processes (--jobs)",
        "metavar": "ADDRESS"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on a terminal"})


@dataclass(frozen=True)
class SweepResult:
    """What one `run_sweep` did."""

    cells: int  # in the grid
    skipped: int  # already finished in the table
    ran: dict[str, int]  # status -> cells run now
    table: Path
    csv: Path
    oracle: bool  # whether oracle hit rates were computed
    first_error: str = ""  # the message of the first `error` row written now ("" if none)

    @property
    def all_failed(self) -> bool:
        """Whether cells ran now and every one of them is an `error` row."""
        ran = sum(self.ran.values())
        return ran > 0 and self.ran.get("error", 0) == ran

    def error_note(self) -> str:
        """One line on the cells that failed now, with the first one's message ("" if
        none failed): a sweep whose rows all say `error` must not pass for a success."""
        errors = self.ran.get("error", 0)
        if not errors:
            return ""
        return (f"{errors} of {sum(self.ran.values())} cells that ran failed (status error "
                f"in the table); the first: {self.first_error}")

    def summary(self) -> str:
        """One line for the terminal."""
        ran = sum(self.ran.values())
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.ran.items())) or "none"
        note = "" if self.oracle else "; oracle: d2moe.analysis.oracle not available"
        return (f"{self.cells} cells: {ran} ran ({parts}), {self.skipped} already in the "
                f"table{note}\nwrote {self.table}, {self.csv}")


def run_sweep(grid_path: str | Path, cfg: SweepConfig) -> SweepResult:
    """Run every cell of the grid not yet finished in `cfg.out`'s table."""
    grid = load_grid(grid_path)
    if cfg.jobs < 0:
        raise UserError(f"must be >= 0, got {cfg.jobs}", field="jobs", fix="e.g. --jobs 4")
    out = Path(cfg.out)
    check_outside_store(out / TABLE_NAME, field="out")  # its lock and table.jsonl too
    read_rows(out / TABLE_NAME)  # someone else's table.jsonl: refused before the lock file
    with exclusive(out), TableWriter(out / TABLE_NAME) as table:
        start = len(table.rows)
        cells = expand(grid, out)
        done = finished_ids(table.rows)
        todo = [c for c in cells if c.cell_id not in done]
        for cell in {c.trace.text: c for c in todo}.values():
            _drop_damaged_cache(cell)
            ensure_trace(cell)  # once, here, before the workers read it
        oracle = oracle_available()
        with Workers(cfg, len(todo)) as workers:
            ran = _run_cells(todo, workers, table, cfg.progress,
                             grid.profiles[0] if oracle else None)
        csv_path = write_csv(out / CSV_NAME, _ordered(table.rows, cells))
        first_error = next((r["message"] for r in table.rows[start:]
                            if r.get("status") == "error"), "")
    return SweepResult(len(cells), len(cells) - len(todo), ran, out / TABLE_NAME, csv_path,
                       oracle, first_error)


def _drop_damaged_cache(cell: Cell) -> None:
    """Delete a synthetic cell's cached trace file if it does not load (a damaged cache),
    with a one-line note, so that `ensure_trace` writes it again: the generator is
    deterministic, so the new file is the one the cache should have held."""
    path = Path(cell.trace_file)
    if not cell.trace.is_synth or not path.is_file():
        return
    from d2moe.traces import load_trace

    try:
        load_trace(path)
    except UserError as exc:
        print(f"note: {path}: the cached synthetic trace does not load ({bare(exc)}); "
              "writing it again", file=sys.stderr)
        path.unlink()


def _run_cells(todo: list[Cell], workers: Workers, table: TableWriter, progress: bool,
               oracle_profile: str | None) -> dict[str, int]:
    """Run the cells (and, if `oracle_profile`, Belady's hit rate once per (trace, budget),
    queued first); append each row as it lands with its oracle rate; count rows by status.

    A row whose oracle rate is still running waits for it in memory (a few at most)."""
    groups = {c.group_key: c for c in todo} if oracle_profile else {}
    tasks: list[tuple[str, Any]] = [("oracle", (c, oracle_profile)) for c in groups.values()]
    tasks += [("cell", c) for c in todo]
    rates: dict[tuple[str, str], float | None] = {}
    waiting: dict[tuple[str, str], list[dict[str, Any]]] = {}
    ran: dict[str, int] = {}
    bar = progress_bar(len(todo), progress, "sweep", "cell")

    def write(row: dict[str, Any], rate: float | None) -> None:
        row["oracle_hit_rate"] = rate
        row["finished_at"] = _now()
        table.append(row)
        ran[row["status"]] = ran.get(row["status"], 0) + 1
        if bar:
            bar.update(1)

    results = workers.map(_task, tasks)
    try:
        for kind, result in results:
            if kind == "oracle":
                key, rates[key] = result
                for row in waiting.pop(key, []):
                    write(row, rates[key])
                continue
            key = (result["trace"], result["budget"])
            if key in groups and key not in rates:
                waiting.setdefault(key, []).append(result)
            else:
                write(result, rates.get(key))
    finally:
        if hasattr(results, "close"):
            results.close()  # cancels what has not started if the loop was left early
        if bar:
            bar.close()
    return ran


def _task(task: tuple[str, Any]) -> tuple[str, Any]:
    """One unit of work in a worker: a cell's row or a (trace, budget)'s oracle rate."""
    kind, arg = task
    if kind == "oracle":
        cell, profile = arg
        return kind, (cell.group_key, oracle_hit_rate(cell, profile))
    return kind, run_cell(arg)


def _ordered(rows: list[dict[str, Any]], cells: list[Cell]) -> list[dict[str, Any]]:
    """The latest row per cell: the grid's cells in grid order, then any others."""
    by_id = latest(rows)
    ids = [c.cell_id for c in cells if c.cell_id in by_id]
    seen = set(ids)
    ids += [cid for cid in by_id if cid not in seen]
    return [by_id[cid] for cid in ids]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Workers:
    """Where cells run: this process (jobs=1), local worker processes, or Ray tasks.

    `map` yields results as they finish (not in order); one pool serves every map call.
    """

    def __init__(self, cfg: SweepConfig, n: int) -> None:
        self.jobs = max(1, min(cfg.jobs or os.cpu_count() or 1, n))
        self.ray_address = cfg.ray
        self._pool: Any = None
        self._ray: Any = _import_ray() if cfg.ray else None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        """fn over items, results in the order they finish."""
        if not items:
            return iter(())
        if self._ray is not None:
            return self._ray_map(fn, items)
        if self.jobs == 1:
            return (fn(item) for item in items)
        return self._process_map(fn, items)

    def _process_map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        from concurrent.futures import FIRST_COMPLETED, wait

        pool = self._local_pool()
        pending = {pool.submit(fn, item) for item in items}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def _local_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            method = "forkserver" if "forkserver" in methods else "spawn"
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["d2moe.sweep.runner"])  # forked with it imported
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx,
                                             initializer=_exit_with_parent)
        return self._pool

    def _ray_map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(address=self.ray_address)
        remote = ray.remote(fn)
        pending = [remote.remote(item) for item in items]
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    yield ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)


def _exit_with_parent() -> None:
    """In a worker: exit as soon as the sweep's process is gone (a SIGKILL leaves no one to
    shut the pool down, and idle workers would wait for work forever)."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the sentinel pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="d2moe-sweep-parent", daemon=True).start()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("Ray is not installed", field="ray",
                        fix="pip install 'd2moe[ray]', or run without --ray") from None
    return ray
