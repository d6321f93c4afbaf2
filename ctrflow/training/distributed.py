"""Data-parallel training on torch.distributed (DDP): the world a process runs in, the rows of a batch it trains on,
and launching `torchrun`.

    ctrflow train --nproc 2 --training-set ts --out model      # relaunches itself under torchrun (2 processes)
    torchrun --standalone --nproc-per-node 2 -m ctrflow.cli train --training-set ts --out model   # the same
    # Kubeflow PyTorchJob: every pod runs `python -m ctrflow.cli train ...`; the operator sets the env (ctrflow.kube)

A process started by a launcher (torchrun, the PyTorchJob operator: WORLD_SIZE > 1, RANK, MASTER_ADDR/PORT in its
environment) joins the process group with `init_from_env` (the CLI does that); the one `Trainer` then reads
`current()` and trains data-parallel:
- every rank holds the whole training set and walks the same seeded permutation as one process would; each global
  batch of `batch_size` rows is split by rank (`shard`: rows rank, rank + world, ...), so the ranks see disjoint
  rows and together exactly the rows one process sees (the deterministic equivalent of a DistributedSampler whose
  batch size is batch_size / world);
- the gradients are all-reduced by DistributedDataParallel (mean over ranks); each rank's loss is weighted by its
  share of the global batch (`loss_weight`), so the mean equals the gradient of the global batch's mean loss, as in
  one process, also for a last batch that does not divide evenly. The learning rate and batch size therefore mean
  what they mean in one process, and a checkpoint resumes with any number of processes (the world size is not in
  its fingerprint);
- rank 0 validates, and its record (and so the early-stopping decision) is broadcast to every rank; only rank 0
  writes checkpoints and artifacts. A resumed run reads the checkpoint on rank 0 and broadcasts it, so the ranks
  need no shared disk.

What is not the same as one process: dropout masks (each rank draws its own), batch statistics (BatchNorm, STAR's
partitioned normalisation, in-batch negatives) computed over a rank's rows only, and float summation order. Source:
PyTorch's DistributedDataParallel and torchrun (torch.distributed.run) documentation.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo",)  # the trainer keeps the model on the CPU: nccl (GPU tensors only) would need it on a device


@dataclass(frozen=True)
class World:
    """This process's place in the process group: rank in [0, size); size 1 when not distributed."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """The world of the initialised default process group, or a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched() -> bool:
    """True when a launcher (torchrun, a PyTorchJob) started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str = "gloo", timeout_s: float = 1800) -> World:
    """Join the process group the launcher's environment describes (env:// rendezvous: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); a no-op world of one when not launched. The group is destroyed at exit.

    Raises ValueError for a backend other than gloo (CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"train.backend must be one of {BACKENDS}, got '{backend}'")
    if not launched():
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        atexit.register(_destroy)
    world = current()
    log.info("data-parallel: rank %d of %d (%s)", world.rank, world.size, backend)
    return world


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: torch.Tensor, world: World) -> torch.Tensor:
    """The rows of a global batch this rank trains on: rows[rank::size] (disjoint, together all of them)."""
    return rows[world.rank :: world.size] if world.distributed else rows


def loss_weight(local_rows: int, global_rows: int, world: World) -> float:
    """The factor on a rank's mean loss that makes DDP's mean of the gradients equal the gradient of the global
    batch's mean loss: local_rows * size / global_rows (1 in one process or with equal shards)."""
    return local_rows * world.size / global_rows


def broadcast(obj: object, world: World, src: int = 0) -> object:
    """`obj` of rank `src` on every rank (pickled; small objects: records, checkpoints)."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(sums: Mapping[str, float], world: World) -> dict[str, float]:
    """Per-key sums over the ranks (every rank must pass the same keys)."""
    if not world.distributed:
        return dict(sums)
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def torchrun_command(nproc: int, module_args: Sequence[str], module: str = "ctrflow.cli") -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m <module> <args>`: N processes on this
    machine, rendezvous on a free local port."""
    if nproc < 1:
        raise ValueError(f"train.nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "-m", module, *module_args]  # fmt: skip


def launch(nproc: int, module_args: Sequence[str], module: str = "ctrflow.cli", threads: int | None = None) -> int:
    """Run `module_args` under torchrun with `nproc` local processes; returns torchrun's exit code (non-zero when a
    rank failed; torchrun then stops the others). `threads`: OMP_NUM_THREADS of each process (the trainer sets
    torch's threads from train.threads anyway; torchrun would otherwise set 1 and say so)."""
    cmd = torchrun_command(nproc, module_args, module)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, check=False, env=env).returncode
