"""Benchmark the segmentation pipeline: training steps, data loading, memory and inference.

For each configuration (``demo``, ``paper``; any ``params/<name>/01_pipeline.yaml`` works) and
each device (the CPU, and a CUDA GPU when there is one) this measures

* the training step: forward pass, :func:`neonb.experiment.segmentation_loss` (Dice + CE over
  the deep-supervision heads), backward pass and optimiser step, median over timed steps
  after warm-up steps, on real batches from the training loader;
* data loading: the time to draw one batch from :func:`neonb.experiment.training_loader`
  (in the main process, ``num_workers=0``) built on a few synthetic subjects written with
  :func:`neonb.phantom.write_cohort` at the configuration's voxel size; the one-off cache fill
  (loading, cropping, normalising every volume) is reported apart;
* peak memory of the training steps: the process's peak resident set size (``VmHWM``,
  reset before the phase through ``/proc/self/clear_refs``) on the CPU, and
  ``torch.cuda.max_memory_allocated`` on a GPU;
* whole-volume inference: :func:`neonb.inference.predict_volume` on a 217 x 290 x 290
  two-channel volume (a normalised 0.5 mm synthetic subject, the dHCP grid) with the
  configuration's window and overlap. With ``--quick``, an inference that would take longer
  than two minutes is estimated instead (time per window x number of windows).

On a GPU both fp32 and bf16 autocast are measured, and the peak memory of each configuration
is compared with the 16 GB of the paper's NVIDIA T4.

With ``--ab`` it instead compares training steps side by side in one process: today's step
(``today``: the default memory layout and the per-head loss built on MONAI's
``MaskedDiceLoss``, as neonb trained before) against the step :func:`neonb.engine.fit` takes
now (``new``: :func:`neonb.models.channels_last` and the fused loss), and optionally each
lever alone (``--variants``). Every variant starts from the same weights and trains on the same
batches; the variants take turns step by step (the order rotating every round), so that a
machine shared with other work slows them alike, and the table gives the median step, its
ratio to the first variant and how far each variant's losses drift from the first's.

Usage:
    .venv/bin/python benchmarks/bench_pipeline.py                      # demo and paper
    .venv/bin/python benchmarks/bench_pipeline.py --configs demo --steps 10 --out demo.tsv
    .venv/bin/python benchmarks/bench_pipeline.py --quick              # estimate slow inference
    .venv/bin/python benchmarks/bench_pipeline.py --ab --configs demo --steps 20
    .venv/bin/python benchmarks/bench_pipeline.py --ab --variants today,fused_loss,\
        channels_last,channels_last_group_norm,new --configs demo --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices, set_rnd
from monai.utils import set_determinism
from torch import nn

from neonb.data import read_manifest, to_data_dicts
from neonb.engine import _to_float, training_network
from neonb.experiment import (
    TrainingConfig,
    build_optimizer,
    segmentation_loss,
    training_loader,
)
from neonb.inference import autocast, predict_volume
from neonb.losses import SegmentationLoss, deep_supervision_weights
from neonb.models import build_model, channels_last
from neonb.phantom import write_cohort
from neonb.study import load_params
from neonb.transforms import eval_transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
NOTEBOOK = "01_pipeline"

FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "demo": {
        "voxel_size": 1.5,
        "training": {
            "patch_size": [48, 48, 48],
            "batch_size": 2,
            "optimizer": "adamw",
            "learning_rate": 3e-3,
            "overlap": 0.25,
            "model": {
                "strides": [1, 2, 2, 2, 2],
                "filters": [8, 16, 32, 64, 128],
                "deep_supr_num": 2,
            },
        },
    },
    "paper": {
        "voxel_size": 0.5,
        "training": {
            "patch_size": [128, 128, 128],
            "batch_size": 2,
            "optimizer": "sgd",
            "learning_rate": 1e-2,
            "momentum": 0.99,
            "overlap": 0.5,
            "model": {"strides": [1, 2, 2, 2, 2, 2], "filters": None, "deep_supr_num": 2},
        },
    },
}
"""Used when ``params/<name>/01_pipeline.yaml`` is missing: the study's demo and paper runs."""

