"""Models build for grayscale input and load local pretrained weights, never downloading."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from config import InputError
from models import build_model, load_pretrained


@pytest.mark.parametrize("name", ["resnet9", "resnet18", "resnet34", "resnet50", "vit"])
def test_models_take_one_channel_and_give_one_logit_per_label(name):
    model = build_model(name, 5, "mish", 32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet9_is_the_studys_layout():
    model = build_model("resnet9", 8, "mish", 64)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert sum(isinstance(m, torch.nn.Mish) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))


def test_imagenet_style_rgb_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    rgb = resnet18().state_dict()  # same key names as torchvision's ImageNet file
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(rgb, path)
    model = build_model("resnet18", 3, "relu", 32)
    fresh = load_pretrained(model, path)
    assert torch.allclose(model.conv1.weight, rgb["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])
    # BatchNorm statistics have no GroupNorm counterpart; the 1000-class head does not fit 3 labels
    assert "fc.weight" in fresh and "fc.bias" in fresh


def test_missing_or_unfit_checkpoint_is_a_clear_error(tmp_path):
    model = build_model("resnet9", 3, "mish", 32)
    with pytest.raises(InputError, match="never downloaded"):
        load_pretrained(model, tmp_path / "imagenet.pth")
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="no weights that fit"):
        load_pretrained(model, tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="broken.pt"):
        load_pretrained(model, tmp_path / "broken.pt")
