"""Sliding-window prediction of whole volumes, and NIfTI output.

The network is trained on patches (128³ in the paper), so a whole scan is segmented
as in Richter & Fetit (2022, §3.2.5): the volume is divided into overlapping windows of
the training patch size, each window's softmax probabilities are computed, and the
probabilities of overlapping windows are averaged voxel by voxel (MONAI's
:func:`~monai.inferers.sliding_window_inference` with ``mode="constant"``). The label
map is the argmax; no post-processing follows. Volumes smaller than a window are
padded by MONAI and the output is cropped back, so the output always has the input's
spatial shape.

This is the one inference path of neonb: ``neonb segment``
(:func:`neonb.segmentation.segment_scan`) and the study's evaluation
(:func:`neonb.experiment.evaluate`, :func:`~neonb.experiment.evaluate_dice`) both call
:func:`segment`. Windows are placed over the head's bounding box only, run under
:func:`torch.inference_mode`; ``neonb segment`` also runs them in bf16 where that is
native (``amp="native"``: CUDA, CPUs with AVX-512 BF16 or AMX; :func:`use_inference_amp`)
and several small windows per pass (:func:`default_sw_batch_size`), which the study's
evaluation can ask for too; ``benchmarks/README.md`` measures each of these levers, and the
channels-last memory format, which is left off. :func:`predict_foreground` also averages the
probabilities over flipped copies of the image (test-time augmentation, ``neonb segment
--tta``), and :func:`normalised_entropy` turns them into a per-voxel uncertainty in [0, 1].

Example:
    >>> model = load_weights(build_model(cfg), "runs/baseline/model_best.pt")
    >>> labels = segment(model, image, patch_size=(128, 128, 128))   # image (2, X, Y, Z)
    >>> save_segmentation(labels, "sub-1_T2w.nii.gz", "sub-1_desc-neonb_dseg.nii.gz")
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.utils import convert_to_tensor
from torch import nn

from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write

SegmentationLogits = Callable[[Any], torch.Tensor]
"""Takes a model's raw output and returns segmentation logits ``(B, C, X, Y, Z)``."""

SW_BATCH_VOXELS: int = 8 * 48**3
"""Voxels of the windows that go through the network at once by default: 8 of the demo's 48³
windows (3.5 times as fast as one at a time on 2 CPU cores, ``benchmarks/README.md``), one
of the paper's 128³ windows (whose activations take about 4 GB in fp32)."""

NIFTI_LABEL_INTENT: str = "label"
"""NIfTI intent of a label map (code 1002), so viewers show it as classes."""


def default_segmentation_logits(outputs: Any) -> torch.Tensor:
    """Default extraction of segmentation logits from a model's output.

    Args:
        outputs: a ``(B, C, X, Y, Z)`` tensor (DynUNet in eval mode) or a stacked
            deep-supervision tensor ``(B, H, C, X, Y, Z)`` (DynUNet in train mode),
            whose head 0 is the final full-resolution output.

    Returns:
        Logits, shape ``(B, C, X, Y, Z)``.

    Raises:
        ConfigError: for any other output (a tuple or dict from a multi-task model,
            say); pass a ``segmentation_logits`` function that picks the logits.
    """
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 6:
        return outputs[:, 0]
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 5:
        return outputs
    found = type(outputs).__name__
    if isinstance(outputs, torch.Tensor):
        found = f"a tensor of shape {tuple(outputs.shape)}"
    raise ConfigError(
        "the model output must be a (B, C, X, Y, Z) or (B, H, C, X, Y, Z) tensor, "
        f"found {found} (pass segmentation_logits= to pick the logits from it)"
    )


