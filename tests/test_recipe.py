"""The DP recipe's parts (issue 27): augmentation and its multiplicity, the weight average, the
learning-rate schedule, partial fine-tuning, and the cached public pretraining; each in training,
resume and refusal."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import Train_Valid_DP
from config import Augment, ConfigError, flip_permutation, load_config
from data.augment import augmentation
from main_2D_DP import main
from models import build_model, set_trainable
from test_training import _assert_same_run, _exp, _killed_in_second_epoch, _weights
from Train_Valid_DP import learning_rate_schedule, weight_average

SIDED = ["cardiomegaly", "pleural_effusion_right", "pleural_effusion_left", "atelectasis_left", "atelectasis_right"]


def test_a_flip_mirrors_the_image_and_swaps_every_side_label():
    assert flip_permutation(SIDED) == [0, 2, 1, 4, 3]
    flip = augmentation(Augment(flip=True), SIDED, 8)
    image, target = torch.rand(1, 8, 8), torch.tensor([1.0, 1.0, 0.0, float("nan"), 0.0])
    seen = set()
    for _ in range(40):
        out, labels = flip(image, target)
        mirrored = torch.equal(out, image.flip(-1))
        assert mirrored or torch.equal(out, image)
        want = target[[0, 2, 1, 4, 3]] if mirrored else target
        assert torch.equal(labels.nan_to_num(-1), want.nan_to_num(-1))
        seen.add(mirrored)
    assert seen == {True, False}
    with pytest.raises(ConfigError, match=r"training.augment.flip.*\['pleural_effusion_right'\]"):
        flip_permutation(["cardiomegaly", "pleural_effusion_right"])


def test_augmented_views_are_independent_draws_that_keep_the_image_plausible():
    settings = Augment(crop=0.2, rotate=5, translate=0.05, brightness=0.1, contrast=0.1)
    assert augmentation(Augment(), SIDED, 32) is None
    augment = augmentation(settings, SIDED, 32)
    grid = torch.linspace(-1, 1, 32)
    image = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 0.3).view(1, 32, 32)  # a smooth blob
    target = torch.ones(len(SIDED))
    views = torch.stack([augment(image, target)[0] for _ in range(4)])
    assert views.shape == (4, 1, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert all(not torch.equal(views[i], views[j]) for i in range(4) for j in range(i))
    assert all(float(torch.corrcoef(torch.stack([v.flatten(), image.flatten()]))[0, 1]) > 0.7 for v in views)


def test_the_schedule_warms_up_then_stays_or_follows_a_cosine():
    def rates(schedule, warmup, steps):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        lr_schedule = learning_rate_schedule(optimizer, schedule, warmup, steps)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            lr_schedule.step()
        return out

    assert rates("constant", 0, 5) == pytest.approx([0.1] * 5)
    assert rates("constant", 4, 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    cosine = rates("cosine", 2, 10)
    assert cosine[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert cosine[2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def test_the_weight_average_follows_de_et_al_warm_up():
    model = torch.nn.Linear(2, 1, bias=False).requires_grad_(False)
    average = weight_average(model, 0.9)
    values, want = [1.0, 3.0, -2.0, 5.0, 0.5] + [4.0] * 10, None
    for t, value in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        decay = min(0.9, (1 + t) / (10 + t))
        want = value if want is None else decay * want + (1 - decay) * value
        assert float(average.module.weight[0, 0]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["resnet9", "vit"])
def test_trainable_sets(name):
    model = build_model(name, 3, "mish", 32)
    total = sum(p.numel() for p in model.parameters())
    head = set_trainable(model, "head")
    assert head == sum(p.numel() for p in model.fc.parameters())
    norms = set_trainable(model, "norms_and_head")
    assert head < norms < total / 50
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "fc.weight" in trained and not any("conv" in n or "qkv" in n for n in trained)
    assert set_trainable(model, "all") == total and all(p.requires_grad for p in model.parameters())


RECIPE = {"training": {"trainable": ["layer4", "fc"], "schedule": "cosine", "warmup_steps": 2, "ema": 0.9,
                       "augment": {"crop": 0.2, "rotate": 5, "translate": 0.05, "brightness": 0.1,
                                   "contrast": 0.1, "flip": True}},
          "dp": {"augmult": 2}}


def test_recipe_trains_resumes_exactly_and_refuses_changes(tiny_config, monkeypatch, capsys):
    """Augmented views, the average, the schedule and a frozen body together: frozen weights never move,
    best.pt holds the averaged weights, an interrupted run resumes to the same weights and average, and
    a resume may not change views, average or what trains."""
    path = tiny_config(**RECIPE)
    assert main(["train", "--config", str(path), "--name", "straight"]) == 0
    _killed_in_second_epoch(path, "broken", monkeypatch)
    cut, ended = (torch.load(_exp(path, name) / "private" / "last.pt", weights_only=True)
                  for name in ("broken", "straight"))
    frozen = [k for k in cut["model"] if not k.startswith(("layer4.", "fc."))]
    assert frozen and all(torch.equal(cut["model"][k], ended["model"][k]) for k in frozen)
    assert not torch.equal(cut["model"]["fc.weight"], ended["model"]["fc.weight"])
    best = torch.load(_exp(path, "broken") / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], cut["ema"][f"module.{k}"]) for k in best)  # both written after epoch 1
    assert not torch.equal(best["fc.weight"], cut["model"]["fc.weight"])
    resolved = yaml.safe_load((_exp(path, "straight") / "private" / "config.yaml").read_text())
    assert resolved["derived"]["trained_values"] == sum(
        v.numel() for k, v in ended["model"].items() if k.startswith(("layer4.", "fc.")))
    capsys.readouterr()
    for change in ("dp.augmult=3", "training.ema=0.5", "training.trainable=all", "training.augment.rotate=10"):
        assert main(["train", "--config", str(path), "--name", "broken", "--resume", "--set", change]) == 2
        assert "--resume cannot change" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--name", "broken", "--resume"]) == 0
    _assert_same_run(_exp(path, "straight"), _exp(path, "broken"))
    averages = [torch.load(_exp(path, name) / "private" / "last.pt", weights_only=True)["ema"]
                for name in ("straight", "broken")]
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])


def test_the_public_model_is_keyed_by_how_the_built_in_images_are_drawn(tiny_config, monkeypatch):
    cfg = load_config(tiny_config(model={"pretrained_checkpoint": "public"}))
    _, before = Train_Valid_DP.public_pretraining(cfg)
    assert Train_Valid_DP.public_pretraining(cfg)[1] == before
    monkeypatch.setattr(Train_Valid_DP, "generator_fingerprint", lambda: "another drawing")
    assert Train_Valid_DP.public_pretraining(cfg)[1] != before  # not the model trained on the old images


def test_a_run_booked_in_another_ledger_trains_its_own_public_model(tiny_config, tmp_path, capsys):
    path = tiny_config(model={"pretrained_checkpoint": "public"}, training={"epochs": 1})
    assert main(["train", "--config", str(path), "--name", "first"]) == 0
    other = ["--set", f"output.ledger={tmp_path / 'another ledger'}"]
    # the cached public model's run is not in that ledger: starting from it would be refused as having
    # trained every patient without privacy, so this ledger gets a public model booked in it
    assert main(["train", "--config", str(path), "--name", "second", *other]) == 0
    starts = [yaml.safe_load((_exp(path, name) / "private" / "config.yaml").read_text())["derived"]["pretrained_folder"]
              for name in ("first", "second")]
    assert starts[0] != starts[1]


def test_a_refused_privacy_setting_trains_no_public_model_first(tiny_config, capsys):
    path = tiny_config(model={"pretrained_checkpoint": "public"}, dp={"delta": 0.05})  # delta * N needs the data
    assert main(["train", "--config", str(path)]) == 2
    assert "dp.delta = 0.05" in capsys.readouterr().err
    cache = path.parent / "pretrained"
    assert not cache.exists() or not any(cache.iterdir())  # refused before the public model was trained
    assert not _exp(path).exists()


def test_public_pretraining_runs_once_per_recipe_and_never_on_the_private_patients(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1}, model={"pretrained_checkpoint": "public"},
                       data={"synthetic": {"public_patients": 120, "private_patients": 120}},
                       pretraining={"training": {"epochs": 1, "logical_batch_size": 16, "physical_batch_size": 8}})
    cache = path.parent / "pretrained"
    assert main(["train", "--config", str(path), "--name", "first"]) == 0
    out = capsys.readouterr().out
    assert "pretraining (non-private) on the public site" in out
    (folder,) = cache.iterdir()
    assert folder.name.startswith("synthetic-public_resnet9_")
    pretrained = yaml.safe_load((folder / "private" / "config.yaml").read_text())
    assert pretrained["data"]["site"] == "public" and not pretrained["dp"]["enabled"]
    resolved = yaml.safe_load((_exp(path, "first") / "private" / "config.yaml").read_text())
    assert resolved["derived"]["pretrained_folder"] == str(folder)
    assert resolved["derived"]["pretrained_site"] == "public"

    stamp = (folder / "checkpoints" / "best.pt").stat().st_mtime_ns
    assert main(["train", "--config", str(path), "--name", "second", "--set", f"pretraining.dir={cache}",
                 "training.lr=0.001", "training.trainable=norms_and_head", "experiment.seed=1",
                 "data.split_seed=0"]) == 0  # another seed of the fine-tuning on the same data
    assert "from the cache" in capsys.readouterr().out
    assert [p.name for p in cache.iterdir()] == [folder.name]
    assert (folder / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp
    start = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)["model"]
    second = _weights(_exp(path, "second"))
    assert torch.equal(second["conv1.weight"], start["conv1.weight"])  # frozen, so still the pretrained one

    assert main(["train", "--config", str(path), "--name", "third", "--set", f"pretraining.dir={cache}",
                 "pretraining.training.lr=0.001", "training.epochs=1"]) == 0
    assert len(list(cache.iterdir())) == 2  # another pretraining recipe, another cached model

    capsys.readouterr()
    assert main(["train", "--config", str(path), "--name", "mixed", "--set", f"pretraining.dir={cache}",
                 "pretraining.site=all"]) == 2
    err = capsys.readouterr().err
    assert "pretraining.site 'all' has" in err and "of this run's training patients" in err
    assert not _exp(path, "mixed").exists() or not any(_exp(path, "mixed").rglob("*.pt"))
    summary = json.loads((_exp(path, "first") / "private" / "summary.json").read_text())
    assert summary["dp"]["enabled"]
