"""torchrun on CPU (gloo, 2 processes): the same model, privacy and outputs as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from config import load_config
from data.dataset import load_table
from main_2D_DP import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "main_2D_DP.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def summary(exp):
    return json.loads((exp / "private" / "summary.json").read_text())


def weights(exp):
    return torch.load(exp / "private" / "last.pt", weights_only=True)["model"]


def assert_same_model(exp_a, exp_b):
    a, b = summary(exp_a), summary(exp_b)
    assert a["steps"] == b["steps"] and a["epochs_completed"] == b["epochs_completed"]
    for key in ("epsilon_spent", "noise_multiplier", "sample_rate", "delta"):
        assert a["dp"][key] == b["dp"][key], key
    assert a["last_train_loss"] == pytest.approx(b["last_train_loss"], rel=1e-5)
    wa, wb = weights(exp_a), weights(exp_b)
    for k in wa:  # the same global batches and noise; only the order of float sums differs
        scale = float(wa[k].abs().max()) if wa[k].is_floating_point() else 0.0
        assert float((wa[k].float() - wb[k].float()).abs().max()) <= 1e-4 * scale + 1e-7, k


def test_two_processes_train_and_resume_what_one_process_trains(tiny_config):
    """DP: epsilon, sigma, steps and weights equal a one-process run, also across a distributed resume;
    only rank 0 writes, once."""
    # SGD: Adam would hide a wrong gradient scale (its steps do not depend on it). A fixed sigma: with a
    # target epsilon, stopping after the first epoch would have been planned.
    path = tiny_config(training={"optimizer": "sgd", "lr": 0.05, "pos_weight": "none"}, dp={"epsilon": None, "noise_multiplier": 0.8})
    experiments = path.parent / "experiments"
    assert main(["train", "--config", str(path), "--name", "one"]) == 0
    first = torchrun("train", "--config", str(path), "--name", "two", "--set", "training.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("experiment folder:") == 1 and "(2 processes)" in first.stdout
    resumed = torchrun("train", "--name", "two", "--resume", "--set", "training.epochs=2",
                       f"output.target_dir={experiments}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resuming two after {summary(experiments / 'one')['steps'] // 2} steps") == 1
    assert_same_model(experiments / "one", experiments / "two")
    assert sorted(p.name for p in experiments.iterdir()) == ["one", "two"]
    [ledger] = [p for p in (path.parent / "ledger").iterdir() if p.is_dir()]
    assert len([p for p in ledger.glob("*.json") if p.name != "ledger.json"]) == 2  # one entry per run
    assert len(list((experiments / "two" / "private" / "tensorboard").iterdir())) == 2  # rank 0's, one per launch


def test_two_processes_train_non_private_what_one_process_trains(tiny_config):
    # a batch size that leaves one image for the last batch: rank 1's share of it is empty
    cfg = load_config(tiny_config())
    n_train = len(load_table(cfg.data, cfg.experiment.seed).split("train"))
    batch = next((b for b in range(n_train // 2, 7, -1) if n_train % b == 1), n_train - 1)
    path = tiny_config(dp={"enabled": False}, training={"optimizer": "sgd", "lr": 0.05, "logical_batch_size": batch})
    experiments = path.parent / "experiments"
    assert main(["train", "--config", str(path), "--name", "one"]) == 0
    run = torchrun("train", "--config", str(path), "--name", "two")
    assert run.returncode == 0, run.stderr[-3000:]
    derived = yaml.safe_load((experiments / "two" / "private" / "config.yaml").read_text())["derived"]
    assert derived["n_train"] == n_train and n_train % batch == 1
    assert_same_model(experiments / "one", experiments / "two")


def test_commands_other_than_train_refuse_torchrun(tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--epsilons", "inf", "--config", str(tiny_config())]) == 2
    assert "under torchrun only train" in capsys.readouterr().err


def test_a_rank_that_fails_stops_the_job_instead_of_hanging(tiny_config, tmp_path):
    """Rank 1 dies in its first epoch while rank 0 waits in a collective: the job ends at once, with the error."""
    script = tmp_path / "failing_rank.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {REPO!r})
import Train_Valid_DP
if os.environ["RANK"] == "1":
    def lost(*args, **kwargs):
        raise RuntimeError("rank 1 lost its device")
    Train_Valid_DP.train_one_epoch = lost
from main_2D_DP import main
sys.exit(main(sys.argv[1:]))
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), "train", "--config", str(tiny_config())], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "rank 1 lost its device" in run.stderr
    assert time.monotonic() - started < 120  # not the 900 s collective timeout
