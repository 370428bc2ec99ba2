"""The step's Gaussian noise drawn for all parameters at once (privacy.noise): its distribution, the
secure construction (a sum of four draws, halved), and Opacus' optimizers using it."""
from __future__ import annotations

import math

import pytest
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from privacy.noise import SECURE_DRAWS, OneDrawNoise, gaussian_noise, with_one_draw_noise


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_stated_distribution(secure):
    n, std = 400_000, 2.5
    noise = gaussian_noise(n, std, torch.Generator().manual_seed(0), secure, torch.float64, torch.device("cpu"))
    assert noise.shape == (n,) and noise.dtype == torch.float64
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert noise.std().item() == pytest.approx(std, rel=0.01)  # the std's standard error is about 0.11%
    assert abs(((noise / std) ** 4).mean().item() - 3) < 0.05  # Gaussian kurtosis


def test_secure_noise_is_the_halved_sum_of_four_draws():
    n, std = 1000, 0.7
    got = gaussian_noise(n, std, torch.Generator().manual_seed(3), True, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    torch.normal(0.0, std, size=(1, 1), generator=generator)  # Opacus throws one draw away first
    draws = [torch.normal(0.0, std, size=(n,), generator=generator) for _ in range(SECURE_DRAWS)]
    torch.testing.assert_close(got, sum(draws) / 2)
    assert gaussian_noise(n, 0.0, None, True, torch.float32, torch.device("cpu")).eq(0).all()


@pytest.mark.parametrize("kind", [DPOptimizer, DPOptimizerFastGradientClipping])
@pytest.mark.parametrize("secure", [False, True])
def test_the_optimizers_add_sigma_c_noise_to_every_parameter_in_one_draw(kind, secure, monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((300, 200), (200,), (50, 3, 3))]
    sigma, clip = 1.3, 0.8
    optimizer = with_one_draw_noise(kind)(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma,
                                          max_grad_norm=clip, expected_batch_size=10,
                                          generator=torch.Generator().manual_seed(1), secure_mode=secure)
    assert isinstance(optimizer, OneDrawNoise) and isinstance(optimizer, kind)
    calls = []
    real = torch.normal
    monkeypatch.setattr(torch, "normal", lambda *a, **k: calls.append(k.get("size")) or real(*a, **k))
    for p in params:
        p.summed_grad = torch.full_like(p, 5.0)
    optimizer.add_noise()
    assert len(calls) == (2 if secure else 1)  # one draw for all parameters (and the discarded scalar)
    noise = torch.cat([(p.grad - 5.0).flatten() for p in params])
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02) and all(p.grad.shape == p.shape for p in params)
