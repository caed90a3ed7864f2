"""The research scripts load as `python research/<name>.py` runs them (their directory first on sys.path,
not the repository root): two imported `benchmarks`, which is not installed, and failed before any work."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_EACH = """
import runpy, sys
from pathlib import Path
failed = []
for path in sorted(Path("research").glob("*.py")):
    sys.path[0] = str(path.parent.resolve())  # as the interpreter sets it for a script
    try:
        runpy.run_path(str(path), run_name="not_main")  # imports and definitions, not main()
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
print("\\n".join(failed) or "ok")
"""


def test_every_research_script_loads_as_a_script():
    out = subprocess.run([sys.executable, "-c", LOAD_EACH], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-2000:]


def test_memory_scale_without_the_write_stage_keeps_the_trace_sets_it_reads(tmp_path, monkeypatch):
    """A run of the later stages on an earlier run's kept sets deleted them (and their logs) at its end."""
    from benchmarks import memory_scale

    monkeypatch.setattr(memory_scale, "run_stage", lambda name, cmd, log: {"stage": name, "peak_rss_mb": 1.0,
                                                                            "peak_anon_mb": 1.0, "seconds": 0.0, "rc": 0,
                                                                            "command": " ".join(cmd)})
    kept = tmp_path / "memory_scale-20000" / "traces"
    kept.mkdir(parents=True)
    (kept / "trace_meta.json").write_text("{}")
    assert memory_scale.main(["--tokens", "2e4", "--out", str(tmp_path), "--stages", "stats"]) == 0
    assert (kept / "trace_meta.json").exists()


def test_benchmark_commands_refuse_bad_counts_and_devices_by_name(capsys):
    """A count of 0 gave a traceback, inf or nan figures; a device this machine lacks, a traceback."""
    import pytest
    import torch

    from benchmarks import cpu_expert, predictor_cost, predictor_step

    cases = [(cpu_expert.main, ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
             (cpu_expert.main, ["--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
             (predictor_cost.main, ["--predictor", "p", "--traces", "t", "--tokens", "0"], "argument --tokens: must be >= 1"),
             (predictor_step.main, ["--predictor", "p", "--device", "bogus"], "--device=bogus: not a device")]
    if not torch.cuda.is_available():
        cases.append((predictor_cost.main, ["--predictor", "p", "--traces", "t", "--device", "cuda"],
                      "--device=cuda requested but torch sees no CUDA device"))
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_memory_scale_leaves_a_folder_it_did_not_make(tmp_path, monkeypatch):
    """With the write stage too, a memory_scale-<N> folder already under --out (an earlier --keep run's, with
    the user's notes in it) was deleted first."""
    from benchmarks import memory_scale

    monkeypatch.setattr(memory_scale, "run_stage", lambda name, cmd, log: {"stage": name, "peak_rss_mb": 1.0,
                                                                            "peak_anon_mb": 1.0, "seconds": 0.0, "rc": 0,
                                                                            "command": " ".join(cmd)})
    work = tmp_path / "memory_scale-2000"
    work.mkdir()
    (work / "my_notes.txt").write_text("keep me")
    for keep in ([], ["--keep"]):
        assert memory_scale.main(["--tokens", "2000", "--out", str(tmp_path), "--stages", "write", *keep]) == 0
        assert (work / "my_notes.txt").read_text() == "keep me"
    assert memory_scale.main(["--tokens", "4000", "--out", str(tmp_path), "--stages", "write"]) == 0
    assert not (tmp_path / "memory_scale-4000").exists()  # what it made itself, without --keep, it removes
