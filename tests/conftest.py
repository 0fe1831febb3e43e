import json
import os
from pathlib import Path

import pytest

# No network, no wandb account, no tokenizer thread pools fighting pytest for the 2 cores.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pair_file(tmp_path: Path) -> Path:
    rows = [
        {"prompt": f"Review {i}:", "chosen": " great fun, loved it", "rejected": " dull and bad"}
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def ranked_file(tmp_path: Path) -> Path:
    rows = [
        {"prompt": f"Film {i} was", "responses": [" bad", " superb", " fine"], "ranking": [1, 2, 0]}
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "ranked.jsonl", rows)


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q{i}:", "completion": " an answer"} for i in range(40)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)
