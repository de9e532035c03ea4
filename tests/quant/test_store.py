"""The nested store: round trip, nesting, byte accounting against core.sizes, damage detection."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout, expert_bytes, load_bytes
from d2moe.core.spec import ModelSpec
from d2moe.quant.nested import quantize_matrix
from d2moe.quant.store import (
    ALIGN_BYTES,
    TENSORS,
    ByteRange,
    StoreReader,
    StoreWriter,
    aligned_buffer,
    cut_store,
    read_groups,
)

torch = pytest.importorskip("torch")
from d2moe.quant.reference import dequantize  # noqa: E402

SPEC = ModelSpec(name="t", layers=2, experts=3, top_k=1, hidden=64, ffn=40, heads=1,
                 kv_heads=1, vocab=16)


def _experts(layout: QuantLayout, rng: np.random.Generator) -> dict:
    shapes = dict(zip(TENSORS, SPEC.expert_shapes, strict=True))
    return {(layer, e): {t: quantize_matrix(rng.standard_normal(shapes[t]).astype(np.float32),
                                            layout) for t in TENSORS}
            for layer in range(SPEC.layers) for e in range(SPEC.experts)}


def _write(path: Path, layout: QuantLayout) -> dict:
    mats = _experts(layout, np.random.default_rng())
    writer = StoreWriter(path, SPEC, layout)
    for layer in range(SPEC.layers):
        writer.write_layer(layer, ((e, mats[(layer, e)]) for e in range(SPEC.experts)))
    writer.close()
    return mats


@pytest.fixture(params=["mwq", "bitplane"])
def store(request, tmp_path):
    layout = QuantLayout(kind=request.param, b1=2, bK=6, group=32)
    mats = _write(tmp_path / "store", layout)
    return tmp_path / "store", layout, mats


def test_round_trip_is_bit_exact(store):
    path, layout, mats = store
    with StoreReader(path) as reader:
        assert reader.layout == layout and reader.spec == SPEC
        for (layer, e), orig in mats.items():
            got = reader.read_expert(layer, e, layout.bK)
            for t in TENSORS:
                assert np.array_equal(got[t].planes, orig[t].planes)
                assert np.array_equal(got[t].scale, orig[t].scale)
                assert np.array_equal(got[t].plane_scale, orig[t].plane_scale)
                for b in range(layout.b1, layout.bK + 1):
                    assert torch.equal(dequantize(got[t], b), dequantize(orig[t], b))


def test_bytes_read_equal_core_sizes(store):
    path, layout, _ = store
    with StoreReader(path) as reader:
        for b in range(layout.b1, layout.bK + 1):
            levels = reader.read_planes(1, 2, 0, b)
            assert sorted(levels) == list(range(layout.b1, b + 1))
            assert sum(a.size for lv in levels.values() for a in lv.values()) == \
                expert_bytes(SPEC, b, layout) == reader.expert_nbytes(1, 2, 0, b)
            for b2 in range(b + 1, layout.bK + 1):
                raised = reader.read_planes(1, 2, b, b2)
                assert sorted(raised) == list(range(b + 1, b2 + 1))
                assert sum(a.size for lv in raised.values() for a in lv.values()) == \
                    load_bytes(SPEC, b, b2, layout)
        ranges = reader.byte_ranges(0, 1, 0, layout.bK)
        assert len(ranges) == layout.bK - layout.b1 + 1  # one contiguous read per level
        assert all(r.offset % ALIGN_BYTES == 0 for r in ranges)
        aligned = reader.byte_ranges(0, 1, 3, 5, aligned=True)
        assert [r.bits for r in aligned] == [4, 5]
        assert all(r.nbytes % ALIGN_BYTES == 0 for r in aligned)


def test_cut_store_serves_the_same_bits(store, tmp_path):
    path, layout, _ = store
    for b in (layout.b1, 4):
        cut = cut_store(path, tmp_path / f"cut{b}", b).parent
        with StoreReader(path) as full, StoreReader(cut) as part:
            assert part.bits_stored == b
            for t in TENSORS:
                a, c = full.read_expert(1, 0, b)[t], part.read_expert(1, 0, b)[t]
                assert torch.equal(dequantize(a, b), dequantize(c, b))
            with pytest.raises(UserError, match="outside"):
                part.read_expert(1, 0, b + 1)


@pytest.mark.parametrize("pipeline", [None, 0], ids=["inline", "pipelined"])
def test_damaged_store_names_the_entry(store, pipeline):
    path, layout, _ = store
    with StoreReader(path) as reader:
        entry = reader.entries[(1, 2, "w3", layout.b1 + 1)]
    data = bytearray((path / entry.file).read_bytes())
    data[entry.offset + entry.nbytes // 2] ^= 0x40
    (path / entry.file).write_bytes(bytes(data))
    with StoreReader(path, pipeline_min_bytes=pipeline) as reader:
        reader.read_planes(1, 2, 0, layout.b1)  # the base is intact
        for bits_to in (layout.b1 + 1, layout.bK):  # the damaged level last, then earlier
            with pytest.raises(UserError, match=r"layer 1 expert 2 tensor w3 bits 3"):
                reader.read_planes(1, 2, 0, bits_to)


def test_a_cut_data_file_is_named_even_without_checksums(store):
    path, layout, _ = store
    with StoreReader(path) as reader:
        last = reader.entries[(1, 2, "w2", layout.bK)]  # the layer file's last entry
    data = (path / last.file).read_bytes()
    (path / last.file).write_bytes(data[:last.offset + last.nbytes // 2])
    with StoreReader(path, verify=False) as reader:
        reader.read_planes(1, 2, 0, layout.bK - 1)
        with pytest.raises(UserError, match=f"the data file ends inside layer 1 expert 2 "
                                            f"tensor w2 bits {layout.bK}"):
            reader.read_planes(1, 2, 0, layout.bK)


@pytest.mark.parametrize("direct", [False, True])
def test_a_data_file_that_became_a_directory_is_named(store, direct):
    """Opening a directory succeeds and reading it fails with EISDIR and no file name: the
    CLI printed "Is a directory" alone."""
    path, layout, _ = store
    with StoreReader(path) as reader:
        name = reader.entries[(1, 0, "w1", layout.b1)].file
    (path / name).unlink()
    (path / name).mkdir()
    with StoreReader(path, direct=direct) as reader, \
            pytest.raises(UserError, match="not a regular file") as err:
        reader.read_planes(1, 0, 0, layout.b1)
    assert err.value.path == str(path / name)


def test_pipelined_checks_report_the_first_damage_and_stop_on_close(store):
    """Checksums on the helper thread: same bytes as inline, the first damaged entry in file
    order is the one named, and close() stops the thread."""
    path, layout, _ = store
    with StoreReader(path, pipeline_min_bytes=0) as piped, \
            StoreReader(path, pipeline_min_bytes=None) as inline:
        a, b = piped.read_planes(0, 1, 0, layout.bK), inline.read_planes(0, 1, 0, layout.bK)
        assert piped._checker is not None and inline._checker is None
        for bits in a:
            for t in TENSORS:
                assert np.array_equal(a[bits][t], b[bits][t])
        later = [piped.entries[(0, 1, "w2", layout.bK)], piped.entries[(0, 1, "w1", 4)]]
    data = bytearray((path / later[0].file).read_bytes())
    for e in later:
        data[e.offset] ^= 0x01
    (path / later[0].file).write_bytes(bytes(data))
    reader = StoreReader(path, pipeline_min_bytes=0)
    with pytest.raises(UserError, match=r"layer 0 expert 1 tensor w1 bits 4"):
        reader.read_planes(0, 1, 0, layout.bK)
    thread = [t for t in threading.enumerate() if t.name.startswith("d2moe-crc")]
    assert thread
    reader.close()
    assert reader._checker is None and not any(t.is_alive() for t in thread)


def test_read_groups_keep_large_levels_alone_and_join_small_neighbours():
    assert read_groups([100, 100, 100], 1000) == [[0, 1, 2]]
    assert read_groups([2000, 100, 100], 1000) == [[0], [1, 2]]
    assert read_groups([100, 2000, 100, 100], 1000) == [[0], [1], [2, 3]]
    assert read_groups([1000, 1000], 1000) == [[0], [1]]  # at the threshold: large
    assert read_groups([5000, 5000], None) == [[0, 1]]  # never pipelined: one read
    assert read_groups([], 1000) == []


@pytest.mark.parametrize("direct", [False, True])
def test_coalesced_reads_give_the_same_bytes_in_fewer_requests(store, direct):
    """Every raise of the small test store is one request where the levels are small; the
    bytes equal one read per level (coalesce off) and each level the threshold makes large
    (pipeline_min_bytes=0) is read alone."""
    path, layout, _ = store
    counts = []

    def counting(reader):
        plain = reader.read_range

        def read_range(r):
            counts[-1] += 1
            return plain(r)
        reader.read_range = read_range
        return reader

    with counting(StoreReader(path, direct=direct)) as joined, \
            counting(StoreReader(path, direct=direct, coalesce=False)) as apart, \
            counting(StoreReader(path, direct=direct, pipeline_min_bytes=0)) as large:
        for b in (0, *range(layout.b1, layout.bK)):
            for b2 in range(max(b + 1, layout.b1), layout.bK + 1):
                levels = b2 - max(b, layout.b1 - 1)
                got = []
                for reader, want in ((joined, 1), (apart, levels), (large, levels)):
                    counts.append(0)
                    got.append(reader.read_planes(1, 2, b, b2))
                    assert counts[-1] == want, (b, b2, reader.coalesce)
                for bits, level in got[0].items():
                    for t in TENSORS:
                        assert np.array_equal(level[t], got[1][bits][t])
                        assert np.array_equal(level[t], got[2][bits][t])


def test_reads_split_where_levels_are_not_back_to_back(store):
    """Only the alignment padding may lie between levels joined in one read."""
    path, _, _ = store
    with StoreReader(path) as reader:
        name = reader.byte_ranges(0, 0, 0, 3)[0].file
        ranges = [ByteRange(name, 0, 100, 2), ByteRange(name, ALIGN_BYTES, 100, 3),
                  ByteRange(name, 3 * ALIGN_BYTES, 100, 4), ByteRange("other", 0, 100, 5)]
        reads = reader.reads(ranges)
    assert [[r.bits for r in levels] for _, levels in reads] == [[2, 3], [4], [5]]
    assert reads[0][0] == ByteRange(name, 0, ALIGN_BYTES + 100, 2)


def test_direct_io_flag_and_reads(store):
    path, layout, _ = store
    with StoreReader(path, direct=True) as d, StoreReader(path) as p:
        a, b = d.read_planes(0, 0, 0, layout.bK), p.read_planes(0, 0, 0, layout.bK)
        assert isinstance(d.direct_io, bool)
        for bits in a:
            for t in TENSORS:
                assert np.array_equal(a[bits][t], b[bits][t])


def test_direct_io_reads_stay_valid_after_later_reads(store):
    """Each O_DIRECT read owns its buffer: an earlier level's bytes survive the next reads."""
    path, layout, _ = store
    with StoreReader(path, direct=True) as d, StoreReader(path) as p:
        first = d.read_planes(0, 0, 0, layout.bK)
        kept = {b: {t: a.copy() for t, a in level.items()} for b, level in first.items()}
        for layer in range(SPEC.layers):
            for e in range(SPEC.experts):
                d.read_planes(layer, e, 0, layout.bK)
        expect = p.read_planes(0, 0, 0, layout.bK)
        for bits in first:
            for t in TENSORS:
                assert np.array_equal(first[bits][t], kept[bits][t])
                assert np.array_equal(first[bits][t], expect[bits][t])


