"""GRPO loss pieces against hand-computed numbers: clipped loss (+ gradients on each side of each clip), KL
estimators, aggregation modes and their invariance to how a step is split into micro-batches and ranks."""
import math

import pytest
import torch

from nano_gtalign import grpo


def _ratios_case(ratios, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    old = torch.zeros(1, len(ratios))
    logp = torch.log(torch.tensor([ratios], dtype=torch.float32)).requires_grad_(True)
    mask = torch.ones(1, len(ratios), dtype=torch.bool)
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([adv]), mask, clip_low, clip_high, dual_clip)
    loss.sum().backward()
    return loss.detach()[0], logp.grad[0], stats


def test_policy_loss_positive_advantage_values_and_grads():
    # A = 2: l = max(-2 rho, -2 clip(rho, 0.8, 1.2)); d l / d logp = -A rho unclipped, 0 once rho > 1.2.
    loss, grad, stats = _ratios_case([0.5, 0.9, 1.0, 1.5, 4.0], 2.0)
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.8, -2.0, -2.4, -2.4]))
    torch.testing.assert_close(grad, torch.tensor([-1.0, -1.8, -2.0, 0.0, 0.0]))
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac_low"].item() == 0.0
    assert stats["dual_clip_frac"].item() == 0.0
    assert stats["tokens"].item() == 5


def test_policy_loss_negative_advantage_low_clip_and_dual_clip():
    # A = -1: l = max(rho, clip(rho, 0.8, 1.2)), then min(l, 3) (dual clip).
    # rho=0.5 -> 0.8 (low clip, grad 0); 0.9 -> 0.9; 1.5 -> 1.5 (no high clip for A<0); 2.5 -> 2.5;
    # rho=4 -> 3 (dual clip, grad 0).
    loss, grad, stats = _ratios_case([0.5, 0.9, 1.5, 2.5, 4.0], -1.0)
    torch.testing.assert_close(loss, torch.tensor([0.8, 0.9, 1.5, 2.5, 3.0]))
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.9, 1.5, 2.5, 0.0]))
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac_high"].item() == 0.0


def test_policy_loss_without_dual_clip_and_asymmetric_clip():
    loss, grad, _ = _ratios_case([4.0], -1.0, dual_clip=None)
    assert loss.item() == pytest.approx(4.0) and grad.item() == pytest.approx(4.0)
    # clip_high = 0.28 (DAPO's clip-higher): rho = 1.25 is still inside for A > 0, 1.3 is not.
    loss, grad, _ = _ratios_case([1.25, 1.3], 1.0, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.25, -1.28]))
    torch.testing.assert_close(grad, torch.tensor([-1.25, 0.0]))
    # clip_low = 0.1: for A < 0, rho = 0.95 is inside, 0.85 is clipped up to 0.9.
    loss, grad, _ = _ratios_case([0.95, 0.85], -2.0, clip_low=0.1, clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([1.9, 1.8]))
    torch.testing.assert_close(grad, torch.tensor([1.9, 0.0]))


def test_policy_loss_masks_padding_even_with_garbage():
    logp = torch.tensor([[math.log(1.5), -float("inf")], [0.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.0, 5.0], [0.0, float("nan")]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), mask)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2, 0.0], [1.0, 0.0]]))
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert stats["tokens"].item() == 2
    # approx_kl = mean(old - logp) over real tokens = (-log 1.5 + 0) / 2
    assert stats["approx_kl"].item() == pytest.approx(-math.log(1.5) / 2, rel=1e-5)


def test_policy_loss_rejects_bad_input():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages has 3 rows"):
        grpo.policy_loss(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask shape"):
        grpo.policy_loss(x, x, torch.zeros(2), m[:, :2])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo.policy_loss(x, x, torch.zeros(2), m, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        grpo.policy_loss(x, x, torch.zeros(2), m, clip_low=1.0)


def test_kl_estimators_hand_computed():
    # pi = 0.5, pi_ref = 0.25: delta = log(0.5) ; k1 = log 2 ; k2 = (log 2)^2 / 2 ; k3 = 0.5 + log 2 - 1
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    ln2 = math.log(2.0)
    assert grpo.kl_penalty(logp, ref, "k1").item() == pytest.approx(ln2)
    assert grpo.kl_penalty(logp, ref, "k2").item() == pytest.approx(ln2 ** 2 / 2)
    k3 = grpo.kl_penalty(logp, ref, "k3")
    assert k3.item() == pytest.approx(0.5 + ln2 - 1.0)
    k3.sum().backward()  # d/dlogp (e^delta - delta - 1) = 1 - e^delta = 1 - 0.5
    assert logp.grad.item() == pytest.approx(0.5)
    same = torch.tensor([[-1.3, -0.2]])
    for kind in grpo.KL_KINDS:
        assert torch.equal(grpo.kl_penalty(same, same, kind), torch.zeros(1, 2))


def test_kl_clamps():
    logp = torch.tensor([[-30.0, 0.0]])
    ref = torch.tensor([[0.0, -30.0]])  # delta = +30 (clamped to 20) and -30 (clamped to -20)
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k1"), torch.tensor([[-20.0, 20.0]]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k2"), torch.tensor([[200.0, 200.0]]))
    # k3(+20) = e^20 - 21 -> 10 ; k3(-20) = e^-20 + 19 -> 10
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k3"), torch.tensor([[10.0, 10.0]]))
    with pytest.raises(ValueError, match="unknown KL kind 'k4'"):
        grpo.kl_penalty(logp, ref, "k4")


