"""GRPO / Dr.GRPO advantages (helpers/rl/advantages.py) against direct per-group computation."""

import math

import pytest
import torch

import helpers  # noqa: F401  (sets up the runtime before anything else)
from helpers.rl.advantages import GRPO_EPS, grpo_advantages


def _direct(rewards: list[float], g: int, norm: bool) -> list[float]:
    out = []
    for i in range(0, len(rewards), g):
        grp = rewards[i : i + g]
        if g == 1:
            mean, std = 0.0, 1.0  # veRL: a lone sample has no baseline
        else:
            mean = sum(grp) / g
            std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))  # unbiased
        out += [(x - mean) / (std + GRPO_EPS) if norm else x - mean for x in grp]
    return out


@pytest.mark.parametrize("n_groups,g", [(1, 1), (3, 1), (1, 2), (4, 5), (7, 16)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("binary", [True, False])
def test_matches_direct(n_groups, g, norm, binary):
    gen = torch.Generator().manual_seed(n_groups * 31 + g)
    r = (torch.rand(n_groups * g, generator=gen) > 0.5).float() if binary else torch.randn(n_groups * g, generator=gen)
    got = grpo_advantages(r, g, norm_by_std=norm)
    ref = torch.tensor(_direct(r.tolist(), g, norm))
    # fp32 mean/std vs float64 Python; a 1e-6 eps under a std near 0 amplifies nothing here (binary std >= 0.25)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got.shape == (n_groups * g,) and got.dtype == torch.float32


def test_uniform_group_gives_zero_and_binary_values():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    a = grpo_advantages(r, 4)
    assert torch.equal(a[:4], torch.zeros(4))  # no signal from an all-correct group
    # group [0, 1, 0, 0]: mean 0.25, unbiased std 0.5
    torch.testing.assert_close(a[4:], torch.tensor([-0.5, 1.5, -0.5, -0.5]) / (1 + 2 * GRPO_EPS), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grpo_advantages(r, 4, norm_by_std=False)[4:], torch.tensor([-0.25, 0.75, -0.25, -0.25]))


@pytest.mark.parametrize("bad", [
    dict(rewards=torch.ones(2, 3), group_size=3),
    dict(rewards=[1.0, 0.0], group_size=2),
    dict(rewards=torch.ones(5), group_size=2),
    dict(rewards=torch.ones(4), group_size=0),
    dict(rewards=torch.ones(4), group_size=2.0),
    dict(rewards=torch.ones(4), group_size=2, eps=0.0),
])
def test_bad_inputs(bad):
    with pytest.raises(ValueError):
        grpo_advantages(**bad)
