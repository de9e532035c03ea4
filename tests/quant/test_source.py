"""A store records the checkpoint it was quantized from; a model given beside a store that
came from other expert weights is refused, and the tiny model's cached store is rebuilt."""

from __future__ import annotations

import json
import shutil

import pytest

from d2moe.core.errors import UserError
from d2moe.core.fileio import STORE_INDEX
from d2moe.quant.source import expert_sha256, source_record
from d2moe.quant.store import StoreReader, cut_store, index_digest
from tests.quant.test_cmd import _checkpoint

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.executor.setup import check_match, tiny_store  # noqa: E402
from d2moe.model.load import tiny_dir  # noqa: E402
from d2moe.quant.cmd import quantize_checkpoint  # noqa: E402

LAYOUT = QuantLayout(b1=2, bK=4, group=32)


def _resave(model, weights, edit=None, shards=1):
    """Rewrite `model`'s safetensors files from `weights`, after `edit` (name -> tensor)."""
    weights = dict(weights)
    if edit:
        weights.update(edit(weights))
    for f in model.glob("*.safetensors"):
        f.unlink()
    items = list(weights.items())
    for i in range(shards):
        part = dict(items[i::shards])
        safetensors_torch.save_file(part, str(model / f"model-{i:05d}.safetensors"))


def test_the_fingerprint_follows_expert_values_not_files_or_other_weights(tmp_path):
    model, weights = _checkpoint(tmp_path, "mixtral")
    fp = expert_sha256(model)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    _resave(copy, weights, shards=3)  # other file names, other shards, same values
    assert expert_sha256(copy) == fp
    _resave(copy, weights, lambda w: {"model.embed_tokens.weight": w[
        "model.embed_tokens.weight"] + 1})
    assert expert_sha256(copy) == fp  # not an expert: the store does not hold it
    name = "model.layers.1.block_sparse_moe.experts.0.w3.weight"
    _resave(copy, weights, lambda w: {name: w[name] * 1.01})  # a fine-tune of one expert
    assert expert_sha256(copy) != fp


def test_a_store_from_other_weights_is_refused_with_the_source_named(tmp_path):
    model, weights = _checkpoint(tmp_path, "olmoe")
    store = tmp_path / "store"
    quantize_checkpoint(model, store, LAYOUT, progress=False)
    with StoreReader(store) as reader:
        assert reader.source == source_record(model)
        spec = reader.spec
        check_match(spec, reader, store, str(model))  # its own checkpoint passes
        copy = tmp_path / "copy"
        shutil.copytree(model, copy)
        check_match(spec, reader, store, str(copy))  # so does a copy of it
        name = "model.layers.0.mlp.experts.1.down_proj.weight"
        _resave(copy, weights, lambda w: {name: -w[name]})
        with pytest.raises(UserError) as exc:
            check_match(spec, reader, store, str(copy))
    assert exc.value.field == "source" and str(store) in str(exc.value)
    assert str(model.resolve()) in str(exc.value) and "d2moe quantize" in str(exc.value)
    cut = tmp_path / "cut"
    cut_store(store, cut, 3)
    with StoreReader(cut) as reader:  # a cut store keeps its source
        assert reader.source == source_record(model)


def _rewrite_index(store, edit):
    index = json.loads((store / STORE_INDEX).read_text())
    edit(index)
    index["sha256"] = index_digest(index)
    (store / STORE_INDEX).write_text(json.dumps(index))


def test_stores_without_a_source_still_pass_and_a_malformed_one_is_named(tmp_path):
    model, _ = _checkpoint(tmp_path, "mixtral")
    store = tmp_path / "store"
    quantize_checkpoint(model, store, LAYOUT, progress=False)
    _rewrite_index(store, lambda i: i.pop("source"))  # as written before sources
    with StoreReader(store) as reader:
        assert reader.source is None
        check_match(reader.spec, reader, store, str(tmp_path / "anything"))
    _rewrite_index(store, lambda i: i.update(source={"path": "x", "expert_sha256": "12"}))
    with pytest.raises(UserError) as exc:
        StoreReader(store)
    assert exc.value.field == "source" and STORE_INDEX in str(exc.value)


def test_an_edit_of_a_tensors_first_or_last_bytes_is_seen(tmp_path):
    """A 64 KiB tensor: far more than the samples read, whose first and last KiB are two."""
    meta = {EXPERT: {"dtype": "F32", "shape": [128, 128], "data_offsets": [0, 1 << 16]}}
    data = bytearray(range(256)) * 256
    _raw_safetensors(tmp_path / "m.safetensors", meta, bytes(data))
    fp = expert_sha256(tmp_path)
    for at in (0, len(data) - 1):
        edited = bytearray(data)
        edited[at] ^= 1
        _raw_safetensors(tmp_path / "m.safetensors", meta, bytes(edited))
        assert expert_sha256(tmp_path) != fp, at
    edited = bytearray(data)
    edited[5000] ^= 1  # between the samples: not seen (the documented limit)
    _raw_safetensors(tmp_path / "m.safetensors", meta, bytes(edited))
    assert expert_sha256(tmp_path) == fp


def _raw_safetensors(path, entries, data=b"\0" * 64, length=None):
    header = json.dumps(entries).encode()
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + data)


EXPERT = "model.layers.0.block_sparse_moe.experts.0.w1.weight"


@pytest.mark.parametrize("offsets", [[-8, 0], [0, -8], [8, 0], [0, 10**30], [0.5, 8],
                                     ["0", "8"], [0, 65]])
