"""Sequence and token log-probs: shift, masking, fp32 computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dpo_cli.logps import sequence_logps, token_logps

LN2, LN3 = math.log(2.0), math.log(3.0)


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary 3, T = 4. Logit rows chosen so the softmax is easy to write down:
    U = [0, 0, 0]       -> p = [1/3, 1/3, 1/3]
    A = [0, ln 2, 0]    -> p = [1/4, 1/2, 1/4]
    C = [ln 3, 0, 0]    -> p = [3/5, 1/5, 1/5]
    X = [100, -100, 0]  (only ever at positions whose next label is masked, or at the last position)
    """
    U, A, C, X = [0.0, 0.0, 0.0], [0.0, LN2, 0.0], [LN3, 0.0, 0.0], [100.0, -100.0, 0.0]
    logits = torch.tensor(
        [
            [A, C, X, X],  # labels [-100, 1, 2, -100]: p_A(1) p_C(2) = 1/2 * 1/5 -> log(1/10)
            [U, A, C, X],  # labels [-100, 0, 0, 2]: p_U(0) p_A(0) p_C(2) = 1/3 * 1/4 * 1/5 -> log(1/60)
            [X, X, X, X],  # labels all -100 -> empty sum 0
        ]
    )
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 0, 0, 2], [-100, -100, -100, -100]])
    return logits, labels


def _naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if labels[b, t] != -100:
                out[b] += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]]
    return out


def test_sequence_logps_hand_derived() -> None:
    """Row 0: log(1/2) + log(1/5) = -log 10 = -2.302585092994046.
    Row 1: log(1/3) + log(1/4) + log(1/5) = -log 60 = -4.0943445622221.
    Row 2: no label tokens -> 0.
    """
    logits, labels = _hand_batch()
    assert_close(sequence_logps(logits, labels), torch.tensor([-2.302585092994046, -4.0943445622221, 0.0]))


def test_token_logps_hand_derived() -> None:
    """Per-token values (T - 1 = 3 per row) with 0 where the shifted label is -100."""
    logits, labels = _hand_batch()
    per_token, mask = token_logps(logits, labels)
    expected_mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert torch.equal(mask, expected_mask)
    expected = torch.tensor(
        [
            [-LN2, -math.log(5.0), 0.0],
            [-LN3, -math.log(4.0), -math.log(5.0)],
            [0.0, 0.0, 0.0],
        ]
    )
    assert_close(per_token, expected)


def test_sequence_logps_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 9, 17, generator=gen)
    labels = torch.randint(0, 17, (5, 9), generator=gen)
    prompt_lengths = [1, 3, 4, 2, 9]
    pad_from = [9, 7, 9, 5, 9]
    for b, (p, e) in enumerate(zip(prompt_lengths, pad_from, strict=True)):
        labels[b, :p] = -100
        labels[b, e:] = -100
    assert_close(sequence_logps(logits, labels), _naive_sequence_logps(logits, labels).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_scored_in_fp32(dtype: torch.dtype) -> None:
    """Upcasting happens before the log-softmax: the half-precision input, read as fp32, gives the fp32
    result exactly, not a result rounded to the half dtype."""
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(3, 12, 50, generator=gen)).to(dtype)
    labels = torch.randint(0, 50, (3, 12), generator=gen)
    labels[:, :4] = -100
    out = sequence_logps(logits, labels)
    assert out.dtype == torch.float32
    assert_close(out, sequence_logps(logits.float(), labels), rtol=0, atol=0)
    assert_close(out, _naive_sequence_logps(logits.float(), labels).float())


def test_masked_positions_never_produce_nan() -> None:
    """-100 labels must not be used as indices, and huge or infinite logits at masked positions must not
    reach the sum (or the gradient of the unmasked rows)."""
    logits = torch.randn(2, 5, 4)
    logits[0, 1:] = float("inf")
    logits[1, :, 0] = 1e30
    logits.requires_grad_(True)
    labels = torch.tensor([[-100, 2, -100, -100, -100], [-100, -100, -100, -100, -100]])
    out = sequence_logps(logits, labels)
    assert torch.isfinite(out).all()
    assert out[1].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(logits.grad[0, 0]).all()


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))
