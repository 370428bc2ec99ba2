"""The DP engines refuse a model that mixes the images of a batch when they are built, whoever builds them.

``BookKeeping`` and ``privatize`` are what a researcher reuses outside the training command (in a
notebook); the guard must not depend on the training set-up having run it first. A batch-mixing module
makes one patient's gradient depend on the other patients' images, so clipping each patient's summed
gradient to C would no longer bound that patient's influence.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from config import InputError
from models import build_model
from privacy import per_sample
from privacy.bookkeeping import BookKeeping
from Train_Valid_DP import privatize

MODES = ["bookkeeping", "hooks", "ew", "functorch"]


def _bookkeeping(model, **guard):
    return BookKeeping(model, 1.0, **guard)


def _privatize(mode):
    def build(model, **guard):
        return privatize(model, torch.optim.SGD(model.parameters(), lr=0.1), sample_rate=0.5, expected_batch_size=4,
                         steps=1, accountant="rdp", max_grad_norm=1.0, grad_sample_mode=mode, noise_multiplier=1.0,
                         **guard)
    return build


ENGINES = {"BookKeeping": _bookkeeping, **{f"privatize-{mode}": _privatize(mode) for mode in MODES}}


class _Centre(nn.Module):
    """Parameter-free, and mixes the batch: every image's output depends on the batch mean."""

    def forward(self, h):
        return h - h.mean(0)


def _conv_then(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), module, nn.Flatten(), nn.Linear(4 * 14 * 14, 2))


def _hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("module, expected", [
    (nn.BatchNorm2d(4, affine=False), (r"1 \(torch\.nn\.modules\.batchnorm\.BatchNorm2d\) .*expected "
                                       r"GroupNorm\(4, 4, eps=1e-05, affine=False")),
    (nn.SyncBatchNorm(4), r"1 \(torch\.nn\.modules\.batchnorm\.SyncBatchNorm\) .*expected GroupNorm\(4, 4"),
    (nn.InstanceNorm2d(4, track_running_stats=True),
     r"1 \(torch\.nn\.modules\.instancenorm\.InstanceNorm2d\) .*expected only per-image operations"),
], ids=["batchnorm-without-parameters", "syncbatchnorm", "instancenorm-running-stats"])
def test_engines_refuse_batch_norms_when_built(engine, module, expected):
    """BatchNorm2d(affine=False) has no parameters (Opacus' validator and a parameter-based check miss
    it); InstanceNorm with running statistics keeps batch averages of the private images in buffers.
    Refused when the engine is built, before it hooks the model, with Opacus' replacement if allowed."""
    model = _conv_then(module)
    with pytest.raises(InputError, match=r"DP-SGD: module " + expected):
        ENGINES[engine](model, example_shape=(1, 16, 16))
    assert not _hooked(model)
    with pytest.raises(InputError, match=r"sensitivity bound C"):
        ENGINES[engine](model)  # refused even without an example shape: the allow-list needs none


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_probe_a_reviewed_module_that_mixes_the_batch(engine):
    """A composite the caller declares reviewed passes the allow-list; the probe still sees it mix the batch:
    at construction given an example shape, else on the first batch, before that forward runs."""
    with pytest.raises(InputError, match=r"module 1 \(test_engine_guard\._Centre\) is not on the allow-list"):
        ENGINES[engine](_conv_then(_Centre()))
    mixes = r"module 1 \(test_engine_guard\._Centre\) mixes the images of a batch.*sensitivity bound C"
    with pytest.raises(InputError, match=mixes):
        ENGINES[engine](_conv_then(_Centre()), example_shape=(1, 16, 16), reviewed=(_Centre,))
    model = _conv_then(_Centre())
    setup = ENGINES[engine](model, reviewed=(_Centre,))
    forward = model if isinstance(setup, BookKeeping) else setup.model
    for _ in range(2):  # refused until the probe passes: catching the error does not unlock training
        with pytest.raises(InputError, match=mixes):
            forward(torch.randn(5, 1, 16, 16))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(1, 16, 16), None], ids=["example-shape", "first-batch"])
def test_allowed_model_is_built_and_trains(engine, shape, monkeypatch):
    """The project's resnet9 (GroupNorm) passes both checks, probed once: at construction or on its first
    batch; the engine then computes gradients as before."""
    probed = []
    probe = per_sample.check_batch_independence
    monkeypatch.setattr(per_sample, "check_batch_independence", lambda m, s: probed.append(s) or probe(m, s))
    torch.manual_seed(0)
    model = build_model("resnet9", 2, "mish", 16)
    setup = ENGINES[engine](model, **({} if shape is None else {"example_shape": shape}))
    assert probed == ([] if shape is None else [shape])
    x, y = torch.randn(4, 1, 16, 16), torch.rand(4, 2)
    for _ in range(2):
        if isinstance(setup, BookKeeping):
            setup.backward(nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none").mean(1))
        else:
            setup.optimizer.zero_grad(set_to_none=True)
            out = setup.model(x)
            losses = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1)
            setup.backward(losses, None, False)
        assert all(p.grad is not None or getattr(p, "grad_sample", None) is not None for p in model.parameters())
    assert probed == [(1, 16, 16)]
