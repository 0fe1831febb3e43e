"""Frontier evaluation: the KL estimator against exact KL by enumeration, rewards' ranges, Best-of-N."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from dpo_cli.config import EvalConfig, RewardConfig
from dpo_cli.errors import ConfigError
from dpo_cli.evaluate import FrontierEvaluator, best_of_n, completion_logps, distinct_n
from dpo_cli.models import tiny_tokenizer
from dpo_cli.rewards import hf_classifier_reward, vader_reward
from dpo_cli.sampling import sample

PROMPT = "ab"


def peaked_tiny_model(seed: int) -> LlamaForCausalLM:
    """A random tiny Llama whose next-token distributions are far from uniform (large init), so two
    seeds give a KL well above zero."""
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        initializer_range=0.3,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def exact_two_token_kl(policy, reference, tokenizer) -> float:
    """KL(pi || ref) over all completions of at most 2 tokens, by enumeration:
    KL = sum_y1 p(y1) log p(y1)/q(y1) + sum_{y1 != EOS} p(y1) sum_y2 p(y2|y1) log p(y2|y1)/q(y2|y1)."""
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    p1 = policy(prompt).logits[0, -1].log_softmax(-1).double()
    q1 = reference(prompt).logits[0, -1].log_softmax(-1).double()
    kl = (p1.exp() * (p1 - q1)).sum()
    vocab = torch.arange(p1.numel())
    continued = torch.cat([prompt.expand(len(vocab), -1), vocab[:, None]], dim=1)
    p2 = policy(continued).logits[:, -1].log_softmax(-1).double()
    q2 = reference(continued).logits[:, -1].log_softmax(-1).double()
    step2 = (p2.exp() * (p2 - q2)).sum(-1)
    step2[tokenizer.eos_token_id] = 0.0  # a completion that ended with EOS has no second token
    return (kl + (p1.exp() * step2).sum()).item()


def evaluator(reference, num_samples: int, tmp_path, reward_fn=None) -> FrontierEvaluator:
    cfg = OmegaConf.structured(
        EvalConfig(
            num_prompts=1, samples_per_prompt=num_samples, max_new_tokens=2, batch_size_prompts=1, seed=7
        )
    )
    reward_fn = reward_fn or (lambda prompts, completions: [float(len(c)) for c in completions])
    return FrontierEvaluator(cfg, [PROMPT], tiny_tokenizer(), reference, reward_fn, tmp_path)


def test_kl_estimate_agrees_with_exact_kl_within_its_standard_error(tmp_path):
    policy, reference = peaked_tiny_model(0), peaked_tiny_model(1)
    exact = exact_two_token_kl(policy, reference, tiny_tokenizer())
    metrics, rows = evaluator(reference, 4000, tmp_path)(policy, step=0)
    assert exact > 0.5, "the two models must differ for this test to mean anything"
    assert metrics["eval/kl_se"] < 0.1 * exact
    assert abs(metrics["eval/kl"] - exact) < 4 * metrics["eval/kl_se"], (metrics["eval/kl"], exact)
    assert len(rows) == 4000 and (tmp_path / "samples.jsonl").is_file()


def test_kl_of_a_model_against_itself_is_zero(tmp_path):
    model = peaked_tiny_model(0)
    metrics, rows = evaluator(model, 64, tmp_path)(model, step=0)
    assert metrics["eval/kl"] == 0.0 and metrics["eval/kl_se"] == 0.0
    assert all(r["log_ratio"] == 0.0 for r in rows)


def test_eval_points_are_paired_same_samples_for_the_same_model(tmp_path):
    model = peaked_tiny_model(0)
    evaluate = evaluator(model, 32, tmp_path)
    first, _ = evaluate(model, step=0)
    again, _ = evaluate(model, step=10)
    assert first["eval/reward"] == again["eval/reward"]
    assert again["eval/reward_delta"] == 0.0 and again["eval/reward_delta_se"] == 0.0


def test_sampled_token_ids_are_scored_exactly(tmp_path):
    """completion_logps scores the drawn ids: the sum over tokens equals a hand loop over single forwards."""
    model, tok = peaked_tiny_model(3), tiny_tokenizer()
    samples = sample(model, tok, [PROMPT], num_samples=3, max_new_tokens=3, seed=0)
    logps, lengths = completion_logps(model, samples, tok.pad_token_id)
    for i in range(3):
        ids = samples.prompt_ids[i] + samples.completion_ids[i]
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        start = len(samples.prompt_ids[i])
        expected = sum(logits[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert logps[i].item() == pytest.approx(expected, abs=1e-4)
        assert lengths[i].item() == len(samples.completion_ids[i])


def test_best_of_n_kl_is_the_closed_form_and_reward_is_at_least_the_mean(tmp_path):
    model = peaked_tiny_model(0)
    evaluate = evaluator(model, 16, tmp_path)
    sampled, _ = evaluate(model, step=0)
    point = best_of_n(evaluate, model, 16)
    assert point["eval/bon_kl"] == pytest.approx(math.log(16) - 15 / 16)
    assert best_of_n(evaluate, model, 1)["eval/bon_kl"] == 0.0
    assert point["eval/bon_reward"] >= sampled["eval/reward"]


def test_distinct_2_counts_unique_bigrams_over_all_completions():
    # bigrams: (1,2) (2,1) (1,2) | (3,3) (3,3) -> 5 bigrams, 3 unique.
    assert distinct_n([[1, 2, 1, 2], [3, 3, 3], [7]], 2) == pytest.approx(3 / 5)
    assert distinct_n([[1]], 2) == 0.0


def test_fluency_is_logged_beside_each_point(tmp_path):
    model = peaked_tiny_model(0)
    metrics, _ = evaluator(model, 32, tmp_path)(model, step=0)
    assert 0 < metrics["eval/distinct_2"] <= 1
    # Against itself the reference log-prob per token is the policy's own, a finite negative number.
    assert -10 < metrics["eval/ref_logp_per_token"] < 0


def test_vader_scores_sentiment_in_minus_one_to_one():
    scores = vader_reward()(
        ["The movie was"] * 3, [" wonderful, I loved it.", " a film.", " awful and boring."]
    )
    assert all(-1 <= s <= 1 for s in scores)
    assert scores[0] > 0.5 and scores[2] < -0.5 and scores[1] == 0.0


def test_hf_classifier_scores_a_label_probability(tmp_path):
    """A tiny random BERT classifier saved locally stands in for siebert/sentiment-roberta-large-english."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "movie", "was", "great", "bad"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    cfg = RewardConfig(name="hf_classifier", model_name_or_path=str(tmp_path), label="POSITIVE", batch_size=2)
    positive = hf_classifier_reward(cfg, torch.device("cpu"))(["the movie was"] * 3, [" great", " bad", ""])
    cfg.label = "NEGATIVE"
    negative = hf_classifier_reward(cfg, torch.device("cpu"))(["the movie was"] * 3, [" great", " bad", ""])
    assert all(0 <= s <= 1 for s in positive)
    assert [p + n for p, n in zip(positive, negative, strict=True)] == pytest.approx([1.0] * 3)
    cfg.label = "JOY"
    with pytest.raises(ConfigError, match="NEGATIVE, POSITIVE"):
        hf_classifier_reward(cfg, torch.device("cpu"))
