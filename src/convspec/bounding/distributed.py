"""SVB and BBN under ``torch.distributed``: the process-group context and the collectives.

Every decision that could differ between ranks (layer counts, a bad weight, a failed
decomposition) is agreed on by an all-reduce before anything is written, and results are
broadcast from the rank that computed them, so all ranks end with identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .layers import _Layer

@dataclass
class _Dist:
    group: Optional[object]
    rank: int
    world: int

    @property
    def active(self) -> bool:
        return self.world > 1

    def src(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` in this group (what ``dist.broadcast`` wants)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce_min(self, values: List[int], device) -> List[int]:
        t = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t.tolist()


def _dist_context(distributed: Optional[bool], process_group) -> _Dist:
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    elif not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
    if not distributed:
        return _Dist(None, 0, 1)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialized")
    return _Dist(
        process_group,
        dist.get_rank(group=process_group),
        dist.get_world_size(group=process_group),
    )


def _comm_device(tensors: Sequence[torch.Tensor], ctx: _Dist) -> torch.device:
    """Where collectives run: the tensors' device, but CUDA for NCCL even for CPU models."""
    backend = dist.get_backend(ctx.group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensors[0].device if tensors else torch.device("cpu")


def _check_consistent(ctx: _Dist, values: List[int], device) -> List[int]:
    """All-reduce small integer facts so that every rank takes the same decision.

    ``values`` = [n_layers, -n_layers, bad_index_or_big, ...]: returns the minima. A mismatch in
    the layer count between ranks is reported on every rank instead of deadlocking later.
    """
    return ctx.all_reduce_min(values, device)


_ROUTE_CODES = {"svd": 0, "gram": 1, "gram+svd": 2}
_ROUTE_NAMES = {v: k for k, v in _ROUTE_CODES.items()}

def _exchange(found: List[_Layer], computed, ctx: _Dist, device) -> Dict[int, tuple]:
    """Broadcast every layer's result from its owner (rank ``index % world``) to all ranks.

    One flat buffer per (owner, dtype) for the weights and one float64 buffer per owner for the
    singular values and the route, so the number of collectives does not grow with the layers.
    """
    out = {}
    for owner in range(ctx.world):
        owned = [layer for layer in found if layer.index % ctx.world == owner]
        if not owned:
            continue
        src = ctx.src(owner)
        by_dtype: Dict[torch.dtype, List[_Layer]] = {}
        for layer in owned:
            by_dtype.setdefault(layer.weight.dtype, []).append(layer)
        news: Dict[int, torch.Tensor] = {}
        for wdtype, group in by_dtype.items():
            sizes = [layer.weight.numel() for layer in group]
            if owner == ctx.rank:
                buf = torch.cat([computed[layer.index][0].reshape(-1) for layer in group])
                buf = buf.to(device)
            else:
                buf = torch.empty(sum(sizes), dtype=wdtype, device=device)
            dist.broadcast(buf, src=src, group=ctx.group)
            for layer, part in zip(group, buf.split(sizes)):
                news[layer.index] = part.to(layer.weight.device).reshape(layer.weight.shape)
        counts = [layer.groups * min(layer.matrices().shape[1:]) for layer in owned]
        if owner == ctx.rank:
            parts = []
            for layer in owned:
                _, s, s_new, route = computed[layer.index]
                parts += [s, s_new, torch.tensor([float(_ROUTE_CODES[route])], dtype=torch.float64)]
            stats = torch.cat(parts).to(device)
        else:
            stats = torch.empty(sum(2 * c + 1 for c in counts), dtype=torch.float64, device=device)
        dist.broadcast(stats, src=src, group=ctx.group)
        stats = stats.cpu()
        pos = 0
        for layer, c in zip(owned, counts):
            s, s_new = stats[pos : pos + c], stats[pos + c : pos + 2 * c]
            route = _ROUTE_NAMES[int(stats[pos + 2 * c])]
            pos += 2 * c + 1
            out[layer.index] = (news[layer.index], s, s_new, route)
    return out
