"""Privacy audit: the one-run bound's maths, canaries and reference halves, and audits of tiny runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.special import logit
from scipy.stats import binom

import main_2D_DP
from config import ConfigError, InputError, load_config
from conftest import assert_report
from data.dataset import load_table
from main_2D_DP import main
from privacy.audit import (attack_metrics, canary_bound, guess_counts, lira_offline, membership_candidates,
                           one_run_epsilon_bound, one_run_p_value, signed_logit)
from privacy.canaries import (canary_scores, draw_canaries, reference_patients, reference_training_split,
                              with_canaries)
from privacy.units import unit_rows

HARD_LABELS = ["congestion", "pneumonic_infiltrates_right", "pneumonic_infiltrates_left", "atelectasis_right",
               "atelectasis_left"]  # faint findings: a tiny model memorises its images before it generalises


def test_bound_when_every_guess_is_right():
    # delta = 0: P[W >= r] = q^r <= alpha  <=>  eps <= logit(alpha^(1/r)); one guess rejects nothing
    for r in (1, 10, 20, 100):
        assert one_run_epsilon_bound(r, r, r, 0.0, 0.05) == pytest.approx(max(0.0, logit(0.05 ** (1 / r))), abs=1e-5)


def test_bound_is_zero_with_no_right_guess_or_at_chance():
    assert one_run_epsilon_bound(50, 20, 0, 1e-5, 0.05) == 0.0
    assert one_run_epsilon_bound(100, 100, 50, 1e-5, 0.05) == 0.0
    assert one_run_epsilon_bound(100, 100, 58, 0.0, 0.05) == 0.0  # P[Bin(100, 1/2) >= 58] = 0.067 > 0.05
    assert one_run_epsilon_bound(100, 100, 59, 0.0, 0.05) > 0.0  # 0.044


def test_delta_term_by_hand():
    # m = r = v = 1: f(1) = q, f(0) = 1, p = q + 2 delta (1 - q); rejected iff q <= (alpha - 2 delta) / (1 - 2 delta)
    alpha, delta = 0.6, 0.05
    q = (alpha - 2 * delta) / (1 - 2 * delta)
    assert one_run_p_value(1, 1, 1, float(logit(q)), delta) == pytest.approx(alpha)
    assert one_run_epsilon_bound(1, 1, 1, delta, alpha) == pytest.approx(float(logit(q)), abs=1e-5)
    # m = 3, r = 2, v = 2: max over i of (f(2 - i) - f(2)) / i with f(2) = q^2, f(1) = 1 - (1 - q)^2, f(0) = 1
    q, delta = 0.7, 0.01
    f2, f1 = q ** 2, 1 - (1 - q) ** 2
    expected = f2 + 2 * 3 * delta * max(f1 - f2, (1 - f2) / 2)
    assert one_run_p_value(3, 2, 2, float(logit(q)), delta) == pytest.approx(expected)
    assert one_run_p_value(3, 2, 2, float(logit(q)), 0.0) == pytest.approx(binom.sf(1, 2, q))


def test_delta_only_weakens_the_bound():
    loose = one_run_epsilon_bound(200, 100, 90, 0.0, 0.05)
    assert 0 < one_run_epsilon_bound(200, 100, 90, 1e-4, 0.05) < loose
    assert one_run_epsilon_bound(200, 100, 90, 1e-2, 0.05) < one_run_epsilon_bound(200, 100, 90, 1e-4, 0.05)


def test_canary_guesses_follow_the_scores():
    included = np.array([1, 0] * 50)
    perfect = canary_bound(included + np.linspace(0, 0.1, 100), included, delta=0.0)
    assert perfect["grid"][-1] == {**perfect["grid"][-1], "guesses": 100, "correct": 100}
    # the best guess count, at the Bonferroni-corrected level of the grid
    grid = guess_counts(100)
    assert perfect["epsilon_lower_bound"] == pytest.approx(logit((0.05 / len(grid)) ** (1 / 100)), abs=1e-5)
    flipped = canary_bound(-included.astype(float), included, delta=0.0)
    assert flipped["correct"] == 0 and flipped["epsilon_lower_bound"] == 0.0


def test_tpr_at_low_fpr_and_auroc():
    member = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    score = np.r_[np.arange(100) + 2000.0, np.arange(1000.0)]
    score[:10] = -1  # ten members below every non-member
    weights = np.ones((3, len(member)), dtype=np.float32)
    out = attack_metrics(member, score, weights)
    assert out["tpr_at_fpr_0.001"]["value"] == pytest.approx(0.9)
    assert out["auroc"]["value"] == pytest.approx(0.9)
    assert out["members"] == 100 and out["nonmembers"] == 1000


def test_lira_calibrates_per_image_difficulty():
    rng = np.random.default_rng(0)
    n, k = 400, 8
    difficulty = rng.normal(0, 5, n)  # per image, far larger than the membership effect
    member = rng.random(n) < 0.5
    target = difficulty + member * 1.0 + rng.normal(0, 0.3, n)
    out = rng.random((k, n)) < 0.5
    reference = difficulty + np.where(out, 0.0, 1.0) + rng.normal(0, 0.3, (k, n))
    z = lira_offline(target, reference, out)
    keep = np.isfinite(z)
    assert (~keep == (out.sum(axis=0) == 0)).all()
    weights = np.ones((1, keep.sum()), dtype=np.float32)
    assert attack_metrics(member[keep], z[keep], weights)["auroc"]["value"] > 0.9
    assert attack_metrics(member[keep], target[keep], weights)["auroc"]["value"] < 0.7


def test_signed_logit_ignores_unlabelled():
    logits = torch.tensor([[2.0, -1.0, 5.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([[1.0, 0.0, float("nan")], [0.0, float("nan"), float("nan")]])
    assert signed_logit(logits, targets).tolist() == pytest.approx([1.5, -0.5])


@pytest.fixture
def tiny_table(tiny_config):
    cfg = load_config(tiny_config())
    return cfg, load_table(cfg.data, cfg.experiment.seed)


def test_canaries_are_whole_patients_drawn_flipped_and_left_out_by_their_coin(tiny_table):
    cfg, table = tiny_table
    labels, train = cfg.data.labels, tiny_table[1].split("train")
    canaries = draw_canaries(train, labels, 30, seed=0)
    assert canaries.equals(draw_canaries(train, labels, 30, seed=0))
    assert not canaries.equals(draw_canaries(train, labels, 30, seed=1))
    coins = canaries.groupby("patient_id")["included"].agg(["min", "max"])
    assert len(coins) == 30 and (coins["min"] == coins["max"]).all()  # one coin per patient
    assert 5 < coins["min"].sum() < 25 and canaries["image_id"].is_unique
    # every image of a canary patient is a canary: no patient is split between canary and not
    assert set(train.loc[train["patient_id"].isin(coins.index), "image_id"]) == set(canaries["image_id"])
    assert canaries["patient_id"].value_counts().max() > 1  # the draw includes patients with several images
    trained = with_canaries(train, canaries, labels)
    left_out = set(canaries.loc[canaries["included"] == 0, "image_id"])
    assert len(trained) == len(train) - len(left_out) and not left_out & set(trained["image_id"])
    # every training patient is exactly one privacy unit, under its own id
    assert set(trained["patient_id"]) <= set(train["patient_id"])
    units = unit_rows(trained["patient_id"], "patient")
    assert len(units) == trained["patient_id"].nunique() == train["patient_id"].nunique() - (coins["min"] == 0).sum()
    assert all(trained["patient_id"].iloc[rows].nunique() == 1 for rows in units)
    original = train.set_index("image_id")
    for row in canaries[canaries["included"] == 1].itertuples():
        got = trained.set_index("image_id").loc[row.image_id, labels].to_numpy(float)
        np.testing.assert_array_equal(got, 1 - original.loc[row.image_id, labels].to_numpy(float))
    untouched = trained[~trained["image_id"].isin(canaries["image_id"])].set_index("image_id")
    assert untouched[labels].equals(original.loc[untouched.index, labels])
    with pytest.raises(InputError, match="audit.canaries = 100000"):
        draw_canaries(train, labels, 100_000, seed=0)
    # the audit guesses one coin per patient, from the mean of its images' scores
    scored = canary_scores(canaries, np.arange(len(canaries), dtype=float))
    assert list(scored["patient_id"]) == sorted(coins.index) and scored["images"].sum() == len(canaries)
    first = scored.iloc[0]
    assert first["score"] == np.flatnonzero(canaries["patient_id"] == first["patient_id"]).mean()


def test_reference_halves_split_patients_and_members_never_meet_non_members(tiny_table):
    cfg, table = tiny_table
    frame = table.frame
    halves = [reference_training_split(frame, k, seed=0) for k in range(4)]
    pool = frame[frame["split"].isin(["train", "test"])]
    for half in halves:
        assert set(half["patient_id"]) <= set(pool["patient_id"]) and (half["split"] == "train").all()
        assert 0.3 < half["patient_id"].nunique() / pool["patient_id"].nunique() < 0.7
        inside = pool["patient_id"].isin(half["patient_id"])
        assert inside.sum() == len(half)  # whole patients: all their train and test images
    assert len({tuple(h["image_id"]) for h in halves}) == 4
    np.testing.assert_array_equal(reference_patients(pool["patient_id"], 2, 0),
                                  pool["patient_id"].isin(halves[2]["patient_id"]).to_numpy())

    candidates = membership_candidates(frame, cfg.data.labels, exclude=set())
    members = candidates[candidates["member"] == 1]
    assert set(members["image_id"]) == set(table.split("train")["image_id"])
    assert not set(members["patient_id"]) & set(candidates.loc[candidates["member"] == 0, "patient_id"])
    crossed = frame.copy()
    crossed.loc[crossed.index[crossed["split"] == "test"][0], "patient_id"] = members["patient_id"].iloc[0]
    with pytest.raises(InputError, match="both the train and the test split"):
        membership_candidates(crossed, cfg.data.labels, exclude=set())


def test_config_refuses_canaries_on_a_reference_run(tiny_config):
    with pytest.raises(ConfigError, match="audit.canaries"):
        load_config(tiny_config(audit={"canaries": 5, "reference": 0}))


def test_overfit_non_private_run_leaks_and_the_bound_shows_it(tiny_config, capsys):
    path = tiny_config(dp={"enabled": False, "delta": 1e-5}, data={"labels": HARD_LABELS},
                       training={"epochs": 12, "physical_batch_size": 16, "optimizer": "adam", "lr": 0.0005,
                                 "checkpoint_every_steps": 0},
                       evaluation={"bootstrap": 200})
    assert main(["train", "--config", str(path), "--audit-canaries", "20"]) == 0
    exp = path.parent / "experiments" / "tiny"
    recorded = pd.read_csv(exp / "private" / "audit" / "canaries.csv")
    assert recorded["patient_id"].nunique() == 20 and set(recorded["included"]) == {0, 1}
    assert yaml.safe_load((exp / "private" / "config.yaml").read_text())["derived"]["n_train"] == (
        len(load_table(load_config(path).data, 0).split("train")) - (recorded["included"] == 0).sum())

    capsys.readouterr()
    assert main(["audit", str(exp), "--checkpoint", "last"]) == 0
    assert "epsilon >=" in capsys.readouterr().out
    audit = json.loads((exp / "private" / "audit" / "audit.json").read_text())
    loss = audit["attacks"]["loss"]["overall"]
    assert loss["auroc"]["value"] > 0.6 and loss["auroc"]["ci95"][0] < loss["auroc"]["value"] < loss["auroc"]["ci95"][1]
    assert set(audit["attacks"]["loss"]["subgroups"]) == {"sex", "age"}
    bound = audit["canaries"]
    assert bound["canaries"] == 20 and bound["delta"] == 1e-5 and bound["epsilon_lower_bound"] > 0.5
    assert audit["dp"]["epsilon_spent"] is None and not bound["exceeds_accounted_epsilon"]

    scores = pd.read_csv(exp / "private" / "audit" / "audit_scores.csv")
    assert not set(scores.loc[scores["member"] == 1, "patient_id"]) & set(scores.loc[scores["member"] == 0, "patient_id"])
    assert not set(scores["image_id"]) & set(recorded["image_id"])  # canaries are audited apart
    assert len(pd.read_csv(exp / "private" / "audit" / "audit_attacks.csv")) == 1 + 2 + 5  # all, sex, age groups
    assert_report(exp / "private" / "audit" / "report.html", ["Membership inference", "Membership attack ROC",
                                                              "Membership exposure", "One-run epsilon lower bound"],
                  min_figures=3)


def test_dp_run_stays_near_chance_with_reference_runs_reused(tiny_config, monkeypatch, capsys):
    path = tiny_config(dp={"epsilon": 1.0}, training={"epochs": 1}, evaluation={"bootstrap": 200})
    assert main(["train", "--config", str(path), "--audit-canaries", "20"]) == 0
    exp = path.parent / "experiments" / "tiny"
    assert main(["predict", str(exp)]) == 0
    assert main(["audit", str(exp), "--reference-models", "2"]) == 0
    audit = json.loads((exp / "private" / "audit" / "audit.json").read_text())
    accounted = audit["dp"]["epsilon_spent"]
    assert 0 < accounted <= 1.0
    assert audit["canaries"]["epsilon_lower_bound"] <= accounted and not audit["canaries"]["exceeds_accounted_epsilon"]
    for attack in ("loss", "lira_offline"):
        ci = audit["attacks"][attack]["overall"]["auroc"]["ci95"]
        assert ci[0] <= 0.5 <= ci[1], (attack, ci)
    for k in range(2):
        ref = yaml.safe_load((exp / "private" / "audit" / "references" / f"ref-{k}" / "private" / "config.yaml").read_text())
        assert ref["audit"] == {"canaries": 0, "reference": k} and ref["dp"]["epsilon"] == 1.0
    # the reference runs trained on the same patients: they are in the experiment's ledger
    [ledger] = [p for p in (path.parent / "ledger").iterdir() if p.is_dir()]
    runs = [json.loads(p.read_text())["experiment"] for p in ledger.glob("*.json") if p.name != "ledger.json"]
    assert sorted(Path(r).name for r in runs) == ["ref-0", "ref-1", "tiny"]
    # the audit's report is private (scores of training images); the releasable report has none of it
    assert_report(exp / "private" / "audit" / "report.html", ["Membership inference", "One-run epsilon"],
                  min_figures=3)
    assert main(["predict", str(exp)]) == 0
    assert "Membership" not in (exp / "report.html").read_text()

    # a later audit uses the finished reference runs without training anything
    monkeypatch.setattr(main_2D_DP, "train", lambda *a, **k: pytest.fail("reference run retrained"))
    capsys.readouterr()
    assert main(["audit", str(exp)]) == 0
    assert "lira_offline" in capsys.readouterr().out
    (exp / "private" / "audit" / "canaries.csv").unlink()
    assert main(["audit", str(exp)]) == 2
    assert "canaries.csv" in capsys.readouterr().err


def test_audit_refuses_what_it_cannot_audit(tiny_config, tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    assert main(["train", "--config", str(path)]) == 0
    exp = path.parent / "experiments" / "tiny"
    assert main(["audit", str(exp), "--reference-models", "-1"]) == 2
    assert "--reference-models" in capsys.readouterr().err
    (exp / "checkpoints" / "best.pt").unlink()
    assert main(["audit", str(exp)]) == 2
    assert "best.pt" in capsys.readouterr().err


def test_bound_is_sound_and_tight_on_a_mechanism_of_known_epsilon():
    # Randomized response on each coin is exactly eps-DP: the bound may pass eps in at most 5% of runs
    # (95% confidence) and, with 1000 canaries, should come close to it.
    rng = np.random.default_rng(0)
    epsilon, m = 2.0, 1000
    bounds = []
    for _ in range(100):
        included = rng.integers(0, 2, m).astype(bool)
        told = np.where(rng.random(m) < np.exp(epsilon) / (1 + np.exp(epsilon)), included, ~included)
        bounds.append(canary_bound(told + rng.random(m) * 1e-3, included, delta=1e-6)["epsilon_lower_bound"])
    bounds = np.array(bounds)
    assert (bounds > epsilon).mean() <= 0.05
    assert np.median(bounds) > 0.8 * epsilon
