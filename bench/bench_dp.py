"""DP-SGD step cost against non-private training, for every per-sample method, in one process.

    python bench/bench_dp.py [--large] [--repeats 5] [--out bench/RESULTS.md]

ResNet9 (GroupNorm, Mish), 8 labels, one logical step = one physical batch (224 px, batch 32; with
--large 512 px, batch 8). Methods: DP-CXR's ``bookkeeping`` and Opacus' ``hooks``, ``ew``,
``functorch`` as training wires them (``privatize``; images as privacy units, plain noise), and
Opacus' ``ghost`` clipping. ``bookkeeping-patients`` clips patients of 1, 2, 3, 1, 2, 3... images
(ghost norms over the pairs of a patient's images) and ``bookkeeping-secure`` adds secure noise (a
sum of Gaussian draws); ``bookkeeping-patients-secure`` is what a default DP-CXR run does. The noise
is drawn for all parameters at once (``privacy.noise``); a method with ``-opacus-noise`` draws it as
Opacus does, one call per parameter (four per parameter in secure mode), for comparison.
``--augmult K`` (augmentation multiplicity, ``dp.augmult``): the physical batch holds K views of each
of batch/K images, a patient's unit being all views of its images, each view's loss weighted 1/K; the
non-private step runs the same views, so the ratio is the price of DP at K views.
``--trainable norms_and_head`` trains what the default two-stage recipe fine-tunes (GroupNorm scales and
shifts and the last layer, ``training.trainable``) in every method; the default ``all`` trains every weight.
A method ending in ``+compile`` (``non-private+compile``, ``bookkeeping+compile``) runs its forward
pass through ``torch.compile`` (``training.compile``); its compile time, spent in the warm-up, is
printed. One compiled method per run: Dynamo's cache is per code object, so a second compiled ResNet9
in the same process could run the first one's graph. Each repetition runs one step of every method
in turn (interleaved, so machine noise hits all alike) after one warm-up step each; the table gives the median step time,
its ratio to the non-private step, peak memory and its ratio. Peak memory is measured in a fresh
child process per method (CPU: peak resident set of that process; CUDA: peak allocated beyond
model and data), since a process's peak never goes down. The last line is what a training DataLoader
reads per second from a preprocessing cache of that size. The table is appended to --out with the
machine, versions and command.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import opacus
import pandas as pd
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.cache import Cache  # noqa: E402
from data.dataset import CXRDataset  # noqa: E402
from data.images import Preprocessing  # noqa: E402
from models import build_model, set_trainable  # noqa: E402
from Train_Valid_DP import MaskedBCEWithLogitsLoss, privatize  # noqa: E402

LABELS = 8
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' ghost: the image needs no grad
METHODS = ("non-private", "bookkeeping", "bookkeeping-patients", "bookkeeping-secure", "bookkeeping-patients-secure",
           "hooks", "ew", "functorch", "ghost")


class Step:
    """One method's model, optimizer and loss on a fixed batch; ``run()`` takes one optimizer step."""

    def __init__(self, method: str, size: int, batch: int, device: torch.device, augmult: int = 1,
                 trainable: str = "all"):
        method, _, compiled = method.partition("+")
        torch.manual_seed(0)
        self.x = torch.rand(batch, 1, size, size, device=device)
        self.y = (torch.rand(batch, LABELS, device=device) < 0.3).float()
        model = build_model("resnet9", LABELS, "mish", size).to(device)
        set_trainable(model, trainable)
        optimizer = torch.optim.NAdam(model.parameters(), lr=2e-4)
        criterion = MaskedBCEWithLogitsLoss(torch.ones(LABELS, device=device), reduction="none")
        self.backward = lambda per_image: per_image.mean().backward()
        if method == "ghost":  # Opacus' own loss wrapper does the two backward passes
            loader = DataLoader(TensorDataset(self.x.cpu(), self.y.cpu()), batch_size=batch)
            criterion.reduction = "mean"
            model, optimizer, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.5,
                poisson_sampling=False, grad_sample_mode=method, criterion=criterion)
            self.backward = lambda loss: loss.backward()
        elif method != "non-private":
            engine, *variant = method.split("-")
            setup = privatize(model, optimizer, sample_rate=0.01, expected_batch_size=batch, steps=1, accountant="rdp",
                              max_grad_norm=1.5, grad_sample_mode=engine, noise_multiplier=1.0,
                              secure_mode="secure" in variant)
            if "opacus" in variant:  # Opacus' own add_noise: the class below privacy.noise.OneDrawNoise
                setup.optimizer.__class__ = type(setup.optimizer).__mro__[2]
            images = batch // augmult  # each seen in augmult views, consecutive in the batch
            sizes = [1 + i % 3 for i in range(images)]  # patients of 1, 2, 3 images, cut at the batch
            patient = torch.arange(images).repeat_interleave(torch.tensor(sizes))[:images]
            units = (patient if "patients" in variant else torch.arange(images)).repeat_interleave(augmult)
            units = None if units.equal(torch.arange(batch)) else units
            model, optimizer = setup.model, setup.optimizer
            self.backward = lambda per_view: setup.backward(per_view / augmult, units, False)
        self.model = torch.compile(model) if compiled else model
        self.optimizer, self.criterion = optimizer, criterion

    def run(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(self.criterion(self.model(self.x), self.y))
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(method: str, size: int, batch: int, device_name: str, augmult: int, trainable: str, queue) -> None:
    """Child process: peak memory (bytes) of two steps of ``method``: CUDA memory allocated beyond the
    model and data, or on CPU the peak resident set of the whole process."""
    device = torch.device(device_name)
    step = Step(method, size, batch, device, augmult, trainable)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step.run()
        step.run()
        _sync(device)
        queue.put(torch.cuda.max_memory_allocated() - start)
    else:  # the whole process's peak resident set, as a user sees it
        step.run()
        step.run()
        queue.put(_peak_rss())


def _peak_rss() -> int:
    """VmHWM (bytes): unlike ru_maxrss it starts afresh at exec, so the forking parent's size is not in it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(method: str, size: int, batch: int, device: torch.device, augmult: int, trainable: str) -> float:
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=peak_memory, args=(method, size, batch, str(device), augmult, trainable, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def loader_rate(size: int, batch: int, images: int = 512) -> float:
    """Images per second a shuffled training DataLoader reads from a preprocessing cache of this size."""
    with tempfile.TemporaryDirectory() as tmp:
        array = np.lib.format.open_memmap(Path(tmp) / "images.npy", "w+", np.uint8, (images, size, size))
        array[:] = np.random.default_rng(0).integers(0, 255, array.shape, dtype=np.uint8)
        array.flush()
        frame = pd.DataFrame({"path": [f"{i}.png" for i in range(images)], "label": 0.0})
        cache = Cache(Path(tmp) / "images.npy", {p: i for i, p in enumerate(frame["path"])}, {}, Path(tmp))
        dataset = CXRDataset(frame, Path(tmp), ["label"], Preprocessing(size), cache)
        start = time.perf_counter()
        seen = sum(len(x) for x, _ in DataLoader(dataset, batch_size=batch, shuffle=True))
        return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="512 px, physical batch 8 instead of 224 px, 32")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--augmult", type=int, default=1, help="views per image in the batch (dp.augmult)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; at most one ending in +compile")
    parser.add_argument("--trainable", default="all", choices=["all", "norms_and_head", "head"],
                        help="training.trainable (norms_and_head: the default two-stage recipe's fine-tuning)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args()
    size = args.size or (512 if args.large else 224)
    batch = args.batch or (8 if args.large else 32)
    methods = args.methods.split(",")
    if sum(m.endswith("+compile") for m in methods) > 1:
        parser.error("--methods: one +compile method per run (each needs a process of its own)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if batch % args.augmult:
        parser.error(f"--batch {batch} must hold whole images of --augmult {args.augmult} views")
    steps = {m: Step(m, size, batch, device, args.augmult, args.trainable) for m in methods}
    for method, step in steps.items():
        start = time.perf_counter()
        step.run()  # warm-up (and compilation)
        if "compile" in method:
            print(f"{method}: first step (compiling) {time.perf_counter() - start:.1f} s", flush=True)
    times = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step.run()
            _sync(device)
            times[method].append(time.perf_counter() - start)
    del steps
    memory = {m: measure_memory(m, size, batch, device, args.augmult, args.trainable) for m in methods}
    rate = loader_rate(size, batch)

    base_time, base_memory = statistics.median(times[methods[0]]), memory[methods[0]]
    lines = [f"| method | step s (median of {args.repeats}) | x {methods[0]} | peak memory GB | x {methods[0]} |",
             "|---|---|---|---|---|"]
    for method in methods:
        median = statistics.median(times[method])
        lines.append(f"| {method} | {median:.3f} | {median / base_time:.2f} | {memory[method] / 1e9:.2f} | "
                     f"{memory[method] / base_memory:.2f} |")
    lines.append(f"\nData loader from a {size} px preprocessing cache: {rate:,.0f} images/s "
                 f"(batch {batch}); the non-private step consumes {batch / base_time:,.1f} images/s.")
    table = "\n".join(lines)
    print(table)
    device_text = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    views = f" ({batch // args.augmult} images x {args.augmult} views)" if args.augmult > 1 else ""
    views += f", trainable {args.trainable}" if args.trainable != "all" else ""
    header = (f"\n## ResNet9, {size} px, physical batch {batch}{views}, {device_text}\n\n"
              f"{datetime.date.today()}, {platform.processor() or platform.machine()}, Python "
              f"{platform.python_version()}, torch {torch.__version__}, opacus {opacus.__version__}; "
              f"`{' '.join(['python bench/bench_dp.py', *sys.argv[1:]])}`\n\n")
    with open(args.out, "a") as handle:
        handle.write(header + table + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
