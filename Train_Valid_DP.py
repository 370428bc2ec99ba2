"""Training and validation, non-private or with DP-SGD (Opacus).

DP-SGD, per logical step: draw a Poisson batch of privacy units (``dp.unit``: patients, or images;
each of the N training units independently with probability q = B/N, B =
``training.logical_batch_size``), clip each unit's summed gradient to L2 norm C
(``dp.max_grad_norm``), sum, add Gaussian noise N(0, sigma^2 C^2) and divide by the expected batch
B (``privacy.units``). The accountant (RDP or PRV) composes the steps, counted in units, into
(epsilon, delta). Opacus does all of it except the sampling of units and, by default
(``dp.grad_sample_mode: bookkeeping``), the clipped sum, which ``privacy.bookkeeping`` computes
exactly in one backward pass and hands to Opacus' optimizer for noise, scaling and accounting.
Each logical batch is split into physical chunks that fit in memory without splitting a unit
(``privacy.units.plan_chunks``), and the optimizer adds noise and steps only at the end of a
logical batch. Non-private training shuffles images into logical batches of B and accumulates.
Before every logical step the accountant's epsilon after that step is checked against the target.

``training.precision`` bf16 (CPU or CUDA) runs the forward pass under autocast; the loss, the
per-unit norms, clipping, the clipped sum, the noise and the optimizer stay fp32 (``autocast``).
fp16 (CUDA, non-private only) adds a gradient scaler. ``training.channels_last`` changes only the
memory layout; on CUDA the loader pins memory and copies without blocking (``loader_workers``).

Noise and sampling draw from secret OS entropy unless ``dp.reproducible_noise`` (then from
``experiment.seed``); ``experiment.seed`` always fixes model initialisation, data and splits.

Under torchrun (``parallel``) every rank trains on its share of the units of each logical batch
and rank 0 alone validates and writes.

Everything needed to continue exactly is in ``private/last.pt``, written at the end of every
epoch and every ``training.checkpoint_every_steps`` steps: weights, optimizer, the accountant's
history, the position in the epoch, the best metric and every RNG state (global, sampler, noise),
so a resumed run reports the same epsilon and, on CPU, the same weights as an uninterrupted one.
Those generator states are the secret behind the noise: ``last.pt`` is private, never to be shared.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from opacus.accountants import IAccountant, create_accountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import (DPOptimizerFastGradientClipping, DistributedDPOptimizerFastGradientClipping,
                               get_optimizer_class)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import parallel
from artifacts import (Curves, FolderLock, Layout, atomic_write_text, json_text, load_checkpoint, read_json,
                       save_checkpoint)
from config import DP, PUBLIC_PRETRAINING, Audit, Config, Data, InputError, config_yaml, read_yaml, validate
from data.augment import augmentation
from data.synthetic import generator_fingerprint
from data.dataset import (SPLITS, CXRDataset, Table, default_cache_dir, evaluation_loader, load_table,
                          positive_weights, preprocessing)
from evaluation.calibration import stored_map
from models import build_model, load_pretrained, read_pretrained, resolve_trainable, set_trainable
from parallel import Ranks, resolve_device
from Prediction_DP import auroc_per_label, mean_auroc, predict_scores
from privacy import check_delta, default_delta, noise_multiplier_for, planned_epsilon, pld_epsilons, secret_seed
from privacy.bookkeeping import BookKeeping
from privacy.canaries import check_record, draw_canaries, reference_training_split, with_canaries
from privacy.ledger import (Booking, Ledger, carried, earlier_default, ledger_root, patient_keys, provenance,
                            refuse_earlier_format, test_use, worst)
from privacy.noise import with_one_draw_noise
from privacy.per_sample import check_per_image
from privacy.pos_weight import label_count_noise, noised_positive_weights
from privacy.release import EPSILON_MEANING, plain_privacy, start_note, statement_epsilon, test_use_note
from privacy.units import UnitSampler, plan_chunks, sampling_plan, unit_rows, with_views

CHECKPOINT_FORMAT = 4  # 3: logical batches of privacy units, secret generator states; 4: schedule, weight average
# Settings that may change on --resume; anything else would change the data, the model or the
# privacy accounting of the run being continued (every per-sample method clips exactly alike), or where
# and under which budget it is booked (output.ledger, output.target_dir, dp.total_budget).
RESUMABLE_KEYS = {"training.epochs", "training.device", "training.checkpoint_every_steps", "training.compile",
                  "training.distributed_timeout_s", "training.precision", "training.channels_last",
                  "training.loader_workers",
                  "dp.grad_sample_mode", "data.num_workers",
                  "experiment.name",
                  "evaluation.bootstrap", "evaluation.seed",
                  "evaluation.age_bins", "evaluation.min_subgroup_size"}


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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device):
    """The forward pass's autocast for ``training.precision`` (fp32: none). Only the model runs under
    it: the loss takes the logits in fp32, and backward follows the dtypes of the forward. Parameters,
    their gradients and the optimizer state stay fp32; under DP ``privacy.bookkeeping`` upcasts each
    layer's bf16 activations and output gradients, so norms, clipping and the clipped sum are fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def loader_workers(setting: int | str, configured: int, device) -> int:
    """Worker processes of the training DataLoader (``training.loader_workers``): a number as given;
    ``auto`` keeps ``data.num_workers`` on the CPU (where the step, not loading, is the bottleneck),
    and on CUDA takes min(8, the CPU cores left per process on this machine, less one for the process
    itself), at least ``data.num_workers``: a 512 px image is one 0.25 MB row of the memory-mapped cache,
    and a few processes read and augment them faster than one GPU trains (``bench/bench_gpu.py``)."""
    if setting != "auto":
        return int(setting)
    if torch.device(device).type != "cuda":
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(configured, min(8, per_process - 1))


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, steps: int) -> LambdaLR:
    """The learning rate at logical step t, as a factor of ``training.lr``: a linear warm-up
    (t + 1) / w over the first w steps, then constant or a cosine 0.5 (1 + cos(pi (t - w) / (T - w)))
    down to 0 at the last of the T planned steps. It depends only on the step count, a public
    quantity, so under DP it costs no privacy (unlike a schedule reacting to the training loss)."""
    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if schedule == "constant" or steps <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(t - warmup, steps - warmup) / (steps - warmup)))

    return LambdaLR(optimizer, factor)


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of the weights after every logical step t = 0, 1, ...:
    w_avg <- d_t w_avg + (1 - d_t) w with d_t = min(decay, (1 + t) / (10 + t)) (De et al. 2022's
    warm-up, so early iterates do not linger). Under DP-SGD the average is post-processing of the
    noised iterates, which the accountant already covers: it costs no privacy. Built before the DP
    engine hooks the model, so the copy carries no hooks."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        t = float(updates)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + t) / (10 + t)))

    return AveragedModel(model, multi_avg_fn=update)


@dataclass
class DPSetup:
    """Result of :func:`privatize`: the wrapped objects and the resolved accounting parameters."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    accountant: IAccountant
    noise_multiplier: float
    # per-example losses of a physical batch, each example's unit, whether the batch's one unit
    # continues in the next batch -> what optimizer.step uses
    backward: Callable[[torch.Tensor, torch.Tensor | None, bool], None]


def _mean_backward(per_image: torch.Tensor, units=None, continues: bool = False) -> None:
    """Opacus' per-sample modes (image units only): backward of the batch mean (``loss_reduction='mean'``)."""
    with warnings.catch_warnings():
        # The input image needs no gradient; Opacus' full backward hooks warn about it although
        # the per-sample gradients of all parameters are complete.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        (per_image.sum() / max(len(per_image), 1)).backward()


