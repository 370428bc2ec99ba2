"""Mixed precision and channels-last: clipping stays fp32 and exact up to rounding; runs train alike.

Tolerances (bf16 has 8 significant bits: eps = 2^-8): on ResNet9, 32 px, batch 8, the per-image
gradient norms under bf16 autocast were within 0.3% (0.75 eps) of fp32 and the clipped sum within
2.0-2.7% (5-7 eps) -- the same as the error bf16 autocast gives the ordinary (non-private) gradient
of the same batch (2.0-2.6%), because it comes from the bf16 forward/backward (activations and output
gradients rounded at every layer), not from the clipping. So the tests ask: norms within 4 eps;
units clipped differently only where the fp32 norm is within 4 eps of C; the clipped sum's relative
error at most 1.25 times the non-private gradient's and at most 16 eps.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_tensors_close
from main_2D_DP import main
from models import build_model
from privacy import bookkeeping
from privacy.bookkeeping import BookKeeping
from Train_Valid_DP import EpochProgress, MaskedBCEWithLogitsLoss, loader_workers, train_one_epoch

EPS_BF16 = 2.0 ** -8


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def _batch(size=32, n=8, labels=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=generator), (torch.rand(n, labels, generator=generator) > 0.5).float()


def _model(name="resnet9", size=32, labels=3, channels_last=False):
    torch.manual_seed(0)
    model = build_model(name, labels, "mish", size)
    return model.to(memory_format=torch.channels_last) if channels_last else model


CRITERION = MaskedBCEWithLogitsLoss(torch.ones(3), reduction="none")


def _clipped(precision: str, max_norm: float, units=None, channels_last=False, name="resnet9", size=32, n=8):
    """Per-unit norms and clipped sum of the engine, the forward run under ``precision``'s autocast."""
    model = _model(name, size, channels_last=channels_last)
    x, y = _batch(size, n)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    clipper = BookKeeping(model, max_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    norms = clipper.backward(CRITERION(logits.float(), y), units)
    if channels_last:  # the model really is channels-last (a 1-channel conv is both layouts alike)
        assert not model.layer1[0].conv1.weight.is_contiguous()
    return norms, [p.grad for p in model.parameters()]


def _plain_bf16_gradient() -> torch.Tensor:
    """The ordinary (non-private) gradient of the batch, autograd's backward of a bf16-autocast forward."""
    model = _model()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    CRITERION(logits.float(), y).sum().backward()
    return _flat(p.grad for p in model.parameters())


def test_bf16_keeps_norms_clipping_and_clipped_sum_in_fp32(monkeypatch):
    arrived, computed = set(), set()
    real_backward, real_conv, real_linear = bookkeeping._Layer.backward, bookkeeping._Layer._conv, bookkeeping._Layer._linear

    def spy_backward(self, grad, units):
        arrived.add(grad.dtype)
        return real_backward(self, grad, units)

    def spy(real):
        def wrapped(self, a, g, units, ghost):
            computed.update({a.dtype, g.dtype})
            return real(self, a, g, units, ghost)
        return wrapped

    monkeypatch.setattr(bookkeeping._Layer, "backward", spy_backward)
    monkeypatch.setattr(bookkeeping._Layer, "_conv", spy(real_conv))
    monkeypatch.setattr(bookkeeping._Layer, "_linear", spy(real_linear))

    n32, plain32 = _clipped("fp32", float("inf"))  # nothing clipped: the ordinary gradient, in fp32
    c = float(n32.median())  # half the images clipped
    n32, s32 = _clipped("fp32", c)
    arrived.clear(), computed.clear()
    n16, s16 = _clipped("bf16", c)
    assert torch.bfloat16 in arrived  # the output gradients came in bf16 ...
    assert computed == {torch.float32}  # ... and every per-layer product ran in fp32
    assert n16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in s16)

    norm_error = ((n16 - n32).abs() / n32).max()
    assert norm_error <= 4 * EPS_BF16, f"norms off by {norm_error / EPS_BF16:.2f} eps"
    flipped = (n32 > c) != (n16 > c)
    near_c = (n32 - c).abs() <= 4 * EPS_BF16 * c
    assert not (flipped & ~near_c).any(), "a unit far from C was clipped differently under bf16"
    assert (n32 > c).sum() >= 3 and (n32 < c).sum() >= 3

    plain32, plain16 = _flat(plain32), _plain_bf16_gradient()
    plain_error = float((plain16 - plain32).norm() / plain32.norm())
    s32, s16 = _flat(s32), _flat(s16)
    dp_error = float((s16 - s32).norm() / s32.norm())
    assert dp_error <= 1.25 * plain_error and dp_error <= 16 * EPS_BF16, (dp_error, plain_error)


@pytest.mark.parametrize("ghost_ratio, units", [(0, [0, 1, 1, 2, 2, 2]), (10**9, None)],
                         ids=["ghost-norms-patients", "materialised-images"])
