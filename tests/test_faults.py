"""Faults: kills at any moment, a full disk, two trainers, non-finite losses, an exhausted privacy
budget and checkpoints that would run code when loaded."""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import Train_Valid_DP
from artifacts import load_checkpoint
from conftest import REPO
from data.synthetic import LABELS
from main_2D_DP import main
from test_training import _assert_same_run, _exp


def _summary(exp):
    return json.loads((exp / "private" / "summary.json").read_text())


# Runs the command line with torch.save writing half of the 4th checkpoint and then SIGKILLing itself.
KILLED_IN_A_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
real, calls = torch.save, []
def save(obj, handle, *args, **kwargs):
    calls.append(1)
    if len(calls) == 4:
        handle.write(b"half a checkpoint"); handle.flush(); os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, handle, *args, **kwargs)
torch.save = save
from main_2D_DP import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tiny_config):
    path = tiny_config(dp={"epsilon": None, "noise_multiplier": 0.8}, training={"checkpoint_every_steps": 1})
    assert main(["train", "--config", str(path), "--name", "straight"]) == 0
    exp = _exp(path, "killed")
    last = exp / "private" / "last.pt"
    args = ["train", "--config", str(path), "--name", "killed"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_A_WRITE, str(REPO), *args], cwd=REPO,
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert list(last.parent.glob(".last.pt.*.tmp"))  # the half-written file never replaced last.pt
    assert load_checkpoint(last)["steps"] == 3
    rng = random.Random(0)
    kills = 1
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, str(REPO / "main_2D_DP.py"), *args, "--resume"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for a fresh checkpoint, then a bit more
            if last.exists() and last.stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        load_checkpoint(last)  # whatever the moment of the kill, the checkpoint on disk is whole
    assert kills >= 2
    assert main([*args, "--resume"]) == 0
    _assert_same_run(_exp(path, "straight"), exp)  # same steps, epsilon and weights: nothing counted twice or lost
    assert not list(exp.rglob("*.tmp")) and not (exp / ".lock").exists()
    load_checkpoint(exp / "checkpoints" / "best.pt")


def test_privacy_budget_is_never_exceeded_without_explicit_consent(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    first = _summary(_exp(path))
    assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=3"]) == 0
    guarded = _summary(_exp(path))
    assert "privacy budget reached" in guarded["stopped"] and "--allow-budget-increase" in capsys.readouterr().out
    assert guarded["dp"]["epsilon_spent"] <= 8.0 and guarded["steps"] < 2 * first["steps"]
    assert main(["train", "--config", str(path), "--resume", "--allow-budget-increase",
                 "--set", "training.epochs=3"]) == 0
    spent = _summary(_exp(path))
    assert spent["epochs_completed"] == 3 and spent["stopped"] is None and spent["dp"]["epsilon_spent"] > 8.0
    assert spent["dp"]["budget_increase"] == {"increase_allowed": True, "target_epsilon": 8.0,
                                              "epsilon_spent": spent["dp"]["epsilon_spent"]}


def test_a_second_trainer_is_refused_and_a_stale_lock_taken_over(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    assert main(["train", "--config", str(path)]) == 0
    lock = _exp(path) / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "then"}))
        assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=2"]) == 2
        assert f"is being trained by process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of process {sleeper.pid}"):
        assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=2"]) == 0
    assert _summary(_exp(path))["epochs_completed"] == 2 and not lock.exists()