def test_reduce_loss_modes_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 3 fully dropped
    assert grpo.reduce_loss(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert grpo.reduce_loss(x, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert grpo.reduce_loss(x, m, "seq-mean-token-sum-norm", max_len=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert grpo.reduce_loss(x, m, "token-mean", global_token_count=20).item() == pytest.approx(10 / 20)
    assert grpo.reduce_loss(x, m, "seq-mean-token-mean", global_seq_count=6).item() == pytest.approx(6 / 6)
    assert grpo.step_counts(m) == (4, 2)
    empty = torch.zeros(3, 3, dtype=torch.bool)
    for mode in grpo.AGGREGATIONS:
        assert grpo.reduce_loss(x, empty, mode, max_len=3).item() == 0.0
    with pytest.raises(ValueError, match="needs max_len"):
        grpo.reduce_loss(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="more than max_len=2"):
        grpo.reduce_loss(x, m, "seq-mean-token-sum-norm", max_len=2)
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'"):
        grpo.reduce_loss(x, m, "mean")


def _step(seed=0, rows=8, width=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logp = (-torch.rand(rows, width, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.4 * torch.randn(rows, width, generator=g)
    adv = torch.randn(rows, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_aggregation_invariant_to_micro_batches_and_ranks(mode):
    logp, old, adv, mask = _step()
    full = grpo.reduce_loss(grpo.policy_loss(logp, old, adv, mask)[0], mask, mode, max_len=7)
    (full_grad,) = torch.autograd.grad(full, logp)

    # 2 ranks x uneven micro-batches; each micro-batch padded only to its own longest row.
    splits = [[0, 1, 2], [3], [4, 5], [6, 7]]  # ranks: splits[:2] and splits[2:]
    tokens = sum(grpo.step_counts(mask[rows])[0] for rows in splits)
    seqs = sum(grpo.step_counts(mask[rows])[1] for rows in splits)
    total = 0.0
    grad = torch.zeros_like(logp)
    for rows in splits:
        width = max(int(mask[rows].sum(-1).max()), 1)
        lp = logp.detach()[rows, :width].clone().requires_grad_(True)
        part = grpo.reduce_loss(grpo.policy_loss(lp, old[rows, :width], adv[rows], mask[rows, :width])[0],
                              mask[rows, :width], mode, global_token_count=tokens, max_len=7,
                              global_seq_count=seqs)
        part.backward()
        grad[rows, :width] += lp.grad
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, full_grad)
    # without the global counts the per-micro-batch means do NOT add up (the test can fail)
    naive = sum(grpo.reduce_loss(grpo.policy_loss(logp[rows], old[rows], adv[rows], mask[rows])[0],
                               mask[rows], mode, max_len=7).item() for rows in splits) / len(splits)
    assert naive != pytest.approx(full.item(), rel=1e-3)


def test_mask_truncated():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = grpo.mask_truncated(mask, ["eos", "length", "stop"])
    assert out.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert mask[1].all()  # input untouched
    with pytest.raises(ValueError, match="2 finish reasons for 3 mask rows"):
        grpo.mask_truncated(mask, ["eos", "eos"])
    with pytest.raises(ValueError, match="unknown finish reasons"):
        grpo.mask_truncated(mask, ["eos", "eos", "timeout"])


def test_group_advantages_comes_from_kernels():
    import nano_gtalign.kernels.advantage

    assert grpo.group_advantages is nano_gtalign.kernels.advantage.group_advantages
    # one group of 4, unbiased std: mean 0.5, std = sqrt(1/3); A = +-0.5 / sqrt(1/3)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, backend="torch")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / math.sqrt(1 / 3), rtol=1e-4, atol=1e-5)
