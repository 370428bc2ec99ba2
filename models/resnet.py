"""ResNets for grayscale radiographs that Opacus and the book-keeping engine can train per sample.

``resnet9`` is the study's model: torchvision's ResNet with BasicBlock and layers [1, 1, 1, 1];
``resnet18``/``resnet34`` (BasicBlock) and ``resnet50`` (Bottleneck) likewise. Every BatchNorm becomes
GroupNorm(32, C) (BatchNorm mixes the images of a batch, which DP-SGD forbids) and the activation is
Mish (the study) or ReLU. Residual adds and activations are out of place: Opacus' backward hooks fail
on in-place edits of a hooked GroupNorm output.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


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
