import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# No network, no wandb account, no tokenizer thread pools fighting pytest for the 2 cores.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def gqa_llama(*, mlp_bias: bool = False, attention: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A seeded tiny Llama with grouped-query attention (4 heads, 2 K/V heads), as in SmolLM2; its
    vocabulary (300) covers the tiny byte tokenizer's 259 ids."""
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
        tie_word_embeddings=True,
        attn_implementation=attention,
    )
    return _seeded(LlamaForCausalLM, config, seed)


def tiny_gpt2(*, attention: str = "sdpa", seed: int = 0) -> GPT2LMHeadModel:
    """A seeded tiny GPT-2 (learned absolute positions) without dropout, so train-mode forwards are
    deterministic; vocabulary 300, as `gqa_llama`."""
    config = GPT2Config(
        vocab_size=300,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attention,
    )
    return _seeded(GPT2LMHeadModel, config, seed)


def _seeded(model_class, config, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config).float()


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