def class_indices(scores: torch.Tensor, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    """Index of the highest score along the class axis: ``scores.argmax(dim)``, faster.

    The same indices as :meth:`torch.Tensor.argmax` (the first maximum on ties), taken from
    :func:`torch.max`, whose CPU reduction over an outer axis is far faster in torch 2.13:
    the 10 classes of a 64 × 88 × 88 volume in 6.6 ms against 91 ms (AVX2, 2 threads).

    Args:
        scores: probabilities or logits, e.g. ``(C, X, Y, Z)`` (``dim=0``) or
            ``(B, C, X, Y, Z)`` (``dim=1``).
        dim: the class axis.
        keepdim: keep it, with size 1.

    Returns:
        int64 class indices, the shape of ``scores`` without (or with size 1 at) ``dim``.
    """
    return scores.max(dim=dim, keepdim=keepdim).indices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else → ``torch.device(device)``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_hardware(device: str | torch.device = "auto") -> str:
    """What a run on ``device`` computes on, for the headings of result tables.

    Example:
        >>> describe_hardware("cpu")  # doctest: +SKIP
        'CPU (x86_64), 2 threads'
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}), {threads} thread{'s' * (threads != 1)}"


def use_amp(amp: bool | str, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: only on CUDA, and when ``amp`` is ``"auto"``/``True``.

    Raises:
        ConfigError: if ``amp`` is not ``"auto"``, ``True`` or ``False``.
    """
    if amp not in ("auto", True, False):
        raise ConfigError(f"amp must be 'auto', True or False, got {amp!r}")
    return device.type == "cuda" and amp in ("auto", True)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX instructions).

    Where it does, oneDNN's bf16 convolutions do about twice the work per cycle of fp32;
    elsewhere bf16 is emulated and slower than fp32. Both the CPU and oneDNN must agree:
    oneDNN held to a lower instruction set (``ONEDNN_MAX_CPU_ISA=AVX2``) has no bf16
    convolution, and PyTorch then falls back to its naive one, several times slower than
    fp32 (seen in a demo run under ``ONEDNN_MAX_CPU_ISA=AVX2`` on a CPU with AVX-512 BF16).
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu = any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return cpu and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_inference_amp(amp: bool | str, device: torch.device) -> bool:
    """Whether inference runs under bf16 autocast.

    ``True``: on any CUDA device or CPU. ``"auto"``: on CUDA only, as in training
    (:func:`use_amp`), so the study's results on a CPU stay fp32. ``"native"``: on CUDA, and
    on a CPU that computes bf16 natively (:func:`cpu_has_native_bf16`), where a window of
    the paper's network takes a quarter to a half of the fp32 time and the labels stay
    within Dice 0.999 of fp32 (``benchmarks/README.md``); ``neonb segment``'s default.
    ``False``: fp32.

    Raises:
        ConfigError: if ``amp`` is not ``"auto"``, ``"native"``, ``True`` or ``False``.
    """
    if amp not in ("auto", "native", True, False):
        raise ConfigError(f"amp must be 'auto', 'native', True or False, got {amp!r}")
    if device.type not in ("cuda", "cpu") or amp is False:
        return False
    if amp == "native":
        return device.type == "cuda" or cpu_has_native_bf16()
    return amp is True or device.type == "cuda"


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CUDA or CPU) when ``enabled``, else a no-op context."""
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_sw_batch_size(patch_size: Sequence[int]) -> int:
    """Windows per forward pass: as many as fit :data:`SW_BATCH_VOXELS`, at least one.

    Example:
        >>> default_sw_batch_size((48, 48, 48)), default_sw_batch_size((128, 128, 128))
        (8, 1)
    """
    return max(1, SW_BATCH_VOXELS // math.prod(int(n) for n in patch_size))


BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
"""Where the windows run: ``"torch"`` (PyTorch, any device), ``"openvino"`` (the network
compiled by OpenVINO for the CPU, :class:`OpenVINONetwork`) or ``"auto"`` (OpenVINO for a
plain segmentation network on the CPU when the package is installed, else PyTorch)."""


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: torch.device, model: nn.Module | None = None) -> str:
    """``"torch"`` or ``"openvino"``: the backend ``backend`` means here (:data:`BACKENDS`).

    ``"auto"`` picks OpenVINO on the CPU for a MONAI ``DynUNet`` (an AgeU-Net, whose output is
    a dict, stays on PyTorch) when ``openvino`` is installed; PyTorch otherwise.

    Raises:
        ConfigError: for an unknown backend, or ``"openvino"`` where it cannot run (not the
            CPU, the package missing, a model with more than one output).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return "torch"
    from monai.networks.nets import DynUNet

    plain = model is None or (isinstance(model, DynUNet) and type(model).forward is DynUNet.forward)
    usable = device.type == "cpu" and plain and openvino_available()
    if backend == "auto":
        return "openvino" if usable else "torch"
    if device.type != "cpu":
        raise ConfigError(f"backend 'openvino' runs on the CPU; the device is {device}")
    if not plain:
        raise ConfigError(
            f"backend 'openvino' takes a plain segmentation network (a DynUNet); "
            f"{type(model).__name__} has another output: use backend 'torch'"
        )
    if not openvino_available():
        raise ConfigError("backend 'openvino' needs the openvino package: pip install openvino")
    return "openvino"


