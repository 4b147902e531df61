"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and how to measure calibration.

Temperature scaling divides every logit by one scalar ``T > 0`` fitted by minimising the negative log-likelihood on a
validation split (never the split a figure is reported on). It changes no prediction (the arg-max is unchanged),
only how confident the probabilities are. ``scipy.optimize.minimize_scalar`` does the one-dimensional fit (bounded,
on ``log T``); :func:`expected_calibration_error` is the usual equal-width-bin ECE (15 bins by default) with a
percentile bootstrap confidence interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import log_softmax, softmax

from neuroexplain.errors import InvalidOptionError

#: Temperatures outside this range mean the fit failed (or the validation split is degenerate), never a real model.
TEMPERATURE_BOUNDS = (0.05, 100.0)


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lg = np.asarray(logits, dtype=np.float64)
    lb = np.asarray(labels, dtype=np.int64)
    if lg.ndim != 2 or lg.shape[0] == 0 or lg.shape[1] < 2:
        raise InvalidOptionError(f"logits have shape {lg.shape}; expected (n, n_classes) with n >= 1, n_classes >= 2")
    if lb.shape != (lg.shape[0],):
        raise InvalidOptionError(f"labels have shape {lb.shape}; expected ({lg.shape[0]},), one per row of logits")
    if lb.min() < 0 or lb.max() >= lg.shape[1]:
        raise InvalidOptionError(f"labels must be class indices 0 to {lg.shape[1] - 1}")
    if not np.isfinite(lg).all():
        raise InvalidOptionError("logits contain NaN or infinity; expected finite values")
    return lg, lb


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(n, n_classes)`` raw model outputs.
        labels: ``(n,)`` true class indices.
        temperature: the divisor of the logits.

    Returns:
        The mean NLL in nats.
    """
    lg, lb = _check(logits, labels)
    lp = log_softmax(lg / temperature, axis=1)
    return float(-lp[np.arange(len(lb)), lb].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of ``labels`` (fit on a validation split only).

    Args:
        logits: ``(n, n_classes)`` validation logits.
        labels: ``(n,)`` validation labels.

    Returns:
        ``T`` within :data:`TEMPERATURE_BOUNDS`; probabilities are ``softmax(logits / T)``.
    """
    lg, lb = _check(logits, labels)
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    res = optimize.minimize_scalar(lambda u: nll(lg, lb, float(np.exp(u))), bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-5})
    return float(np.exp(res.x))


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` row by row. ``(n, C)`` -> ``(n, C)``."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise InvalidOptionError(f"temperature {temperature!r} must be a finite number above 0")
    return np.asarray(softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins: what the model claimed and how often it was right, per bin."""

    edges: tuple[float, ...]  # n_bins + 1
    confidence: tuple[float, ...]  # mean confidence per bin (NaN where empty)
    accuracy: tuple[float, ...]  # accuracy per bin (NaN where empty)
    count: tuple[int, ...]


def reliability(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Reliability:
    """Bin predictions by their top-class confidence (``n_bins`` equal-width bins on [0, 1])."""
    conf, correct = _confidence(probabilities, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    c, a, n = [], [], []
    for b in range(n_bins):
        sel = idx == b
        n.append(int(sel.sum()))
        c.append(float(conf[sel].mean()) if sel.any() else float("nan"))
        a.append(float(correct[sel].mean()) if sel.any() else float("nan"))
    return Reliability(tuple(float(e) for e in edges), tuple(c), tuple(a), tuple(n))


def _confidence(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    lb = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or lb.shape != (p.shape[0],) or p.shape[0] == 0:
        raise InvalidOptionError(f"probabilities {p.shape} and labels {lb.shape} must be (n, C) and (n,), n >= 1")
    return p.max(axis=1), (p.argmax(axis=1) == lb).astype(np.float64)


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return float(total)


@dataclass(frozen=True)
class Ece:
    """Expected calibration error with its bootstrap interval."""

    value: float
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th percentile
    n: int
    n_bins: int
    n_bootstrap: int


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_bootstrap: int = 1000, seed: int = 0
) -> Ece:
    """ECE over ``n_bins`` equal-width confidence bins, with a 95 % percentile bootstrap interval.

    Args:
        probabilities: ``(n, C)`` predicted probabilities.
        labels: ``(n,)`` true class indices.
        n_bins: number of bins (15, as in Guo et al.).
        n_bootstrap: bootstrap resamples of the ``n`` scans (0 for none: the interval is then the value itself).
        seed: seed of the bootstrap.

    Returns:
        The ECE, its interval, and the counts it rests on.
    """
    if not 1 <= n_bins <= 1000 or not 0 <= n_bootstrap <= 100_000:
        raise InvalidOptionError("n_bins must be 1 to 1000 and n_bootstrap 0 to 100000")
    conf, correct = _confidence(probabilities, labels)
    value = _ece(conf, correct, n_bins)
    if n_bootstrap == 0:
        return Ece(value, value, value, len(conf), n_bins, 0)
    rng = np.random.default_rng(seed)
    boots = [_ece(conf[i], correct[i], n_bins) for i in rng.integers(0, len(conf), (n_bootstrap, len(conf)))]
    low, high = np.percentile(boots, [2.5, 97.5])
    return Ece(value, float(low), float(high), len(conf), n_bins, n_bootstrap)


def summary(logits: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int = 15,
            n_bootstrap: int = 1000) -> dict[str, dict[str, float | int]]:
    """ECE (with interval), NLL and accuracy before (``T = 1``) and after temperature scaling."""
    out: dict[str, dict[str, float | int]] = {}
    for name, t in (("before", 1.0), ("after", temperature)):
        p = scaled_probabilities(logits, t)
        e = expected_calibration_error(p, labels, n_bins, n_bootstrap)
        out[name] = {"ece": e.value, "ece_low": e.low, "ece_high": e.high, "nll": nll(logits, labels, t),
                     "accuracy": float((p.argmax(1) == np.asarray(labels)).mean()), "n": e.n, "n_bins": n_bins,
                     "temperature": t}
    return out


def stack_logits(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Logit rows (e.g. ``Prediction.logits``) as one ``(n, C)`` float64 array."""
    return np.asarray([list(r) for r in rows], dtype=np.float64)
