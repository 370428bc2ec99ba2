"""Exact per-unit clipping: book-keeping and Opacus' engines against a naive loop, per image and per patient."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_tensors_close
from config import InputError
from models import ViT, build_model
from privacy import bookkeeping, per_sample
from privacy.bookkeeping import BookKeeping
from privacy.per_sample import check_allowed, check_batch_independence
from privacy.units import UnitSampler, plan_chunks, unit_rows, with_views
from Train_Valid_DP import EpochProgress, MaskedBCEWithLogitsLoss, privatize, train_one_epoch


def naive_clipped_sum(model: nn.Module, loss_of, units, max_norm: float | None = None):
    """sum_u min(1, C/(||g_u|| + 1e-6)) g_u, g_u = the gradient of the summed losses of unit u's
    examples from a backward of its own; ``units``: a number of examples (each its own unit) or
    a list of index lists. C = median norm if None."""
    units = [[i] for i in range(units)] if isinstance(units, int) else units
    grads = []
    for rows in units:
        model.zero_grad(set_to_none=True)
        loss_of(list(rows)).sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in per)) for per in grads])
    max_norm = float(norms.median()) if max_norm is None else max_norm
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    model.zero_grad(set_to_none=True)
    return [sum(f * per[k] for f, per in zip(factors, grads)) for k in range(len(grads[0]))], norms, max_norm


def assert_close(got, want, what):
    assert_tensors_close(got, want, 1e-5, what)


class Layers(nn.Module):
    """Every layer type the supported models use, with the conv options they may take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, stride=2, padding=1)           # stride, padding, bias
        self.grouped = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4, bias=False)
        self.wide = nn.Conv2d(8, 16, 2, stride=2, padding="valid")   # few positions: ghost norm eligible
        self.norm = nn.GroupNorm(4, 16)
        self.embed = nn.Embedding(20, 16)
        self.token_norm = nn.LayerNorm(16)
        self.token = nn.Linear(16, 16)                                # linear over tokens
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm(self.wide(torch.tanh(self.grouped(torch.tanh(self.conv(x))))))
        tokens = h.flatten(2).transpose(1, 2)                         # B, 16 positions, 16
        ids = torch.arange(tokens.shape[1], device=x.device).expand(len(x), -1)
        tokens = self.token_norm(tokens + self.embed(ids))
        return self.head(torch.tanh(self.token(tokens)).mean(1))


@pytest.mark.parametrize("ghost_ratio", [0, 10**9], ids=["ghost-where-possible", "all-materialised"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_layer_type_matches_naive_loop(ghost_ratio, dtype, monkeypatch):
    monkeypatch.setattr(bookkeeping, "GHOST_RATIO", ghost_ratio)
    if ghost_ratio:  # and GroupNorm's statistics recomputed rather than read from its forward pass
        monkeypatch.setattr(bookkeeping, "saved_group_stats", lambda output: None)
    torch.manual_seed(0)
    model = Layers().to(dtype)
    x, y = torch.randn(6, 2, 16, 16, dtype=dtype), torch.randn(6, 3, dtype=dtype)
    loss_of = lambda idx: ((model(x[idx]) - y[idx]) ** 2).sum(1)  # noqa: E731
    want, norms, max_norm = naive_clipped_sum(model, loss_of, 6)
    clipper = BookKeeping(model, max_norm, reviewed=(Layers,))
    got_norms = clipper.backward(loss_of(slice(None)))
    ghosts = [layer.name for layer in clipper.layers if layer.ghost_mode]
    assert torch.allclose(got_norms, norms, rtol=1e-5)
    assert_close([p.grad for p in model.parameters()], want, f"{dtype}, ghost ratio {ghost_ratio}")
    # ghost norms for ungrouped convolutions and token-wise linears; grouped ones always materialise
    assert set(ghosts) == ({"conv", "wide", "token"} if ghost_ratio == 0 else set())


def test_vit_attention_and_embeddings_match_naive_loop():
    torch.manual_seed(1)
    model = ViT(16, 3, patch=4, dim=24, depth=2, heads=3).double()
    x, y = torch.randn(5, 1, 16, 16, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64)
    loss_of = lambda idx: nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        model(x[idx]), y[idx], reduction="none").mean(1)
    want, norms, max_norm = naive_clipped_sum(model, loss_of, 5)
    got_norms = BookKeeping(model, max_norm).backward(loss_of(slice(None)))
    assert torch.allclose(got_norms, norms, rtol=1e-8)
    assert_close([p.grad for p in model.parameters()], want, "vit")


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
@pytest.mark.parametrize("name", ["resnet9", "vit"])
def test_dp_update_matches_naive_loop(name, mode):
    """The whole DP-SGD update as training wires it (noise off): the clipped sum over the expected batch."""
    torch.manual_seed(0)
    batch, labels = 8, 3
    x, y = torch.randn(batch, 1, 32, 32).double(), (torch.rand(batch, labels) > 0.5).double()
    y[torch.rand(batch, labels) < 0.2] = float("nan")  # unlabelled entries are masked out of the loss
    model = build_model(name, labels, "mish", 32).double()
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64), reduction="none")
    want, norms, max_norm = naive_clipped_sum(model, lambda idx: criterion(model(x[idx]), y[idx]), batch)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).sum() >= 3 and (factors == 1).sum() >= 3  # half the examples get clipped

    before = [p.detach().clone() for p in model.parameters()]
    setup = privatize(model, torch.optim.SGD(model.parameters(), lr=1.0), sample_rate=0.5, expected_batch_size=batch,
                      steps=1, accountant="rdp", max_grad_norm=max_norm, grad_sample_mode=mode, noise_multiplier=0.0)
    setup.backward(criterion(setup.model(x), y), None, False)
    setup.optimizer.step()
    steps = [(b - p.detach()) * batch for b, p in zip(before, model.parameters())]
    assert_close(steps, want, f"{name} {mode}")
    assert setup.accountant.history == [(0.0, 0.5, 1)]


