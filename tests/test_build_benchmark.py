"""Smoke test: the build benchmark runs end to end in --quick mode, and its JSON holds what the tables claim."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_build_quick(tmp_path):
    out = tmp_path / "build.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "build.py"), "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| " in proc.stdout and "Machine:" in proc.stdout and "Projection, not a measurement" in proc.stdout
    result = json.loads(out.read_text())
    s, results = result["settings"], result["results"]
    assert set(results) == {"ceiling", "reencode", "copy"} and s["workers"] == [1, 2]
    for mode, by_workers in results.items():
        assert set(by_workers) == {"1", "2"}, mode
        for w, r in by_workers.items():
            for k in ("videos_per_s", "videos_per_s_per_worker", "video_seconds_per_s", "cpu_s_per_video"):
                assert positive(r[k]), (mode, w, k, r[k])
            assert math.isclose(r["videos_per_s_per_worker"] * int(w), r["videos_per_s"])
            if mode != "ceiling":
                assert positive(r["vs_ceiling"]["median"]) and positive(r["cpu_vs_ceiling"]["median"]), (mode, w)
    # the build re-encoded to 3 fps, with as many frames as the plain loop, and copied the sources as they are
    for w in ("1", "2"):
        assert results["reencode"][w]["fps"] == [3.0] and results["copy"][w]["fps"] == [s["source_fps"]]
        assert results["reencode"][w]["frames"] == results["ceiling"][w]["frames"] == s["videos"] * s["seconds"] * 3
    assert results["copy"]["1"]["sizes"] == [f"{s['width']}x{s['height']}"]
    assert len(result["runs"]) == 3 * 2 * s["repeats"]
    proj = result["projection"]
    assert proj["kind"].startswith("projection") and [r["nodes"] for r in proj["rows"]] == [1, 8, 32, 128]
    days = [r["reencode_days"] for r in proj["rows"]]
    assert all(map(positive, days)) and days == sorted(days, reverse=True)
    assert math.isclose(days[0], 8 * days[1]) and math.isclose(proj["rows"][0]["reencode_720p_days"], 4 * days[0])
