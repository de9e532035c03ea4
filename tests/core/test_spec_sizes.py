"""Model specs (shipped, YAML, HF config.json) and expert bytes at every bit-width."""

from __future__ import annotations

import json

import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import (
    QuantLayout,
    all_experts_bytes,
    expert_bytes,
    load_bytes,
    parse_budget,
    parse_bytes,
)
from d2moe.core.spec import SHIPPED, load_spec


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_spec_loads(name):
    spec = load_spec(name)
    assert spec.name == name and spec.top_k <= spec.experts
    assert expert_bytes(spec, 2) < expert_bytes(spec, 4) < expert_bytes(spec, 8)


def test_mwq_bytes_by_hand():
    """tiny-like matrix set: w1, w3 [128, 64], w2 [64, 128], groups of 64."""
    from d2moe.core.spec import ModelSpec

    spec = ModelSpec(name="t", layers=1, experts=2, top_k=1, hidden=64, ffn=128, heads=1,
                     kv_heads=1, vocab=8)
    mwq = QuantLayout(kind="mwq")
    # base per matrix: 8192 weights * 2 bits / 8 = 2048 B + 128 groups * 4 B = 2560 B
    # plane per matrix: 8192 / 8 = 1024 B + 128 groups * 2 B = 1280 B
    assert expert_bytes(spec, 2, mwq) == 3 * 2560
    assert expert_bytes(spec, 5, mwq) == 3 * (2560 + 3 * 1280)
    assert load_bytes(spec, 3, 5, mwq) == 3 * 2 * 1280  # only the two missing planes move
    assert load_bytes(spec, 0, 3, mwq) == expert_bytes(spec, 3, mwq)
    # bitplane (the default): the same base, planes of 1 bit per weight and nothing else
    assert expert_bytes(spec, 5) == 3 * (2560 + 3 * 1024)
    assert load_bytes(spec, 3, 5) == 3 * 2 * 1024
    copies = QuantLayout(kind="copies")
    # an RTN copy at 4 bits: 4096 B of codes + 512 B of scales and zeros per matrix
    assert expert_bytes(spec, 4, copies) == 3 * (4096 + 512)
    assert load_bytes(spec, 3, 4, copies) == expert_bytes(spec, 4, copies)  # a whole new copy
    assert all_experts_bytes(spec, 2) == 2 * expert_bytes(spec, 2)


def test_hf_config_json(tmp_path):
    cfg = {"model_type": "mixtral", "num_hidden_layers": 4, "num_local_experts": 8,
           "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_spec(tmp_path)
    assert (spec.layers, spec.experts, spec.top_k, spec.ffn, spec.kv_heads) == (4, 8, 2, 128, 2)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(UserError, match="malformed JSON"):
        load_spec(tmp_path)


def test_spec_yaml_errors(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nlayers: 2\nexperts: 4\ntop_k: 8\nhidden: 8\nffn: 8\nheads: 1\n"
                 "kv_heads: 1\nvocab: 4\n")
    with pytest.raises(UserError, match="top_k"):
        load_spec(p)
    p.write_text("name: s\nlayers: two\nexperts: 4\ntop_k: 2\nhidden: 8\nffn: 8\nheads: 1\n"
                 "kv_heads: 1\nvocab: 4\n")
    with pytest.raises(UserError, match="field 'layers': must be an integer"):
        load_spec(p)
    p.write_text("name: s\n")
    with pytest.raises(UserError, match="field 'layers': missing"):
        load_spec(p)
    with pytest.raises(UserError, match="not a shipped spec"):
        load_spec("nope-7b")


def test_budget_and_size_parsing():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_budget("40%", 1000) == 400
    assert parse_budget("0.25", 1000) == 250
    assert parse_budget("2KiB", 10) == 2048
    for bad in ("lots", "12XB", ""):
        with pytest.raises(UserError, match="budget"):
            parse_budget(bad, 1000)
