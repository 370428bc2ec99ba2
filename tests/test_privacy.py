"""DP-SGD as wired by Train_Valid_DP: the loss, delta, and accounting counted in units of privacy."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant, create_accountant
from torch import nn

from config import InputError, load_config
from data.dataset import load_table, positive_weights
from privacy import check_delta, default_delta
from privacy.pos_weight import label_count_noise, noised_positive_weights, unit_label_sums
from privacy.units import unit_rows
from Train_Valid_DP import MaskedBCEWithLogitsLoss
from main_2D_DP import main


def test_per_image_losses_are_each_images_own_loss():
    """``reduction='none'`` (what Opacus' ghost clipping differentiates) = the loss of each image alone."""
    torch.manual_seed(1)
    logits, target = torch.randn(6, 3), (torch.rand(6, 3) > 0.5).float()
    target[0, 1] = target[4, 2] = float("nan")
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0, 3.0]))
    batch_loss = criterion(logits, target)
    alone = torch.stack([criterion(logits[i:i + 1], target[i:i + 1]) for i in range(6)])
    criterion.reduction = "none"
    per_image = criterion(logits, target)
    assert per_image.shape == (6,) and torch.allclose(per_image, alone)
    assert torch.allclose(per_image.mean(), batch_loss)


def test_default_delta_is_far_below_one_over_n():
    for n in (10, 99, 100, 101, 1650, 10**6):
        assert 0.001 < default_delta(n) * n <= 0.01
    check_delta(default_delta(1650), 1650, "patient")
    check_delta(5e-5, 1650, "patient")  # delta * N = 0.0825: allowed
    with pytest.raises(InputError, match="1/N = 1/1650 patients"):
        check_delta(1 / 1650, 1650, "patient", allow_large=True)
    with pytest.raises(InputError, match=r"delta \* N = 0.165 for N = 1650 images.*dp.allow_large_delta"):
        check_delta(1e-4, 1650, "image")
    check_delta(1e-4, 1650, "image", allow_large=True)


def _summary(exp):
    return json.loads((exp / "private" / "summary.json").read_text())


@pytest.mark.parametrize("unit, accountant", [("patient", "rdp"), ("image", "prv")])
def test_reported_epsilon_counts_the_units(tiny_config, unit, accountant):
    """q = B/N and the steps in units of privacy (patients, or images with Opacus' hooks engine): the
    reported epsilon is a fresh accountant's for them, and Opacus' RDP equals an independent
    implementation (Google's dp_accounting) at the same orders."""
    mode = "bookkeeping" if unit == "patient" else "hooks"
    path = tiny_config(dp={"accountant": accountant, "epsilon": 3.0, "unit": unit, "grad_sample_mode": mode},
                       training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    exp = path.parent / "experiments" / "tiny"
    summary = _summary(exp)
    dp = summary["dp"]
    cfg = load_config(exp / "private" / "config.yaml")
    train = load_table(cfg.data, cfg.experiment.seed).split("train")
    n = train["patient_id"].nunique() if unit == "patient" else len(train)
    assert dp["unit"] == unit and dp["units"] == n and dp["sample_rate"] == 16 / n
    assert summary["steps"] == round(n / 16) and dp["expected_units_per_step"] == 16
    # the noised label counts behind pos_weight (one full-batch Gaussian release), then DP-SGD's steps
    counts_noise = label_count_noise(3.0, dp["delta"], cfg.dp.label_count_share)
    assert f"multiplier {counts_noise:.4g}" in cfg.derived["pos_weight_source"]
    history = [(counts_noise, 1.0, 1), (dp["noise_multiplier"], dp["sample_rate"], summary["steps"])]
    fresh = create_accountant(accountant)
    fresh.history = history
    assert dp["epsilon_spent"] == pytest.approx(fresh.get_epsilon(dp["delta"]), rel=1e-9)
    fresh.history = history[1:]
    assert fresh.get_epsilon(dp["delta"]) < dp["epsilon_spent"]  # the counts' cost is in epsilon
    assert dp["epsilon_spent"] <= 3.0 + 1e-6 and dp["accountant"] == accountant
    assert dp["delta"] == default_delta(n) and dp["delta"] * n <= 0.01
    orders = list(range(2, 65))
    opacus_rdp = RDPAccountant()
    opacus_rdp.history = history
    independent = RdpAccountant(orders=orders)
    independent.compose(GaussianDpEvent(counts_noise))
    independent.compose(PoissonSampledDpEvent(16 / n, GaussianDpEvent(dp["noise_multiplier"])), summary["steps"])
    assert opacus_rdp.get_privacy_spent(delta=dp["delta"], alphas=orders)[0] == pytest.approx(
        independent.get_epsilon(dp["delta"]), rel=1e-9)
    # pos_weight came from the noised counts, not the exact ones
    exact = positive_weights(train, cfg.data.labels).tolist()
    assert list(cfg.derived["pos_weight"].values()) != pytest.approx(exact, rel=1e-3)
    # the statement names the unit, the adjacency, who is covered; replace-one costs more
    assert f"for each training {unit}" in dp["statement"] and f"add or remove all images of one {unit}" in dp["statement"]
    assert "validation patients" in dp["covers"] and "not protected" in dp["covers"]
    assert dp["pld_epsilon"]["replace_one"] > dp["pld_epsilon"]["add_remove_one"] > 0


def test_masked_loss_is_plain_bce_without_masks_and_ignores_nan():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    pos_weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    masked = MaskedBCEWithLogitsLoss(pos_weight)
    assert torch.allclose(masked(logits, target), nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, target))
    holes = target.clone()
    holes[0, 1] = holes[3, 2] = float("nan")
    changed = logits.clone()
    changed[0, 1], changed[3, 2] = 100.0, -100.0  # logits of unlabelled entries do not matter
    assert torch.allclose(masked(changed, holes), masked(logits, holes))
    assert torch.isfinite(masked(logits, holes))


def test_label_counts_move_by_at_most_sqrt_2l_per_patient():
    """Each patient adds at most sqrt(2L) (L2) to the sums behind pos_weight, however many images it
    has; with images as units the sums are the study's counts; the noise is that of the sensitivity."""
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    patients = np.repeat(np.arange(30), rng.integers(1, 6, size=30))
    values = (rng.random((len(patients), 3)) < 0.3).astype(float)
    values[rng.random(values.shape) < 0.2] = np.nan
    frame = pd.DataFrame(values, columns=labels).assign(patient_id=patients.astype(str))
    units = unit_rows(frame["patient_id"], "patient")
    full = unit_label_sums(frame, labels, units)
    for k in range(len(units)):
        moved = np.linalg.norm(full - unit_label_sums(frame, labels, units[:k] + units[k + 1:]))
        assert moved <= np.sqrt(2 * len(labels)) + 1e-12
    images = unit_label_sums(frame, labels, unit_rows(frame["patient_id"], "image"))
    assert list(images) == list(np.nansum(values, 0)) + list(np.isfinite(values).sum(0))
    draws = torch.stack([noised_positive_weights(frame, labels, units, 2.0, torch.Generator().manual_seed(i), True)[0]
                         for i in range(200)])
    exact = torch.tensor((full[3:] - full[:3]) / full[:3], dtype=torch.float32)
    assert (draws.median(0).values - exact).abs().max() < 0.25 * exact.max()  # noisy, but centred on the counts
    assert noised_positive_weights(frame, labels, units, 2.0, torch.Generator(), False)[1] == (2.0, 1.0, 1)