def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch, capsys):
    path = tiny_config(training={"checkpoint_every_steps": 0})
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # best.pt and last.pt of epoch 1 are written; then the disk is full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device" in err and "previous version is kept" in err
    checkpoint = load_checkpoint(_exp(path) / "private" / "last.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["step_in_epoch"] == 0


def test_a_non_finite_loss_stops_training_naming_step_images_and_checkpoint(tiny_config, monkeypatch, capsys):
    path = tiny_config()
    real, calls = Train_Valid_DP.MaskedBCEWithLogitsLoss.forward, []

    def forward(self, logits, target):
        loss = real(self, logits, target)
        calls.extend([1] if torch.is_grad_enabled() else [])  # training chunks, not validation
        return loss * float("nan") if len(calls) == 5 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(Train_Valid_DP.MaskedBCEWithLogitsLoss, "forward", forward)
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at logical step" in err and "last good checkpoint" in err and "this step was not saved" in err
    # the batch's image ids are private: in a file under private/, not in the message (job logs get shared)
    assert "pri_" not in err and "stopped_batch_rank0.txt (private)" in err
    ids = (_exp(path) / "private" / "stopped_batch_rank0.txt").read_text().split()
    assert ids and all(i.startswith("pri_") for i in ids)


def test_weights_made_non_finite_by_a_step_are_never_saved(tiny_config, monkeypatch, capsys):
    path = tiny_config(training={"checkpoint_every_steps": 1})
    real, calls = torch.optim.NAdam.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        out = real(self, *args, **kwargs)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.NAdam, "step", step)
    assert main(["train", "--config", str(path)]) == 1
    assert "non-finite gradient at logical step 3" in capsys.readouterr().err
    saved = load_checkpoint(_exp(path) / "private" / "last.pt")
    assert saved["steps"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tiny_config, tmp_path, capsys):
    path = tiny_config(training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    exp, marker = _exp(path), tmp_path / "pwned"
    for checkpoint in (exp / "checkpoints" / "best.pt", exp / "private" / "last.pt"):
        state = load_checkpoint(checkpoint)
        state["note"] = _Payload(str(marker))
        torch.save(state, checkpoint, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert main(["predict", str(exp)]) == 2
    assert "best.pt: not a readable DP-CXR checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=2"]) == 2
    assert "last.pt: not a readable DP-CXR checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_and_old_checkpoints_are_input_errors(tiny_config, capsys):
    path = tiny_config(training={"epochs": 1})
    assert main(["train", "--config", str(path)]) == 0
    last = _exp(path) / "private" / "last.pt"
    state = load_checkpoint(last)
    torch.save({**state, "format": 1}, last)
    assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=2"]) == 2
    assert f"checkpoint format 1, expected {Train_Valid_DP.CHECKPOINT_FORMAT}" in capsys.readouterr().err
    last.write_bytes(last.read_bytes()[:1000])
    assert main(["train", "--config", str(path), "--resume", "--set", "training.epochs=2"]) == 2
    assert "last.pt: not a readable DP-CXR checkpoint" in capsys.readouterr().err


