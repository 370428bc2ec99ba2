"""Training-time augmentation of radiographs (``training.augment``), kept apart from the training loop
as torchvision's classification presets are.

A small set that keeps a chest radiograph plausible: a random resized crop (framing), a small rotation
and translation (positioning), brightness and contrast (exposure), all from ``torchvision.transforms.v2``
on the [1, S, S] float image, each image drawing its own parameters from torch's global generator (the
DataLoader seeds it per worker). A horizontal flip moves the patient's right side to the left, so it
also swaps every ``X_right``/``X_left`` label pair; it is refused when a sided label has no partner.

Under DP-SGD with augmentation multiplicity (``dp.augmult`` K, De et al. 2022) each training image is
seen as K independent draws of this transform in one step, and the loop averages their gradients
before the per-patient clip.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from config import Augment, flip_permutation

class Augmentation:
    """Callable ``(image [1, S, S] in [0, 1], labels [L]) -> (image, labels)``, one random draw per call."""

    def __init__(self, settings: Augment, labels: list[str], size: int):
        steps = []
        if settings.crop:
            steps.append(v2.RandomResizedCrop(size, scale=(1 - settings.crop, 1.0), ratio=(0.9, 1 / 0.9),
                                              antialias=True))
        if settings.rotate or settings.translate:
            steps.append(v2.RandomAffine(degrees=settings.rotate, translate=(settings.translate,) * 2))
        if settings.brightness or settings.contrast:
            steps.append(v2.ColorJitter(brightness=settings.brightness, contrast=settings.contrast))
        self.transform = v2.Compose(steps) if steps else None
        self.swap = torch.tensor(flip_permutation(labels)) if settings.flip else None

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is not None:
            image = self.transform(image)
        if self.swap is not None and torch.rand(()) < 0.5:
            image, target = image.flip(-1), target[self.swap]
        return image, target


def augmentation(settings: Augment, labels: list[str], size: int) -> Augmentation | None:
    """The configured augmentation, or None when every part of it is off."""
    active = settings.flip or any(getattr(settings, key) for key in ("crop", "rotate", "translate", "brightness",
                                                                     "contrast"))
    return Augmentation(settings, labels, size) if active else None
