"""Data-parallel fitting: `torchrun --nproc_per_node 2 -m mllmeraser fit` (gloo, on the CPU) writes the eraser a
single process writes, for the knn gate (gathered pooled features) and the paper gate (all-reduced Grams); the
sharding and gathering keep the single-process order; bad placements under torchrun are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import safetensors
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mllmeraser.core import distributed, steering
from mllmeraser.core.eraser import Eraser
from mllmeraser.errors import UserInputError


def _fit(command: list[str], args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    # One thread per process: two ranks on this 2-core machine would otherwise oversubscribe it, and the reference
    # uses the same kernels as the ranks, so any difference comes from the sharding and the reduction alone.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command, "fit", *args], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, time.perf_counter() - started


def _names(path) -> list[str]:
    with safetensors.safe_open(str(path), framework="pt") as reader:
        return list(reader.keys())


@pytest.mark.parametrize("gate", ["knn", "paper"])
def test_torchrun_fit_equals_the_single_process_fit(testbed_dir, tmp_path, gate):
    args = ["--model", str(testbed_dir / "model"), "--data", str(testbed_dir / "data"), "--forget", "forget_5",
            "--forget-ratio", "5", "--pgd-steps", "2", "--gate", gate,
            "--no-cache"]  # both runs compute the shared retain/erasure part: the ranks' reduction is what is tested
    single, single_s = _fit(["-m", "mllmeraser"], [*args, "--out", str(tmp_path / "single.safetensors")])
    ranks, ranks_s = _fit(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "mllmeraser"],
                          [*args, "--out", str(tmp_path / "ranks.safetensors")])
    assert ranks.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    one, two = Eraser.load(tmp_path / "single.safetensors"), Eraser.load(tmp_path / "ranks.safetensors")
    assert _names(tmp_path / "single.safetensors") == _names(tmp_path / "ranks.safetensors")
    diff = (one.r - two.r).abs().max().item()
    print(f"{gate}: max |r_1 - r_2| = {diff:.3g}; 1 process {single_s:.1f}s, 2 ranks {ranks_s:.1f}s")
    # measured: 0 (bit-identical) for both gates, the float64 sums' order change vanishing in the float32 r
    assert torch.allclose(one.r, two.r, rtol=1e-5, atol=1e-6)
    assert one.metadata["requests"][0]["counts"] == two.metadata["requests"][0]["counts"]
    assert one.metadata == two.metadata
    if gate == "paper":
        assert torch.allclose(one.u, two.u, rtol=1e-5, atol=1e-6)
    else:
        a, b = one.prompt_gate, two.prompt_gate
        for bank in ("forget_bank", "retain_bank"):  # float16, in the single-process row order
            assert getattr(a, bank).shape == getattr(b, bank).shape
            assert torch.allclose(getattr(a, bank).float(), getattr(b, bank).float(), atol=1e-3), bank
        assert torch.equal(a.forget_owner, b.forget_owner) and torch.equal(a.retain_owner, b.retain_owner)
        assert a.threshold == pytest.approx(b.threshold, abs=1e-6)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_batches", [0, 1, 4, 7])
def test_shard_then_reassemble_keeps_the_batch_order(size, num_batches):
    batches = [[2 * i, 2 * i + 1] for i in range(num_batches)]
    features = {tuple(b): torch.tensor([[float(i)] for i in b]) for b in batches}
    shards = [distributed.shard(batches, rank, size) for rank in range(size)]
    assert sorted(b for s in shards for b in s) == batches  # every batch on exactly one rank, whole
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # loads within one batch
    rows = distributed.reassemble([[features[tuple(b)] for b in s] for s in shards], num_batches)
    if num_batches == 0:
        assert rows is None
    else:
        assert rows[:, 0].tolist() == list(range(2 * num_batches))


def _reduce_and_gather(rank: int, size: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.manual_seed(0)
        acts = torch.randn(5, 6, 2, 3, dtype=torch.float64)  # 6 batches of 5 items, 2 layers, d = 3
        batches = [list(range(5 * i, 5 * i + 5)) for i in range(3)]  # 3 batches over 2 ranks: 2 and 1
        local = steering.SteeringStats(4, 3, (1, 3))
        for i in range(rank, 6, size):
            local.update("retain", acts[:, i])
        if rank == 0:  # only rank 0 sees forget items: rank 1 must still enter the Gram's all-reduce
            local.update("forget", acts[:, 0])
        distributed.all_reduce_stats(local, ("forget", "retain", "erasure"))
        whole = steering.SteeringStats(4, 3, (1, 3))
        for i in range(6):
            whole.update("retain", acts[:, i])
        whole.update("forget", acts[:, 0])
        assert local.counts == whole.counts and set(local.grams) == {"forget", "retain"}
        for group in ("forget", "retain"):
            assert torch.allclose(local.sums[group], whole.sums[group], rtol=1e-12, atol=1e-12)
            assert torch.allclose(local.grams[group], whole.grams[group], rtol=1e-12, atol=1e-12)
        mine = [torch.tensor(b, dtype=torch.float32)[:, None] for b in distributed.shard(batches, rank, size)]
        assert distributed.gather_rows(mine, batches)[:, 0].tolist() == list(range(15))
    finally:
        dist.destroy_process_group()


def test_all_reduce_and_gather_across_two_gloo_ranks(tmp_path):
    mp.spawn(_reduce_and_gather, args=(2, f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)


def test_placements_that_would_share_a_gpu_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="cuda:LOCAL_RANK"):
        distributed.init_from_env("cuda:1")
    with pytest.raises(UserInputError, match="device-map"):
        distributed.init_from_env(None, "auto")
    assert not dist.is_initialized() and distributed.world() == (0, 1)


def test_a_single_process_joins_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env(None) is None and distributed.init_from_env("cpu") == "cpu"
    assert not dist.is_initialized() and distributed.world() == (0, 1)
