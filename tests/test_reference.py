"""Performance paths that must not change the math: precomputed (cached) reference log-probs, scoring
shared completions once, and the chunked LM-head log-probs."""

import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dpo_cli.cli import main
from dpo_cli.config import LossConfig, ModelConfig
from dpo_cli.data.batches import TokenizedExample, collate, shared_prompt_layout, tokenize_examples
from dpo_cli.logging import read_metrics
from dpo_cli.logps import model_token_logps, shares_prompts, token_logps
from dpo_cli.models import load_model
from dpo_cli.objective import make_objective
from dpo_cli.reference import (
    cache_dir_for,
    checkpoint_fingerprint,
    precomputed_table,
    score_sequences,
    unique_sequences,
)
from tests.conftest import gqa_llama, tiny_gpt2


def tiny_model(seed: int = 0):
    return load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, tokenizer = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "final"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _examples(tokenizer, max_length_tokens: int = 64) -> list[TokenizedExample]:
    # 4 completions per prompt and all 6 pairs of each: the paper's sentiment layout.
    completions = [" good", " bad film", " great, loved it", " dull"]
    examples = [
        (f"Film {p} was", [completions[i], completions[j]])
        for p in range(3)
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    return tokenize_examples(
        examples, tokenizer, max_prompt_length_tokens=32, max_length_tokens=max_length_tokens
    )


def test_chunked_head_logps_equal_full_logits_and_gradients():
    model, _ = tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100  # a shorter row: right padding
    attention = (labels != -100) | (torch.arange(12) < 5)
    batch = {"input_ids": ids, "attention_mask": attention.long(), "labels": labels}

    full, full_mask = token_logps(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, labels)
    # Blocks of 5 positions: 5 does not divide the 24 label tokens.
    chunk_bytes = 5 * 4 * model.get_output_embeddings().out_features
    chunked, chunked_mask = model_token_logps(model, batch, chunk_bytes=chunk_bytes)
    assert torch.equal(full_mask, chunked_mask)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    params = list(model.parameters())
    full_grads, chunked_grads = (
        torch.autograd.grad(full.sum(), params),
        torch.autograd.grad(chunked.sum(), params),
    )
    for a, b in zip(full_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_completions_give_the_plain_pairwise_loss_and_gradients():
    """Scoring each unique completion once and gathering pairs by index (paper App. B) is exact: same loss
    and gradients as putting every pair's two sequences through the model."""
    model, tokenizer = tiny_model()
    examples = _examples(tokenizer)
    shared = collate(examples, tokenizer.pad_token_id)
    assert len(shared["input_ids"]) == 12  # 3 prompts x 4 completions, for 18 pairs
    plain_rows = [TokenizedExample(ex.prompt_ids, (c,)) for ex in examples for c in ex.completion_ids]
    width = max(len(r.prompt_ids) + len(r.completion_ids[0]) for r in plain_rows)
    # Every pair's two sequences, one row each, no de-duplication.
    plain = {k: [] for k in ("input_ids", "attention_mask", "labels")}
    for r in plain_rows:
        one = collate([r], tokenizer.pad_token_id)
        pad = width - one["input_ids"].shape[1]
        plain["input_ids"].append(torch.nn.functional.pad(one["input_ids"], (0, pad), value=0))
        plain["attention_mask"].append(torch.nn.functional.pad(one["attention_mask"], (0, pad), value=0))
        plain["labels"].append(torch.nn.functional.pad(one["labels"], (0, pad), value=-100))
    plain = {k: torch.cat(v) for k, v in plain.items()}
    plain["index"] = torch.arange(len(plain_rows)).view(-1, 2)
    plain["index_mask"] = torch.ones_like(plain["index"], dtype=torch.bool)

    reference, _ = tiny_model(seed=1)
    loss_fn = make_objective(OmegaConf.structured(LossConfig(name="dpo")), 0.5, reference.eval())
    params = list(model.parameters())
    shared_loss, shared_metrics = loss_fn(model, shared)
    plain_loss, plain_metrics = loss_fn(model, plain)
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-6, rtol=0)
    shared_grads, plain_grads = (
        torch.autograd.grad(shared_loss, params),
        torch.autograd.grad(plain_loss, params),
    )
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # 12 sequences through each of policy and reference for 18 pairs, against 4 per pair.
    assert shared_metrics["forward_sequences_per_pair"] == pytest.approx(24 / 18)
    assert plain_metrics["forward_sequences_per_pair"] == 4


def test_shared_prompt_layout_by_hand():
    """Two prompts: (1, 2) with completions (3, 4) and (5,), and (7,) with (8, 9); pad id 0."""
    sequences = [((1, 2), (3, 4)), ((1, 2), (5,)), ((7,), (8, 9))]
    layout = shared_prompt_layout(sequences, pad_token_id=0)
    assert layout["shared_input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    # Each completion's positions go on from its prompt's end, as in its own prompt + completion row.
    assert layout["shared_position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    assert layout["prompt_attention"].shape == (2, 1, 5, 5)
    assert layout["prompt_attention"][:, 0].int().tolist() == [
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]],
        # Padding queries see the prompt and themselves; no query sees padding or another completion.
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]],
    ]
    # Label tokens in sequence order: 3 and 4 (from flat positions 1 and 2), 5 (from the prompt's
    # last token, 1), 8 (from 7 at row 1: 5 + 0) and 9 (from 8: 5 + 1).
    assert layout["label_source"].tolist() == [1, 2, 1, 5, 6]


