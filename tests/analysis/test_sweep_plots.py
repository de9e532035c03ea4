"""`d2moe plot`: figures from a small table, each labelled with where its numbers come from."""

from __future__ import annotations

import csv
import json

import pytest

from d2moe.analysis.sweep_plots import (
    load_table,
    plot_ablation,
    plot_budget,
    plot_quality,
    source_label,
)
from d2moe.cli import main
from d2moe.core.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def rows(oracle: bool = True) -> list[dict]:
    out = []
    for i, budget in enumerate(("20%", "40%", "60%")):
        for j, policy in enumerate(("fifo", "hebf", "fifo-lfu")):
            out.append({
                "cell_id": f"{i}{j}", "status": "ok", "model": "tiny", "profile": "cpu-2core",
                "profile_source": "measured", "run_kind": "simulated", "trace": "synth:tiny",
                "budget": budget, "budget_bytes": (i + 1) * 2**19, "policy": policy,
                "decode_tokens_per_s": 40.0 + 5 * i + j, "hit_rate": 0.2 * i + 0.05 * j,
                "oracle_hit_rate": 0.3 + 0.2 * i if oracle else None})
    out.append({**out[0], "cell_id": "x", "budget": "1KiB", "budget_bytes": 1024,
                "status": "does-not-fit", "decode_tokens_per_s": None})
    return out


def write_jsonl(path, table: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in table))
    return path


