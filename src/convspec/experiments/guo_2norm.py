"""Guo (2019) against Guo & Ye (2022): the Frobenius penalty and the 2-norm penalty, head to head.

Algorithm 3.1 (gradient descent on the exact ``R_F(K) = ||M^T M - alpha I||_F^2``) against
gradient descent on the 2-norm penalty ``R_2(K) = ||M^T M - alpha I||_2`` (by persistent power
iteration, :func:`convspec.spectral_penalty`), from the same random kernels: how many iterations
and how much wall time each needs until ``sigma_max(M) <= 1.05`` and ``sigma_min(M) >= 0.9``, and
where each stands after a fixed budget of iterations. Each method runs with the step rule that a
small search on held-out seeds found best for it, per kernel shape (``search`` below).

Kernel shapes are written as in the paper, ``k x k x g x h`` (g input, h output channels); the
PyTorch weight is ``(h, g, k, k)``. Inputs are ``N x N`` with zero ``'same'`` padding.

Note [smaller Gram]: for a wide ``M`` (``g > h``: fewer rows than columns) ``M^T M`` has
``(g - h) N^2`` zero eigenvalues whatever ``K`` is, so ``||M^T M - alpha I||_2 >= alpha`` and its
gradient vanishes once ``sigma_max^2 <= 2 alpha``: the literal 2-norm penalty cannot raise
``sigma_min`` of a wide layer (the 3x3x3x1 and 3x3x3x6 kernels). Both methods therefore penalise
the smaller Gram matrix, ``M M^T`` for a wide ``M``, by running on the kernel of ``M^T``: for
stride 1 and ``'same'`` zero padding of an odd kernel, ``M^T`` is the convolution with
``K.transpose(0, 1).flip(-2, -1)`` and the same padding (tested against the dense operator). This
changes the Frobenius penalty by the constant ``(g - h) N^2 alpha^2`` only, so Algorithm 3.1 takes
the same steps (Armijo's test compares differences); both penalties are then 0 at an orthogonal
kernel, which the Polyak step needs. ``sigma_min`` is the smallest of the ``min(g, h) N^2``
singular values, as in :func:`convspec.extreme_singular_values`.

Note [stopping test]: the exact extremes of ``M`` cost 0.2 s (3x3x3x6) to 15 s (3x3x64x64 at
N = 20, banded Cholesky) each, too much for every iteration. Every iteration (outside the timed
method) a few warm-started power-iteration steps give unit vectors ``u`` and ``v`` whose Rayleigh
quotients bound the extremes, ``||M u|| <= sigma_max`` and ``||M v|| >= sigma_min`` (``M`` tall
after Note [smaller Gram]). If ``||M u|| > 1.05`` or ``||M v|| < 0.9`` the target is certainly
missed; otherwise the exact extremes decide. The first iteration reported is therefore exactly
the first at which the target holds (to the relative tolerance 1e-6 of the exact routes).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._progress import progress_bar
from .._provenance import environment
from ..descent import SPECTRAL_STEP_ITERATIONS, SPECTRAL_WARMUP_ITERATIONS, paper_step_size
from ..penalty import frobenius_penalty, spectral_penalty
from ..spectrum import conv_singular_values
from .guo_fig41 import INITS, random_kernel
from .guo_fig41 import SHAPES as FIG41_SHAPES

SHAPES: Tuple[Tuple[int, int, int, int], ...] = FIG41_SHAPES + ((3, 3, 16, 16), (3, 3, 64, 64))
METHODS = ("frobenius", "spectral")
METHOD_LABELS = {"frobenius": "Frobenius (Alg. 3.1)", "spectral": "2-norm (Guo & Ye)"}
#: Step rules: ``paper`` (Guo's schedule), ``armijo`` (backtracking, as in penalty_descent),
#: ``constant:LR`` and ``polyak:GAMMA`` (step ``GAMMA * R / ||grad R||^2`` along ``-grad R``).
RULE_KINDS = ("paper", "armijo", "constant", "polyak")
#: Polyak's gamma spans its admissible range (0, 2); 0.25 and 1.75 were added when the first
#: search put the best rule at 0.5 (2-norm, 3x3x64x64) and 1.5 (Frobenius, the small kernels).
DEFAULT_RULES: Tuple[str, ...] = (
    "paper", "armijo", "constant:1e-3", "constant:1e-2", "constant:1e-1",
    "polyak:0.25", "polyak:0.5", "polyak:1", "polyak:1.5", "polyak:1.75",
)
#: The figure draws smaller sigma_min at this level: the exact routes resolve sigma_min^2 to
#: about 64 eps sigma_max^2 (see conv_singular_values), so below ~1e-7 M is singular to rounding.
SIGMA_FLOOR = 1e-7
#: Memory the exact extremes may use (3x3x64x64 at N = 20 needs about 2.1 GiB).
EXACT_MAX_BYTES = 4 * 1024**3
ARMIJO_C, ARMIJO_SHRINK = 1e-4, 0.5  # as penalty_descent's defaults


@dataclass
class Guo2NormConfig:
    """Defaults make the record in ``records/guo_2norm/`` (about 40 minutes on 2 CPU cores).

    ``budget``: the iteration at which the final values are taken. ``horizon``: how far each
    evaluation run looks for the target (a run stops at ``max(budget, first hit)`` or at the
    horizon; at the budget for the kernels of ``budget_only``). The search runs every rule of ``rules`` on ``search_seeds`` x ``inits`` up to
    ``search_horizon`` (stopping at the first hit) and keeps, per method and shape, the rule with
    the fewest iterations to target (misses count as ``search_horizon + 1``), ties broken by the
    distance to the target at the end.
    """

    size: int = 20
    alpha: float = 1.0
    shapes: List[Tuple[int, int, int, int]] = field(default_factory=lambda: list(SHAPES))
    inits: List[str] = field(default_factory=lambda: list(INITS))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    budget: int = 300
    horizon: int = 1000
    #: Kernels whose evaluation runs stop at the budget (3x3x64x64: about a minute per exact
    #: sigma_min on a shared 2-core machine, and 20 runs).
    budget_only: List[str] = field(default_factory=lambda: ["3x3x64x64"])
    sigma_max_target: float = 1.05
    sigma_min_target: float = 0.9
    rules: List[str] = field(default_factory=lambda: list(DEFAULT_RULES))
    search_seeds: List[int] = field(default_factory=lambda: [100])
    search_horizon: int = 300
    power_iterations: int = SPECTRAL_STEP_ITERATIONS
    warmup_iterations: int = SPECTRAL_WARMUP_ITERATIONS
    gate_iterations: int = 2
    confirm_iterations: int = 100
    trace_every: int = 10
    threads: int = 1

    def horizon_of(self, shape: Sequence[int]) -> int:
        return self.budget if _shape_name(shape) in self.budget_only else self.horizon

    def validate(self) -> None:
        for name in ("size", "budget", "horizon", "search_horizon", "trace_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("power_iterations", "warmup_iterations", "gate_iterations",
                     "confirm_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.horizon < self.budget:
            raise ValueError(f"horizon ({self.horizon}) must be >= budget ({self.budget})")
        if not (self.alpha > 0 and self.sigma_min_target > 0
                and self.sigma_max_target >= self.sigma_min_target):
            raise ValueError("need alpha > 0 and 0 < sigma_min_target <= sigma_max_target")
        for init in self.inits:
            if init not in INITS:
                raise ValueError(f"init must be one of {INITS}, got {init!r}")
        for shape in self.shapes:
            if len(shape) != 4 or min(shape) < 1 or shape[0] % 2 == 0 or shape[1] % 2 == 0:
                raise ValueError(f"shape must be k1 x k2 x g x h with odd k1, k2: got {shape}")
        if not (self.shapes and self.inits and self.seeds and self.rules and self.search_seeds):
            raise ValueError("shapes, inits, seeds, rules and search_seeds must not be empty")
        for rule in self.rules:
            parse_rule(rule)
        overlap = set(self.seeds) & set(self.search_seeds)
        if overlap:
            raise ValueError(f"search_seeds must differ from seeds (both hold {sorted(overlap)})")


#: ``--quick``: the kernels of Figure 4.1 at N = 12, two seeds, three rules (about 15 s).
QUICK = dict(size=12, shapes=[tuple(s) for s in FIG41_SHAPES], seeds=[0, 1],
             rules=["armijo", "polyak:1", "constant:1e-2"], budget=100, horizon=200,
             search_horizon=100)


def _shape_name(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def parse_rule(rule: str) -> Tuple[str, float]:
    """``'constant:1e-3'`` -> ``('constant', 1e-3)``; ``'paper'`` / ``'armijo'`` -> ``(kind, nan)``.

    >>> parse_rule('polyak:0.5'), parse_rule('armijo')[0]
    (('polyak', 0.5), 'armijo')
    """
    kind, _, arg = str(rule).partition(":")
    if kind not in RULE_KINDS:
        raise ValueError(f"step rule must be one of {RULE_KINDS} (constant:LR, polyak:GAMMA), "
                         f"got {rule!r}")
    if kind in ("paper", "armijo"):
        if arg:
            raise ValueError(f"step rule {kind!r} takes no value, got {rule!r}")
        return kind, math.nan
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"step rule {rule!r}: expected {kind}:NUMBER") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"step rule {rule!r}: the value must be positive and finite")
    return kind, value


def meets_target(sigma_max: float, sigma_min: float, sigma_max_target: float = 1.05,
                 sigma_min_target: float = 0.9) -> bool:
    """The stopping criterion of the comparison: ``sigma_max <= 1.05`` and ``sigma_min >= 0.9``.

    >>> meets_target(1.05, 0.9), meets_target(1.0501, 0.95), meets_target(1.0, 0.8999)
    (True, False, False)
    """
    return sigma_max <= sigma_max_target and sigma_min >= sigma_min_target


def tall_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of ``M`` if ``M`` has at least as many rows as columns (``h >= g``), else the
    kernel of ``M^T`` (Note [smaller Gram]); stride 1 and ``'same'`` zero padding, odd kernel."""
    h, g = weight.shape[:2]
    return weight if h >= g else weight.transpose(0, 1).flip(-2, -1).contiguous()