@pytest.mark.parametrize("nbytes", [ALIGN_BYTES, 3 * ALIGN_BYTES, 64 * ALIGN_BYTES])
def test_aligned_buffer(nbytes: int) -> None:
    a, b = aligned_buffer(nbytes), aligned_buffer(nbytes)
    for buf in (a, b):
        assert buf.nbytes == nbytes and buf.ctypes.data % ALIGN_BYTES == 0
        assert buf.flags.writeable and buf.flags.c_contiguous
    a[:] = 1
    b[:] = 2
    assert int(a.sum()) == nbytes  # two buffers never share memory


def test_bad_store_and_requests(store, tmp_path):
    path, layout, _ = store
    with pytest.raises(UserError, match="no index"):
        StoreReader(tmp_path)
    index = json.loads((path / "index.json").read_text())
    index["version"] = 99
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="version"):
        StoreReader(bad)
    with StoreReader(path) as reader:
        with pytest.raises(UserError, match="raise"):
            reader.read_planes(0, 0, 5, 4)
        with pytest.raises(UserError, match="no entry"):
            reader.read_planes(0, 9, 0, 2)
    with pytest.raises(UserError, match="expected"):
        StoreWriter(tmp_path / "x", SPEC, layout).write_layer(
            0, [(0, {t: quantize_matrix(np.ones((3, 64)), layout) for t in TENSORS})])


