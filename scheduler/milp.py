"""The exact part of packing: a HiGHS MILP (scipy.optimize.milp) over a fixed number of bins.

Used by :func:`lorafusion.scheduler.packing.pack` only where a lower bound shows that the heuristic
packing may be beaten (see that module's docstring). HiGHS ships inside scipy, so it adds no
dependency, and it releases the GIL, so several groups' problems can be solved on threads at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from .bins import bin_load


def milp_fixed_bins(
    segments: Sequence[int],
    tokens: Sequence[int],
    capacity: int,
    pad_multiple: int,
    num_bins: int,
    time_limit_s: float,
    leftover_gap: float,
) -> tuple[str, list[list[int]] | None]:
    """Pack into exactly ``num_bins`` bins with non-increasing loads, minimising the last bin's load.

    Returns (status, bins): status is "optimal", "infeasible", "timeout" (bins = incumbent or None).
    Variables: x[i, b] (item i in bin b), and when pad_multiple > 1, p[s, b] = padded blocks of
    segment s in bin b (integer), so that bin b's load is pad_multiple * sum_s p[s, b].
    """
    n, k = len(tokens), num_bins
    segment_ids = sorted(set(segments))
    seg_pos = {s: j for j, s in enumerate(segment_ids)}
    padded = pad_multiple > 1
    num_x = n * k
    num_p = len(segment_ids) * k if padded else 0

    def x(i: int, b: int) -> int:
        return i * k + b

    def p(s: int, b: int) -> int:
        return num_x + seg_pos[s] * k + b

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(lower)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lower.append(lo)
        upper.append(hi)

    def load_terms(b: int, sign: float) -> list[tuple[int, float]]:
        if padded:
            return [(p(s, b), sign * pad_multiple) for s in segment_ids]
        return [(x(i, b), sign * tokens[i]) for i in range(n)]

    for i in range(n):  # every item in exactly one bin
        add_row([(x(i, b), 1.0) for b in range(k)], 1.0, 1.0)
    for b in range(k):  # capacity, and every bin non-empty
        add_row(load_terms(b, 1.0), 1.0, capacity)
    for b in range(k - 1):  # symmetry breaking: load[b] >= load[b + 1]
        add_row(load_terms(b, 1.0) + load_terms(b + 1, -1.0), 0.0, np.inf)
    if padded:  # pad_multiple * p[s, b] >= raw tokens of segment s in bin b
        for s in segment_ids:
            for b in range(k):
                entries = [(p(s, b), float(pad_multiple))]
                entries += [(x(i, b), -float(tokens[i])) for i in range(n) if segments[i] == s]
                add_row(entries, 0.0, np.inf)

    num_vars = num_x + num_p
    objective = np.zeros(num_vars)
    for c, v in load_terms(k - 1, 1.0):
        objective[c] += v
    upper_bounds = np.ones(num_vars)
    if padded:
        upper_bounds[num_x:] = capacity // pad_multiple
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), num_vars)).tocsr()
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, lower, upper),
        integrality=np.ones(num_vars),
        bounds=Bounds(np.zeros(num_vars), upper_bounds),
        options={"time_limit": max(time_limit_s, 1e-3), "disp": False, "mip_rel_gap": leftover_gap},
    )
    if result.status == 2:
        return "infeasible", None
    bins = None
    if result.x is not None:
        assignment = np.asarray(result.x[:num_x]).reshape(n, k).argmax(axis=1)
        bins = [[i for i in range(n) if assignment[i] == b] for b in range(k)]
    return ("optimal" if result.status == 0 else "timeout"), bins


def search_bin_counts(
    segments: Sequence[int],
    tokens: Sequence[int],
    capacity: int,
    pad_multiple: int,
    lower_bound: int,
    incumbent: list[list[int]],
    deadline: float,
    leftover_gap: float,
) -> tuple[str, list[list[int]]]:
    """Try K = lower_bound, ..., len(incumbent) bins with the MILP; keep the incumbent unless beaten.

    Returns (outcome, bins), outcome one of "improved", "improved-timeout", "not-improved",
    "timeout".
    """
    incumbent_smallest = min(bin_load(b, segments, tokens, pad_multiple) for b in incumbent)
    for num_bins in range(lower_bound, len(incumbent) + 1):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return "timeout", incumbent
        status, bins = milp_fixed_bins(segments, tokens, capacity, pad_multiple, num_bins, remaining, leftover_gap)
        if status == "infeasible":
            continue
        if bins is not None and (
            num_bins < len(incumbent)
            or min(bin_load(b, segments, tokens, pad_multiple) for b in bins) < incumbent_smallest
        ):
            return ("improved" if status == "optimal" else "improved-timeout"), bins
        # Either fewer bins could not be ruled out in time, or the MILP could not beat the incumbent.
        return ("not-improved" if status == "optimal" else "timeout"), incumbent
    raise AssertionError("the incumbent's bin count is always feasible for the MILP")  # pragma: no cover
