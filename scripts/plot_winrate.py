"""Win rate vs sampling temperature of one or more `dpo-run winrate` runs on one figure.

    python scripts/plot_winrate.py outputs/default/winrate --out figures --title "TL;DR: DPO vs SFT"

Each DIR may be a run dir or any parent: every winrate.csv below it is read; one line per checkpoint.
"""

import sys

from dpo_cli.stages.winrate import main

if __name__ == "__main__":
    sys.exit(main())
