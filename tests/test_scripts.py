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
