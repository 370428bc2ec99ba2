"""Exact per-sample clipping: book-keeping and Opacus' engines against a naive per-example loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from config import InputError
from models import ViT, build_model
from privacy import bookkeeping
from privacy.bookkeeping import BookKeeping
from Train_Valid_DP import EpochProgress, MaskedBCEWithLogitsLoss, draw_epoch, privatize, train_one_epoch



def naive_clipped_sum(model: nn.Module, loss_of, batch: int, max_norm: float | None = None):
    """sum_i min(1, C/(||g_i|| + 1e-6)) g_i from one backward per example; C = median norm if None."""
    grads = []
    for i in range(batch):
        model.zero_grad(set_to_none=True)
        loss_of(slice(i, i + 1)).sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in per)) for per in grads])
    max_norm = float(norms.median()) if max_norm is None else max_norm
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    model.zero_grad(set_to_none=True)
    return [sum(f * per[k] for f, per in zip(factors, grads)) for k in range(len(grads[0]))], norms, max_norm


def assert_close(got, want, what):
    for k, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max().clamp(min=1e-12)
        assert (g - w).abs().max() <= 1e-5 * scale, f"{what}: parameter {k} off by {(g - w).abs().max() / scale:.2e}"


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
    torch.manual_seed(0)
    model = Layers().to(dtype)
    x, y = torch.randn(6, 2, 16, 16, dtype=dtype), torch.randn(6, 3, dtype=dtype)
    loss_of = lambda idx: ((model(x[idx]) - y[idx]) ** 2).sum(1)  # noqa: E731
    want, norms, max_norm = naive_clipped_sum(model, loss_of, 6)
    clipper = BookKeeping(model, max_norm)
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
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)  # expected batch = 8
    setup = privatize(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, accountant="rdp",
                      max_grad_norm=max_norm, grad_sample_mode=mode, noise_multiplier=0.0)
    setup.backward(criterion(setup.model(x), y))
    setup.optimizer.step()
    steps = [(b - p.detach()) * batch for b, p in zip(before, model.parameters())]
    assert_close(steps, want, f"{name} {mode}")
    assert len(setup.engine.accountant.history) == 1


def test_bookkeeping_spends_and_noises_exactly_like_opacus():
    """Same seed, sigma and batches: identical weights and accountant history to Opacus' hooks."""
    def run(mode):
        torch.manual_seed(3)
        model = build_model("resnet9", 2, "mish", 16).double()
        x, y = torch.randn(40, 1, 16, 16).double(), (torch.rand(40, 2) > 0.5).double()
        loader = DataLoader(TensorDataset(x, y), batch_size=10, generator=torch.Generator().manual_seed(0))
        setup = privatize(model, torch.optim.SGD(model.parameters(), lr=0.5), loader, accountant="rdp",
                          max_grad_norm=0.1, grad_sample_mode=mode, target_epsilon=4.0, delta=1e-3, epochs=1,
                          noise_generator=torch.Generator().manual_seed(5))
        criterion = MaskedBCEWithLogitsLoss(torch.ones(2, dtype=torch.float64), reduction="none")
        for xb, yb in setup.loader:  # Poisson batches
            setup.optimizer.zero_grad(set_to_none=True)
            setup.backward(criterion(setup.model(xb), yb))
            setup.optimizer.step()
        return [p.detach() for p in model.parameters()], setup.engine.accountant.history, setup.noise_multiplier

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
    with pytest.raises(InputError, match=r"layer 1 \(BatchNorm1d\) is not supported"):
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
        loader = DataLoader(TensorDataset(x, y), batch_size=10, generator=torch.Generator().manual_seed(1))
        setup = privatize(model, torch.optim.SGD(model.parameters(), lr=0.5), loader, accountant="rdp",
                          max_grad_norm=0.5, grad_sample_mode="bookkeeping", noise_multiplier=1.0,
                          noise_generator=torch.Generator().manual_seed(2))
        forward = torch.compile(setup.model) if compiled and fixed_shape else setup.model
        progress = EpochProgress(draw_epoch(setup.loader))
        train_one_epoch(forward, MaskedBCEWithLogitsLoss(torch.ones(2), reduction="none"), setup.optimizer,
                        setup.loader, progress, "cpu", 4, setup.backward, list(range(30)), "test",
                        fixed_shape=fixed_shape)
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
