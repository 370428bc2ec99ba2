"""Privacy machinery beyond what Opacus ships: the choice of delta (here), an exact one-pass per-sample
clipping (``bookkeeping``), and the privacy audit (``canaries`` for training, ``audit`` for the attacks)."""
from __future__ import annotations

import math

from config import InputError


def default_delta(n_train: int) -> float:
    """The largest power of ten strictly below 1/N."""
    return 10.0 ** -(math.floor(math.log10(n_train)) + 1)


def check_delta(delta: float, n_train: int) -> None:
    if delta >= 1.0 / n_train:
        raise InputError(f"dp.delta = {delta:g} must be below 1/N_train = 1/{n_train} = {1.0 / n_train:.3g}: "
                         f"a larger delta allows releasing a whole training record; try {default_delta(n_train):g}")
