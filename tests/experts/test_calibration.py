"""Output similarity and routing importance of the tiny model on calibration text, and the
`d2moe experts stats` command."""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.experts import cmd, find_or_build_stats, load_stats  # noqa: E402
from d2moe.experts.calibration import (  # noqa: E402
    OUTPUT_SOURCE,
    calibration_ids,
    stats_from_model,
)
from d2moe.experts.cmd import StatsConfig, compute_stats  # noqa: E402
from d2moe.model.load import tiny_dir  # noqa: E402

KIB = 2  # calibration slice: 2 KiB = 8 windows of 256 bytes
SMALL = {"calib_kib": KIB, "sample_tokens": 128, "progress": False}


def _parse(argv):
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from d2moe.model.load import tiny_dir
    from d2moe.quant.cmd import quantize_checkpoint

    path = tmp_path_factory.mktemp("store") / "tiny"
    quantize_checkpoint(tiny_dir(), path, QuantLayout(b1=2, bK=4), progress=False)
    return path


def _check(stats, layers=4, experts=8):
    assert (stats.layers, stats.experts) == (layers, experts)
    for layer in range(layers):
        imp = np.asarray(stats.importance[layer])
        sim = np.asarray(stats.similarity[layer])
        assert imp.max() == 1.0 and imp.min() >= 0.0
        assert sim.shape == (experts, experts)
        np.testing.assert_allclose(sim, sim.T, atol=1e-12)
        assert np.all(np.diag(sim) == 1.0) and sim.min() >= -1.0 and sim.max() <= 1.0
        assert sim[~np.eye(experts, dtype=bool)].max() < 0.99  # distinct experts differ


def test_output_similarity_of_the_models_own_experts():
    from d2moe.model.load import load_tiny

    model, spec = load_tiny()
    ids = calibration_ids("tiny", spec, KIB)
    stats = stats_from_model(model, spec, ids, model.experts, sample_tokens=100)
    _check(stats)
    assert stats.source == OUTPUT_SOURCE and stats.meta["split"] == "train"
    assert stats.meta["sampled_tokens"] == 100 and stats.meta["calibration_tokens"] == 2048
    # an expert compared with a copy of itself under another id would be similarity 1:
    # swap two experts' weights and the matrix permutes accordingly
    experts = model.experts
    with torch.no_grad():
        for w in (experts.w1, experts.w3, experts.w2):
            w[0, [0, 1]] = w[0, [1, 0]].clone()
    swapped = stats_from_model(model, spec, ids, experts, sample_tokens=100)
    sim, sim2 = np.asarray(stats.similarity[0]), np.asarray(swapped.similarity[0])
    assert sim2[1, 2] == pytest.approx(sim[0, 2], abs=1e-6)


def test_calibration_text_is_the_training_split_not_the_heldout():
    from d2moe.core.spec import load_spec
    from d2moe.eval.ppl import heldout_ids

    spec = load_spec("tiny")
    calib, held = calibration_ids("tiny", spec, KIB), heldout_ids("tiny", spec, KIB)
    assert len(calib) == KIB * 1024 and calib[:256] != held[:256]
    with pytest.raises(UserError, match="field 'calib_kib'"):
        calibration_ids("tiny", spec, 0)