INFERENCE_VOXEL_SIZE = 0.5
"""The dHCP grid: a 0.5 mm synthetic subject is 217 x 290 x 290 voxels."""

T4_USABLE_BYTES = 15 * 2**30
"""What a 16 GB NVIDIA T4 offers (15360 MiB in ``nvidia-smi``), the paper's GPU."""

QUICK_INFERENCE_LIMIT_S = 120.0
"""With ``--quick``, inference estimated to take longer than this is estimated, not run."""

ESTIMATE_WINDOWS = 3
"""Windows timed (after one warm-up window) for the per-window inference time."""

MIN_DATA_BATCHES = 8
"""At least this many batches are drawn to time data loading."""

LARGE_PATCH_VOXELS = 96**3
"""On the CPU, configurations with patches this large default to fewer timed steps."""

GB = 1e9


@dataclass(frozen=True)
class AbSpec:
    """What an ``--ab`` variant changes.

    ``layout``: ``contiguous`` (PyTorch's default), ``channels_last``
    (:func:`neonb.models.channels_last`, channels-last inputs, PyTorch's instance norms),
    ``cl_norm`` (that, with :class:`neonb.models.InstanceNorm3dChannelsLast`, which keeps the
    layout) or ``group_norm`` (channels-last with one-group-per-channel group norms; measured,
    not kept). ``fused``: ``SegmentationLoss(fused=...)`` (``False``: the per-head MONAI-based
    loss neonb used before). ``low_res_heads``: the DynUNet's lower heads returned and scored
    at their own resolution (:func:`neonb.engine.training_network`). ``foreach``: AdamW/SGD's
    multi-tensor ``foreach`` step.
    """

    layout: str = "contiguous"
    fused: bool = False
    low_res_heads: bool = False
    foreach: bool = False


AB_VARIANTS: dict[str, AbSpec] = {
    "today": AbSpec(),
    "fused_loss": AbSpec(fused=True),
    "channels_last": AbSpec("channels_last"),
    "channels_last_group_norm": AbSpec("group_norm"),
    "before": AbSpec("channels_last", fused=True),
    "cl_norm": AbSpec("cl_norm", fused=True),
    "low_res_heads": AbSpec("channels_last", fused=True, low_res_heads=True),
    "foreach": AbSpec("channels_last", fused=True, foreach=True),
    "new": AbSpec("cl_norm", fused=True, low_res_heads=True),
}
"""``--ab`` variants. ``today``: the step of commit ``14e8d10``'s predecessor (default layout,
per-head loss); ``before``: what ``fit`` did after the first round of issue 16 (channels-last
and the fused loss, 1.2x); ``new``: what :func:`neonb.engine.fit` does now on the CPU; the
others one lever each (on top of ``before`` where they name no layout)."""

