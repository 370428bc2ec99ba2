"""The Gaussian noise of a DP-SGD step, drawn for all parameters at once.

Opacus' optimizers add N(0, (sigma C)^2) to every coordinate of the clipped sum, one call of
``_generate_noise`` per parameter; in secure mode each call draws 2n = 4 Gaussian tensors and returns
their sum halved (Holohan & Braghin 2021, section 5.1: a sum of 2n draws hides the floating-point
pattern of any single draw; n = 2 as in Opacus), after throwing one scalar draw away. The noise is
the same here -- every coordinate an independent N(0, (sigma C)^2), in secure mode the sum of four
N(0, (sigma C)^2) draws halved -- but each of the draws covers every parameter in one flat buffer:
one call per step instead of one (or five) per parameter, which on a CPU is most of the cost of
secure noise (``bench/bench_dp.py``).
"""
from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

SECURE_DRAWS = 4  # 2n Gaussian draws per coordinate in secure mode, n = 2 (Opacus' choice)


def gaussian_noise(numel: int, std: float, generator: torch.Generator | None, secure: bool,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` independent N(0, std^2) values; ``secure``: each the sum of four N(0, std^2) draws,
    halved (variance 4 std^2 / 4 = std^2)."""
    if std == 0:
        return torch.zeros(numel, dtype=dtype, device=device)
    if not secure:
        return torch.normal(0.0, std, size=(numel,), generator=generator, dtype=dtype, device=device)
    torch.normal(0.0, std, size=(1, 1), generator=generator, device=device)  # thrown away, as Opacus does
    total = torch.normal(0.0, std, size=(numel,), generator=generator, dtype=dtype, device=device)
    draw = torch.empty_like(total)
    for _ in range(SECURE_DRAWS - 1):
        total += draw.normal_(0.0, std, generator=generator)
    return total.div_(2)


class OneDrawNoise:
    """Mixin for an Opacus DP optimizer: its ``add_noise`` (p.grad = clipped sum + noise; under
    torchrun only rank 0 adds noise) with the step's noise drawn by one :func:`gaussian_noise` call
    for all parameters. Parameters of several dtypes or devices fall back to Opacus' own loop."""

    def add_noise(self):
        params = list(self.params)
        if getattr(self, "rank", 0) != 0:  # Opacus' distributed optimizers: the other ranks add none
            super().add_noise()
            return
        kinds = {(p.summed_grad.dtype, p.summed_grad.device) for p in params}
        if len(kinds) != 1:
            super().add_noise()
            return
        (dtype, device), = kinds
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        noise = gaussian_noise(sum(p.summed_grad.numel() for p in params), std, self.generator, self.secure_mode,
                               dtype, device)
        for p, part in zip(params, noise.split([p.summed_grad.numel() for p in params])):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + part.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def with_one_draw_noise(kind: type) -> type:
    """The Opacus optimizer class ``kind`` with :class:`OneDrawNoise`'s ``add_noise``."""
    return type(kind.__name__, (OneDrawNoise, kind), {"__module__": __name__})
