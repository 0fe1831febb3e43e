"""Write the prompts of a dataset as a JSONL of {"prompt", "split"}: the input of `dpo-run prefs`.

    python scripts/write_prompts.py imdb_prompts.jsonl experiment=imdb_paper
    python scripts/write_prompts.py imdb_prompts.jsonl data=imdb data.path=/data/imdb data.max_records=25000

The arguments after the output path are `dpo-run` overrides; the data config they compose is read by its
adapter (the paper's IMDb setup: 2-8 word review prefixes), held-out prompts get "split": "test".
"""

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from dpo_cli.config import conf_dir
from dpo_cli.data import load_splits
from dpo_cli.errors import ConfigError


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print(__doc__)
        return 2
    out, overrides = Path(argv[0]), argv[1:]
    if out.exists():
        print(f"write_prompts: {out} exists; move it away or choose another path", file=sys.stderr)
        return 2
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "stage=prefs"])
    try:
        train, held_out = load_splits(cfg.data)
    except ConfigError as err:
        print(f"write_prompts: error: {err}", file=sys.stderr)
        return 2
    rows = {r["prompt"]: "train" for r in train} | {r["prompt"]: "test" for r in held_out}
    out.write_text("".join(json.dumps({"prompt": p, "split": s}) + "\n" for p, s in rows.items()))
    print(f"write_prompts: wrote {len(rows)} prompts of data={cfg.data.name} to {out}")
    print(f"next: dpo-run prefs {' '.join(overrides)} sft_checkpoint=SFT_FINAL prefs.prompts_path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
