"""The training loop: a run folder with checkpoints, a per-epoch log and exact resume.

:func:`fit` takes the network, loss, optimiser, scheduler and data loaders as
arguments (as MONAI's trainers do) and keeps everything it writes in one run folder
(as nnU-Net does):

==================== ============================================================
``config.yaml``      the resolved configuration passed in as ``config``
``environment.json`` versions, hardware, seed and start time (nnU-Net's ``debug.json``)
``log.tsv``          one row per epoch: loss, learning rate, timings, validation Dice
``checkpoint.pt``    everything needed to resume, rewritten after every epoch
``model_best.pt``    weights of the epoch with the best validation Dice (no BG)
==================== ============================================================

Every file is written under a temporary name and renamed, so an interrupted run
leaves the last complete version of each. :func:`fit` resumes from ``checkpoint.pt``
on its own, and on the CPU a resumed run reproduces the uninterrupted one bit for bit:
all randomness is a function of ``(seed, epoch)`` (see :func:`fit`).

Under ``torchrun`` (:mod:`neonb.distributed`) :func:`fit` trains with
DistributedDataParallel: each process draws its share of every batch from one order of
samples shared by all (:class:`EpochSampler`, whose patches are seeded per sample by
:class:`SeededSamples`, so that a patch does not depend on the process that draws it),
gradients are averaged over the processes, and process 0 alone validates and writes the
run folder. The effective batch is the one the loaders are built for
(:func:`neonb.distributed.per_process_batch`), so one process with batch 2 and two with
batch 1 take the same steps.

The paper's recipe (Richter & Fetit, 2022, §3.2.3) is :func:`sgd_nesterov` (SGD, lr
1e-2, Nesterov momentum 0.99, weight decay) with :func:`poly_scheduler` (learning rate
× ``(1 - epoch / epochs)^0.9``), validated after every epoch on patches of the
training patch size (§4.1.1), keeping the model with the best validation Dice.

Example:
    >>> model = build_model(cfg)
    >>> optimizer = sgd_nesterov(model.parameters())
    >>> train = make_loader(train_ds, batch_size=2, shuffle=True, seed=0, num_workers=4)
    >>> val = make_loader(val_ds, batch_size=2, shuffle=False, seed=0, num_workers=4)
    >>> log = fit(model, SegmentationLoss(), optimizer, train, val, epochs=60,
    ...           run_dir="runs/baseline", scheduler=poly_scheduler(optimizer, 60), config=cfg)
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pandas as pd
import torch
import yaml
from monai.data import DataLoader, MetaTensor
from monai.data.utils import set_rnd
from monai.inferers import SimpleInferer
from monai.metrics.utils import do_metric_reduction
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler, PolynomialLR
from torch.utils.data import Sampler
from tqdm import tqdm

from neonb import distributed
from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write
from neonb.inference import (
    SegmentationLogits,
    autocast,
    class_indices,
    default_segmentation_logits,
    resolve_device,
    use_amp,
)
from neonb.labels import NUM_CLASSES
from neonb.losses import SegmentationLoss
from neonb.metrics import class_column, dice_scores, tissue_indices
from neonb.models import HeadsAtOwnResolution, head_scales
from neonb.models import channels_last as to_channels_last

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
"""A collated batch: ``"image"`` (B, 2, X, Y, Z), ``"label"`` (B, 1, X, Y, Z), ids, ..."""

LossFn = Callable[[Any, Batch], torch.Tensor]
"""``loss_fn(model_output, batch)`` → scalar loss tensor."""

Inferer = Callable[[torch.Tensor, nn.Module], Any]
"""``inferer(inputs, network)`` → model output, as MONAI's :class:`~monai.inferers.Inferer`."""

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "model_best.pt"
LOG_FILE = "log.tsv"
CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"
CHECKPOINT_FORMAT = 1
"""Version of the ``checkpoint.pt`` layout."""

LOG_COLUMNS: list[str] = [
    "epoch",
    "train_loss",
    "lr",
    "epoch_time_s",
    "data_time_s",
    "val_dice",
    "val_dice_nobg",
]
"""Columns of ``log.tsv`` before the per-class ``dice_<short name>`` columns."""


