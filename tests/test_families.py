"""Every common causal-LM family (issue 18): the scoring path is exact on each, and each trains end to end.

The paper's own models are here: GPT-2 (IMDb), GPT-J (TL;DR) and GPT-NeoX/Pythia (HH), beside today's
Llama, Qwen2, Mistral, Gemma 2/3 and Phi-3, each as a tiny random model of the same sizes.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from dpo_cli.choices import TinyArchitecture
from dpo_cli.cli import main
from dpo_cli.config import ModelConfig
from dpo_cli.data.batches import collate, tokenize_examples
from dpo_cli.logging import read_metrics
from dpo_cli.logps import model_token_logps, sequence_logps, shares_prompts
from dpo_cli.models import load_model

FAMILIES = [a.value for a in TinyArchitecture]


def tiny(family: str):
    return load_model(OmegaConf.structured(ModelConfig(name="tiny", tiny_architecture=family)), seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompts_and_the_chunked_head_equal_a_plain_forward_of_each_sequence(family):
    model, tokenizer = tiny(family)
    examples = tokenize_examples(
        [("A film", [" great fun", " dull"]), ("Another one", [" fine", " bad, bad"])],
        tokenizer,
        max_prompt_length_tokens=16,
        max_length_tokens=32,
    )
    batch = collate(examples, tokenizer.pad_token_id, share_prompts=True)
    assert shares_prompts(model, batch)  # every family here takes the shared-prompt layout exactly
    # A tiny chunk forces the chunked LM head to run in several blocks (where the head is plain linear).
    per_token, mask = model_token_logps(model.eval(), batch, chunk_bytes=4 * len(tokenizer) * 3)
    with torch.no_grad():
        alone = []
        for row in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][row].sum())
            logits = model(input_ids=batch["input_ids"][row : row + 1, :n]).logits
            alone.append(sequence_logps(logits, batch["labels"][row : row + 1, :n])[0])
    torch.testing.assert_close((per_token * mask).sum(-1), torch.stack(alone), atol=1e-5, rtol=0)


def test_dropout_is_off_so_train_mode_forwards_agree():
    model, tokenizer = tiny("gpt2")  # GPT-2's config has 0.1 dropout in three places
    ids = torch.tensor([tokenizer("Same input, same output")["input_ids"]])
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_a_model_that_would_score_the_layout_wrongly_falls_back_and_says_so(capsys):
    model, tokenizer = tiny("llama")
    decoder = model.model
    original = decoder.forward

    def causal_only(*args, attention_mask=None, **kwargs):  # a family that builds its own causal mask
        return original(*args, **kwargs)

    decoder.forward = causal_only
    examples = tokenize_examples(
        [("A film", [" great", " dull"])], tokenizer, max_prompt_length_tokens=8, max_length_tokens=16
    )
    batch = collate(examples, tokenizer.pad_token_id, share_prompts=True)
    with torch.no_grad():
        per_token, mask = model_token_logps(model, batch)
        model_token_logps(model, batch)
        plain = model_token_logps(model, collate(examples, tokenizer.pad_token_id))
    torch.testing.assert_close(per_token, plain[0], atol=1e-6, rtol=0)  # right, on separate rows
    assert capsys.readouterr().out.count("cannot score the shared-prompt layout exactly") == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_then_dpo_on_each_family(tmp_path, pair_file, family, capsys):
    common = [
        "model=tiny",
        f"model.tiny_architecture={family}",
        "logger=none",
        f"output_root={tmp_path}",
        "data=jsonl",
        f"data.path={pair_file}",
        "data.max_eval_examples=8",
        "eval.num_prompts=2",
        "trainer.batch_size_examples=4",
        "trainer.microbatch_size_examples=4",
        "trainer.eval_every_steps=3",
    ]
    main(["sft", *common, "trainer.max_steps=3", "run_name=sft"])
    main(["dpo", *common, "trainer.max_steps=3", "run_name=dpo"])
    out = capsys.readouterr().out
    assert "cannot score the shared-prompt layout" not in out
    assert "reference: scored" in out  # the reference cache was written and read
    for stage in ("sft", "dpo"):
        run_dir = tmp_path / "default" / stage / stage
        assert (run_dir / "final" / "model.safetensors").is_file()
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics if "eval/kl" in m] == [0, 3]
        assert all(math.isfinite(v) for m in metrics for v in m.values())
    final = [m for m in read_metrics(tmp_path / "default" / "dpo" / "dpo") if "eval/kl" in m][-1]
    assert final["eval/kl"] != 0.0  # the policy moved away from its reference
