"""Peak RSS of each process a command starts (VmHWM from /proc, sampled every 0.2 s until it exits), e.g.
of each DeepSpeed rank of a `dpo-run` that launches them:

    python scripts/peak_rss_per_rank.py -- dpo-run dpo trainer=zero3 trainer.num_processes=2 ...
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1 :]
    process = subprocess.Popen(command)
    peaks: dict[int, tuple[int, str]] = {}
    while process.poll() is None:
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                hwm = int(status.split("VmHWM:")[1].split()[0])  # KiB
                peaks[child.pid] = (
                    max(hwm, peaks.get(child.pid, (0, ""))[0]),
                    " ".join(child.cmdline())[:60],
                )
            except (OSError, IndexError, psutil.Error):
                pass
        time.sleep(0.2)
    for pid, (hwm, cmdline) in sorted(peaks.items()):
        print(f"peak_rss pid {pid}: {hwm / 1024:.0f} MiB  {cmdline}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