def _padding(weight: torch.Tensor) -> Tuple[int, int]:
    return weight.shape[-2] // 2, weight.shape[-1] // 2


def exact_extremes(weight: torch.Tensor, size: int) -> Tuple[float, float, bool]:
    """``(sigma_max, sigma_min, converged)`` of ``M`` (zero ``'same'`` padding) by the cheapest
    exact route of :func:`convspec.conv_singular_values` (dense, or Lanczos with the banded
    shift-and-invert to relative tolerance 1e-6)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is returned, not warned about
        res = conv_singular_values(weight.detach(), size, padding=_padding(weight),
                                   which="extremes", max_bytes=EXACT_MAX_BYTES)
    return res.sigma_max, res.sigma_min, bool(res.converged)


class TargetTracker:
    """Finds the first iteration at which a tall kernel meets the target (Note [stopping test]).

    ``check(weight)`` returns whether the target holds, calling :func:`exact_extremes` only when
    the power-iteration bounds ``sigma_max >= ||M u||`` and ``sigma_min <= ||M v||`` leave it
    open after ``iterations`` warm steps and then after ``confirm_iterations`` more
    (``gate=False``: at every call). ``bounds`` holds the last ``(||M u||, ||M v||)``.
    """

    def __init__(self, weight: torch.Tensor, size: int, *, sigma_max_target: float = 1.05,
                 sigma_min_target: float = 0.9, iterations: int = 3,
                 confirm_iterations: int = 100, gate: bool = True, seed: int = 0):
        if weight.shape[0] < weight.shape[1]:
            raise ValueError("TargetTracker needs a tall kernel (h >= g); see tall_kernel")
        gen = torch.Generator().manual_seed(seed)
        shape = (1, weight.shape[1], size, size)
        self.u = torch.randn(shape, generator=gen, dtype=torch.float64)
        self.v = torch.randn(shape, generator=gen, dtype=torch.float64)
        self.size, self.iterations, self.gate = size, iterations, gate
        self.confirm_iterations = confirm_iterations
        self.targets = (sigma_max_target, sigma_min_target)
        self.exact_calls = 0
        self.bounds = (math.nan, math.nan)
        self.last_exact: Optional[Tuple[float, float, bool]] = None

    def _m(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=_padding(w))

    def _gram(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(self._m(x, w), w, padding=_padding(w))

    def refine(self, weight: torch.Tensor, iterations: int) -> Tuple[float, float]:
        """Run ``iterations`` power steps on ``u`` and ``v``; return the bounds."""
        w = weight.detach().to(torch.float64)
        tiny = torch.finfo(torch.float64).tiny
        with torch.no_grad():
            u = self.u / self.u.norm().clamp_min(tiny)
            for _ in range(iterations):
                gu = self._gram(u, w)
                u = gu / gu.norm().clamp_min(tiny)
            top = float(self._m(u, w).norm()) ** 2
            # Bottom of M^T M: power iteration on (shift I - M^T M), shift above lambda_max.
            shift = 1.01 * top + tiny
            v = self.v / self.v.norm().clamp_min(tiny)
            for _ in range(iterations):
                gv = shift * v - self._gram(v, w)
                v = gv / gv.norm().clamp_min(tiny)
            self.u, self.v = u, v
            self.bounds = (float(self._m(u, w).norm()), float(self._m(v, w).norm()))
        return self.bounds

    def check(self, weight: torch.Tensor) -> bool:
        smax_t, smin_t = self.targets

        def missed() -> bool:  # certain: a Rayleigh quotient lies outside the target
            return not (self.bounds[0] <= smax_t and self.bounds[1] >= smin_t)

        self.refine(weight, self.iterations)
        if self.gate and missed():
            return False
        # The few warm steps above can lag a fast-moving spectrum; more steps cost far less
        # than the exact extremes (Note [stopping test]).
        if self.gate and self.confirm_iterations:
            self.refine(weight, self.confirm_iterations)
            if missed():
                return False
        self.exact_calls += 1
        self.last_exact = exact_extremes(weight, self.size)
        return meets_target(self.last_exact[0], self.last_exact[1], smax_t, smin_t)


@dataclass
class RunResult:
    """One descent: what the table and the figure need (JSON-ready through ``asdict``)."""

    phase: str
    method: str
    rule: str
    shape: List[int]
    init: str
    seed: int
    reached: bool = False
    iterations_to_target: Optional[int] = None
    time_to_target_s: Optional[float] = None
    iterations_run: int = 0
    stopped: Optional[str] = None
    final_iteration: Optional[int] = None
    final_sigma_max: Optional[float] = None
    final_sigma_min: Optional[float] = None
    final_exact: bool = False
    final_converged: Optional[bool] = None
    final_penalty: Optional[float] = None
    method_time_s: float = 0.0
    check_time_s: float = 0.0
    exact_calls: int = 0
    trace: Dict[str, list] = field(default_factory=dict)

    def key(self) -> Tuple:
        return (self.phase, self.method, self.rule, tuple(self.shape), self.init, self.seed)


def _finite_or_none(x: float) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def descend(
    weight: torch.Tensor,
    size: int,
    method: str,
    rule: str,
    *,
    alpha: float = 1.0,
    steps: int,
    budget: Optional[int] = None,
    stop_at_target: bool = True,
    tracker: Optional[TargetTracker] = None,
    power_iterations: int = SPECTRAL_STEP_ITERATIONS,
    warmup_iterations: int = SPECTRAL_WARMUP_ITERATIONS,
    trace_every: int = 0,
    result: Optional[RunResult] = None,
) -> Tuple[torch.Tensor, RunResult]:
    """Gradient descent on ``method``'s penalty of a tall kernel (Note [smaller Gram]).

    Runs at most ``steps`` iterations with step rule ``rule`` (see :func:`parse_rule`; ``paper``,
    ``constant`` and ``armijo`` step along ``-G``, ``G = (1/2) dR/dK``, exactly as
    :func:`convspec.penalty_descent`, which a test checks). Iteration 0 is the initial kernel.
    ``tracker`` decides at every iteration whether the target holds; the run stops at
    ``max(first hit, budget)`` when ``stop_at_target``. Only the penalty, its gradient, the line
    search and the step are timed (``method_time_s``), not the stopping test.
    ``budget``: the iteration whose kernel is returned (``None``: the last).

    Why not :func:`convspec.penalty_descent` itself: the Polyak rule, the untimed stopping test
    at every iteration and the early stop are not part of it.
    """
    if weight.shape[0] < weight.shape[1]:
        raise ValueError("descend needs a tall kernel (h >= g); see tall_kernel")
    kind, arg = parse_rule(rule)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    res = result if result is not None else RunResult("adhoc", method, rule, [], "", 0)
    pad = _padding(weight)
    power_state: dict = {}

    def value(k: torch.Tensor) -> torch.Tensor:
        if method == "spectral":
            iters = power_iterations if power_state else warmup_iterations
            return spectral_penalty(k, size, alpha, n_power_iterations=iters, state=power_state,
                                    padding=pad)
        return frobenius_penalty(k, size, alpha, padding=pad)

    k = weight.detach().to(torch.float64).clone()
    at_budget = k
    last_step, hit = 1.0, None
    trace: Dict[str, list] = {"iteration": [], "penalty": [], "sigma_max_lower": [],
                              "sigma_min_upper": []}
    elapsed = 0.0
    r_value = math.nan
    for it in range(steps + 1):
        t0 = time.perf_counter()
        kg = k.detach().requires_grad_(True)
        r = value(kg)
        (grad,) = torch.autograd.grad(r, kg)
        r_value = float(r.detach())
        elapsed += time.perf_counter() - t0

        # The stopping test is made on the kernel of this iteration, untimed.
        if tracker is not None:
            t1 = time.perf_counter()
            if hit is None and tracker.check(k):
                hit = it
                res.reached, res.iterations_to_target, res.time_to_target_s = True, it, elapsed
            elif hit is not None:
                tracker.refine(k, tracker.iterations)
            res.check_time_s += time.perf_counter() - t1
            if trace_every and it % trace_every == 0:
                trace["iteration"].append(it)
                trace["penalty"].append(_finite_or_none(r_value))
                trace["sigma_max_lower"].append(_finite_or_none(tracker.bounds[0]))
                trace["sigma_min_upper"].append(_finite_or_none(tracker.bounds[1]))
        if budget is not None and it == budget:
            at_budget = k
        res.iterations_run = it
        if not math.isfinite(r_value):
            res.stopped = f"penalty became non-finite at iteration {it}"
            break
        if it == steps or (stop_at_target and hit is not None
                           and (budget is None or it >= budget)):
            break

        t0 = time.perf_counter()
        half = grad / 2  # G of eq. (3.2)
        if kind == "paper":
            t = paper_step_size(it)
        elif kind == "constant":
            t = arg
        elif kind == "polyak":
            # Polyak's step for a known minimum 0 (both penalties vanish at an orthogonal kernel):
            # gamma R / ||dR/dK||^2 along -dR/dK, i.e. gamma R / (2 ||G||^2) along -G.
            t = arg * r_value / (2 * float(half.square().sum()) + 1e-300)
        else:
            t = min(2 * last_step, 1e6)
            target = ARMIJO_C * float(half.square().sum())
            while float(value(k - t * half)) > r_value - t * target:
                t *= ARMIJO_SHRINK
                if t < 1e-30:
                    break
            if t < 1e-30:
                res.stopped = f"line search found no decrease at iteration {it}"
                elapsed += time.perf_counter() - t0
                break
            last_step = t
        k = (k - t * half).detach()
        elapsed += time.perf_counter() - t0
    res.method_time_s = elapsed
    res.final_penalty = _finite_or_none(r_value)
    if tracker is not None:
        res.exact_calls = tracker.exact_calls
    if trace_every:
        res.trace = trace
    return (at_budget if budget is not None and res.iterations_run >= budget else k), res


# ------------------------------------------------------------------------------------------
# The experiment


#: How a run's random numbers derive from its seed; part of the config fingerprint, so a record
#: made with another derivation is not reused.
KERNEL_SEEDING = "crc32(shape/seed)"


def _run_seed(shape: Sequence[int], seed: int) -> int:
    """The seed of one (shape, seed) pair's random numbers.

    Derived from the shape too, so that no two kernels of a record share their draws: with
    ``seed`` alone, a ``k x k x g x h`` kernel and its mirror ``k x k x h x g`` drew the same
    numbers, and since the smaller Gram of the one is that of the other's flipped kernel
    (:func:`tall_kernel`), they were one problem counted twice.
    """
    return zlib.crc32(f"{_shape_name(shape)}/{seed}".encode())


def _initial_kernel(shape: Sequence[int], init: str, seed: int) -> torch.Tensor:
    """The same kernel for both methods: ``random_kernel`` of Figure 4.1, drawn from
    :func:`_run_seed` of ``(shape, seed)``."""
    return random_kernel(shape, init, torch.Generator().manual_seed(_run_seed(shape, seed)))


def _violation(sigma_max: Optional[float], sigma_min: Optional[float], cfg: Guo2NormConfig) -> float:
    """How far ``(sigma_max, sigma_min)`` is from the target, in log units (0 inside it)."""
    if sigma_max is None or sigma_min is None:
        return math.inf
    return max(0.0, math.log(sigma_max / cfg.sigma_max_target),
               math.log(cfg.sigma_min_target / max(sigma_min, 1e-300)))


def one_run(cfg: Guo2NormConfig, phase: str, method: str, rule: str, shape, init: str,
            seed: int) -> RunResult:
    """One descent of the search (``phase='search'``) or of the evaluation (``'main'``)."""
    res = RunResult(phase, method, rule, list(shape), init, seed)
    weight = tall_kernel(_initial_kernel(shape, init, seed))
    run_seed = _run_seed(shape, seed)
    torch.manual_seed(run_seed)  # the power-iteration vectors of spectral_penalty
    tracker = TargetTracker(weight, cfg.size, sigma_max_target=cfg.sigma_max_target,
                            sigma_min_target=cfg.sigma_min_target,
                            iterations=cfg.gate_iterations,
                            confirm_iterations=cfg.confirm_iterations, seed=run_seed)
    main = phase == "main"
    steps = cfg.horizon_of(shape) if main else cfg.search_horizon
    final, res = descend(
        weight, cfg.size, method, rule, alpha=cfg.alpha, steps=steps,
        budget=cfg.budget if main else None, tracker=tracker,
        power_iterations=cfg.power_iterations, warmup_iterations=cfg.warmup_iterations,
        trace_every=cfg.trace_every if main else 0, result=res,
    )
    t1 = time.perf_counter()
    if res.stopped and "non-finite" in res.stopped:
        pass  # diverged: no final values
    elif main:
        # Exact values at the budget (or where a run that broke down stopped).
        res.final_iteration = min(cfg.budget, res.iterations_run)
        smax, smin, conv = exact_extremes(final, cfg.size)
        res.final_sigma_max, res.final_sigma_min = smax, smin
        res.final_exact, res.final_converged = True, conv
    else:
        # The search ranks misses by the distance to the target: power-iteration bounds suffice.
        res.final_iteration = res.iterations_run
        res.final_sigma_max, res.final_sigma_min = tracker.refine(final, 200)
    res.check_time_s += time.perf_counter() - t1
    return res


def _load_done(path: Path) -> Dict[Tuple, dict]:
    """The runs already in ``path`` (one JSON object a line), by key; a torn last line is
    dropped, so an interrupted record resumes where it stopped."""
    done: Dict[Tuple, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        key = (row["phase"], row["method"], row["rule"], tuple(row["shape"]), row["init"],
               row["seed"])
        done[key] = row
    return done


def _config_fingerprint(cfg: Guo2NormConfig) -> dict:
    """The fields a stored run depends on; runs.jsonl is reused only if these agree."""
    d = asdict(cfg)
    for name in ("shapes", "inits", "seeds", "rules", "search_seeds"):
        d.pop(name)  # more or fewer runs, not different ones
    d["kernel_seeding"] = KERNEL_SEEDING
    return d


def choose_rules(cfg: Guo2NormConfig, search_runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Per shape and method, every candidate's score and the chosen rule (the lowest score).

    Score: mean iterations to target over the search runs (a miss counts
    ``search_horizon + 1``), then mean distance to the target at the end (log units), then mean
    method time.
    """
    out: Dict[str, Dict[str, dict]] = {}
    for shape in cfg.shapes:
        name = "x".join(map(str, shape))
        out[name] = {}
        for method in METHODS:
            scores = []
            for rule in cfg.rules:
                rows = [r for r in search_runs if r["method"] == method and r["rule"] == rule
                        and tuple(r["shape"]) == tuple(shape)]
                if not rows:
                    continue
                iters = [r["iterations_to_target"] if r["reached"] else cfg.search_horizon + 1
                         for r in rows]
                viol = [_violation(r["final_sigma_max"], r["final_sigma_min"], cfg)
                        for r in rows]
                scores.append({
                    "rule": rule,
                    "reached": sum(r["reached"] for r in rows),
                    "runs": len(rows),
                    "mean_iterations": statistics.fmean(iters),
                    "mean_violation": statistics.fmean(viol),
                    "mean_time_s": statistics.fmean(r["method_time_s"] for r in rows),
                    "stopped": sum(bool(r["stopped"]) for r in rows),
                })
            scores.sort(key=lambda s: (s["mean_iterations"], s["mean_violation"],
                                       s["mean_time_s"]))
            out[name][method] = {"chosen": scores[0]["rule"] if scores else None,
                                 "candidates": scores}
    return out