def privatize(model: nn.Module, optimizer: torch.optim.Optimizer, *, sample_rate: float, expected_batch_size: float,
              steps: int, accountant: str, max_grad_norm: float, grad_sample_mode: str,
              noise_multiplier: float | None = None, target_epsilon: float | None = None,
              delta: float | None = None, noise_generator: torch.Generator | None = None,
              secure_mode: bool = False, history: list = (), example_shape: tuple[int, ...] | None = None,
              reviewed: tuple[type, ...] = ()) -> DPSetup:
    """Opacus' DP optimizer and accountant for Poisson batches of rate q = ``sample_rate`` whose
    expected size (in units) is ``expected_batch_size``; sigma is solved for the target epsilon over
    ``steps`` if not given. ``history``: mechanisms already run on the same data (the accountant
    starts with them, and sigma is solved for the target of all together).

    The model is refused (``InputError``) first, in every mode, unless it treats every image of a
    batch on its own (``privacy.per_sample.check_per_image``, run by ``BookKeeping`` or here): a module
    that mixes the batch, such as a BatchNorm even without parameters, would make one patient's
    gradient depend on the others' and break the per-patient bound C. ``example_shape`` (one image,
    e.g. (1, H, W)): the batch-independence probe runs now on images of that shape, else on the
    model's first batch; ``reviewed``: the caller's own composite modules whose forward is per-image.

    sigma comes from the bisection of Opacus' ``get_noise_multiplier``, so it can be recorded and
    reused on resume instead of being solved again for the remaining steps.
    The batches themselves come from ``privacy.units.UnitSampler``. ``bookkeeping`` leaves the model
    unwrapped and uses Opacus' optimizer for precomputed clipped sums; the other modes wrap it in
    Opacus' GradSampleModule. A ``DPDDP`` model (torchrun) gets Opacus' distributed optimizers (noise
    on rank 0, gradients summed over ranks, expected batch per rank).
    """
    distributed = isinstance(model, DPDDP)
    core = model.module if distributed else model
    if grad_sample_mode == "bookkeeping":
        kind = DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
        backward = BookKeeping(core, max_grad_norm, example_shape, reviewed).backward
    else:
        check_per_image(core, example_shape, reviewed)
        kind = get_optimizer_class(clipping="flat", distributed=distributed, grad_sample_mode=grad_sample_mode)
        model = prepare_module(model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean")
        backward = _mean_backward
    if noise_multiplier is None:
        noise_multiplier = noise_multiplier_for(target_epsilon, delta, sample_rate, steps, accountant, history)
    world = dist.get_world_size() if distributed else 1
    optimizer = with_one_draw_noise(kind)(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                     expected_batch_size=expected_batch_size / world, loss_reduction="mean",
                     generator=noise_generator, secure_mode=secure_mode)
    books = create_accountant(accountant)
    books.history = list(history)
    optimizer.attach_step_hook(books.get_optimizer_hook_fn(sample_rate=sample_rate))
    return DPSetup(model, optimizer, books, float(noise_multiplier), backward)


class TrainingStopped(Exception):
    """Training cannot go on without corrupting the model (non-finite loss or gradient).

    ``images``: the ids of the batch's images (on this rank), which are private: they go to a file
    in ``private/``, not into the message, which may end up in a shared job log.
    """

    def __init__(self, message: str, images: list[str] = ()):
        super().__init__(message)
        self.images = list(images)


@dataclass
class EpochProgress:
    """Where an epoch stands: its logical batches (unit indices), how many are done, loss so far."""

    batches: list[list[int]]
    done: int = 0
    loss_sum: float = 0.0
    seen: int = 0

    @property
    def complete(self) -> bool:
        return self.done == len(self.batches)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)


class EmptySafeCollate:
    """``default_collate``, except that an empty batch gives empty tensors of the right shape.

    An empty Poisson batch still takes a (noise-only) step, and under torchrun a rank's share of a
    batch is empty when the batch has fewer units than there are ranks; the rank must still take part.
    """

    def __init__(self, dataset: Dataset):
        x, y = dataset[0]
        self.empty = (x.new_empty(0, *x.shape), y.new_empty(0, *y.shape))

    def __call__(self, batch):
        return default_collate(batch) if batch else self.empty


def train_one_epoch(model, criterion, optimizer, dataset: Dataset, units: list[np.ndarray], progress: EpochProgress,
                    device, physical_batch_size: int, backward, image_ids, desc: str, *, num_workers: int = 0,
                    loader_seed: int = 0, fixed_shape: bool = False, ranks: Ranks = Ranks(),
                    step_allowed=lambda: True, after_step=lambda: None, epsilon_fn=None, precision: str = "fp32",
                    channels_last: bool = False, scaler: torch.amp.GradScaler | None = None,
                    views: int = 1) -> EpochProgress:
    """Take the logical steps of ``progress.batches`` not yet done, each split into physical chunks.

    A logical batch lists units (``units[u]``: the dataset rows of unit u); its images are loaded
    together and cut by :func:`plan_chunks` into chunks of at most ``physical_batch_size`` images
    that keep a unit whole unless it alone exceeds a chunk. ``criterion`` gives per-image losses.
    DP-SGD (``backward`` from :func:`privatize`): the optimizer accumulates every chunk's clipped
    sum and adds noise once, at the last chunk of the logical batch (what Opacus'
    BatchMemoryManager does); an empty Poisson batch still takes a (noise-only) step. Non-private
    (``backward`` None): gradients of the chunks are accumulated, weighted by size.
    ``views`` K (augmentation multiplicity): the dataset's items are K augmented views of each image
    and ``units`` list them all; each view's loss counts 1/K, so a unit's gradient is the sum over its
    images of the mean over their views, clipped as one: the sensitivity stays C.
    ``fixed_shape`` pads every chunk to ``physical_batch_size`` with blank images, counted in the
    chunk's last unit, whose labels are all unlabelled (NaN): their loss and gradient are exactly
    zero, so a compiled model sees one shape under Poisson sampling without changing the update.
    Under torchrun each rank loads its share of the units of every logical batch; the loss reported
    is that of the whole batch. ``step_allowed()`` is asked before each logical step (the privacy budget guard)
    and ``after_step()`` called after it (periodic checkpoints). A non-finite loss, or weights made
    non-finite by a step, stop training before anything of that step is saved. ``loader_seed``
    seeds the DataLoader's own draw (worker seeds), which would otherwise consume the global RNG
    and make a resumed epoch differ from an uninterrupted one.
    ``precision`` (:func:`autocast`) and ``channels_last`` change how the forward pass runs, not what
    is computed (beyond rounding). ``scaler`` (fp16, non-private only): the loss is scaled before backward and the
    optimizer step is skipped, the scale lowered, when a gradient overflowed; the step still counts.
    On CUDA batches are loaded into pinned memory and copied to the GPU without blocking.
    """
    model.train()
    dp = backward is not None
    if scaler is not None and dp:
        raise ValueError("a gradient scaler skips steps on overflow, which DP-SGD cannot account; use bf16")
    cuda = torch.device(device).type == "cuda"
    todo = progress.batches[progress.done:]
    shares = [ranks.share(batch) for batch in todo]
    rows = [[int(i) for u in share for i in units[u]] for share in shares]
    epoch = DataLoader(dataset, batch_sampler=rows, collate_fn=EmptySafeCollate(dataset), num_workers=num_workers,
                       generator=torch.Generator().manual_seed(loader_seed), pin_memory=cuda)
    bar = tqdm(total=len(progress.batches), initial=progress.done, desc=desc, leave=False, dynamic_ncols=True,
               disable=not ranks.main)
    for batch, share, step_rows, (x, y) in zip(todo, shares, rows, epoch):
        if not step_allowed():
            break
        batch_images = sum(len(units[u]) for u in batch)  # over all ranks
        chunks = plan_chunks([len(units[u]) for u in share], physical_batch_size)
        step_loss = torch.zeros(2, dtype=torch.float64)  # loss sum, images
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            xc, yc = x[chunk.start:chunk.stop], y[chunk.start:chunk.stop]
            in_chunk = torch.tensor(chunk.units, dtype=torch.long)
            n = len(xc)
            if fixed_shape and n < physical_batch_size:
                pad = physical_batch_size - n
                xc = torch.cat([xc, xc.new_zeros(pad, *xc.shape[1:])])
                yc = torch.cat([yc, yc.new_full((pad, *yc.shape[1:]), float("nan"))])
                in_chunk = torch.cat([in_chunk, in_chunk[-1:].expand(pad) if n else torch.zeros(pad, dtype=torch.long)])
            xc, yc = xc.to(device, non_blocking=cuda), yc.to(device, non_blocking=cuda)
            if channels_last:
                xc = xc.contiguous(memory_format=torch.channels_last)
            if precision == "fp32":
                per_image = criterion(model(xc), yc)
            else:
                with autocast(precision, device):
                    logits = model(xc)
                per_image = criterion(logits.float(), yc)
            loss_sum = per_image.detach().sum()
            if dp:
                backward(per_image / views, in_chunk, chunk.continues)
            else:  # the mean over the logical batch, accumulated chunk by chunk; DDP averages over ranks
                with model.no_sync() if ranks.distributed and not last else nullcontext():
                    loss = per_image.sum() * (ranks.world / max(batch_images, 1))
                    (loss if scaler is None else scaler.scale(loss)).backward()
            if not torch.isfinite(loss_sum):
                raise _stopped_at("loss", progress, desc, step_rows, image_ids)
            step_loss += torch.tensor([loss_sum.item(), n], dtype=torch.float64)
            if dp:  # clip and accumulate every chunk; noise and the update come with the last one
                optimizer.signal_skip_step(do_skip=not last)
            if dp or last:
                if scaler is None:
                    optimizer.step()
                else:  # unscales, and skips the step if a gradient is inf/nan
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _stopped_at("gradient", progress, desc, step_rows, image_ids)
        if ranks.distributed:
            dist.all_reduce(step_loss)
        progress.loss_sum += float(step_loss[0])  # an empty Poisson batch adds no loss
        progress.seen += int(step_loss[1])
        progress.done += 1
        bar.update(1)
        # under DP the un-noised training loss is private: it stays in private/ and never reaches a job log
        postfix = {} if dp else {"loss": f"{progress.loss:.4f}"}
        if epsilon_fn is not None and (progress.done % 10 == 0 or progress.complete):
            postfix["eps"] = f"{epsilon_fn():.3f}"
        bar.set_postfix(postfix, refresh=False)
        after_step()
    bar.close()
    return progress


