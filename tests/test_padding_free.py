"""The padding-free layout of FlashAttention-2 (`logps.padding_free_layout`): a batch's sequences end to
end in one row, position_ids restarting at 0 at each, no mask. On the CPU transformers runs that layout with
sdpa and eager too (it builds the block-diagonal mask from the position_ids), so the path is checked there:
the same per-token log-probs and gradients as one padded row per sequence. The flash kernel itself needs a
GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from dpo_cli.data.batches import TokenizedExample, collate
from dpo_cli.logps import model_token_logps, padding_free_layout
from tests.conftest import gqa_llama, tiny_gpt2


def _batch() -> dict[str, torch.Tensor]:
    examples = [
        TokenizedExample((5, 9, 13), ((17, 21, 25, 29), (33, 37))),
        TokenizedExample((7, 11), ((15,), (19, 23, 27))),
    ]
    return collate(examples, pad_token_id=0, share_prompts=True)


def test_the_layout_by_hand():
    input_ids = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, 8, -100, -100]])
    layout = padding_free_layout(input_ids, attention_mask, labels)
    assert layout["packed_input_ids"].tolist() == [[4, 5, 6, 7, 8]]
    assert layout["packed_position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Labels 5 and 6 (row 0) are predicted at packed positions 0 and 1, label 8 (row 1) at 3.
    assert layout["label_source"].tolist() == [0, 1, 3]


@pytest.mark.parametrize(
    "make_model",
    [lambda: gqa_llama(attention="sdpa"), lambda: gqa_llama(attention="eager"), lambda: tiny_gpt2()],
    ids=["llama-sdpa", "llama-eager", "gpt2-sdpa"],
)
def test_padding_free_log_probs_and_gradients_equal_one_row_per_sequence(make_model):
    batch = _batch()
    results = {}
    for padding_free in (False, True):
        model = make_model()
        no_share = {k: v for k, v in batch.items() if k != "label_source"}  # plain rows as the baseline
        per_token, mask = model_token_logps(
            model, batch if padding_free else no_share, padding_free=padding_free
        )
        (per_token * mask).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[padding_free] = (per_token, mask, grads)
    (rows, mask_rows, grads_rows), (packed, mask_packed, grads_packed) = results[False], results[True]
    assert torch.equal(mask_rows, mask_packed)
    torch.testing.assert_close(packed, rows, atol=1e-5, rtol=0)
    for name, grad in grads_rows.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_flash_attention_models_take_the_padding_free_layout(monkeypatch):
    """padding_free=None picks the layout from the attention implementation: recorded forward inputs."""
    model = gqa_llama()
    seen = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda **kw: seen.append(kw) or forward(**kw))
    model_token_logps(model, _batch())
    assert "attention_mask" in seen[-1]  # sdpa: the shared-prompt 4-D mask
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(Exception):  # noqa: B017 (no flash kernel on the CPU; the inputs are recorded first)
        model_token_logps(model, _batch())
    assert "attention_mask" not in seen[-1] and seen[-1]["position_ids"].shape[0] == 1
