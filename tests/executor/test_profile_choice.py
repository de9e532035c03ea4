"""Which profile `d2moe validate` simulates with: names, `measure`, `auto`'s match by the
machine's device line, and the report line for a profile of another machine."""

import dataclasses

import pytest
import torch

from d2moe.core.errors import UserError
from d2moe.executor.profile_choice import chosen_profile, other_machine_line
from d2moe.executor.validate import ValidateConfig
from d2moe.profiles import load_profile, shipped_profiles
from d2moe.profiles.measure import device_name


def _pretend_machine(monkeypatch, line: str) -> None:
    """This machine describes itself as `line` (to `device_name`, for CPU and GPU)."""
    monkeypatch.setattr("d2moe.profiles.measure.device_name", lambda device: line)


@pytest.mark.parametrize("name", [n for n in shipped_profiles()
                                  if load_profile(n).source.kind == "measured"])
def test_auto_picks_the_shipped_profile_measured_on_a_machine_like_this(monkeypatch, name):
    _pretend_machine(monkeypatch, load_profile(name).source.device)
    assert chosen_profile(ValidateConfig(profile="auto")).name == name


def test_auto_falls_back_to_cpu_2core_on_another_cpu_and_refuses_on_another_gpu(monkeypatch):
    _pretend_machine(monkeypatch, "Some CPU (family 1, model 1), 64 cores, torch 1 threads, "
                                  "native kernel")
    assert chosen_profile(ValidateConfig(profile="auto")).name == "cpu-2core"
    _pretend_machine(monkeypatch, "Some GPU, host")
    with pytest.raises(UserError, match="no shipped profile was measured on this GPU.*"
                                        "--profile measure"):
        chosen_profile(ValidateConfig(profile="auto", device="cuda"))


def test_auto_takes_a_gpu_by_its_name_and_a_cpu_by_its_model_next(monkeypatch):
    h100 = load_profile("h100").source.device  # "NVIDIA H100 80GB HBM3, <its host>"
    _pretend_machine(monkeypatch, h100.rsplit(", ", 1)[0] + ", another-host")
    assert chosen_profile(ValidateConfig(profile="auto", device="cuda")).name == "h100"
    xeon = load_profile("cpu-2core-xeon").source.device
    _pretend_machine(monkeypatch, xeon.replace("torch 1 threads", "torch 2 threads"))
    assert chosen_profile(ValidateConfig(profile="auto")).name == "cpu-2core-xeon"
    amd = load_profile("cpu-2core").source.device  # measured before the table form
    _pretend_machine(monkeypatch, amd.replace("native kernel", "native+lut kernel"))
    assert chosen_profile(ValidateConfig(profile="auto")).name == "cpu-2core"
    _pretend_machine(monkeypatch, xeon.replace("2 cores", "4 cores"))
    assert chosen_profile(ValidateConfig(profile="auto")).name == "cpu-2core"  # fallback


def test_auto_reads_the_device_line_under_the_runs_torch_threads(monkeypatch):
    seen = []
    monkeypatch.setattr("d2moe.profiles.measure.device_name",
                        lambda device: seen.append(torch.get_num_threads()) or "x")
    chosen_profile(ValidateConfig(profile="auto", threads=1))
    assert seen == [1]


def test_a_named_profile_is_loaded_and_measure_is_left_to_the_run():
    assert chosen_profile(ValidateConfig(profile="rtx3060-laptop")).name == "rtx3060-laptop"
    assert chosen_profile(ValidateConfig(profile="measure")) is None
    with pytest.raises(UserError, match="not a shipped profile"):
        chosen_profile(ValidateConfig(profile="no-such-profile"))


def test_a_measured_profile_of_another_machine_is_named_in_the_report():
    shipped = load_profile("cpu-2core")
    here = dataclasses.replace(shipped, source=dataclasses.replace(
        shipped.source, device=device_name(torch.device("cpu"))))
    assert other_machine_line(here, "cpu") is None
    away = dataclasses.replace(shipped, source=dataclasses.replace(
        shipped.source, device="Some CPU (family 1, model 1), 64 cores, torch 1 threads"))
    line = other_machine_line(away, "cpu")
    assert line.startswith("the profile was measured on Some CPU (family 1, model 1)")
    assert device_name(torch.device("cpu")) in line and "--profile measure" in line
    assert other_machine_line(load_profile("rtx3060-laptop"), "cpu") is None  # estimated