def test_bookkeeping_spends_and_noises_exactly_like_opacus():
    """Same seed, sigma and batches: identical weights and accountant history to Opacus' hooks."""
    def run(mode):
        torch.manual_seed(3)
        model = build_model("resnet9", 2, "mish", 16).double()
        x, y = torch.randn(40, 1, 16, 16).double(), (torch.rand(40, 2) > 0.5).double()
        sampler = UnitSampler(40, 10, torch.Generator().manual_seed(0), poisson=True)
        setup = privatize(model, torch.optim.SGD(model.parameters(), lr=0.5), sample_rate=sampler.sample_rate,
                          expected_batch_size=10, steps=sampler.steps_per_epoch, accountant="rdp", max_grad_norm=0.1,
                          grad_sample_mode=mode, target_epsilon=4.0, delta=1e-3,
                          noise_generator=torch.Generator().manual_seed(5))
        criterion = MaskedBCEWithLogitsLoss(torch.ones(2, dtype=torch.float64), reduction="none")
        for batch in sampler.draw_epoch():  # Poisson batches of images
            setup.optimizer.zero_grad(set_to_none=True)
            setup.backward(criterion(setup.model(x[batch]), y[batch]), None, False)
            setup.optimizer.step()
        return [p.detach() for p in model.parameters()], setup.accountant.history, setup.noise_multiplier

    fast, slow = run("bookkeeping"), run("hooks")
    assert fast[1] == slow[1] and fast[2] == slow[2] and sum(entry[2] for entry in fast[1]) == 4
    assert_close(fast[0], slow[0], "weights after 4 noisy steps")


