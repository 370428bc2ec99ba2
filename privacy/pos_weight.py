"""Positive-class loss weights of a DP run, from Gaussian-noised label counts that are accounted.

The study weights each label's positive class by (negatives / positives) on the training split.
Exact counts of private labels, used in training and written into the config, are a mechanism of
their own that DP-SGD's guarantee does not cover. Here every unit (patient) u contributes, per
label l, the share of its labelled images that are positive, f_ul in [0, 1], and whether it has any
labelled image, m_ul in {0, 1}: adding or removing a unit changes the 2L sums F_l = sum_u f_ul and
M_l = sum_u m_ul by a vector of L2 norm at most sqrt(2L), whatever its number of images. The
Gaussian mechanism adds N(0, (s sqrt(2L))^2) to each sum; its Renyi-DP is that of one full-batch
step (noise multiplier s, sample rate 1) and enters the run's accountant history before DP-SGD's
steps, whose noise multiplier is solved for the target epsilon of the two together. s gives the
counts a fixed share of the budget, measured as zero-concentrated DP (Bun & Steinke 2016): the
mechanism is rho = 1 / (2 s^2)-zCDP, and an (epsilon, delta) budget holds at most
rho = (sqrt(log(1/delta) + epsilon) - sqrt(log(1/delta)))^2 (from epsilon = rho + 2 sqrt(rho log(1/delta))).
pos_weight_l = (M~_l - F~_l) / F~_l, with F~_l >= 1 and M~_l >= F~_l + 1. With one image per unit
these are the study's image counts, noised.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from opacus.optimizers.optimizer import _generate_noise


def label_count_noise(epsilon: float, delta: float, share: float) -> float:
    """The counts' noise multiplier s, for ``share`` of an (epsilon, delta) budget's rho."""
    log_term = math.log(1 / delta)
    rho = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2
    return 1 / math.sqrt(2 * share * rho)


def unit_label_sums(frame: pd.DataFrame, labels: list[str], units: list[np.ndarray]) -> np.ndarray:
    """[F_1..F_L, M_1..M_L]: per label, the units' shares of positive labelled images, summed, and
    the number of units with a labelled image (NaN = unlabelled)."""
    values = frame[labels].to_numpy(np.float64)
    sums = np.zeros(2 * len(labels))
    for rows in units:
        part = values[rows]
        labelled = np.isfinite(part).sum(0)
        sums[:len(labels)] += np.divide(np.nansum(part, 0), labelled, out=np.zeros(len(labels)), where=labelled > 0)
        sums[len(labels):] += labelled > 0
    return sums


def noised_positive_weights(frame: pd.DataFrame, labels: list[str], units: list[np.ndarray], noise_multiplier: float,
                            generator: torch.Generator, secure_mode: bool) -> tuple[torch.Tensor, tuple]:
    """The noised pos_weight per label and the mechanism's accountant entry (sigma, q = 1, 1 step)."""
    sums = torch.from_numpy(unit_label_sums(frame, labels, units))
    std = noise_multiplier * math.sqrt(2 * len(labels))
    noisy = sums + _generate_noise(std, sums, generator=generator, secure_mode=secure_mode).to(sums.dtype)
    positives = noisy[:len(labels)].clamp(min=1.0)
    labelled = torch.maximum(noisy[len(labels):], positives + 1.0)
    return ((labelled - positives) / positives).float(), (float(noise_multiplier), 1.0, 1)
