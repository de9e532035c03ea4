"""The simulator side imports without torch, and importing d2moe has no side effects."""

from __future__ import annotations

import subprocess
import sys

SIM_SIDE = ("d2moe", "d2moe.cli", "d2moe.core", "d2moe.policies", "d2moe.sim", "d2moe.sim.cmd",
            "d2moe.traces", "d2moe.profiles", "d2moe.analysis", "d2moe.quant", "d2moe.kernels",
            "d2moe.eval", "d2moe.demo", "d2moe.quant.source", "d2moe.model.hf_names",
            "d2moe.router.store")


def test_simulator_side_never_imports_torch_or_matplotlib(tmp_path):
    code = ("import sys\n" + "".join(f"import {m}\n" for m in SIM_SIDE)
            + "from d2moe.cli import build_parser\nbuild_parser()\n"
            + "bad = [m for m in ('torch', 'triton', 'matplotlib') if m in sys.modules]\n"
            + "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == []  # nothing written by importing
