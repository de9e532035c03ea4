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


@pytest.mark.parametrize("bad", ["inf%", "1e999", "1e999%", "nan%", "-5%", "1e308TiB"])
def test_budget_that_is_not_a_finite_share_or_size(bad):
    with pytest.raises(UserError, match=r"field 'budget'.*fix: write e.g. 6GiB, 40% or 0.4"):
        parse_budget(bad, 1000)


def test_budget_above_all_experts_is_kept():
    """The total is all experts at one width; 200% is used for 8-bit experts (docs)."""
    assert parse_budget("200%", 1000) == 2000
    assert parse_budget("1.5e10%", 1000) == 150_000_000_000


def test_size_overflow_names_the_field():
    with pytest.raises(UserError, match=r"field 'disk-sizes'.*too large"):
        parse_bytes("1e999", field="disk-sizes")


@pytest.mark.parametrize("kw,field", [({"group": 0}, "group"), ({"group": -64}, "group"),
                                      ({"scale_bytes": 4}, "scale_bytes")])
def test_layout_rejects_bad_group_and_scale_bytes(kw, field):
    with pytest.raises(UserError, match=f"field '{field}'"):
        QuantLayout(**kw)
    assert QuantLayout(group=1).group == 1


def _one_line_error(capsys, argv: list[str], named: str) -> str:
    """Run the CLI; require exit 2 and one stderr line naming `named`, no traceback."""
    from d2moe.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and named in err
    return err


def _hf_cfg(**changes) -> dict:
    cfg = {"model_type": "mixtral", "num_hidden_layers": 4, "num_local_experts": 8,
           "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    return {**cfg, **changes}


def test_a_config_json_that_is_not_an_object_is_named(tmp_path, capsys):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(UserError, match="expected a JSON object") as err:
        load_spec(path)
    assert err.value.path == str(path)
    _one_line_error(capsys, ["simulate", "--model-spec", str(path), "--profile", "cpu-2core",
                             "--steps", "20", "--out", str(tmp_path / "x")], "list.json")
    path.write_bytes(b'{"model_type": "\xff"}')  # not UTF-8
    with pytest.raises(UserError, match="not UTF-8"):
        load_spec(path)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", "abc"), ("hidden_size", True),
                                        ("num_local_experts", 2.5), ("vocab_size", None),
                                        ("head_dim", [32]), ("num_hidden_layers", -4)])
def test_a_config_json_number_of_the_wrong_type_names_its_key(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps(_hf_cfg(**{key: value})))
    with pytest.raises(UserError) as err:
        load_spec(tmp_path)
    assert err.value.field == key and err.value.path == str(tmp_path / "config.json")


def test_a_config_json_whole_float_is_accepted():
    from d2moe.core.spec import spec_from_hf_config

    spec = spec_from_hf_config(_hf_cfg(hidden_size=64.0), path="config.json")
    assert spec.hidden == 64 and isinstance(spec.hidden, int)