def test_empty_batch_and_unused_layer_give_zero_gradients():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    unused = nn.Linear(2, 2)
    model.add_module("unused", unused)
    clipper = BookKeeping(model, 1.0)
    forward = lambda x: model[1](model[0](x)).squeeze(1)  # noqa: E731
    clipper.backward(forward(torch.randn(5, 4)))
    assert all(torch.count_nonzero(p.grad) == 0 for p in unused.parameters())
    assert all(torch.count_nonzero(p.grad) > 0 for p in model[0].parameters())
    clipper.backward(forward(torch.randn(0, 4)))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_unsupported_and_shared_layers_are_refused():
    with pytest.raises(InputError, match=r"module 1 \(torch.nn.modules.batchnorm.BatchNorm1d\) is not on the allow"):
        BookKeeping(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 1.0)
    shared = nn.Linear(3, 3)
    BookKeeping(shared, 1.0)
    with pytest.raises(InputError, match="used twice"):
        shared(shared(torch.randn(2, 3)))


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("compiled", [False, True], ids=["padded", "padded+compiled"])
def test_fixed_shape_batches_do_not_change_training(compiled):
    """Chunks padded with unlabelled blank images (what training.compile uses) give the same weights."""
    def run(fixed_shape):
        torch.manual_seed(0)
        model = _Small()
        x, y = torch.randn(30, 1, 9, 9), (torch.rand(30, 2) > 0.5).float()
        # patients of 1-5 images: chunks of 4 pack the small ones and cut the patients of 5
        patients = pd.Series(np.repeat(np.arange(10), [5, 1, 2, 3, 4, 1, 5, 2, 3, 4]))
        sampler = UnitSampler(10, 5, torch.Generator().manual_seed(1), poisson=True)
        setup = privatize(model, torch.optim.SGD(model.parameters(), lr=0.5), sample_rate=sampler.sample_rate,
                          expected_batch_size=5, steps=3, accountant="rdp", max_grad_norm=0.5,
                          grad_sample_mode="bookkeeping", noise_multiplier=1.0,
                          noise_generator=torch.Generator().manual_seed(2), reviewed=(_Small,))
        forward = torch.compile(setup.model) if compiled and fixed_shape else setup.model
        progress = EpochProgress(sampler.draw_epoch())
        train_one_epoch(forward, MaskedBCEWithLogitsLoss(torch.ones(2), reduction="none"), setup.optimizer,
                        TensorDataset(x, y), unit_rows(patients, "patient"), progress, "cpu", 4, setup.backward,
                        list(range(30)), "test", fixed_shape=fixed_shape)
        return [p.detach() for p in model.parameters()], progress.loss

    plain, padded = run(False), run(True)
    assert padded[1] == pytest.approx(plain[1], rel=1e-6)
    assert_close(padded[0], plain[0], "weights after one padded epoch")


def test_a_forward_not_seen_or_a_layer_without_gradient_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    clipper = BookKeeping(model, 1.0)
    with torch.no_grad():
        out = model(torch.randn(5, 4)).squeeze(1)
    with pytest.raises(RuntimeError, match="no layer of the model was recorded"):
        clipper.backward(out.requires_grad_())
    first = model[0](torch.randn(5, 4))
    model[1](first)  # recorded, but the loss below does not use it
    with pytest.raises(RuntimeError, match="layers 1 ran forward but got no gradient"):
        clipper.backward(first.sum(1))


# Patients of 1..6 images; in physical chunks of 4 the small ones are packed together and those of
# 5 and 6 images span chunks. Their rows are interleaved: units come from the ids, not the order.
PATIENT_SIZES = [1, 3, 2, 6, 1, 4, 5, 2]


def _patients(sizes, seed=0):
    ids = np.repeat(np.arange(len(sizes)), sizes)
    return unit_rows(pd.Series(np.random.default_rng(seed).permutation(ids)), "patient")


def test_chunks_keep_patients_whole_unless_one_exceeds_a_chunk():
    chunks = plan_chunks(PATIENT_SIZES, 4)
    assert [(c.start, c.stop, c.units, c.continues) for c in chunks] == [
        (0, 4, (0, 1, 1, 1), False), (4, 6, (0, 0), False), (6, 10, (0,) * 4, True), (10, 12, (0, 0), False),
        (12, 13, (0,), False), (13, 17, (0,) * 4, False), (17, 21, (0,) * 4, True), (21, 22, (0,), False),
        (22, 24, (0, 0), False)]
    assert plan_chunks([], 4) == [plan_chunks([], 4)[0]] and plan_chunks([], 4)[0].stop == 0


def _engine_clipped_sum(clipper, model, loss_of, units, physical=4):
    """The clipped sum as training forms it: units packed into chunks, each chunk's sum added up."""
    rows = [int(i) for unit in units for i in unit]
    total = [torch.zeros_like(p) for p in model.parameters()]
    for chunk in plan_chunks([len(unit) for unit in units], physical):
        clipper.backward(loss_of(rows[chunk.start:chunk.stop]), torch.tensor(chunk.units), chunk.continues)
        total = [t + p.grad for t, p in zip(total, model.parameters())]
    return total