def test_store_weights_and_the_command(store, tmp_path, capsys):
    out = tmp_path / "stats.json"
    args = _parse(["experts", "stats", "--store", str(store), "--calib-kib", str(KIB),
                   "--sample-tokens", "128", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    header, rule = printed.splitlines()[1:3]  # the per-layer table, as `format_table` lays out
    assert header.startswith("layer  most important  least important") and "|" not in printed
    assert set(rule) == {"-", " "}
    assert f"wrote {out}" in printed
    stats = load_stats(out)
    _check(stats)
    assert stats.meta["weights"] == "store" and stats.meta["bits"] == 4  # highest stored
    own, _ = compute_stats(StatsConfig(weights="model", out=str(tmp_path / "own.json"),
                                       **SMALL))
    from d2moe.model.load import tiny_dir
    from d2moe.quant.source import expert_sha256
    from d2moe.quant.store import StoreReader

    with StoreReader(store) as reader:  # both record the weights they were measured on
        assert stats.meta["expert_sha256"] == reader.source["expert_sha256"] == \
            own.meta["expert_sha256"] == expert_sha256(tiny_dir())
    # 4-bit weights: close to the float experts' similarity
    np.testing.assert_allclose(np.asarray(stats.similarity), np.asarray(own.similarity),
                               atol=0.05)


def test_trace_command_writes_beside_the_trace(tmp_path, capsys):
    from d2moe.core.spec import load_spec
    from d2moe.traces import save_trace, synth_trace
    from d2moe.traces.synth import SynthConfig

    trace = tmp_path / "t.npz"
    save_trace(trace, synth_trace(load_spec("tiny"), SynthConfig(decode_steps=8)))
    args = _parse(["experts", "stats", "--trace", str(trace)])
    assert args.func(args) == 0
    assert "trace-routing (proxy)" in capsys.readouterr().out
    assert load_stats(tmp_path / "t.expert_stats.json").layers == 4


def test_auto_builds_once_beside_the_store(store, monkeypatch):
    monkeypatch.setattr(cmd, "StatsConfig", functools.partial(StatsConfig, calib_kib=KIB,
                                                              sample_tokens=64))
    stats = find_or_build_stats("auto", model="tiny", store=store)
    assert (store / "expert_stats.json").is_file()
    _check(stats)
    mtime = (store / "expert_stats.json").stat().st_mtime_ns
    assert find_or_build_stats("auto", model="tiny", store=store) == stats
    assert (store / "expert_stats.json").stat().st_mtime_ns == mtime  # read, not rebuilt
    assert find_or_build_stats("", model="tiny", store=store) is None


def test_statistics_of_the_model_are_not_written_beside_another_models_store(store,
                                                                             tmp_path):
    import json
    import shutil

    from d2moe.core.fileio import STORE_INDEX
    from d2moe.quant.store import index_digest

    other = tmp_path / "other"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("expert_stats.json"))
    index = json.loads((other / STORE_INDEX).read_text())
    index["source"]["expert_sha256"] = "0" * 64  # as if quantized from another checkpoint
    index["sha256"] = index_digest(index)
    (other / STORE_INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match="field 'source'"):
        compute_stats(StatsConfig(weights="model", store=str(other), **SMALL))
    assert not (other / "expert_stats.json").exists()


def test_statistics_of_other_weights_are_refused_beside_a_store(store, tmp_path):
    import dataclasses

    from d2moe.core.spec import load_spec
    from d2moe.experts import save_stats, stats_from_trace
    from d2moe.traces import synth_trace
    from d2moe.traces.synth import SynthConfig

    base = stats_from_trace(synth_trace(load_spec("tiny"), SynthConfig(decode_steps=4)))
    assert find_or_build_stats(str(save_stats(tmp_path / "trace.json", base)), model="tiny",
                               store=store) == base  # no weights behind them: nothing to check
    other = dataclasses.replace(base, meta={**base.meta, "expert_sha256": "0" * 64})
    path = save_stats(tmp_path / "other.json", other)
    with pytest.raises(UserError, match=r"other\.json: field 'meta\.expert_sha256': the "
                                        r"statistics were measured on other expert weights"):
        find_or_build_stats(str(path), model="tiny", store=store)


@pytest.mark.parametrize("cfg, match", [
    (StatsConfig(weights="fp16"), "field 'weights'"),
    (StatsConfig(weights="model", calib_kib=0), "field 'calib_kib'"),
    (StatsConfig(model="/nowhere", weights="model"), "/nowhere: field 'model': no such "),
    (StatsConfig(model=str(tiny_dir()), weights="model"), "field 'out': nowhere to write"),
])
def test_bad_options(cfg, match):
    with pytest.raises(UserError, match=match):
        compute_stats(cfg)


@pytest.mark.parametrize("kw,field", [({"ctx": 1}, "ctx"), ({"batch": 0}, "batch"),
                                      ({"sample_tokens": 0}, "sample-tokens")])
def test_each_count_names_its_own_option(kw, field):
    with pytest.raises(UserError, match=rf"field '{field}': must be >= .*fix: pass --{field} "):
        stats_from_model(None, None, [], None, **kw)  # checked before the model is touched
