"""The pool CWPS borrows rows from (the base and the versions trained before), and the
rewriting of pointers when a bundle keeps one version per task."""
from __future__ import annotations

import torch

from pipeline.core.delta import BASE_SOURCE, ChannelSelect, TaskDelta


def pool_rows(versions: dict[str, TaskDelta], pool: list[str], path: str, weight: torch.Tensor,
              bias: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None, list[str]]]:
    """(weight, bias, owner of every row) of ``base`` and every pool version at ``path``."""
    out = [(weight, bias, [BASE_SOURCE] * weight.shape[0])]
    for vid in pool:
        entry = versions[vid].entries.get(path)
        if not isinstance(entry, ChannelSelect):
            raise ValueError(f"pool version {vid!r} has no channel_select entry for {path!r} (another layer set?)")
        w, b = entry.resolve(weight, bias)
        pointers = iter(entry.pointers())
        out.append((w, b, [vid if own else next(pointers) for own in entry.mask.tolist()]))
    return out


def rebase(entry: ChannelSelect, kept: dict[str, str], versions: dict[str, TaskDelta], path: str) -> ChannelSelect:
    """``entry`` with pointers renamed from version ids to the tasks that kept them; a row of a
    version nobody kept is copied in as an own row."""
    channels = entry.mask.numel()
    rows, bias = entry.own(entry.rows.new_zeros(channels, *entry.rows.shape[1:]),
                           entry.bias.new_zeros(channels) if entry.bias is not None else None)
    mask, names = entry.mask.clone(), []
    for c, src in zip((~entry.mask).nonzero().flatten().tolist(), entry.pointers()):
        if src == BASE_SOURCE or src in kept:
            names.append(kept.get(src, src))
            continue
        owner = versions[src].entries[path]
        i = int(owner.mask[:c].sum())  # the owner's row of channel c among its own rows
        rows[c] = owner.rows[i]
        if bias is not None:
            bias[c] = owner.bias[i]
        mask[c] = True
    sources = [BASE_SOURCE, *sorted(set(names) - {BASE_SOURCE})]
    return ChannelSelect(mask, rows[mask], pointer_tensor(names, sources), sources,
                         bias[mask] if bias is not None else None)


def pointer_tensor(pointers: list[str], sources: list[str]) -> torch.Tensor:
    """Each pointer as its index in ``sources`` (uint8 up to 256 sources)."""
    index = {s: i for i, s in enumerate(sources)}
    dtype = torch.uint8 if len(sources) <= 256 else torch.int32
    return torch.tensor([index[p] for p in pointers], dtype=dtype)
