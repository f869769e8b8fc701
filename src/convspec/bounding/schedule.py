"""The training-time schedule: :class:`SingularValueBounding` runs SVB (and BBN) every T steps.

References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
Singular Value Bounding", CVPR 2017, Algorithms 1 and 2.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .bbn import BBN_MODES, _plan_bbn
from .layers import SUPPORTED_LAYERS, Skip, _check_layers
from .matrices import _check_dtype, _check_eps, _check_method
from .svb import SVBReport, _plan_svb

# --------------------------------------------------------------------------------------------
# Training harness


class SingularValueBounding:
    """Apply :func:`svb_` (and optionally :func:`bbn_`) every ``every`` optimizer steps.

    Call :meth:`step` once after each ``optimizer.step()``; on the ``every``-th, ``2*every``-th,
    ... call it bounds the model and returns the :class:`SVBReport` (else ``None``). SVB and BBN
    are computed together before either is written, so an error leaves the model unchanged.
    ``state_dict()`` / ``load_state_dict()`` save and restore the step counter and the numeric
    configuration (``eps``, ``every``, ``bbn_eps``, ``bbn_mode``), so a resumed run bounds at the
    same iterations. ``layers``, ``skip``, ``dtype``, ``method``, ``distributed`` and
    ``process_group`` are passed to :func:`svb_` / :func:`bbn_` (see there; under
    ``torch.distributed`` every rank must call :meth:`step`). By default every ``Linear``,
    ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` is bounded; a ``Lazy*`` layer must have run a
    forward pass before the first bounding step (else ``ValueError`` naming it).

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> svb = SingularValueBounding(model, eps=0.05, every=2, bbn_eps=0.2)
    >>> svb.step() is None        # step 1
    True
    >>> report = svb.step()       # step 2: bounds
    >>> report.eps, len(report.layers), len(report.batchnorms)
    (0.05, 1, 1)
    >>> svb.state_dict()['step']
    2

    References: K. Jia, D. Tao, S. Gao, X. Xu, "Improving training of deep neural networks via
    Singular Value Bounding", CVPR 2017, Algorithms 1 and 2.
    """

    def __init__(
        self,
        model,
        eps: float,
        *,
        every: int,
        bbn_eps: Optional[float] = None,
        bbn_mode: str = "bbn",
        layers: Sequence[type] = SUPPORTED_LAYERS,
        skip: Skip = None,
        dtype: torch.dtype = torch.float64,
        method: str = "auto",
        distributed: Optional[bool] = None,
        process_group=None,
    ):
        self.model = model
        self._configure(eps, every, bbn_eps, bbn_mode)
        self.layers = _check_layers(layers)
        self.skip = skip
        self.dtype = _check_dtype(dtype)
        self.method = _check_method(method)
        self.distributed = distributed
        self.process_group = process_group
        self.step_count = 0
        self.last_report: Optional[SVBReport] = None

    def _configure(self, eps, every, bbn_eps, bbn_mode) -> None:
        eps = _check_eps(eps)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if bbn_eps is not None:
            bbn_eps = _check_eps(bbn_eps, "bbn_eps")
        if bbn_mode not in BBN_MODES:
            raise ValueError(f"bbn_mode must be one of {BBN_MODES}, got {bbn_mode!r}")
        self.eps, self.every, self.bbn_eps, self.bbn_mode = eps, every, bbn_eps, bbn_mode

    def apply(self) -> SVBReport:
        """Bound now (whatever the counter says) and return the report."""
        common = dict(distributed=self.distributed, process_group=self.process_group)
        plan = _plan_svb(
            self.model,
            self.eps,
            layers=self.layers,
            skip=self.skip,
            dtype=self.dtype,
            method=self.method,
            **common,
        )
        report = plan.report
        plans = [plan]
        if self.bbn_eps is not None:
            bbn = _plan_bbn(self.model, self.bbn_eps, mode=self.bbn_mode, skip=self.skip, **common)
            plans.append(bbn)
            report.bbn_eps, report.bbn_mode = bbn.report.bbn_eps, bbn.report.bbn_mode
            report.batchnorms = bbn.report.batchnorms
        for p in plans:
            p.commit()
        self.last_report = report
        return report

    def step(self) -> Optional[SVBReport]:
        """Count one optimizer step; bound and return the report every ``every`` steps."""
        self.step_count += 1
        if self.step_count % self.every == 0:
            return self.apply()
        return None

    def state_dict(self) -> Dict[str, object]:
        return {
            "step": self.step_count,
            "eps": self.eps,
            "every": self.every,
            "bbn_eps": self.bbn_eps,
            "bbn_mode": self.bbn_mode,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        missing = {"step", "eps", "every", "bbn_eps", "bbn_mode"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict step must be an int >= 0, got {step!r}")
        self._configure(state["eps"], state["every"], state["bbn_eps"], state["bbn_mode"])
        self.step_count = step

    def __repr__(self) -> str:
        bbn = f", bbn_eps={self.bbn_eps}, bbn_mode={self.bbn_mode!r}" if self.bbn_eps else ""
        return (
            f"SingularValueBounding(eps={self.eps}, every={self.every}{bbn}, "
            f"step={self.step_count})"
        )


__all__ = ["SingularValueBounding"]