def sgd_nesterov(
    params: Iterable[torch.Tensor] | Iterable[dict],
    lr: float = 1e-2,
    momentum: float = 0.99,
    weight_decay: float = 3e-5,
) -> torch.optim.SGD:
    """The paper's optimiser: SGD with Nesterov momentum (§3.2.3).

    Args:
        params: model parameters or parameter groups.
        lr: initial learning rate (paper: 1e-2; for AgeU-Net 1e-3, neonb's reading of the
            paper's "10e-3", §4.1.2).
        momentum: Nesterov momentum (paper: 0.99).
        weight_decay: L2 penalty. The paper uses weight decay without giving a value;
            3e-5 is nnU-Net's, whose recipe the paper follows, and the authors' public
            code's.

    Returns:
        A :class:`torch.optim.SGD` optimiser.
    """
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )


def poly_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, power: float = 0.9
) -> LRScheduler:
    """Polynomial decay stepped once per epoch: ``lr_e = lr_0 · (1 − e / epochs)^power``.

    Args:
        optimizer: the optimiser whose learning rate decays.
        epochs: total number of epochs (the learning rate would reach 0 after the last).
        power: exponent (paper: 0.9).

    Returns:
        A :class:`torch.optim.lr_scheduler.PolynomialLR`.

    Raises:
        ConfigError: if ``epochs`` is not a positive integer.
    """
    if int(epochs) != epochs or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    return PolynomialLR(optimizer, total_iters=int(epochs), power=power)


WORKER_THREADS = 2
"""Intra-op threads of each data-loading worker (PyTorch gives a worker one). On one thread
PyTorch convolves the elastic deformation's Gaussian along the first axis (a 79-105 voxel
kernel) through an im2col buffer: 3.8 GB and 3.2 s for a 2 x 128³ patch, against 0.9 GB and
1.9 s on two threads, where oneDNN does it (AMD EPYC, ``benchmarks/README.md``)."""

WORKER_START_METHOD = "forkserver"
"""How worker processes start. A worker forked from a process that has run OpenMP threads
deadlocks when it starts threads of its own; the fork server has never run any."""


def worker_init(worker_id: int) -> None:
    """Seed a worker's random transforms (MONAI's ``worker_init_fn``) and give it
    :data:`WORKER_THREADS` threads."""
    from monai.data.utils import worker_init_fn

    torch.set_num_threads(WORKER_THREADS)
    worker_init_fn(worker_id)


