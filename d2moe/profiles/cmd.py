"""`d2moe profile`: measure this machine and write a `source: measured` hardware profile."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from d2moe.core.cliargs import add_fields, from_args, require_modules
from d2moe.core.fileio import check_writable
from d2moe.profiles.measure import ProfileConfig


def register(subparsers: Any) -> None:
    """Add the `profile` verb (needs torch: registered as an optional command)."""
    require_modules("torch", "tqdm", verb="profile")
    p = subparsers.add_parser(
        "profile", help="measure this machine's disk, link, kernels and executor lanes",
        description="Measure what the simulator needs on this machine, through the executor's "
                    "own code: cold disk reads (O_DIRECT) and pinned host-to-device copies "
                    "against size, expert runs per (bits, tokens) for the spec's shapes, "
                    "non-expert time per layer and the executor lanes' fixed costs. Writes a "
                    "profile YAML with source: measured (device, date, command); see "
                    "docs/profiling.md.")
    add_fields(p, ProfileConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from d2moe.profiles.files import load_profile, save_profile
    from d2moe.profiles.measure import measure_profile

    cfg = from_args(ProfileConfig, args)
    check_writable(cfg.out, field="out")  # before minutes of measuring
    t0 = time.perf_counter()
    command = "d2moe profile " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "profile" else "d2moe profile"
    profile = measure_profile(cfg, command=command)
    save_profile(cfg.out, profile)
    load_profile(cfg.out)  # what was written loads back
    print(summary(profile))
    print(f"wrote {cfg.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _reads_line(reads: Any) -> str:
    """The measured requests' sizes and their GB/s, which the simulator interpolates."""
    from d2moe.core.sizes import fmt_bytes

    if not reads:
        return ""
    return "; requests as measured: " + ", ".join(
        f"{fmt_bytes(n)} {n / us / 1e3:.2g} GB/s" for n, us in reads)


def _cold_line(curve: Any) -> str:
    """What a load pays after each pause the probe made."""
    if not curve:
        return "no more than one right behind another"
    return ", ".join(f"+{us:.0f} us after {idle / 1e3:.2g} ms" for idle, us in curve)


def summary(profile: Any) -> str:
    """A few lines naming the fitted figures of a measured profile."""
    lines = [f"{profile.name}: {profile.source.device} (measured {profile.source.date})",
             f"disk: {profile.disk.read_GBps:.3g} GB/s, {profile.disk.latency_us:.1f} us per "
             f"request (fit)" + _reads_line(profile.disk.reads)]
    if profile.link is not None:
        lines.append(f"link: {profile.link.read_GBps:.3g} GB/s, {profile.link.latency_us:.1f} "
                     f"us per copy")
    ex = profile.executor
    if ex is not None:
        lines.append(f"executor lanes: layer {ex.layer_us:.0f} us (+{ex.handoff_us:.0f} with "
                     f"loads), load {ex.load_us:.0f} us + "
                     f"bytes at {ex.load_GBps:.3g} GB/s, checks at {ex.check_GBps:.3g} "
                     f"GB/s, eviction {ex.evict_us:.0f} us, run {ex.run_us:.0f} us, wake "
                     f"{ex.wake_us:.0f} us; first run +{ex.first_run_us:.0f} us after a load, "
                     f"+{ex.layer_first_run_us:.0f} us in each layer; non-expert "
                     f"+{ex.non_expert_after_load_us:.0f} us after a plan with loads; a load "
                     f"after a pause {_cold_line(ex.cold_curve_us)}; "
                     f"beside each other the I/O lane at {ex.overlap_io_speed:.2f} of its "
                     f"speed, a run +{ex.overlap_run_wait_us:.0f} us (compute speed "
                     f"{ex.overlap_compute_speed:.2f})")
        if ex.plan_us:
            fast, slow = (f(ex.plan_us, key=lambda p: p[1]) for f in (min, max))
            lines.append(f"planning: {len(ex.plan_us)} policies, {fast[1]:.0f}-{slow[1]:.0f} "
                         f"us a layer ({slow[0]} the slowest)")
    rows = getattr(profile.expert, "rows", ())
    if rows:
        lines.append(f"expert runs: {len(rows)} points, {min(r.latency_us for r in rows):.0f}-"
                     f"{max(r.latency_us for r in rows):.0f} us")
    return "\n".join(lines)
