"""Multi-process (multi-GPU, multi-node) DP training with torch.distributed, launched by torchrun.

Data parallelism for DP-SGD: every rank builds the same trainer (same seed, so the same model initialisation, the
same Poisson sampler state and the same noise generator) and draws the same Poisson sample of patients. Each rank
then computes the clipped per-patient gradients of its own shard of that sample (`shard`), the ranks sum those
sums and the loss/clip statistics (`all_reduce_sum`), and every rank adds the *same* noise (same generator
state) to the same total. The noise therefore enters exactly once per logical step, as in a single process, and
every rank takes the same optimiser step: the replicas stay identical (`assert_replicas_identical` checks it) and
the privacy guarantee and report are those of a single-process run.

Outside torchrun (no RANK / WORLD_SIZE in the environment) every function here is a no-op for one process, so the
trainer calls them unconditionally.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dpunet.utils.errors import DpunetError

T = TypeVar("T")

# Non-main ranks wait at a barrier while rank 0 validates (sliding-window prediction of every held-out case),
# which can take far longer than torch's default collective timeout (10 min for NCCL).
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistributedSetup:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str  # the device this rank trains on ("cuda:<LOCAL_RANK>" or "cpu")


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DpunetError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise DpunetError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistributedSetup | None:
    """Join the process group torchrun set up; None (nothing done) when not launched by torchrun.

    `device` is the requested device: "cuda..." gives backend NCCL and device cuda:<LOCAL_RANK> (one GPU per
    process), anything else gives backend gloo on the CPU.
    """
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise DpunetError("this PyTorch build has no torch.distributed; cannot train with torchrun")
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    if not (0 <= rank < world_size):
        raise DpunetError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DpunetError("--device cuda requested but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise DpunetError(f"LOCAL_RANK={local_rank} but this node has only {torch.cuda.device_count()} CUDA "
                              f"devices: use --nproc_per_node <= {torch.cuda.device_count()}")
        backend, device = "nccl", f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistributedSetup(rank, world_size, local_rank, backend, device)


def destroy_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that writes files (checkpoints, logs, report, validation)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _communication_device(default: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors (this rank's GPU); gloo takes the tensors where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of a sequence every rank holds identically: items[rank::world_size] (deterministic,
    sizes differ by at most one)."""
    return list(items)[rank()::world_size()]


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over all ranks, in place. Tensors are flattened into one buffer per (dtype, device), so a
    step costs one collective per buffer instead of one per parameter."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (_, device), group in groups.items():
        flat = torch.cat([t.reshape(-1) for t in group]).to(_communication_device(device))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def assert_replicas_identical(tensors: Sequence[Tensor], what: str) -> None:
    """Raise DpunetError on every rank if `tensors` differ between ranks.

    Cheap: one float64 checksum per tensor is gathered (exact comparison: every rank did the same operations on
    the same values, so the replicas must agree bit for bit)."""
    if not is_distributed() or not tensors:
        return
    device = _communication_device(tensors[0].device)
    sums = torch.stack([t.detach().to(device=device, dtype=torch.float64).sum() for t in tensors])
    gathered = [torch.empty_like(sums) for _ in range(world_size())]
    dist.all_gather(gathered, sums)
    for r, other in enumerate(gathered[1:], start=1):
        same = (other == gathered[0]) | (other.isnan() & gathered[0].isnan())
        if not bool(same.all()):
            worst = int((~same).nonzero()[0])
            raise DpunetError(f"distributed training: {what} differ between rank 0 and rank {r} (tensor {worst} of "
                              f"{len(tensors)}); the replicas diverged")


def broadcast_bytes(data: bytes) -> bytes:
    """Rank 0's `data` on every rank (the session's secret randomness key travels over the process group, never
    through a file). Every rank passes a buffer of the same length."""
    if not is_distributed():
        return data
    device = _communication_device(torch.device("cpu"))
    buffer = torch.tensor(list(data), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist())