def _worker_context() -> Any:
    import multiprocessing

    context = multiprocessing.get_context(WORKER_START_METHOD)
    context.set_forkserver_preload(["torch", "monai", "neonb.transforms", "neonb.cache"])
    return context


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A MONAI DataLoader whose shuffling and augmentation :func:`fit` can reseed per epoch.

    The loader owns a :class:`torch.Generator` (seeded with ``seed``), which :func:`fit`
    reseeds with ``seed + epoch`` before every epoch. The generator decides the shuffle
    order and the base seed of the worker processes; :func:`worker_init` then seeds the
    random transforms in each worker from it (:func:`monai.data.utils.worker_init_fn`) and
    gives the worker :data:`WORKER_THREADS` threads. Workers are not persistent, so each
    epoch starts them afresh from that seed. With ``num_workers=0`` the transforms run
    in the main process and :func:`fit` reseeds them itself.

    Args:
        dataset: a dataset of dicts, e.g. :class:`monai.data.Dataset` with transforms.
        batch_size: items per batch (paper: 2).
        shuffle: shuffle the items every epoch (training) or not (validation).
        seed: seed of the loader's generator.
        num_workers: worker processes (0: load in the main process).
        **kwargs: more :class:`monai.data.DataLoader` arguments (``drop_last``, ...).

    Returns:
        The data loader.
    """
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    if num_workers > 0:
        kwargs.setdefault("worker_init_fn", worker_init)
        kwargs.setdefault("multiprocessing_context", _worker_context())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False,
        **kwargs,
    )


def sample_seed(seed: int, position: int) -> int:
    """The seed of the random transforms of the ``position``-th sample of an epoch.

    ``seed`` is the epoch's (``seed + epoch``); the result depends on nothing else, so a
    patch is the same whichever process or data-loading worker draws it.
    """
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(position)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """One order of samples per epoch, shared by every process; each takes its share.

    Epoch ``e`` draws ``num_samples`` dataset indices from a generator seeded with
    ``seed + e`` (concatenated permutations of ``range(n_items)``, as
    :class:`torch.utils.data.RandomSampler` draws them without replacement; in order when
    ``shuffle`` is off) and pads them, by repeating the first ones, to a multiple of
    ``world_size`` (so every process takes as many steps; PyTorch's
    :class:`~torch.utils.data.DistributedSampler` pads the same way). Process ``rank``
    takes the positions ``rank, rank + world_size, ...``: with a per-process batch ``b``,
    step ``k`` of all processes together covers the positions ``k·b·W`` to
    ``(k+1)·b·W - 1``, the batch one process with batch ``b·W`` draws at step ``k``.

    Each item is ``(sample_seed, index)`` (:func:`sample_seed` of the epoch's seed and the
    position), for :class:`SeededSamples` to seed the sample's random transforms.
    :func:`fit` calls :meth:`set_epoch` before every epoch.

    Args:
        n_items: the dataset's length.
        num_samples: samples per epoch (default ``n_items``).
        shuffle: draw a random order (training) or keep the dataset's.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank: this process's rank (default :func:`neonb.distributed.rank`).
        world_size: processes (default :func:`neonb.distributed.world_size`).
    """

    def __init__(
        self,
        n_items: int,
        num_samples: int | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.n_items = int(n_items)
        self.num_samples = self.n_items if num_samples is None else int(num_samples)
        if self.n_items < 1 or self.num_samples < 1:
            raise ConfigError(f"EpochSampler needs items and samples, got {n_items}, {num_samples}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.rank = distributed.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0-{self.world_size - 1}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch ``epoch`` (0-based) next."""
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        """The epoch's dataset indices, all processes together, padded."""
        n, total = self.n_items, self.num_samples
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            rounds = -(-total // n)
            order = [
                i for _ in range(rounds) for i in torch.randperm(n, generator=generator).tolist()
            ]
        else:
            order = [i % n for i in range(total)]
        order = order[:total]
        padded = -(-total // self.world_size) * self.world_size
        return order + order[: padded - total]

    def __iter__(self):
        seed = self.seed + self.epoch
        order = self.order()
        for position in range(self.rank, len(order), self.world_size):
            yield sample_seed(seed, position), order[position]

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset`` indexed by ``(seed, index)``: sample ``index`` with its random transforms
    seeded by ``seed`` (MONAI's :func:`~monai.data.utils.set_rnd` on the dataset's
    ``transform``), as :class:`EpochSampler` yields them.

    Plain integer indices give the sample as the dataset's transforms' current state does.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            seed, key = key
            set_rnd(getattr(self.dataset, "transform", self.dataset), int(seed))
        return self.dataset[key]


def log_columns(num_classes: int = NUM_CLASSES) -> list[str]:
    """All columns of ``log.tsv``: :data:`LOG_COLUMNS` then ``dice_<short name>`` per class."""
    return LOG_COLUMNS + [class_column(c) for c in range(num_classes)]


def environment_record(
    seed: int, device: torch.device, devices: Sequence[str] | None = None
) -> dict[str, Any]:
    """Versions, hardware and seed of a run, as written to ``environment.json``.

    ``world_size`` is the number of processes that train together (1 without torchrun) and
    ``devices`` says where each trains (:func:`neonb.distributed.describe_process`, in rank
    order; default: this process).
    """
    from neonb import __version__

    if devices is None:
        devices = [distributed.describe_process(device)]

    cuda = device.type == "cuda"
    return {
        "neonb": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if cuda else None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "world_size": len(devices),
        "devices": list(devices),
        "seed": seed,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- files


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _plain(obj: Any) -> Any:
    """``obj`` made of dicts, lists, strings and numbers only, for YAML and JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def write_run_info(
    run_dir: Path,
    config: Mapping[str, Any] | None,
    seed: int,
    device: torch.device,
    *,
    devices: Sequence[str] | None = None,
    resumed_after: int | None = None,
) -> None:
    """Write ``config.yaml`` and ``environment.json`` unless the run already has them.

    :func:`fit` calls this; so does any trainer that writes a run folder of its own
    (the staged AgeU-Net head, :mod:`neonb.ageunet`), so every run records the same.

    Args:
        run_dir: the run folder.
        config: the resolved configuration (``None``: no ``config.yaml``).
        seed: the run's seed.
        device: this process's device.
        devices: every process's device (:func:`environment_record`).
        resumed_after: when a run resumes after this many epochs, ``environment.json``
            (kept as the run started) gains an entry in its ``resumed`` list: the epoch,
            the processes and devices, the time.
    """
    env_path = run_dir / ENVIRONMENT_FILE
    if not env_path.exists():
        text = json.dumps(environment_record(seed, device, devices), indent=2)
        _atomic_text(text + "\n", env_path)
    elif resumed_after is not None:
        record = json.loads(env_path.read_text(encoding="utf-8"))
        now = environment_record(seed, device, devices)
        record.setdefault("resumed", []).append(
            {
                "after_epoch": resumed_after,
                **{key: now[key] for key in ("world_size", "devices", "neonb", "torch", "started")},
            }
        )
        _atomic_text(json.dumps(record, indent=2) + "\n", env_path)
    if config is None:
        return
    text = yaml.safe_dump(_plain(config), sort_keys=False)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        _atomic_text(text, config_path)
    elif config_path.read_text(encoding="utf-8") != text:
        warnings.warn(
            f"{config_path} differs from the config passed to fit(); keeping the file "
            "written when the run started",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- state


@dataclass
class _Run:
    """The fixed ingredients of a :func:`fit` call, shared by the epoch functions."""

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    train_loader: Iterable[Batch]
    val_loader: Iterable[Batch] | None
    epochs: int
    run_dir: Path
    device: torch.device
    amp: bool
    seed: int
    val_every: int
    reseed: Callable[[int], Any] | None
    extract: SegmentationLogits
    inferer: Inferer
    num_classes: int
    image_key: str
    label_key: str
    max_grad_norm: float | None
    deterministic: bool
    channels_last: bool
    progress: bool
    network: nn.Module
    """What trains: ``model``, or :func:`training_network`'s wrapper of it, in
    DistributedDataParallel under torchrun."""
    main: bool
    """Whether this process validates, writes the run folder and prints (rank 0)."""

    @property
    def columns(self) -> list[str]:
        """Columns of ``log.tsv``."""
        return log_columns(self.num_classes)


@dataclass
class _RunState:
    """What :func:`fit` carries from epoch to epoch and stores in ``checkpoint.pt``."""

    epochs_done: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    rows: list[dict[str, float | int]] = field(default_factory=list)


def _save_checkpoint(run: _Run, state: _RunState) -> None:
    """Write ``checkpoint.pt``: tensors and plain containers only (``weights_only`` safe)."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epochs_done,
        "seed": run.seed,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "log": state.rows,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
    }
    _atomic_save(checkpoint, run.run_dir / CHECKPOINT_FILE)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    seed: int,
    device: torch.device,
) -> _RunState:
    """Restore model, optimiser and scheduler from ``checkpoint.pt``; return the run state."""
    hint = "delete it, or give fit() a new run_dir, to start afresh"
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # any unpickling failure means a damaged or foreign file
        raise DataError(path, f"cannot be read as a neonb checkpoint ({err})", hint) from err
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise DataError(path, f"is not a neonb checkpoint of format {CHECKPOINT_FORMAT}", hint)
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint["scheduler"] is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise DataError(path, f"does not fit this model or optimiser ({err})", hint) from err
    if checkpoint["seed"] != seed:
        warnings.warn(
            f"{path} was written with seed {checkpoint['seed']}, resuming with seed {seed}: "
            "the run will not reproduce an uninterrupted one",
            RuntimeWarning,
            stacklevel=3,
        )
    return _RunState(
        epochs_done=int(checkpoint["epoch"]),
        best_score=float(checkpoint["best_score"]),
        best_epoch=int(checkpoint["best_epoch"]),
        rows=list(checkpoint["log"]),
    )


def _write_log(
    rows: list[dict[str, float | int]], columns: list[str], path: Path, *, write: bool = True
) -> pd.DataFrame:
    """The epoch rows as a frame, written to ``log.tsv`` atomically when ``write``."""
    log = pd.DataFrame(rows, columns=columns)
    if write:
        atomic_write(path, lambda tmp: log.to_csv(tmp, sep="\t", index=False, na_rep="nan"))
    return log


# --------------------------------------------------------------------------- epochs


def _say(message: str, progress: bool) -> None:
    """Log ``message``; also print it (above any progress bar) when ``progress`` is on."""
    logger.info(message)
    if progress:
        tqdm.write(message)


def _seed_epoch(run: _Run, seed: int) -> None:
    """Make this epoch's randomness a function of ``seed`` (already ``seed + epoch``).

    Seeds torch, numpy and random (:func:`monai.utils.set_determinism`, which also makes
    cuDNN deterministic), the loader's generator if it has one, its sampler's epoch if it
    has ``set_epoch`` (:class:`EpochSampler`), and the random transforms: through
    ``run.reseed`` if given, else with MONAI's :func:`~monai.data.utils.set_rnd` on the
    loader's dataset.
    """
    set_determinism(seed)
    if not run.deterministic:  # seeded, but let cuDNN pick its fastest kernels
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    loader, reseed = run.train_loader, run.reseed
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):  # EpochSampler, DistributedSampler
        set_epoch(seed - run.seed)
    if reseed is not None:
        reseed(seed)
    elif hasattr(loader, "dataset"):
        set_rnd(loader.dataset, seed)


