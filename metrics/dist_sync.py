"""DDP sync of list states when ranks updated a different number of times, or not at all.

torchmetrics gathers a list state element by element (one collective per list entry) when its
reduction is ``None`` (KID's feature lists), and stands in a 1-D float ``tensor([])`` for an
empty ``cat`` list. Ranks whose lists differ in length then fall out of step — KID silently
mixes up features or the gather fails — and an empty rank's ``tensor([])`` cannot be gathered
with the others' ``[N, ...]`` tensors. Both happen whenever an evaluation set is unevenly spread
over ranks. This mixin makes every rank's list exactly one tensor first, an empty rank's with
the shape and dtype the other ranks hold (learnt with one small object all-gather per state).
"""

from __future__ import annotations

import torch
from torchmetrics.utilities.data import dim_zero_cat


class EmptyRankSafeSync:
    """Mix into a ``torchmetrics.Metric`` subclass (before ``Metric`` in the bases)."""

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            group = process_group or self.process_group
            for attr, reduction in self._reductions.items():
                value = getattr(self, attr)
                if not isinstance(value, list) or reduction not in (dim_zero_cat, None):
                    continue
                local = dim_zero_cat(value) if value else None
                mine = None if local is None else (tuple(local.shape[1:]), local.dtype)
                every = [None] * torch.distributed.get_world_size(group)
                torch.distributed.all_gather_object(every, mine, group=group)
                known = next((s for s in every if s is not None), None)
                if local is None and known is not None:
                    shape, dtype = known
                    local = torch.zeros((0, *shape), dtype=dtype, device=self.device)
                setattr(self, attr, [] if local is None else [local])
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)
