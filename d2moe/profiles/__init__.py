"""Hardware profiles: schema, strict YAML loading and the cost model the simulator calls, and
`d2moe profile`, which measures this machine through the executor's own code."""

from d2moe.profiles.files import load_profile, save_profile, shipped_profile_of, shipped_profiles
from d2moe.profiles.schema import Profile

__all__ = ["Profile", "load_profile", "save_profile", "shipped_profile_of", "shipped_profiles"]
