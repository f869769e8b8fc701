"""Statistics for comparing training methods over seeds: mean +/- std, Welch's t-test and the
95% confidence interval of a difference of means (Welch-Satterthwaite degrees of freedom).

Pure Python (``math`` only): Student's t distribution comes from the regularised incomplete beta
function, evaluated by its continued fraction (Lentz's method), so no SciPy is needed.

>>> r = welch([9.1, 9.3, 9.0, 9.4, 9.2], [8.1, 8.4, 8.0, 8.3, 8.2])
>>> round(r["difference"], 3), r["p_value"] < 1e-4
(1.0, True)
>>> welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["p_value"]
1.0
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Sequence


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}``; ``std`` is the sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``, ``a, b > 0``, ``0 <= x <= 1``.

    >>> round(incomplete_beta(2.0, 3.0, 0.4), 6)  # 1 - (0.6**4 + 4*0.4*0.6**3)
    0.5248
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"incomplete_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom (``df > 0``, may be
    fractional; ``math.inf`` gives the normal distribution).

    >>> round(t_two_sided_p(2.776445, 4), 4)
    0.05
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2.0))
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_two_sided_p`, to 1e-12 relative).

    >>> round(t_quantile(0.975, 4), 3), round(t_quantile(0.975, 10), 3)
    (2.776, 2.228)
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    target = 2.0 * min(q, 1.0 - q)  # the two-sided tail probability at |t|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
        if hi > 1e300:
            raise ArithmeticError("t quantile out of range")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Welch's two-sample t-test of ``mean(a) - mean(b)``, with its ``level`` confidence interval.

    Returns ``difference`` (mean(a) - mean(b)), ``ci_low``/``ci_high`` (the Welch interval: the
    difference +/- t_{(1+level)/2, df} * SE, with SE = sqrt(s_a^2/n_a + s_b^2/n_b) and the
    Welch-Satterthwaite ``df``), ``t``, ``df`` and the two-sided ``p_value``. Each sample needs
    at least two values. When both samples have zero variance the test is degenerate: identical
    means give ``p_value = 1`` and an interval of width 0, different means ``p_value = 0``.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per sample, got {len(a)} and {len(b)}")
    if not all(math.isfinite(v) for v in a + b):
        raise ValueError("Welch's t-test got a non-finite value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    na, nb = len(a), len(b)
    diff = ma - mb
    se2 = va / na + vb / nb
    out = {"difference": diff, "mean_a": ma, "mean_b": mb, "n_a": na, "n_b": nb, "level": level}
    if se2 == 0.0:
        same = diff == 0.0
        return {**out, "t": 0.0 if same else math.copysign(math.inf, diff), "df": float(na + nb - 2),
                "p_value": 1.0 if same else 0.0, "ci_low": diff, "ci_high": diff}
    se = math.sqrt(se2)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    t = diff / se
    half = t_quantile(0.5 + level / 2.0, df) * se
    return {**out, "t": t, "df": df, "p_value": min(1.0, t_two_sided_p(t, df)),
            "ci_low": diff - half, "ci_high": diff + half}
