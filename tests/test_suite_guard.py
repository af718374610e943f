"""The suite refuses to start on a disk too full for its checkpoints, with a message that says so, instead of
failing dozens of saves half an hour in (what a CI machine with 2.5 GiB free did at b417bcf)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_suite_stops_at_once_when_the_disk_is_too_full():
    env = dict(os.environ, LONGVL_TEST_DISK_GIB="1e9")  # more than any disk has free
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                          "-c", str(REPO / "pytest.ini"), "--confcutdir", str(REPO / "tests"),
                          str(REPO / "tests" / "test_suite_guard.py"), "-k", "nothing_matches_this"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "GiB free under" in out.stdout + out.stderr and "the suite needs about 1e+09 GiB" in out.stdout + out.stderr