ENV_VARIABLES = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "ONEDNN_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
)
"""Environment variables that change CPU speed; the header prints those that are set."""


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to benchmark.

    Attributes:
        name: the configuration's name (``params/<name>``).
        training: the run's settings.
        voxel_size: voxel size in mm of the synthetic subjects its data loader reads.
        source: where the settings came from.
    """

    name: str
    training: TrainingConfig
    voxel_size: float
    source: str


@dataclass
class DataTiming:
    """Data-loading measurements of one configuration.

    Attributes:
        batches: the first batches drawn, plain tensors, to train on.
        seconds_per_batch: mean time to draw one batch.
        n_batches: number of batches timed.
        cache_fill_s: one-off time to build the loader and fill its cache.
    """

    batches: list[dict[str, torch.Tensor]]
    seconds_per_batch: float
    n_batches: int
    cache_fill_s: float


@dataclass
class Row:
    """One line of the results table: a configuration on one device at one precision."""

    config: str
    device: str
    precision: str
    patch: str
    batch: int
    step_s: float
    steps_per_s: float
    data_s_per_step: float
    cache_fill_s: float
    peak_mem_GB: float
    volume_infer_s: float
    infer_peak_GB: float
    volume_infer_estimated: bool
    volume_infer_est_s: float
    windows: int
    timed_steps: int
    warmup_steps: int
    data_batches: int
    peak_reserved_GB: float
    fits_T4: str


TABLE_COLUMNS = (
    "config",
    "device",
    "precision",
    "patch",
    "batch",
    "step_s",
    "steps_per_s",
    "data_s_per_step",
    "cache_fill_s",
    "peak_mem_GB",
    "volume_infer_s",
    "infer_peak_GB",
)
"""Columns of the printed table; the TSV file has every field of :class:`Row`."""


# =============================================================================================
# Configurations and data
# =============================================================================================


def load_bench_config(name: str, params_dir: Path = PARAMS_DIR) -> BenchConfig:
    """The settings of ``params/<name>/01_pipeline.yaml``, or the built-in ones if it is missing.

    The benchmark draws its own number of patches, so ``samples_per_volume`` is set later.

    Raises:
        SystemExit: for a name with neither a YAML file nor a built-in configuration.
    """
    params = load_params(params_dir / name, NOTEBOOK) if (params_dir / name).is_dir() else None
    if params is not None and "training" in params:
        source = f"params/{name}/{NOTEBOOK}.yaml"
        training, voxel_size = params["training"], params.get("voxel_size", 1.5)
    elif name in FALLBACK_CONFIGS:
        source = "built-in"
        training = FALLBACK_CONFIGS[name]["training"]
        voxel_size = FALLBACK_CONFIGS[name]["voxel_size"]
    else:
        raise SystemExit(f"unknown configuration {name!r}: no params/{name}/{NOTEBOOK}.yaml")
    values = {k: v for k, v in training.items() if k not in ("epochs", "device")}
    config = TrainingConfig.from_dict({**values, "num_workers": 0})
    return BenchConfig(name, config, float(voxel_size), source)


def synthetic_records(root: Path, n: int, voxel_size: float, seed: int) -> list[dict[str, Any]]:
    """MONAI data dicts of ``n`` synthetic sessions at ``voxel_size`` mm, written under ``root``.

    A complete cohort already there with the same parameters is reused.
    """
    folder = root / f"synthetic-n{n}-{voxel_size:g}mm-seed{seed}"
    started = time.perf_counter()
    write_cohort(folder, n=n, seed=seed, voxel_size=voxel_size, progress=False)
    say(f"cohort {folder.name}: ready in {time.perf_counter() - started:.1f} s")
    return to_data_dicts(read_manifest(folder, progress=False))


def inference_volume(record: dict[str, Any], cache: Path) -> Path:
    """Save the normalised two-channel volume of ``record`` (uncropped) as ``.npy``; its path."""
    path = cache / "inference_volume.npy"
    if not path.is_file():
        image = eval_transforms(crop=False)(record)["image"]
        np.save(path, np.asarray(_plain(image), dtype=np.float32))
    return path


def _plain(value: Any) -> Any:
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def _plain_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    keys = ("image", "label", "annotation")
    return {k: _plain(batch[k]).contiguous() for k in keys if k in batch}


def measure_data(
    records: Sequence[dict[str, Any]], config: TrainingConfig, n_batches: int, keep: int
) -> DataTiming:
    """Time drawing ``n_batches`` batches from the real training loader.

    Args:
        records: the sessions the loader reads.
        config: training settings; ``samples_per_volume`` is raised so that one pass of the
            loader holds ``n_batches`` batches.
        n_batches: batches to draw and time (the first includes starting the iterator).
        keep: how many of the batches to return for the training steps.
    """
    per_volume = math.ceil(n_batches * config.batch_size / len(records))
    config = config.replace(samples_per_volume=per_volume)
    set_determinism(config.seed)
    started = time.perf_counter()
    loader = training_loader(records, config)
    cache_fill_s = time.perf_counter() - started
    set_rnd(loader.dataset, config.seed)
    times, batches = [], []
    iterator = iter(loader)
    for _ in range(n_batches):
        tick = time.perf_counter()
        batch = next(iterator)
        times.append(time.perf_counter() - tick)
        if len(batches) < keep:
            batches.append(_plain_batch(batch))
    del iterator, loader
    return DataTiming(batches, statistics.fmean(times), n_batches, cache_fill_s)


# =============================================================================================
# Memory
# =============================================================================================


def reset_peak_memory(device: torch.device) -> bool:
    """Release freed memory and reset the peak counters; whether the host peak could be reset.

    The host peak is the kernel's high-water mark of the resident set (``VmHWM``), reset by
    writing 5 to ``/proc/self/clear_refs`` (Linux 4.0 and later). Where that fails, the peak
    read afterwards is the peak since the process started. (psutil has no peak RSS on Linux.)
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_peak_bytes() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(device: torch.device) -> tuple[float, float]:
    """Peak memory since :func:`reset_peak_memory`: ``(peak GB, reserved GB)``.

    On the CPU both are the host's peak RSS; on CUDA the allocated and the reserved peak of the
    caching allocator.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        return allocated / GB, reserved / GB
    peak = host_peak_bytes() / GB
    return peak, peak


# =============================================================================================
# Training and inference
# =============================================================================================


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int, device: torch.device, cudnn_benchmark: bool) -> None:
    """Seed torch, numpy and random as :func:`neonb.engine.fit` does (deterministic cuDNN).

    Args:
        seed: the seed.
        device: where the phase runs.
        cudnn_benchmark: let cuDNN pick its fastest kernels instead (not deterministic).
    """
    set_determinism(seed)
    if device.type == "cuda" and cudnn_benchmark:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    amp: bool,
    device: torch.device,
) -> float:
    """One optimisation step as in :func:`neonb.engine.fit`; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(amp, device):
        outputs = model(batch["image"])
    loss = loss_fn(_to_float(outputs), batch)  # a tensor, or the heads at their resolution
    value = float(loss.detach())
    loss.backward()
    optimizer.step()
    return value


