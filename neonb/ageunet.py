"""AgeU-Net: the segmentation network with an age-regression head on its bottleneck.

Richter & Fetit (2022, §3.3) extend the U-Net with an *age pathway*: the bottleneck features
(``filters[-1]`` channels on a ``patch / 32`` grid, 4³ for 128³ patches) are reduced to
``channels × 1 × 1 × 1`` by further convolutional layers and fed to a fully connected layer
that regresses the post-menstrual age at scan. (How many layers, their stride and width, and
the hidden layer of :class:`AgeHeadConfig` are neonb's choices: the paper gives none, and the
authors' public code used one unpadded 3×3×3 convolution to 512 channels, 2³ left, and one
linear layer on the 4,096 values.) The total loss is (Eq. 4)

.. math:: L = L_{DiceCE} + \\alpha \\, L_{MSE}(age)

with the masked Dice + cross-entropy over the deep-supervision heads
(:class:`neonb.losses.SegmentationLoss`) and α = 1e-2, learning rate 1e-3. The paper writes
both as "10e-3": α is the value of ``10e-3`` in the authors' public code
(``age_loss_weight``), and the learning rate is read as 1e-3 because the paper calls it a
"medium" rate, below the baseline's 1e-2. At test time every sliding window predicts an
age; the volume's age aggregates them. The paper found that the head learned the mean age
(§4.1.2) and named three remedies as future work, all settings of :class:`AgeHeadConfig`
here: a separate learning rate for the head (``head_learning_rate``), an increasing α
(``alpha_schedule="linear"``) and staged training, segmentation first and then the head
alone (``staged=True``).

=========================  ============================================================
piece                      what it is
=========================  ============================================================
:class:`AgeHeadConfig`     head architecture and the age part of the training recipe
:class:`AgeUNet`           MONAI ``DynUNet`` subclass; the head reads ``bottleneck`` via a
                           forward hook; output ``{"segmentation": ..., "age": (B,)}``
:class:`AgeUNetLoss`       ``SegmentationLoss + α(epoch) · MSE`` (weeks², or standardised)
:func:`segment_with_age`   labels and aggregated ages of one volume (MONAI sliding windows)
:class:`WindowAges`        the ages of every window: ``neonb.experiment.evaluate``'s
                           ``window_hook`` for whole test volumes
:func:`train_ageunet`      one run folder, :data:`AGE_HEAD_FILE` included
:func:`train_staged_head`  staged: head trained on cached window features
:func:`load_ageunet_run`   rebuild a trained AgeU-Net from its folder alone
:func:`age_verdicts`       per variant: constant head, or better than the mean predictor
=========================  ============================================================

**The weight of the age term.** By default (``standardize=False``) the loss is the paper's:
α times the MSE of ages in weeks², so α = 1e-2 weighs an error of 3.5 weeks (about the SD
of the dHCP ages) like 0.12 of Dice + CE. With ``standardize=True`` (neonb's option) the
head predicts ``z = (age - mean) / std``, with the mean and standard deviation of the
*training* ages, and the loss is the MSE of ``z``: the MSE in weeks² divided by ``std²``,
so the same α weighs the age term about ``std²`` (≈ 12 on the dHCP) times less. Either way
the network returns weeks (``outputs["age"]``).

**Where the head starts (neonb's choice).** A freshly initialised head outputs about 0:
0 weeks without standardisation, whose squared errors (~1500 weeks²), even times α, swamp
the segmentation loss — the instability the paper met with larger learning rates. Every
run therefore sets the bias of the head's last layer so that it starts at the mean
training age (:meth:`AgeHead.start_at`; 0 in z-units when standardised). This changes
where the head starts, not the loss the paper weighs.

Example:
    >>> from neonb.models import ModelConfig
    >>> cfg = ModelConfig(strides=(1, 2, 2), filters=(4, 8, 16), deep_supr_num=1)
    >>> net = build_ageunet(cfg, AgeHeadConfig(), age_mean=38.0, age_std=3.5).eval()
    >>> out = net(torch.zeros(2, 2, 16, 16, 16))
    >>> tuple(out["segmentation"].shape), tuple(out["age"].shape)
    ((2, 10, 16, 16, 16), (2,))
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from monai.inferers import sliding_window_inference
from monai.networks.blocks import Convolution
from monai.networks.nets import DynUNet
from monai.utils import convert_to_tensor
from torch import Tensor, nn

from neonb import distributed
from neonb.engine import BEST_MODEL_FILE, LOG_FILE, write_run_info
from neonb.errors import ConfigError, DataError
from neonb.experiment import (
    VAL_SESSIONS_FILE,
    Record,
    TrainedRun,
    TrainingConfig,
    build_optimizer,
    prepare_volumes,
    read_finished_run,
    segmentation_loss,
    train_segmentation,
    validation_loader,
    write_val_sessions,
)
from neonb.files import atomic_write
from neonb.inference import (
    class_indices,
    default_segmentation_logits,
    foreground_box,
    load_weights,
    resolve_device,
    segment,
)
from neonb.labels import BACKGROUND_LABELS, NUM_CLASSES
from neonb.losses import SegmentationLoss
from neonb.metrics import (
    ClassDiceMetric,
    case_summary,
    class_column,
    tissue_indices,
)
from neonb.models import ModelConfig, dynunet_kwargs

__all__ = [
    "AGE_HEAD_FILE",
    "AGE_LOG_FILE",
    "AgeHead",
    "AgeHeadConfig",
    "AgeUNet",
    "AgeUNetLoss",
    "WindowAges",
    "WindowFeatures",
    "aggregate_ages",
    "age_errors",
    "age_verdicts",
    "alpha_at",
    "build_ageunet",
    "cache_window_features",
    "head_ages",
    "load_ageunet_run",
    "segment_with_age",
    "segmentation_logits",
    "summary_table",
    "train_ageunet",
    "train_head_on_features",
    "train_staged_head",
    "window_features",
]

AGE_HEAD_FILE = "age_head.yaml"
"""Written into every AgeU-Net run folder: head config, age standardisation, weights file."""

AGE_LOG_FILE = "age_log.tsv"
"""Per-epoch training age error (MSE in weeks², MAE in weeks) and α of an AgeU-Net run."""

REDUCTIONS = ("conv", "avgpool", "maxpool")
ALPHA_SCHEDULES = ("constant", "linear")
AGGREGATIONS = ("mean", "foreground_weighted")
"""Keys of the ages :func:`segment_with_age` returns."""


@dataclass(frozen=True)
class AgeHeadConfig:
    """The age pathway: head architecture and the age part of the training recipe.

    Attributes:
        reduction: how the bottleneck ``(B, F, x, y, z)`` becomes ``(B, F, 1, 1, 1)``:
            ``"conv"`` (the paper's reduction by convolutions; neonb's form of it:
            ``conv_layers`` 3×3×3 convolutions of stride 2 with leaky ReLU, then an average
            over whatever grid is left, a no-op when the convolutions reach 1×1×1, as they do
            for 4³ and 3³ bottlenecks with 2 layers),
            ``"avgpool"`` or ``"maxpool"`` (global pooling).
        conv_layers: number of strided convolutions for ``"conv"``.
        hidden: width of the hidden fully connected layer; 0 for a single linear layer,
            as the paper's "a fully-connected layer" (the default 64 is neonb's choice).
        dropout: dropout before the last linear layer, in [0, 1).
        alpha: weight α of the age MSE (paper: 1e-2); with ``"linear"`` the final weight.
        alpha_schedule: ``"constant"`` or ``"linear"`` (α grows from ``alpha_start`` in the
            first epoch to ``alpha`` in the last).
        alpha_start: first-epoch α of the linear schedule.
        head_learning_rate: learning rate of the head's parameters; ``None``: the run's.
        staged: train the head alone on a frozen, already trained segmentation network,
            from its bottleneck features cached once per sliding window
            (:func:`train_staged_head`); the run keeps the epoch with the lowest
            validation age MAE.
        standardize: regress standardised ages, so that the age term is the MSE in weeks²
            divided by the variance of the training ages (neonb's option); ``False`` (the
            default): the paper's MSE in weeks² (module docstring).
        feature_batch_size: staged training only: cached windows per head step
            (:func:`train_head_on_features`).
    """

    reduction: str = "conv"
    conv_layers: int = 2
    hidden: int = 64
    dropout: float = 0.0
    alpha: float = 1e-2
    alpha_schedule: str = "constant"
    alpha_start: float = 0.0
    head_learning_rate: float | None = None
    staged: bool = False
    standardize: bool = False
    feature_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError(
                f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {self.alpha_schedule!r}"
            )
        if isinstance(self.feature_batch_size, bool) or self.feature_batch_size < 1:
            raise ConfigError(
                f"feature_batch_size must be a positive integer, got {self.feature_batch_size!r}"
            )
        for name in ("conv_layers", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.reduction == "conv" and self.conv_layers < 1:
            raise ConfigError("reduction 'conv' needs conv_layers >= 1, got 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("alpha", "alpha_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ConfigError(
                f"head_learning_rate must be positive or None, got {self.head_learning_rate!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AgeHeadConfig:
        """Build from plain values (YAML, papermill).

        Raises:
            ConfigError: naming any key that is not a setting, or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown age-head setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AgeHeadConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


