"""What may leave the hospital: the release bundle, its model card, and predicting with it."""
from __future__ import annotations

import html
import json
import math
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from opacus.accountants import create_accountant
from safetensors.torch import load_file

from config import load_config
from conftest import REPO, write_tiny_config
from data.dataset import load_table
from main_2D_DP import main
from privacy.ledger import Ledger
from privacy.release import FILES, bundle_map, rounded, rounded_count, rounded_up


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
    for key in ("delta", "max_grad_norm", "noise"):
        assert privacy[key] == summary["dp"][key], key
    # rounded (test_the_card_does_not_give_the_number_of_training_patients_back), the guarantee never tighter
    assert privacy["epsilon"] == rounded_up(summary["dp"]["epsilon_spent"]) >= summary["dp"]["epsilon_spent"]
    assert privacy["noise_multiplier"] == rounded(summary["dp"]["noise_multiplier"])
    assert privacy["steps"] == summary["steps"] and privacy["units"] == f"about {rounded_count(cfg.derived['n_train_units'])} training patients"
    assert "WARNING" in privacy["statement"]  # the tests' runs seed their noise: the card says so
    # in words too, from the rounded epsilon, with the same warning
    assert privacy["in_words"].startswith(f"Differentially private with epsilon {privacy['epsilon']:g} (delta ")
    assert "Warning: the noise was seeded" in privacy["in_words"]
    assert privacy["ledger_total"]["epsilon"] == privacy["epsilon"]  # the only run on these patients
    assert card["evaluation"]["auroc_mean"] == metrics["auroc_mean"]
    assert card["evaluation"]["auroc_mean_ci95"] == metrics["auroc_mean_ci95"]
    for label, m in card["evaluation"]["labels"].items():
        assert m["auroc"] == metrics["labels"][label]["auroc"]
    markdown = (bundle / "model_card.md").read_text()
    assert privacy["statement"] in markdown and "Does not cover: validation patients" in markdown
    assert privacy["in_words"] in markdown and "Epsilon bounds" in markdown

    # the bundle scores the dataset as the experiment did, at the experiment's thresholds
    assert main(["predict", str(bundle)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["predict", str(bundle), "--data", str(path), "--out", str(path.parent / "scored")]) == 0
    mine = pd.read_csv(exp / "private" / "predictions" / "test.csv")
    theirs = pd.read_csv(path.parent / "scored" / "private" / "predictions" / "test.csv")
    assert theirs.equals(mine)
    scored = json.loads((path.parent / "scored" / "results" / "test_metrics.json").read_text())
    assert scored["threshold_split"] == "bundle"
    assert html.escape(privacy["in_words"]) in (path.parent / "scored" / "report.html").read_text()
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
    assert card["privacy"] == {"private": False, "statement": card["privacy"]["statement"],
                               "in_words": card["privacy"]["in_words"]}
    assert card["privacy"]["in_words"].startswith("Not private: trained without differential privacy")
    assert card["privacy"]["statement"].startswith("NOT PRIVATE")
    assert (bundle / "model_card.md").read_text().count("NOT PRIVATE") == 1
    assert json.loads((bundle / "model.json").read_text())["private"] is False


@pytest.fixture(scope="module")
def released(tmp_path_factory, data_cache):
    """The bundle of a tiny DP experiment, exported after a non-private run on the same patients was
    exported too (the ledger's note on the card names that run; kept inside, it would not count)."""
    root = tmp_path_factory.mktemp("release")
    config = write_tiny_config(root, data_cache, training={"epochs": 1},
                               evaluation={"bootstrap": 20, "permutations": 0})
    exp, bundle = root / "experiments" / "tiny", root / "bundle"
    assert main(["train", "--config", str(config), "--name", "baseline", "--set", "dp.enabled=false"]) == 0
    assert main(["predict", str(root / "experiments" / "baseline")]) == 0
    assert main(["export", str(root / "experiments" / "baseline"), str(root / "baseline_bundle"), "--non-private"]) == 0
    assert main(["train", "--config", str(config)]) == 0
    assert main(["predict", str(exp)]) == 0
    assert main(["export", str(exp), str(bundle)]) == 0
    return SimpleNamespace(root=root, exp=exp, bundle=bundle, data_cache=data_cache,
                           card=json.loads((bundle / "model_card.json").read_text()))


def test_nothing_exported_names_a_path_of_the_training_machine(released):
    assert "(baseline)" in released.card["privacy"]["ledger_total"]["note"]  # named, not located
    texts = {name: (released.bundle / name).read_text() for name in FILES if not name.endswith(".safetensors")}
    with open(released.bundle / "model.safetensors", "rb") as handle:  # its JSON header: names and metadata
        texts["model.safetensors"] = handle.read(int.from_bytes(handle.read(8), "little")).decode()
    local = {str(p) for p in (released.root, released.exp, released.data_cache, REPO, Path.home(), Path.cwd(),
                              Path(tempfile.gettempdir()))} | {str(p.resolve()) for p in (released.root, released.exp)}
    for name, text in texts.items():
        for path in local:
            assert len(path) < 2 or path not in text, (name, path)
        assert not re.search(r"(?<![\w.~-])~?/[\w.-]+/", text), name  # nor any other absolute path


def test_the_card_and_statement_say_the_calibration_map_was_fit_on_unprotected_validation_patients(released):
    card, stored = released.card, torch.load(released.exp / "checkpoints" / "best.pt", weights_only=True)["calibration"]
    assert card["calibration"].startswith(f"Platt scaling per label, fit on about "
                                          f"{rounded_count(stored['patients'])} validation patients")
    assert card["calibration"].endswith("(not protected by the DP guarantee)")
    assert card["privacy"]["does_not_cover"][0] == ("validation patients: they chose the checkpoint and the decision "
                                                    "thresholds, and the calibration map was fit on them")
    carried = json.loads((released.bundle / "model.json").read_text())["calibration"]
    assert carried == bundle_map(stored)  # the exact validation counts stay with the experiment
    statement = json.loads((released.exp / "private" / "summary.json").read_text())["dp"]["statement"]
    assert "validation patients choose the best checkpoint and the prediction thresholds, fit the calibration map and " \
           "are not protected" in statement


def test_the_card_does_not_give_the_number_of_training_patients_back(released):
    """With the steps and the sample rate, the exact epsilon and noise multiplier pinned N (default run:
    1131, 1132 and 1133 patients give epsilon 8.0054, 7.9999 and 7.9945); rounded, they fit several
    neighbouring N as well, by Opacus' accountant as training used it."""
    privacy, training = released.card["privacy"], released.card["training"]
    cfg = load_config(released.exp / "private" / "config.yaml")
    dp = json.loads((released.exp / "private" / "summary.json").read_text())["dp"]
    n, batch, steps, delta = cfg.derived["n_train_units"], training["logical_batch_size"], privacy["steps"], dp["delta"]
    entry, = [e for e in Ledger.of_experiment(cfg, released.exp).entries() if e["private"]]
    counts, sgd = entry["history"]  # the label counts' release (its noise does not depend on N), then DP-SGD
    assert sgd == [dp["noise_multiplier"], dp["sample_rate"], steps]

    def epsilon(sigma: float, m: int) -> float:
        books = create_accountant(cfg.dp.accountant)
        books.history = [tuple(counts), (sigma, batch / m, steps)]
        return books.get_epsilon(delta)

    around = [m for m in range(n - 15, n + 16) if training["epochs"] * max(1, round(m / batch)) == steps]
    assert [m for m in around if epsilon(dp["noise_multiplier"], m) == pytest.approx(dp["epsilon_spent"],
                                                                                    rel=1e-9)] == [n]

    def unit(value: float) -> float:  # of the second significant digit
        return 10.0 ** (math.floor(math.log10(value)) - 1)

    sigma, eps = privacy["noise_multiplier"], privacy["epsilon"]
    assert (sigma, eps, privacy["sample_rate"]) == (rounded(dp["noise_multiplier"]), rounded_up(dp["epsilon_spent"]),
                                                    rounded(dp["sample_rate"]))
    fits = [m for m in around if rounded(batch / m) == privacy["sample_rate"]  # some sigma of its rounding fits
            and epsilon(sigma + unit(sigma) / 2, m) <= eps and epsilon(sigma - unit(sigma) / 2, m) > eps - unit(eps)]
    assert n in fits and len(fits) >= 3, (n, fits)
    assert privacy["epsilon_pld"] == {k: rounded_up(v) for k, v in dp["pld_epsilon"].items()}
    text = "".join((released.bundle / name).read_text() for name in FILES if not name.endswith(".safetensors"))
    exact = [dp["epsilon_spent"], dp["noise_multiplier"], dp["sample_rate"], *dp["pld_epsilon"].values()]
    for value in exact:  # in no form that keeps more digits than the card's
        if rounded(value) != value:
            assert repr(value) not in text and f"{value:.4g}" not in text, value