def test_malformed_header_offsets_are_named(tmp_path, offsets):
    _raw_safetensors(tmp_path / "m.safetensors",
                     {EXPERT: {"dtype": "F32", "shape": [2, 8], "data_offsets": offsets}})
    with pytest.raises(UserError, match="malformed header entry") as exc:
        expert_sha256(tmp_path)
    assert EXPERT in str(exc.value) and "m.safetensors" in str(exc.value)


def test_a_file_that_is_not_safetensors_or_a_directory_without_experts_is_named(tmp_path):
    model, _ = _checkpoint(tmp_path, "mixtral")
    (model / "a.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="not a safetensors file") as exc:
        expert_sha256(model)
    assert "a.safetensors" in str(exc.value)
    _raw_safetensors(model / "a.safetensors", {}, length=100 << 20)  # longer than the file
    with pytest.raises(UserError, match="not a safetensors file"):
        expert_sha256(model)
    for header in (b"[" * 200000 + b"]" * 200000, b'{"a": ' + b"9" * 5000 + b"}"):
        (model / "a.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(UserError, match="not a safetensors file"):  # too deep, too long
            expert_sha256(model)
    empty = tmp_path / "empty"
    empty.mkdir()
    _raw_safetensors(empty / "m.safetensors", {"lm_head.weight": {
        "dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}})
    with pytest.raises(UserError, match="no expert weights"):
        expert_sha256(empty)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        expert_sha256(empty / "m.safetensors")


def test_the_cached_tiny_store_is_rebuilt_when_it_came_from_other_weights(tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    path = tiny_store(LAYOUT)
    (path / "router").mkdir()  # kept beside the store, trained on it
    index_time = (path / STORE_INDEX).stat().st_mtime_ns
    assert tiny_store(LAYOUT) == path and (path / STORE_INDEX).stat().st_mtime_ns == index_time
    _rewrite_index(path, lambda i: i.pop("source"))  # a cache from before sources
    assert tiny_store(LAYOUT) == path and (path / "router").is_dir()  # same bytes: kept
    with StoreReader(path) as reader:
        assert reader.source == source_record(tiny_dir())
        check_match(reader.spec, reader, path, "tiny")

    def other_weights(index):  # as a store of a tiny model trained since would differ
        index["source"]["expert_sha256"] = "0" * 64
        index["entries"][0][7] ^= 1
    _rewrite_index(path, other_weights)
    assert tiny_store(LAYOUT) == path and not (path / "router").exists()  # built again
    with StoreReader(path) as reader:
        check_match(reader.spec, reader, path, "tiny")
    aside = list((tmp_path / "stale").glob(f"{path.name}-*/router"))  # moved, not deleted
    assert len(aside) == 1 and "moved router" in capsys.readouterr().err


def test_a_cache_that_cannot_be_written(tmp_path, monkeypatch):
    """A store from before sources is used as it is; one of other weights is an error
    naming D2MOE_CACHE (quantize_checkpoint failing stands in for a read-only directory:
    the tests run as root, whom permissions do not stop)."""
    import d2moe.quant.cmd

    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    path = tiny_store(LAYOUT)

    def read_only(*args, **kwargs):
        raise UserError("cannot write the store beside it: Read-only file system",
                        path=str(path), fix="pick a writable path")
    monkeypatch.setattr(d2moe.quant.cmd, "quantize_checkpoint", read_only)
    _rewrite_index(path, lambda i: i.pop("source"))
    assert tiny_store(LAYOUT) == path
    _rewrite_index(path, lambda i: i.update(source={"path": "x", "expert_sha256": "0" * 64}))
    with pytest.raises(UserError, match="Read-only") as exc:
        tiny_store(LAYOUT)
    assert exc.value.field == "D2MOE_CACHE" and str(tmp_path) in str(exc.value)


def test_quantize_over_a_store_of_other_weights_keeps_its_router_out(tmp_path):
    model, weights = _checkpoint(tmp_path, "mixtral")
    store = tmp_path / "store"
    quantize_checkpoint(model, store, LAYOUT, progress=False)
    (store / "router").mkdir()
    (store / "expert_stats.json").write_text("{}")
    before = sorted(p.name for p in store.iterdir())
    quantize_checkpoint(model, store, LAYOUT, progress=False)  # the same weights: carried
    assert sorted(p.name for p in store.iterdir()) == before
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    _resave(model, weights, lambda w: {name: -w[name]})
    index = (store / STORE_INDEX).read_bytes()
    with pytest.raises(UserError, match="router") as exc:
        quantize_checkpoint(model, store, LAYOUT, progress=False)
    assert "expert_stats.json" in str(exc.value) and str(store) in str(exc.value)
    assert (store / STORE_INDEX).read_bytes() == index  # nothing written


def test_quantize_over_a_store_without_a_source_says_what_it_kept_unchecked(tmp_path,
                                                                             capsys):
    model, _ = _checkpoint(tmp_path, "mixtral")
    store = tmp_path / "store"
    quantize_checkpoint(model, store, LAYOUT, progress=False)
    _rewrite_index(store, lambda i: i.pop("source"))  # written before sources
    (store / "router").mkdir()
    quantize_checkpoint(model, store, LAYOUT, progress=False)
    assert (store / "router").is_dir() and "kept router" in capsys.readouterr().err
    quantize_checkpoint(model, store, LAYOUT, progress=False)  # now with a source: silent
    assert capsys.readouterr().err == ""