def _smallest_input(model: nn.Module, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The smallest input a DynUNet takes (two voxels at its bottleneck), at most ``patch_size``."""
    strides = getattr(model, "strides", None)
    if not strides:
        return tuple(int(n) for n in patch_size)
    factor = np.ones(3, dtype=int)
    for stride in strides:
        factor *= np.broadcast_to(np.asarray(stride, dtype=int), (3,))
    return tuple(min(int(n), 2 * int(f)) for n, f in zip(patch_size, factor, strict=True))


def _in_channels(model: nn.Module) -> int:
    """Input channels of ``model``: those of its first 5-D weight."""
    for parameter in model.parameters():
        if parameter.ndim == 5:
            return int(parameter.shape[1])
    raise ConfigError(f"{type(model).__name__} has no 3-D convolution to read its input channels")


@functools.cache
def openvino_core() -> Any:
    """The process's one :class:`openvino.Core`, made on first use and kept until exit.

    OpenVINO's CPU plugin gives the calling thread an alternate signal stack of its own on
    Linux (room for the AMX state in a signal frame) and swaps it with the one there before
    (``strace``: ``sigaltstack`` calls of 20144 bytes). With a ``Core`` made for every
    compiled network, one pytest process running the whole suite with every ``backend`` on
    ``"auto"`` died in 4 of 4 runs with faulthandler on (a CPU with AMX; issue 16): SIGSEGV
    with ``si_code`` SI_KERNEL while the main thread waited in ``epoll_wait``, the mark of a
    signal the kernel could not deliver onto the thread's alternate stack. With one ``Core``
    for the process, as OpenVINO advises anyway, 3 of 3 such runs passed there, and the suite
    with ``"auto"`` as the default of ``neonb segment`` passed on an AMD EPYC without AMX.
    """
    import openvino as ov

    return ov.Core()


class OpenVINONetwork(nn.Module):
    """A network compiled by OpenVINO for the CPU, called like the PyTorch one it came from.

    OpenVINO converts the network once (:func:`openvino.convert_model`, by tracing it on its
    smallest input, with every spatial size left free) and compiles it for the CPU: each
    convolution fused with its instance norm and activation, in a blocked memory layout,
    end to end. On 2 CPU cores that ran a window 2.2 times as fast as PyTorch for the demo's
    network in fp32, and the paper's 128³ window 1.9 times as fast in bf16
    (``benchmarks/README.md``). Labels agree with PyTorch's up to float rounding in fp32;
    bf16 changes a few voxels, as PyTorch's bf16 autocast does.

    Args:
        model: a segmentation network with one output (a MONAI ``DynUNet``); it is converted
            as it is now (later changes to its weights do not reach the compiled network).
        patch_size: the window size; the network is traced on the smallest input it takes.
        precision: ``"f32"`` or ``"bf16"`` (OpenVINO's inference precision; give ``"bf16"``
            only where the CPU computes it natively, :func:`cpu_has_native_bf16`).
        threads: CPU threads (default: PyTorch's, :func:`torch.get_num_threads`).

    Example:
        >>> network = OpenVINONetwork(model, patch_size=(48, 48, 48))
        >>> probs = predict_volume(network, image, patch_size=(48, 48, 48))  # as with model

    Input ``(B, C, X, Y, Z)`` float32 on the CPU; output the logits ``(B, K, X, Y, Z)``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        patch_size: Sequence[int],
        precision: str = "f32",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if precision not in ("f32", "bf16"):
            raise ConfigError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        import warnings

        import openvino as ov

        example = torch.zeros(1, _in_channels(model), *_smallest_input(model, patch_size))
        was_training = model.training
        model.cpu().eval()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's notes on MONAI's shape checks
                converted = ov.convert_model(model, example_input=example)
        finally:
            model.train(was_training)
        settings = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = openvino_core().compile_model(converted, "CPU", settings)
        self._request = self.compiled.create_infer_request()
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` ``(B, C, X, Y, Z)``: a new float32 tensor on the CPU."""
        outputs = self._request.infer({0: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(np.array(outputs[0]))  # a copy: OpenVINO reuses its buffer

    def extra_repr(self) -> str:
        return f"precision={self.precision!r}"


def compile_network(
    model: nn.Module,
    *,
    patch_size: Sequence[int],
    backend: str = "auto",
    device: str | torch.device = "auto",
    amp: bool | str = "auto",
) -> nn.Module:
    """The network that runs the windows: ``model`` itself, or its :class:`OpenVINONetwork`.

    Call it once per trained network and pass what it returns to :func:`segment`,
    :func:`predict_volume` or :func:`predict_foreground` in place of ``model``: converting
    takes seconds (about 1.5 s for the demo's network, 9 s for the paper's on 2 cores).

    Args:
        model: the trained network.
        patch_size: the window size.
        backend: :data:`BACKENDS` (:func:`resolve_backend`).
        device: where the windows run; OpenVINO runs on the CPU only.
        amp: as :func:`use_inference_amp`; under OpenVINO it sets bf16 or f32.

    Raises:
        ConfigError: as :func:`resolve_backend`.
    """
    dev = resolve_device(device)
    if resolve_backend(backend, dev, model) == "torch":
        return model
    bf16 = use_inference_amp(amp, dev)
    if bf16 and not cpu_has_native_bf16() and backend == "auto":
        return model  # bf16 asked of a CPU without it: PyTorch's autocast computes it
    return OpenVINONetwork(model, patch_size=patch_size, precision="bf16" if bf16 else "f32")


def backend_name(network: nn.Module) -> str:
    """``"openvino"`` for an :class:`OpenVINONetwork`, else ``"torch"``."""
    return "openvino" if isinstance(network, OpenVINONetwork) else "torch"


def _check_image(image: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``image`` is ``(C, X, Y, Z)``."""
    if image.ndim != 4:
        raise ConfigError(
            f"image must have shape (C, X, Y, Z), got {tuple(image.shape)}; "
            "give one volume at a time, without a batch axis"
        )


def check_overlap(overlap: float) -> float:
    """``overlap`` of neighbouring sliding windows, checked: a fraction in [0, 1).

    Raises:
        ConfigError: for a value outside [0, 1) (1 would never move the window).
    """
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
    return overlap


def _check_window(patch_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Validate the sliding-window settings; return the patch size as a tuple."""
    size = tuple(int(s) for s in patch_size)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"patch_size must be three positive voxel counts, got {patch_size}")
    check_overlap(overlap)
    return size


def inference_channels_last(channels_last: bool | str, model: nn.Module | None = None) -> bool:
    """Whether to run the network in the channels-last 3D memory format (NDHWC).

    ``"auto"`` keeps the layout ``model`` is stored in, so that no window converts its
    weights: a network trained by :func:`neonb.engine.fit` on the CPU is channels-last, with
    layout-keeping instance norms, and runs the demo's windows 1.1-1.2 times as fast that way
    (8 windows of 32³: 84 ms against 95 ms; of 48³: 292 against 370 ms; AVX2, 2 threads); a
    network loaded from weights stays in the default layout, which on the CPU was as fast
    for a 128³ window of the paper's network, in fp32 or bf16 (``benchmarks/README.md``).
    ``True`` turns it on, ``False`` off, on any device.

    Raises:
        ConfigError: if ``channels_last`` is not ``"auto"``, ``True`` or ``False``.
    """
    if channels_last not in ("auto", True, False):
        raise ConfigError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
    if channels_last == "auto":
        return model is not None and _is_channels_last(model)
    return channels_last is True


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 5-D weight is stored channels-last (as ``.to()`` leaves it)."""
    for parameter in model.parameters():
        if parameter.ndim == 5:
            return parameter.is_contiguous(memory_format=torch.channels_last_3d)
    return False


@contextlib.contextmanager
def _inference_state(model: nn.Module, device: torch.device, channels_last: bool):
    """Put ``model`` on ``device``, in eval mode and the memory format; restore mode and format."""
    was_training, was_channels_last = model.training, _is_channels_last(model)
    model.to(device).eval()
    if channels_last != was_channels_last:
        model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    try:
        yield
    finally:
        model.train(was_training)
        if channels_last != was_channels_last:
            restored = torch.channels_last_3d if was_channels_last else torch.contiguous_format
            model.to(memory_format=restored)


def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "constant",
    device: str | torch.device = "auto",
    amp: bool | str = "auto",
    channels_last: bool | str = "auto",
    segmentation_logits: SegmentationLogits | None = None,
) -> torch.Tensor:
    """Class probabilities of a whole volume by overlapping sliding windows.

    Each window's logits are turned into softmax probabilities in float32; overlapping
    windows are averaged with equal weight (``mode="constant"``, as in the paper) or
    with a Gaussian weight (``mode="gaussian"``, as in nnU-Net). The model is moved to
    ``device`` and put in eval mode for the call (its previous mode and memory format are
    restored); the windows run under :func:`torch.inference_mode` (no autograd
    bookkeeping) and, where bf16 is native (:func:`use_inference_amp`), under bf16
    autocast. Neither the inference mode nor the memory format changes the arithmetic
    beyond float rounding; bf16 changes a few voxels' labels (``benchmarks/README.md``).

    Args:
        model: segmentation network, e.g. a MONAI ``DynUNet``.
        image: one intensity-normalised volume, shape ``(2, X, Y, Z)`` (T1w, T2w).
        patch_size: window size in voxels, the training patch size (paper: 128³).
        overlap: fraction of a window shared with its neighbour along each axis.
        sw_batch_size: windows per forward pass (``neonb segment`` passes
            :func:`default_sw_batch_size`).
        mode: blending of overlapping windows, ``"constant"`` or ``"gaussian"``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``, ...
        amp: bf16 autocast (:func:`use_inference_amp`): ``"auto"`` on CUDA, ``"native"``
            also on a CPU with native bf16, ``True`` on, ``False`` off (fp32).
        channels_last: run the network channels-last (:func:`inference_channels_last`):
            ``"auto"`` (the layout the model is stored in), ``True`` or ``False``.
        segmentation_logits: picks ``(B, C, X, Y, Z)`` logits from the model output;
            default :func:`default_segmentation_logits`.

    Returns:
        Probabilities, shape ``(C, X, Y, Z)`` (the input's spatial shape), float32, CPU.

    Raises:
        ConfigError: if ``image`` is not 4-D or the window settings are invalid.
    """
    probs = _probabilities(
        model, image, patch_size=patch_size, overlap=overlap, sw_batch_size=sw_batch_size,
        mode=mode, device=device, amp=amp, channels_last=channels_last,
        segmentation_logits=segmentation_logits,
    )  # fmt: skip
    return probs.clone()  # a plain tensor again, not an inference-mode one


def _probabilities(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "constant",
    device: str | torch.device = "auto",
    amp: bool | str = "auto",
    channels_last: bool | str = "auto",
    segmentation_logits: SegmentationLogits | None = None,
) -> torch.Tensor:
    """:func:`predict_volume`'s probabilities as an inference-mode tensor (read-only)."""
    size = _check_window(patch_size, overlap)
    image = convert_to_tensor(image, track_meta=False)
    _check_image(image)
    dev = resolve_device(device)
    amp_on = use_inference_amp(amp, dev)
    last = inference_channels_last(channels_last, model)
    if isinstance(model, OpenVINONetwork):  # its precision and layout were set when compiled
        if dev.type != "cpu":
            raise ConfigError(f"an OpenVINO network runs on the CPU; the device is {dev}")
        amp_on, last = False, False
    extract = segmentation_logits or default_segmentation_logits
    layout = torch.channels_last_3d if last else torch.contiguous_format

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(amp_on, dev):
            logits = extract(model(window.contiguous(memory_format=layout)))
        return torch.softmax(logits.float(), dim=1).contiguous()

    with _inference_state(model, dev, last), torch.inference_mode():
        probs = sliding_window_inference(
            image[None].float().to(dev),
            roi_size=size,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=mode,
        )
        return convert_to_tensor(probs, track_meta=False)[0].float().cpu()


def foreground_box(image: torch.Tensor | np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels that are non-zero in any channel of ``image`` (C, X, Y, Z).

    Returns:
        One slice per spatial axis; the whole axis for an all-zero image.
    """
    nonzero = np.asarray(convert_to_tensor(image, track_meta=False).abs().sum(0) > 0)
    if not nonzero.any():
        return tuple(slice(0, n) for n in nonzero.shape)
    coords = np.argwhere(nonzero)
    low, high = coords.min(0), coords.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty combination of the spatial ``axes`` (0 = X, 1 = Y, 2 = Z) to flip.

    Example:
        >>> flip_combinations((0, 2))
        [(0,), (2,), (0, 2)]
    """
    axes = tuple(int(a) for a in axes)
    if len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
        raise ConfigError(f"flip axes must be distinct axes among 0, 1 and 2, got {axes!r}")
    return [
        combo for size in range(1, len(axes) + 1) for combo in itertools.combinations(axes, size)
    ]


def predict_foreground(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    crop_foreground: bool = True,
    flips: Sequence[Sequence[int]] = (),
    **kwargs: Any,
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Class probabilities inside the head's bounding box, optionally with flip TTA.

    With ``flips`` (test-time augmentation, as nnU-Net's mirroring), the box is also
    predicted flipped along each combination of axes given, each prediction is flipped
    back, and the probabilities of all ``1 + len(flips)`` passes are averaged.

    Args:
        model: segmentation network.
        image: one volume, shape ``(2, X, Y, Z)``.
        crop_foreground: predict inside the non-zero bounding box only (:func:`segment`).
        flips: spatial axes to flip per extra pass, e.g. :func:`flip_combinations` of the
            training's ``flip_axes``; ``()`` (default) is one pass.
        **kwargs: keyword arguments of :func:`predict_volume` (``patch_size`` is required).

    Returns:
        Probabilities ``(C, *box shape)`` float32 (an inference-mode tensor: read-only), and
        the box, one slice per spatial axis of ``image``.
    """
    box = foreground_box(image) if crop_foreground else (slice(None),) * 3
    cropped = convert_to_tensor(image, track_meta=False)[(slice(None), *box)]
    probs = _probabilities(model, cropped, **kwargs)
    with torch.inference_mode():
        for axes in flips:
            dims = [int(a) + 1 for a in axes]  # skip the channel axis
            flipped = _probabilities(model, torch.flip(cropped, dims), **kwargs)
            probs = probs + torch.flip(flipped, dims)
        if flips:
            probs = probs / (1 + len(flips))
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, image.shape[1:], strict=True))
    return probs, box


def normalised_entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Entropy of class probabilities divided by its largest value, ln(C): in [0, 1].

    0 where one class has all the probability; 1 where every class is equally likely.

    Args:
        probs: probabilities summing to 1 along ``dim``, e.g. ``(C, X, Y, Z)``.
        dim: the class axis.

    Returns:
        The probabilities' shape without ``dim``, float32.
    """
    probs = probs.float()
    n_classes = probs.shape[dim]
    if n_classes < 2:
        return torch.zeros_like(probs.sum(dim))
    terms = torch.special.xlogy(probs, probs)
    return (-terms.sum(dim) / math.log(n_classes)).clamp_(0, 1)


def segment(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    crop_foreground: bool = True,
    **kwargs: Any,
) -> np.ndarray:
    """Label map of a whole volume: argmax of :func:`predict_volume`'s probabilities.

    Training crops every scan to the bounding box of its non-zero voxels (paper
    §3.2.1), so by default inference does the same: it predicts inside that box and
    labels everything outside it 0 (background outside the head, where the scan is 0).
    Without the crop, the network would meet far larger empty regions than it was
    trained on, and since z-normalisation maps those zeros to the mean intensity, it
    mistakes some of them for tissue.

    Args:
        model: segmentation network.
        image: one volume, shape ``(2, X, Y, Z)``.
        crop_foreground: predict inside the non-zero bounding box only.
        **kwargs: keyword arguments of :func:`predict_foreground` (``flips``) and
            :func:`predict_volume` (``patch_size`` is required).

    Returns:
        Labels, shape ``(X, Y, Z)``, uint8.
    """
    probs, box = predict_foreground(model, image, crop_foreground=crop_foreground, **kwargs)
    labels = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
    labels[box] = class_indices(probs).to(torch.uint8).numpy()
    return labels


def _check_nifti_name(path: Path) -> None:
    """Refuse an output name that nibabel would not write as NIfTI."""
    if not path.name.endswith((".nii.gz", ".nii")):
        raise ConfigError(f"out_path must end in .nii or .nii.gz, got {path}")


def save_segmentation(
    labels: np.ndarray | torch.Tensor,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
) -> Path:
    """Write a label map as NIfTI in the space of a reference image.

    The output takes the reference's affine and header (qform/sform, zooms, units),
    stores uint8 voxels with the intensity scaling reset (no ``scl_slope``/``scl_inter``)
    and the NIfTI intent "label". It is written to a hidden temporary file in the same
    folder and then renamed, so a reader never sees a partial file.

    Args:
        labels: label map, shape ``(X, Y, Z)``, values 0–255.
        reference_path: the image the labels were predicted from (e.g. the T2w).
        out_path: destination ending in ``.nii.gz`` or ``.nii``; parent folders are made.

    Returns:
        The path written.

    Raises:
        DataError: if the reference is missing or its shape differs from ``labels``.
        ConfigError: if ``out_path`` does not end in ``.nii``/``.nii.gz``.
    """
    out_path = Path(out_path)
    _check_nifti_name(out_path)
    if not Path(reference_path).is_file():
        raise DataError(reference_path, "reference image does not exist")
    reference = nib.load(reference_path)
    data = np.asarray(labels)
    if data.shape != reference.shape[:3]:
        raise DataError(
            reference_path,
            f"has shape {reference.shape[:3]}, but the labels have shape {data.shape}",
            "segment the image that is given as reference",
        )
    header = reference.header.copy()
    image = nib.Nifti1Image(data.astype(np.uint8), reference.affine, header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(np.nan, np.nan)
    image.header.set_intent(NIFTI_LABEL_INTENT)
    image.set_qform(*reference.get_qform(coded=True))
    image.set_sform(*reference.get_sform(coded=True))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_path, lambda tmp: nib.save(image, tmp))


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    channels: tuple[Sequence[str], Sequence[str]] | None = None,
) -> nn.Module:
    """Load network weights saved by :func:`neonb.engine.fit`.

    Reads with ``torch.load(weights_only=True)`` (tensors and plain containers only;
    nothing is unpickled), on the CPU.

    Args:
        model: the network to load into, built with the same architecture.
        path: ``model_best.pt`` (a bare state dict) or ``checkpoint.pt`` (a dict whose
            ``"model"`` entry is the state dict).
        strict: passed to :meth:`torch.nn.Module.load_state_dict`.
        channels: ``(saved, wanted)`` input channels, e.g. ``(("t1w", "t2w"), ("t2w",))``,
            to start a network with fewer inputs from a trained one: the first layers'
            filters keep the wanted channels' weights (the T2w filters of a T1w+T2w
            network), as one starts from the weights of a related network.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        DataError: if the file is missing, unreadable, or does not fit ``model``.
    """
    if not Path(path).is_file():
        raise DataError(path, "weights file does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means a bad file
        raise DataError(path, f"cannot be read as torch weights ({err})") from err
    state = saved.get("model", saved) if isinstance(saved, Mapping) else None
    if not isinstance(state, Mapping):
        raise DataError(path, "holds neither a state dict nor a checkpoint with 'model'")
    if channels is not None:
        state = _select_input_channels(state, model, *channels, path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise DataError(
            path, f"does not fit the model ({err})", "build the model with the run's config"
        ) from err
    return model


def _select_input_channels(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    saved: Sequence[str],
    wanted: Sequence[str],
    path: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """``state`` with the input-channel axis of the first layers cut to ``wanted``.

    Every saved tensor whose axis 1 has ``len(saved)`` entries where the model's has
    ``len(wanted)`` (the convolutions that read the input image) keeps the entries of the
    wanted channels, in the wanted order.

    Raises:
        DataError: naming ``path``, for a wanted channel the saved network did not take.
    """
    missing = [name for name in wanted if name not in saved]
    if missing:
        raise DataError(path, f"was trained on {list(saved)}, so it has no weights for {missing}")
    index = torch.tensor([list(saved).index(name) for name in wanted])
    target = model.state_dict()
    selected = dict(state)
    for key, value in state.items():
        shape = tuple(target[key].shape) if key in target else None
        if (
            shape is not None
            and value.ndim >= 2
            and value.shape[1] == len(saved)
            and shape[1] == len(wanted) != len(saved)
            and shape[:1] + shape[2:] == value.shape[:1] + value.shape[2:]
        ):
            selected[key] = value.index_select(1, index).clone()
    return selected
