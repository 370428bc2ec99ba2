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


@pytest.mark.parametrize("name", ["resnet9", "vit"])
def test_clipped_sum_matches_naive_per_example_loop(name):
    torch.manual_seed(0)
    batch, labels = 8, 3
    x, y = torch.randn(batch, 1, 32, 32), (torch.rand(batch, labels) > 0.5).float()
    y[torch.rand(batch, labels) < 0.2] = float("nan")  # unlabelled entries are masked out of the loss
    model = build_model(name, labels, "mish", 32).double()
    x = x.double()
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))

    naive_grads = []
    for i in range(batch):  # gradient of each example's own loss
        model.zero_grad()
        criterion(model(x[i:i + 1]), y[i:i + 1].double()).backward()
        naive_grads.append([p.grad.detach().clone() for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in grads)) for grads in naive_grads])
    max_norm = float(norms.median())  # half the examples get clipped, half not
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[k] for f, grads in zip(factors, naive_grads)) for k in range(len(naive_grads[0]))]
    assert (factors < 1).sum() >= 3 and (factors == 1).sum() >= 3

    model.zero_grad()
    loader = DataLoader(TensorDataset(x, y.double()), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    setup = privatize(model, optimizer, loader, accountant="rdp", max_grad_norm=max_norm,
                      grad_sample_mode="hooks", noise_multiplier=0.0)
    criterion(setup.model(x), y.double()).backward()
    setup.optimizer.clip_and_accumulate()
    params = [p for p in setup.model.parameters() if p.requires_grad]
    for p, want in zip(params, expected):
        assert torch.allclose(p.summed_grad, want, rtol=1e-5, atol=1e-10), name


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
    path = tiny_config(dp={"accountant": accountant, "epsilon": 3.0})
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