def test_a_spec_yaml_error_names_the_file_not_the_spec_name(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text("name: tiny\nlayers: -4\nexperts: 4\ntop_k: 2\nhidden: 8\nffn: 8\nheads: 1\n"
                 "kv_heads: 1\nvocab: 4\n")
    with pytest.raises(UserError) as err:
        load_spec(p)
    assert str(err.value).startswith(f"{p}: field 'layers'")
    _one_line_error(capsys, ["simulate", "--model-spec", str(p), "--profile", "cpu-2core",
                             "--out", str(tmp_path / "x")], "s.yaml: field 'layers'")


@pytest.mark.parametrize("field, value", [("dtype_bytes", -2), ("dtype_bytes", 0),
                                          ("head_dim", -5), ("shared_ffn", -1),
                                          ("dense_layers", -1), ("dense_ffn", -3),
                                          ("non_expert_params_per_layer", -1)])
def test_negative_sizes_and_dtype_bytes_are_refused(tmp_path, field, value):
    from d2moe.core.spec import ModelSpec

    p = tmp_path / "s.yaml"
    p.write_text("name: s\nlayers: 2\nexperts: 4\ntop_k: 2\nhidden: 8\nffn: 8\nheads: 1\n"
                 f"kv_heads: 1\nvocab: 4\n{field}: {value}\n")
    with pytest.raises(UserError) as err:
        load_spec(p)
    assert err.value.field == field and err.value.path == str(p)
    with pytest.raises(UserError, match=field):  # built in code: named by the spec's name
        ModelSpec(name="s", layers=2, experts=4, top_k=2, hidden=8, ffn=8, heads=1,
                  kv_heads=1, vocab=4, **{field: value})


@pytest.mark.parametrize("old,new,field,what", [
    ("heads: 6", "heads: 5", "heads", "hidden=192 is not divisible by heads=5"),
    ("kv_heads: 2", "kv_heads: 4", "kv_heads", "heads=6 is not a multiple of kv_heads=4")])
def test_a_spec_whose_attention_does_not_split_evenly_is_refused(tmp_path, old, new, field,
                                                                   what):
    from importlib import resources

    text = resources.files("d2moe.core").joinpath("specs", "tiny.yaml").read_text()
    assert old in text
    p = tmp_path / "s.yaml"
    p.write_text(text.replace(old, new))
    with pytest.raises(UserError, match=what) as err:
        load_spec(p)
    assert err.value.field == field and err.value.path == str(p)
    if field == "heads":  # a head_dim that is set need not divide hidden
        p.write_text(text.replace(old, new).replace("kv_heads: 2", "kv_heads: 1")
                     + "head_dim: 32\n")
        assert load_spec(p).dim_head == 32


@pytest.mark.parametrize("changes,key", [({"num_attention_heads": 3}, "num_attention_heads"),
                                         ({"num_key_value_heads": 3}, "num_key_value_heads")])
def test_a_config_json_whose_attention_does_not_split_evenly_names_its_key(tmp_path, changes,
                                                                           key):
    (tmp_path / "config.json").write_text(json.dumps(_hf_cfg(**changes)))
    with pytest.raises(UserError) as err:
        load_spec(tmp_path)
    assert err.value.field == key and err.value.path == str(tmp_path / "config.json")


@pytest.mark.parametrize("ref", ["", "  "])
def test_an_empty_model_spec_is_no_spec_not_the_current_directory(ref):
    with pytest.raises(UserError, match=r"field 'model-spec': no model spec given") as err:
        load_spec(ref)
    assert "config.json in this directory" not in str(err.value)


def test_a_directory_without_config_json_says_so(tmp_path):
    with pytest.raises(UserError, match="no config.json in this directory") as err:
        load_spec(tmp_path)
    assert err.value.path == str(tmp_path)


@pytest.mark.parametrize("text", ["1.5", " 2.5 ", "1.5B", "100.25", "2.5e0"])
def test_budget_of_a_fractional_byte_count_is_an_error_that_suggests_a_percentage(text):
    """A bare number above 1 counts bytes: '1.5' (150% meant?) must not become 1 byte."""
    with pytest.raises(UserError, match=r"field 'budget'.*whole number.*fix: .*150%.*2B"):
        parse_budget(text, 1000)


def test_budget_bare_whole_numbers_count_bytes_and_fractional_units_are_kept():
    assert parse_budget("2", 1000) == 2 and parse_budget("1e3", 10) == 1000
    assert parse_budget("1", 1000) == 1000 and parse_budget(2048, 10) == 2048
    assert parse_budget("0.1GiB", 1) == int(0.1 * 2**30)
    with pytest.raises(UserError, match="disk-sizes.*whole number"):
        parse_bytes("0.5", field="disk-sizes")


@pytest.mark.parametrize("key,field,value", [
    ("intermediate_size", "intermediate_size", 6e20), ("hidden_size", "hidden_size", 6e20),
    ("num_local_experts", "num_local_experts", 100_000_000),
    ("num_hidden_layers", "num_hidden_layers", 100_000_000)])
def test_a_size_larger_than_any_model_is_named_before_anything_is_built(tmp_path, key, field,
                                                                        value):
    """A digit too many used to pass, then overflow int64 in a timeline or ask numpy for
    143 GiB; every size now has a bound far above real models, in specs and config.json."""
    (tmp_path / "config.json").write_text(json.dumps(_hf_cfg(**{key: value})))
    with pytest.raises(UserError, match="larger than any model this tool runs") as err:
        load_spec(tmp_path)
    assert err.value.field == field and err.value.path == str(tmp_path / "config.json")
    spec = load_spec("mixtral-8x7b")  # the bounds leave room above the real ones
    assert spec.experts * 16 <= 4096 and spec.hidden * 8 <= 1 << 16