def _stopped_at(what: str, progress: EpochProgress, desc: str, rows: list[int], image_ids) -> TrainingStopped:
    return TrainingStopped(f"non-finite {what} at logical step {progress.done + 1} of {len(progress.batches)} in "
                           f"{desc}, a batch of {len(rows)} images; this step was not saved",
                           [image_ids[j] for j in rows])


def steps_within_budget(accountant: str, history: list, noise_multiplier: float, sample_rate: float,
                        target_epsilon: float, delta: float, planned: int) -> int:
    """The largest k <= ``planned`` such that ``history`` followed by k more steps (sigma, q) spends at
    most the target epsilon.

    The accountant composes the same entries when the steps are taken, so a run that stops after k
    steps reports an epsilon within the target. One accountant call when the plan fits (the usual
    case: sigma was solved for it), else a bisection.
    """
    def spent(k: int) -> float:
        acc = create_accountant(accountant)
        acc.history = list(history) + ([(noise_multiplier, sample_rate, k)] if k else [])
        return acc.get_epsilon(delta) if acc.history else 0.0

    if planned <= 0 or spent(planned) <= target_epsilon:
        return max(planned, 0)
    low, high = 0, planned  # spent(high) > target
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if spent(middle) <= target_epsilon else (low, middle)
    return low


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_compatible(saved: Config, new: Config) -> None:
    """Refuse a resume that would change data, model, batch sizes or DP settings of the run."""
    old_flat = {**_flatten(saved.model_dump()), **_folders(saved)}
    new_flat = {**_flatten(new.model_dump()), **_folders(new)}
    changed = [key for key in new_flat
               if not key.startswith("derived.") and key not in RESUMABLE_KEYS
               and not (key == "dp.delta" and new_flat[key] is None)
               and old_flat.get(key) != new_flat[key]]
    if changed:
        details = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat[k]!r}" for k in changed)
        raise InputError(f"--resume cannot change {details}; only {sorted(RESUMABLE_KEYS)} may change. "
                         f"Start a new experiment (another --name) instead")


def _folders(cfg: Config) -> dict:
    """The settings that name folders, resolved: the same folder however it is written (a relative path,
    ``output.ledger: null`` for the default)."""
    return {"output.target_dir": str(Path(cfg.output.target_dir).expanduser().resolve()),
            "output.ledger": str(ledger_root(cfg.output.ledger))}


def _rng_state(sampler: torch.Generator, noise: torch.Generator | None) -> dict:
    state = {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}
    if noise is not None:
        state["noise"] = noise.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, sampler: torch.Generator, noise: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["sampler"])
    if noise is not None:
        noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def privacy_summary(cfg: Config, history: list, epsilon: float, steps: int, final: bool, budget_note: dict,
                    start: dict | None = None, tests: dict | None = None) -> dict:
    """``private/summary.json``'s ``dp`` object: the privacy statement of a DP run and what it rests on.

    ``final``: training has ended, so the PLD cross-check (add/remove and replace-one adjacency,
    dp_accounting) of the whole history is computed once. ``start``: where its weights started and what
    the runs they come from add for its patients (:func:`_start_summary`), composed into the statement;
    ``tests``: which other runs trained its test patients (:func:`privacy.ledger.test_use`).
    """
    keys = ("unit", "units", "adjacency", "epsilon_spent", "target_epsilon", "delta", "noise_multiplier",
            "max_grad_norm", "sample_rate", "expected_units_per_step", "accountant", "pld_epsilon", "noise",
            "secure_mode", "start", "test_patients_trained", "covers", "budget_increase")
    if not cfg.dp.enabled:
        return {"enabled": False, **dict.fromkeys(keys), "statement": "non-private training: no privacy guarantee"}
    d = cfg.derived
    unit, n_units, delta = cfg.dp.unit, d["n_train_units"], cfg.dp.delta
    noise = ("reproducible: seeded from experiment.seed, so the guarantee does not hold against anyone who knows "
             "the seed" if cfg.dp.reproducible_noise else "secret")
    counts = (f" and one Gaussian release of label counts (noise multiplier {history[0][0]:.4g})"
              if cfg.training.pos_weight == "counts" else "")
    dp = {"enabled": True, "unit": unit, "units": n_units, "adjacency": f"add or remove one {unit}",
          "epsilon_spent": epsilon, "target_epsilon": cfg.dp.epsilon, "delta": delta,
          "noise_multiplier": d["noise_multiplier"], "max_grad_norm": cfg.dp.max_grad_norm,
          "sample_rate": d["sample_rate"], "expected_units_per_step": d["expected_units_per_step"],
          "accountant": cfg.dp.accountant, "pld_epsilon": pld_epsilons(history, delta) if final else None,
          "noise": noise, "secure_mode": cfg.dp.secure_mode, "start": start, "test_patients_trained": tests,
          "covers": _covers(n_units, unit, tests, cfg.evaluation.recalibration != "none"),
          "budget_increase": budget_note or None}
    stated, note, unbounded = statement_epsilon(dp), start_note(dp), bool(start and start["unbounded"])
    claim = (f"({stated:.4g}, {delta:g})-DP for each {'other ' if unbounded else ''}training {unit} (adjacency: add or "
             f"remove all images of one {unit}; {cfg.dp.accountant.upper()} accountant over {steps} DP-SGD steps of "
             f"Poisson sampling at rate {d['sample_rate']:.4g} among {n_units} {unit}s{counts}"
             + (f"; this run alone: epsilon {epsilon:.4g})" if stated != epsilon else ")"))
    if note:
        claim = f"{note}; {claim}" if unbounded else f"{claim}; {note}"
    dp["statement"] = f"{claim}; noise {noise.split(':')[0]}; covers {dp['covers']}"
    return dp


def _covers(n_units: int, unit: str, tests: dict | None, calibrated: bool) -> str:
    """Whom a DP run's statement covers and whom not, with what other runs did with its test patients
    (``calibrated``: the validation patients fit its calibration map too)."""
    trained_by = test_use_note(tests, exact=True)
    return (f"the {n_units} training {unit}s; validation patients choose the best checkpoint and the prediction "
            f"thresholds{', fit the calibration map' if calibrated else ''} and are not protected; "
            + (f"test patients are not used in its training, but {trained_by}" if trained_by
               else "test patients are not used in training"))


