"""benchmarks/gpu_session.sh, which only a lent GPU runs: every option it passes exists, and
every phase fits one 10-minute device call."""

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
    """Lines per `case` branch (kernels, fidelity, ...)."""
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


def _unrolled(lines: list[str]) -> list[str]:
    """`lines` with each `for V in A B; do` ... `done` loop written out once per word, `$V`
    replaced by it (as the loop runs them)."""
    out: list[str] = []
    loop: tuple[str, list[str]] | None = None
    body: list[str] = []
    for line in lines:
        head = re.match(r"\s*for (\w+) in ([^;]*); do\b", line)
        if head:
            loop, body = (head.group(1), head.group(2).split()), []
            continue
        if loop is None:
            out.append(line)
            continue
        body.append(line)
        if line.strip() == "done" or line.rstrip().endswith("; done"):
            var, words = loop
            out += [re.sub(r"\$\{?" + var + r"\b\}?", w, b) for w in words for b in body]
            loop = None
    return out


def _limits(lines: list[str]) -> list[int]:
    """The `timeout N` limits of `lines`, each as often as it runs."""
    return [int(n) for line in _unrolled(lines) for n in re.findall(r"timeout (\d+)", line)]


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
sys.path.insert(0, "benchmarks")  # as `python benchmarks/x.py` has it: its siblings import
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
    assert set(phases) == {"kernels", "fidelity", "mixtral", "followups"}
    usage = next(line for line in _commands() if "usage: gpu_session.sh" in line)
    assert "kernels|fidelity|mixtral|followups" in usage
    device = [int(n) for line in _commands() if "--query-gpu" in line or "$D2MOE env" in line
              or "import simpy" in line for n in re.findall(r"timeout (\d+)", line)]
    assert len(device) == 3  # the device lines every phase runs first are limited too
    for name, lines in phases.items():
        limits = _limits(lines)
        assert limits and sum(device) + sum(limits) < CALL_LIMIT_S, (name, device, limits)
    assert _unrolled(["for m in a b; do  # c", "x $m", "y ${m}; done", "z $m"]) == [
        "x a", "y a; done", "x b", "y b; done", "z $m"]
    for name, lines in phases.items():  # a call brings back at most 8 files from $OUT
        outs = {m for line in _unrolled(lines) for m in re.findall(r'\$OUT/([\w.-]+)', line)}
        folders = re.findall(r'--out "\$OUT/[\w-]+"', " ".join(lines))  # no extension
        assert not folders, (name, folders)  # a whole folder of results: too many files
        assert 0 < len(outs) + 1 <= 8, (name, sorted(outs))  # + device.txt
    for line in _commands():  # the pytest marker it selects is declared
        if "-m gpu" in line:
            assert '"gpu:' in (ROOT / "pyproject.toml").read_text()
    scripts = {m for line in _commands() for m in re.findall(r"benchmarks/\w+\.py", line)}
    assert scripts and all((ROOT / s).is_file() for s in scripts)
