"""The loss menu: each pairwise loss by hand on three pairs, its gradients, the SFT term, KTO and its
reference point, and reference-free losses training without a reference.

The batch of tests/test_losses.py, with lengths: rho = log pi - log pi_ref, h = rho_w - rho_l:
    pair 0: pc=-1, pr=-2, rc=-1.5, rr=-1.5, |y_w|=2, |y_l|=1  ->  rho_w = 0.5,  rho_l = -0.5, h = 1
    pair 1: pc=-3, pr=-1, rc=-2,   rr=-2,   |y_w|=4, |y_l|=2  ->  rho_w = -1,   rho_l = 1,    h = -2
    pair 2: pc=-4, pr=-6, rc=-4,   rr=-6,   |y_w|=1, |y_l|=2  ->  rho_w = 0,    rho_l = 0,    h = 0
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from dpo_cli.data import unpaired_view
from dpo_cli.losses import LOSSES, PAIRWISE_LOSSES, Completions, kto_loss, preference_loss
from dpo_cli.losses import kto_reference_point as z0

PC, PR, RC, RR = [-1.0, -3.0, -4.0], [-2.0, -1.0, -6.0], [-1.5, -2.0, -4.0], [-1.5, -2.0, -6.0]
CW, CL = [2, 4, 1], [1, 2, 2]
H, RHO_W, RHO_L = [1.0, -2.0, 0.0], [0.5, -1.0, 0.0], [-0.5, 1.0, 0.0]


def ls(x: float) -> float:
    """log sigmoid(x)."""
    return -math.log1p(math.exp(-x))


def s(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def loss(loss_type: str, beta: float = 0.1, **hyperparameters) -> torch.Tensor:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, _, _ = preference_loss(
        t(PC), t(PR), t(RC), t(RR), loss_type=loss_type, beta=beta,
        chosen_num_tokens=t(CW), rejected_num_tokens=t(CL), **hyperparameters,
    )  # fmt: skip
    return losses


def expect(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hinge():
    """max(0, 1 - 0.1 h): 0.9, 1.2, 1."""
    assert_close(loss("hinge"), expect([0.9, 1.2, 1.0]))


def test_robust():
    """eps = 0.1: [-(0.9) log s(0.1 h) + 0.1 log s(-0.1 h)] / 0.8; h = 0 gives 0.8 log 2 / 0.8 = log 2."""
    want = [(-0.9 * ls(0.1 * h) + 0.1 * ls(-0.1 * h)) / 0.8 for h in H]
    assert_close(loss("robust", label_smoothing=0.1), expect(want))
    assert math.isclose(want[2], math.log(2))


def test_exo_pair():
    """eps = 0.1, x = 0.1 h: s(x) (log s(x) - log 0.9) + s(-x) (log s(-x) - log 0.1); h = 0:
    0.5 log(0.5 / 0.9) + 0.5 log(0.5 / 0.1) = 0.5 log(25 / 9) = 0.5108."""
    want = [s(x) * (ls(x) - math.log(0.9)) + s(-x) * (ls(-x) - math.log(0.1)) for x in (0.1 * h for h in H)]
    assert_close(loss("exo_pair", label_smoothing=0.1), expect(want))
    assert math.isclose(want[2], 0.5 * math.log(25 / 9))


def test_nca_pair_and_bco_pair():
    """r = 0.1 rho. NCA: -log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l); BCO: -log s(r_w) - log s(-r_l).
    Both 2 log 2 where rho_w = rho_l = 0 (pair 2)."""
    pairs = list(zip(RHO_W, RHO_L, strict=True))
    nca = [-ls(0.1 * w) - 0.5 * ls(-0.1 * w) - 0.5 * ls(-0.1 * lo) for w, lo in pairs]
    bco = [-ls(0.1 * w) - ls(-0.1 * lo) for w, lo in pairs]
    assert_close(loss("nca_pair"), expect(nca))
    assert_close(loss("bco_pair"), expect(bco))
    assert math.isclose(nca[2], 2 * math.log(2)) and math.isclose(bco[2], 2 * math.log(2))


def test_sppo_hard():
    """beta 0.1: (rho_w - 5)^2 + (rho_l + 5)^2 = 4.5^2 + 4.5^2, 6^2 + 6^2, 5^2 + 5^2."""
    assert_close(loss("sppo_hard"), expect([40.5, 72.0, 50.0]))


def test_aot_sorts_over_the_batch():
    """Paired: policy gaps pc - pr = (1, -2, 2) sorted (-2, 1, 2), reference gaps (0, 0, 2) sorted
    (0, 0, 2): delta (-2, 1, 0). Unpaired: rho_w sorted (-1, 0, 0.5), rho_l sorted (-0.5, 0, 1): delta
    (-0.5, 0, -0.5). Loss -log s(0.1 delta)."""
    assert_close(loss("aot"), expect([-ls(-0.2), -ls(0.1), math.log(2)]))
    assert_close(loss("aot_unpaired"), expect([-ls(-0.05), math.log(2), -ls(-0.05)]))


def test_apo_zero_and_apo_down():
    """zero: (1 - s(0.1 rho_w)) + s(0.1 rho_l); down: s(0.1 rho_w) + 1 - s(0.1 h); both 1 at pair 2."""
    zero = [1 - s(0.1 * w) + s(0.1 * lo) for w, lo in zip(RHO_W, RHO_L, strict=True)]
    down = [s(0.1 * w) + 1 - s(0.1 * h) for w, h in zip(RHO_W, H, strict=True)]
    assert_close(loss("apo_zero"), expect(zero))
    assert_close(loss("apo_down"), expect(down))
    assert zero[2] == down[2] == 1.0


def test_discopop():
    """x = 0.1 h, m = s(x / 0.05) = s(2 h): (1 - m)(-log s(x)) + m e^-x; h = 0: 0.5 log 2 + 0.5."""
    want = [(1 - s(2 * h)) * -ls(0.1 * h) + s(2 * h) * math.exp(-0.1 * h) for h in H]
    assert_close(loss("discopop", discopop_tau=0.05), expect(want))
    assert math.isclose(want[2], 0.5 * math.log(2) + 0.5)


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    """rho_w / |y_w| - rho_l / |y_l| = 0.25 + 0.5, -0.25 - 0.5, 0: -log s(0.1 x)."""
    assert_close(loss("sigmoid_norm"), expect([-ls(0.075), -ls(-0.075), math.log(2)]))


def test_simpo_needs_no_reference():
    """beta 2, gamma 0.5: mean log-probs pc/|y_w| - pr/|y_l| = -0.5 + 2, -0.75 + 0.5, -4 + 3 = 1.5, -0.25,
    -1: -log s(2 x - 0.5); rewards 2 x mean log-prob."""
    t = torch.tensor
    losses, chosen, rejected = preference_loss(
        t(PC), t(PR), None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
        chosen_num_tokens=t(CW), rejected_num_tokens=t(CL),
    )  # fmt: skip
    assert_close(losses, t([-ls(2.5), -ls(-1.0), -ls(-2.5)]))
    assert_close(chosen, t([-1.0, -1.5, -8.0]))
    assert_close(rejected, t([-4.0, -1.0, -6.0]))


def test_orpo():
    """Mean log-probs m_w = (-0.5, -0.75, -4), m_l = (-2, -0.5, -3); log odds(y) = m - log(1 - e^m):
    loss = -m_w - beta log s(log odds_w - log odds_l)."""
    t = torch.tensor
    m_w, m_l = [-0.5, -0.75, -4.0], [-2.0, -0.5, -3.0]
    odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    want = [-w - 0.1 * ls(odds(w) - odds(lo)) for w, lo in zip(m_w, m_l, strict=True)]
    losses, _, _ = preference_loss(
        t(PC), t(PR), None, None, loss_type="orpo", beta=0.1,
        chosen_num_tokens=t(CW), rejected_num_tokens=t(CL),
    )  # fmt: skip
    assert_close(losses, t(want))


def test_dpop_penalises_a_chosen_completion_that_lost_likelihood():
    """lambda 50: max(0, rc - pc) = (0, 1, 0): -log s(0.1 (h - 50 penalty)) = -log s(0.1), -log s(-5.2),
    log 2; without the penalty (pairs 0 and 2) it is DPO."""
    assert_close(loss("dpop", dpop_lambda=50.0), expect([-ls(0.1), -ls(-5.2), math.log(2)]))
    assert_close(loss("dpop", dpop_lambda=0.0), loss("dpo"))


def test_sft_weight_adds_the_chosen_per_token_nll():
    """alpha 0.5: DPO + 0.5 (-pc / |y_w|) = DPO + 0.5 (0.5, 0.75, 4)."""
    assert_close(loss("dpo", sft_weight=0.5), loss("dpo") + expect([0.25, 0.375, 2.0]))


@pytest.mark.parametrize("loss_type", sorted(PAIRWISE_LOSSES))
def test_every_pairwise_loss_has_correct_gradients(loss_type):
    """Analytic against finite-difference gradients in float64, at log-probs without ties (aot sorts)."""
    gen = torch.Generator().manual_seed(0)
    inputs = [-(torch.rand(5, generator=gen, dtype=torch.float64) * 3 + 0.1) for _ in range(4)]
    inputs = [x.requires_grad_() for x in inputs]
    chosen_tokens = torch.tensor([2.0, 3, 1, 4, 2], dtype=torch.float64)
    rejected_tokens = torch.tensor([1.0, 2, 2, 3, 5], dtype=torch.float64)
    smoothed = "label_smoothing" in PAIRWISE_LOSSES[loss_type].hyperparameters
    hyperparameters = {"label_smoothing": 0.1} if smoothed else {}

    def f(pc, pr, rc, rr):
        return preference_loss(
            pc, pr, rc, rr, loss_type=loss_type, beta=0.7, chosen_num_tokens=chosen_tokens,
            rejected_num_tokens=rejected_tokens, sft_weight=0.3, **hyperparameters,
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, inputs)


def test_unknown_hyperparameters_and_ranges_are_refused():
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 only applies to loss_type in \['cdpo'"):
        loss("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="takes no dpop_lambda"):
        loss("dpo", dpop_lambda=1.0)
    with pytest.raises(ValueError, match=r"\(0, 0.5\)"):
        loss("exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(torch.zeros(1), torch.zeros(1), None, None, loss_type="dpo")


def test_kto_loss_hand_derived():
    """beta 1, z0 0.2, rho = (0.5, -0.5): desirable 1 - s(0.5 - 0.2), undesirable 1 - s(0.2 + 0.5),
    weighted 1 and 2."""
    losses = kto_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5]), torch.tensor([True, False]),
        beta=1.0, kl=0.2, desirable_weight=1.0, undesirable_weight=2.0,
    )  # fmt: skip
    assert_close(losses, torch.tensor([1 - s(0.3), 2 * (1 - s(0.7))]))


def test_kto_reference_point_is_the_clamped_detached_mean_of_mismatched_log_ratios():
    """Column 1 holds each prompt with another prompt's completion: log-ratios 0.3 and -0.1 give z0 = 0.1;
    -0.3 and -0.1 give max(0, -0.2) = 0."""
    logps = torch.tensor([[-1.0, -0.7], [-2.0, -1.1]], requires_grad=True)
    policy = Completions(logps, torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2))
    assert_close(z0(policy, torch.tensor([[0.0, -1.0], [0.0, -1.0]])), torch.tensor(0.1))
    assert z0(policy, torch.tensor([[0.0, -0.4], [0.0, -1.0]])).item() == 0.0
    assert not z0(policy, torch.zeros(2, 2)).requires_grad


def test_kto_view_splits_pairs_and_pairs_every_example_with_another_prompts_completion():
    records = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    records += [{"prompt": "q", "completion": "fine", "label": True}]
    examples = unpaired_view(records)
    assert [(p, c[0], d) for p, c, d in examples] == [
        ("p0", "good 0", True), ("p0", "bad 0", False), ("p1", "good 1", True), ("p1", "bad 1", False),
        ("p2", "good 2", True), ("p2", "bad 2", False), ("q", "fine", True),
    ]  # fmt: skip
    own = {c[0]: p for p, c, _ in examples}
    assert all(own[c[1]] != p for p, c, _ in examples)  # the partner is another prompt's completion
    assert unpaired_view(records) == examples  # a fixed pairing


def test_reference_free_losses_and_kto_are_registered_as_such():
    assert {name for name, spec in LOSSES.items() if spec.reference == "none"} == {"sft", "simpo", "orpo"}
    assert LOSSES["kto"].examples == "unpaired"
    assert all("sft_weight" in LOSSES[name].hyperparameters for name in PAIRWISE_LOSSES)


@pytest.mark.slow
def test_reference_free_losses_never_load_or_score_a_reference(tmp_path, monkeypatch):
    """With the frontier off, simpo loads one model (the policy) and writes no reference cache; dpo loads
    two and caches the reference's log-probs."""
    from omegaconf import OmegaConf

    from dpo_cli.checkpoints import save_model
    from dpo_cli.cli import main
    from dpo_cli.config import ModelConfig
    from dpo_cli.models import load_model
    from dpo_cli.stages import dpo as stage

    save_model(*load_model(OmegaConf.structured(ModelConfig(name="tiny")), seed=0), tmp_path / "sft")
    loads: list[str] = []
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: loads.append("model") or load_model(*a, **k))
    for loss_name in ("simpo", "dpo"):
        loads.clear()
        main(["dpo", "model=tiny", "logger=none", f"loss={loss_name}", f"sft_checkpoint={tmp_path / 'sft'}",
              f"output_root={tmp_path}", "eval.num_prompts=0", "trainer.max_steps=1",
              "data.max_eval_examples=8", f"run_name={loss_name}"])  # fmt: skip
        parts = list((tmp_path / "ref_cache").rglob("part-*.pt"))
        assert (len(loads), len(parts)) == ((1, 0) if loss_name == "simpo" else (2, 1))


def test_kto_loss_has_correct_gradients():
    gen = torch.Generator().manual_seed(1)
    policy, ref = (-(torch.rand(6, generator=gen, dtype=torch.float64) * 3) for _ in range(2))
    desirable = torch.tensor([True, False, True, True, False, False])

    def f(policy_logps):
        return kto_loss(policy_logps, ref, desirable, beta=0.5, kl=0.1, undesirable_weight=1.5)

    assert torch.autograd.gradcheck(f, (policy.requires_grad_(),))


def test_unpaired_records_are_read_and_checked(tmp_path):
    from dpo_cli.data import read_jsonl
    from dpo_cli.errors import ConfigError
    from tests.conftest import write_jsonl

    rows = [
        {"prompt": "Q", "completion": " yes", "label": True},
        {"prompt": "R", "completion": " no", "label": False},
    ]
    assert read_jsonl(write_jsonl(tmp_path / "kto.jsonl", rows)) == rows
    with pytest.raises(ConfigError, match="line 1: field 'label' must be true"):
        read_jsonl(
            write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "completion": " yes", "label": "good"}])
        )
