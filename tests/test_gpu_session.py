"""benchmarks/gpu_session.sh, which only a lent GPU runs: every option it passes exists, and
the phases that must fit one 10-minute device call do."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
CALL_LIMIT_S = 600  # one device call (the device tool's per-command limit)


def _commands() -> list[str]:
    """The script's lines with continuations joined."""
    return SCRIPT.read_text().replace("\\\n", " ").splitlines()


def _phases() -> dict[str, list[str]]:
    """Lines per `case` branch (kernels, fidelity, mixtral)."""
    phases: dict[str, list[str]] = {}
    name = None
    for line in _commands():
        head = re.match(r"^(\w+)\)$", line.strip())
        if head:
            name = head.group(1)
            phases[name] = []
        elif name is not None:
            phases[name].append(line)
            if line.strip() == ";;":
                name = None
    return phases


def _options(line: str, after: str) -> list[str]:
    """The `--options` of the command that starts at `after` on `line`, up to a pipe or a
    redirection."""
    rest = line.split(after, 1)[1]
    rest = re.split(r"\s(?:\||>|2>)", rest)[0]
    return sorted({tok.split("=")[0] for tok in rest.split() if tok.startswith("--")})


def _helps(targets: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Each target's --help text, from one interpreter (torch imported once): a target is
    (name, argv) run as `__main__` (a benchmark script) or through `d2moe.cli.main`."""
    code = """
import io, runpy, sys, contextlib, json
out = {}
for name, argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            if name.endswith('.py'):
                sys.argv = [name, *argv]
                runpy.run_path(name, run_name='__main__')
            else:
                from d2moe.cli import main
                main(argv)
        except SystemExit:
            pass
    out[name + ' ' + ' '.join(argv)] = buf.getvalue()
print(json.dumps(out))
"""
    import json

    done = subprocess.run([sys.executable, "-c", code, json.dumps(targets)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_option_the_gpu_script_passes_exists() -> None:
    pytest.importorskip("torch")
    uses: list[tuple[str, list[str], list[str]]] = []  # (target, help argv, options)
    for line in _commands():
        for m in re.finditer(r"\$PY (benchmarks/\w+\.py)", line):
            uses.append((m.group(1), ["--help"], _options(line, m.group(0))))
        for m in re.finditer(r"\$D2MOE (\w+)", line):
            uses.append((m.group(1), [m.group(1), "--help"], _options(line, m.group(0))))
    assert {u[0] for u in uses} >= {"benchmarks/kernels.py", "benchmarks/fidelity.py",
                                    "profile", "validate"}  # the parse found them
    helps = _helps(sorted({(t, tuple(a)) for t, a, _ in uses}))
    for target, argv, options in uses:
        text = helps[target + " " + " ".join(argv)]
        assert "usage:" in text, (target, text[-300:])
        missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text)]
        assert not missing, f"{target}: {missing} not in its --help"


def test_the_phases_fit_a_device_call_and_name_only_what_exists() -> None:
    phases = _phases()
    assert set(phases) == {"kernels", "fidelity", "mixtral"}
    usage = next(line for line in _commands() if "usage: gpu_session.sh" in line)
    assert "kernels|fidelity|mixtral" in usage
    device = [int(n) for line in _commands() if "--query-gpu" in line or "import torch" in line
              or "import simpy" in line for n in re.findall(r"timeout (\d+)", line)]
    assert len(device) == 3  # the device lines every phase runs first are limited too
    for name in ("fidelity", "mixtral"):  # the kernels phase is ordered by priority instead
        limits = [int(n) for line in phases[name] for n in re.findall(r"timeout (\d+)", line)]
        assert limits and sum(device) + sum(limits) < CALL_LIMIT_S, (name, device, limits)
    for name, lines in phases.items():  # a call brings back at most 8 files from $OUT
        outs = {m for line in lines for m in re.findall(r'\$OUT/([\w.-]+)', line)}
        outs |= {f"fidelity-mixtral-{f}" for line in lines if "for f in" in line
                 for f in line.split(" in ", 1)[1].split(";")[0].split()}
        folders = re.findall(r'--out "\$OUT/[\w-]+"', " ".join(lines))  # no extension
        assert not folders, (name, folders)  # a whole folder of results: too many files
        assert 0 < len(outs) + 1 <= 8, (name, sorted(outs))  # + device.txt
    for line in _commands():  # the pytest marker it selects is declared
        if "-m gpu" in line:
            assert '"gpu:' in (ROOT / "pyproject.toml").read_text()
    scripts = {m for line in _commands() for m in re.findall(r"benchmarks/\w+\.py", line)}
    assert scripts and all((ROOT / s).is_file() for s in scripts)
