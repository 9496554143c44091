"""Training on several processes with ``torch.distributed``, as ``torchrun`` starts them.

``torchrun --nproc_per_node=N`` (and ``--nnodes``/``--rdzv-*`` across machines) starts N
copies of a command and tells each its place in the environment: ``RANK`` (0 to
``WORLD_SIZE - 1``), ``LOCAL_RANK`` (its GPU on its machine) and ``WORLD_SIZE``.
:func:`init_from_env` joins them in one process group: NCCL for CUDA tensors and gloo for
CPU tensors when there is a GPU, gloo alone on a CPU machine. Everything else in neonb asks
this module where it stands (:func:`rank`, :func:`world_size`, :func:`is_main`), so without
torchrun (or with one process) nothing changes: every function below is then a no-op or
returns what a single process would.

How neonb divides the work (:func:`neonb.engine.fit`): the network is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; each process draws its share of the
epoch's patches (:class:`neonb.engine.EpochSampler`); ``batch_size`` stays the effective
batch of one optimiser step, split evenly over the processes
(:func:`per_process_batch`); process 0 alone validates and writes the run folder.

Example:
    >>> init_from_env()  # under torchrun: joins the group; otherwise returns False
    False
    >>> world_size(), rank(), is_main()
    (1, 0, True)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from neonb.errors import ConfigError

TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits for the others at a collective call. Process 0 validates, writes
checkpoints and trains the staged AgeU-Net head alone while the others wait, so this is longer
than PyTorch's default (10 minutes for NCCL)."""


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes training together (1 without torchrun)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank, 0 to :func:`world_size` - 1 (0 without torchrun)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, set by torchrun; else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Whether torchrun (or another launcher) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group that torchrun's environment describes, once.

    The backend is ``"cpu:gloo,cuda:nccl"`` when CUDA is available (NCCL for the GPUs'
    gradients, gloo for the CPU-side messages), plain gloo otherwise; each process takes
    the GPU of its ``LOCAL_RANK``.

    Returns:
        Whether this process now trains with others (``False`` without torchrun, or with
        ``--nproc_per_node=1`` on one machine).
    """
    if not launched() or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
    return is_distributed()


def shutdown() -> None:
    """Leave the process group (if any), as every process should before it exits."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun with GPUs, else ``device``."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def per_process_batch(batch_size: int) -> int:
    """Patches each process draws per step, so that all together make ``batch_size``.

    ``batch_size`` is the effective batch of one optimiser step, whatever the number of
    processes: with the paper's batch of 2, two processes draw one patch each, average
    their gradients, and take the step one process would take with both patches
    (the learning rate is left as it is). A batch that does not divide evenly is refused.

    Raises:
        ConfigError: when ``batch_size`` is not a multiple of :func:`world_size`.
    """
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} cannot be split evenly over {world} processes: start at "
            f"most {batch_size} processes per run (or a divisor of {batch_size}), or set "
            "batch_size to a multiple of the number of processes (the effective batch of every "
            "step; the learning rate is not scaled for you)"
        )
    return batch_size // world


def barrier() -> None:
    """Wait until every process gets here (nothing without torchrun)."""
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """``obj`` as process 0 has it (any picklable object), on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_all(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the processes (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    total = sum(gather([float(v) for v in values]), [])
    n = len(values)
    return [sum(total[i::n]) for i in range(n)]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Let process 0 run the block first (writing what the others then read back)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def describe_process(device: torch.device) -> str:
    """``"host cuda:1 (NVIDIA H200)"``: where this process trains, for ``environment.json``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return f"{socket.gethostname()} {device}" + (f" ({name})" if name else "")
