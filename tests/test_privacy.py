"""DP-SGD as wired by Train_Valid_DP: exact per-sample clipping and honest accounting."""
from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import build_model
from Train_Valid_DP import MaskedBCEWithLogitsLoss, check_delta, default_delta, privatize
from config import InputError
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


def test_default_delta_is_below_one_over_n():
    for n in (10, 99, 100, 101, 1650, 10**6):
        assert default_delta(n) < 1 / n <= 10 * default_delta(n)
    check_delta(default_delta(1650), 1650)
    with pytest.raises(InputError, match="1/1650"):
        check_delta(1 / 1650, 1650)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_is_what_a_fresh_accountant_computes(tiny_config, accountant):
    path = tiny_config(dp={"accountant": accountant, "epsilon": 3.0}, training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    exp = path.parent / "experiments" / "tiny"
    summary = json.loads((exp / "summary.json").read_text())["dp"]
    steps = json.loads((exp / "summary.json").read_text())["steps"]
    fresh = (RDPAccountant if accountant == "rdp" else PRVAccountant)()
    fresh.history = [(summary["noise_multiplier"], summary["sample_rate"], steps)]
    assert summary["epsilon_spent"] == pytest.approx(fresh.get_epsilon(summary["delta"]), rel=1e-9)
    assert summary["epsilon_spent"] <= 3.0 + 1e-6
    assert summary["accountant"] == accountant and summary["delta"] < 1 / 80


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
