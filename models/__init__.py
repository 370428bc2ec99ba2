"""Classifiers for grayscale radiographs, built to work with per-sample gradients: the ResNets
(``models/resnet.py``, the study's ``resnet9`` among them) and a small ViT (``models/vit.py``).

All take a single input channel. ImageNet or earlier-study weights come only from local files
(``load_pretrained``); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models.resnet import ResNet

from artifacts import Layout, load_checkpoint
from config import InputError
from models.resnet import _OutOfPlaceBasicBlock, _OutOfPlaceBottleneck, resnet
from models.vit import ViT, _Attention, _EncoderBlock

# Composite modules whose forward code treats every image of a batch on its own (reviewed; the DP
# set-up also probes it): with the layers they contain, what DP-SGD may train (privacy.per_sample).
PER_IMAGE_MODELS = (ResNet, _OutOfPlaceBasicBlock, _OutOfPlaceBottleneck, ViT, _EncoderBlock, _Attention)


def build_model(name: str, num_classes: int, activation: str, image_size: int) -> nn.Module:
    if name == "vit":
        return ViT(image_size, num_classes, activation=activation)
    return resnet(name, num_classes, activation)


NORMS = (nn.GroupNorm, nn.LayerNorm)
HEAD = "fc"  # every model's last layer


def resolve_trainable(trainable: str | list[str], pretrained: bool) -> str | list[str]:
    """``training.trainable`` with ``auto`` made explicit: norms_and_head from a pretrained model, all
    from scratch (a random network's normalisation layers alone learn nothing useful)."""
    if trainable != "auto":
        return trainable
    return "norms_and_head" if pretrained else "all"


def set_trainable(model: nn.Module, trainable: str | list[str]) -> int:
    """Freeze every parameter outside ``training.trainable`` (resolved) and return how many values still train.

    ``all``; ``head`` (the last layer); ``norms_and_head`` (GroupNorm/LayerNorm scales and shifts and the
    last layer: under DP-SGD the noise grows with the number of trained values, so fine-tuning a few
    thousand of them from a good start costs far less accuracy than all millions); or module-name
    prefixes (``[layer4, fc]``). Frozen layers get no gradient and no noise.
    """
    if trainable == "all":
        return sum(p.requires_grad_(True).numel() for p in model.parameters())
    prefixes = [HEAD] if trainable in ("head", "norms_and_head") else list(trainable)
    if trainable == "norms_and_head":
        prefixes += [name for name, module in model.named_modules() if isinstance(module, NORMS)]
    unknown = [prefix for prefix in prefixes
               if not any(name.startswith(f"{prefix}.") for name, _ in model.named_parameters())]
    if unknown:
        tops = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
        raise InputError(f"training.trainable: {unknown} name no parameter of this {type(model).__name__} "
                         f"(its top-level modules: {tops})")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(f"{prefix}.") for prefix in prefixes))
        count += param.numel() if param.requires_grad else 0
    return count


def read_pretrained(path: str | Path) -> dict:
    """The checkpoint ``model.pretrained_checkpoint`` names: a DP-CXR experiment folder (its
    ``checkpoints/best.pt``), a DP-CXR checkpoint (with its ``provenance``), or a plain state dict such as
    torchvision's ImageNet ``resnet18-f37072fd.pth`` saved beforehand, as ``{"model": it}``."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = Layout(path).best
    if not path.is_file():
        raise InputError(f"model.pretrained_checkpoint: {path} not found. Weights are never downloaded: "
                         f"put a local .pt/.pth file (e.g. torchvision ImageNet weights) or an experiment folder there")
    return load_checkpoint(path, state_dict_ok=True)


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from a local file (:func:`read_pretrained`); returns the names of layers left
    at random init. An RGB first convolution is summed over its colour channels for grayscale input; the
    classification head is kept only when its shape matches (different label sets start a new head).
    """
    state = read_pretrained(path)["model"]
    own = model.state_dict()
    conv1 = "conv1.weight" if "conv1.weight" in own else "patch_embed.weight"
    if conv1 in state and state[conv1].dim() == 4 and state[conv1].shape[1] == 3 and own[conv1].shape[1] == 1:
        state[conv1] = state[conv1].sum(dim=1, keepdim=True)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise InputError(f"model.pretrained_checkpoint: {path} has no weights that fit this model "
                         f"(is it for another architecture?)")
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)
