"""What a model trained with DP-SGD may contain: operations that never mix two images of a batch.

Per-sample clipping bounds one unit's influence by C only if image i's output depends on image i
alone. A layer that mixes the batch (BatchNorm, even without affine parameters, or a
``h - h.mean(0)`` in a forward) makes one patient's gradient depend on the other patients' images,
which breaks the per-patient sensitivity bound C: measured leave-one-out sensitivities of 2.7 C and
3.2 C. Opacus' ``ModuleValidator.validate`` visits only modules with trainable parameters, so it
passes a ``BatchNorm2d(affine=False)``. :func:`check_per_image` checks two things; the DP engines
(``privacy.bookkeeping.BookKeeping`` and ``Train_Valid_DP.privatize``) call it when they are built,
so a caller that reuses them outside the training command cannot skip it:

* an allow-list of exact module types (a subclass may change the maths, e.g. a Conv2d that
  standardises its weight): parametrised layers whose per-sample gradients are computed exactly,
  parameter-free per-image operations, containers, and the composite modules of ``models`` whose
  forward code was reviewed for the same property (or that a caller declares reviewed). A refused
  module that Opacus' ``ModuleValidator.fix`` replaces by an allowed one (BatchNorm by GroupNorm) is
  named with its replacement. InstanceNorm is not on it (with running statistics it keeps batch
  averages of the private images in buffers that are released without noise);
* a probe: replacing image 0 of a batch of three must leave every module's output for images 1
  and 2 unchanged, and every module's output must keep the batch on dimension 0.
"""
from __future__ import annotations

import copy
import itertools

import torch
from opacus.validators import ModuleValidator
from torch import nn

from config import InputError
from models import PER_IMAGE_MODELS

PARAMETRISED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
PER_IMAGE = (nn.ReLU, nn.Mish, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity,
             nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


BOUND = "breaks the per-patient sensitivity bound C (one patient's images would change the others' gradients)"


def _qualified(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _expected(module: nn.Module) -> str:
    """What to use instead: Opacus' fix for the module's type where that is on the allow-list."""
    fixer = ModuleValidator.FIXERS.get(type(module))
    replacement = fixer(module) if fixer is not None else None
    if replacement is not None and type(replacement) in PARAMETRISED + PER_IMAGE:
        return f"expected {replacement!r} in its place (what Opacus' ModuleValidator.fix puts there)"
    return (f"expected only per-image operations (layers: {', '.join(t.__name__ for t in PARAMETRISED)}; "
            f"activations, pooling, dropout, flatten, identity; the models of models/, or composites "
            f"passed as reviewed)")


def check_allowed(model: nn.Module, reviewed: tuple[type, ...]) -> None:
    """Refuse any module whose exact type is not on the allow-list (``reviewed``: composites whose
    forward is known to be per-image); parameters may belong only to ``PARAMETRISED`` layers. Modules
    are looked at, not parameters: a parameter-free BatchNorm is refused too."""
    for name, module in model.named_modules():
        kind = type(module)
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if kind in PARAMETRISED or (kind in PER_IMAGE + CONTAINERS + reviewed and not owns_parameters):
            continue
        raise InputError(f"DP-SGD: module {name or 'model'} ({_qualified(module)}) is not on the allow-list of "
                         f"per-image operations: a module that mixes the images of a batch (BatchNorm, even "
                         f"without parameters) {BOUND}; {_expected(module)}")


def check_per_image(model: nn.Module, example_shape: tuple[int, ...] | None = None,
                    reviewed: tuple[type, ...] = ()) -> None:
    """The DP engines' guard, run when they are built: refuse (``InputError``) a module off the
    allow-list now (``models.PER_IMAGE_MODELS`` and ``reviewed`` are the reviewed composites), then
    probe. The probe runs now on random images of ``example_shape`` (one image, e.g. (1, H, W)), or,
    without one, on a copy of the model taken now, with the shape of the first input the model is
    called on, before that forward runs; every forward is refused until the probe passes."""
    check_allowed(model, PER_IMAGE_MODELS + tuple(reviewed))
    if example_shape is not None:
        check_batch_independence(model, tuple(example_shape))
        return
    # a copy: the forward may run inside a wrapper (Opacus' expanded weights) that swaps the model's parameters
    snapshot = copy.deepcopy(model)

    def probe_first_batch(module, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise InputError("DP-SGD: the model's first input is not a batch of images the batch-independence "
                             "probe can copy the shape of; build the engine with example_shape")
        check_batch_independence(snapshot, tuple(inputs[0].shape[1:]))
        handle.remove()

    handle = model.register_forward_pre_hook(probe_first_batch)


def check_batch_independence(model: nn.Module, image_shape: tuple[int, ...]) -> None:
    """Run the probe on random images of ``image_shape``, on the model's device, in its floating-point
    dtype and without autocast; the model's RNG use (dropout) is replayed alike for both passes and
    the global RNG state is left as it was."""
    outputs: list[list[tuple[str, nn.Module, torch.Tensor]]] = [[], []]
    record = outputs[0]

    def hook(name):
        def keep(module, inputs, output):
            if isinstance(output, torch.Tensor):
                record.append((name, module, output.detach()))
        return keep

    tensors = itertools.chain(model.parameters(), model.buffers())
    like = next((t for t in tensors if t.is_floating_point()), torch.empty(0))
    device = like.device
    handles = [m.register_forward_hook(hook(name or "model")) for name, m in model.named_modules()]
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, *image_shape, generator=generator)
    changed = batch.clone()
    changed[0] = torch.rand(image_shape, generator=generator) * 4 - 2
    was_training = model.training
    try:
        model.train()
        with (torch.no_grad(), torch.autocast(device.type, enabled=False),
              torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):
            for k, x in enumerate((batch, changed)):
                record = outputs[k]
                torch.manual_seed(0)
                model(x.to(device, like.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for (name, module, before), (_, _, after) in zip(*outputs):
        if before.dim() == 0 or before.shape[0] != 3:
            raise InputError(f"DP-SGD: module {name} ({_qualified(module)}) gives an output of shape "
                             f"{tuple(before.shape)} for a batch of 3 images: every layer must keep the batch on "
                             f"dimension 0")
        scale = before[1:].abs().max().clamp(min=1e-6)
        if (before[1:] - after[1:]).abs().max() > 1e-4 * scale:
            raise InputError(f"DP-SGD: module {name} ({_qualified(module)}) mixes the images of a batch (changing "
                             f"one image changed the others' outputs), which {BOUND}; expected modules that treat "
                             f"each image on its own (GroupNorm instead of BatchNorm)")
