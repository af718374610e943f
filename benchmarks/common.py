"""Shared by the benchmarks: the machine description, the load seen, JSON output and Markdown tables."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def meminfo_gib(key: str) -> float:
    """A /proc/meminfo field (MemTotal, MemAvailable) in GiB; NaN where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "mem_total_gib": round(meminfo_gib("MemTotal"), 1),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def load() -> dict:
    """What else the machine was doing: 1/5/15-minute load averages and available memory, now."""
    one, five, fifteen = os.getloadavg()
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": [round(one, 2), round(five, 2), round(fifteen, 2)],
            "mem_available_gib": round(meminfo_gib("MemAvailable"), 1)}


def describe(info: dict, before: dict, after: dict) -> str:
    return (f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['mem_total_gib']} GiB; "
            f"Python {info['python']}, torch {info['torch']}. Load average (1/5/15 min) "
            f"{'/'.join(map(str, before['loadavg']))} at the start, {'/'.join(map(str, after['loadavg']))} at the end; "
            f"{before['mem_available_gib']} GiB available at the start.")


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def default_out(name: str) -> str:
    return str(REPO / "runs" / "bench" / f"{name}.json")  # runs/ is git-ignored


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