def restate_test_patients(cfg: Config, exp_dir: Path) -> dict | None:
    """Rewrite a DP run's statement in ``summary.json`` with what the ledger now records of its test
    patients (an audit's reference runs, trained after it, train on half of them); returns that record
    (:func:`privacy.ledger.test_use`)."""
    summary = read_json(Layout(exp_dir).summary)
    use, dp = test_use(Ledger.of_experiment(cfg, exp_dir), cfg.derived["run_id"]), summary["dp"]
    if dp["enabled"]:
        # the map as first stated: a run of a version before recalibration has none
        covers = _covers(dp["units"], dp["unit"], use, "calibration map" in dp["covers"])
        dp.update(statement=dp["statement"].removesuffix(dp["covers"]) + covers, covers=covers,
                  test_patients_trained=use)
        _write_summary(exp_dir, summary)
    return use


def _positive_weights(cfg: Config, frame, labels: list[str], units: list[np.ndarray], budget: float | None,
                      generator: torch.Generator, ckpt: dict | None) -> tuple[torch.Tensor, list]:
    """``training.pos_weight`` and what computing it spent (accountant entries; none on resume, where
    the weights come from the checkpoint and their cost is in its history); under DP the counts take
    their share of the run's epsilon ``budget``."""
    choice = cfg.training.pos_weight
    if isinstance(choice, list):
        return torch.tensor(choice), []
    if choice == "none":
        return torch.ones(len(labels)), []
    exact = positive_weights(frame, labels)  # also refuses a label without positive training images
    if not cfg.dp.enabled:
        return exact, []
    if ckpt is not None:
        return torch.tensor(ckpt["pos_weight"]), []
    sigma = label_count_noise(budget, cfg.dp.delta, cfg.dp.label_count_share)
    weights, entry = noised_positive_weights(frame, labels, units, sigma, generator, cfg.dp.secure_mode)
    return weights, [entry]


def _weights_source(cfg: Config, history: list | None) -> str:
    choice = cfg.training.pos_weight
    if choice == "counts" and cfg.dp.enabled:
        return (f"training label counts per {cfg.dp.unit}, Gaussian noise multiplier {history[0][0]:.4g} "
                f"({cfg.dp.label_count_share:g} of the budget), accounted")
    if choice == "counts":
        return "exact training label counts"
    return "none (1 for every label)" if choice == "none" else "given in the config"


def _booking(cfg: Config, exp_dir: Path, data: TrainingData, delta: float | None, ranks: Ranks) -> Booking | None:
    """Rank 0's entry for this run, listing the patients it trains, in the privacy ledger of its dataset
    (one per dataset and folder, whatever the site and views); the ledger's root is made explicit in the
    config, so that reference runs and sweeps share it and a resume cannot move it."""
    if not ranks.main:
        return None
    root = ledger_root(cfg.output.ledger)
    refuse_earlier_format(root, earlier_default(cfg.output.target_dir))
    ledger, identity = Ledger.of_dataset(root, cfg.data.dataset, data.table.root)
    cfg.output.ledger = str(root)
    cfg.derived["ledger_key"] = ledger.key
    images = data.train["patient_id"].astype(str).value_counts()
    patients = patient_keys(images.index)
    delta = delta if delta is not None else default_delta(len(patients))
    return Booking(ledger, identity, cfg.derived["run_id"], str(exp_dir.resolve()), cfg.dp.enabled, cfg.dp.unit,
                   cfg.dp.accountant, delta, patients, patient_keys(images.index[images > 1]),
                   patient_keys(data.table.split("test")["patient_id"]), cfg.derived.get("pretrained_provenance"))


def _write_summary(exp_dir: Path, summary: dict) -> None:
    atomic_write_text(Layout(exp_dir).summary, json_text(summary))


def train(cfg: Config, exp_dir: Path, resume: bool = False, allow_budget_increase: bool = False,
          ranks: Ranks = Ranks()) -> dict:
    """Train ``cfg`` into ``exp_dir`` (new, or continued from ``private/last.pt``); return the summary.

    One job at a time: the experiment folder is locked while training; a run refused (or stopped)
    before it wrote anything leaves no folder behind. Under torchrun every rank trains and reads the
    checkpoint it resumes from; rank 0 locks and writes (others return {}).
    """
    exp_dir = Path(exp_dir)
    if not ranks.main:
        return _train(cfg, exp_dir, resume, allow_budget_increase, ranks)
    new = not exp_dir.exists()
    try:
        with FolderLock(exp_dir):
            for leftover in exp_dir.rglob(".*.tmp"):  # a write interrupted by a kill; the target file is intact
                leftover.unlink()
            return _train(cfg, exp_dir, resume, allow_budget_increase, ranks)
    finally:
        if new and exp_dir.is_dir() and not any(exp_dir.iterdir()):
            exp_dir.rmdir()


@dataclass
class TrainingData:
    """What a run trains and validates on (:func:`_training_data`)."""

    table: Table
    train: pd.DataFrame  # the training split as trained: with canaries, or a reference run's half
    valid: pd.DataFrame
    n_test: int
    canaries: pd.DataFrame | None
    units: list[np.ndarray]  # rows of each privacy unit (each image, for non-private training)
    n_patients: int
    n_units: int


def _training_data(data: Data, dp: bool, unit: str, audit: Audit, seed: int) -> TrainingData:
    """The dataset's splits (none may be empty), the audit's canaries or reference half applied,
    and the training rows grouped into units: ``unit`` under DP, single images otherwise."""
    table = load_table(data, seed)
    frames = {split: table.split(split) for split in SPLITS}
    for split, frame in frames.items():
        if len(frame) == 0:
            raise InputError(f"{table.root}: the {split} split of site '{data.site}' is empty")
    train_frame, labels = frames["train"], list(data.labels)
    canaries = draw_canaries(train_frame, labels, audit.canaries, seed) if audit.canaries else None
    if canaries is not None:
        train_frame = with_canaries(train_frame, canaries, labels)
    if audit.reference is not None:
        train_frame = reference_training_split(table.frame, audit.reference, seed)
    n_patients = int(train_frame["patient_id"].nunique())
    return TrainingData(table, train_frame, frames["valid"], len(frames["test"]), canaries,
                        unit_rows(train_frame["patient_id"], unit if dp else "image"), n_patients,
                        n_patients if unit == "patient" else len(train_frame))


def _model_and_optimizer(cfg: Config, n_labels: int, device, start: str | Path | None):
    """The model on ``device`` (initialised from ``start``, a checkpoint, unless None), with only
    ``training.trainable`` left trainable; its optimizer over those parameters; the moving average of
    its weights (``training.ema``, or None); and the number of trained values."""
    model = build_model(cfg.model.name, n_labels, cfg.model.activation, cfg.data.image_size)
    if start is not None:
        fresh = load_pretrained(model, start)
        print(f"initialised from {start}; newly initialised: {fresh or 'none'}")
    trained = set_trainable(model, resolve_trainable(cfg.training.trainable, bool(cfg.model.pretrained_checkpoint)))
    model.to(device)
    if cfg.training.channels_last:  # convolution weights (and, per batch, the images) as N, H, W, C in memory
        model.to(memory_format=torch.channels_last)
    ema = weight_average(model, cfg.training.ema) if cfg.training.ema else None
    optimizer = build_optimizer(cfg.training.optimizer, [p for p in model.parameters() if p.requires_grad],
                                cfg.training.lr, cfg.training.weight_decay)
    return model, optimizer, ema, trained


# Settings of a run that change where or how fast it runs, not what it learns
RUNTIME_KEYS = {"device", "checkpoint_every_steps", "compile", "distributed_timeout_s", "loader_workers",
                "channels_last", "precision"}