def test_channels_last_gives_the_same_clipped_sum(ghost_ratio, units, monkeypatch):
    """Channels-last model and images: the engine runs unchanged (ghost norms over a patient's pairs of
    images; per-image gradients as one grouped convolution), to float tolerance."""
    monkeypatch.setattr(bookkeeping, "GHOST_RATIO", ghost_ratio)
    units = None if units is None else torch.tensor(units)
    c = float(_clipped("fp32", float("inf"), units, size=16, n=6)[0].median())
    norms, grads = _clipped("fp32", c, units, size=16, n=6)
    cl_norms, cl_grads = _clipped("fp32", c, units, channels_last=True, size=16, n=6)
    assert (norms > c).any() and (norms < c).any()  # some units clipped, some not
    assert torch.allclose(cl_norms, norms, rtol=1e-5)
    assert_tensors_close(cl_grads, grads, 1e-5, "channels-last")


def _one_step(scaler, dp_backward=None):
    """One non-private logical step of a small model through the training loop, fp16 autocast on the CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Mish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    progress = EpochProgress([list(range(8))])
    train_one_epoch(model, CRITERION, optimizer, TensorDataset(x, y), [torch.tensor([i]) for i in range(8)], progress,
                    "cpu", 4, dp_backward, list(range(8)), "test", precision="fp16", scaler=scaler)
    assert progress.done == 1  # a skipped step still counts as a step taken
    return [torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]


def test_fp16_scaler_steps_and_skips_overflowing_steps():
    """The gradient-scaler path (CUDA in training; fp16 autocast also runs on the CPU, so it is tested here)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    assert not any(_one_step(scaler)) and scaler.get_scale() == 2.0 ** 10  # an ordinary step
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # overflows fp16 gradients
    assert all(_one_step(huge)) and huge.get_scale() < 2.0 ** 120  # skipped, scale lowered
    with pytest.raises(ValueError, match="cannot account"):
        _one_step(scaler, dp_backward=lambda *args: None)


@pytest.mark.parametrize("override, expected", [
    (["training.precision=fp16"], "fp16 needs CUDA"),  # tiny config: training.device cpu
    (["training.precision=fp16", "training.device=auto"], "fp16 is refused under DP"),
    (["training.precision=bf16", "dp.grad_sample_mode=hooks", "dp.unit=image"], "needs dp.grad_sample_mode bookkeeping"),
    (["training.loader_workers=-1"], "training.loader_workers"),
])
def test_precision_settings_that_cannot_hold_are_refused(tiny_config, capsys, override, expected):
    assert main(["train", "--config", str(tiny_config()), "--set", *override]) == 2
    assert expected in capsys.readouterr().err


def test_fp16_without_cuda_is_refused_at_start(tiny_config, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: training.device auto would use it")
    path = tiny_config(training={"device": "auto", "precision": "fp16"}, dp={"enabled": False})
    assert main(["train", "--config", str(path)]) == 2
    assert "fp16 needs CUDA" in capsys.readouterr().err


def test_loader_workers():
    assert loader_workers(3, 0, "cpu") == 3 and loader_workers(0, 2, "cuda") == 0
    assert loader_workers("auto", 2, "cpu") == 2  # the CPU default is data.num_workers
    on_cuda = loader_workers("auto", 0, torch.device("cuda"))  # only the number is computed: no GPU needed
    assert 0 <= on_cuda <= 8 and loader_workers("auto", 12, "cuda") == 12


def test_tiny_dp_run_in_bf16_channels_last_trains_like_fp32(tiny_config):
    """Same data, batches and noise (reproducible): bf16 + channels-last spends the same epsilon and
    reaches a comparable validation AUROC with nearly the same weights."""
    runs = {}
    for name, training in (("fp32", {}), ("bf16", {"precision": "bf16", "channels_last": True})):
        path = tiny_config(training={"epochs": 1, "logical_batch_size": 32, "physical_batch_size": 16, **training},
                           dp={"secure_mode": False})
        assert main(["train", "--config", str(path), "--name", name]) == 0
        exp = path.parent / "experiments" / name
        runs[name] = (json.loads((exp / "private" / "summary.json").read_text()),
                      torch.load(exp / "private" / "last.pt", weights_only=True)["model"])
    (s32, w32), (s16, w16) = runs["fp32"], runs["bf16"]
    assert s16["steps"] == s32["steps"] and s16["dp"]["epsilon_spent"] == s32["dp"]["epsilon_spent"]
    assert abs(s16["best_valid_auroc_mean"] - s32["best_valid_auroc_mean"]) <= 0.05
    moved = float(sum(((w16[k] - w32[k]) ** 2).sum() for k in w32).sqrt() / sum((w32[k] ** 2).sum() for k in w32).sqrt())
    assert 0 < moved < 0.01  # bf16 did run, and only rounding separates the two


def test_benchmark_batch_search_halves_on_out_of_memory_only(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    tried = []

    def fits(batch):
        tried.append(batch)
        if batch > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert bench.largest_batch(fits, 128) == 16 and tried == [128, 64, 32, 16]
    assert bench.largest_batch(lambda b: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")), 4) == 0
    with pytest.raises(ValueError):
        bench.largest_batch(lambda b: (_ for _ in ()).throw(ValueError("a real bug")), 4)