@pytest.mark.parametrize(
    "architecture, attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]
)
def test_shared_prompts_give_the_separate_rows_loss_and_gradients(architecture, attention):
    """Each prompt once with its completions after it (a 4-D mask) is exact: the loss and gradients of
    separate prompt + completion rows, for fewer tokens through the model. Llama: rotary positions and
    grouped-query attention, as in SmolLM2; GPT-2: learned positions."""
    _, tokenizer = tiny_model()
    if architecture == "llama":
        model, reference = gqa_llama(attention=attention), gqa_llama(attention=attention, seed=1)
    else:
        model, reference = tiny_gpt2(attention=attention), tiny_gpt2(attention=attention, seed=1)
    reference.eval()
    assert model.config._attn_implementation == attention
    examples = _examples(tokenizer)
    separate = collate(examples, tokenizer.pad_token_id)
    shared = collate(examples, tokenizer.pad_token_id, share_prompts=True)
    assert separate.keys() <= shared.keys()
    assert len(shared["shared_input_ids"]) == 3  # one row per prompt
    # The 12 prompt copies (one per unique completion) become 3; the prompts are equally long.
    tokens = int((shared["shared_input_ids"] != tokenizer.pad_token_id).sum())
    assert tokens == int(separate["attention_mask"].sum()) - 9 * len(examples[0].prompt_ids)

    loss_fn = make_objective(OmegaConf.structured(LossConfig(name="dpo")), 0.5, reference)
    params = list(model.parameters())
    shared_loss, shared_metrics = loss_fn(model, shared)
    separate_loss, separate_metrics = loss_fn(model, separate)
    torch.testing.assert_close(shared_loss, separate_loss, atol=1e-6, rtol=0)
    assert shared_metrics == pytest.approx(separate_metrics, abs=1e-6)
    shared_grads, separate_grads = (
        torch.autograd.grad(shared_loss, params),
        torch.autograd.grad(separate_loss, params),
    )
    for a, b in zip(shared_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_shared_prompts_keep_grouped_kv_heads_on_cpu(monkeypatch):
    """With a mask, transformers would copy the 2 K/V heads to 4 and save the copies for backward; on the
    CPU the shared-prompt forward passes them to SDPA as they are (enable_gqa)."""
    _, tokenizer = tiny_model()
    batch = collate(_examples(tokenizer), tokenizer.pad_token_id, share_prompts=True)
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording_sdpa(query, key, value, **kwargs):
        calls.append((key.shape[1], kwargs.get("enable_gqa", False), kwargs["attn_mask"] is not None))
        return sdpa(query, key, value, **kwargs)

    model = gqa_llama()
    assert shares_prompts(model, batch)  # its one-off check runs before the calls are recorded
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model_token_logps(model, batch)
    assert calls == [(2, True, True)] * 2  # both layers
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # set for the forward only


def test_reference_scoring_puts_each_prompt_through_once(monkeypatch):
    """Scoring with shared prompts: a prompt's sequences share a batch, one row per prompt, and the
    log-probs equal scoring each sequence alone."""
    _, tokenizer = tiny_model()
    model, cpu = gqa_llama().eval(), torch.device("cpu")
    sequences = unique_sequences(_examples(tokenizer))  # 3 prompts x 4 completions
    alone = score_sequences(model, sequences, tokenizer.pad_token_id, cpu, batch_size_sequences=1)
    rows = []

    def recording(model, batch):
        rows.append((len(batch["input_ids"]), len(batch["shared_input_ids"])))
        return model_token_logps(model, batch)

    monkeypatch.setattr("dpo_cli.reference.model_token_logps", recording)
    shared = score_sequences(
        model, sequences, tokenizer.pad_token_id, cpu, batch_size_sequences=5, share_prompts=True
    )
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    assert rows == [(8, 2), (4, 1)]  # whole prompts: 2 then 1, each through the model once
    # Nothing to score (a rank whose sequences are all cached while another's are not): no batch.
    assert score_sequences(model, [], tokenizer.pad_token_id, cpu, share_prompts=True).shape == (0,)
    assert len(rows) == 2


def _table(checkpoint: Path, examples, cache_dir: Path, calls: list[int]):
    def load_reference():
        calls.append(1)
        model, _ = load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0, checkpoint=checkpoint)
        return model.eval()

    directory = cache_dir_for(cache_dir, checkpoint_fingerprint(checkpoint), "float32|cpu|single")
    cpu = torch.device("cpu")
    return precomputed_table(load_reference, examples, directory=directory, pad_token_id=0, device=cpu)