class AgeHead(nn.Module):
    """Bottleneck features ``(B, F, x, y, z)`` → one age per sample ``(B,)``.

    The output is in weeks, or standardised (z-units) when the head regresses standardised
    ages; :class:`AgeUNet` turns it into weeks.

    Args:
        in_channels: channels ``F`` of the bottleneck (``filters[-1]``).
        config: the head settings.
    """

    def __init__(self, in_channels: int, config: AgeHeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if config.reduction == "conv":
            layers += [
                Convolution(
                    3,
                    in_channels,
                    in_channels,
                    strides=2,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": 0.01}),
                    norm=None,
                )
                for _ in range(config.conv_layers)
            ]
            layers.append(nn.AdaptiveAvgPool3d(1))
        elif config.reduction == "avgpool":
            layers.append(nn.AdaptiveAvgPool3d(1))
        else:
            layers.append(nn.AdaptiveMaxPool3d(1))
        layers.append(nn.Flatten())
        if config.hidden:
            layers += [nn.Linear(in_channels, config.hidden), nn.LeakyReLU(0.01)]
        layers += [nn.Dropout(config.dropout), nn.Linear(config.hidden or in_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """Age per sample (weeks or z-units), shape ``(B,)``."""
        return self.layers(features)[:, 0]

    def start_at(self, value: float) -> AgeHead:
        """Set the bias of the last layer to ``value`` (the head's output units); ``self``.

        The last layer's weights stay as initialised, so a new head outputs ``value`` plus
        a small, input-dependent term: neonb starts every head at the mean training age.
        """
        last = self.layers[-1]
        with torch.no_grad():
            last.bias.fill_(float(value))
        return self


class AgeUNet(DynUNet):
    """MONAI's ``DynUNet`` with an :class:`AgeHead` on its bottleneck.

    The segmentation path is DynUNet's own (same modules, same state-dict keys, so a
    baseline's weights load into it); the head reads the output of ``self.bottleneck``
    through a forward hook registered for each call. The output is a dict:

    ================  ======================================  ======================
    key               ``train()``, deep supervision           ``eval()``
    ================  ======================================  ======================
    ``segmentation``  ``(B, 1 + deep_supr_num, C, X, Y, Z)``  ``(B, C, X, Y, Z)``
    ``age``           ``(B,)``, weeks                         ``(B,)``, weeks
    ================  ======================================  ======================

    Pass :func:`segmentation_logits` wherever neonb picks the segmentation logits
    (``fit``, ``train_segmentation``, ``evaluate``, ``segment``).

    Args:
        head: the head settings.
        age_mean: mean training age in weeks (0 without standardisation).
        age_std: standard deviation of the training ages in weeks (1 without).
        **kwargs: :class:`monai.networks.nets.DynUNet` arguments
            (:func:`neonb.models.dynunet_kwargs`).
    """

    def __init__(
        self, head: AgeHeadConfig, *, age_mean: float = 0.0, age_std: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not age_std > 0:
            raise ConfigError(f"age_std must be positive, got {age_std!r}")
        self.head_config = head
        self.age_head = AgeHead(self.filters[-1], head)
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Segmentation (as ``DynUNet``) and age in weeks; see the class docstring."""
        features: list[Tensor] = []
        handle = self.bottleneck.register_forward_hook(lambda _m, _i, out: features.append(out))
        try:
            segmentation = super().forward(x)
        finally:
            handle.remove()
        age = self.age_head(features[-1]) * self.age_std + self.age_mean
        return {"segmentation": segmentation, "age": age}

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the age head."""
        return self.age_head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the segmentation network (everything but the head)."""
        head = {id(p) for p in self.age_head.parameters()}
        return (p for p in self.parameters() if id(p) not in head)

    def freeze_backbone(self) -> AgeUNet:
        """Stop gradients to the segmentation network (staged training); returns ``self``."""
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(False)
        return self


def build_ageunet(
    model_config: ModelConfig,
    head: AgeHeadConfig,
    *,
    age_mean: float = 0.0,
    age_std: float = 1.0,
) -> AgeUNet:
    """An AgeU-Net whose segmentation path is ``neonb.models.build_model(model_config)``.

    Args:
        model_config: the segmentation network.
        head: the age head.
        age_mean: mean of the training ages, weeks (standardisation; 0 for none).
        age_std: their standard deviation, weeks (1 for none).
    """
    return AgeUNet(head, age_mean=age_mean, age_std=age_std, **dynunet_kwargs(model_config))


def segmentation_logits(outputs: Any) -> Tensor:
    """The segmentation logits of an AgeU-Net output (``segmentation_logits=`` hook).

    Returns ``(B, C, X, Y, Z)``: the eval-mode logits, or head 0 of the stacked
    deep-supervision output. A plain tensor (a DynUNet's) is passed through.
    """
    if isinstance(outputs, Mapping):
        outputs = outputs["segmentation"]
    return default_segmentation_logits(outputs)


def load_backbone(model: AgeUNet, path: str | os.PathLike) -> AgeUNet:
    """Load a trained DynUNet's weights (``model_best.pt``) into an AgeU-Net; head untouched.

    Raises:
        DataError: if the file has keys the AgeU-Net lacks, or lacks segmentation keys.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("model", saved)
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = ("age_head.", "age_mean", "age_std")
    foreign = [k for k in missing if not k.startswith(own)]
    if unexpected or foreign:
        raise DataError(
            path,
            f"does not fit the AgeU-Net's segmentation path (missing {foreign[:3]}, "
            f"unexpected {unexpected[:3]})",
            "use the weights of a baseline trained with the same model config",
        )
    return model


# --------------------------------------------------------------------------- loss


def alpha_at(epoch: int, epochs: int, head: AgeHeadConfig) -> float:
    """α of the age loss in epoch ``epoch`` (0-based) of ``epochs``.

    Example:
        >>> head = AgeHeadConfig(alpha=0.1, alpha_schedule="linear", alpha_start=0.0)
        >>> [round(alpha_at(e, 3, head), 3) for e in range(3)]
        [0.0, 0.05, 0.1]
    """
    if head.alpha_schedule == "constant" or epochs <= 1:
        return head.alpha
    fraction = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return head.alpha_start + (head.alpha - head.alpha_start) * fraction


class AgeUNetLoss(nn.Module):
    """``segmentation(outputs["segmentation"], batch) + α · MSE`` of the age.

    The MSE compares ``(outputs["age"] - batch["scan_age"]) / age_std`` with 0, i.e. the
    MSE in weeks² divided by ``age_std²``: 1 without standardisation, the paper's loss
    (Eq. 4); the standard deviation of the training ages with it. α follows
    :func:`alpha_at`; :func:`neonb.engine.fit` calls :meth:`set_epoch` before each epoch.
    With α = 0 the loss is exactly the segmentation loss. Training batches add their age
    errors to :attr:`history` (epoch → ``[sum of squared errors (weeks²), sum of absolute
    errors (weeks), count]``).

    Args:
        segmentation: the segmentation loss (``neonb.experiment.segmentation_loss``).
        head: gives α and its schedule.
        epochs: length of the run (for a linear schedule).
        age_std: standard deviation used for standardisation, weeks (1: none).
        age_key: batch key of the target ages.
    """

    def __init__(
        self,
        segmentation: SegmentationLoss,
        head: AgeHeadConfig,
        *,
        epochs: int = 1,
        age_std: float = 1.0,
        age_key: str = "scan_age",
    ) -> None:
        super().__init__()
        self.segmentation = segmentation
        self.head = head
        self.epochs = int(epochs)
        self.age_std = float(age_std)
        self.age_key = age_key
        self.epoch = 0
        self.history: dict[int, list[float]] = {}

    @property
    def alpha(self) -> float:
        """α of the current epoch."""
        return alpha_at(self.epoch, self.epochs, self.head)

    def set_epoch(self, epoch: int) -> None:
        """Set the current epoch (0-based)."""
        self.epoch = int(epoch)

    def forward(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """Scalar loss of one batch; ``batch[age_key]`` holds ages in weeks, ``(B,)``."""
        loss = self.segmentation(outputs["segmentation"], batch)
        if self.alpha == 0:
            return loss
        predicted = outputs["age"]
        target = torch.as_tensor(batch[self.age_key], dtype=predicted.dtype)
        error = predicted - target.to(predicted.device).reshape(predicted.shape)
        if self.training:
            stats = self.history.setdefault(self.epoch, [0.0, 0.0, 0])
            stats[0] += float((error.detach() ** 2).sum())
            stats[1] += float(error.detach().abs().sum())
            stats[2] += error.numel()
        return loss + self.alpha * torch.mean((error / self.age_std) ** 2)


# --------------------------------------------------------------------------- test-time ages


def aggregate_ages(ages: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """One age per volume from its windows' ages.

    Args:
        ages: the age each sliding window predicted, weeks.
        weights: each window's foreground weight (its mean tissue probability, in [0, 1]).

    Returns:
        ``{"mean": plain mean, "foreground_weighted": Σ w·a / Σ w}``; the weighted value
        falls back to the mean when every weight is 0.

    Example:
        >>> aggregate_ages([30.0, 40.0], [1.0, 3.0])
        {'mean': 35.0, 'foreground_weighted': 37.5}
    """
    a = np.asarray(ages, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if a.size == 0 or a.shape != w.shape:
        raise ConfigError(f"need one weight per window age, got {a.size} ages and {w.size} weights")
    if (w < 0).any():
        raise ConfigError(f"weights must be non-negative, got {w.min()}")
    mean = float(a.mean())
    weighted = float((a * w).sum() / w.sum()) if w.sum() > 0 else mean
    return {"mean": mean, "foreground_weighted": weighted}


class WindowAges:
    """A ``segmentation_logits`` hook that also records each window's age and weight.

    Given to :func:`neonb.inference.segment`, it is called on the model output of every
    batch of sliding windows: it stores the predicted ages (weeks) and the windows' mean
    tissue probability (softmax mass outside the background labels 0 and 4), and returns
    the segmentation logits for MONAI to stitch. It is a
    :class:`neonb.experiment.WindowHook`: ``neonb.experiment.evaluate(...,
    window_hook=WindowAges)`` scores the AgeU-Net's segmentations and ages of whole
    volumes, with :meth:`summary`'s columns in its per-volume rows.
    """

    def __init__(self) -> None:
        self.ages: list[float] = []
        self.weights: list[float] = []

    def __call__(self, outputs: Mapping[str, Tensor]) -> Tensor:
        logits = segmentation_logits(outputs)
        probs = torch.softmax(logits.float(), dim=1)
        tissue = 1.0 - probs[:, list(BACKGROUND_LABELS)].sum(dim=1)
        self.weights += tissue.flatten(1).mean(dim=1).tolist()
        self.ages += outputs["age"].float().flatten().tolist()
        return logits

    def aggregate(self) -> dict[str, float]:
        """:func:`aggregate_ages` of the windows recorded so far."""
        return aggregate_ages(self.ages, self.weights)

    def summary(self) -> dict[str, float | int]:
        """``age_mean``, ``age_foreground_weighted`` (weeks) and ``n_windows`` so far."""
        ages = {f"age_{k}": v for k, v in self.aggregate().items()}
        return {**ages, "n_windows": len(self.ages)}


def segment_with_age(
    model: nn.Module,
    image: Tensor | np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float,
    device: str | torch.device = "auto",
) -> tuple[np.ndarray, dict[str, float]]:
    """Label map and age of one volume, from the same sliding windows.

    Segmentation is :func:`neonb.inference.segment` (MONAI's sliding-window inference inside
    the foreground box, windows averaged); every window's age is recorded on the way
    (:class:`WindowAges`) and aggregated (:func:`aggregate_ages`).

    Args:
        model: an :class:`AgeUNet`.
        image: one normalised volume, ``(C, X, Y, Z)``.
        patch_size: window size in voxels (the training patch size).
        overlap: overlap of neighbouring windows, in [0, 1).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...

    Returns:
        Labels ``(X, Y, Z)`` uint8, and ``{"mean": ..., "foreground_weighted": ...}`` in
        weeks.
    """
    windows = WindowAges()
    labels = segment(
        model,
        image,
        patch_size=patch_size,
        overlap=overlap,
        device=device,
        segmentation_logits=windows,
    )
    return labels, windows.aggregate()


def age_errors(ages: pd.DataFrame, baseline_age: float) -> pd.DataFrame:
    """MAE (weeks) and MSE (weeks²) of each aggregation and of a constant predictor.

    Args:
        ages: per-volume rows of :func:`neonb.experiment.evaluate` with
            ``window_hook=WindowAges`` (``scan_age``, ``age_<aggregation>``).
        baseline_age: the constant prediction, e.g. the mean training age.

    Returns:
        One row per predictor (``mean``, ``foreground_weighted``, ``mean predictor``) with
        ``MAE (weeks)`` and ``MSE (weeks²)``.
    """
    truth = ages["scan_age"].to_numpy(float)
    predictions = {k: ages[f"age_{k}"].to_numpy(float) for k in AGGREGATIONS}
    predictions["mean predictor"] = np.full_like(truth, baseline_age)
    return pd.DataFrame(
        {
            "MAE (weeks)": {k: float(np.abs(p - truth).mean()) for k, p in predictions.items()},
            "MSE (weeks²)": {k: float(((p - truth) ** 2).mean()) for k, p in predictions.items()},
        }
    )


# --------------------------------------------------------------------------- staged training


@dataclass
class WindowFeatures:
    """Bottleneck features of sliding windows, cached for training the head alone.

    Attributes:
        features: one row per window, ``(N, F, k, k, k)`` float32 on the CPU (``F`` =
            ``filters[-1]``, ``k`` = patch size / total stride, 3 for 48³ windows).
        ages: the age at scan of each window's volume, ``(N,)`` weeks.
        volume: index of each window's volume, ``(N,)`` (0 .. number of volumes - 1).
    """

    features: Tensor
    ages: Tensor
    volume: Tensor

    def __len__(self) -> int:
        return int(self.features.shape[0])


class _Bottleneck(Exception):
    """Raised by :func:`window_features`'s hook to stop a forward pass at the bottleneck."""


def window_features(
    model: AgeUNet,
    image: Tensor | np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float,
    device: str | torch.device = "auto",
    sw_batch_size: int = 8,
) -> Tensor:
    """Bottleneck features of every sliding window :func:`segment_with_age` uses.

    The windows are those of :func:`neonb.inference.segment` (MONAI's
    ``sliding_window_inference`` of ``patch_size`` and ``overlap`` inside the foreground
    box); a forward hook on ``model.bottleneck`` (the module the age head reads) keeps
    each window's features and stops the pass there, so the decoder is not run.

    Args:
        model: an :class:`AgeUNet` (its weights are not changed).
        image: one normalised volume, ``(C, X, Y, Z)``.
        patch_size: window size in voxels (the training patch size).
        overlap: overlap of neighbouring windows, in [0, 1).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        sw_batch_size: windows per forward pass (the windows do not depend on it).

    Returns:
        ``(N, F, k, k, k)`` float32 on the CPU, one row per window in MONAI's order.
    """
    size = tuple(int(s) for s in patch_size)
    image = convert_to_tensor(image, track_meta=False)
    box = foreground_box(image)
    dev = resolve_device(device)
    features: list[Tensor] = []

    def keep_and_stop(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
        features.append(convert_to_tensor(out.detach(), track_meta=False).float().cpu())
        raise _Bottleneck

    def predictor(window: Tensor) -> Tensor:
        try:
            model(window)
        except _Bottleneck:
            pass
        return window[:, :1]

    was_training = model.training
    model.to(dev).eval()
    handle = model.bottleneck.register_forward_hook(keep_and_stop)
    try:
        with torch.no_grad():
            sliding_window_inference(
                image[(slice(None), *box)][None].float().to(dev),
                roi_size=size,
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=overlap,
            )
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(features)


def cache_window_features(
    model: AgeUNet, records: Sequence[Record], config: TrainingConfig
) -> WindowFeatures:
    """:func:`window_features` of whole volumes, with their ages as targets.

    Args:
        model: the AgeU-Net whose (frozen) segmentation path computes the features.
        records: sessions with ``scan_age`` (loaded with
            :func:`neonb.experiment.prepare_volumes`).
        config: window size (``patch_size``), ``overlap`` and ``device``.
    """
    rows, ages, volume = [], [], []
    for index, (record, loaded) in enumerate(
        zip(records, prepare_volumes(records, channels=config.channels), strict=True)
    ):
        features = window_features(
            model,
            loaded["image"],
            patch_size=config.patch_size,
            overlap=config.overlap,
            device=config.device,
        )
        rows.append(features)
        ages.append(torch.full((len(features),), float(record["scan_age"])))
        volume.append(torch.full((len(features),), index, dtype=torch.long))
    return WindowFeatures(torch.cat(rows), torch.cat(ages), torch.cat(volume))


def head_ages(model: AgeUNet, cached: WindowFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Ages the head predicts from cached features, per window and per volume.

    Returns:
        Window ages ``(N,)`` and volume ages (mean of each volume's windows, the
        ``"mean"`` aggregation of :func:`segment_with_age`), both in weeks.
    """
    was_training = model.age_head.training
    model.age_head.eval()
    with torch.no_grad():
        head = model.age_head.to("cpu")
        z = torch.cat([head(chunk) for chunk in cached.features.split(256)])
    model.age_head.train(was_training)
    windows = (z * model.age_std.cpu() + model.age_mean.cpu()).numpy().astype(np.float64)
    volumes = pd.Series(windows).groupby(cached.volume.numpy()).mean().to_numpy()
    return windows, volumes


def _volume_mae(model: AgeUNet, cached: WindowFeatures) -> float:
    """MAE in weeks of the volume ages (window mean) against the true ages."""
    _, predicted = head_ages(model, cached)
    truth = pd.Series(cached.ages.numpy()).groupby(cached.volume.numpy()).first().to_numpy()
    return float(np.abs(predicted - truth).mean())


def train_head_on_features(
    model: AgeUNet,
    train: WindowFeatures,
    val: WindowFeatures,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Train ``model.age_head`` alone on cached bottleneck features (no U-Net forward).

    The head regresses ``(age - model.age_mean) / model.age_std`` (standardised ages, or
    weeks for a run that does not standardise: mean 0, std 1) with an MSE loss and AdamW,
    in shuffled mini-batches of windows; after every epoch the validation volumes' ages
    (window mean) are scored, and the head is left with the weights of the epoch with the
    lowest validation MAE. Nothing outside the head changes.

    Args:
        model: the AgeU-Net; only ``model.age_head`` is trained (on the CPU).
        train: cached features of the training volumes.
        val: cached features of the validation volumes.
        epochs: passes over the training windows.
        learning_rate: AdamW learning rate.
        batch_size: windows per step.
        weight_decay: AdamW weight decay.
        seed: seeds the shuffling (and dropout).

    Returns:
        One row per epoch: ``epoch``, ``train_loss`` (MSE of the head's targets),
        ``train_age_mae_w`` (window ages, weeks), ``val_age_mae_w`` (volume ages, weeks),
        ``epoch_time_s``.
    """
    if epochs < 1 or len(train) == 0 or len(val) == 0:
        raise ConfigError(f"need epochs >= 1 and cached windows, got {epochs}, {len(train)}")
    head = model.age_head.to("cpu").train()
    mean, std = model.age_mean.cpu(), model.age_std.cpu()
    target = ((train.ages - mean) / std).float()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows, best, best_mae = [], None, float("inf")
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        head.train()
        total_se, total_ae = 0.0, 0.0
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            predicted = head(train.features[index])
            loss = torch.mean((predicted - target[index]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_se += float(loss.detach()) * len(index)
            total_ae += float((predicted.detach() - target[index]).abs().sum() * std)
        val_mae = _volume_mae(model, val)
        if val_mae < best_mae:
            best_mae = val_mae
            best = {k: v.detach().clone() for k, v in head.state_dict().items()}
        rows.append(
            {
                "epoch": epoch,
                "train_loss": total_se / len(train),
                "train_age_mae_w": total_ae / len(train),
                "val_age_mae_w": val_mae,
                "epoch_time_s": time.perf_counter() - started,
            }
        )
    head.load_state_dict(best)
    head.eval()
    return pd.DataFrame(rows)


def _centre_patch_dice(
    model: AgeUNet, records: Sequence[Record], config: TrainingConfig
) -> dict[str, float]:
    """The ``val_dice*`` columns of ``log.tsv``: centre patches, as :func:`neonb.engine.fit`."""
    metric = ClassDiceMetric(NUM_CLASSES)
    device = resolve_device(config.device)
    model.to(device).eval()
    with torch.no_grad():
        for batch in validation_loader(records, config):
            logits = segmentation_logits(model(batch["image"].to(device))).float()
            metric(y_pred=class_indices(logits, dim=1, keepdim=True), y=batch["label"].to(device))
    dice = metric.per_class().cpu()
    return {
        "val_dice": float(torch.nanmean(dice)),
        "val_dice_nobg": float(torch.nanmean(dice[tissue_indices(NUM_CLASSES)])),
        **{class_column(c): float(dice[c]) for c in range(NUM_CLASSES)},
    }


def train_staged_head(
    model: AgeUNet,
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    config: TrainingConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Staged training: cache the frozen network's window features, then fit the head.

    Every training and validation volume goes once through the frozen segmentation path
    on the sliding windows of test time (:func:`cache_window_features`); the head then
    trains on those features alone for ``config.epochs`` epochs
    (:func:`train_head_on_features`, learning rate ``head_learning_rate`` or the run's,
    batches of ``feature_batch_size`` windows). Writes into ``run_dir``: the run's
    ``config.yaml`` and ``environment.json``, :data:`AGE_LOG_FILE` (per-epoch age errors),
    ``log.tsv`` (the :mod:`neonb.engine` columns; the validation Dice is the frozen
    network's, on centre patches) and ``model_best.pt`` (whole AgeU-Net, best head).

    Returns:
        The ``log.tsv`` table.
    """
    run_dir = Path(run_dir)
    head = model.head_config
    started = time.perf_counter()
    model.freeze_backbone().eval()
    train = cache_window_features(model, train_records, config)
    val = cache_window_features(model, val_records, config)
    cache_s = time.perf_counter() - started
    if progress:
        print(f"cached {len(train)} training and {len(val)} validation windows in {cache_s:.1f} s")
    age_log = train_head_on_features(
        model,
        train,
        val,
        epochs=config.epochs,
        learning_rate=head.head_learning_rate or config.learning_rate,
        batch_size=head.feature_batch_size,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )
    dice = _centre_patch_dice(model, val_records, config)
    log = pd.DataFrame(
        {
            "epoch": age_log["epoch"],
            "train_loss": age_log["train_loss"],
            "lr": head.head_learning_rate or config.learning_rate,
            "epoch_time_s": age_log["epoch_time_s"],
            "data_time_s": 0.0,
            **dice,
            "val_age_mae_w": age_log["val_age_mae_w"],
        }
    )
    log.loc[0, "data_time_s"] = cache_s  # the feature cache, once
    log.loc[0, "epoch_time_s"] += cache_s
    age_log = age_log.assign(
        alpha=np.nan, train_age_mse_w2=age_log["train_loss"] * float(model.age_std) ** 2
    )[["epoch", "alpha", "train_age_mse_w2", "train_age_mae_w", "val_age_mae_w"]]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(run_dir, config.to_dict(), config.seed, resolve_device(config.device))
    atomic_write(run_dir / AGE_LOG_FILE, lambda tmp: age_log.to_csv(tmp, sep="\t", index=False))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(run_dir / BEST_MODEL_FILE, lambda tmp: torch.save(state, tmp))
    atomic_write(run_dir / LOG_FILE, lambda tmp: log.to_csv(tmp, sep="\t", index=False))
    return log


# --------------------------------------------------------------------------- runs


def age_standardization(ages: Sequence[float], standardize: bool) -> tuple[float, float]:
    """``(mean, std)`` of the training ages in weeks, or ``(0, 1)`` without standardisation."""
    values = np.asarray(ages, dtype=np.float64)
    if not standardize:
        return 0.0, 1.0
    if values.size < 2 or not values.std() > 0:
        raise ConfigError(f"need at least two different training ages to standardise, got {values}")
    return float(values.mean()), float(values.std())


def _head_optimizer(model: AgeUNet, config: TrainingConfig, head: AgeHeadConfig):
    head_lr = head.head_learning_rate or config.learning_rate
    groups = [{"params": list(model.head_parameters()), "lr": head_lr}]
    if not head.staged:
        groups.insert(0, {"params": list(model.backbone_parameters())})
    return build_optimizer(groups, config)


def _write_age_head(run_dir: Path, record: dict[str, Any]) -> None:
    if not distributed.is_main():  # process 0 writes the run folder
        return
    path = run_dir / AGE_HEAD_FILE
    text = yaml.safe_dump(record, sort_keys=False)
    if path.exists():
        if _normalised_head_record(path) != record:
            warnings.warn(
                f"{path} differs from this run's head settings; keeping the file written when "
                "the run started",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _normalised_head_record(path: Path) -> dict[str, Any]:
    """An :data:`AGE_HEAD_FILE` with head settings added since it was written at defaults."""
    record = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        record["head"] = AgeHeadConfig.from_dict(record["head"]).to_dict()
    except (ConfigError, KeyError, TypeError):
        pass
    return record


def _write_age_log(run_dir: Path, loss: AgeUNetLoss) -> None:
    history = loss.history
    if distributed.is_distributed():  # every process saw its share of the patches
        epochs = sorted(set().union(*distributed.gather(sorted(history))))
        sums = distributed.sum_all([v for e in epochs for v in history.get(e, [0.0, 0.0, 0])])
        history = {e: sums[3 * i : 3 * i + 3] for i, e in enumerate(epochs)}
    if not distributed.is_main():
        return
    rows = [
        {
            "epoch": epoch + 1,
            "alpha": alpha_at(epoch, loss.epochs, loss.head),
            "train_age_mse_w2": sse / n,
            "train_age_mae_w": sae / n,
        }
        for epoch, (sse, sae, n) in sorted(history.items())
        if n
    ]
    if not rows:
        return
    path = run_dir / AGE_LOG_FILE
    table = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path, sep="\t")
        table = pd.concat([old[~old["epoch"].isin(table["epoch"])], table]).sort_values("epoch")
    atomic_write(path, lambda tmp: table.to_csv(tmp, sep="\t", index=False))


def train_ageunet(
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    config: TrainingConfig,
    head: AgeHeadConfig,
    run_dir: str | os.PathLike,
    *,
    init_weights: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainedRun:
    """Train an AgeU-Net (joint or staged) in ``run_dir``; a finished run is reloaded.

    The run folder is that of :func:`neonb.experiment.train_segmentation` plus
    :data:`AGE_HEAD_FILE` (head settings, age standardisation, the age the head starts at,
    weights file) and :data:`AGE_LOG_FILE` (training age error per epoch). The new head
    starts at the mean training age (:meth:`AgeHead.start_at`, neonb's choice).

    Args:
        train_records: training sessions, with ``scan_age``.
        val_records: validation sessions (validated on segmentation Dice, as the baseline).
        config: the run's settings (patch, epochs, optimiser, learning rate...).
        head: the age head and its recipe.
        run_dir: the run folder.
        init_weights: a trained baseline's ``model_best.pt`` to start the segmentation path
            from (required when ``head.staged``); ``None``: random initialisation.
        progress: show progress bars.

    Returns:
        The run, its model holding the weights of the best validation epoch (joint) or
        of the epoch with the lowest validation age MAE (staged,
        :func:`train_staged_head`).
    """
    if head.staged and init_weights is None:
        raise ConfigError("staged training trains the head on a trained network: give init_weights")
    run_dir = Path(run_dir)
    train_ages = [r["scan_age"] for r in train_records]
    age_mean, age_std = age_standardization(train_ages, head.standardize)
    start = float(np.mean(train_ages))
    _write_age_head(
        run_dir,
        {
            "head": head.to_dict(),
            "age_mean": age_mean,
            "age_std": age_std,
            "head_starts_at_weeks": start,
            "weights": BEST_MODEL_FILE,
            "init_weights": None if init_weights is None else str(init_weights),
        },
    )
    if head.staged and (run_dir / LOG_FILE).is_file() and (run_dir / BEST_MODEL_FILE).is_file():
        return load_ageunet_run(run_dir)[0]
    torch.manual_seed(config.seed)
    model = build_ageunet(config.model, head, age_mean=age_mean, age_std=age_std)
    model.age_head.start_at((start - age_mean) / age_std)  # the mean training age
    if init_weights is not None:
        load_backbone(model, init_weights)
    if head.staged:
        log = train_staged_head(
            model, train_records, val_records, config, run_dir, progress=progress
        )
        write_val_sessions(val_records, run_dir / VAL_SESSIONS_FILE)
        return TrainedRun(model.eval(), log, run_dir, float(log["epoch_time_s"].sum()))
    loss = AgeUNetLoss(segmentation_loss(config), head, epochs=config.epochs, age_std=age_std)
    trained = train_segmentation(
        train_records,
        val_records,
        config,
        run_dir,
        model=model,
        loss_fn=loss,
        optimizer=_head_optimizer(model, config, head),
        segmentation_logits=segmentation_logits,
        progress=progress,
    )
    _write_age_log(run_dir, loss)
    return trained


def load_ageunet_run(
    run_dir: str | os.PathLike,
) -> tuple[TrainedRun, TrainingConfig, AgeHeadConfig]:
    """Rebuild a trained AgeU-Net from its run folder alone (weights loaded ``weights_only``).

    Raises:
        DataError: naming the missing file when the run has not finished.
    """
    run_dir = Path(run_dir)
    config, log = read_finished_run(run_dir, extra_files=(AGE_HEAD_FILE,), chapter="02_ageunet")
    record = yaml.safe_load((run_dir / AGE_HEAD_FILE).read_text(encoding="utf-8"))
    head = AgeHeadConfig.from_dict(record["head"])
    model = build_ageunet(
        config.model, head, age_mean=record["age_mean"], age_std=record["age_std"]
    )
    load_weights(model, run_dir / record.get("weights", BEST_MODEL_FILE))
    model.eval()
    return TrainedRun(model, log, run_dir, float(log["epoch_time_s"].sum())), config, head


def summary_table(
    per_class: pd.DataFrame,
    ages: pd.DataFrame,
    baseline_per_class: pd.DataFrame,
    mean_age: float,
    *,
    by: str = "variant",
    run: str = "run",
) -> pd.DataFrame:
    """The chapter's table: test Dice of the baseline and every AgeU-Net, age errors.

    Args:
        per_class: per-class rows of :func:`neonb.experiment.evaluate` of every model,
            with a ``by`` column and, for replicated runs, a ``run`` column.
        ages: its per-volume rows with ``window_hook=WindowAges`` (the ages) of every
            model, with the same columns.
        baseline_per_class: the baseline's per-class test rows (one run).
        mean_age: the mean predictor's constant age (mean training age), weeks.
        by: the column naming the model (variant).
        run: the column numbering a model's runs (absent: one run each).

    Returns:
        One row per model (``baseline``, ``AgeU-Net: <name>``, ``mean predictor``) with
        ``runs``, ``test Dice (no BG)`` (mean over sessions of the tissue mean),
        ``age MAE (weeks)``, ``age MSE (weeks²)`` (window mean), their foreground-weighted
        counterparts, and the SD of the predicted ages and their correlation with the true
        ages: a head that learned the mean age has an SD near 0, whatever its MAE. A model
        with several runs gets the mean of its runs' values, then one row per run
        (``AgeU-Net: <name>, run <k>``).
    """

    def dice(rows: pd.DataFrame) -> float:
        return float(case_summary(rows)["dice_mean_nobg"].mean())

    def one_run(rows: pd.DataFrame, predicted: pd.DataFrame) -> dict[str, float]:
        errors = age_errors(predicted, baseline_age=mean_age)
        return {
            "test Dice (no BG)": dice(rows),
            "age MAE (weeks)": errors.loc["mean", "MAE (weeks)"],
            "age MSE (weeks²)": errors.loc["mean", "MSE (weeks²)"],
            "age MAE, fg-weighted": errors.loc["foreground_weighted", "MAE (weeks)"],
            "age MSE, fg-weighted": errors.loc["foreground_weighted", "MSE (weeks²)"],
            **_spread(predicted),
        }

    table: dict[str, dict[str, float]] = {
        "baseline": {"runs": 1, "test Dice (no BG)": dice(baseline_per_class)}
    }
    per_class, ages = _with_run(per_class, run), _with_run(ages, run)
    for name in dict.fromkeys(ages[by]):
        mine = ages[ages[by] == name]
        runs = {
            k: one_run(per_class[(per_class[by] == name) & (per_class[run] == k)], rows)
            for k, rows in mine.groupby(run, sort=True)
        }
        mean = pd.DataFrame(runs.values()).mean()
        table[f"AgeU-Net: {name}"] = {"runs": len(runs), **mean.to_dict()}
        if len(runs) > 1:
            for k, values in runs.items():
                table[f"AgeU-Net: {name}, run {k}"] = {"runs": 1, **values}
    if len(ages):
        errors = age_errors(ages.drop_duplicates(["participant_id", "session_id"]), mean_age)
        table["mean predictor"] = {
            "age MAE (weeks)": errors.loc["mean predictor", "MAE (weeks)"],
            "age MSE (weeks²)": errors.loc["mean predictor", "MSE (weeks²)"],
        }
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("model")


def _with_run(table: pd.DataFrame, run: str) -> pd.DataFrame:
    """``table`` with a ``run`` column (0 for every row when it has none)."""
    return table if run in table else table.assign(**{run: 0})


def _spread(ages: pd.DataFrame) -> dict[str, float]:
    """SD of the predicted ages and their correlation with the true ages (NaN if constant)."""
    predicted, truth = ages["age_mean"].to_numpy(float), ages["scan_age"].to_numpy(float)
    varies = predicted.std() > 0 and truth.std() > 0
    return {
        "predicted SD (weeks)": float(predicted.std()),
        "r (predicted, true)": float(np.corrcoef(predicted, truth)[0, 1]) if varies else np.nan,
    }


CONSTANT_FRACTION = 0.25
"""A head whose predictions spread less than this fraction of the true ages' SD is constant."""

VERDICTS = (
    "mean age learned",
    "beats the mean predictor",
    "not shown to beat the mean predictor",
    "worse than the mean predictor",
)
"""What :func:`age_verdicts` says of a variant's test ages."""


def _paired_p(errors: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired absolute errors (1 when all are equal)."""
    from scipy.stats import wilcoxon

    differences = errors - reference
    if not np.any(differences != 0):
        return 1.0
    return float(wilcoxon(errors, reference).pvalue)


def age_verdicts(
    ages: pd.DataFrame,
    mean_age: float,
    *,
    by: str = "variant",
    run: str = "run",
    predicted: str = "age_mean",
    constant_fraction: float = CONSTANT_FRACTION,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Did each variant's head learn the mean age, or beat the mean predictor?

    Two rules, applied in this order to the test ages of every variant (its runs pooled):

    1. **mean age learned**: the predicted ages spread less than ``constant_fraction`` of
       the true ages' SD (SD over the test sessions, population SD, mean over the runs):
       the head predicts a nearly constant age, as the paper's did.
    2. Otherwise the variant's absolute error of each test session (mean over its runs) is
       compared with that of the **mean predictor** (every session gets ``mean_age``) by a
       two-sided Wilcoxon signed-rank test on the paired sessions
       (``scipy.stats.wilcoxon``; paired, as both are scored on the same sessions, and
       rank-based, as a dozen absolute errors need not be normal): **beats the mean
       predictor** when its MAE is lower and p < ``alpha``; **worse than the mean
       predictor** when its MAE is higher and p < ``alpha``; else **not shown to beat the
       mean predictor** (a lower point MAE alone is not enough).

    Args:
        ages: per-volume ages (:func:`neonb.experiment.evaluate`, ``window_hook=WindowAges``)
            with ``participant_id``, ``session_id``, ``scan_age``, ``predicted``, a ``by``
            column and, for replicated runs, ``run``.
        mean_age: the mean predictor's constant age (mean training age), weeks.
        by: the column naming the variant.
        run: the column numbering a variant's runs (absent: one run each).
        predicted: the column of predicted ages (``age_mean`` or
            ``age_foreground_weighted``).
        constant_fraction: rule 1's fraction of the true ages' SD.
        alpha: rule 2's significance level.

    Returns:
        One row per variant, in the order of ``ages``: ``variant``, ``runs``, ``sessions``,
        ``MAE (weeks)``, ``mean predictor MAE (weeks)``, ``predicted SD (weeks)``,
        ``true SD (weeks)``, ``r (predicted, true)`` (mean over runs), ``p (Wilcoxon)``,
        ``verdict`` (one of :data:`VERDICTS`) and ``rule`` (the rule that decided it, with
        its numbers).

    Raises:
        ConfigError: for a bad ``constant_fraction`` or ``alpha``, or a variant whose runs
            were scored on different sessions.

    Example:
        >>> ages = pd.DataFrame({"variant": "flat", "participant_id": ["a", "b", "c"],
        ...     "session_id": "1", "scan_age": [30.0, 38.0, 42.0], "age_mean": 37.0})
        >>> age_verdicts(ages, mean_age=37.0).loc[0, "verdict"]
        'mean age learned'
    """
    if not 0 < constant_fraction < 1 or not 0 < alpha < 1:
        raise ConfigError(
            f"constant_fraction and alpha must be in (0, 1), got {constant_fraction}, {alpha}"
        )
    keys = ["participant_id", "session_id"]
    ages = _with_run(ages, run)
    rows = []
    for name in dict.fromkeys(ages[by]):
        mine = ages[ages[by] == name].assign(
            abs_error=lambda t: (t[predicted] - t["scan_age"]).abs()
        )
        sessions = mine.groupby(run)[keys].apply(lambda t: sorted(map(tuple, t.to_numpy())))
        if sessions.map(tuple).nunique() > 1:
            raise ConfigError(f"the runs of {name!r} were scored on different test sessions")
        per_session = mine.groupby(keys, sort=True).agg(
            abs_error=("abs_error", "mean"), scan_age=("scan_age", "first")
        )
        reference = (per_session["scan_age"] - mean_age).abs().to_numpy(float)
        errors = per_session["abs_error"].to_numpy(float)
        spread = pd.DataFrame(
            [_spread(t.rename(columns={predicted: "age_mean"})) for _, t in mine.groupby(run)]
        ).mean()
        sd, r = spread["predicted SD (weeks)"], spread["r (predicted, true)"]
        true_sd = float(per_session["scan_age"].std(ddof=0))
        mae, mean_mae = float(errors.mean()), float(reference.mean())
        p = _paired_p(errors, reference)
        if sd < constant_fraction * true_sd:
            verdict = VERDICTS[0]
            rule = (
                f"predicted SD {sd:.2f} < {constant_fraction:g} × true SD {true_sd:.2f} weeks: "
                "a nearly constant age"
            )
        else:
            test = f"Wilcoxon signed-rank on {len(errors)} paired sessions, p = {p:.3g}"
            if p < alpha and mae < mean_mae:
                verdict, sign = VERDICTS[1], "<"
            elif p < alpha and mae > mean_mae:
                verdict, sign = VERDICTS[3], ">"
            else:
                verdict, sign = VERDICTS[2], "<" if mae < mean_mae else "≥"
            level = "<" if p < alpha else "≥"
            rule = (
                f"predicted SD {sd:.2f} ≥ {constant_fraction:g} × true SD {true_sd:.2f}; "
                f"MAE {mae:.2f} {sign} {mean_mae:.2f} weeks (mean predictor); "
                f"{test} {level} {alpha:g}"
            )
        rows.append(
            {
                "variant": name,
                "runs": int(mine[run].nunique()),
                "sessions": len(errors),
                "MAE (weeks)": mae,
                "mean predictor MAE (weeks)": mean_mae,
                "predicted SD (weeks)": float(sd),
                "true SD (weeks)": true_sd,
                "r (predicted, true)": float(r),
                "p (Wilcoxon)": p,
                "verdict": verdict,
                "rule": rule,
            }
        )
    return pd.DataFrame(rows)