def measure_training(
    bench: BenchConfig,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    amp: bool,
    warmup: int,
    steps: int,
    cudnn_benchmark: bool,
) -> tuple[list[float], float, float]:
    """Time ``steps`` training steps after ``warmup`` steps on ``batches`` (cycled).

    Returns:
        The step times in seconds, the peak memory (GB) and the peak reserved memory (GB).
    """
    seed_everything(bench.training.seed, device, cudnn_benchmark)
    reset_peak_memory(device)
    model = build_model(bench.training.model).to(device).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], bench.training)
    loss_fn = segmentation_loss(bench.training)
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
    times = []
    for step in range(warmup + steps):
        batch = on_device[step % len(on_device)]
        synchronize(device)
        tick = time.perf_counter()
        loss = train_step(model, loss_fn, optimizer, batch, amp, device)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - tick)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{bench.name}: training loss {loss} at step {step}")
        say(f"  step {step + 1}/{warmup + steps}: {time.perf_counter() - tick:.2f} s")
    peak, reserved = peak_memory(device)
    del model, optimizer, on_device
    return times, peak, reserved


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI's ``sliding_window_inference`` runs over ``shape``."""
    interval = [
        p if p == s else max(int(p * (1 - overlap)), 1) for s, p in zip(shape, patch, strict=True)
    ]
    return len(dense_patch_slices(tuple(shape), tuple(patch), interval))


def seconds_per_window(
    model: nn.Module, window: torch.Tensor, amp: bool, device: torch.device
) -> float:
    """Median time of one window's forward pass and softmax (after one warm-up window)."""
    times = []
    with torch.no_grad():
        for i in range(1 + ESTIMATE_WINDOWS):
            synchronize(device)
            tick = time.perf_counter()
            with autocast(amp, device):
                logits = model(window)
            torch.softmax(logits.float(), dim=1)
            synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - tick)
    return statistics.median(times)