def test_reference_cache_hits_and_invalidates(tmp_path, checkpoint):
    _, tokenizer = tiny_model()
    examples = _examples(tokenizer)
    calls: list[int] = []
    table = _table(checkpoint, examples, tmp_path / "cache", calls)
    assert len(calls) == 1 and len(table) == 12
    # The cached values are the reference's log-probs of each sequence.
    model, _ = load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0, checkpoint=checkpoint)
    sequences = unique_sequences(examples)
    expected = score_sequences(model.eval(), sequences, 0, torch.device("cpu"), batch_size_sequences=1)
    torch.testing.assert_close(torch.tensor([table[s] for s in sequences]), expected, atol=1e-5, rtol=0)

    assert _table(checkpoint, examples, tmp_path / "cache", calls) == table
    assert _table(checkpoint, examples[:6], tmp_path / "cache", calls) == {s: table[s] for s in sequences[:4]}
    assert len(calls) == 1  # hits: the reference was not loaded

    # Other tokenization settings (shorter completions) are other sequences: a miss; the cache grows.
    _table(checkpoint, _examples(tokenizer, max_length_tokens=10), tmp_path / "cache", calls)
    assert len(calls) == 2
    [cache] = (tmp_path / "cache").iterdir()
    assert len(list(cache.glob("part-*.pt"))) == 2

    # Another reference checkpoint (same path, new weights): a miss, and new values.
    other, _ = tiny_model(seed=7)
    changed = checkpoint.parent / "changed"
    other.save_pretrained(changed)
    tokenizer.save_pretrained(changed)
    new_table = _table(changed, examples, tmp_path / "cache", calls)
    assert len(calls) == 3
    assert new_table.keys() == table.keys() and new_table != table
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
def test_cached_and_uncached_runs_give_identical_losses(tmp_path, checkpoint):
    common = [
        "model=tiny",
        "logger=none",
        f"sft_checkpoint={checkpoint}",
        f"output_root={tmp_path}",
        "trainer.max_steps=4",
        "trainer.eval_every_steps=2",
        "data.max_eval_examples=16",
        "eval.num_prompts=2",
        "eval.max_new_tokens=4",
        "lr=1e-3",
    ]
    runs = {}
    for name, precompute in (("first", "true"), ("online", "false"), ("cached", "true")):
        main(["dpo", *common, f"ref.precompute={precompute}", f"run_name={name}"])
        runs[name] = tmp_path / "default" / "dpo" / name
    cached, uncached = read_metrics(runs["cached"]), read_metrics(runs["online"])

    # The third run read its reference log-probs and its step-0 frontier point from the cache, and wrote the
    # same metrics and samples as the first, which computed them.
    def untimed(metrics):
        return [{k: v for k, v in m.items() if k != "train/examples_per_second"} for m in metrics]

    assert untimed(read_metrics(runs["first"])) == untimed(cached)
    first_samples = (runs["first"] / "samples.jsonl").read_text()
    assert first_samples == (runs["cached"] / "samples.jsonl").read_text()
    assert len(list((tmp_path / "ref_cache").glob("*/frontier-*.pt"))) == 1
    assert (tmp_path / "ref_cache").is_dir()
    for key in ("train/loss", "eval/loss", "eval/rewards/margins", "eval/kl"):
        a = [m[key] for m in cached if key in m]
        b = [m[key] for m in uncached if key in m]
        assert len(a) == len(b) >= 2
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), key
    assert all(math.isfinite(m["train/loss"]) for m in cached if "train/loss" in m)
    forward = [m["train/forward_sequences_per_pair"] for m in cached if "train/loss" in m]
    online = [m["train/forward_sequences_per_pair"] for m in uncached if "train/loss" in m]
    assert forward == pytest.approx([x / 2 for x in online])


def test_a_damaged_cache_part_is_named_removed_and_scored_again(tmp_path, checkpoint, capsys):
    """Issue 22 (6): a part rewritten with wrong log-probs was used silently (step-0 eval loss 0.891 for
    0.693); a truncated or garbage part was a torch traceback naming no file."""
    _, tokenizer = tiny_model()
    examples = _examples(tokenizer)
    calls: list[int] = []
    table = _table(checkpoint, examples, tmp_path / "cache", calls)
    [part] = (tmp_path / "cache").glob("*/part-*.pt")
    entry = torch.load(part, weights_only=True)
    damages = {
        "wrong values": lambda: torch.save(entry | {"logps": entry["logps"] + 1.0}, part),
        "truncated": lambda: part.write_bytes(part.read_bytes()[:100]),
        "garbage": lambda: part.write_bytes(b"not a torch file"),
    }
    for damage in damages.values():
        damage()
        capsys.readouterr()
        assert _table(checkpoint, examples, tmp_path / "cache", calls) == table
        out = capsys.readouterr().out
        assert f"reference: cache part {part} is damaged" in out and "scored again" in out
    assert len(calls) == 1 + len(damages)  # each damaged part was scored again, the values are right
    assert len(list((tmp_path / "cache").glob("*/part-*.pt"))) == 1
