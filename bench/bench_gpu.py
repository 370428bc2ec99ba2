"""GPU throughput of DP-SGD against non-private training, and of the data loader against the GPU.

    python bench/bench_gpu.py [--quick] [--budget-s 420] [--out bench/RESULTS.md]   # on a CUDA machine
    python bench/bench_gpu.py --device cpu --quick                                  # check it works here

Cases: ResNet9 and ResNet50 (GroupNorm, Mish, 8 labels) at 224 and 512 px, precision fp32 and bf16
(``training.precision``), methods ``non-private``, ``bookkeeping`` (DP-CXR's default engine, images as
units) and Opacus ``hooks`` as training wires them (``privatize``; one physical batch per logical step,
plain Gaussian noise). ``bookkeeping@R`` runs the engine with ``GHOST_RATIO = R`` (for tuning it:
by default R = 1 and 64 are added for ResNet9 at the largest size). Opacus' hooks under bf16 compute
per-sample norms in bf16; training refuses that combination (config.py), it is timed for comparison.

Per (model, size, precision) group, the physical batch is the largest that every method of the
group fits: starting from ``--start-batch`` (default by model and size), halved on out-of-memory,
trying the hungriest method (hooks) first. Every method of a group then runs at that batch, so the
ratios compare like with like: images/s and peak GPU memory (``torch.cuda.max_memory_allocated``
during the timed steps, model, optimizer and data included), each against the group's non-private
run in the same process. Each case gets warm-up steps and then timed steps until ``--steps`` or
``--case-s`` seconds; the whole run stops starting new cases after ``--budget-s`` (those rows say
"skipped"), keeping time for the loader. The issue's target: at 512 px, DP at >= 0.85x the
non-private images/s and <= 1.3x its memory.

Loader: a training DataLoader (the training path: pinned memory and non-blocking copies on CUDA)
over a memory-mapped preprocessing cache of random images of each size (read from the page cache:
it was just written), with 0 workers and with ``training.loader_workers: auto``'s number, in
images/s delivered on the device, against the fastest training case of that size.

CUDA runs set ``torch.backends.cudnn.benchmark``; ``--channels-last auto`` (the default) uses the
channels-last memory format on CUDA only. ``--device cpu --quick`` runs tiny sizes (32 and 64 px,
batch 4, one timed step per case: a few minutes on 2 cores) to check the script; its memory columns
are empty (no per-case peak on the CPU) and its figures say nothing about a GPU. The report is
markdown on stdout (``--markdown`` is accepted and changes nothing), appended to ``--out`` if given.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import opacus
import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.cache import Cache  # noqa: E402
from data.dataset import CXRDataset  # noqa: E402
from data.images import Preprocessing  # noqa: E402
from models import build_model  # noqa: E402
from privacy import bookkeeping  # noqa: E402
from Train_Valid_DP import MaskedBCEWithLogitsLoss, autocast, build_optimizer, loader_workers, privatize  # noqa: E402

LABELS = 8
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
# (model, size) -> first physical batch tried on CUDA (H100/H200-class memory); halved on out-of-memory
START_BATCH = {("resnet9", 224): 512, ("resnet9", 512): 128, ("resnet50", 224): 256, ("resnet50", 512): 64}
HUNGRY_FIRST = ("hooks", "bookkeeping", "non-private")  # the order in which a batch size is tried


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() \
        or "can't allocate memory" in str(exc).lower()


def largest_batch(fits, start: int) -> int:
    """The largest of start, start/2, ..., 1 for which ``fits(batch)`` does not run out of memory
    (0 if even 1 does not); ``fits`` raises the out-of-memory error, any other error propagates."""
    batch = start
    while batch >= 1:
        try:
            fits(batch)
            return batch
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, see is_oom
            if not is_oom(exc):
                raise
            free_memory()
            batch //= 2
    return 0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Step:
    """One method's model, optimizer and loss on a fixed batch; ``run()`` is one logical step."""

    def __init__(self, model_name: str, method: str, size: int, batch: int, precision: str, channels_last: bool,
                 device: torch.device):
        engine, _, ratio = method.partition("@")
        self.ghost_ratio = int(ratio) if ratio else None
        self.device, self.precision = device, precision
        torch.manual_seed(0)
        self.x = torch.rand(batch, 1, size, size, device=device)
        self.y = (torch.rand(batch, LABELS, device=device) < 0.3).float()
        model = build_model(model_name, LABELS, "mish", size).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        optimizer = build_optimizer("nadam", model.parameters(), 2e-4, 0.0)
        self.criterion = MaskedBCEWithLogitsLoss(torch.ones(LABELS, device=device), reduction="none")
        if engine == "non-private":
            self.backward = lambda per_image: per_image.mean().backward()
        else:
            setup = privatize(model, optimizer, sample_rate=0.01, expected_batch_size=batch, steps=1,
                              accountant="rdp", max_grad_norm=1.5, grad_sample_mode=engine, noise_multiplier=1.0,
                              noise_generator=torch.Generator(device=device).manual_seed(1))
            model, optimizer = setup.model, setup.optimizer
            self.backward = lambda per_image: setup.backward(per_image, None, False)
        self.model, self.optimizer = model, optimizer

    def run(self) -> None:
        saved = bookkeeping.GHOST_RATIO
        if self.ghost_ratio is not None:
            bookkeeping.GHOST_RATIO = self.ghost_ratio
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.precision, self.device):
                logits = self.model(self.x)
            self.backward(self.criterion(logits.float(), self.y))
            self.optimizer.step()
        finally:
            bookkeeping.GHOST_RATIO = saved