@pytest.mark.parametrize("name", ["resnet9", "vit"])
def test_patient_level_dp_step_matches_naive_loop(name):
    """One DP-SGD step through the training loop (noise off, patients spanning chunks): per patient,
    sum its images' gradients, clip, add up, divide by the expected number of patients."""
    torch.manual_seed(0)
    units = _patients(PATIENT_SIZES)
    n = sum(PATIENT_SIZES)
    x, y = torch.randn(n, 1, 16, 16).double(), (torch.rand(n, 3) > 0.5).double()
    y[torch.rand(n, 3) < 0.2] = float("nan")
    model = build_model(name, 3, "mish", 16).double()
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64), reduction="none")
    want, norms, max_norm = naive_clipped_sum(model, lambda idx: criterion(model(x[idx]), y[idx]), units)
    assert ((max_norm / (norms + 1e-6)) < 1).sum() >= 3  # half the patients get clipped

    assert_tensors_close(_dp_step(model, criterion, TensorDataset(x, y), units, max_norm), want, 1e-12, name)


def _dp_step(model, criterion, dataset, units, max_norm, views=1):
    """The update of one noise-free DP-SGD step of a copy of ``model`` through the training loop, times
    the expected batch (4): the clipped sum it applied."""
    model = copy.deepcopy(model)  # the engine hooks the model it trains
    before = [p.detach().clone() for p in model.parameters()]
    setup = privatize(model, torch.optim.SGD(model.parameters(), lr=1.0), sample_rate=0.5, expected_batch_size=4,
                      steps=1, accountant="rdp", max_grad_norm=max_norm, grad_sample_mode="bookkeeping",
                      noise_multiplier=0.0)
    train_one_epoch(setup.model, criterion, setup.optimizer, dataset, units, EpochProgress([list(range(len(units)))]),
                    "cpu", 4, setup.backward, list(range(len(dataset))), "test", views=views)
    assert setup.accountant.history == [(0.0, 0.5, 1)]
    return [(b - p.detach()) * 4 for b, p in zip(before, model.parameters())]


def test_augmentation_multiplicity_averages_views_before_the_patients_clip():
    """dp.augmult K: each image's K views' gradients are averaged, a patient's images summed, then
    clipped as one, against a naive loop; so leaving out a patient moves the update by at most C, as
    without views. Views of one patient span several physical chunks (4 items per chunk)."""
    views = 3
    torch.manual_seed(0)
    images = _patients(PATIENT_SIZES)
    n = sum(PATIENT_SIZES)
    x, y = torch.randn(n, views, 1, 16, 16).double(), (torch.rand(n, 3) > 0.5).double()
    model = build_model("resnet9", 3, "mish", 16).double()
    criterion = MaskedBCEWithLogitsLoss(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64), reduction="none")
    mean_over_views = lambda idx: torch.stack([criterion(model(x[idx, k]), y[idx])  # noqa: E731
                                              for k in range(views)]).mean(0)
    want, norms, max_norm = naive_clipped_sum(model, mean_over_views, images)
    assert ((max_norm / (norms + 1e-6)) < 1).sum() >= 3  # half the patients get clipped

    class Views(torch.utils.data.Dataset):  # item i: view i % K of image i // K, as CXRDataset(views=K) lists them
        def __len__(self):
            return n * views

        def __getitem__(self, i):
            return x[i // views, i % views], y[i // views]

    units = with_views(images, views)
    assert [len(u) for u in units] == [views * len(u) for u in images]
    full = _dp_step(model, criterion, Views(), units, max_norm, views)
    assert_tensors_close(full, want, 1e-12, "augmult")
    for left_out in (int(np.argmax(PATIENT_SIZES)), 0):
        rest = _dp_step(model, criterion, Views(), units[:left_out] + units[left_out + 1:], max_norm, views)
        moved = math.sqrt(sum(float(((f - r) ** 2).sum()) for f, r in zip(full, rest)))
        assert moved <= max_norm + 1e-9


class _Centre(nn.Module):
    def forward(self, h):
        return h - h.mean(0)  # mixes the images of a batch


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)

    def forward(self, x):  # B, T, 4 run as T, B, 4
        return self.mix(x.transpose(0, 1)).transpose(0, 1).sum((1, 2))


