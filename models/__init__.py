"""Classifiers for grayscale radiographs, built to work with Opacus' per-sample gradients.

- ``resnet9``: the study's model, torchvision's ResNet with BasicBlock and layers [1, 1, 1, 1];
  ``resnet18``/``resnet34`` (BasicBlock) and ``resnet50`` (Bottleneck) likewise.
  Every BatchNorm becomes GroupNorm(32, C) (BatchNorm mixes samples, which DP-SGD forbids) and the
  activation is Mish (the study) or ReLU. Residual adds and activations are out of place: Opacus'
  backward hooks fail on in-place edits of a hooked GroupNorm output.
- ``vit``: a small Vision Transformer for small images, from Opacus-supported layers only (Conv2d
  patch embedding, Embedding for the class token and positions, Linear, LayerNorm).

All take a single input channel. ImageNet or earlier-study weights come only from local files
(``load_pretrained``); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from artifacts import Layout, load_checkpoint
from config import InputError


class _OutOfPlaceBasicBlock(BasicBlock):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _OutOfPlaceBottleneck(Bottleneck):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


RESNETS = {
    "resnet9": (_OutOfPlaceBasicBlock, [1, 1, 1, 1]),
    "resnet18": (_OutOfPlaceBasicBlock, [2, 2, 2, 2]),
    "resnet34": (_OutOfPlaceBasicBlock, [3, 4, 6, 3]),
    "resnet50": (_OutOfPlaceBottleneck, [3, 4, 6, 3]),
}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def _replace_activations(module: nn.Module, activation: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Mish() if activation == "mish" else nn.ReLU(inplace=False))
        else:
            _replace_activations(child, activation)


def resnet(name: str, num_classes: int, activation: str = "mish") -> ResNet:
    block, layers = RESNETS[name]
    model = ResNet(block, layers, num_classes=num_classes, norm_layer=_group_norm)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _replace_activations(model, activation)
    return model


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, act: type[nn.Module]):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), act(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT; class token and positions are Embeddings so Opacus computes their per-sample grads."""

    def __init__(self, image_size: int, num_classes: int, patch: int = 8, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: int = 4, activation: str = "mish"):
        super().__init__()
        if image_size % patch:
            raise InputError(f"model vit: data.image_size {image_size} must be a multiple of the patch size {patch}")
        act = nn.Mish if activation == "mish" else nn.GELU
        self.tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Embedding(1, dim)
        self.pos_embed = nn.Embedding(self.tokens, dim)
        self.blocks = nn.Sequential(*[_EncoderBlock(dim, heads, mlp_ratio, act) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        positions = torch.arange(self.tokens, device=x.device).expand(b, -1)
        cls = self.cls_token(torch.zeros(b, 1, dtype=torch.long, device=x.device))
        h = torch.cat([cls, patches], dim=1) + self.pos_embed(positions)
        return self.fc(self.norm(self.blocks(h))[:, 0])


# Composite modules whose forward code treats every image of a batch on its own (reviewed; the DP
# set-up also probes it): with the layers they contain, what DP-SGD may train (privacy.per_sample).
PER_IMAGE_MODELS = (ResNet, _OutOfPlaceBasicBlock, _OutOfPlaceBottleneck, ViT, _EncoderBlock, _Attention)


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE with logits that ignores unlabelled entries (NaN targets).

    loss = sum_{i,l} m_il * bce(x_il, y_il) / (B * L), with m_il = 0 where y_il is NaN: exactly
    ``nn.BCEWithLogitsLoss(reduction='mean')`` when nothing is masked, and a mean over the batch of
    per-image terms, which is what Opacus' ``loss_reduction='mean'`` assumes for per-sample gradients.
    ``reduction = 'none'`` gives those per-image terms, sum_l m_il * bce(x_il, y_il) / L (what
    training differentiates: per-sample clipping needs each image's own loss).
    """

    def __init__(self, pos_weight: torch.Tensor, reduction: str = "mean"):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labelled = ~torch.isnan(target)
        loss = F.binary_cross_entropy_with_logits(logits, torch.where(labelled, target, 0.0),
                                                  pos_weight=self.pos_weight, reduction="none")
        per_image = (loss * labelled).sum(dim=1) / max(target.shape[1], 1)
        return per_image if self.reduction == "none" else per_image.sum() / max(len(per_image), 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an input error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("training.device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def build_model(name: str, num_classes: int, activation: str, image_size: int) -> nn.Module:
    if name == "vit":
        return ViT(image_size, num_classes, activation=activation)
    return resnet(name, num_classes, activation)


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from a local file; returns the names of layers left at random init.

    ``path`` is a DP-CXR experiment folder (its ``checkpoints/best.pt``), a DP-CXR checkpoint, or a
    plain state dict such as torchvision's ImageNet ``resnet18-f37072fd.pth`` saved beforehand. An RGB
    first convolution is summed over its colour channels for grayscale input; the classification
    head is kept only when its shape matches (different label sets start a new head).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = Layout(path).best
    if not path.is_file():
        raise InputError(f"model.pretrained_checkpoint: {path} not found. Weights are never downloaded: "
                         f"put a local .pt/.pth file (e.g. torchvision ImageNet weights) or an experiment folder there")
    state = load_checkpoint(path, state_dict_ok=True)["model"]
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