def measure_inference(
    bench: BenchConfig,
    volume_path: Path,
    device: torch.device,
    amp: bool,
    quick: bool,
    cudnn_benchmark: bool,
) -> tuple[float, bool, float, float, int]:
    """Time sliding-window inference of the whole volume, or estimate it.

    A few windows are always timed first (they also warm up the device) to estimate the whole
    volume; with ``quick``, an estimate over :data:`QUICK_INFERENCE_LIMIT_S` is reported
    instead of running the volume.

    Returns:
        ``(seconds, estimated, estimate_s, peak GB, windows)``; the peak is ``nan`` when the
        volume was not run.
    """
    seed_everything(bench.training.seed, device, cudnn_benchmark)
    reset_peak_memory(device)
    volume = torch.from_numpy(np.load(volume_path))
    patch = bench.training.patch_size
    windows = count_windows(volume.shape[1:], patch, bench.training.overlap)
    model = build_model(bench.training.model).to(device).eval()
    window = volume[None, :, : patch[0], : patch[1], : patch[2]].to(device)
    estimate = seconds_per_window(model, window, amp, device) * windows
    say(f"  inference: {windows} windows, estimated {estimate:.1f} s")
    if quick and estimate > QUICK_INFERENCE_LIMIT_S:
        return estimate, True, estimate, math.nan, windows
    synchronize(device)
    tick = time.perf_counter()
    predict_volume(
        model,
        volume,
        patch_size=patch,
        overlap=bench.training.overlap,
        device=device,
        amp=amp,
    )
    synchronize(device)
    seconds = time.perf_counter() - tick
    peak, _ = peak_memory(device)
    return seconds, False, estimate, peak, windows


# =============================================================================================
# A/B: today's training step against the new one
# =============================================================================================


@dataclass
class Variant:
    """One ``--ab`` variant: what it trains, its optimiser and loss, and what its steps gave."""

    name: str
    model: nn.Module
    """The network called on each batch (the DynUNet, or the wrapper returning its heads)."""
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    batches: list[dict[str, torch.Tensor]]
    times: list[float]
    losses: list[float]


def build_variant(
    name: str, bench: BenchConfig, batches: Sequence[dict[str, torch.Tensor]]
) -> Variant:
    """The model (seeded as :func:`measure_training` seeds it), optimiser and loss of ``name``."""
    spec = AB_VARIANTS[name]
    seed_everything(bench.training.seed, torch.device("cpu"), cudnn_benchmark=False)
    model = build_model(bench.training.model).train()
    if spec.layout == "group_norm":
        swap_group_norms(model)
    if spec.layout != "contiguous":
        model = channels_last(model, instance_norms=spec.layout == "cl_norm")
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], bench.training)
    if spec.foreach:
        for group in optimizer.param_groups:
            group["foreach"] = True
    heads = 1 + bench.training.model.deep_supr_num if bench.training.model.deep_supervision else 1
    weights = deep_supervision_weights(heads)
    loss_fn = SegmentationLoss(weights, fused=spec.fused)
    network = training_network(model, loss_fn, spec.low_res_heads)
    own = []
    for batch in batches:
        own.append(dict(batch))
        if spec.layout != "contiguous":
            image = batch["image"].contiguous(memory_format=torch.channels_last_3d)
            own[-1]["image"] = image
    return Variant(name, network, optimizer, loss_fn, own, [], [])