def _to_device(
    batch: Batch, device: torch.device, channels_last_key: str | None = None
) -> dict[str, Any]:
    """The batch with its tensors on ``device``, MONAI metadata dropped; the 5-D tensor under
    ``channels_last_key`` (the network input, if given) in the channels-last 3D layout."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, MetaTensor):
            value = value.as_tensor()
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == channels_last_key and value.ndim == 5:
                value = value.contiguous(memory_format=torch.channels_last_3d)
        moved[key] = value
    return moved


def use_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """Whether :func:`fit` trains in the channels-last 3D layout: ``"auto"`` on the CPU only.

    On the CPU it makes the demo's training step about 1.2 times faster with the same results
    to float rounding (:func:`neonb.models.channels_last`, ``benchmarks/README.md``); on a GPU
    it has not been measured, so ``"auto"`` leaves it off there.

    Raises:
        ConfigError: if ``channels_last`` is not ``"auto"``, ``True`` or ``False``.
    """
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
    return channels_last is True or (channels_last == "auto" and device.type == "cpu")


def training_network(model: nn.Module, loss_fn: LossFn, low_res_heads: bool) -> nn.Module:
    """What :func:`fit` calls on a training batch: ``model``, or its heads at their own resolution.

    With ``low_res_heads``, a DynUNet with DynUNet's own ``forward``, deep supervision and
    heads coarser by powers of two (:func:`neonb.models.head_scales`), trained with a fused
    :class:`~neonb.losses.SegmentationLoss`, is wrapped in
    :class:`neonb.models.HeadsAtOwnResolution`: its lower heads are no longer upsampled and
    stacked, and the loss scores them as if they were (the same loss and gradients up to float
    rounding, because DynUNet upsamples by nearest neighbour). Any other network or loss (the
    AgeU-Net, whose ``forward`` is its own; a loss of the caller's), or
    ``low_res_heads=False``, gives ``model`` back.

    Raises:
        ConfigError: if ``low_res_heads`` is not ``True`` or ``False``.
    """
    if not isinstance(low_res_heads, bool):
        raise ConfigError(f"low_res_heads must be True or False, got {low_res_heads!r}")
    applies = (
        low_res_heads
        and isinstance(loss_fn, SegmentationLoss)
        and loss_fn.fused
        and HeadsAtOwnResolution.accepts(model)
        and head_scales(model) is not None
    )
    return HeadsAtOwnResolution(model) if applies else model


def _to_float(outputs: Any) -> Any:
    """Floating tensors in ``outputs`` (a tensor, tuple, list or dict of them) as float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Mapping):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list | tuple):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _batch_ids(batch: Batch) -> str:
    """The string identifiers in a batch, for error messages."""
    ids = [
        f"{k}={list(v)}"
        for k, v in batch.items()
        if isinstance(v, list | tuple) and v and isinstance(v[0], str)
    ]
    return ", ".join(ids) or "no ids"


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float]:
    """One pass over the training loader; returns (mean loss, seconds waiting for data)."""
    run.model.train()
    total, count, data_time = 0.0, 0, 0.0
    desc = f"epoch {epoch}/{run.epochs}"
    bar = tqdm(run.train_loader, desc=desc, leave=False, disable=not run.progress)
    tick = time.perf_counter()
    for step, raw in enumerate(bar):
        data_time += time.perf_counter() - tick
        batch = _to_device(raw, run.device, run.image_key if run.channels_last else None)
        run.optimizer.zero_grad(set_to_none=True)
        with autocast(run.amp, run.device):
            outputs = run.network(batch[run.image_key])
        loss = run.loss_fn(_to_float(outputs), batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss is {value} at epoch {epoch}, batch {step + 1} "
                f"({_batch_ids(raw)}); the checkpoint of the last complete epoch is kept"
            )
        loss.backward()
        if run.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(run.model.parameters(), run.max_grad_norm)
        run.optimizer.step()
        total, count = total + value, count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
        tick = time.perf_counter()
    if count == 0:
        raise ConfigError("the training loader yielded no batches")
    if distributed.is_distributed():  # the mean over processes of their batch losses
        total, count = distributed.sum_all([total, count])
    return total / count, data_time


