"""What may leave the hospital: the release bundle, its model card, and predicting with it."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from config import load_config
from data.dataset import load_table
from main_2D_DP import main
from privacy.release import FILES, rounded_count


def test_bundle_holds_only_releasable_files_and_states_the_privacy(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1})
    exp, bundle = path.parent / "experiments" / "tiny", path.parent / "bundle"
    assert main(["train", "--config", str(path)]) == 0
    assert main(["export", str(exp), str(bundle)]) == 2  # the card needs the test metrics
    assert "predict" in capsys.readouterr().err and not bundle.exists()
    assert main(["predict", str(exp)]) == 0
    assert main(["export", str(exp), str(bundle)]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == sorted(FILES)

    # nothing private inside: no training image id, no exact count, the weights of best.pt only
    cfg = load_config(exp / "private" / "config.yaml")
    train_ids = set(load_table(cfg.data, cfg.experiment.seed).split("train")["image_id"])
    text = "".join((bundle / name).read_text() for name in FILES if not name.endswith(".safetensors"))
    assert not any(image_id in text for image_id in train_ids)
    for exact in (cfg.derived["n_train_units"], cfg.derived["n_train"]):  # as a number of its own
        if rounded_count(exact) != exact:  # a round count is its own rounding
            assert not re.search(rf"(?<![\d.]){exact}(?![\d.])", text), exact
    best = torch.load(exp / "checkpoints" / "best.pt", weights_only=True)["model"]
    weights = load_file(bundle / "model.safetensors")
    assert set(weights) == set(best) and all(torch.equal(weights[k], best[k]) for k in best)

    # the card's numbers are the experiment's
    card = json.loads((bundle / "model_card.json").read_text())
    summary = json.loads((exp / "private" / "summary.json").read_text())
    metrics = json.loads((exp / "results" / "test_metrics.json").read_text())
    privacy = card["privacy"]
    assert privacy["private"] and privacy["unit"] == "patient"
    for key, value in (("epsilon", "epsilon_spent"), ("delta", "delta"), ("noise_multiplier", "noise_multiplier"),
                       ("max_grad_norm", "max_grad_norm"), ("noise", "noise")):
        assert privacy[key] == summary["dp"][value], key
    assert privacy["steps"] == summary["steps"] and privacy["units"] == f"about {rounded_count(cfg.derived['n_train_units'])} training patients"
    assert "WARNING" in privacy["statement"]  # the tests' runs seed their noise: the card says so
    assert privacy["ledger_total"]["epsilon"] == pytest.approx(summary["dp"]["epsilon_spent"])
    assert card["evaluation"]["auroc_mean"] == metrics["auroc_mean"]
    assert card["evaluation"]["auroc_mean_ci95"] == metrics["auroc_mean_ci95"]
    for label, m in card["evaluation"]["labels"].items():
        assert m["auroc"] == metrics["labels"][label]["auroc"]
    markdown = (bundle / "model_card.md").read_text()
    assert privacy["statement"] in markdown and "Does not cover: validation patients" in markdown

    # the bundle scores the dataset as the experiment did, at the experiment's thresholds
    assert main(["predict", str(bundle)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["predict", str(bundle), "--data", str(path), "--out", str(path.parent / "scored")]) == 0
    mine = pd.read_csv(exp / "predictions" / "test.csv")
    theirs = pd.read_csv(path.parent / "scored" / "predictions" / "test.csv")
    assert theirs.equals(mine)
    scored = json.loads((path.parent / "scored" / "results" / "test_metrics.json").read_text())
    assert scored["threshold_split"] == "bundle"
    assert {k: m["threshold"] for k, m in scored["labels"].items()} == {
        k: m["threshold"] for k, m in metrics["labels"].items()}

    assert main(["export", str(exp), str(bundle)]) == 2  # an existing bundle is never overwritten
    assert "not empty" in capsys.readouterr().err


def test_a_non_private_run_is_never_exported_as_private(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    exp, bundle = path.parent / "experiments" / "tiny", path.parent / "bundle"
    assert main(["train", "--config", str(path)]) == 0 and main(["predict", str(exp)]) == 0
    assert main(["export", str(exp), str(bundle)]) == 2
    assert "--non-private" in capsys.readouterr().err
    assert main(["export", str(exp), str(bundle), "--non-private"]) == 0
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["privacy"] == {"private": False, "statement": card["privacy"]["statement"]}
    assert card["privacy"]["statement"].startswith("NOT PRIVATE")
    assert (bundle / "model_card.md").read_text().count("NOT PRIVATE") == 1
    assert json.loads((bundle / "model.json").read_text())["private"] is False
