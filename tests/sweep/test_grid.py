"""Grid files: parsed strictly; every bad field is a UserError naming the file and the field."""

from __future__ import annotations

import pytest

from d2moe.core.errors import UserError
from d2moe.sweep.cells import expand
from d2moe.sweep.grid import load_grid, parse_synth
from d2moe.traces import save_trace, synth_trace
from d2moe.traces.synth import SynthConfig

GOOD = """
policies: [fifo, hebf]
budgets: ["20%", 0.5, 1MiB]
profiles: [cpu-2core]
traces: ["synth:tiny:seed=1,decode_steps=4"]
steps: 3
engine: simpy
"""


def write(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_a_good_grid_parses_with_defaults_and_canonical_traces(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    assert grid.policies == ("fifo", "hebf")
    assert grid.budgets == ("20%", "0.5", "1MiB")
    assert grid.steps == 3 and grid.engine == "simpy" and grid.layout == "bitplane"
    (trace,) = grid.traces
    assert trace.text == "synth:tiny:decode_steps=4,seed=1" and trace.spec == "tiny"
    assert trace.synth_config() == SynthConfig(seed=1, decode_steps=4)
    cells = expand(grid, tmp_path / "out")
    assert len(cells) == grid.size == 6
    assert len({c.cell_id for c in cells}) == 6


def test_cell_ids_are_stable_and_depend_on_shared_options(tmp_path):
    a = [c.cell_id for c in expand(load_grid(write(tmp_path, GOOD)), tmp_path)]
    assert a == [c.cell_id for c in expand(load_grid(write(tmp_path, GOOD)), tmp_path / "x")]
    b = [c.cell_id for c in expand(load_grid(write(tmp_path, GOOD + "bits: 3\n")), tmp_path)]
    assert not set(a) & set(b)


def test_a_trace_file_is_relative_to_the_grid_and_takes_its_spec_from_the_header(tmp_path):
    save_trace(tmp_path / "t.npz", synth_trace(_tiny(), SynthConfig(decode_steps=2)))
    grid = load_grid(write(tmp_path, "policies: [fifo]\nbudgets: [50%]\ntraces: [t.npz]\n"))
    (trace,) = grid.traces
    assert trace.path == str(tmp_path / "t.npz") and trace.spec == "tiny"
    assert not trace.is_synth


def test_model_spec_must_load_and_reaches_the_cell_id_of_a_trace_file(tmp_path):
    save_trace(tmp_path / "t.npz", synth_trace(_tiny(), SynthConfig(decode_steps=2)))
    base = "policies: [fifo]\nbudgets: [50%]\ntraces: [t.npz]\n"
    with pytest.raises(UserError) as err:  # was only reported for the trace, as traces[0]
        load_grid(write(tmp_path, base + "model_spec: nope\n"))
    assert err.value.field == "model_spec"
    ids = {text: expand(load_grid(write(tmp_path, base + text)), tmp_path)[0].cell_id
           for text in ("", "model_spec: tiny\n", "model_spec: olmoe-1b-7b\n")}
    assert len(set(ids.values())) == 3  # another spec is another result, so another cell
    # a synthetic trace of the model_spec's own model: nothing is ignored, the id is kept
    synth = "policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\n"
    assert expand(load_grid(write(tmp_path, synth + "model_spec: tiny\n")), tmp_path)[0] \
        .cell_id == expand(load_grid(write(tmp_path, synth)), tmp_path)[0].cell_id


def test_a_relative_model_spec_is_the_grid_files_not_the_working_directorys(tmp_path,
                                                                            monkeypatch):
    import shutil
    from importlib import resources

    (tmp_path / "grids").mkdir()
    save_trace(tmp_path / "grids" / "t.npz", synth_trace(_tiny(), SynthConfig(decode_steps=2)))
    spec = resources.files("d2moe.core").joinpath("specs", "tiny.yaml")
    shutil.copyfile(str(spec), tmp_path / "grids" / "my-spec.yaml")
    text = "policies: [fifo]\nbudgets: [50%]\ntraces: [t.npz]\nmodel_spec: my-spec.yaml\n"
    monkeypatch.chdir(tmp_path)  # the spec is beside the grid, not here
    grid = load_grid(write(tmp_path / "grids", text))
    assert grid.model_spec == str(tmp_path / "grids" / "my-spec.yaml")
    assert grid.traces[0].spec == grid.model_spec


def test_a_synth_traces_spec_file_is_the_grid_files_too(tmp_path, monkeypatch):
    """synth:SPEC with a spec file took SPEC from the working directory, unlike every other
    path of a grid."""
    import shutil
    from importlib import resources

    (tmp_path / "grids").mkdir()
    spec = resources.files("d2moe.core").joinpath("specs", "tiny.yaml")
    shutil.copyfile(str(spec), tmp_path / "grids" / "my-spec.yaml")
    text = ("policies: [fifo]\nbudgets: [50%]\n"
            "traces: ['synth:../my-spec.yaml:seed=2', 'synth:tiny']\n")
    monkeypatch.chdir(tmp_path)  # from here, ../my-spec.yaml does not exist
    (tmp_path / "grids" / "sub").mkdir()
    grid = load_grid(write(tmp_path / "grids" / "sub", text))
    want = str(tmp_path / "grids" / "sub" / ".." / "my-spec.yaml")
    assert [t.spec for t in grid.traces] == [want, "tiny"]
    assert grid.traces[0].text == f"synth:{want}:seed=2"
    assert len(expand(grid, tmp_path / "out")) == 2  # the cells build from it


def _tiny():
    from d2moe.core.spec import load_spec

    return load_spec("tiny")


@pytest.mark.parametrize(("text", "field"), [
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nbogus: 1\n", "bogus"),
    ("policies: [fifo]\ntraces: [synth:tiny]\n", "budgets"),
    ("policies: [nope]\nbudgets: [50%]\ntraces: [synth:tiny]\n", "policies[0]"),
    ("policies: []\nbudgets: [50%]\ntraces: [synth:tiny]\n", "policies"),
    ("policies: [fifo, fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\n", "policies"),
    ("policies: [fifo]\nbudgets: [50%, lots]\ntraces: [synth:tiny]\n", "budgets[1]"),
    ("policies: [fifo]\nbudgets: [50%, '0.5']\ntraces: [synth:tiny]\n", "budgets"),
    ("policies: [fifo]\nbudgets: [4KiB, 4096B]\ntraces: [synth:tiny]\n", "budgets"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny:decode_steps=-1]\n",
     "traces[0].decode_steps"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny, synth:tiny:color=red]\n",
     "traces[1]"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny:seed=x]\n", "traces[0].seed"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:nomodel]\n", "traces[0]"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [missing.npz]\n", "traces[0]"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nprofiles: [nope]\n",
     "profiles[0]"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nengine: warp\n", "engine"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nlayout: zip\n", "layout"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nbits: four\n", "bits"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nbits: 99\n", "bits"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nsteps: -2\n", "steps"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\ngroup: 0\n", "group"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\ngroup: -64\n", "group"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nb1: 9\n", "b1"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [{a: 1}]\n", "traces[0]"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nmodel_spec: nope\n",
     "model_spec"),
    ("policies: [fifo]\nbudgets: [50%]\ntraces: [synth:tiny]\nmodel_spec: olmoe-1b-7b\n",
     "model_spec"),
])
def test_a_bad_field_is_named(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_grid(path)
    assert err.value.field == field
    assert str(path) in str(err.value)
    if field == "group":  # its floor, whatever the sign of the mistake (was ">= 0" for -64)
        assert ">= 1" in str(err.value)


def test_malformed_yaml_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="malformed YAML"):
        load_grid(write(tmp_path, "policies: [fifo\n"))
    with pytest.raises(UserError, match="no such file"):
        load_grid(tmp_path / "none.yaml")