def test_layers_that_mix_the_batch_or_change_the_maths_are_refused(monkeypatch):
    with pytest.raises(InputError, match=r"module 1 \(torch.nn.modules.batchnorm.BatchNorm2d\) is not on the allow"):
        check_allowed(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False)), ())
    with pytest.raises(InputError, match="_Centre"):
        check_allowed(nn.Sequential(nn.Linear(4, 4), _Centre()), ())
    with pytest.raises(InputError, match="_StandardisedConv"):
        check_allowed(nn.Sequential(_StandardisedConv(1, 4, 3)), ())
    with pytest.raises(InputError, match=r"_StandardisedConv\) is not on the allow"):
        BookKeeping(nn.Sequential(_StandardisedConv(1, 4, 3)), 1.0)
    # even when let through the allow-list, the probe sees the mixing
    for model, shape in [(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False)), (1, 6, 6)),
                         (nn.Sequential(nn.Linear(4, 4), _Centre()), (4,)), (_SequenceFirst(), (3, 4))]:
        with pytest.raises(InputError, match="mixes the images of a batch"):
            check_batch_independence(model, shape)
    for name in ("resnet9", "vit"):  # the project's models pass both checks
        model = build_model(name, 2, "mish", 16)
        check_batch_independence(model, (1, 16, 16))
    # a first dimension that is not the batch, by size, fails at the tap too, should it get past the probe
    monkeypatch.setattr(per_sample, "check_batch_independence", lambda model, shape: None)
    model = _SequenceFirst()
    clipper = BookKeeping(model, 1.0, reviewed=(_SequenceFirst,))
    with pytest.raises(InputError, match="losses .* for a forward pass of 5 examples"):
        clipper.backward(model(torch.randn(3, 5, 4)))


def _random_model(rng: np.random.Generator) -> nn.Module:
    """A small CNN from the allowed vocabulary, with the options the layers take."""
    acts = [nn.Mish, nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU]
    layers, channels, side = [], int(rng.integers(1, 3)), 8
    for _ in range(int(rng.integers(1, 3))):
        out = int(rng.choice([2, 4, 6]))
        groups = int(rng.choice([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
        stride, kernel = int(rng.integers(1, 3)), int(rng.choice([1, 3]))
        layers.append(nn.Conv2d(channels, out, kernel, stride, kernel // 2, groups=groups, bias=bool(rng.integers(2))))
        side = (side - 1) // stride + 1
        if rng.integers(2):
            layers.append(nn.GroupNorm(int(rng.choice([1, 2])), out))
        layers.append(acts[int(rng.integers(len(acts)))]())
        if side >= 4 and rng.integers(2):
            layers.append(nn.MaxPool2d(2) if rng.integers(2) else nn.AvgPool2d(2))
            side //= 2
        channels = out
    layers.append(nn.AdaptiveAvgPool2d(2))
    if rng.integers(2):
        layers.append(nn.LayerNorm([channels, 2, 2]))  # over every non-batch dimension
    hidden = int(rng.choice([3, 5]))
    layers += [nn.Flatten(), nn.Dropout(0.0), nn.Linear(4 * channels, hidden)]
    if rng.integers(2):
        layers.append(nn.GroupNorm(1, hidden))  # on an (N, C) input
    layers += [acts[int(rng.integers(len(acts)))](), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("seed", range(12))
def test_random_allowed_models_clip_each_patient_to_c(seed, monkeypatch):
    """Property: for random models of the allowed vocabulary and random patients, the engine equals
    the naive loop and leaving out any one patient moves the clipped sum by at most C."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(bookkeeping, "GHOST_RATIO", int(rng.choice([0, 8, 10**9])))
    torch.manual_seed(seed)
    model = _random_model(rng).double()
    check_allowed(model, ())
    sizes = [int(v) for v in rng.integers(1, 7, size=6)]
    units = _patients(sizes, seed)
    x, y = torch.randn(sum(sizes), int(model[0].in_channels), 8, 8).double(), torch.randn(sum(sizes), 2).double()
    loss_of = lambda idx: ((model(x[idx]) - y[idx]) ** 2).sum(1)  # noqa: E731
    want, _, max_norm = naive_clipped_sum(model, loss_of, units)
    clipper = BookKeeping(model, max_norm)
    full = _engine_clipped_sum(clipper, model, loss_of, units)
    assert_tensors_close(full, want, 1e-9, str(model))
    for left_out in range(len(units)):
        rest = _engine_clipped_sum(clipper, model, loss_of, units[:left_out] + units[left_out + 1:])
        moved = math.sqrt(sum(float(((f - r) ** 2).sum()) for f, r in zip(full, rest)))
        assert moved <= max_norm + 1e-9, f"leaving out patient {left_out} moved the clipped sum by {moved / max_norm} C"
