"""`d2moe eval ppl` on the tiny model and a small held-out slice."""

from __future__ import annotations

import argparse

import pytest

from d2moe.core.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.eval import cmd  # noqa: E402
from d2moe.eval.ppl import (  # noqa: E402
    PplConfig,
    PplRow,
    PplTable,
    eval_ppl,
    heldout_ids,
    parse_bits_list,
)

KIB = 4  # held-out slice: 4 KiB = 16 windows of 256 bytes


def _parse(argv):
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


def test_ppl_falls_with_bits_and_fp_is_the_models_own():
    from d2moe.model.load import load_tiny
    from d2moe.model.perplexity import perplexity

    table = eval_ppl(PplConfig(format="mwq,bitplane,rtn", bits="2,8", heldout_kib=KIB,
                               progress=False))
    model, spec = load_tiny()
    own = perplexity(model, heldout_ids("tiny", spec, KIB), ctx=256, batch=16)
    assert table.fp_ppl == own.ppl and table.tokens_scored == own.tokens_scored == 16 * 255
    for fmt in ("mwq", "bitplane", "rtn"):
        assert table.get(fmt, 8) < table.get(fmt, 2)
        assert table.get(fmt, 8) == pytest.approx(table.fp_ppl, rel=2e-3)  # 8 bits ~ lossless
        assert table.get(fmt, 2) > table.fp_ppl * 1.005  # 2 bits visibly worse


def test_store_matches_in_memory_and_cli(tmp_path, capsys):
    from d2moe.core.sizes import QuantLayout
    from d2moe.quant.cmd import quantize_checkpoint

    store = tmp_path / "store"
    quantize_checkpoint("tiny", store, QuantLayout(kind="bitplane", b1=2, bK=4), progress=False)
    args = _parse(["eval", "ppl", "--store", str(store), "--bits", "2-4", "--heldout-kib",
                   str(KIB), "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()  # the title, then the table as `format_table` lays out
    assert lines[1].split() == ["bits", "bitplane"] and set(lines[2]) == {"-", " "}
    assert [line.split()[0] for line in lines[3:]] == ["2", "3", "4", "fp"]
    assert "|" not in out
    from_store = eval_ppl(PplConfig(store=str(store), bits="3", heldout_kib=KIB,
                                    progress=False))
    in_memory = eval_ppl(PplConfig(format="bitplane", store_bits="2:4", bits="3",
                                   heldout_kib=KIB, progress=False))
    assert from_store.get("bitplane", 3) == in_memory.get("bitplane", 3)
    with pytest.raises(UserError, match=r"field 'bits'.*outside the bitplane store's range 2\.\.4"):
        eval_ppl(PplConfig(store=str(store), bits="3,5", heldout_kib=KIB, progress=False))
    with pytest.raises(UserError, match="store holds bitplane"):
        eval_ppl(PplConfig(store=str(store), format="mwq", bits="3", progress=False))


@pytest.mark.parametrize("cfg, match", [
    (PplConfig(bits="1,2"), r"field 'bits'.*1 bits is outside the bitplane store's range 2\.\.8"),
    (PplConfig(format="rtn", bits="9"), r"outside RTN 1\.\.8.*fix: ask for 1\.\.8 bits"),
    (PplConfig(bits="two"), "field 'bits': cannot read 'two' in 'two' as a number or a range"),
    (PplConfig(bits="4-2"), "empty range"),
    (PplConfig(format="int4"), "field 'format': unknown format 'int4'"),
    (PplConfig(format="mwq", fit="best"), "field 'fit'"),
    (PplConfig(heldout_kib=0), "field 'heldout_kib'"),
    (PplConfig(ctx=1), "field 'ctx'"),
    (PplConfig(store_bits="4:2"), r"b1 <= bK"),
])
def test_bad_options(cfg, match):
    with pytest.raises(UserError, match=match):
        eval_ppl(cfg)


def test_parse_bits_list():
    assert parse_bits_list("8, 2-4,5") == (2, 3, 4, 5, 8)
    with pytest.raises(UserError, match="field 'bits': 3 is given twice in '2-4,8, 3'"):
        parse_bits_list("2-4,8, 3")  # overlapping: a typo, as '3,3' is


def test_the_table_is_laid_out_as_the_other_verbs_tables():
    rows = (PplRow("fp", 0, 9.5, 10), PplRow("mwq", 2, 12.35, 10), PplRow("mwq", 8, 9.5019, 10),
            PplRow("rtn", 2, 13.0, 10), PplRow("rtn", 8, 9.5, 10))
    text = PplTable(rows, 9.5, 10, "tiny", "x").render()
    assert "|" not in text
    assert text.splitlines() == [
        "bits  mwq                rtn",
        "----  -----------------  -----------------",
        "2     12.3500 (+30.00%)  13.0000 (+36.84%)",
        "8      9.5019 (+0.02%)    9.5000 (+0.00%)",  # perplexities' decimal points in line
        "fp     9.5000            -"]
    only_fp = PplTable(rows[:1], 9.5, 10, "tiny", "x").render()
    assert only_fp.splitlines() == ["bits  ppl", "----  ------", "fp    9.5000"]
