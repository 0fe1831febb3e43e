"""scripts/gpu_check.sh --dry-run: the GPU check's code path on the CPU (two tiny models, 2 steps), so the
script that runs on a GPU machine is known to work up to the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_reports_each_model_and_side(tmp_path):
    env = os.environ | {"PYTHON": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, text=True,
                         capture_output=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.removeprefix("gpu_check: ") for line in out.stdout.splitlines()]
    assert lines[0] == "device cpu, precision 32-true, attention sdpa"
    reports = [json.loads(line) for line in lines if line.startswith("{")]
    ours = [r for r in reports if r["side"] == "ours"]
    assert [r["size"] for r in ours] == ["tiny-a", "tiny-b"]
    for report in ours:
        assert report["tokens_per_second"] > 0 and 0 < report["mfu"] < 1 and report["peak_memory_gib"] > 0
    assert ours[0]["parameters"] < ours[1]["parameters"]
    trl_lines = [line for line in lines if "trl" in line]
    assert len(trl_lines) == 2  # measured, or skipped where trl is not installed
