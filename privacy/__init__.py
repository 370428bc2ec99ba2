"""Privacy machinery beyond what Opacus ships: delta, secret randomness, sigma for a target after earlier
mechanisms and a second accountant (here), privacy units and their sampling (``units``), what a DP
model may contain (``per_sample``), an exact one-pass per-unit clipping (``bookkeeping``), noised label
counts (``pos_weight``), the ledger of all runs on the same patients (``ledger``), the release bundle
(``release``), and the privacy audit (``canaries``, ``audit``)."""
from __future__ import annotations

import math
import secrets
import warnings

import dp_accounting
from dp_accounting import dp_event, pld
from opacus.accountants import create_accountant

from config import InputError

# Opacus' PRV accountant takes log(1 - q), -inf for the label counts' full-batch release (q = 1), which
# it handles correctly (checked against dp_accounting's PLD); numpy's divide-by-zero warning is noise.
warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning,
                        module=r"opacus\.accountants\.analysis\.prv")

# delta * N at most this by default (delta much smaller than 1/N, "How to DP-fy ML", Ponomareva et al.
# 2023), and refused above LARGE_DELTA_N unless dp.allow_large_delta
DEFAULT_DELTA_N, LARGE_DELTA_N = 0.01, 0.1


def default_delta(n_units: int) -> float:
    """The largest power of ten with delta * N <= 0.01."""
    return 10.0 ** math.floor(math.log10(DEFAULT_DELTA_N / n_units) + 1e-9)


def check_delta(delta: float, n_units: int, unit: str, allow_large: bool = False) -> None:
    """delta must stay below 1/N (else releasing one whole unit fits the guarantee) and, unless
    allowed, delta * N <= 0.1."""
    suggestion = f"the default (dp.delta: null) is {default_delta(n_units):g}"
    if delta * n_units >= 1:
        raise InputError(f"dp.delta = {delta:g} must be below 1/N = 1/{n_units} {unit}s = {1.0 / n_units:.3g}: "
                         f"a larger delta allows releasing a whole {unit}'s data; {suggestion}")
    if delta * n_units > LARGE_DELTA_N and not allow_large:
        raise InputError(f"dp.delta = {delta:g} gives delta * N = {delta * n_units:.3g} for N = {n_units} {unit}s: "
                         f"each {unit} may fail the guarantee with probability delta, so one of them would with "
                         f"probability up to {delta * n_units:.2g}; {suggestion} (dp.allow_large_delta: true to "
                         f"keep it anyway)")


def planned_epsilon(noise_multiplier: float, sample_rate: float, steps: int, accountant: str, delta: float) -> float:
    """The epsilon that ``steps`` DP-SGD steps at a fixed noise multiplier spend; refused when the
    accountant finds no finite bound (next to no noise): the run would state (inf, delta)-DP, no privacy."""
    books = create_accountant(accountant)
    books.history = [(noise_multiplier, sample_rate, steps)]
    epsilon = books.get_epsilon(delta)
    if not math.isfinite(epsilon):
        raise InputError(f"dp.noise_multiplier = {noise_multiplier:g}: {steps} steps at sample rate {sample_rate:.4g} "
                         f"have no finite epsilon by the {accountant} accountant at delta {delta:g}, which is no "
                         f"differential privacy; raise dp.noise_multiplier or set dp.epsilon instead (dp.enabled: "
                         f"false trains without noise)")
    return epsilon


MAX_SIGMA = 2000.0


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                         history: list = (), tolerance: float = 0.01) -> float:
    """The smallest DP-SGD noise multiplier (to ``tolerance`` in epsilon) whose ``steps`` at
    ``sample_rate``, after the mechanisms already in ``history``, spend at most ``target_epsilon``.

    Opacus' ``get_noise_multiplier`` bisection, with the history in front of the steps.
    """
    books = create_accountant(accountant)

    def spent(sigma: float) -> float:
        books.history = [*history, (sigma, sample_rate, steps)]
        with warnings.catch_warnings():  # the bisection probes tiny sigmas whose RDP order is out of range
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return books.get_epsilon(delta)

    low, high, at_high = 0.0, 10.0, spent(10.0)
    while at_high > target_epsilon:
        if high > MAX_SIGMA:
            before = ""
            if history:
                books.history = list(history)
                before = f"; the mechanisms before training (label counts) alone spend {books.get_epsilon(delta):.3g}"
            raise InputError(f"dp.epsilon = {target_epsilon:g} at delta {delta:g} cannot be reached with {steps} steps at "
                             f"sample rate {sample_rate:.4g}, even with noise multiplier {MAX_SIGMA:g}{before}")
        low, high = high, 2 * high
        at_high = spent(high)
    while target_epsilon - at_high > tolerance:
        middle = (low + high) / 2
        value = spent(middle)
        low, high, at_high = (middle, high, at_high) if value > target_epsilon else (low, middle, value)
    return high


def secret_seed() -> int:
    """63 bits of OS entropy: seeds DP noise and sampling that nobody can replay from the config."""
    return secrets.randbits(63)


def pld_epsilons(history: list, delta: float) -> dict[str, float]:
    """epsilon of a history of (sigma, q, steps) Poisson-subsampled Gaussian steps by the PLD accountant
    of Google's dp_accounting, for add-or-remove-one and replace-one adjacency.

    Opacus' accountants are for add/remove; when N is public, replacing one unit's data is the
    natural neighbour, and it costs more (up to twice the sensitivity).
    """
    out = {}
    for name, relation in (("add_remove_one", dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE),
                           ("replace_one", dp_accounting.NeighboringRelation.REPLACE_ONE)):
        accountant = pld.PLDAccountant(relation, value_discretization_interval=1e-3)
        for sigma, q, steps in history:
            accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), int(steps))
        out[name] = float(accountant.get_epsilon(delta))
    return out