def test_parse_synth_sorts_keys_and_reads_list_values():
    entry = parse_synth("synth:tiny:zipf=1.2,capacities=0.5,0.5,bits=2,4")
    assert entry.text == "synth:tiny:bits=2,4,capacities=0.5,0.5,zipf=1.2"
    assert entry.synth_config().bit_choices == (2, 4)
    assert parse_synth(entry.text) == entry
    with pytest.raises(UserError) as err:
        parse_synth("synth:tiny:bits=2", path="g.yaml", where="traces[3]")
    assert err.value.field == "traces[3].capacities"
    assert str(err.value).count("capacities") == 2  # the field once, the message once


def test_the_shipped_paper_grid_is_valid_and_names_every_baseline(tmp_path):
    from pathlib import Path

    grid = load_grid(Path(__file__).parents[2] / "benchmarks" / "grids" / "paper.yaml")
    for name in ("hold-in-memory", "matryoshka-free", "hold-in-memory-int4", "edgemoe",
                 "moqe-dynaio", "fifo", "fifo-lfu", "d2moe"):
        assert name in grid.policies
    assert len(expand(grid, tmp_path)) == 640


@pytest.mark.parametrize(("capacity", "field"), [
    ("{bogus: 1}", "capacity.bogus"),
    ("{capacity_mode: sometimes}", "capacity.capacity_mode"),
    ("{stall_high: high}", "capacity.stall_high"),
    ("{capacity_window: -4}", "capacity.capacity_window"),
    ("[adaptive]", "capacity"),
])
def test_a_bad_capacity_field_is_named(tmp_path, capacity, field):
    path = write(tmp_path, GOOD + f"capacity: {capacity}\n")
    with pytest.raises(UserError) as err:
        load_grid(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_capacity_options_reach_every_cell_and_its_id(tmp_path):
    from d2moe.router.adaptive import CapacityConfig

    plain = expand(load_grid(write(tmp_path, GOOD)), tmp_path)
    grid = load_grid(write(tmp_path, GOOD + "capacity: {capacity_mode: adaptive, "
                                            "capacity_window: 4, stall_high: 0.1}\n"))
    assert grid.capacity == CapacityConfig(capacity_mode="adaptive", capacity_window=4,
                                           stall_high=0.1)
    cells = expand(grid, tmp_path)
    assert all(c.capacity == grid.capacity for c in cells)
    assert all(c.fields()["capacity_mode"] == "adaptive" for c in cells)
    assert not {c.cell_id for c in cells} & {c.cell_id for c in plain}
    assert all(c.fields()["capacity_mode"] is None for c in plain)
