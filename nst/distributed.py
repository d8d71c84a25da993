"""Data parallelism only through torchrun's environment (nanoGPT-style): RANK/WORLD_SIZE/LOCAL_RANK set means
we are one of N processes; rank 0 alone writes files and logs to MLflow."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device, dcfg) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (no-op for a single process), after checking that the launched world
    is the configured one (`dcfg`: config.distributed); on CUDA each rank takes its local GPU. Across nodes a rank
    waits `dcfg.peer_timeout_s` for the others (joining, and at any collective): a peer that fails before it joins
    is otherwise waited for torch's default 30 minutes (torchrun stops only the workers of its own node). Returns
    (Dist, the device this rank uses)."""
    check_world(dcfg.nnodes, dcfg.nproc_per_node)
    backend, timeout_s = dcfg.backend, dcfg.peer_timeout_s
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import datetime

        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend=("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend,
                                **kw)
    return Dist(rank, world, local), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def visible_gpus(device: str = "auto") -> int:
    """The GPUs a run on `device` (params.yaml's `device`) can use: 0 for cpu, or without CUDA."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def nproc(setting: int | str) -> int:
    """`distributed.nproc_per_node`: auto = the visible GPUs (1 without CUDA)."""
    return max(1, visible_gpus()) if setting == "auto" else int(setting)


def check_world(nnodes: int, nproc_setting: int | str) -> None:
    """Under torchrun, the launched world must be the configured one: a stage started by an outside launcher
    (srun, a PyTorchJob) with another number of processes would train another model than its fingerprint says."""
    if not under_torchrun():
        return
    from nst.errors import ConfigError

    want, got = nnodes * nproc(nproc_setting), int(os.environ["WORLD_SIZE"])
    if got != want:
        raise ConfigError(f"torchrun started WORLD_SIZE={got} processes, but distributed.nnodes x nproc_per_node = "
                          f"{nnodes} x {nproc(nproc_setting)} = {want}: launch {want} (or set distributed.* to the "
                          "launch), so the fingerprint describes what trains")
