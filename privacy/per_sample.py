"""What a model trained with DP-SGD may contain: operations that never mix two images of a batch.

Per-sample clipping bounds one unit's influence only if image i's output depends on image i alone.
A layer that mixes the batch (BatchNorm, even without affine parameters, or a ``h - h.mean(0)`` in
a forward) lets one patient move every other image's gradient: measured leave-one-out
sensitivities of 2.7 C and 3.2 C. Opacus' validator looks only at modules with parameters, so
DP-CXR checks two things before training:

* an allow-list of exact module types (a subclass may change the maths, e.g. a Conv2d that
  standardises its weight): parametrised layers whose per-sample gradients are computed exactly,
  parameter-free per-image operations, containers, and the composite modules of ``models`` whose
  forward code was reviewed for the same property;
* a probe: replacing image 0 of a batch of three must leave every module's output for images 1
  and 2 unchanged, and every module's output must keep the batch on dimension 0.
"""
from __future__ import annotations

import torch
from torch import nn

from config import InputError

PARAMETRISED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
PER_IMAGE = (nn.ReLU, nn.Mish, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity,
             nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def check_allowed(model: nn.Module, reviewed: tuple[type, ...]) -> None:
    """Refuse any module whose exact type is not on the allow-list (``reviewed``: composites whose
    forward is known to be per-image); parameters may belong only to ``PARAMETRISED`` layers."""
    for name, module in model.named_modules():
        kind = type(module)
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if kind in PARAMETRISED or (kind in PER_IMAGE + CONTAINERS + reviewed and not owns_parameters):
            continue
        raise InputError(f"DP-SGD: module {name or 'model'} ({kind.__module__}.{kind.__name__}) is not on the "
                         f"allow-list of per-image operations (layers: {', '.join(t.__name__ for t in PARAMETRISED)}; "
                         f"activations, pooling, dropout, flatten, identity; the models of models/); a layer that "
                         f"mixes the images of a batch would break the clipping bound")


def check_batch_independence(model: nn.Module, image_shape: tuple[int, ...], device) -> None:
    """Run the probe on random images of ``image_shape``; the model's RNG use (dropout) is replayed
    alike for both passes and the global RNG state is left as it was."""
    outputs: list[list[tuple[str, torch.Tensor]]] = [[], []]
    record = outputs[0]

    def hook(name):
        def keep(module, inputs, output):
            if isinstance(output, torch.Tensor):
                record.append((name, output.detach()))
        return keep

    handles = [m.register_forward_hook(hook(name or "model")) for name, m in model.named_modules()]
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, *image_shape, generator=generator)
    changed = batch.clone()
    changed[0] = torch.rand(image_shape, generator=generator) * 4 - 2
    was_training = model.training
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k, x in enumerate((batch, changed)):
                record = outputs[k]
                torch.manual_seed(0)
                model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for (name, before), (_, after) in zip(*outputs):
        if before.dim() == 0 or before.shape[0] != 3:
            raise InputError(f"DP-SGD: module {name} gives an output of shape {tuple(before.shape)} for a batch of 3 "
                             f"images: every layer must keep the batch on dimension 0")
        scale = before[1:].abs().max().clamp(min=1e-6)
        if (before[1:] - after[1:]).abs().max() > 1e-4 * scale:
            raise InputError(f"DP-SGD: module {name} mixes the images of a batch (changing one image changed "
                             f"the others' outputs); per-sample clipping would not bound a patient's influence")