def _validate(run: _Run, loader: Iterable[Batch]) -> torch.Tensor:
    """Dice per class of argmax(final head) vs label over the validation loader, ``(C,)``.

    :class:`neonb.metrics.ClassDiceMetric`'s scores and reduction, computed here without its
    buffer, which MONAI gathers from every process, while process 0 validates alone.
    """
    scores = []
    run.model.eval()
    with torch.no_grad():
        for raw in tqdm(loader, desc="validation", leave=False, disable=not run.progress):
            batch = _to_device(raw, run.device, run.image_key if run.channels_last else None)
            with autocast(run.amp, run.device):
                outputs = run.inferer(batch[run.image_key], run.model)
            logits = run.extract(outputs).float()
            predicted = class_indices(logits, dim=1, keepdim=True)
            scores.append(dice_scores(predicted, batch[run.label_key], run.num_classes))
    run.model.train()
    if not scores:
        return torch.full((run.num_classes,), float("nan"))
    mean, not_nans = do_metric_reduction(torch.cat(scores), "mean_batch")
    return mean.float().masked_fill(not_nans == 0, float("nan")).cpu()


def _epoch_row(
    epoch: int,
    loss: float,
    lr: float,
    times: tuple[float, float],
    dice: torch.Tensor | None,
    num_classes: int,
) -> dict[str, float | int]:
    """One ``log.tsv`` row of plain Python numbers (``NaN`` where not validated)."""
    if dice is None:
        dice = torch.full((num_classes,), float("nan"))
    tissue = dice[tissue_indices(num_classes)]
    row: dict[str, float | int] = {
        "epoch": epoch,
        "train_loss": loss,
        "lr": float(lr),
        "epoch_time_s": times[0],
        "data_time_s": times[1],
        "val_dice": float(torch.nanmean(dice)),
        "val_dice_nobg": float(torch.nanmean(tissue)),
    }
    row.update({class_column(c): float(dice[c]) for c in range(num_classes)})
    return row