def test_budget_plot_writes_one_png_per_model_and_profile(tmp_path):
    table = rows() + [{**r, "profile": "rtx3060-laptop", "profile_source": "estimated",
                       "cell_id": r["cell_id"] + "b"} for r in rows(oracle=False)]
    paths = plot_budget(table, tmp_path, dpi=50)
    assert sorted(p.name for p in paths) == ["budget-tiny-cpu-2core.png",
                                             "budget-tiny-rtx3060-laptop.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_ablation_plot_keeps_the_given_order_and_skips_missing_policies(tmp_path):
    path = plot_ablation(rows(), tmp_path, policies=["hebf", "fifo", "absent", "fifo-lfu"],
                         dpi=50)
    assert path.name == "ablation.png" and path.read_bytes()[:8] == PNG
    with pytest.raises(UserError) as err:
        plot_ablation(rows(), tmp_path)  # the default ablation presets are not in this table
    assert err.value.field == "policies" and "fifo" in str(err.value)


def test_quality_plot_reads_a_csv_with_policy_budget_rate_ppl(tmp_path):
    path = tmp_path / "quality.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "budget", "decode_tokens_per_s", "ppl", "run_kind"])
        for policy, ppl in (("hebf", 9.0), ("rtn2", 12.0)):
            for budget, rate in (("20%", 40.0), ("60%", 55.0)):
                w.writerow([policy, budget, rate, ppl - rate / 100, "measured"])
    table = load_table(path)
    assert table[0]["decode_tokens_per_s"] == 40.0 and table[0]["policy"] == "hebf"
    out = plot_quality(table, tmp_path / "figs", dpi=50)
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(UserError, match="ppl"):
        plot_quality([{k: v for k, v in r.items() if k != "ppl"} for r in table], tmp_path)


def test_every_figure_says_simulated_or_measured():
    assert source_label(rows()[0]) == "simulated (profile cpu-2core, measured)"
    assert source_label({"profile": "/p/my-box.yaml", "profile_source": "estimated"}) == \
        "simulated (profile my-box, estimated)"
    assert source_label({"run_kind": "measured", "profile": "x"}) == "measured"
    assert source_label({"policy": "fifo"}) is None


def test_a_table_that_does_not_say_its_source_needs_a_label(tmp_path):
    table = [{"policy": "a", "budget": "1", "decode_tokens_per_s": 10.0, "ppl": 5.0}]
    with pytest.raises(UserError, match="--label"):
        plot_quality(table, tmp_path)
    assert plot_quality(table, tmp_path, label="measured", dpi=50).exists()


def test_load_table_skips_a_torn_line_and_keeps_the_latest_row_per_cell(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows())
    with open(path, "a") as f:
        f.write(json.dumps({**rows()[0], "decode_tokens_per_s": 99.0}) + "\n" + '{"cell_')
    table = load_table(path)
    assert len(table) == len(rows())
    assert next(r for r in table if r["cell_id"] == "00")["decode_tokens_per_s"] == 99.0


def test_the_plot_verb_writes_next_to_the_table(tmp_path, capsys):
    path = write_jsonl(tmp_path / "table.jsonl", rows())
    assert main(["plot", "budget", str(path)]) == 0
    assert (tmp_path / "budget-tiny-cpu-2core.png").exists()
    assert main(["plot", "ablation", str(path), "--policies", "fifo,hebf,fifo-lfu",
                 "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "ablation.png").exists()
    err = _plot_error(capsys, ["plot", "quality", str(path)], str(path))  # no ppl column
    assert "ppl" in err


def _plot_error(capsys, argv: list[str], named: str) -> str:
    """Exit 2 with one stderr line naming `named`, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and named in err, err
    return err


def test_load_table_checks_the_digest_of_a_sweep_table(tmp_path, capsys):
    from d2moe.sweep.table import TableWriter

    path = tmp_path / "table.jsonl"
    with TableWriter(path) as t:
        for r in rows():
            t.append(r)
    table = load_table(path)  # the digest field is checked, then left out
    assert len(table) == len(rows()) and all("row_sha256" not in r for r in table)
    assert main(["plot", "budget", str(path), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    lines = path.read_text().splitlines(keepends=True)
    assert '"decode_tokens_per_s": 41.0' in lines[1]
    lines[1] = lines[1].replace('"decode_tokens_per_s": 41.0', '"decode_tokens_per_s": 4100.0')
    path.write_text("".join(lines))
    with pytest.raises(UserError, match="line 2 does not match"):
        load_table(path)
    _plot_error(capsys, ["plot", "budget", str(path)], str(path))


def test_a_benchmarks_jsonl_without_cell_ids_plots_and_its_digests_are_checked(tmp_path,
                                                                              capsys):
    """Benchmarks (budget_curves.py, substitution.py) write rows of their own: no cell_id,
    a digest per row through `table_line`; rows from before digests, without either."""
    from d2moe.sweep.table import read_rows, table_line

    quality = [{"policy": p, "budget": b, "decode_tokens_per_s": 30.0 + i, "ppl": 5.0 + i,
                "run_kind": "measured"}
               for i, (p, b) in enumerate([("fifo", "25%"), ("hebf", "25%"), ("fifo", "50%")])]
    plain = tmp_path / "plain.jsonl"  # no digests, and no newline after the last row
    plain.write_text("\n".join(json.dumps(r) for r in quality))
    assert load_table(plain) == quality
    assert main(["plot", "quality", str(plain), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "quality.png").read_bytes()[:8] == PNG
    with pytest.raises(UserError, match="is not a row of a sweep table"):
        read_rows(plain)  # appending to it (a sweep's resume) is still refused

    signed = tmp_path / "signed.jsonl"
    signed.write_text("".join(table_line(r) + "\n" for r in quality))
    assert load_table(signed) == quality
    signed.write_text(signed.read_text().replace('"ppl": 6.0', '"ppl": 0.5'))
    with pytest.raises(UserError, match="line 2 does not match"):
        load_table(signed)
    plain.write_text(plain.read_text() + '\n{"policy": "fi')  # cut inside a row
    assert load_table(plain) == quality
    plain.write_text(plain.read_text() + "\nnot json\n")
    _plot_error(capsys, ["plot", "quality", str(plain)], str(plain))


@pytest.mark.parametrize("name", ["binary.jsonl", "binary.csv"])
def test_a_binary_table_is_a_user_error(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError) as err:
        load_table(path)
    assert err.value.path == str(path)
    _plot_error(capsys, ["plot", "budget", str(path)], str(path))


def test_plot_errors_name_the_table_when_given(tmp_path):
    bad = [{**r, "status": "error"} for r in rows()]
    with pytest.raises(UserError) as err:
        plot_budget(bad, tmp_path, table=tmp_path / "table.jsonl")
    assert str(err.value).startswith(f"{tmp_path / 'table.jsonl'}: field 'status'")
    with pytest.raises(UserError, match="table.jsonl: field 'status'"):
        plot_ablation(bad, tmp_path, policies=["fifo"], table="table.jsonl")
    with pytest.raises(UserError, match="table.jsonl: field 'ppl'"):
        plot_quality(bad, tmp_path, table="table.jsonl")


def _write_csv(path, table: list[dict]):
    cols = list(dict.fromkeys(k for r in table for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(table)
    return path


@pytest.mark.parametrize("column,value,what", [
    ("decode_tokens_per_s", "abc", "'abc' is not a number"),
    ("budget_bytes", "-5", "-5 is negative"),
    ("budget", "-20%", "not a finite share"), ("budget", "lots", "cannot read")])
def test_a_csv_value_the_plots_cannot_use_names_file_line_and_column(tmp_path, capsys, column,
                                                                      value, what):
    table = rows()
    table[2] = {**table[2], column: value}
    path = _write_csv(tmp_path / "table.csv", table)
    with pytest.raises(UserError, match=what) as err:
        load_table(path)
    assert err.value.path == str(path) and err.value.field == column
    assert str(err.value).startswith(f"{path}: field '{column}': line 4: ")  # header is line 1
    _plot_error(capsys, ["plot", "budget", str(path), "--out", str(tmp_path)], "line 4")
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("extra,got", [(",7", 5), (None, 3)])
def test_a_csv_line_with_more_or_fewer_fields_than_the_header_is_named(tmp_path, capsys,
                                                                       extra, got):
    path = tmp_path / "q.csv"
    line = "fifo,40%,10,5" + extra if extra else "fifo,40%,10"
    path.write_text(f"policy,budget,decode_tokens_per_s,ppl\nfifo,20%,9,6\n{line}\n")
    with pytest.raises(UserError, match=f"line 3 has {got} fields, the header 4") as err:
        load_table(path)
    assert err.value.path == str(path)
    _plot_error(capsys, ["plot", "quality", str(path), "--out", str(tmp_path)], "line 3")


def test_a_jsonl_value_the_plots_cannot_use_names_its_row(tmp_path):
    table = rows()
    table[1] = {**table[1], "decode_tokens_per_s": "fast"}
    with pytest.raises(UserError, match=r"field 'decode_tokens_per_s': row 2: 'fast'"):
        load_table(write_jsonl(tmp_path / "t.jsonl", table))


def test_a_file_that_is_no_table_at_all_says_so(tmp_path, capsys):
    import numpy as np

    npz = tmp_path / "t.npz"
    np.savez(npz, a=np.arange(4))
    err = _plot_error(capsys, ["plot", "budget", str(npz)], str(npz))
    assert "not a JSON-lines or CSV table" in err and "repair" not in err
    err = _plot_error(capsys, ["plot", "budget", str(tmp_path)], str(tmp_path))
    assert "is a directory" in err


@pytest.mark.parametrize("kind", ["budget", "ablation", "quality"])
def test_plot_names_a_missing_policy_budget_or_column_and_lists_the_tables(tmp_path, capsys,
                                                                         kind):
    table = [{**r, "ppl": 5.0} for r in rows()]
    path = write_jsonl(tmp_path / "table.jsonl", table)
    base = ["plot", kind, str(path), "--out", str(tmp_path / "o")]
    err = _plot_error(capsys, base + ["--policies", "fifo,nope"], str(path))
    assert "field 'policies'" in err and "nope" in err and "fifo, hebf, fifo-lfu" in err
    err = _plot_error(capsys, base + ["--budgets", "20%,99%"], str(path))
    assert "field 'budgets'" in err and "99%" in err and "20%, 40%, 60%, 1KiB" in err
    path = write_jsonl(tmp_path / "table.jsonl",
                       [{k: v for k, v in r.items() if k != "decode_tokens_per_s"}
                        for r in table])
    err = _plot_error(capsys, base, str(path))
    assert "field 'decode_tokens_per_s'" in err and "lacks" in err and "budget_bytes" in err


def test_quality_draws_only_the_policies_asked_for(tmp_path):
    table = [{"policy": p, "budget": "50%", "decode_tokens_per_s": 10.0 + i, "ppl": 5.0,
              "run_kind": "measured"} for i, p in enumerate(("a", "b", "c"))]
    assert plot_quality(table, tmp_path, policies=["c", "a"], dpi=50).exists()
    with pytest.raises(UserError, match="policy d is not in the table"):
        plot_quality(table, tmp_path, policies=["d"])


def test_a_curve_equal_to_an_earlier_one_says_so_in_the_legend():
    """Two policies with the same tokens/s at every budget draw one line over the other; the
    legend names the hidden one's twin."""
    from matplotlib.figure import Figure

    from d2moe.analysis.sweep_plots import _budget_panels, line_style

    table = [r for r in rows() if r["status"] == "ok"]
    table += [{**r, "policy": "d2moe"} for r in table if r["policy"] == "hebf"]
    ax = Figure().subplots()
    names = ["fifo", "hebf", "d2moe"]
    _budget_panels([ax], table, names, {n: line_style(i) for i, n in enumerate(names)},
                   2**20, "MiB", False, label=True)
    assert ax.get_legend_handles_labels()[1] == ["fifo", "hebf", "d2moe (= hebf)"]
