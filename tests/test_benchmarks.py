"""Every script in benchmarks/ still imports and parses its options (`--help`): they run
rarely, by hand or on a lent GPU, so a rename in the package would otherwise break one
silently until then. What they measure is not asserted (timings never are)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "benchmarks"


def _scripts() -> list[Path]:
    """The runnable scripts (not the shared harness modules: no `__main__` block)."""
    return sorted(p for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text())


def test_every_benchmark_script_parses_its_options() -> None:
    pytest.importorskip("torch")
    code = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])  # as `python benchmarks/x.py` has it: its siblings import
out = {}
for path in json.loads(sys.argv[2]):
    buf = io.StringIO()
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(path, run_name="__main__")
        out[path] = "finished without parsing --help"
    except SystemExit as exc:
        out[path] = "ok" if exc.code in (0, None) and "usage:" in buf.getvalue() else \\
            f"exit {exc.code}: {buf.getvalue()[-300:]}"
    except Exception as exc:
        out[path] = repr(exc)[:300]
print(json.dumps(out))
"""
    scripts = [str(p) for p in _scripts()]
    assert len(scripts) >= 25  # the glob found them
    done = subprocess.run([sys.executable, "-c", code, str(BENCH), json.dumps(scripts)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    broken = {Path(k).name: v for k, v in result.items() if v != "ok"}
    assert not broken, broken


def test_hf_e2e_runs_its_whole_path_at_tiny_shapes(tmp_path: Path) -> None:
    """The HF-checkpoint benchmark end to end at small shapes: its writer makes a checkpoint
    that `quantize` and `run` take (a safetensors upgrade broke the writer once, unseen
    until the next time it ran), and every budget decodes the same text."""
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    done = subprocess.run(
        [sys.executable, str(BENCH / "hf_e2e.py"), "--model-spec", "tiny", "--layers", "1",
         "--budgets", "50%,100%", "--tokens", "3", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same text at every budget: yes" in done.stdout
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) == 2  # head + one layer


def test_residency_benchmark_compares_every_policy_with_fifo(tmp_path: Path) -> None:
    """The residency benchmark at its smallest: one spec, budget and locality; its summary
    names each compared policy with a ratio to FIFO from the same run."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "residency.py"), "--specs", "tiny:cpu-2core",
         "--budgets", "50%", "--localities", "0.3", "--decode-steps", "16", "--no-tiny"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout.split("per policy over 1 cells (x fifo):")[1]
    for name in ("hebf-lru", "hebf", "hebf-recent", "hebf-adaptive", "hebf-ghost"):
        assert f"  {name} " in summary


def test_plan_cost_benchmark_times_each_policy_against_fifo(tmp_path: Path) -> None:
    """plan_cost.py at its smallest: a row per policy, FIFO's ratio exactly 1 and every
    time positive (measured, not written in)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "plan_cost.py"), "--policies", "hebf,hebf-ghost",
         "--specs", "tiny:cpu-2core:50%", "--repeats", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r[1]: r for r in (line.split() for line in done.stdout.splitlines())
            if r and r[0] == "tiny"}
    assert set(rows) == {"fifo", "hebf", "hebf-ghost"}
    assert rows["fifo"][4] == "1.00" and all(float(r[2]) > 0 for r in rows.values())


@pytest.mark.parametrize("script", ["executor.py", "executor_mixtral.py", "fidelity.py",
                                    "load_checksum.py", "read_buffers.py"])
def test_device_cuda_without_cuda_stops_in_one_line(script: str) -> None:
    """A benchmark asked for --device cuda on a machine without one says so in one line
    (no argparse usage block before it) and writes nothing."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the CPU-only refusal")
    done = subprocess.run([sys.executable, str(BENCH / script), "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout, done.stdout[-500:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"{script} --device cuda: torch sees no CUDA device (fix: --device cpu)")
    assert "usage:" not in done.stderr


def test_kernel_gpu_commands_stop_in_one_line_without_cuda(tmp_path: Path) -> None:
    """kernels.py's CUDA-only options and kernels_gpu.sh stop with one line on a machine
    without CUDA: the CPU path ignored `--check`, `--tune` and `--jobs`, so gpu_session.sh's
    kernel steps timed the CPU into the GPU tables' files (and its launch sweep ran out its
    time limit) without a word."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the CPU-only refusal")
    out = tmp_path / "k.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "kernels.py"), "--check", "--tune", "--jobs", "2",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and not out.exists(), done.stdout[-500:]
    # the last line (a driver without a GPU may make torch warn on stderr first)
    assert done.stderr.strip().splitlines()[-1] == (
        "kernels.py --check --tune --jobs 2: CUDA only, and torch sees no CUDA device (the CPU "
        "figures: run it without them)")
    assert "Traceback" not in done.stderr
    done = subprocess.run(["bash", str(BENCH / "kernels_gpu.sh")], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "g")})
    assert done.returncode == 1 and not done.stdout, done.stdout[-500:]
    assert "kernels_gpu.sh needs CUDA" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "g").iterdir())  # no device.txt, no bench.json