@dataclass
class Result:
    model: str
    size: int
    precision: str
    method: str
    batch: int = 0
    images_per_s: float | None = None
    peak_gb: float | None = None
    steps: int = 0
    note: str = ""
    ratios: dict = field(default_factory=dict)


def measure(step: Step, device: torch.device, warmup: int, max_steps: int, cap_s: float) -> tuple[float, float | None, int]:
    """Images/s (median step) over timed steps (at least 2 unless ``max_steps`` is 1, at most ``max_steps``, stopping after ``cap_s``) and the
    peak memory (GB) of those steps on CUDA."""
    for _ in range(warmup):
        step.run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, started = [], time.perf_counter()
    while len(times) < max_steps and (len(times) < min(2, max_steps) or time.perf_counter() - started < cap_s):
        t0 = time.perf_counter()
        step.run()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return len(step.x) / statistics.median(times), peak, len(times)


def loader_rate(size: int, batch: int, workers: int, device: torch.device, images: int) -> float:
    """Images/s a shuffled training DataLoader delivers on ``device`` from a memory-mapped cache."""
    with tempfile.TemporaryDirectory() as tmp:
        array = np.lib.format.open_memmap(Path(tmp) / "images.npy", "w+", np.uint8, (images, size, size))
        array[:] = np.random.default_rng(0).integers(0, 255, array.shape, dtype=np.uint8)
        array.flush()
        del array
        frame = pd.DataFrame({"path": [f"{i}.png" for i in range(images)], "label": 0.0})
        cache = Cache(Path(tmp) / "images.npy", {p: i for i, p in enumerate(frame["path"])}, {}, Path(tmp))
        dataset = CXRDataset(frame, Path(tmp), ["label"], Preprocessing(size), cache)
        cuda = device.type == "cuda"
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=cuda)
        seen, start = 0, time.perf_counter()
        for x, _ in loader:
            x = x.to(device, non_blocking=cuda)
            seen += len(x)
        sync(device)
        return seen / (time.perf_counter() - start)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report(results: list[Result], loader_rows: list[tuple], header: str) -> str:
    lines = [header, "",
             "| model | px | precision | method | batch | images/s | x non-private | peak GB | x non-private | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed, memory = r.ratios.get("speed"), r.ratios.get("memory")
        lines.append(f"| {r.model} | {r.size} | {r.precision} | {r.method} | {r.batch or '-'} | "
                     f"{_cell(r.images_per_s, ',.1f')} | {_cell(speed, '.2f')} | {_cell(r.peak_gb, '.2f')} | "
                     f"{_cell(memory, '.2f')} | {r.note} |")
    if loader_rows:
        lines += ["", "| loader, cache of | workers | batch | images/s delivered | fastest training case | "
                      "loader / training |", "|---|---|---|---|---|---|"]
        for size, workers, batch, rate, consumed in loader_rows:
            ratio = f"{rate / consumed:.1f}" if consumed else "-"
            lines.append(f"| {size} px | {workers} | {batch} | {rate:,.0f} | {_cell(consumed, ',.0f')} | {ratio} |")
    return "\n".join(lines)


def target_note(r: Result, largest: int) -> str:
    """At the largest size, whether a DP method meets the target (>= 0.85x images/s, <= 1.3x memory)."""
    if r.method == "non-private" or r.size != largest or r.ratios.get("speed") is None:
        return r.note
    ok = r.ratios["speed"] >= 0.85 and (r.ratios.get("memory") is None or r.ratios["memory"] <= 1.3)
    return (r.note + "; " if r.note else "") + ("meets target" if ok else "misses target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (GPU); tiny sizes on the CPU")
    parser.add_argument("--models", default="resnet9,resnet50")
    parser.add_argument("--sizes", default=None, help="comma-separated px (default 224,512; --quick on CPU: 32,64)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--methods", default="non-private,bookkeeping,hooks")
    parser.add_argument("--ghost-ratios", default="1,64",
                        help="extra bookkeeping@R cases for ResNet9 at the largest size ('' for none)")
    parser.add_argument("--start-batch", type=int, default=None, help="first physical batch tried (default by case)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case at most (default 10; quick 4)")
    parser.add_argument("--case-s", type=float, default=None, help="stop timing a case after this (default 8; quick 3)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no case after this many seconds")
    parser.add_argument("--loader-images", type=int, default=None, help="images in each loader cache")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--markdown", action="store_true", help="accepted for compatibility: the report is markdown")
    parser.add_argument("--out", type=Path, default=None, help="append the report to this file")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    tiny = args.quick and not cuda
    sizes = [int(s) for s in (args.sizes or ("32,64" if tiny else "224,512")).split(",")]
    models, precisions = args.models.split(","), args.precisions.split(",")
    methods = args.methods.split(",")
    steps = args.steps or (1 if tiny else 4 if args.quick else 10)
    cap = args.case_s or (3.0 if args.quick else 8.0)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    loader_reserve = 45.0 if cuda else 10.0

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    results: list[Result] = []
    largest = max(sizes)
    for size in sorted(sizes, reverse=True):  # the target is at 512 px: measured first
        for model_name in models:
            for precision in precisions:
                group = list(methods)
                if model_name == "resnet9" and size == largest and args.ghost_ratios and "bookkeeping" in group:
                    group += [f"bookkeeping@{r}" for r in args.ghost_ratios.split(",")]
                rows = [Result(model_name, size, precision, m) for m in group]
                results += rows
                if left() < loader_reserve:
                    for r in rows:
                        r.note = "skipped (time budget)"
                    continue
                start = args.start_batch or (START_BATCH.get((model_name, size), 64) if cuda else 4 if tiny else 8)
                order = [m for m in HUNGRY_FIRST if m in group] + [m for m in group if m not in HUNGRY_FIRST]

                def fits(batch: int) -> None:
                    for method in order[:2]:  # the two hungriest decide; the others are checked as they run
                        step = Step(model_name, method, size, batch, precision, channels_last, device)
                        step.run()
                        step.run()
                        del step

                t0 = time.perf_counter()
                try:
                    batch = largest_batch(fits, start) if cuda else start
                except Exception as exc:  # noqa: BLE001 - a failing case must not end the run
                    batch, error = 0, f"error: {type(exc).__name__}: {str(exc)[:80]}"
                else:
                    error = "does not fit at batch 1" if batch == 0 else ""
                free_memory()
                for r in rows:
                    r.batch = batch
                    if error:
                        r.note = error
                        continue
                    if left() < loader_reserve:
                        r.note = "skipped (time budget)"
                        continue
                    try:
                        step = Step(model_name, r.method, size, batch, precision, channels_last, device)
                        r.images_per_s, r.peak_gb, r.steps = measure(step, device, 2 if cuda else 1, steps, cap)
                        del step
                    except Exception as exc:  # noqa: BLE001
                        r.note = ("out of memory at this batch" if is_oom(exc)
                                  else f"error: {type(exc).__name__}: {str(exc)[:80]}")
                    free_memory()
                    if r.method == "hooks" and precision != "fp32":
                        r.note = (r.note + "; " if r.note else "") + "norms in bf16 (refused in training)"
                base = next((r for r in rows if r.method == "non-private" and r.images_per_s), None)
                for r in rows:
                    if base is not None and r.images_per_s:
                        r.ratios["speed"] = r.images_per_s / base.images_per_s
                        if r.peak_gb is not None and base.peak_gb:
                            r.ratios["memory"] = r.peak_gb / base.peak_gb
                    r.note = target_note(r, largest) if cuda else r.note  # CPU figures test nothing
                print(f"{model_name} {size} px {precision}: batch {batch}, "
                      + ", ".join(f"{r.method} {_cell(r.images_per_s, '.1f')} img/s" for r in rows)
                      + f" ({time.perf_counter() - t0:.0f} s, {time.perf_counter() - started:.0f} s so far)",
                      file=sys.stderr, flush=True)

    loader_rows = []
    images = args.loader_images or (64 if tiny else 2048)
    auto_workers = loader_workers("auto", 0, device)
    for size in sorted(sizes, reverse=True):
        consumed = max((r.images_per_s for r in results if r.size == size and r.images_per_s), default=None)
        batch = max((r.batch for r in results if r.size == size and r.model == "resnet9"), default=0) or 32
        for workers in sorted({0, auto_workers}):
            try:
                rate = loader_rate(size, min(batch, images), workers, device, images)
            except Exception as exc:  # noqa: BLE001
                print(f"loader {size} px, {workers} workers: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            loader_rows.append((size, workers, min(batch, images), rate, consumed))

    if cuda:
        props = torch.cuda.get_device_properties(0)
        device_text = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                       f"cuDNN {torch.backends.cudnn.version()}")
    else:
        device_text = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    header = (f"## GPU benchmark: DP-SGD vs non-private, {device_text}\n\n"
              f"{datetime.date.today()}, Python {platform.python_version()}, torch {torch.__version__}, "
              f"opacus {opacus.__version__}, channels-last {'on' if channels_last else 'off'}, "
              f"GHOST_RATIO {bookkeeping.GHOST_RATIO}; `{' '.join(['python bench/bench_gpu.py', *sys.argv[1:]])}`; "
              f"{time.perf_counter() - started:.0f} s. One logical step = one physical batch; ratios against "
              f"non-private at the same model, size, precision and batch. Target at {largest} px: DP >= 0.85x "
              f"images/s, <= 1.3x memory.")
    text = report(results, loader_rows, header)
    print(text)
    if args.out is not None:
        with open(args.out, "a") as handle:
            handle.write("\n" + text + "\n")
        print(f"appended to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