def _check_fit_args(epochs: int, val_every: int, num_classes: int) -> None:
    """Raise :class:`ConfigError` for out-of-range arguments of :func:`fit`."""
    for name, value in (("epochs", epochs), ("val_every", val_every)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch] | None,
    *,
    epochs: int,
    run_dir: str | os.PathLike,
    scheduler: LRScheduler | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    val_every: int = 1,
    amp: bool | str = "auto",
    progress: bool = True,
    reseed: Callable[[int], Any] | None = None,
    segmentation_logits: SegmentationLogits | None = None,
    val_inferer: Inferer | None = None,
    num_classes: int = NUM_CLASSES,
    max_grad_norm: float | None = None,
    deterministic: bool = True,
    channels_last: bool | str = "auto",
    low_res_heads: bool = True,
    config: Mapping[str, Any] | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> pd.DataFrame:
    """Train a segmentation network, validating and checkpointing after every epoch.

    Each epoch: reseed (below); train over ``train_loader`` (progress bar with the
    running loss); step ``scheduler``; validate; append a row to ``log.tsv``; save
    ``model_best.pt`` if the validation Dice improved; save ``checkpoint.pt``.

    **Validation** (paper §4.1.1) runs the model in eval mode on the patches that
    ``val_loader`` yields, through ``val_inferer`` (default: the model called on the
    patch; pass a :class:`monai.inferers.SlidingWindowInferer` to validate whole
    volumes). The argmax of the final head is scored against ``batch[label_key]`` with
    :class:`neonb.metrics.ClassDiceMetric` (MONAI ``DiceMetric``, all ``num_classes``
    classes, background included): Dice per patch and class, ``NaN`` for a class absent
    from both prediction and label of a patch, averaged per class over the patches with
    ``NaN`` skipped. ``val_dice`` is the mean of the per-class values over all classes,
    ``val_dice_nobg`` over the tissue classes (all but the background labels 0 and 4);
    the best model is the one with the highest ``val_dice_nobg``.

    **Resume.** If ``run_dir/checkpoint.pt`` exists, model, optimiser, scheduler, best
    score and log are restored from it and training continues with the next epoch.
    On the CPU the result is bit-for-bit that of an uninterrupted run, because before
    epoch ``e`` (0-based) everything random is reseeded from ``seed + e``: torch, numpy
    and Python (:func:`monai.utils.set_determinism`), the train loader's
    ``generator`` if it has one (shuffle order and worker seeds; see
    :func:`make_loader`), and the random transforms: by calling ``reseed(seed + e)``
    if given (e.g. the training ``Compose``'s ``set_random_state``), else by MONAI's
    :func:`~monai.data.utils.set_rnd` on ``train_loader.dataset``. Build the loaders
    with :func:`make_loader` (or give a plain loader ``generator=`` and
    ``persistent_workers=False``). On CUDA, kernels are not all deterministic, so a
    resumed run matches only approximately.

    An exception in a batch (or a non-finite loss, raised as :class:`FloatingPointError`)
    stops training and leaves the files of the last complete epoch untouched.

    **Several processes** (``torchrun``, :func:`neonb.distributed.init_from_env`): the model
    is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (each process on
    ``cuda:LOCAL_RANK``, or the CPU with gloo), which averages the gradients of the
    processes before every optimiser step. Each process's training loader must draw its
    share of the batch (:func:`neonb.experiment.training_loader` builds it with
    :class:`EpochSampler`: ``config.batch_size`` divided by the number of processes, the
    learning rate unchanged, so the steps are those of one process with the whole batch).
    Process 0 alone validates, on the unwrapped model and all of ``val_loader``: the
    validation patches are few and cheap beside an epoch of training, its numbers are then
    exactly those of one process, and so is the choice of the best epoch. It alone writes
    the run folder and prints; the epoch's row is broadcast, so every process returns the
    same log. ``train_loss`` is the mean over the processes. Every process resumes from
    the same ``checkpoint.pt``, whose contents do not depend on the number of processes, so a
    run may resume with another number of them.

    Args:
        model: the network, e.g. MONAI ``DynUNet``; returns a tensor (or, in train mode
            with deep supervision, a stacked ``(B, H, C, X, Y, Z)`` tensor) or any
            structure ``loss_fn`` and ``segmentation_logits`` understand.
        loss_fn: ``loss_fn(outputs, batch)`` → scalar tensor; the outputs are cast
            to float32 first. If it has a ``set_epoch`` method, that is called with
            the 0-based epoch before each epoch (also after a resume).
        optimizer: e.g. :func:`sgd_nesterov`.
        train_loader: yields batches with ``image_key`` (B, 2, X, Y, Z) and whatever
            ``loss_fn`` reads.
        val_loader: yields batches with ``image_key`` and ``label_key``
            (B, 1, X, Y, Z) label maps; ``None`` skips validation (no best model).
        epochs: total number of epochs, counting those already done in ``run_dir``.
        run_dir: the run folder; made if missing.
        scheduler: stepped once per epoch, e.g. :func:`poly_scheduler`.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:1"``, ...;
            under torchrun a CUDA device is the process's ``cuda:LOCAL_RANK``.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        val_every: validate every this many epochs, and after the last one.
        amp: bf16 autocast of the forward pass on CUDA (``"auto"``/``True``) or not.
        progress: show progress bars and a line per epoch.
        reseed: called with ``seed + e`` before epoch ``e`` to reseed the training
            transforms (see above).
        segmentation_logits: picks the ``(B, C, X, Y, Z)`` logits from the model's
            eval-mode output; default
            :func:`neonb.inference.default_segmentation_logits` (head 0 of a stacked
            tensor). Needed for models that return a tuple or dict (AgeU-Net).
        val_inferer: ``val_inferer(inputs, model)`` → outputs; default
            :class:`monai.inferers.SimpleInferer`.
        num_classes: number of classes ``C`` (10 drawem9 classes).
        max_grad_norm: clip the gradient norm to this value (off by default; the paper
            does not clip).
        deterministic: keep cuDNN deterministic (MONAI's ``set_determinism``); ``False``
            turns on ``cudnn.benchmark`` for speed on a GPU, where runs are then not
            repeatable. Seeds are set either way; on the CPU this changes nothing.
        channels_last: train in the channels-last 3D layout (:func:`use_channels_last`:
            ``"auto"`` on the CPU): the model's weights are converted in place with
            :func:`neonb.models.channels_last` and each batch's ``image_key`` tensor before
            the forward pass. The same results up to float rounding; checkpoints are
            interchangeable with a run trained without it. The instance norms are replaced
            by :class:`neonb.models.InstanceNorm3dChannelsLast` (same function, parameters and
            state-dict keys), which keep the layout.
        low_res_heads: train a DynUNet's deep-supervision heads at their own resolution
            (:func:`training_network`), where the network and loss allow it: the same loss
            and gradients up to float rounding, without upsampling and stacking the heads.
        config: the resolved configuration, saved as ``config.yaml`` when the run starts.
        image_key: batch key of the network input.
        label_key: batch key of the validation label maps.

    Returns:
        The epoch log (the contents of ``log.tsv``): ``epoch`` (1-based), ``train_loss``
        (mean over batches), ``lr`` (during the epoch), ``epoch_time_s`` (training and
        validation), ``data_time_s`` (waiting for the loader), ``val_dice``,
        ``val_dice_nobg`` and ``dice_<short name>`` per class (:func:`log_columns`).

    Raises:
        ConfigError: for out-of-range arguments or an empty training loader.
        DataError: if ``run_dir`` holds a checkpoint that cannot be resumed.
        FloatingPointError: if the training loss becomes NaN or infinite.
    """
    _check_fit_args(epochs, val_every, num_classes)
    dev = distributed.process_device(resolve_device(device))
    model = model.to(dev)
    layout = use_channels_last(channels_last, dev)
    if layout:
        model = to_channels_last(model)
    network = training_network(model, loss_fn, low_res_heads)
    if distributed.is_distributed():
        network = DistributedDataParallel(network, device_ids=[dev] if dev.type == "cuda" else None)
    main = distributed.is_main()
    run = _Run(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        val_loader=val_loader,
        epochs=epochs,
        run_dir=Path(run_dir),
        device=dev,
        amp=use_amp(amp, dev),
        seed=seed,
        val_every=val_every,
        reseed=reseed,
        extract=segmentation_logits or default_segmentation_logits,
        inferer=val_inferer or SimpleInferer(),
        num_classes=num_classes,
        image_key=image_key,
        label_key=label_key,
        max_grad_norm=max_grad_norm,
        deterministic=deterministic,
        channels_last=layout,
        progress=progress and main,
        network=network,
        main=main,
    )
    state = _RunState()
    checkpoint_path = run.run_dir / CHECKPOINT_FILE
    resumed = checkpoint_path.exists()
    if resumed:  # every process restores the same state
        state = _load_checkpoint(checkpoint_path, model, optimizer, scheduler, seed, dev)
        _say(f"Resuming {run.run_dir} after epoch {state.epochs_done} of {epochs}.", run.progress)
    devices = distributed.gather(distributed.describe_process(dev))
    if main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        more = resumed and state.epochs_done < epochs
        write_run_info(
            run.run_dir,
            config,
            seed,
            dev,
            devices=devices,
            resumed_after=state.epochs_done if more else None,
        )
    log = _write_log(state.rows, run.columns, run.run_dir / LOG_FILE, write=main)
    for e in range(state.epochs_done, epochs):
        log = _run_epoch(run, state, e)
    distributed.barrier()  # the others read model_best.pt only once process 0 wrote it
    return log


