"""Privacy units (patients, or images), their sampling per logical step, and physical chunks.

Patient-level DP-SGD (user-level DP; McMahan, Ramage, Talwar & Zhang, ICLR 2018): each logical step
samples every one of the N training units independently with probability q = B / N (Poisson
sampling, B = ``training.logical_batch_size``, the expected number of units per step). A sampled
unit contributes all of its training images; the clipping unit is its summed gradient
g_u = sum_{i in u} grad l_i, clipped to norm C; Gaussian noise N(0, sigma^2 C^2) is added once per
step and the sum divided by B. Adding or removing one patient changes the clipped sum by at most C,
so the ordinary subsampled-Gaussian accountant with (N, q, steps) counted in units gives the
patient's epsilon. ``dp.unit: image`` makes every image its own unit (image-level DP-SGD).

A logical batch is split into physical chunks of at most ``physical`` images that never split a
unit, except a unit with more images than fit in one chunk: it gets chunks of its own, and its
gradient is carried from one to the next until its last chunk clips it (``BookKeeping``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler


def unit_rows(patient_ids: pd.Series, unit: str) -> list[np.ndarray]:
    """Row positions of every privacy unit: the rows of each patient (in order of first appearance),
    or one row per image."""
    if unit == "image":
        return [np.array([i]) for i in range(len(patient_ids))]
    codes, _ = pd.factorize(patient_ids.astype(str))
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes))[:-1])


def with_views(units: list[np.ndarray], views: int) -> list[np.ndarray]:
    """Each unit's rows as items of a dataset that lists every image ``views`` times in a row
    (``CXRDataset(views=K)``: row r is items r*K ... r*K + K-1): augmentation multiplicity. A unit
    keeps all the views of all its images, so it is still clipped as one."""
    if views == 1:
        return units
    offsets = np.arange(views)
    return [(rows[:, None] * views + offsets).ravel() for rows in units]


def sampling_plan(n_units: int, batch_size: int, poisson: bool) -> tuple[float, int]:
    """(sample rate q = B/N, steps per epoch) of :class:`UnitSampler`, known before it is built."""
    steps = max(1, round(n_units / batch_size)) if poisson else math.ceil(n_units / batch_size)
    return batch_size / n_units, steps


class UnitSampler:
    """The logical batches of an epoch, as lists of unit indices, drawn from ``generator``.

    Poisson (DP-SGD): ``steps_per_epoch`` = round(N/B) steps, each unit in each with probability
    q = B/N, drawn by Opacus' ``UniformWithReplacementSampler``. Otherwise (non-private): a shuffle
    cut into ceil(N/B) batches of B.
    """

    def __init__(self, n_units: int, batch_size: int, generator: torch.Generator, poisson: bool):
        self.n, self.batch_size, self.generator, self.poisson = n_units, batch_size, generator, poisson
        self.sample_rate, self.steps_per_epoch = sampling_plan(n_units, batch_size, poisson)

    def draw_epoch(self) -> list[list[int]]:
        """All logical batches of one epoch, drawn up front, so that an epoch is a pure function of
        the generator's state at its start (a resumed run redraws it and skips the steps taken)."""
        if self.poisson:
            return list(UniformWithReplacementSampler(num_samples=self.n, sample_rate=self.sample_rate,
                                                      generator=self.generator, steps=self.steps_per_epoch))
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]


@dataclass(frozen=True)
class Chunk:
    """Images ``start:stop`` of a logical batch (its units' images concatenated in order).

    ``units`` gives, per image, the index of its unit within the chunk (0, 1, ...); ``continues``
    marks a piece of one unit whose remaining images follow in the next chunk(s).
    """

    start: int
    stop: int
    units: tuple[int, ...]
    continues: bool = False


def plan_chunks(sizes: list[int], physical: int) -> list[Chunk]:
    """Pack units of the given image counts, in order, into chunks of at most ``physical`` images.

    A unit joins the open chunk if it fits, else starts the next one; a unit larger than
    ``physical`` is cut into chunks of its own. An empty batch gives one empty chunk (the step
    still adds noise).
    """
    chunks: list[Chunk] = []
    start, units = 0, []  # the open chunk

    def close(stop: int) -> None:
        nonlocal start, units
        if units:
            chunks.append(Chunk(start, stop, tuple(units)))
        start, units = stop, []

    position = 0
    for size in sizes:
        if size > physical:
            close(position)
            for piece in range(position, position + size, physical):
                stop = min(piece + physical, position + size)
                chunks.append(Chunk(piece, stop, (0,) * (stop - piece), continues=stop < position + size))
            start = position + size
        else:
            if len(units) + size > physical:
                close(position)
            unit = units[-1] + 1 if units else 0
            units.extend([unit] * size)
        position += size
    close(position)
    return chunks or [Chunk(0, 0, ())]