def swap_group_norms(model: nn.Module) -> None:
    """Replace affine ``InstanceNorm3d`` layers by ``GroupNorm`` with one group per channel
    (the same function), holding the same parameters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.InstanceNorm3d and child.affine:
                norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps)
                norm.weight, norm.bias = child.weight, child.bias
                setattr(module, name, norm)


def measure_ab(
    bench: BenchConfig,
    batches: Sequence[dict[str, torch.Tensor]],
    names: Sequence[str],
    warmup: int,
    steps: int,
) -> list[Variant]:
    """Train every variant for ``warmup + steps`` steps, taking turns step by step.

    Round ``r`` trains each variant on batch ``r`` (cycled), starting with variant ``r mod n``
    so that none always runs first; only the steps after ``warmup`` are timed.
    """
    variants = [build_variant(name, bench, batches) for name in names]
    device = torch.device("cpu")
    for step in range(warmup + steps):
        shift = step % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            batch = variant.batches[step % len(variant.batches)]
            tick = time.perf_counter()
            loss = train_step(
                variant.model, variant.loss_fn, variant.optimizer, batch, False, device
            )
            seconds = time.perf_counter() - tick
            if not math.isfinite(loss):
                raise FloatingPointError(f"{variant.name}: training loss {loss} at step {step}")
            if step >= warmup:
                variant.times.append(seconds)
            variant.losses.append(loss)
        say(
            f"  round {step + 1}/{warmup + steps}: "
            + ", ".join(f"{v.name} {v.times[-1] if v.times else math.nan:.3f} s" for v in variants)
        )
    return variants


def format_ab(bench: BenchConfig, variants: Sequence[Variant]) -> str:
    """The A/B table: median step per variant, its ratio to the first, and the loss drift."""
    base = variants[0]
    base_s = statistics.median(base.times)
    rows = [["config", "variant", "step_s", "min_s", "max_s", "speedup", "max_loss_diff"]]
    for v in variants:
        median = statistics.median(v.times)
        drift = max(abs(a - b) for a, b in zip(v.losses, base.losses, strict=True))
        rows.append(
            [
                bench.name,
                v.name,
                f"{median:.3f}",
                f"{min(v.times):.3f}",
                f"{max(v.times):.3f}",
                f"{base_s / median:.2f}x",
                f"{drift:.1e}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = enumerate(zip(r, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in cells))
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"speedup: median step of {base.name} / median step of the variant; max_loss_diff: "
        f"largest |loss - {base.name}'s loss| over the {len(base.losses)} steps (same weights "
        "and batches)"
    )
    return "\n".join(lines)


def run_ab(bench: BenchConfig, records: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """Draw real batches for ``bench`` and compare the ``--variants`` on them (CPU)."""
    steps = args.steps or 10
    warmup = 1 if args.warmup is None else args.warmup
    keep = warmup + steps
    say(f"[{bench.name}] A/B: {keep} batches from {len(records)} subjects")
    data = measure_data(records, bench.training, max(keep, args.data_batches), keep)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    variants = measure_ab(bench, data.batches, names, warmup, steps)
    return format_ab(bench, variants)


# =============================================================================================
# The run
# =============================================================================================


def say(message: str) -> None:
    """Progress on stderr, so that stdout holds the header and the table only."""
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host_memory_gb() -> float:
    """Total memory of the machine in GB (``nan`` where it cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    return math.nan


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, or ``"n/a"``: other work skews the timings."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def hardware_header(devices: Sequence[torch.device]) -> list[str]:
    """Lines describing the machine and the software versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"CPU: {cpu_model()}, {cores} cores available ({os.cpu_count()} logical), "
        f"{host_memory_gb():.1f} GB RAM",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"MONAI {monai.__version__}, numpy {np.__version__}, Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        used = "benchmarked" if any(d.type == "cuda" for d in devices) else "not benchmarked"
        lines.append(
            f"GPU: {props.name}, {props.total_memory / GB:.1f} GB, CUDA {torch.version.cuda} "
            f"({used})"
        )
    else:
        lines.append("GPU: none (CPU only; fp32 vs bf16 and the 16 GB check need a GPU)")
    settings = [f"{k}={os.environ[k]}" for k in ENV_VARIABLES if k in os.environ]
    lines.append(f"environment: {' '.join(settings) or 'none of ' + ', '.join(ENV_VARIABLES)}")
    lines.append(
        f"load average at start: {load_average()} (timings assume an otherwise idle machine)"
    )
    if reset_peak_memory(torch.device("cpu")):
        lines.append("CPU peak memory: peak RSS of each phase (VmHWM, reset before it)")
    else:
        lines.append("CPU peak memory: peak RSS since the process started (cannot reset VmHWM)")
    return lines


def select_devices(choice: str) -> list[torch.device]:
    """The devices to benchmark for ``--device``.

    Raises:
        SystemExit: when ``cuda`` is asked for and no CUDA GPU is available.
    """
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit(
            "--device cuda: no CUDA GPU is available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "use --device cpu or auto"
        )
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])


def default_steps(bench: BenchConfig, device: torch.device) -> int:
    """Timed steps when ``--steps`` is not given: few on the CPU, more on a GPU."""
    if device.type == "cuda":
        return 20
    return 2 if math.prod(bench.training.patch_size) >= LARGE_PATCH_VOXELS else 5


def default_warmup(device: torch.device) -> int:
    """Untimed steps when ``--warmup`` is not given: cuDNN tries its kernels in the first ones."""
    return 3 if device.type == "cuda" else 1


def fits_t4(device: torch.device, reserved_gb: float) -> str:
    """``"yes"``/``"no"``: whether the peak reserved GPU memory fits a T4; ``""`` on the CPU."""
    if device.type != "cuda":
        return ""
    return "yes" if reserved_gb * GB <= T4_USABLE_BYTES else "no"


def bench_config(
    bench: BenchConfig,
    records: Sequence[dict[str, Any]],
    volume_path: Path,
    devices: Sequence[torch.device],
    args: argparse.Namespace,
) -> list[Row]:
    """Every measurement of one configuration, one row per device and precision."""
    steps = {d.type: args.steps or default_steps(bench, d) for d in devices}
    warmups = {
        d.type: args.warmup if args.warmup is not None else default_warmup(d) for d in devices
    }
    keep = max(warmups[d.type] + steps[d.type] for d in devices)
    n_data = max(keep, args.data_batches)
    say(f"[{bench.name}] data loading: {n_data} batches from {len(records)} subjects")
    data = measure_data(records, bench.training, n_data, keep)
    say(f"  {data.seconds_per_batch:.3f} s per batch, cache fill {data.cache_fill_s:.1f} s")
    rows = []
    for device in devices:
        for precision in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
            amp = precision == "bf16"
            say(f"[{bench.name}] {device.type} {precision}: training")
            times, peak, reserved = measure_training(
                bench,
                data.batches,
                device,
                amp,
                warmup=warmups[device.type],
                steps=steps[device.type],
                cudnn_benchmark=args.cudnn_benchmark,
            )
            inference = measure_inference(
                bench, volume_path, device, amp, args.quick, args.cudnn_benchmark
            )
            seconds, estimated, estimate, infer_peak, windows = inference
            step_s = statistics.median(times)
            rows.append(
                Row(
                    config=bench.name,
                    device=device.type,
                    precision=precision,
                    patch="x".join(str(p) for p in bench.training.patch_size),
                    batch=bench.training.batch_size,
                    step_s=step_s,
                    steps_per_s=1.0 / step_s,
                    data_s_per_step=data.seconds_per_batch,
                    cache_fill_s=data.cache_fill_s,
                    peak_mem_GB=peak,
                    volume_infer_s=seconds,
                    infer_peak_GB=infer_peak,
                    volume_infer_estimated=estimated,
                    volume_infer_est_s=estimate,
                    windows=windows,
                    timed_steps=len(times),
                    warmup_steps=warmups[device.type],
                    data_batches=data.n_batches,
                    peak_reserved_GB=reserved,
                    fits_T4=fits_t4(device, reserved),
                )
            )
    del data
    reset_peak_memory(torch.device("cpu"))
    return rows


def _cell(row: Row, column: str) -> str:
    value = getattr(row, column)
    if column == "volume_infer_s" and row.volume_infer_estimated:
        return f"~{value:.4g}"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The rows as a plain-text table, numbers right-aligned."""
    cells = [list(columns)] + [[_cell(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text_columns = {"config", "device", "precision", "patch"}
    lines = []
    for line in cells:
        parts = [
            cell.ljust(w) if name in text_columns else cell.rjust(w)
            for cell, w, name in zip(line, widths, columns, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def notes(rows: Sequence[Row]) -> list[str]:
    """Footnotes: windows per volume, estimates, and the T4 check on a GPU."""
    lines = []
    for row in rows:
        label = f"{row.config}/{row.device}/{row.precision}"
        infer = f"{row.windows} windows"
        if row.volume_infer_estimated:
            infer += (
                f"; volume_infer_s ~ = ESTIMATE (forward time per window x {row.windows}), "
                "the volume was not run (--quick), so infer_peak_GB is not measured"
            )
        lines.append(f"{label}: {row.timed_steps} timed steps after {row.warmup_steps}; {infer}")
        if row.device == "cuda":
            lines.append(
                f"{label}: peak GPU memory {row.peak_mem_GB:.2f} GB allocated, "
                f"{row.peak_reserved_GB:.2f} GB reserved; fits a 16 GB T4 "
                f"({T4_USABLE_BYTES / GB:.1f} GB usable): {row.fits_T4}"
            )
    return lines


def write_tsv(rows: Sequence[Row], path: Path) -> None:
    """Every field of every row, tab-separated, floats to 6 significant digits."""
    fields = list(asdict(rows[0])) if rows else list(TABLE_COLUMNS)
    lines = ["\t".join(fields)]
    for row in rows:
        values = asdict(row)
        lines.append(
            "\t".join(
                f"{values[f]:.6g}" if isinstance(values[f], float) else str(values[f])
                for f in fields
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description="Benchmark training steps, data loading, memory and whole-volume inference "
        "of the neonb segmentation pipeline.",
    )
    parser.add_argument(
        "--configs",
        default="demo,paper",
        help="comma-separated names of params/<name>/01_pipeline.yaml (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU, and the GPU when there is one (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed training steps (default: 5 on the CPU, 2 for patches of 96^3 or more, "
        "20 on a GPU)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 GPU)"
    )
    parser.add_argument(
        "--data-batches",
        type=int,
        default=MIN_DATA_BATCHES,
        help="batches drawn to time data loading, at least warm-up + steps (default: %(default)s)",
    )
    parser.add_argument(
        "--subjects", type=int, default=3, help="synthetic subjects per configuration (default: 3)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"estimate whole-volume inference that would take over "
        f"{QUICK_INFERENCE_LIMIT_S:.0f} s (time per window x windows) instead of running it",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick its fastest kernels (neonb trains with deterministic cuDNN)",
    )
    parser.add_argument("--out", type=Path, help="also write the table as TSV here")
    parser.add_argument(
        "--cohort-dir",
        type=Path,
        help="keep the synthetic cohorts here and reuse them (default: a temporary folder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and sampling")
    parser.add_argument(
        "--ab",
        action="store_true",
        help="compare training steps of --variants side by side on the CPU instead "
        "(default --steps 10)",
    )
    parser.add_argument(
        "--variants",
        default="today,new",
        help=f"comma-separated --ab variants, the first the reference; of {', '.join(AB_VARIANTS)} "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.variants.split(",") if n.strip() and n.strip() not in AB_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(AB_VARIANTS)}")
    for name in ("steps", "warmup", "data_batches", "subjects"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


@contextlib.contextmanager
def cohort_root(path: Path | None) -> Iterator[Path]:
    """``path`` (created), or a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="neonb-bench-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the header, the table and its notes."""
    started = time.perf_counter()
    args = parse_args(argv)
    devices = select_devices(args.device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    configs = [load_bench_config(n) for n in names]
    configs = [
        BenchConfig(c.name, c.training.replace(seed=args.seed), c.voxel_size, c.source)
        for c in configs
    ]
    header = hardware_header(devices)
    print("\n".join(header), flush=True)
    for c in configs:
        print(f"{c.name}: {c.source}, synthetic subjects at {c.voxel_size:g} mm", flush=True)
    if args.ab:
        with cohort_root(args.cohort_dir) as root:
            for bench in configs:
                records = synthetic_records(root, args.subjects, bench.voxel_size, args.seed)
                print()
                print(run_ab(bench, records, args), flush=True)
        print(f"load average at end: {load_average()}")
        print(f"total wall time: {time.perf_counter() - started:.0f} s")
        return 0
    rows: list[Row] = []
    with cohort_root(args.cohort_dir) as root:
        big = [c for c in configs if c.voxel_size == INFERENCE_VOXEL_SIZE]
        n_big = args.subjects if big else 1
        big_records = synthetic_records(root, n_big, INFERENCE_VOXEL_SIZE, args.seed)
        volume_path = inference_volume(big_records[0], root)
        for bench in configs:
            records = (
                big_records
                if bench.voxel_size == INFERENCE_VOXEL_SIZE
                else synthetic_records(root, args.subjects, bench.voxel_size, args.seed)
            )
            rows += bench_config(bench, records, volume_path, devices, args)
    print()
    print(format_table(rows))
    print()
    print("\n".join(notes(rows)))
    if args.out is not None:
        write_tsv(rows, args.out)
        print(f"TSV: {args.out}")
    print(f"load average at end: {load_average()}")
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
