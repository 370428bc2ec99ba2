"""DP-SGD as wired by Train_Valid_DP: the loss, delta, and accounting counted in units of privacy."""
from __future__ import annotations

import json

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant, create_accountant
from torch import nn

from config import InputError, load_config
from data.dataset import load_table
from privacy import check_delta, default_delta
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
    return json.loads((exp / "summary.json").read_text())


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
    cfg = load_config(exp / "config.yaml")
    train = load_table(cfg.data, cfg.experiment.seed).split("train")
    n = train["patient_id"].nunique() if unit == "patient" else len(train)
    assert dp["unit"] == unit and dp["units"] == n and dp["sample_rate"] == 16 / n
    assert summary["steps"] == round(n / 16) and dp["expected_units_per_step"] == 16
    history = [(dp["noise_multiplier"], dp["sample_rate"], summary["steps"])]
    fresh = create_accountant(accountant)
    fresh.history = history
    assert dp["epsilon_spent"] == pytest.approx(fresh.get_epsilon(dp["delta"]), rel=1e-9)
    assert dp["epsilon_spent"] <= 3.0 + 1e-6 and dp["accountant"] == accountant
    assert dp["delta"] == default_delta(n) and dp["delta"] * n <= 0.01
    orders = list(range(2, 65))
    opacus_rdp = RDPAccountant()
    opacus_rdp.history = history
    independent = RdpAccountant(orders=orders)
    independent.compose(PoissonSampledDpEvent(16 / n, GaussianDpEvent(dp["noise_multiplier"])), summary["steps"])
    assert opacus_rdp.get_privacy_spent(delta=dp["delta"], alphas=orders)[0] == pytest.approx(
        independent.get_epsilon(dp["delta"]), rel=1e-9)
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
