"""Enumerate (item, cell) pairs of per-item boxes on a regular grid, in memory-bounded chunks.

Both the renderer (Gaussian footprints on the detector, D = 2) and the voxelizer (Gaussian
3-sigma boxes in a volume, D = 3) visit only the cells near each Gaussian. Every box is clipped
to the grid, boxes are laid end to end in one flat "pair index" space (cumsum of their cell
counts), and consecutive ranges of at most ``pair_budget`` pair indices are decoded into
(item, cell) with ``repeat_interleave`` and div/mod: no Python loop over items, and the memory
of one chunk is bounded even when a single box is larger than the budget.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def clip_boxes(lower: torch.Tensor, extent: torch.Tensor, grid_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of each box inside ``[0, grid_shape)``: (lower, extent) with extent >= 0."""
    upper_limit = torch.as_tensor(grid_shape, dtype=torch.int64, device=lower.device)
    lo = lower.clamp(min=0)
    hi = torch.minimum(lower + extent, upper_limit)
    hi = torch.maximum(hi, lo)
    return torch.minimum(lo, upper_limit), hi - lo


def box_pairs(lower: torch.Tensor, extent: torch.Tensor, grid_shape: tuple[int, ...],
              pair_budget: int, flat: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(item_index (P,) int64, cell (P, D) int32)`` chunks covering every cell of every
    clipped box, each chunk with at most ``pair_budget`` pairs.

    ``lower`` and ``extent`` are (N, D) integer boxes in the axis order of ``grid_shape`` (e.g.
    (row, col) or (z, y, x)); cells are enumerated with the last axis fastest, and the pairs of one
    item are consecutive. Cell coordinates are int32 (cheaper division, valid index tensors): the
    grid must have fewer than 2^31 cells. With ``flat`` the cell is yielded as its (P,) int64 index
    in the C-ordered flattened grid instead, which is what gathers and ``index_add_`` want and
    saves the per-axis work.
    """
    if lower.ndim != 2 or lower.shape != extent.shape or lower.shape[1] != len(grid_shape):
        raise ValueError(f"box lower {tuple(lower.shape)} and extent {tuple(extent.shape)} must be (N, {len(grid_shape)})")
    if pair_budget < 1:
        raise ValueError(f"pair_budget must be >= 1, got {pair_budget}")
    if math.prod(grid_shape) >= 2 ** 31:
        raise ValueError(f"grid {tuple(grid_shape)} has too many cells (>= 2^31)")
    lo, ext = clip_boxes(lower.to(torch.int64), extent.to(torch.int64), grid_shape)
    counts = ext.prod(dim=1)
    items = torch.nonzero(counts > 0).squeeze(1)
    if items.numel() == 0:
        return
    lo, ext, counts = lo[items], ext[items], counts[items]
    ends = torch.cumsum(counts, 0)
    begins = ends - counts
    total = int(ends[-1])
    device = ends.device
    dims = len(grid_shape)
    strides = [math.prod(grid_shape[axis + 1:]) for axis in range(dims)]
    # Per item, one contiguous column per quantity: 1-D index_select is the cheapest gather.
    extent_columns = [ext[:, axis].to(torch.int32).contiguous() for axis in range(dims)]
    if flat:
        base = (lo * torch.as_tensor(strides, dtype=torch.int64, device=device)).sum(dim=1)
    else:
        lower_columns = [lo[:, axis].to(torch.int32).contiguous() for axis in range(dims)]
    for start in range(0, total, pair_budget):
        stop = min(start + pair_budget, total)
        size = stop - start
        # Items overlapping pair indices [start, stop) of the end-to-end layout, and how many of
        # their pairs fall in it (only the first and last item can be cut).
        first = int(torch.searchsorted(ends, torch.tensor(start, device=device), right=True))
        last = int(torch.searchsorted(ends, torch.tensor(stop - 1, device=device), right=True)) + 1
        item_begins, item_ends = begins[first:last], ends[first:last]
        in_chunk = item_ends.clamp(max=stop) - item_begins.clamp(min=start)
        # Offset of a pair inside its item = position in chunk + (pairs of the item skipped by
        # earlier chunks) - (pairs of earlier items in this chunk).
        shift = ((start - item_begins).clamp(min=0) - (torch.cumsum(in_chunk, 0) - in_chunk)).to(torch.int32)
        # Index of each pair's item among items[first:last].
        local = torch.repeat_interleave(torch.arange(last - first, device=device), in_chunk, output_size=size)
        offset = torch.arange(size, device=device, dtype=torch.int32) + shift.index_select(0, local)
        if flat:
            cell = base[first:last].index_select(0, local)
            for axis in range(dims - 1, 0, -1):
                axis_extent = extent_columns[axis][first:last].index_select(0, local)
                quotient = torch.div(offset, axis_extent, rounding_mode="floor")
                remainder = offset - quotient * axis_extent
                cell += remainder if strides[axis] == 1 else remainder * strides[axis]
                offset = quotient
            cell += offset if strides[0] == 1 else offset.to(torch.int64) * strides[0]
            yield items[first:last].index_select(0, local), cell
            continue
        cells = []
        for axis in range(dims - 1, 0, -1):
            axis_extent = extent_columns[axis][first:last].index_select(0, local)
            quotient = torch.div(offset, axis_extent, rounding_mode="floor")
            cells.append(offset - quotient * axis_extent + lower_columns[axis][first:last].index_select(0, local))
            offset = quotient
        cells.append(offset + lower_columns[0][first:last].index_select(0, local))
        yield items[first:last].index_select(0, local), torch.stack(cells[::-1], dim=1)
