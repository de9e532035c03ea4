"""Which hardware profile `d2moe validate` simulates with: a named or shipped one, the one
shipped for a machine like this (`auto`), or one measured during the run (`measure`), and
the report's line when a measured profile is of another machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2moe.core.errors import UserError

if TYPE_CHECKING:
    from d2moe.executor.validate import ValidateConfig
    from d2moe.profiles.schema import Profile

MEASURE = "measure"  # --profile value: measure this machine in this invocation
AUTO = "auto"  # --profile value: the shipped profile of a machine like this one
FALLBACK_PROFILE = "cpu-2core"


def chosen_profile(cfg: ValidateConfig) -> Profile | None:
    """--profile as the simulator gets it: None for `measure` (measured during the run);
    for `auto`, the shipped profile measured on a machine whose device line reads as this
    one's (`shipped_profile_of`: a GPU by its name; a CPU of the same model with other
    threads or kernel next), else cpu-2core (the report then names both machines), or on
    a GPU an error."""
    import torch

    from d2moe.profiles import load_profile, shipped_profile_of
    from d2moe.profiles.measure import device_name, torch_threads

    if cfg.profile != AUTO:
        return None if cfg.profile == MEASURE else load_profile(cfg.profile)
    with torch_threads(cfg.threads):  # (the device line holds the run's torch threads)
        here = device_name(torch.device(cfg.device))
    name = shipped_profile_of(here, cuda=cfg.device.startswith("cuda"))
    if name is None and cfg.device.startswith("cuda"):
        raise UserError(f"no shipped profile was measured on this GPU ({here})",
                        field="profile", fix="pass --profile measure, or a profile YAML "
                                             "from `d2moe profile --device cuda`")
    return load_profile(name or FALLBACK_PROFILE)


def other_machine_line(profile: Profile, device: str) -> str | None:
    """A report line for a measured profile of another machine than the run's (its
    recorded device name against this one's, same torch threads); None when they match or
    the profile is estimated (its `basis` names what it stands for)."""
    import torch

    from d2moe.profiles.measure import device_name

    src = profile.source
    here = device_name(torch.device(device))
    if src.kind != "measured" or src.device == here:
        return None
    return (f"the profile was measured on {src.device} ({src.date}), this run on {here}: the "
            "error holds the difference between the two machines; `--profile measure` "
            "profiles this one")