def public_pretraining(cfg: Config) -> tuple[Config, Path]:
    """The non-private run behind ``model.pretrained_checkpoint: public``, and its folder in the cache.

    It trains on ``pretraining.site`` of the configured dataset with the config's data and model
    settings, ``pretraining.training`` (device settings from ``training``), one view per image and no
    DP; its folder is named by a fingerprint of everything that changes what it learns, so one
    recipe is trained once and reused by every run (and sweep) that starts from it, whatever its
    ``experiment.seed`` when ``data.split_seed`` fixes the data (its seed is the data's), and booked in
    the privacy ledger of the runs that start from it.
    """
    pre = cfg.pretraining
    training = pre.training.model_copy(update={key: getattr(cfg.training, key) for key in RUNTIME_KEYS})
    # the seed of the data: runs that differ only in experiment.seed (sweep --seeds) share one public model
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.experiment.seed
    data = cfg.data.model_copy(update={"site": pre.site, "split_seed": seed})
    learned = {"data": data.model_dump(exclude={"num_workers", "cache"}),
               "model": cfg.model.model_dump(exclude={"pretrained_checkpoint", "allow_same_patients"}),
               "training": training.model_dump(exclude=RUNTIME_KEYS), "seed": seed,
               # the built-in images themselves: a change to how they are drawn trains another public model
               "images": generator_fingerprint() if cfg.data.dataset == "synthetic" else None,
               # the ledger it is booked in: a run booked in another ledger cannot show there whom the public
               # model trained, so it would count as having trained every patient (privacy.ledger.start_chain)
               "ledger": str(ledger_root(cfg.output.ledger))}
    fingerprint = hashlib.sha256(json.dumps(learned, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.data.dataset}-{pre.site}_{cfg.model.name}_{fingerprint}"
    folder = Path(pre.dir).expanduser() if pre.dir else default_cache_dir() / "pretrained"
    config = validate({"experiment": {"name": name, "seed": seed}, "data": data.model_dump(),
                       "model": {**cfg.model.model_dump(), "pretrained_checkpoint": None},
                       "training": training.model_dump(), "dp": {"enabled": False},
                       "evaluation": cfg.evaluation.model_dump(),
                       "output": {"target_dir": str(folder),
                                  "ledger": str(ledger_root(cfg.output.ledger))}},
                      source="pretraining")
    return config, folder / name


def _start_weights(cfg: Config, data: TrainingData, ranks: Ranks) -> tuple[Path | None, dict]:
    """Where a new run's weights start (a checkpoint, or None from scratch) and what to record of it,
    its provenance included (:func:`_start_provenance`, which refuses a start trained on this run's
    patients); ``public`` trains the public model first unless the cache has it (:func:`_public_start`)."""
    start = cfg.model.pretrained_checkpoint
    if not start:
        return None, {}
    folder, facts = _public_start(cfg, data, ranks) if start == PUBLIC_PRETRAINING else (Path(start), {})
    return folder, {**facts, "pretrained_provenance": _start_provenance(cfg, data, folder, ranks)}


def _public_start(cfg: Config, data: TrainingData, ranks: Ranks) -> tuple[Path, dict]:
    """The folder of the public model (trained now unless the cache has it) and what to record of it;
    refused, before it trains, when its site holds any of this run's training patients (they would be
    trained on without privacy)."""
    pre_cfg, folder = public_pretraining(cfg)
    public = load_table(pre_cfg.data, pre_cfg.experiment.seed)
    shared = set(public.frame["patient_id"].astype(str)) & set(data.train["patient_id"].astype(str))
    if shared:
        raise InputError(f"pretraining.site '{cfg.pretraining.site}' has {len(shared)} of this run's training patients "
                         f"(e.g. {sorted(shared)[0]!r}), so model.pretrained_checkpoint: public would train on them "
                         f"without privacy (only the built-in data has a separate public site by default): set "
                         f"model.pretrained_checkpoint to a model trained on public data (a .pt file or an experiment "
                         f"folder), or null to train from scratch")
    files = Layout(folder)
    done = files.summary.is_file() and read_json(files.summary).get("epochs_completed") == pre_cfg.training.epochs
    if not done:
        if ranks.main:
            print(f"pretraining (non-private) on the {cfg.pretraining.site} site, once for these settings: {folder}")
        train(pre_cfg, folder, resume=files.last.is_file(), ranks=ranks)
        parallel.from_main(ranks, None)  # every rank waits for rank 0's best.pt
    elif ranks.main:
        print(f"pretrained model (non-private, {cfg.pretraining.site} site) from the cache: {folder}")
    return folder, {"pretrained_checkpoint": PUBLIC_PRETRAINING, "pretrained_folder": str(folder),
                    "pretrained_site": cfg.pretraining.site, "pretrained_patients": int(public.frame["patient_id"].nunique())}


def _start_provenance(cfg: Config, data: TrainingData, start: Path, ranks: Ranks) -> dict | str:
    """The provenance of the checkpoint ``start`` (:func:`privacy.ledger.provenance`), or "unknown" for a
    file that records none. A DP run whose weights would come from runs that trained any of its training
    patients (followed through the ledger: :func:`privacy.ledger.start_chain`) is refused, naming the
    epsilon those runs already give them, unless ``model.allow_same_patients``; its statement then
    composes them (:func:`_start_summary`)."""
    recorded = _recorded_provenance(start)
    if recorded is None or not cfg.dp.enabled:
        return recorded or "unknown"
    root = ledger_root(cfg.output.ledger)
    ledger, _ = Ledger.of_dataset(root, cfg.data.dataset, data.table.root)
    mine = set(patient_keys(data.train["patient_id"]))
    runs, count = carried(root, ledger.key, recorded, mine)
    if not count:
        return recorded
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(data.n_units)
    level = worst(runs, cfg.dp.accountant, delta, among=mine)
    given = f"{level.epsilon:.4g} ({level.note})"
    if not cfg.model.allow_same_patients:
        raise InputError(f"model.pretrained_checkpoint: {start} comes from runs that trained {count} of this run's "
                         f"{len(mine)} training patients, recorded in the ledger of their dataset, {ledger.folder}: "
                         f"starting from it gives them epsilon {given} before this run adds its own. Start from "
                         f"a model trained on other patients, or set model.allow_same_patients: true to train anyway "
                         f"(the statement and the model card then compose those runs for them"
                         + ("; NOT DP for these patients)" if math.isinf(level.epsilon) else ")"))
    if ranks.main:
        print(f"model.allow_same_patients: {start} comes from runs that trained {count} of this run's training "
              f"patients (epsilon {given}); the statement composes them"
              + (": NOT DP for these patients" if math.isinf(level.epsilon) else ""))
    return recorded


def _start_summary(cfg: Config, booking: Booking, history: list, steps: int) -> dict | None:
    """``summary.json``'s ``dp.start``: whether the checkpoint the weights started from recorded its
    provenance and, when the runs they come from trained some of this run's patients, how many, and
    those runs composed with this one (its ``history`` after ``steps``) for its worst-off patient
    (unbounded if one of them was non-private); None from scratch."""
    recorded = cfg.derived.get("pretrained_provenance")
    if recorded is None:
        return None
    start = {"checkpoint": str(cfg.model.pretrained_checkpoint),
             "provenance": "unknown" if recorded == "unknown" else "recorded", "same_patients": 0,
             "epsilon": None, "unbounded": False, "note": None}
    mine = set(booking.patients)
    runs, count = carried(booking.ledger.root, booking.ledger.key, recorded, mine)
    if count:
        level = worst(runs + [booking.entry(history, steps)], cfg.dp.accountant, booking.delta, among=mine)
        start.update(same_patients=count, epsilon=level.epsilon, unbounded=math.isinf(level.epsilon), note=level.note)
    return start


def _recorded_provenance(start: Path) -> dict | None:
    """What the checkpoint ``start`` records of the run that wrote it; for an experiment folder whose
    checkpoints predate the record, what its config says; None for a file from elsewhere."""
    recorded = read_pretrained(start).get("provenance")
    if recorded is None and start.is_dir() and Layout(start).config.is_file():
        raw = read_yaml(Layout(start).config)
        if "ledger_key" in raw.get("derived", {}):
            recorded = provenance(raw["derived"]["ledger_key"], raw["derived"]["run_id"], raw["dp"]["enabled"])
    return recorded


def _generators(secret: bool, run_seed: int, device, ranks: Ranks) -> tuple[torch.Generator, torch.Generator, int]:
    """Generators of the batches and the noise, and the seed of the label-count noise: secret OS
    entropy (rank 0's, shared by every rank), or derived from the run's seed (reproducible noise)."""
    seeds = parallel.from_main(ranks, [secret_seed() for _ in range(3)] if secret and ranks.main else None)
    sampler_seed, noise_seed, count_seed = seeds if secret else (run_seed + 1, run_seed + 2, run_seed + 3)
    return (torch.Generator().manual_seed(sampler_seed), torch.Generator(device=device).manual_seed(noise_seed),
            count_seed)


@dataclass
class Trainer:
    """The objects a run's steps, validation and checkpoints use (:func:`_set_up`)."""

    forward: nn.Module  # what the training step calls: wrapped for DP or DDP, perhaps compiled
    core: nn.Module  # the plain module, whose weights are validated and saved
    optimizer: torch.optim.Optimizer
    backward: Callable | None  # DP: backward of the per-image losses (clipped sums); None: plain
    accountant: IAccountant | None
    train_set: CXRDataset
    sampler: UnitSampler
    sampler_gen: torch.Generator
    noise_gen: torch.Generator | None
    pos_weight: torch.Tensor
    criterion: nn.Module  # validation: mean over images
    per_image_loss: nn.Module
    delta: float | None
    planned: int  # steps of all epochs
    noise_multiplier: float | None  # sigma of DP-SGD (None: non-private)
    scaler: torch.amp.GradScaler | None
    units: list[np.ndarray]  # each unit's items of ``train_set`` (all views of all its images)
    views: int  # augmented views of each image per step (dp.augmult)
    schedule: LambdaLR
    ema: AveragedModel | None  # the moving average of the weights, or None

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, saved as best.pt and used for prediction: the average, if any."""
        return self.core if self.ema is None else self.ema.module

    def history(self) -> list:
        return self.accountant.history if self.accountant is not None else []

    def epsilon(self) -> float | None:
        """Epsilon spent so far at the run's delta (None: non-private)."""
        return self.accountant.get_epsilon(self.delta) if self.accountant is not None else None


def _privacy_plan(cfg: Config, data: TrainingData) -> float | None:
    """A DP run's checks that need the data but nothing trained or written (so a refusal comes before the
    public model is trained): the batch fits the units, ``dp.delta`` (set to its default here) is
    allowed, and a fixed sigma's planned epsilon is finite. Returns the epsilon budget: the target, or
    what the planned steps spend at the fixed sigma (None without DP)."""
    if not cfg.dp.enabled:
        return None
    unit, batch_size = cfg.dp.unit, cfg.training.logical_batch_size
    if batch_size > data.n_units:
        raise InputError(f"training.logical_batch_size = {batch_size} expected {unit}s per step, but the training "
                         f"split has {data.n_units} {unit}s (the sample rate B/N must be at most 1)")
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(data.n_units)
    check_delta(delta, data.n_units, unit, cfg.dp.allow_large_delta)
    cfg.dp.delta = delta
    if cfg.dp.epsilon is not None:
        return cfg.dp.epsilon
    sample_rate, steps_per_epoch = sampling_plan(len(data.units), batch_size, poisson=True)
    return planned_epsilon(cfg.dp.noise_multiplier, sample_rate, cfg.training.epochs * steps_per_epoch,
                           cfg.dp.accountant, delta)


def _set_up(cfg: Config, data: TrainingData, ckpt: dict | None, device, ranks: Ranks, run_seed: int,
            start: str | Path | None, budget: float | None) -> Trainer:
    """Model (from ``start`` on a new run), sampler, loss and (under DP) Opacus' optimizer and accountant,
    with sigma solved for the target; fills ``cfg.derived`` with the facts of the run (sizes, privacy
    parameters). ``budget``: :func:`_privacy_plan`'s."""
    dp, unit, labels, views = cfg.dp.enabled, cfg.dp.unit, list(cfg.data.labels), cfg.dp.augmult
    model, optimizer, ema, trained = _model_and_optimizer(cfg, len(labels), device, start if ckpt is None else None)
    train_set = CXRDataset(data.train, data.table.root, labels, preprocessing(cfg.data), data.table.cache,
                           augmentation(cfg.training.augment, labels, cfg.data.image_size), views)
    secret = dp and not cfg.dp.reproducible_noise
    sampler_gen, noise_gen, count_seed = _generators(secret, run_seed, device, ranks)
    batch_size = cfg.training.logical_batch_size
    sampler = UnitSampler(len(data.units), batch_size, sampler_gen, poisson=dp)
    planned = cfg.training.epochs * sampler.steps_per_epoch
    pos_weight, spent_before = _positive_weights(cfg, data.train, labels, data.units, budget,
                                                 torch.Generator().manual_seed(count_seed), ckpt)
    cfg.derived = {"n_train": len(data.train), "n_valid": len(data.valid), "n_test": data.n_test,
                   "n_train_patients": data.n_patients, "privacy_unit": unit, "n_train_units": data.n_units,
                   "dataset_folder": str(data.table.root),
                   "preprocessing_cache": str(data.table.cache.images.parent) if data.table.cache else None,
                   "pos_weight": dict(zip(labels, map(float, pos_weight))), "steps_per_epoch": sampler.steps_per_epoch,
                   "trained_values": trained,
                   "pos_weight_source": _weights_source(cfg, spent_before or (ckpt or {}).get("accountant_history"))}
    accountant, backward = None, None
    if dp:
        setup = privatize(DPDDP(model) if ranks.distributed else model, optimizer, sample_rate=sampler.sample_rate,
                          expected_batch_size=batch_size, steps=planned, accountant=cfg.dp.accountant,
                          max_grad_norm=cfg.dp.max_grad_norm, grad_sample_mode=cfg.dp.grad_sample_mode,
                          noise_multiplier=ckpt["noise_multiplier"] if ckpt else cfg.dp.noise_multiplier,
                          target_epsilon=cfg.dp.epsilon, delta=cfg.dp.delta, noise_generator=noise_gen,
                          secure_mode=cfg.dp.secure_mode, history=spent_before,
                          example_shape=tuple(train_set[0][0].shape))
        model, optimizer, accountant, backward = setup.model, setup.optimizer, setup.accountant, setup.backward
        cfg.derived.update(noise_multiplier=setup.noise_multiplier, sample_rate=sampler.sample_rate,
                           expected_units_per_step=batch_size)
        if ranks.main and not secret:
            print("dp.reproducible_noise: noise and sampling are seeded from experiment.seed; the privacy guarantee "
                  "does not hold against anyone who knows the seed (for tests and debugging only)")
    elif ranks.distributed:
        model = DDP(model)
    core = model._module if dp and cfg.dp.grad_sample_mode != "bookkeeping" else model  # Opacus' GradSampleModule
    core = core.module if ranks.distributed else core  # (DP)DDP's
    forward = model
    if cfg.training.compile:  # training forward pass only; a fresh cache, not a graph of an earlier run's model
        torch._dynamo.reset()
        forward = torch.compile(model)
    # fp16 (non-private, CUDA; config.py refuses it under DP): dynamic loss scaling against underflow
    scaler = torch.amp.GradScaler(device.type) if cfg.training.precision == "fp16" else None
    schedule = learning_rate_schedule(optimizer, cfg.training.schedule, cfg.training.warmup_steps, planned)
    return Trainer(forward, core, optimizer, backward, accountant, train_set, sampler, sampler_gen,
                   noise_gen if dp else None, pos_weight, MaskedBCEWithLogitsLoss(pos_weight).to(device),
                   MaskedBCEWithLogitsLoss(pos_weight, reduction="none").to(device),
                   cfg.dp.delta if dp else None, planned,
                   cfg.derived.get("noise_multiplier"), scaler, with_views(data.units, views), views, schedule, ema)


def _open_records(cfg: Config, files: Layout, data: TrainingData, trainer: Trainer, ckpt: dict | None,
                  run: RunState, budget_steps: float, ranks: Ranks) -> Booking | None:
    """The run's id; its booking in the ledger as planned (up to ``budget_steps``), refused by
    ``dp.total_budget`` before anything is written; then the resolved config (and the audit's canary
    record) in the experiment folder."""
    n_train = len(data.train)
    saved = read_yaml(files.config).get("derived", {}) if ranks.main and ckpt is not None else {}
    if saved.get("n_train", n_train) != n_train:
        raise InputError(f"--resume: the training split now has {n_train} images, the run started with "
                         f"{saved['n_train']} (data or preprocessing cache changed); start a new experiment")
    cfg.derived["run_id"] = parallel.from_main(ranks, saved.get("run_id") or uuid.uuid4().hex[:12])
    cfg.derived.update({key: value for key, value in saved.items() if key.startswith("pretrained_")})  # resumed
    booking = _booking(cfg, files.root, data, trainer.delta, ranks)
    if booking is not None:
        planned = int(min(trainer.planned, budget_steps))
        done, left = list(trainer.history()), planned - run.steps
        booking.open(done, run.steps, done + ([(trainer.noise_multiplier, trainer.sampler.sample_rate, left)]
                                              if trainer.accountant is not None and left > 0 else []),
                     planned, cfg.dp.total_budget)
    if ranks.main:
        files.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(files.config, config_yaml(cfg))
        if data.canaries is not None:
            record = files.audit / "canaries.csv"
            atomic_write_text(record, check_record(record, data.canaries, required=False))
    return booking


@dataclass
class RunState:
    """Where a run stands: what ``last.pt`` records besides the trainer's objects."""

    epoch: int = 0  # epochs completed
    steps: int = 0
    best: float = -math.inf  # best validation AUROC, and its epoch (None: no best.pt yet)
    best_epoch: int | None = None
    progress: EpochProgress | None = None  # the current epoch's batches and how many are done
    epoch_start: object = None  # the sampler's state before the current epoch's batches were drawn
    budget_note: dict = field(default_factory=dict)
    stopped: str | None = None


def _resume(trainer: Trainer, ckpt: dict | None) -> RunState:
    """Load ``last.pt`` into the trainer (weights, optimizer, accountant, every RNG) and return where
    it stood; an interrupted epoch's batches are redrawn from the sampler state it began with."""
    if ckpt is None:
        return RunState()
    trainer.core.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.schedule.load_state_dict(ckpt["schedule"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(ckpt["ema"])
    if trainer.scaler is not None and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if trainer.accountant is not None:
        trainer.accountant.history = [tuple(entry) for entry in ckpt["accountant_history"]]
    run = RunState(ckpt["epoch"], ckpt["steps"], ckpt["best_valid_auroc_mean"], ckpt["best_epoch"],
                   budget_note=ckpt.get("budget", {}))
    if ckpt["step_in_epoch"]:
        trainer.sampler_gen.set_state(ckpt["epoch_sampler_state"])
        run.progress = EpochProgress(trainer.sampler.draw_epoch(), ckpt["step_in_epoch"], *ckpt["epoch_loss"])
        run.epoch_start = ckpt["epoch_sampler_state"]
    _set_rng_state(ckpt["rng"], trainer.sampler_gen, trainer.noise_gen)
    return run


def _budget_steps(dp: DP, trainer: Trainer, run: RunState, allow_increase: bool, ranks: Ranks) -> float:
    """The privacy budget guard: the step count at which training must stop to stay within
    ``dp.epsilon`` (inf without a target or with ``--allow-budget-increase``, which is recorded)."""
    if not dp.enabled or dp.epsilon is None:
        return math.inf
    if allow_increase:
        run.budget_note = {"increase_allowed": True, "target_epsilon": dp.epsilon}
        if ranks.main:
            print(f"--allow-budget-increase: training may spend more than the target epsilon {dp.epsilon:g}; "
                  f"the epsilon spent is recorded in summary.json")
        return math.inf
    steps = run.steps + steps_within_budget(dp.accountant, trainer.accountant.history,
                                            trainer.noise_multiplier, trainer.sampler.sample_rate,
                                            dp.epsilon, trainer.delta, trainer.planned - run.steps)
    if trainer.planned > steps and ranks.main:
        print(f"privacy budget: epsilon {dp.epsilon:g} allows {steps} steps, {trainer.planned} are planned; "
              f"training stops at step {steps} (--allow-budget-increase to go beyond)")
    return steps


def _provenance(cfg: Config) -> dict:
    """What every checkpoint of the run records of it (:func:`privacy.ledger.provenance`): a run started
    from it finds its entry, and the patients it trained, in the ledger."""
    return provenance(cfg.derived["ledger_key"], cfg.derived["run_id"], cfg.dp.enabled)


def _save_last(trainer: Trainer, run: RunState, cfg: Config, path: Path) -> None:
    """``last.pt``: everything to continue exactly from here (only tensors and plain values: safe to
    load), and the run's provenance. The steps it holds are booked before it is written."""
    progress = run.progress
    save_checkpoint({
        "format": CHECKPOINT_FORMAT, "model": trainer.core.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "labels": list(cfg.data.labels), "model_name": cfg.model.name, "provenance": _provenance(cfg),
        "epoch": run.epoch + progress.complete, "steps": run.steps,
        "step_in_epoch": 0 if progress.complete else progress.done, "epoch_sampler_state": run.epoch_start,
        "epoch_loss": [progress.loss_sum, progress.seen], "best_valid_auroc_mean": run.best,
        "best_epoch": run.best_epoch,
        "noise_multiplier": trainer.noise_multiplier,
        "budget": run.budget_note, "pos_weight": trainer.pos_weight.tolist(),
        "accountant_history": [list(entry) for entry in trainer.history()],
        "rng": _rng_state(trainer.sampler_gen, trainer.noise_gen), "schedule": trainer.schedule.state_dict(),
        **({"ema": trainer.ema.state_dict()} if trainer.ema is not None else {}),
        **({"scaler": trainer.scaler.state_dict()} if trainer.scaler is not None else {})}, path)


def _train_epoch(cfg: Config, trainer: Trainer, run: RunState, data: TrainingData, files: Layout,
                 booking: Booking | None, device, ranks: Ranks, run_seed: int, budget_steps: float) -> None:
    """The steps of epoch ``run.epoch`` not yet taken, within the budget; ``last.pt`` every
    ``training.checkpoint_every_steps`` steps. A non-finite loss stops training with the batch's
    image ids written to a private file."""
    if run.progress is None:
        run.epoch_start = trainer.sampler_gen.get_state()
        run.progress = EpochProgress(trainer.sampler.draw_epoch())
    every = cfg.training.checkpoint_every_steps

    def after_step() -> None:
        run.steps += 1
        trainer.schedule.step()
        if trainer.ema is not None:
            trainer.ema.update_parameters(trainer.core)
        if ranks.main and every and run.steps % every == 0 and not run.progress.complete:
            booking.record(trainer.history(), run.steps)  # the ledger never lags a checkpoint
            _save_last(trainer, run, cfg, files.last)

    dp = trainer.accountant is not None
    try:
        train_one_epoch(trainer.forward, trainer.per_image_loss, trainer.optimizer, trainer.train_set, trainer.units,
                        run.progress, device, cfg.training.physical_batch_size, trainer.backward,
                        np.repeat(data.train["image_id"].to_numpy(), trainer.views).tolist(),
                        f"epoch {run.epoch + 1}/{cfg.training.epochs}", views=trainer.views,
                        num_workers=loader_workers(cfg.training.loader_workers, cfg.data.num_workers, device),
                        loader_seed=run_seed * 10_000 + run.epoch, precision=cfg.training.precision,
                        channels_last=cfg.training.channels_last, scaler=trainer.scaler,
                        step_allowed=lambda: run.steps < budget_steps, after_step=after_step,
                        epsilon_fn=trainer.epsilon if dp else None,
                        fixed_shape=cfg.training.compile, ranks=ranks)
    except TrainingStopped as exc:
        good = files.last if files.last.is_file() else "none yet"
        batch = files.private / f"stopped_batch_rank{ranks.rank}.txt"
        atomic_write_text(batch, "\n".join(exc.images) + "\n")
        raise TrainingStopped(f"{exc}; its image ids are in {batch} (private); last good checkpoint: {good} "
                              f"(check the learning rate and these images)") from None
    if not run.progress.complete:
        run.stopped = (f"privacy budget reached: epsilon {trainer.epsilon():.4f} of "
                       f"target {cfg.dp.epsilon:g} at step {run.steps}")


def _validate_and_save(cfg: Config, trainer: Trainer, run: RunState, valid_loader, valid: pd.DataFrame,
                       files: Layout, booking: Booking, curves: Curves, device, started: float) -> dict:
    """After an epoch (rank 0): validation AUROC and losses to TensorBoard, the ledger, ``best.pt`` when
    the mean AUROC improved (with the recalibration map fit on these validation scores: validation
    patients are outside the guarantee, so it costs no privacy), ``last.pt`` and ``summary.json``;
    returns the summary."""
    labels, dp, epochs, ev = list(cfg.data.labels), trainer.accountant is not None, cfg.training.epochs, cfg.evaluation
    progress, epoch, steps = run.progress, run.epoch, run.steps
    valid_truth = valid[labels].to_numpy()
    scores, valid_loss = predict_scores(trainer.evaluated, valid_loader, device, trainer.criterion, desc="valid")
    per_label = auroc_per_label(valid_truth, scores, labels)
    auroc_mean = mean_auroc(per_label)
    eps = trainer.epsilon()

    curves.add({"train/loss": progress.loss, "valid/loss": valid_loss, "valid/auroc_mean": auroc_mean,
                **{f"valid/auroc/{label}": value for label, value in per_label.items()},
                **({"privacy/epsilon": eps} if dp else {})}, steps)

    booking.record(trainer.history(), steps)  # before any checkpoint holds these steps
    # NaN (no label with both classes) never wins, but the first epoch always gives a best.pt
    if auroc_mean > run.best or run.best_epoch is None:
        run.best, run.best_epoch = (auroc_mean if auroc_mean > run.best else run.best), epoch + 1
        save_checkpoint({"format": CHECKPOINT_FORMAT, "model": trainer.evaluated.state_dict(), "labels": labels,
                         "model_name": cfg.model.name, "provenance": _provenance(cfg), "epoch": epoch + 1,
                         "valid_auroc_mean": auroc_mean,
                         "calibration": stored_map(valid_truth, scores, labels, valid["patient_id"].nunique(),
                                                   ev.recalibration, ev.min_positives, ev.min_negatives)}, files.best)
    _save_last(trainer, run, cfg, files.last)
    if run.budget_note:
        run.budget_note["epsilon_spent"] = eps
    summary = {
        "experiment": files.root.name, "epochs_completed": epoch + progress.complete, "epochs_planned": epochs,
        "steps": steps, "best_valid_auroc_mean": run.best, "best_epoch": run.best_epoch,
        "last_valid_auroc_mean": auroc_mean, "last_valid_loss": valid_loss, "last_train_loss": progress.loss,
        "stopped": run.stopped,
        "dp": privacy_summary(cfg, trainer.history(), eps, steps, final=bool(run.stopped) or epoch + 1 == epochs,
                              budget_note=run.budget_note,
                              start=_start_summary(cfg, booking, trainer.history(), steps) if dp else None,
                              tests=test_use(booking.ledger, booking.run_id) if dp else None)}
    _write_summary(files.root, summary)
    privacy = f", epsilon {eps:.3f}" if dp else ""
    train_loss = "" if dp else f"train loss {progress.loss:.4f}, "  # private under DP (summary.json keeps it)
    tqdm.write(f"epoch {epoch + 1}/{epochs}: {train_loss}valid loss {valid_loss:.4f}, "
               f"valid AUROC {auroc_mean:.4f}{privacy} ({time.time() - started:.0f} s)")
    return summary


def _report(summary: dict) -> None:
    """The end of training in the job log: the privacy statement and the best validation AUROC."""
    dp_info = summary["dp"]
    if dp_info["enabled"]:
        print(f"DP-SGD: {dp_info['statement']}")
        print(f"In words: {plain_privacy(dp_info)} {EPSILON_MEANING}")
        print(f"noise multiplier {dp_info['noise_multiplier']:.4f}, sample rate {dp_info['sample_rate']:.5f}; "
              f"replace-one adjacency (PLD): epsilon {dp_info['pld_epsilon']['replace_one']:.4f}")
    else:
        print("non-private training (no privacy guarantee)")
    if summary["best_valid_auroc_mean"] is None:
        print("validation AUROC not estimable: no label has both classes in the validation split")
    else:
        print(f"best validation AUROC {summary['best_valid_auroc_mean']:.4f} (epoch {summary['best_epoch']})")


def _train(cfg: Config, exp_dir: Path, resume: bool, allow_budget_increase: bool, ranks: Ranks) -> dict:
    """The stages of a run, top to bottom: data; model, sampler and privacy; resume; budget guard; the
    run's records (booked in the ledger as planned); then per epoch its steps and (rank 0) validation and
    checkpoints."""
    files = Layout(exp_dir)
    ckpt = load_checkpoint(files.last) if resume and files.last.is_file() else None
    if resume and ckpt is None and ranks.main:
        print(f"{files.last} not written yet: starting {exp_dir.name} from the beginning")
    if ckpt is not None and ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{files.last}: checkpoint format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT} "
                         f"(written by another DP-CXR version); start a new experiment")
    cfg = cfg.model_copy(deep=True)  # the run's facts go into cfg.derived
    seed, reference = cfg.experiment.seed, cfg.audit.reference
    # The seed fixes the data and split; a reference run of an audit draws its own initialisation,
    # batches and noise, as an independently trained model would.
    run_seed = seed if reference is None else seed + 1000 * (reference + 1)
    torch.manual_seed(run_seed)
    device = resolve_device(cfg.training.device)
    if cfg.training.precision == "fp16" and device.type != "cuda":
        raise InputError(f"training.precision: fp16 needs CUDA (float16 autocast with a gradient scaler), training "
                         f"runs on {device.type}; use bf16 or fp32")

    data = _training_data(cfg.data, cfg.dp.enabled, cfg.dp.unit, cfg.audit, seed)
    budget = _privacy_plan(cfg, data)
    start, started_from = _start_weights(cfg, data, ranks) if ckpt is None else (None, {})
    trainer = _set_up(cfg, data, ckpt, device, ranks, run_seed, start, budget)
    cfg.derived.update(started_from)
    run = _resume(trainer, ckpt)
    if ckpt is not None and ranks.main:
        print(f"resuming {exp_dir.name} after {run.steps} steps (epoch {run.epoch + 1}, step {ckpt['step_in_epoch']})")
    budget_steps = _budget_steps(cfg.dp, trainer, run, allow_budget_increase, ranks)
    booking = _open_records(cfg, files, data, trainer, ckpt, run, budget_steps, ranks)

    valid_loader = evaluation_loader(data.valid, data.table, cfg.data, cfg.training.physical_batch_size)
    curves = Curves(files.tensorboard, "Training goes on (checkpoints and summary.json are written apart)",
                    purge_step=run.steps + 1 if ckpt else None) if ranks.main else None
    started, summary = time.time(), {}
    for epoch in range(run.epoch, cfg.training.epochs):
        run.epoch = epoch
        _train_epoch(cfg, trainer, run, data, files, booking, device, ranks, run_seed, budget_steps)
        if ranks.main:  # validation, logs and checkpoints are rank 0's
            summary = _validate_and_save(cfg, trainer, run, valid_loader, data.valid, files, booking, curves,
                                         device, started)
        run.progress = None
        if run.stopped:
            if ranks.main:
                print(f"stopped: {run.stopped}; the remaining steps were not taken "
                      f"(resume with --allow-budget-increase to spend more, which summary.json records)")
            break
    if not ranks.main:
        return {}
    curves.close()
    summary = summary or read_json(files.summary)  # a finished run resumed: nothing to do, report what is there
    _report(summary)
    return summary