def _interrupt_at(monkeypatch, target, name: str, call: int, raise_it):
    """Replace ``target.name`` so that its ``call``-th call interrupts instead of running."""
    real, calls = getattr(target, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise_it()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # the command line's handler turns it into an exception here
    time.sleep(5)  # never reached: the handler raises first


def _ctrl_c():
    raise KeyboardInterrupt


@pytest.mark.parametrize("how,code,name", [(_sigterm, 143, "SIGTERM"), (_ctrl_c, 130, "Ctrl-C")])
def test_train_interrupted_says_what_was_kept_and_how_to_continue(tiny_config, monkeypatch, capsys, how, code, name):
    path = tiny_config(training={"epochs": 2})
    _interrupt_at(monkeypatch, Train_Valid_DP, "train_one_epoch", 2, how)
    assert main(["train", "--config", str(path)]) == code
    err = capsys.readouterr().err
    assert f"interrupted ({name})" in err and "train --name tiny --resume" in err and "Traceback" not in err
    assert not (_exp(path) / ".lock").exists()  # released
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command line's alone
    monkeypatch.undo()
    assert main(["train", "--config", str(path), "--name", "tiny", "--resume"]) == 0  # the hint works
    assert _summary(_exp(path))["epochs_completed"] == 2


@pytest.mark.parametrize("command", ["prepare", "sweep", "audit"])
def test_other_long_commands_interrupted_exit_130_with_a_hint(tiny_config, monkeypatch, capsys, command):
    import data.cache
    import privacy.audit_experiment

    path = tiny_config(training={"epochs": 1})
    args = {"prepare": ["prepare", "--config", str(path)],
            "sweep": ["sweep", "--epsilons", "inf", "--config", str(path)],
            "audit": ["audit", str(_exp(path))]}[command]
    if command == "audit":
        assert main(["train", "--config", str(path)]) == 0
        _interrupt_at(monkeypatch, privacy.audit_experiment, "predict_logits", 1, _ctrl_c)
    elif command == "prepare":
        _interrupt_at(monkeypatch, data.cache, "preprocess", 5, _ctrl_c)
    else:
        _interrupt_at(monkeypatch, Train_Valid_DP, "train_one_epoch", 1, _ctrl_c)
    capsys.readouterr()
    assert main(args) == 130
    err = capsys.readouterr().err
    hint = {"prepare": "run prepare again", "sweep": "run the same sweep command again",
            "audit": "run the same audit command again"}[command]
    assert "interrupted (Ctrl-C)" in err and hint in err and "Traceback" not in err
    assert not list(path.parent.rglob(".lock"))


def test_a_killed_start_leaves_a_folder_that_trains_again(tiny_config):
    """A run killed between taking the lock and writing its config leaves only the lock (of a dead
    process, or without a pid at all): the same command starts it afresh."""
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    folder = path.parent / "experiments" / "tiny"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text("")  # killed between creating the lock and writing its owner
    old = time.time() - 60
    os.utime(folder / ".lock", (old, old))
    with pytest.warns(UserWarning, match="taking over a lock without an owner"):
        assert main(["train", "--config", str(path)]) == 0
    assert (folder / "private" / "config.yaml").is_file() and not (folder / ".lock").exists()


def _can_mount() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


# Runs the command line in a private mount namespace where OUT is a tiny tmpfs (SIZE), READONLY
# remounts it read-only after copying SEED into it: a real full disk and a real read-only folder.
IN_A_TINY_FILESYSTEM = """set -e
mount -t tmpfs -o size=$SIZE tmpfs "$OUT"
if [ -n "$SEED" ]; then cp -a "$SEED"/. "$OUT"/; fi
if [ -n "$READONLY" ]; then mount -o remount,ro "$OUT"; fi
cd "$REPO" && "$PYTHON" main_2D_DP.py "$@" 2>"$ERR"
"""


def _in_tiny_filesystem(tmp_path, out, args, size="64k", seed=None, readonly=False):
    out.mkdir(parents=True, exist_ok=True)
    err = tmp_path / f"stderr_{out.name}.txt"
    env = {**os.environ, "OUT": str(out), "SIZE": size, "SEED": str(seed or ""), "READONLY": "1" if readonly else "",
           "REPO": str(REPO), "PYTHON": sys.executable, "ERR": str(err)}
    done = subprocess.run(["unshare", "-m", "sh", "-c", IN_A_TINY_FILESYSTEM, "sh", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, err.read_text() if err.exists() else done.stderr


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -m, as root)")
def test_a_real_full_disk_and_a_read_only_folder_are_output_errors(tiny_config, tmp_path):
    path = tiny_config(training={"epochs": 1}, dp={"enabled": False})
    # torch.save of the first checkpoint on a 256 KiB filesystem: a RuntimeError from torch's writer
    code, err = _in_tiny_filesystem(tmp_path, tmp_path / "full", ["train", "--config", str(path), "--set",
                                                                  f"output.target_dir={tmp_path / 'full'}"], "256k")
    assert code == 1 and "cannot write" in err and "nothing was written" in err and "Traceback" not in err, err
    # a finished experiment in a read-only folder: predict names the file and changes nothing
    assert main(["train", "--config", str(path)]) == 0
    exp = _exp(path)
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    code, err = _in_tiny_filesystem(tmp_path, tmp_path / "ro", ["predict", str(tmp_path / "ro")], "512m", exp,
                                    readonly=True)
    assert code == 1 and "Read-only file system" in err and str(tmp_path / "ro") in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before
    # a report too big for what is left: the comparison's earlier files stay whole, the report is named
    code, err = _in_tiny_filesystem(tmp_path, tmp_path / "small", ["compare", str(exp), str(exp), "--out",
                                                                   str(tmp_path / "small")], "24k")
    assert code == 1 and "report.html" in err and "No space left on device" in err, err


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -m, as root)")
@pytest.mark.parametrize("size, epochs, said", [
    ("4k", 7, "the curves stop at step"),  # one page: the event file fills it at epoch 6 (12 curves)
    ("4k,nr_inodes=1", 1, "no curves are written"),  # not even the event file can be made
])
def test_a_full_disk_under_tensorboard_is_said_and_training_goes_on(tiny_config, tmp_path, size, epochs, said):
    # TensorBoard's folder alone on a full filesystem: its writer thread fails, the checkpoints beside it do not
    path = tiny_config(training={"epochs": epochs}, dp={"enabled": False}, data={"labels": list(LABELS)})
    curves = _exp(path) / "private" / "tensorboard"
    code, err = _in_tiny_filesystem(tmp_path, curves, ["train", "--config", str(path)], size)
    assert code == 0, err
    assert f"TensorBoard could not write to {curves}: No space left on device; {said}" in err, err
    assert _summary(_exp(path))["epochs_completed"] == epochs
    if epochs == 1:  # predict, whose curves go beside the training's: said, and the results are written
        code, err = _in_tiny_filesystem(tmp_path, curves, ["predict", str(_exp(path))], size)
        assert code == 0 and f"TensorBoard could not write to {curves}: No space left on device" in err, err
        assert "The predictions, results and report are written apart" in err
        assert (_exp(path) / "results" / "test_metrics.json").is_file()