# -- index integrity (sha256 + structure) and replacing a store safely --------------------

def _edit_index(path: Path, edit, *, resign: bool) -> None:
    """Apply `edit(index)` to the store's index.json, then re-sign it (a consistent but wrong
    index) or drop its digest (an index from before the digest existed)."""
    from d2moe.quant.store import index_digest

    index = json.loads((path / "index.json").read_text())
    edit(index)
    index.pop("sha256")
    if resign:
        index["sha256"] = index_digest(index)
    (path / "index.json").write_text(json.dumps(index))


def _hashes(path: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_the_index_carries_a_digest_that_catches_an_edit(store):
    from d2moe.quant.store import index_digest

    path, layout, mats = store
    index = json.loads((path / "index.json").read_text())
    assert index["sha256"] == index_digest(index) and len(index["sha256"]) == 64
    index["layout"]["group"] = 128  # once read as garbage text, exit 0
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"index\.json: field 'sha256': checksum mismatch.*"
                                        r"fix: the store is damaged: re-run d2moe quantize"):
        StoreReader(path)


def test_an_index_from_before_the_digest_is_still_read(store):
    path, layout, mats = store
    _edit_index(path, lambda index: None, resign=False)
    with StoreReader(path) as reader:
        got = reader.read_expert(1, 2, layout.bK)
    for t in TENSORS:
        assert np.array_equal(got[t].planes, mats[(1, 2)][t].planes)


