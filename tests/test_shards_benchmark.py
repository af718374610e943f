"""Smoke test: the loader benchmark runs end to end in its --quick mode and prints its table."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader.py"), "--quick", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [line.strip("| ").split(" | ", 1) for line in proc.stdout.splitlines() if line.startswith("|")]
    rows = {k.strip(): v.strip(" |") for k, v in cells}
    assert float(rows["ratio loader / ceiling"]) > 0 and "samples/s" in rows["loader, 1 worker"]
    assert any(k.startswith("long video") and "full decode" in v for k, v in rows.items())
