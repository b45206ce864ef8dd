"""Every loss term against a value computed by hand from its definition (module docstring of
moeconv.train.losses), on logits chosen so the probabilities are simple fractions."""
import math

import pytest
import torch

from moeconv.train import losses

LN3 = math.log(3)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_kl_matches_hand_value_and_scales_with_t_squared():
    # token 1: teacher p = (1/4, 3/4), student q = (1/2, 1/2); token 2: the other way round.
    teacher = t([0.0, LN3], [0.0, 0.0])
    student = t([0.0, 0.0], [0.0, LN3])
    kl1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.kl_loss(student, teacher, 1.0).item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    # T = 2 with logits doubled gives the same distributions; the loss is scaled by T² = 4.
    assert losses.kl_loss(2 * student, 2 * teacher, 2.0).item() == pytest.approx(4 * (kl1 + kl2) / 2, rel=1e-6)
    # (batch, seq, vocab) is the same as (tokens, vocab)
    assert losses.kl_loss(student.reshape(1, 2, 2), teacher.reshape(1, 2, 2)).item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    assert losses.kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_ce_is_next_token():
    logits = torch.tensor([[[0.0, LN3], [math.log(4), 0.0], [100.0, -100.0]]])  # p = (.25,.75), (.8,.2), ignored
    ids = torch.tensor([[0, 1, 0]])  # position 0 predicts 1, position 1 predicts 0
    want = (-math.log(0.75) - math.log(0.8)) / 2
    assert losses.ce_loss(logits, ids).item() == pytest.approx(want, rel=1e-6)


def test_hidden_mse_with_layer_map_and_projection():
    proj = losses.HiddenProjections([(0, 1), (1, 0)], student_dims={0: 2, 1: 3}, teacher_dims={0: 3, 1: 3})
    assert set(proj.maps) == {"s0_t1"}  # only the pair whose widths differ gets a projection
    with torch.no_grad():
        proj.maps["s0_t1"].weight.copy_(t([1, 0], [0, 1], [1, 1]))
    student = {0: t([1.0, 2.0]), 1: t([1.0, 1.0, 1.0])}
    teacher = {1: t([1.0, 0.0, 0.0]), 0: t([1.0, 1.0, 3.0])}
    # pair (0→1): W·(1,2) = (1,2,3) vs (1,0,0): (0 + 4 + 9)/3; pair (1→0): (0 + 0 + 4)/3
    assert losses.hidden_mse(student, teacher, proj).item() == pytest.approx((13 / 3 + 4 / 3) / 2, rel=1e-6)


def test_projection_is_learned():
    proj = losses.HiddenProjections([(0, 0)], {0: 2}, {0: 3})
    loss = losses.hidden_mse({0: t([1.0, 2.0])}, {0: t([0.0, 0.0, 0.0])}, proj)
    loss.backward()
    assert proj.maps["s0_t0"].weight.grad.abs().sum() > 0


def test_router_kl_same_experts_and_with_expert_map():
    teacher, student = t([0.0, LN3]), t([0.0, 0.0])
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert losses.router_kl(student, teacher).item() == pytest.approx(want, rel=1e-6)
    # 4 teacher experts (1/6, 1/6, 1/6, 1/2) summed into 2 student experts by [0,0,1,1]: (1/3, 2/3)
    teacher4 = t([0.0, 0.0, 0.0, LN3])
    want = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    assert losses.router_kl(student, teacher4, [0, 0, 1, 1]).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="expert_map"):
        losses.router_kl(student, teacher4)


def test_router_topk_ce():
    teacher = t([3.0, 1.0, 2.0, 0.0])                    # top-2 = experts 0 and 2
    student = t([0.0, 0.0, 0.0, math.log(5)])           # q = (1/8, 1/8, 1/8, 5/8)
    assert losses.router_topk_ce(student, teacher, 2).item() == pytest.approx(math.log(8), rel=1e-6)
    # map [0,1,0,1]: both chosen teacher experts land on student expert 0, q = (1/4, 3/4)
    assert losses.router_topk_ce(t([0.0, LN3]), teacher, 2, [0, 1, 0, 1]).item() == pytest.approx(math.log(4), rel=1e-6)


def test_load_balance_switch_top1_and_top2():
    # top-1, 2 experts: tokens go 0,0,1,0 → f = (3/4, 1/4); P = (0.625, 0.375)
    logits = t([LN3, 0.0], [LN3, 0.0], [0.0, LN3], [LN3, 0.0])
    assert losses.load_balance_loss(logits, 1).item() == pytest.approx(2 * (0.75 * 0.625 + 0.25 * 0.375), rel=1e-6)
    # top-2, 3 experts: probs (4,2,1)/7 and (1,2,4)/7 → assignments {0,1}, {2,1}: f = (1/4, 1/2, 1/4), P = (5,4,5)/14
    logits = t([math.log(4), math.log(2), 0.0], [0.0, math.log(2), math.log(4)])
    assert losses.load_balance_loss(logits, 2).item() == pytest.approx(27 / 28, rel=1e-6)
    # a perfectly balanced router scores 1 whatever k is
    assert losses.load_balance_loss(t([0.0, 0.0, 0.0, 0.0]).repeat(4, 1) + torch.eye(4), 2).item() == pytest.approx(1.0, rel=1e-6)


def test_load_balance_gradient_flows_through_probabilities_only():
    # both tokens pick expert 0: f = (1, 0) is a constant, loss = 2·P_0, so dloss/dlogit_0 = 2·p0·(1-p0)/2 per token
    logits = t([LN3, 0.0], [LN3, 0.0]).requires_grad_()
    losses.load_balance_loss(logits, 1).backward()
    want = 0.75 * 0.25  # 2 · (1/2 tokens) · p0·(1 − p0)
    assert logits.grad[:, 0].tolist() == pytest.approx([want, want], rel=1e-5)
    assert logits.grad[:, 1].tolist() == pytest.approx([-want, -want], rel=1e-5)


def test_z_loss():
    # logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 = 2 ln 2
    assert losses.z_loss(t([0.0, 0.0], [LN3, 0.0])).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)
