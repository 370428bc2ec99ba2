"""Training and validation, non-private or with DP-SGD (Opacus).

DP-SGD, per logical step: draw a Poisson batch (each training image independently with probability
q = sample rate), clip each image's gradient to L2 norm C (``dp.max_grad_norm``), sum, add Gaussian
noise N(0, sigma^2 C^2) and divide by the expected batch size qN. The accountant (RDP or PRV)
composes the steps into (epsilon, delta). Opacus does all of it; ``BatchMemoryManager`` splits each
logical batch into physical batches that fit in memory, and the optimizer steps only at the end of
a logical batch. Non-private training uses the same logical batch by gradient accumulation.

Everything needed to continue exactly is in ``checkpoints/last.pt``: weights, optimizer, the
accountant's history, the epoch, the best metric and every RNG state (global, sampler, noise), so a
resumed run reports the same epsilon and, on CPU, the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from artifacts import atomic_write_text, json_text, load_checkpoint, save_checkpoint
from config import Config, InputError, config_yaml, read_yaml
from data.dataset import SPLITS, CXRDataset, evaluation_loader, load_table, positive_weights, preprocessing
from models import build_model, load_pretrained, resolve_device
from Prediction_DP import auroc_per_label, mean_auroc, predict_scores

CHECKPOINT_FORMAT = 1
# Settings that may change on --resume; anything else would change the data, the model or the
# privacy accounting of the run being continued.
RESUMABLE_KEYS = {"training.epochs", "training.device", "data.num_workers", "output.target_dir", "experiment.name",
                  "evaluation.bootstrap", "evaluation.seed", "evaluation.age_bins", "evaluation.min_subgroup_size"}


def default_delta(n_train: int) -> float:
    """The largest power of ten strictly below 1/N."""
    return 10.0 ** -(math.floor(math.log10(n_train)) + 1)


def check_delta(delta: float, n_train: int) -> None:
    if delta >= 1.0 / n_train:
        raise InputError(f"dp.delta = {delta:g} must be below 1/N_train = 1/{n_train} = {1.0 / n_train:.3g}: "
                         f"a larger delta allows releasing a whole training record; try {default_delta(n_train):g}")


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE with logits that ignores unlabelled entries (NaN targets).

    loss = sum_{i,l} m_il * bce(x_il, y_il) / (B * L), with m_il = 0 where y_il is NaN: exactly
    ``nn.BCEWithLogitsLoss(reduction='mean')`` when nothing is masked, and a mean over the batch of
    per-image terms, which is what Opacus' ``loss_reduction='mean'`` assumes for per-sample gradients.
    """

    def __init__(self, pos_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labelled = ~torch.isnan(target)
        loss = F.binary_cross_entropy_with_logits(logits, torch.where(labelled, target, 0.0),
                                                  pos_weight=self.pos_weight, reduction="none")
        return (loss * labelled).sum() / max(target.numel(), 1)


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


@dataclass
class DPSetup:
    """Result of :func:`privatize`: the wrapped objects and the resolved accounting parameters."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float


def privatize(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, accountant: str,
              max_grad_norm: float, grad_sample_mode: str, noise_multiplier: float | None = None,
              target_epsilon: float | None = None, delta: float | None = None, epochs: int | None = None,
              noise_generator: torch.Generator | None = None) -> DPSetup:
    """Wrap for DP-SGD with Poisson sampling; sigma is solved from the target epsilon if not given.

    sigma comes from Opacus' ``get_noise_multiplier`` (what ``make_private_with_epsilon`` calls), so
    it can be recorded and reused on resume instead of being solved again for the remaining epochs.
    """
    engine = PrivacyEngine(accountant=accountant)
    sample_rate = 1.0 / len(loader)
    if noise_multiplier is None:
        with warnings.catch_warnings():  # the bisection probes tiny sigmas whose RDP order is out of range
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            noise_multiplier = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                                    sample_rate=sample_rate, epochs=epochs,
                                                    accountant=accountant)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator)
    return DPSetup(model, optimizer, loader, engine, float(noise_multiplier), sample_rate)


def train_one_epoch(model, criterion, optimizer, loader, device, physical_batch_size: int, dp: bool,
                    desc: str, epsilon_fn=None) -> tuple[float, int]:
    """One pass over ``loader``; returns (mean training loss, logical steps taken)."""
    model.train()
    loss_sum, seen, steps = 0.0, 0, 0
    bar = tqdm(total=len(loader), desc=desc, leave=False, dynamic_ncols=True)

    def physical_batches():
        """(x, y, share of the logical batch, last chunk of the logical batch?)"""
        if dp:  # Opacus splits the Poisson batch; its optimizer skips all but the last physical step
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical_batch_size,
                                    optimizer=optimizer) as physical:
                for x, y in physical:
                    yield x, y, 1.0, None
        else:
            for x, y in loader:
                chunks = list(zip(x.split(physical_batch_size), y.split(physical_batch_size)))
                for i, (xc, yc) in enumerate(chunks):
                    yield xc, yc, len(xc) / len(x), i == len(chunks) - 1

    for x, y, share, last in physical_batches():
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x), y)
        with warnings.catch_warnings():
            # The input image needs no gradient; Opacus' full backward hooks warn about it although
            # the per-sample gradients of all parameters are complete.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            (loss * share).backward()
        if len(x):  # an empty Poisson batch still steps (noise only) but has no loss to report
            loss_sum += loss.item() * len(x)
            seen += len(x)
        if dp or last:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # DPOptimizer marks the physical steps that BatchMemoryManager told it to skip.
        if (dp and not optimizer._is_last_step_skipped) or last:
            steps += 1
            bar.update(1)
            postfix = {"loss": f"{loss_sum / max(seen, 1):.4f}"}
            if epsilon_fn is not None and (steps % 10 == 0 or steps == len(loader)):
                postfix["eps"] = f"{epsilon_fn():.3f}"
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    return loss_sum / max(seen, 1), steps


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
    old_flat, new_flat = _flatten(saved.model_dump()), _flatten(new.model_dump())
    changed = [key for key in new_flat
               if not key.startswith("derived.") and key not in RESUMABLE_KEYS
               and not (key == "dp.delta" and new_flat[key] is None)
               and old_flat.get(key) != new_flat[key]]
    if changed:
        details = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat[k]!r}" for k in changed)
        raise InputError(f"--resume cannot change {details}; only {sorted(RESUMABLE_KEYS)} may change. "
                         f"Start a new experiment (another --name) instead")


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


def _write_summary(exp_dir: Path, summary: dict) -> None:
    atomic_write_text(exp_dir / "summary.json", json_text(summary))


def train(cfg: Config, exp_dir: Path, resume: bool = False) -> dict:
    """Train ``cfg`` into ``exp_dir`` (new, or continued from ``checkpoints/last.pt``); return the summary."""
    exp_dir = Path(exp_dir)
    last_path, best_path = exp_dir / "checkpoints" / "last.pt", exp_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(last_path) if resume else None
    if ckpt is not None and ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{last_path}: checkpoint format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    seed, dp, labels = cfg.experiment.seed, cfg.dp.enabled, list(cfg.data.labels)
    torch.manual_seed(seed)
    device = resolve_device(cfg.training.device)

    table = load_table(cfg.data, seed)
    frames = {split: table.split(split) for split in SPLITS}
    for split, frame in frames.items():
        if len(frame) == 0:
            raise InputError(f"{table.root}: the {split} split of site '{cfg.data.site}' is empty")
    train_frame, valid_frame = frames["train"], frames["valid"]
    n_train = len(train_frame)

    model = build_model(cfg.model.name, len(labels), cfg.model.activation, cfg.data.image_size)
    if cfg.model.pretrained_checkpoint and ckpt is None:
        fresh = load_pretrained(model, cfg.model.pretrained_checkpoint)
        print(f"initialised from {cfg.model.pretrained_checkpoint}; newly initialised: {fresh or 'none'}")
    if dp:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise RuntimeError(f"model {cfg.model.name} is not compatible with Opacus: {errors}")
    model.to(device)
    pos_weight = positive_weights(train_frame, labels)
    criterion = MaskedBCEWithLogitsLoss(pos_weight).to(device)
    optimizer = build_optimizer(cfg.training.optimizer, model.parameters(), cfg.training.lr,
                                cfg.training.weight_decay)

    sampler_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 2) if dp else None
    train_set = CXRDataset(train_frame, table.root, labels, preprocessing(cfg.data), table.cache,
                           cfg.data.augment_flip)
    loader = DataLoader(train_set, batch_size=cfg.training.logical_batch_size, shuffle=not dp,
                        generator=sampler_gen, num_workers=cfg.data.num_workers)
    valid_loader = evaluation_loader(valid_frame, table, cfg.data, cfg.training.physical_batch_size)

    cfg = cfg.model_copy(deep=True)
    cfg.derived = {"n_train": n_train, "n_valid": len(valid_frame), "n_test": len(frames["test"]),
                   "dataset_folder": str(table.root),
                   "preprocessing_cache": str(table.cache.images.parent) if table.cache else None,
                   "pos_weight": dict(zip(labels, map(float, pos_weight))), "steps_per_epoch": len(loader)}
    engine, delta = None, None
    if dp:
        delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(n_train)
        check_delta(delta, n_train)
        cfg.dp.delta = delta
        setup = privatize(model, optimizer, loader, accountant=cfg.dp.accountant,
                          max_grad_norm=cfg.dp.max_grad_norm, grad_sample_mode=cfg.dp.grad_sample_mode,
                          noise_multiplier=ckpt["noise_multiplier"] if ckpt else cfg.dp.noise_multiplier,
                          target_epsilon=cfg.dp.epsilon, delta=delta, epochs=cfg.training.epochs,
                          noise_generator=noise_gen)
        model, optimizer, loader, engine = setup.model, setup.optimizer, setup.loader, setup.engine
        cfg.derived.update(noise_multiplier=setup.noise_multiplier, sample_rate=setup.sample_rate,
                           expected_logical_batch=setup.sample_rate * n_train)
    core = model._module if dp else model  # the plain nn.Module, for evaluation and state dicts
    if ckpt is not None:
        before = read_yaml(exp_dir / "config.yaml").get("derived", {}).get("n_train")
        if before is not None and before != n_train:
            raise InputError(f"--resume: the training split now has {n_train} images, the run started with {before} "
                             f"(data or preprocessing cache changed); start a new experiment")
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_dir / "config.yaml", config_yaml(cfg))

    start_epoch, steps, best, best_epoch = 0, 0, -math.inf, None
    if ckpt is not None:
        core.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if dp:
            engine.accountant.history = [tuple(entry) for entry in ckpt["accountant_history"]]
        _set_rng_state(ckpt["rng"], sampler_gen, noise_gen)
        start_epoch, steps, best, best_epoch = ckpt["epoch"], ckpt["steps"], ckpt["best_valid_auroc_mean"], ckpt["best_epoch"]
        print(f"resuming {exp_dir.name} after epoch {start_epoch} ({steps} steps)")

    def epsilon() -> float:
        return engine.get_epsilon(delta)

    summary = {}
    writer = SummaryWriter(str(exp_dir / "tensorboard"))
    valid_truth = valid_frame[labels].to_numpy()
    epochs, started = cfg.training.epochs, time.time()
    for epoch in range(start_epoch, epochs):
        train_loss, n_steps = train_one_epoch(
            model, criterion, optimizer, loader, device, cfg.training.physical_batch_size, dp,
            desc=f"epoch {epoch + 1}/{epochs}", epsilon_fn=epsilon if dp else None)
        steps += n_steps
        scores, valid_loss = predict_scores(core, valid_loader, device, criterion, desc="valid")
        per_label = auroc_per_label(valid_truth, scores, labels)
        auroc_mean = mean_auroc(per_label)
        eps = epsilon() if dp else None

        writer.add_scalar("train/loss", train_loss, steps)
        writer.add_scalar("valid/loss", valid_loss, steps)
        writer.add_scalar("valid/auroc_mean", auroc_mean, steps)
        for label, value in per_label.items():
            writer.add_scalar(f"valid/auroc/{label}", value, steps)
        if dp:
            writer.add_scalar("privacy/epsilon", eps, steps)
        writer.flush()

        # NaN (no label with both classes) never wins, but the first epoch always gives a best.pt
        if auroc_mean > best or best_epoch is None:
            best, best_epoch = (auroc_mean if auroc_mean > best else best), epoch + 1
            save_checkpoint({"format": CHECKPOINT_FORMAT, "model": core.state_dict(), "labels": labels,
                             "model_name": cfg.model.name, "epoch": epoch + 1,
                             "valid_auroc_mean": auroc_mean}, best_path)
        save_checkpoint({
            "format": CHECKPOINT_FORMAT, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
            "labels": labels, "model_name": cfg.model.name, "epoch": epoch + 1, "steps": steps,
            "best_valid_auroc_mean": best, "best_epoch": best_epoch,
            "noise_multiplier": cfg.derived.get("noise_multiplier"),
            "accountant_history": [list(entry) for entry in engine.accountant.history] if dp else [],
            "rng": _rng_state(sampler_gen, noise_gen)}, last_path)
        summary = {
            "experiment": exp_dir.name, "epochs_completed": epoch + 1, "epochs_planned": epochs,
            "steps": steps, "best_valid_auroc_mean": best, "best_epoch": best_epoch,
            "last_valid_auroc_mean": auroc_mean, "last_valid_loss": valid_loss, "last_train_loss": train_loss,
            "dp": {"enabled": dp, "epsilon_spent": eps, "target_epsilon": cfg.dp.epsilon if dp else None,
                   "delta": delta, "noise_multiplier": cfg.derived.get("noise_multiplier"),
                   "max_grad_norm": cfg.dp.max_grad_norm if dp else None,
                   "sample_rate": cfg.derived.get("sample_rate"),
                   "accountant": cfg.dp.accountant if dp else None}}
        _write_summary(exp_dir, summary)
        privacy = f", epsilon {eps:.3f}" if dp else ""
        tqdm.write(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, valid loss {valid_loss:.4f}, "
                   f"valid AUROC {auroc_mean:.4f}{privacy} ({time.time() - started:.0f} s)")
    writer.close()
    if not summary:  # resumed a finished run: nothing to do, report what is there
        summary = json.loads((exp_dir / "summary.json").read_text())
    dp_info = summary["dp"]
    if dp:
        print(f"DP-SGD: epsilon spent {dp_info['epsilon_spent']:.4f} at delta {dp_info['delta']:g} "
              f"(noise multiplier {dp_info['noise_multiplier']:.4f}, sample rate {dp_info['sample_rate']:.5f})")
    else:
        print("non-private training (no privacy guarantee)")
    if summary["best_valid_auroc_mean"] is None:
        print("validation AUROC not estimable: no label has both classes in the validation split")
    else:
        print(f"best validation AUROC {summary['best_valid_auroc_mean']:.4f} (epoch {summary['best_epoch']})")
    return summary