def _set_entry(i: int, k: int, value):
    def edit(index):
        index["entries"][i][k] = value(index["entries"][i][k]) if callable(value) else value
    return edit


def _set(*keys, value):
    def edit(index):
        obj = index
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return edit


@pytest.mark.parametrize("resign", [True, False], ids=["resigned", "no-digest"])
@pytest.mark.parametrize(("edit", "field"), [
    (_set("layout", "group", value=128), "entries[0].nbytes"),
    (_set("layout", "group", value=16), "entries[0].nbytes"),
    (_set("layout", "b1", value=3), "entries[0].bits"),
    (_set("layout", "b1", value=9), "layout.b1"),
    (_set("layout", "kind", value="zzz"), "layout.kind"),
    (_set("layout", "scale_bytes", value=4), "layout.scale_bytes"),
    (_set("layout", "group", value=0), "layout.group"),
    (_set("bits_stored", value=9), "bits_stored"),
    (_set("tensors", "w1", value=[100, 100]), "tensors"),
    (_set_entry(0, 5, -4096), "entries[0].offset"),
    (_set_entry(0, 4, "../../../etc/passwd"), "entries[0].file"),
    (_set_entry(0, 4, "/etc/passwd"), "entries[0].file"),
    (_set_entry(0, 0, 99), "entries[0].layer"),
    (_set_entry(0, 6, lambda n: n + 1), "entries[0].nbytes"),
    (_set_entry(1, 5, lambda n: n + 1), "entries"),  # w3 no longer right after w1
    (lambda index: index["entries"].append(list(index["entries"][0])), "entries[-1]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_structurally_wrong_index_is_refused_naming_the_field(store, edit, field, resign):
    path, _, _ = store
    _edit_index(path, edit, resign=resign)
    n = len(json.loads((path / "index.json").read_text())["entries"])
    field = field.replace("[-1]", f"[{n - 1}]")
    with pytest.raises(UserError) as err:
        StoreReader(path)
    assert err.value.path == str(path / "index.json") and err.value.field == field
    assert err.value.fix == "the store is damaged: re-run d2moe quantize"


def test_an_index_of_random_bytes_is_a_user_error(store):
    path, _, _ = store
    (path / "index.json").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(UserError, match=r"index\.json: not a UTF-8 JSON file"):
        StoreReader(path)


def test_a_level_of_the_wrong_length_names_the_store_and_the_tensor(store):
    from d2moe.quant.nested import decode_levels

    path, layout, _ = store
    with StoreReader(path) as reader:
        levels = reader.read_planes(0, 1, 0, layout.b1)
    with pytest.raises(UserError, match=r"store: field 'nbytes': layer 0 expert 1 tensor w2: "
                                        r"stored level 2 has \d+ bytes, but a 64x40 matrix"):
        decode_levels(layout, 64, 40, [levels[layout.b1]["w2"][:-1]], path=str(path),
                      where="layer 0 expert 1 tensor w2")


def _one_layer(layout: QuantLayout, fail_after: int | None = None):
    """(expert, mats) pairs of layer 0; raises KeyboardInterrupt after `fail_after` experts."""
    rng = np.random.default_rng(7)
    for e in range(SPEC.experts):
        if e == fail_after:
            raise KeyboardInterrupt
        yield e, {t: quantize_matrix(rng.standard_normal(s).astype(np.float32), layout)
                  for t, s in zip(TENSORS, SPEC.expert_shapes, strict=True)}


def test_an_interrupted_rewrite_leaves_the_old_store_untouched(store):
    path, layout, mats = store
    before = _hashes(path)
    with pytest.raises(KeyboardInterrupt), StoreWriter(path, SPEC, layout) as writer:
        writer.write_layer(0, _one_layer(layout))  # a whole new layer 0 ...
        writer.write_layer(1, _one_layer(layout, fail_after=1))  # ... then Ctrl-C
    assert _hashes(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left
    with StoreReader(path) as reader:
        assert np.array_equal(reader.read_expert(0, 0, layout.bK)["w1"].planes,
                              mats[(0, 0)]["w1"].planes)
    # a writer dropped without close() (no `with`) cleans up too
    writer = StoreWriter(path, SPEC, layout)
    writer.write_layer(0, _one_layer(layout))
    tmp = writer.tmp
    assert tmp.is_dir()
    del writer
    import gc

    gc.collect()
    assert not tmp.exists() and _hashes(path) == before


def test_a_rewrite_replaces_the_store_and_keeps_other_files(store):
    path, layout, _ = store
    (path / "router").mkdir()
    (path / "router" / "router.json").write_text("{}")
    (path / "expert_stats.json").write_text("{}")
    with StoreWriter(path, SPEC, layout) as writer:
        writer.write_layer(0, _one_layer(layout))  # layer 1 no longer written
        assert writer.close() == path / "index.json"
    assert sorted(p.name for p in path.iterdir()) == ["expert_stats.json", "index.json",
                                                      "layer_000.bin", "router"]
    assert (path / "router" / "router.json").read_text() == "{}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    want = dict(_one_layer(layout))
    with StoreReader(path) as reader:
        assert {e.layer for e in reader.entries.values()} == {0}
        assert np.array_equal(reader.read_expert(0, 2, layout.bK)["w3"].planes,
                              want[2]["w3"].planes)
    with pytest.raises(UserError, match="closed"):
        writer.write_layer(1, _one_layer(layout))


def test_an_unwritable_target_is_a_user_error(tmp_path, monkeypatch):
    import errno
    import os

    layout = QuantLayout()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: exists and is not a directory"):
        StoreWriter(tmp_path / "file", SPEC, layout)
    with pytest.raises(UserError, match=r"file: cannot create the directory: part of the "
                                        r"path is a file"):
        StoreWriter(tmp_path / "file" / "store", SPEC, layout)

    def refuse(path, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", refuse)  # a read-only parent (root ignores chmod)
    with pytest.raises(UserError, match=r"store: cannot write the store beside it: "
                                        r"permission denied"):
        StoreWriter(tmp_path / "store", SPEC, layout)
    assert (tmp_path / "file").read_text() == "x"


def test_a_directory_of_the_users_is_never_swapped_for_a_store(tmp_path):
    layout = QuantLayout()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "layer_000.bin").write_bytes(b"my own file")
    with pytest.raises(UserError, match=r"mine: is a directory with files in it but no "
                                        r"nested store"):
        StoreWriter(mine, SPEC, layout)
    assert (mine / "layer_000.bin").read_bytes() == b"my own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    with StoreWriter(empty, SPEC, layout) as writer:  # an empty directory is fine
        writer.write_layer(0, _one_layer(layout))
        writer.close()
    assert (empty / "index.json").is_file()


def test_the_old_store_keeps_its_other_files_until_the_swap(store, monkeypatch):
    """Files beside the store are copied into the new one before the old one moves: a
    failure at the swap leaves the old store whole, its other files included."""
    import os

    path, layout, _ = store
    (path / "expert_stats.json").write_text("{}")
    before = _hashes(path)
    real_rename = os.rename

    def fail_second(src, dst):
        if str(src).endswith(".tmp"):  # the new store moving into place
            raise OSError(5, "Input/output error", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(UserError, match="cannot replace the store directory"), \
            StoreWriter(path, SPEC, layout) as writer:
        writer.write_layer(0, _one_layer(layout))
        writer.close()
    assert _hashes(path) == before and (path / "expert_stats.json").read_text() == "{}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_writer_removes_what_a_killed_writer_of_the_store_left_and_nothing_else(tmp_path):
    import os

    from d2moe.core.fileio import temp_prefix
    from tests.core.test_fileio import dead_pid

    layout = QuantLayout(kind="bitplane", b1=2, bK=4, group=32)
    path = tmp_path / "store_k"
    mine = temp_prefix(path)  # ".store_k.PID-HOST."
    dead = mine.replace(f".{os.getpid()}-", f".{dead_pid()}-")
    stale = tmp_path / f"{dead}0badc0de.tmp"  # a killed writer's
    live = tmp_path / f"{mine}feedbeef.tmp"  # a live writer's (this process)
    aside = tmp_path / f"{dead}0badc0de.old"  # the old store set aside, swap unfinished
    for d in (stale, live, aside):
        d.mkdir()
        (d / "layer_000.bin").write_bytes(b"\0")
    with StoreWriter(path, SPEC, layout) as writer:  # no store at path: the .old is kept
        assert not stale.exists() and live.is_dir() and aside.is_dir()
        writer.write_layer(0, _one_layer(layout))
        writer.write_layer(1, _one_layer(layout))
        writer.close()
    StoreWriter(path, SPEC, layout).abort()  # the store exists again: the .old goes now
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])


def test_no_store_is_written_inside_another(store):
    path, layout, _ = store
    with pytest.raises(UserError, match="inside the nested store"):
        StoreWriter(path / "inner", SPEC, layout)
    assert not (path / "inner").exists()
    StoreWriter(path, SPEC, layout).abort()  # the store itself may be written again
