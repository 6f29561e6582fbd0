"""Validation accuracies a choice can trust: each (entry, task) pulled toward what the entry
scores on the other tasks, by as much as the validation split's noise explains.

Picking per task the entry with the best validation accuracy picks the luckiest draw: on 200
validation images one accuracy has a standard error of about 3 points, as large as the gaps
between entries. The quickstart's 1.2x plan chose norm_head for one task on a validation lead
its test split did not repeat. The remedy is the empirical-Bayes one: fit the table as task
level + entry strength (an additive model, estimated from every cell, so nearly free of noise),
and keep of each cell's departure from that fit only the share its true spread accounts for,

    estimate = fit + tau^2 / (tau^2 + v) * (val - fit)

with ``v`` the binomial variance of an accuracy on the task's ``n`` validation images and
``tau^2`` the variance of true departures, estimated by the method of moments. Entries are
scored on the same images, so their errors are correlated and ``v`` overstates the noise of a
difference: the estimate errs toward an entry's consistent strength, never toward a lucky cell.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

# what a plan may trust per task: shrunk estimates, or validation accuracy as measured
ESTIMATES = ("shrunk", "raw")


@dataclass(frozen=True)
class Shrunk:
    estimates: dict[tuple[str, str], float]  # (label, task) -> estimated accuracy
    tau: float | None  # the spread of true entry-by-task departures; None: not estimable (raw values)
    note: str


def shrink(acc: dict[tuple[str, str], float], n_val: dict[str, int]) -> Shrunk:
    """``acc`` maps (label, task) to a validation accuracy; cells of entries that lack a task
    (or tasks without a validation size) are returned as measured."""
    labels = sorted({lb for lb, _ in acc})
    tasks = sorted({t for _, t in acc})
    complete = [lb for lb in labels if all((lb, t) in acc for t in tasks)]
    usable = [t for t in tasks if n_val.get(t, 0) > 0]
    if len(complete) < 2 or len(usable) < 2:
        return Shrunk(dict(acc), None, "as measured: shrinking needs at least two entries that trained at "
                      "least two tasks with a validation split")
    cells = [(lb, t) for lb in complete for t in usable]
    grand = fmean(acc[c] for c in cells)
    level = {t: fmean(acc[lb, t] for lb in complete) for t in usable}
    strength = {lb: fmean(acc[lb, t] for t in usable) - grand for lb in complete}
    fit = {(lb, t): level[t] + strength[lb] for lb, t in cells}
    noise = {(lb, t): level[t] * (1 - level[t]) / n_val[t] for lb, t in cells}
    e, k = len(complete), len(usable)
    # E[residual^2] = (e-1)(k-1)/(ek) (tau^2 + v) for a two-way additive fit
    residual = fmean((acc[c] - fit[c]) ** 2 for c in cells) * e * k / ((e - 1) * (k - 1))
    tau2 = max(0.0, residual - fmean(noise.values()))
    out = dict(acc)
    for c in cells:
        out[c] = fit[c] + (tau2 / (tau2 + noise[c]) if tau2 + noise[c] > 0 else 1.0) * (acc[c] - fit[c])
    return Shrunk(out, tau2 ** 0.5, f"shrunk: {e} entries x {k} tasks, noise sd {fmean(noise.values()) ** 0.5:.4f}, "
                  f"true spread {tau2 ** 0.5:.4f}")
