"""A batch's items split into micro-batches: every input is per item along dim 0 except the pixel values,
whose rows per item come from the image layout (one row per item for LLaVA, image_grid_thw[i].prod() flattened
patches for Qwen-VL). PGD runs its forwards and backwards on these (pgd.py): a micro-batch's loss is divided
by the whole batch's answer-token count, so splitting changes the peak memory and nothing else.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pixel_offsets(inputs: dict[str, torch.Tensor], batch: int, num_pixel_rows: int) -> list[int]:
    """Item i's pixel-value rows are offsets[i]:offsets[i + 1]: one image per item, either a row each
    ([batch, C, H, W], LLaVA) or image_grid_thw[i].prod() flattened patches each (Qwen-VL)."""
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        offsets = [0] + torch.cumsum(grid.prod(dim=-1), 0).tolist()
    elif num_pixel_rows == batch:
        offsets = list(range(batch + 1))
    else:
        raise ValueError(f"cannot split {num_pixel_rows} pixel-value rows among {batch} items")
    if len(offsets) != batch + 1 or offsets[-1] != num_pixel_rows:
        raise ValueError(f"pixel values hold {num_pixel_rows} rows, the image grid {offsets[-1]} in "
                         f"{len(offsets) - 1} images, for {batch} items")
    return offsets


def micro_batches(inputs: dict[str, torch.Tensor], batch: int, offsets: list[int], size: int,
                   ids: Sequence[int] | None = None) -> list[tuple[slice | torch.Tensor, slice | torch.Tensor, dict]]:
    """(item rows, pixel-value rows, the other inputs of those items) per micro-batch of `size` of the items
    `ids` (default all, in order). Rows are slices where the micro-batch's items are consecutive, index
    tensors otherwise. Every input is per item along dim 0 except the pixel values (see pixel_offsets)."""
    ids = list(range(batch)) if ids is None else list(ids)
    parts = []
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        if chunk == list(range(chunk[0], chunk[-1] + 1)):
            rows, pixels = slice(chunk[0], chunk[-1] + 1), slice(offsets[chunk[0]], offsets[chunk[-1] + 1])
        else:
            rows = torch.tensor(chunk)
            pixels = torch.tensor([p for i in chunk for p in range(offsets[i], offsets[i + 1])])
        part = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if value.shape[0] != batch:
                    raise ValueError(f"input {key!r} has {value.shape[0]} rows, not one per item ({batch})")
                value = value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]
            part[key] = value
        parts.append((rows, pixels, part))
    return parts
