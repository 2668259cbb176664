"""Data-parallel fitting under torchrun: which batches a rank runs, and how the ranks combine what they saw.

`torchrun --nproc_per_node P -m mllmeraser fit ...` starts P processes (ranks), each with the whole model.
Every `collection.collect` call shards its batches round-robin over the ranks and combines the results:

* the statistics are sums over items, n = sum_p n_p, s = sum_p s_p, G = sum_p G_p (`steering.SteeringStats`),
  so one all-reduce (SUM) of each rank's float64 counts, sums and Grams gives the single-process values
  up to the order of the float64 additions;
* the pooled prompt features a prompt gate keeps ([N, d] float32, one row per item) are gathered from every
  rank and put back in the single-process order (the concatenation over `models.batches`).

Whole batches are sharded, never single items: a batch's padding, and so every item's activations, are then
the ones a single process computes, and PGD, which perturbs each item by its own gradient, is unchanged.
Memory per rank is that of a single-process fit with fewer batches (the statistics do not grow with the data),
plus a temporary copy of one `collect` call's statistics (summed across ranks before it is merged), plus the
gathered features every rank holds for the gate, N x d float32, as a single process does.

With one process (torch.distributed not initialised) nothing here communicates, and `collection.collect` takes
its single-process path unchanged.
"""

from __future__ import annotations

import atexit
import os
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import UserInputError
from . import gating, steering


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) where torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = None, device_map: str | dict | None = None) -> str | None:
    """Join the process group torchrun describes (env WORLD_SIZE > 1) and return the device for this rank's model.

    Single process (WORLD_SIZE unset or 1): nothing is initialised and `device` comes back unchanged. Under
    torchrun: NCCL where the model goes on a GPU (`device` None with CUDA present, or a "cuda" device), each
    rank on cuda:LOCAL_RANK (returned, and made the current device, which NCCL's collectives use); gloo on
    the CPU. A GPU index in `device` or a `device_map` would put several ranks' models on the same GPUs: a
    UserInputError. The group is destroyed at exit.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise UserInputError(None, "WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device_map is not None:
        raise UserInputError(None, "--device-map cannot be combined with torchrun: each rank holds the whole model")
    target = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    if target.type == "cuda":
        if target.index is not None:
            raise UserInputError(None, f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; "
                                       "pass --device cuda or leave it out")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        device = f"cuda:{local_rank}"
    else:
        dist.init_process_group(backend="gloo")
    atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batches: Sequence[list[int]], rank: int | None = None, size: int | None = None) -> list[list[int]]:
    """This rank's batches: batch i goes to rank i % size (round-robin keeps the ranks' loads within one batch;
    whole batches keep each item's padding, hence its activations, identical to a single process)."""
    if rank is None or size is None:
        rank, size = world()
    return list(batches[rank::size])


def all_reduce_stats(stats: steering.SteeringStats, groups: Sequence[str] = steering.GROUPS) -> steering.SteeringStats:
    """Sum `stats` over every rank, in place: counts, sums, and the Grams of `groups` (every rank must pass
    the same `groups`; a rank that saw none of a group's items contributes a zero Gram, so every rank enters
    the same collectives). Grams that stay empty over all ranks are dropped, as a single process never
    allocates them. Sent per call: len(GROUPS) counts (int64), len(GROUPS) x L x d float64 sums, and
    L x d x d float64 per Gram, with L = len(stats.layers); the tensors stay on `stats.device` (a GPU under
    NCCL, the CPU under gloo)."""
    counts = torch.tensor([stats.counts[g] for g in steering.GROUPS], dtype=torch.int64, device=stats.device)
    dist.all_reduce(counts)
    stats.counts = dict(zip(steering.GROUPS, (int(c) for c in counts.tolist())))
    for group in steering.GROUPS:
        dist.all_reduce(stats.sums[group])
    for group in steering.GRAM_GROUPS:
        if group not in groups:
            continue
        if group not in stats.grams:
            d = stats.hidden_size
            stats.grams[group] = torch.zeros(len(stats.layers), d, d, dtype=torch.float64, device=stats.device)
        dist.all_reduce(stats.grams[group])
        if stats.counts[group] == 0:
            del stats.grams[group]
    return stats


def gather_rows(features_by_batch: Sequence[torch.Tensor], batches: Sequence[list[int]]) -> torch.Tensor | None:
    """Every rank's per-batch features [len(batch), d] (this rank's, in `shard(batches)` order) gathered and
    concatenated in the order of `batches`, the single-process order: [N, d] on the CPU, or None where there
    are no batches. Communicates with all_gather_object (pickled CPU tensors; NCCL sends them from the current
    GPU): N x d floats in all, every rank receiving all of them."""
    rank, size = world()
    mine = [f.detach().cpu() for f in features_by_batch]  # a pickled GPU tensor would unpickle on the sender's GPU
    expected = len(shard(batches, rank, size))
    if len(mine) != expected:
        raise ValueError(f"rank {rank} has {len(mine)} feature batches for its {expected} batches")
    everyone: list[list[torch.Tensor] | None] = [None] * size
    dist.all_gather_object(everyone, mine)
    return reassemble(everyone, len(batches))


def reassemble(per_rank: Sequence[Sequence[torch.Tensor]], num_batches: int) -> torch.Tensor | None:
    """Undo `shard`: batch i is rank (i % P)'s (i // P)-th, so the rows come back in batch order."""
    size = len(per_rank)
    ordered = [per_rank[i % size][i // size] for i in range(num_batches)]
    return gating.concat_features(ordered) if ordered else None  # segments: padded to one S
