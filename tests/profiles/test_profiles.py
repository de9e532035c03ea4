"""Hardware profiles: hand-computed costs, tables, validation, round trips, shipped files."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout, expert_bytes
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.profiles.files import (
    load_profile,
    profile_from_dict,
    save_profile,
    shipped_profile_of,
    shipped_profiles,
)
from d2moe.profiles.schema import Profile

# 1 layer of 2 experts; hidden 64, ffn 128: expert params 3 * 64 * 128 = 24576
SPEC = ModelSpec(name="s", layers=1, experts=2, top_k=1, hidden=64, ffn=128, heads=1,
                 kv_heads=1, vocab=8)


def hand() -> dict[str, Any]:
    return {
        "name": "hand",
        "source": {"kind": "measured", "device": "pencil", "date": "2025-01-01",
                   "command": "by hand"},
        "disk": {"read_GBps": 1.0, "latency_us": 100.0},
        "link": {"read_GBps": 0.5, "latency_us": 10.0},
        "unified_memory": False,
        "device_memory_bytes": 1_000_000,
        "host_memory_bytes": 2_000_000,
        "io_lanes": 2,
        "shared_bandwidth": False,
        "expert": {"roofline": {"mem_GBps": 1.0, "peak_TFLOPs": 1.0,
                                "dequant_ns_per_Mweight_bit": 100.0, "launch_us": 5.0}},
        "non_expert": {"roofline": {"mem_GBps": 2.0, "peak_TFLOPs": 0.001,
                                    "layer_overhead_us": 7.0}},
    }


def unified() -> dict[str, Any]:
    d = hand()
    d.update(link=None, unified_memory=True)
    del d["host_memory_bytes"]
    return d


def table() -> dict[str, Any]:
    d = hand()
    d["expert"] = {"table": [
        {"shape": "128x64", "bits": 2, "tokens": 1, "latency_us": 10.0},
        {"shape": "128x64", "bits": 2, "tokens": 9, "latency_us": 50.0},
        {"shape": "s", "bits": 4, "tokens": 1, "latency_us": 20.0},
        {"shape": "s", "bits": 4, "tokens": 9, "latency_us": 60.0},
        {"shape": "other", "bits": 4, "tokens": 9, "latency_us": 1e9},
    ]}
    d["non_expert"] = {"table": [{"model": "s", "tokens": 1, "latency_us": 5.0},
                                 {"model": "s", "tokens": 11, "latency_us": 25.0}]}
    return d


def make(d: dict[str, Any]) -> Profile:
    return profile_from_dict(d, path="hand.yaml")


def test_load_us_by_hand() -> None:
    p = make(hand())
    # disk -> host -> PCIe: both latencies, slowest bandwidth 0.5 GB/s = 500 B/us
    assert p.load_us(1_000_000) == pytest.approx(100 + 10 + 1_000_000 / 500)
    assert p.load_us(1_000_000, "host") == pytest.approx(10 + 1_000_000 / 500)
    assert p.load_us(0) == 0.0
    q = make(unified())  # no link hop: disk latency + bytes at 1 GB/s
    assert q.load_us(1_000_000) == pytest.approx(100 + 1_000)
    assert q.tiers == ("disk",)
    with pytest.raises(UserError, match="field 'tier'"):
        q.load_us(10, "host")


def test_run_us_roofline_by_hand() -> None:
    p = make(hand())
    # 4 bits, MWQ (b1=2, groups of 64, fp16 scales): each 8192-weight matrix holds
    # base 2048 B codes + 128 groups * 2 * 2 B = 2560 B, plus 2 planes of 1024 + 128 * 2 = 1280 B
    mwq = QuantLayout(kind="mwq")
    assert expert_bytes(SPEC, 4, mwq) == 3 * (2560 + 2 * 1280) == 15360
    dequant = 100 * 24576 / 1e6 * 4 / 1e3  # ns per Mweight-bit -> us
    # 1 token: memory-bound, 15360 B at 1e3 B/us
    assert p.run_us(SPEC, 4, 1, mwq) == pytest.approx(5 + 15.36 + dequant)
    # bitplane (the default layout): planes of 1024 B, so 3 * (2560 + 2048) = 13824 B
    assert p.run_us(SPEC, 4, 1) == pytest.approx(5 + 13.824 + dequant)
    # 1000 tokens: compute-bound, 2 * 1000 * 24576 flops at 1e6 flop/us
    assert p.run_us(SPEC, 4, 1000, mwq) == pytest.approx(5 + 49.152 + dequant)
    # 16 bits: dense fp16 weights, no dequantization
    assert p.run_us(SPEC, 16, 1) == pytest.approx(5 + 24576 * 2 / 1e3)
    assert p.run_us(SPEC, 4, 0) == 0.0
    with pytest.raises(UserError, match="bits"):
        p.run_us(SPEC, 17, 1)


def test_non_expert_roofline_by_hand() -> None:
    p = make(hand())
    params = 64 * 64 * (2 + 2) + 2 * 64 + 64 * 2  # attention + 2 norms + router
    assert SPEC.layer_params == params == 16640
    # bytes 2 * 16640 at 2e3 B/us = 16.64 us; flops 2 * 16640 at 1e3 flop/us = 33.28 us
    assert p.non_expert_us(SPEC, 1) == pytest.approx(7 + 33.28)


def test_table_interpolation_and_extrapolation_flag() -> None:
    p = make(table())
    assert p.run_us(SPEC, 2, 5) == pytest.approx(30.0)  # middle of 10..50
    assert p.run_us(SPEC, 3, 5) == pytest.approx(35.0)  # between 30 (2 bits) and 40 (4 bits)
    assert p.run_us(SPEC, 4, 1) == pytest.approx(20.0)
    assert p.extrapolations == ()
    assert p.run_us(SPEC, 4, 17) == pytest.approx(100.0)  # 20 + 5 us/token * 16
    assert p.run_us(SPEC, 4, 17) == pytest.approx(100.0)  # cached: recorded once
    assert p.run_us(SPEC, 8, 1) == pytest.approx(40.0)  # 10 + 5 us/bit * 6
    assert p.extrapolations == (("expert", "s", 4, 17), ("expert", "s", 8, 1))
    assert p.non_expert_us(SPEC, 6) == pytest.approx(15.0)
    assert p.non_expert_us(SPEC, 21) == pytest.approx(45.0)
    assert p.extrapolations[-1] == ("non_expert", "s", 0, 21)
    with pytest.raises(UserError, match="field 'expert.table'"):
        p.run_us(load_spec("tiny"), 4, 1)


def test_cached_calls_repeat_the_first_answer() -> None:
    p, spec = load_profile("rtx3060-laptop"), load_spec("mixtral-8x7b")
    first = (p.run_us(spec, 4, 1), p.load_us(123456), p.non_expert_us(spec, 1))
    assert all(x > 0 for x in first)
    assert (p.run_us(spec, 4, 1), p.load_us(123456), p.non_expert_us(spec, 1)) == first


def headed() -> dict[str, Any]:
    d = table()
    d["non_expert"]["table"][0]["head_us"] = 8.0
    d["non_expert"]["table"][1]["head_us"] = 28.0
    return d


def test_step_head_column() -> None:
    p = make(headed())
    assert p.head_us(SPEC, 1) == pytest.approx(8.0)
    assert p.head_us(SPEC, 6) == pytest.approx(18.0)  # interpolated like the layer time
    assert p.non_expert_us(SPEC, 6) == pytest.approx(15.0)  # the layer time is apart
    assert make(table()).head_us(SPEC, 6) == 0.0  # an older table: spread over the layers
    assert make(hand()).head_us(SPEC, 6) == 0.0  # roofline: no head
    assert "head_us" not in make(table()).to_dict()["non_expert"]["table"][0]
    bad = headed()
    bad["non_expert"]["table"][1]["head_us"] = "x"
    with pytest.raises(UserError, match="head_us"):
        make(bad)


@pytest.mark.parametrize("build", [hand, unified, table, headed])
def test_round_trip(build: Any, tmp_path: Path) -> None:
    p = make(build())
    assert make(p.to_dict()) == p
    save_profile(tmp_path / "p.yaml", p)
    assert load_profile(tmp_path / "p.yaml") == p


@pytest.mark.parametrize("name", ["rtx3060-laptop", "jetson-agx-orin"])
def test_shipped(name: str, tmp_path: Path) -> None:
    assert name in shipped_profiles()
    p = load_profile(name)
    assert p.name == name and p.source.kind == "estimated" and len(p.source.basis) >= 5
    spec = load_spec("mixtral-8x7b")
    # decode (1 token) is memory-bound: more bits, more time; prefill costs more than decode
    assert p.run_us(spec, 2, 1) < p.run_us(spec, 4, 1) < p.run_us(spec, 8, 1)
    assert p.run_us(spec, 4, 512) > p.run_us(spec, 4, 1)
    assert p.load_us(expert_bytes(spec, 4)) > 10 * p.run_us(spec, 4, 1)  # I/O dominates
    save_profile(tmp_path / "p.yaml", p)
    assert load_profile(tmp_path / "p.yaml") == p


def test_each_measured_shipped_profile_is_found_by_its_own_device_line() -> None:
    measured = {n: load_profile(n) for n in shipped_profiles()
                if load_profile(n).source.kind == "measured"}
    assert {"cpu-2core", "cpu-2core-xeon"} <= set(measured)
    lines = [p.source.device for p in measured.values()]
    assert len(set(lines)) == len(lines)  # else `--profile auto` could not tell them apart
    for name, p in measured.items():
        assert shipped_profile_of(p.source.device) == name
        assert p.non_expert_us(load_spec("tiny"), 1) > 0  # they time the tiny model
    other = "Some CPU (family 1, model 1), 2 cores, torch 1 threads, native+lut kernel"
    assert shipped_profile_of(other) is None
    amd = measured["cpu-2core"].source.device
    assert shipped_profile_of(amd.replace("torch 1", "torch 2")) == "cpu-2core"  # same CPU
    estimated = load_profile("rtx3060-laptop").source
    assert shipped_profile_of(estimated.device) is None  # an estimate is nobody's machine


def test_planning_times_round_trip_and_price_the_difference_to_the_probes(
        tmp_path: Path) -> None:
    base = load_profile("cpu-2core-xeon")
    plans = (("fifo", 17.5), ("hebf", 20.5), ("hebf-ghost", 66.0))
    p = replace(base, executor=replace(base.executor, plan_us=plans))
    save_profile(tmp_path / "p.yaml", p)
    back = load_profile(tmp_path / "p.yaml")
    assert back == p and back.executor.plan_us == plans
    assert back.executor.plan_extra_us("hebf-ghost") == pytest.approx(45.5)
    assert back.executor.plan_extra_us("fifo") == pytest.approx(-3.0)
    assert back.executor.plan_extra_us("johnson") == 0.0  # not measured
    no_base = replace(p.executor, plan_us=(("hebf-ghost", 66.0),))
    assert no_base.plan_extra_us("hebf-ghost") == 0.0  # the probe's own is unknown


@pytest.mark.parametrize("value", [[1, 2], {"hebf": -1.0}, {"hebf": "fast"}, {3: 1.0}])
def test_bad_planning_times_name_the_field(tmp_path: Path, value: Any) -> None:
    d = load_profile("cpu-2core-xeon").to_dict()
    d["executor"]["plan_us"] = value
    with pytest.raises(UserError, match="executor.plan_us"):
        profile_from_dict(d, path="p.yaml")


def test_shipped_topologies() -> None:
    rtx, orin = load_profile("rtx3060-laptop"), load_profile("jetson-agx-orin")
    assert rtx.link is not None and not rtx.unified_memory and rtx.tiers == ("disk", "host")
    assert orin.link is None and orin.unified_memory and orin.tiers == ("disk",)
    assert orin.load_us(1_000_000) == pytest.approx(70 + 1_000_000 / 2_800)


def test_sizes_as_text(tmp_path: Path) -> None:
    d = hand()
    d["device_memory_bytes"] = "6GiB"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_profile(path).device_memory_bytes == 6 * 2**30


def _set(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *head, last = dotted.split(".")
    node = d
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


BAD = [  # (field the message must name, dotted key to change, new value)
    ("bogus", "bogus", 1),
    ("disk.speed", "disk.speed", 3),
    ("device_memory_bytes", "device_memory_bytes", KeyError),
    ("disk.read_GBps", "disk.read_GBps", "fast"),
    ("disk.read_GBps", "disk.read_GBps", 0),
    ("link.read_GBps", "link.read_GBps", -1.0),
    ("expert.roofline.mem_GBps", "expert.roofline.mem_GBps", 0.0),
    ("non_expert.roofline.peak_TFLOPs", "non_expert.roofline.peak_TFLOPs", True),
    ("disk.latency_us", "disk.latency_us", -1),
    ("link", "link", None),
    ("unified_memory", "unified_memory", "no"),
    ("io_lanes", "io_lanes", 0),
    ("source.kind", "source.kind", "guessed"),
    ("source.basis", "source", {"kind": "estimated", "basis": {}}),
    ("source.device", "source.device", KeyError),
    ("source.basis", "source.basis", "x"),
    ("expert", "expert", {}),
    ("expert.roofline.launch_us", "expert.roofline.launch_us", KeyError),
]


@pytest.mark.parametrize("field,key,value", BAD)
def test_validation_names_field(field: str, key: str, value: Any) -> None:
    with pytest.raises(UserError) as err:
        make(_set(hand(), key, value))
    assert f"field '{field}'" in str(err.value) and "hand.yaml" in str(err.value)
    assert "fix:" in str(err.value)


@pytest.mark.parametrize("field,key,value", [
    ("expert.table.0.bits", "expert.table.0.bits", 17),
    ("expert.table.1", "expert.table.1.tokens", 1),  # duplicate of row 0
    ("non_expert.table.0.tokens", "non_expert.table.0.tokens", 0),
])
def test_table_validation(field: str, key: str, value: Any) -> None:
    with pytest.raises(UserError) as err:
        make(_set(table(), key, value))
    want = field.replace(".0", "[0]").replace(".1", "[1]")
    assert f"field '{want}'" in str(err.value)


def test_unified_memory_rejects_host_tier() -> None:
    d = unified()
    d["host_memory_bytes"] = 10
    with pytest.raises(UserError, match="field 'host_memory_bytes'"):
        make(d)


def test_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a shipped profile"):
        load_profile(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_profile(bad)


def test_checked_reads_by_hand() -> None:
    """Levels (bytes, read us) at 1 GB/s checks (1000 B/us): a large level's check hides
    behind the next read when it is shorter, shows where it is longer; the last is inline."""
    from d2moe.profiles.cost import checked_reads_us

    levels = [(8000, 10.0), (2000, 10.0), (2000, 10.0)]  # checks 8, 2, 2 us
    assert checked_reads_us(levels, 1.0, None) == pytest.approx(42.0)  # all inline
    # level 0 on the helper (8 us beside the next 10 us read): hidden; 1 is small: inline
    assert checked_reads_us(levels, 1.0, 5000) == pytest.approx(34.0)
    # everything but the last on the helper: 10 | 20 | 30 + 2 -> helper ends 18, 22
    assert checked_reads_us(levels, 1.0, 0) == pytest.approx(32.0)
    # a check longer than the next read shows: 10 + helper 30 against t = 20 + 2
    assert checked_reads_us([(30000, 10.0), (2000, 10.0)], 1.0, 0) == pytest.approx(40.0)
    assert checked_reads_us(levels, math.inf, 0) == pytest.approx(30.0)  # no checks
    assert checked_reads_us([], 1.0, 0) == 0.0


def test_store_reads_join_small_levels_as_the_reader_does() -> None:
    """Requests of 50 us + 1 us/kB, checks at 1 GB/s: small neighbours are one request and
    one inline check; a large level is its own request, checked beside the next read."""
    from d2moe.profiles.cost import store_reads_us

    def request(n: int) -> float:
        return 50.0 + n / 1000

    # 30 kB + 14 kB + 14 kB below the threshold: one 58 kB read, then its 58 us check
    assert store_reads_us([30000, 14000, 14000], request, 1.0, 10**6) == pytest.approx(166.0)
    # at a 20 kB threshold the 30 kB level is read alone (its check, 30 us, hides behind
    # the 78 us read of the joined 28 kB), then the joined pair's 28 us check inline
    assert store_reads_us([30000, 14000, 14000], request, 1.0, 20000) == pytest.approx(
        80.0 + 78.0 + 28.0)
    assert store_reads_us([], request, 1.0, 10**6) == 0.0


@given(levels=st.lists(st.tuples(st.integers(0, 10**6), st.floats(0.0, 1e4)), max_size=8),
       gbps=st.floats(0.01, 100.0), min_bytes=st.one_of(st.none(), st.integers(0, 10**6)))
def test_checked_reads_lie_between_the_overlapped_and_the_serial(levels, gbps, min_bytes):
    from d2moe.profiles.cost import checked_reads_us

    checks = [n / (gbps * 1e3) for n, _ in levels]
    reads = sum(r for _, r in levels)
    us = checked_reads_us(levels, gbps, min_bytes)
    assert us <= reads + sum(checks) + 1e-6 * (1 + reads + sum(checks))
    assert us >= reads + (checks[-1] if checks else 0.0) - 1e-9
    if min_bytes is None or len(levels) < 2:
        assert us == pytest.approx(reads + sum(checks))


def test_disk_reads_table_by_hand(tmp_path: Path) -> None:
    """With measured `disk.reads` a request interpolates them (the fit stays for display);
    several requests split the bytes; a link behind streams: the slower stage wins."""
    d = unified()
    d["disk"]["reads"] = [[1000, 200.0], [3000, 400.0], [7000, 600.0]]
    p = make(d)
    assert p.disk.request_us(2000) == pytest.approx(300.0)
    assert p.load_us(5000) == pytest.approx(500.0)
    assert p.load_us(9000) == pytest.approx(700.0)  # beyond: from the last two points
    assert p.load_us(6000, requests=2) == pytest.approx(2 * 400.0)
    assert p.load_us(0) == 0.0
    assert make(unified()).load_us(5000) == pytest.approx(100.0 + 5000 / 1000)  # the fit
    assert make(p.to_dict()) == p
    save_profile(tmp_path / "r.yaml", p)
    assert load_profile(tmp_path / "r.yaml") == p
    # a discrete GPU: disk stage 500 us against the link's 5000 / 500 = 10 us stream, + 10 us
    g = hand()
    g["disk"]["reads"] = d["disk"]["reads"]
    assert make(g).load_us(5000) == pytest.approx(510.0)
    assert make(g).load_us(5000, "host") == pytest.approx(10.0 + 5000 / 500)
    slow = copy.deepcopy(g)
    slow["link"]["read_GBps"] = 0.005  # 5 B/us: the link's 1000 us stream is the slower
    assert make(slow).load_us(5000) == pytest.approx(1010.0)


@pytest.mark.parametrize("reads", [[[1000, 1.0]], [[1000, 1.0], [1000, 2.0]],
                                   [[1000, 1.0], [500, 2.0]], [[1000, -1.0], [2000, 1.0]],
                                   [[0, 1.0], [2000, 1.0]], "x", [[1000, 1.0], [2000]]])
def test_bad_disk_reads(reads: Any) -> None:
    d = unified()
    d["disk"]["reads"] = reads
    with pytest.raises(UserError, match=r"disk\.reads"):
        make(d)
    e = hand()
    e["link"]["reads"] = [[1000, 1.0], [2000, 2.0]]  # only the disk has a table
    with pytest.raises(UserError, match="reads"):
        make(e)


@pytest.mark.parametrize("text", ["-1GiB", "1e999", "lots"])
def test_unreadable_size_text_names_the_file(text: str, tmp_path: Path) -> None:
    d = hand()
    d["device_memory_bytes"] = text
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(UserError) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}: field 'device_memory_bytes': ")
    assert repr(text) in str(err.value) and err.value.fix