def _run_epoch(run: _Run, state: _RunState, e: int) -> pd.DataFrame:
    """Epoch ``e`` (0-based) of :func:`fit`: train, validate, checkpoint and log."""
    start = time.perf_counter()
    _seed_epoch(run, run.seed + e)
    set_epoch = getattr(run.loss_fn, "set_epoch", None)
    if callable(set_epoch):  # e.g. an epoch-dependent loss weight (neonb.ageunet)
        set_epoch(e)
    lr = run.optimizer.param_groups[0]["lr"]
    loss, data_time = _train_epoch(run, e + 1)
    if run.scheduler is not None:
        run.scheduler.step()
    due = (e + 1) % run.val_every == 0 or e + 1 == run.epochs
    validate = run.main and run.val_loader is not None and due
    dice = _validate(run, run.val_loader) if validate else None  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    row = _epoch_row(e + 1, loss, lr, (elapsed, data_time), dice, run.num_classes)
    row = distributed.broadcast(row)  # process 0's validation and times, on every process
    state.rows.append(row)
    state.epochs_done = e + 1
    score = row["val_dice_nobg"]
    improved = not math.isnan(score) and score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, e + 1
    if run.main:
        if improved:
            _atomic_save(run.model.state_dict(), run.run_dir / BEST_MODEL_FILE)
        _save_checkpoint(run, state)  # before the log: a log of all epochs means finished
    log = _write_log(state.rows, run.columns, run.run_dir / LOG_FILE, write=run.main)
    _say(
        f"epoch {e + 1}/{run.epochs}: loss {loss:.4f}, val Dice {row['val_dice']:.4f} "
        f"(no BG {score:.4f}; best {state.best_score:.4f}, epoch {state.best_epoch}), "
        f"{elapsed:.1f} s",
        run.progress,
    )
    return log