def run(cfg: Guo2NormConfig, out: Path, progress: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Search, then evaluate; every finished run is appended to ``out/runs.jsonl`` at once, and
    runs found there (of the same config fingerprint) are not run again."""
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, progress, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Guo2NormConfig, out: Path, progress: bool, log: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    runs_path = Path(out) / "runs.jsonl"
    meta_path = Path(out) / "runs_config.json"
    fingerprint = _config_fingerprint(cfg)
    if meta_path.exists() and json.loads(meta_path.read_text()) != fingerprint:
        log(f"{runs_path}: made with another config; starting afresh")
        runs_path.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(fingerprint, indent=1))
    done = _load_done(runs_path)
    environment_before = environment()  # written with the record: the code that ran

    reused = [0]

    def execute(todo: List[Tuple], bar) -> List[dict]:
        rows = []
        for key in todo:
            if key in done:
                reused[0] += 1
                rows.append(done[key])
                bar.update(1)
                continue
            res = one_run(cfg, *key)
            row = asdict(res)
            with runs_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[key] = row
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{key[0]} {'x'.join(map(str, key[3]))} {key[1]} {key[2]}",
                                refresh=False)
        return rows

    search_keys = [("search", m, rule, tuple(s), i, seed) for s in cfg.shapes for m in METHODS
                   for rule in cfg.rules for i in cfg.inits for seed in cfg.search_seeds]
    main_count = len(cfg.shapes) * len(METHODS) * len(cfg.inits) * len(cfg.seeds)
    with progress_bar(len(search_keys) + main_count, "guo-2norm", enabled=progress) as bar:
        search_rows = execute(search_keys, bar)
        chosen = choose_rules(cfg, search_rows)
        main_keys = [("main", m, chosen["x".join(map(str, s))][m]["chosen"], tuple(s), i, seed)
                     for s in cfg.shapes for i in cfg.inits for seed in cfg.seeds
                     for m in METHODS]
        main_rows = execute(main_keys, bar)
    used = search_rows + main_rows
    record = {
        "config": asdict(cfg),
        "environment": environment_before,
        # This invocation only: runs found in runs.jsonl are reused, not timed again.
        "wall_time_s": time.perf_counter() - t_start,
        "runs_reused": reused[0],
        # Every run's method and stopping-test time, wherever it ran: the record's compute time.
        "compute_time_s": sum(r["method_time_s"] + r["check_time_s"] for r in used),
        "search": chosen,
        "search_runs": [{k: v for k, v in r.items() if k != "trace"} for r in search_rows],
        "runs": [{k: v for k, v in r.items() if k != "trace"} for r in main_rows],  # traces:
        # power-iteration bounds every trace_every iterations, in runs.jsonl only
        "summary": summarize(cfg, main_rows, chosen),
    }
    return record


def _mean_std(xs: List[float]) -> Tuple[Optional[float], Optional[float]]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(cfg: Guo2NormConfig, rows: List[dict], chosen: dict) -> List[dict]:
    """Per shape, init and method: reached count, iterations and time to target (mean, std over
    the runs that reached it), final values at the budget (mean, std); and per shape and init the
    paired ratio 2-norm / Frobenius of iterations and time over seeds where both reached."""
    summary = []
    for shape in cfg.shapes:
        name = "x".join(map(str, shape))
        for init in cfg.inits:
            entry = {"shape": name, "init": init, "methods": {}}
            by_seed = {}
            for method in METHODS:
                rs = [r for r in rows if r["method"] == method and "x".join(map(str, r["shape"]))
                      == name and r["init"] == init]
                hit = [r for r in rs if r["reached"]]
                it_m, it_s = _mean_std([r["iterations_to_target"] for r in hit])
                tt_m, tt_s = _mean_std([r["time_to_target_s"] for r in hit])
                fin = [r for r in rs if r["final_sigma_max"] is not None]
                smax_m, smax_s = _mean_std([r["final_sigma_max"] for r in fin])
                smin_m, smin_s = _mean_std([r["final_sigma_min"] for r in fin])
                per_it = [r["method_time_s"] / max(r["iterations_run"], 1) for r in rs]
                entry["methods"][method] = {
                    "rule": chosen[name][method]["chosen"],
                    "runs": len(rs), "reached": len(hit),
                    "stopped": sum(bool(r["stopped"]) for r in rs),
                    "iterations_mean": it_m, "iterations_std": it_s,
                    "time_s_mean": tt_m, "time_s_std": tt_s,
                    "final_sigma_max_mean": smax_m, "final_sigma_max_std": smax_s,
                    "final_sigma_min_mean": smin_m, "final_sigma_min_std": smin_s,
                    "final_reached": sum(meets_target(r["final_sigma_max"], r["final_sigma_min"],
                                                      cfg.sigma_max_target, cfg.sigma_min_target)
                                         for r in fin),
                    "ms_per_iteration": 1000 * statistics.fmean(per_it) if per_it else None,
                }
                for r in rs:
                    by_seed.setdefault(r["seed"], {})[method] = r
            pairs = [d for d in by_seed.values()
                     if all(m in d and d[m]["reached"] for m in METHODS)]
            ratio_it = [d["spectral"]["iterations_to_target"]
                        / max(d["frobenius"]["iterations_to_target"], 1) for d in pairs]
            ratio_t = [d["spectral"]["time_to_target_s"]
                       / max(d["frobenius"]["time_to_target_s"], 1e-12) for d in pairs]
            fewer = sum(d["frobenius"]["iterations_to_target"]
                        < d["spectral"]["iterations_to_target"] for d in pairs)
            entry["paired"] = {
                "pairs": len(pairs),
                "frobenius_fewer_iterations": fewer,
                "iteration_ratio_mean": _mean_std(ratio_it)[0],
                "iteration_ratio_std": _mean_std(ratio_it)[1],
                "time_ratio_mean": _mean_std(ratio_t)[0],
                "time_ratio_std": _mean_std(ratio_t)[1],
            }
            summary.append(entry)
    return summary


def _pm(m: Optional[float], s: Optional[float], fmt: str) -> str:
    if m is None:
        return "-"
    return f"{m:{fmt}} +/- {s:{fmt}}"


def table(record: dict) -> str:
    """The markdown table of the README: one row per shape and init, the two methods side by side."""
    cfg = record["config"]
    lines = [
        f"Target sigma_max <= {cfg['sigma_max_target']:g} and sigma_min >= "
        f"{cfg['sigma_min_target']:g}; N = {cfg['size']}, zero 'same' padding; "
        f"{len(cfg['seeds'])} seeds per row; iterations and time: mean +/- std over the runs "
        f"that reached the target within {cfg['horizon']} iterations"
        + "".join(f" ({name}: {cfg['budget']})" for name in cfg["budget_only"]
                  if name in {_shape_name(s) for s in cfg["shapes"]})
        + f"; final values: exact, at "
        f"iteration {cfg['budget']}, mean +/- std over all runs; ratio: 2-norm / Frobenius, "
        f"paired by seed over the seeds where both reached it.",
        "",
        "| kernel | init | method | step rule | reached | iterations | time (s) | ms/iter "
        f"| sigma_max @{cfg['budget']} | sigma_min @{cfg['budget']} | in target @{cfg['budget']} "
        "| ratio iters | ratio time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in record["summary"]:
        for j, method in enumerate(METHODS):
            m = e["methods"][method]
            p = e["paired"]
            ratio_i = _pm(p["iteration_ratio_mean"], p["iteration_ratio_std"], ".2f") if j == 0 \
                else ""
            ratio_t = _pm(p["time_ratio_mean"], p["time_ratio_std"], ".2f") if j == 0 else ""
            ms = f"{m['ms_per_iteration']:.1f}" if m["ms_per_iteration"] is not None else "-"
            lines.append(
                f"| {e['shape'] if j == 0 else ''} | {e['init'] if j == 0 else ''} "
                f"| {METHOD_LABELS[method]} | {m['rule']} | {m['reached']}/{m['runs']} "
                f"| {_pm(m['iterations_mean'], m['iterations_std'], '.1f')} "
                f"| {_pm(m['time_s_mean'], m['time_s_std'], '.2f')} | {ms} "
                f"| {_pm(m['final_sigma_max_mean'], m['final_sigma_max_std'], '.3f')} "
                f"| {_pm(m['final_sigma_min_mean'], m['final_sigma_min_std'], '.3g')} "
                f"| {m['final_reached']}/{m['runs']} | {ratio_i} | {ratio_t} |"
            )
    return "\n".join(lines)


def search_table(record: dict) -> str:
    """The step-rule search: every candidate's score per shape and method."""
    cfg = record["config"]
    lines = [
        f"Step-rule search: seeds {cfg['search_seeds']} x inits {cfg['inits']}, up to "
        f"{cfg['search_horizon']} iterations; score = mean iterations to target (a miss counts "
        f"{cfg['search_horizon'] + 1}), then distance to the target at the end (log units, "
        "power-iteration bounds); stopped early: the penalty became non-finite, or Armijo found no "
        "decrease; chosen rule in bold.",
        "",
        "| kernel | method | rule | reached | mean iterations | distance | stopped early |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, per_method in record["search"].items():
        for method, s in per_method.items():
            for c in s["candidates"]:
                rule = f"**{c['rule']}**" if c["rule"] == s["chosen"] else c["rule"]
                lines.append(f"| {shape} | {METHOD_LABELS[method]} | {rule} "
                             f"| {c['reached']}/{c['runs']} | {c['mean_iterations']:.1f} "
                             f"| {c['mean_violation']:.3g} | {c['stopped']} |")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """Four panels over the kernels: iterations to target, wall time to target, and sigma_max,
    sigma_min at the budget; one colour per method, one marker per init, one dot per run, the
    median with the range as a bar (a mean +/- std would leave a log axis where sigma_min spans
    1e-10 to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = record["config"]
    shapes = ["x".join(map(str, s)) for s in cfg["shapes"]]
    colors = {"frobenius": "tab:blue", "spectral": "tab:orange"}
    markers = {"normal": "o", "uniform": "s"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [
        (axes[0, 0], "iterations_to_target", "iterations to target", True,
         "Iterations until sigma_max <= {smax:g} and sigma_min >= {smin:g}"),
        (axes[0, 1], "time_to_target_s", "wall time to target (s)", True,
         "Wall time until the target (method only, torch threads: {cores})"),
        (axes[1, 0], "final_sigma_max", "sigma_max at iteration {budget}", True,
         "sigma_max(M) after {budget} iterations"),
        (axes[1, 1], "final_sigma_min", "sigma_min at iteration {budget}", True,
         "sigma_min(M) after {budget} iterations"),
    ]
    fmt = dict(smax=cfg["sigma_max_target"], smin=cfg["sigma_min_target"], budget=cfg["budget"],
               cores=record["environment"].get("torch_threads"))
    width = 0.8 / (len(METHODS) * len(cfg["inits"]))
    for ax, key, ylabel, logy, title in panels:
        for mi, method in enumerate(METHODS):
            for ii, init in enumerate(cfg["inits"]):
                slot = mi * len(cfg["inits"]) + ii
                for si, shape in enumerate(shapes):
                    x = si - 0.4 + width * (slot + 0.5)
                    rs = [r for r in record["runs"] if r["method"] == method and r["init"] == init
                          and "x".join(map(str, r["shape"])) == shape]
                    vals = [r[key] for r in rs if r[key] is not None]
                    if key == "final_sigma_min":
                        vals = [max(v, SIGMA_FLOOR) for v in vals]
                    vals = [v for v in vals if v > 0]
                    if key in ("iterations_to_target", "time_to_target_s") and len(vals) < len(rs):
                        ax.annotate(f"{len(rs) - len(vals)} missed", (x, 0.98),
                                    xycoords=("data", "axes fraction"), ha="center", va="top",
                                    fontsize=7, color=colors[method], rotation=90)
                    if vals:
                        ax.scatter([x] * len(vals), vals, color=colors[method],
                                   marker=markers[init], s=14, alpha=0.6, linewidths=0)
                        mid = statistics.median(vals)
                        ax.errorbar([x], [mid], yerr=[[mid - min(vals)], [max(vals) - mid]],
                                    color=colors[method], marker=markers[init], ms=7,
                                    mfc="white", capsize=3, lw=1.2)
        if key == "final_sigma_max":
            ax.axhline(cfg["sigma_max_target"], color="gray", ls="--", lw=0.8)
        if key == "final_sigma_min":
            ax.axhline(cfg["sigma_min_target"], color="gray", ls="--", lw=0.8)
            ax.axhline(SIGMA_FLOOR, color="black", ls=":", lw=0.8)
        if logy:
            ax.set_yscale("log")
        if key in ("iterations_to_target", "time_to_target_s"):
            ax.margins(y=0.3)  # room for the 'missed' labels at the top
        ax.set_xticks(range(len(shapes)))
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_xticklabels(shapes, fontsize=8)
        ax.set_xlabel("kernel k x k x g x h")
        ax.set_ylabel(ylabel.format(**fmt))
        ax.set_title(title.format(**fmt), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker=markers[i], mfc="white", ls="",
                      label=f"{METHOD_LABELS[m]}, {i} init")
               for m in METHODS for i in cfg["inits"]]
    handles.append(Line2D([], [], color="gray", ls="--", label="target"))
    handles.append(Line2D([], [], color="black", ls=":",
                          label=f"sigma_min <= {SIGMA_FLOOR:g}: singular to rounding"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Frobenius vs 2-norm penalty descent, N = {cfg['size']}, zero 'same' padding, "
                 f"{len(cfg['seeds'])} seeds x {len(cfg['inits'])} inits (marker: median, bars: "
                 "range, dots: runs)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Guo2NormConfig, out: Path, progress: bool = True) -> dict:
    """Run (resuming from ``out/runs.jsonl``), print the table, write ``out/guo_2norm.json``,
    ``out/guo_2norm.md`` and ``out/guo_2norm.png``."""
    from ..train.rundir import make_output_dir, write_json

    cfg.validate()
    out = make_output_dir(Path(out))  # a bad --out fails before any descent
    record = run(cfg, out, progress=progress, log=print)
    json_path = out / "guo_2norm.json"
    write_json(json_path, record)
    md = table(record) + "\n\n" + search_table(record) + "\n"
    (out / "guo_2norm.md").write_text(md)
    plot(record, out / "guo_2norm.png")
    print(table(record))
    print(f"wrote {json_path}, {out / 'guo_2norm.md'} and {out / 'guo_2norm.png'}")
    return record
