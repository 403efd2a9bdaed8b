"""group_advantages / zero_spread_groups / token_advantages (docs/grpo.md) on both backends, hand-computed.

The Triton backend runs compiled on CUDA tensors when there is a GPU, in its interpreter otherwise.
"""
import math
import os

import pytest
import torch

from nano_gtalign.kernels.advantage import group_advantages, token_advantages, zero_spread_groups
from nano_gtalign.kernels.logprob import triton

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(triton is None, reason="triton not installed"))]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def advantages(rewards, group_size, backend, **kw):
    """group_advantages on the backend's device (the GPU for compiled Triton), returned on the CPU."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    out = group_advantages(rewards.to(dev), group_size, backend=backend, **kw)
    assert out.device.type == torch.device(dev).type
    return out.cpu()
EPS = 1e-6
# G = 4. Group 0: [1, 2, 3, 6], mean 3, deviations [-2, -1, 0, 3], Σd² = 14.
# Group 1: constant 0.1 (its float mean is not exactly 0.1). Group 2: [1, 0, 0, 0], mean 1/4,
# deviations [3/4, -1/4, -1/4, -1/4], Σd² = 3/4.
REWARDS = [1.0, 2.0, 3.0, 6.0, 0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0]


def expected(std_normalize, unbiased):
    d0, d2 = [-2.0, -1.0, 0.0, 3.0], [0.75, -0.25, -0.25, -0.25]
    if not std_normalize:
        return d0 + [0.0] * 4 + d2
    ddof = 1 if unbiased else 0
    s0 = math.sqrt(14.0 / (4 - ddof))     # unbiased 2.1602, biased 1.8708
    s2 = math.sqrt(0.75 / (4 - ddof))     # unbiased 0.5, biased 0.4330
    return [x / (s0 + EPS) for x in d0] + [0.0] * 4 + [x / (s2 + EPS) for x in d2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std_normalize, unbiased", [(True, True), (True, False), (False, True), (False, False)])
def test_hand_computed_groups(backend, std_normalize, unbiased):
    adv = advantages(torch.tensor(REWARDS), 4, backend, eps=EPS, std_normalize=std_normalize, unbiased=unbiased)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    assert torch.allclose(adv.double(), torch.tensor(expected(std_normalize, unbiased), dtype=torch.float64),
                          rtol=1e-6, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))  # constant group: exactly zero
    if std_normalize and unbiased:  # spelled out: group 2 is [3/4, -1/4, -1/4, -1/4] / (0.5 + 1e-6)
        assert adv[8].item() == pytest.approx(1.5 / (1 + 2e-6), rel=1e-6)
        assert adv[9].item() == pytest.approx(-0.5 / (1 + 2e-6), rel=1e-6)
        assert adv[3].item() == pytest.approx(3 / 2.160247899, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std_normalize", [True, False])
def test_singleton_groups_keep_the_reward(backend, std_normalize):
    r = torch.tensor([0.5, -2.0, 3.25])
    assert torch.equal(advantages(r, 1, backend, std_normalize=std_normalize), r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_random_groups(backend):
    # odd group size (masked lanes in the Triton tile) and more groups than one program's block
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 700, generator=gen)
    got = advantages(r, 5, backend)
    g = r.double().view(-1, 5)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + EPS)).reshape(-1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [2, 16, 17, 300, 4096, 4097])
@pytest.mark.parametrize("std_normalize, unbiased", [(True, True), (True, False), (False, True)])
def test_every_tile_shape_against_float64(backend, group_size, std_normalize, unbiased):
    # One group size per kernel tile (16 lanes, a full 16, a masked 32, one group per program, the largest
    # group a program holds) and one above it (4097: the torch path on every backend).
    n_groups = 3 if group_size < 1000 else 2
    gen = torch.Generator().manual_seed(group_size)
    r = torch.rand(n_groups * group_size, generator=gen) * 4 - 1
    r[:group_size] = 0.25  # a constant group: exactly 0
    got = advantages(r, group_size, backend, std_normalize=std_normalize, unbiased=unbiased)
    g = r.double().view(n_groups, group_size)
    d = g - g.mean(1, keepdim=True)
    if std_normalize:
        d = d / ((d * d).sum(1, keepdim=True) / (group_size - 1 if unbiased else group_size)).sqrt().add(EPS)
    d[0] = 0.0
    assert torch.allclose(got.double(), d.reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:group_size], torch.zeros(group_size))


def test_token_advantages_broadcast_over_generated_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    got = token_advantages(torch.tensor([1.0, -2.0, 3.0]), mask)
    assert got.dtype == torch.float32 and got.tolist() == [[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="advantages"):
        token_advantages(torch.zeros(2), mask)


def test_bad_rewards_raise():
    with pytest.raises(ValueError, match=r"NaN/inf at rows \[2\]"):
        group_advantages(torch.tensor([1.0, 0.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        group_advantages(torch.zeros(4), 2, backend="gpu")


def test_zero_spread_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.7, 0.7001, 0.7])
    assert zero_spread_groups(r, 3).tolist() == [True] * 3 + [False] * 3 + [False] * 3
    # a tolerance: spread 1e-4 of the last group counts as zero, 1.0 of the middle one does not
    assert zero_spread_groups(r, 3, tol=1e-3).tolist() == [True] * 3 + [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="tol"):
        zero_spread_groups(r, 3, tol=-1.0)

