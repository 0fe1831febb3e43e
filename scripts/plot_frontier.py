"""Reward vs KL frontier of one or more sweeps on one figure (writes frontier.csv and frontier.png).

    python scripts/plot_frontier.py outputs/default/dpo/multirun-* --out figures --title "DPO vs unlikelihood"

Each DIR may be a run dir, a sweep dir or any parent: every metrics.jsonl below it is read.
"""

import sys

from dpo_cli.frontier import main

if __name__ == "__main__":
    sys.exit(main())
