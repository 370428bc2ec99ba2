"""Data loading speed: the preprocessing cache against decoding, and against what training consumes.

    python bench/bench_loader.py [--images 192] [--source-size 2048x2496] [--workers 2]

Writes --images synthetic radiographs as full-size JPEGs (quality 95, the size of a MIMIC-CXR-JPG
or CheXpert file) into a temporary in-house dataset, then, in this one process:

1. prepares a 512 px cache and a 224 px cache with ``data.cache.prepare`` (images/s);
2. iterates a training DataLoader (batch 32, shuffled, no worker processes) over the 224 px cache
   and, as the baseline, over the JPEGs decoded on the fly (images/s);
3. times ResNet9 training steps at 224 px, physical batch 32, non-private and DP-SGD (Opacus
   hooks): the images per second training consumes.

It prints each rate and the ratio of the cache loader to the fastest training step; the cache is
fast enough when that ratio is at least 5. The cache is read from the page cache here (it was just
written); a cache larger than RAM reads from disk at random offsets, one S x S block per image.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import validate  # noqa: E402
from data import synthetic  # noqa: E402
from data.cache import open_cache, prepare  # noqa: E402
from data.dataset import CXRDataset, cache_location, load_table, preprocessing  # noqa: E402
from models import build_model  # noqa: E402
from Train_Valid_DP import MaskedBCEWithLogitsLoss, build_optimizer, privatize  # noqa: E402

BATCH = 32


def write_sources(root: Path, n: int, height: int, width: int) -> None:
    """Full-size JPEGs drawn by the synthetic generator (rendered at 512 px, scaled up)."""
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True)
    rows = []
    for i in range(n):
        case = synthetic.sample_patient_cases(rng, "private", i)[0]
        image = cv2.resize(synthetic.render(case, 512), (width, height), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "jpg" / f"{i:05d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"path": f"jpg/{i:05d}.jpg", "patient_id": f"p{i}", "cardiomegaly": int(case.grades["cardiomegaly"] >= 3)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def loader_rate(dataset, epochs: int = 2) -> float:
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def step_rate(dataset, dp: bool, repeats: int) -> float:
    """Images per second of one optimizer step on a batch of 32 at the dataset's size."""
    torch.manual_seed(0)
    model = build_model("resnet9", 1, "mish", dataset.prep.size)
    optimizer = build_optimizer("nadam", model.parameters(), 2e-4, 0.0)
    criterion = MaskedBCEWithLogitsLoss(torch.ones(1))
    if dp:
        setup = privatize(model, optimizer, sample_rate=0.01, expected_batch_size=BATCH, steps=1, accountant="rdp",
                          max_grad_norm=1.5, grad_sample_mode="hooks", noise_multiplier=1.0)
        model, optimizer = setup.model, setup.optimizer
    x = torch.stack([dataset[i][0] for i in range(BATCH)])
    y = torch.stack([dataset[i][1] for i in range(BATCH)])
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--source-size", default="2048x2496", help="HEIGHTxWIDTH of the source JPEGs")
    parser.add_argument("--workers", type=int, default=2, help="processes preparing the cache")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per mode")
    args = parser.parse_args()
    height, width = map(int, args.source_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root, started = Path(tmp) / "site", time.perf_counter()
        write_sources(root, args.images, height, width)
        mb = sum(p.stat().st_size for p in (root / "jpg").iterdir()) / args.images / 1e6
        print(f"{args.images} source JPEGs {height}x{width} ({mb:.2f} MB each) written in "
              f"{time.perf_counter() - started:.0f} s; torch threads {torch.get_num_threads()}")
        rows = []
        datasets = {}
        for size in (512, 224):
            data = validate({"data": {"dataset": "csv", "root": str(root), "image_size": size,
                                      "labels": ["cardiomegaly"], "csv": {"sex": None, "age": None, "split": None},
                                      "cache": {"dir": str(Path(tmp) / "cache")}}}).data
            table = load_table(data, seed=0, use_cache=False)
            paths = table.frame["path"].tolist()
            start = time.perf_counter()
            prepare(cache_location(table, data), "csv", root, paths, preprocessing(data), args.workers, progress=False)
            rows.append((f"prepare {size} px cache ({args.workers} processes)",
                         len(paths) / (time.perf_counter() - start)))
            cached = CXRDataset(table.frame, root, data.labels, preprocessing(data),
                                open_cache(cache_location(table, data)))
            decoded = CXRDataset(table.frame, root, data.labels, preprocessing(data))
            datasets[size] = (cached, decoded)
        cached, decoded = datasets[224]
        rows.append(("training loader from 224 px cache", loader_rate(cached)))
        rows.append(("training loader decoding JPEGs (no cache), 224 px", loader_rate(decoded, epochs=1)))
        rows.append(("ResNet9 non-private step, 224 px, batch 32", step_rate(cached, dp=False, repeats=args.steps)))
        rows.append(("ResNet9 DP-SGD step (Opacus hooks), 224 px, batch 32", step_rate(cached, dp=True,
                                                                                      repeats=args.steps)))
    width_ = max(len(name) for name, _ in rows)
    print(f"\n{'what':<{width_}}  images/s")
    for name, rate in rows:
        print(f"{name:<{width_}}  {rate:9.1f}")
    rates = dict(rows)
    consume = max(rates["ResNet9 non-private step, 224 px, batch 32"],
                  rates["ResNet9 DP-SGD step (Opacus hooks), 224 px, batch 32"])
    ratio = rates["training loader from 224 px cache"] / consume
    print(f"\ncache loader / fastest training step: {ratio:.0f}x (target >= 5x); "
          f"cache loader / JPEG decoding: {rates['training loader from 224 px cache'] / rates['training loader decoding JPEGs (no cache), 224 px']:.0f}x")


if __name__ == "__main__":
    main()
