"""`d2moe experts` registers and the trace path runs without importing torch."""

from __future__ import annotations

import subprocess
import sys


def test_experts_package_and_command_never_import_torch(tmp_path):
    code = ("import sys\nimport d2moe.experts, d2moe.experts.cmd\n"
            "from d2moe.cli import build_parser\n"
            "args = build_parser().parse_args(['experts', 'stats', '--trace', 'x.npz'])\n"
            "assert args.trace == 'x.npz'\n"
            "print(','.join(m for m in ('torch', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == []
