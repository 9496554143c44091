"""Pre-processing and data augmentation as MONAI dictionary transforms.

Richter & Fetit (2022, §3.2.1-3.2.2) crop each scan to the bounding box of its non-zero voxels,
z-normalise each channel, cut 128³ patches and augment them with random flips, 3D elastic
deformation, Gaussian noise, Gaussian smoothing, intensity scaling and intensity shifting, each
applied with some probability. This module builds those chains from MONAI transforms (the ``d``
suffix: they map over the keys of a sample dict); the only transforms of its own are
:class:`LoadVolumed` (MONAI's loader does not take arrays), :class:`EnsureAnnotationd` and
:class:`ApplyBrainMaskd` (MONAI's ``MaskIntensity`` for samples that may lack a mask).

Data contract. A sample is a dict::

    {"t1w": path_or_array, "t2w": path_or_array, "label": path_or_array,
     "scan_age": float (weeks PMA), "participant_id": str, "session_id": str,
     "annotation": path_or_array (optional), "brain_mask": path_or_array (optional)}

A sample with a ``brain_mask`` (:func:`neonb.data.to_data_dicts` with
``brain_mask="apply"``) has its image channels zeroed outside the mask before cropping and
normalising, so the crop is the brain's bounding box and the z-scores are over the brain;
the label is not masked. The mask is then dropped.

After :func:`preprocessing_transforms` it holds, besides the untouched metadata:

==============  ==================  =======  ==========================================
key             shape               dtype    values
==============  ==================  =======  ==========================================
``image``       ``(2, X, Y, Z)``    float32  z-scores per channel, [T1w, T2w]; 0 outside
``label``       ``(1, X, Y, Z)``    float32  drawem9 classes 0-9 (integer-valued)
``annotation``  ``(1, X, Y, Z)``    float32  1 = annotated, 0 = not (all ones if absent)
==============  ==================  =======  ==========================================

Tensors are MONAI ``MetaTensor`` objects that carry the NIfTI affine. Images keep their stored
voxel grid and order (RAS for the dHCP): no resampling, no reorientation. After
:func:`augmentation_transforms` or :func:`validation_transforms`, ``(X, Y, Z)`` is the patch size.

The annotation mask is the label-budgeting mask of §3.4.1. It goes through every spatial
transform together with ``image`` and ``label``, with the same random draw (MONAI's dictionary
transforms randomise once per call and apply that draw to every key) and nearest-neighbour
interpolation, so it stays aligned with the label voxel for voxel.

Caching. Training and validation cache the output of :func:`preprocessing_transforms` on disk
(:class:`neonb.cache.VolumeDataset`) and apply :func:`augmentation_transforms` or
:func:`validation_transforms` to it afresh; :func:`train_transforms` chains both for a single
sample. Randomness is seeded with ``Compose.set_random_state(seed)``.

Errors. Inside a ``Compose``, MONAI re-raises any error as ``RuntimeError("applying transform
...")`` chained (``__cause__``) to the original: a :class:`~neonb.errors.DataError` for a missing
file or mismatched grids, a ``KeyError`` for a missing key. Set ``MONAI_DEBUG=1`` to get the
original exception directly.

Example:
    >>> from neonb.transforms import AugmentationConfig, train_transforms
    >>> from neonb.models import ModelConfig
    >>> tf = train_transforms((64, 64, 64), AugmentationConfig(), model=ModelConfig())
    >>> tf = tf.set_random_state(seed=0)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Identityd,
    LoadImage,
    MapTransform,
    MaskIntensity,
    NormalizeIntensityd,
    OneOf,
    Rand3DElasticd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import MAX_SEED

from neonb.errors import ConfigError, DataError
from neonb.models import ModelConfig, check_patch_size

if TYPE_CHECKING:
    from neonb.synthesis import SynthesisConfig

__all__ = [
    "ApplyBrainMaskd",
    "AugmentationConfig",
    "EnsureAnnotationd",
    "LoadVolumed",
    "augmentation_transforms",
    "augmented_example",
    "eval_transforms",
    "preprocessing_transforms",
    "train_transforms",
    "validation_transforms",
]

MODALITY_KEYS: tuple[str, str] = ("t1w", "t2w")
"""Input keys concatenated, in this order, into the ``image`` channels."""

REQUIRED_KEYS: tuple[str, str, str] = (*MODALITY_KEYS, "label")
"""Image keys (paths or arrays) every raw sample has; ``annotation`` is optional."""

BRAIN_MASK_KEY = "brain_mask"
"""Optional key of a sample's brain mask (0 outside the brain); dropped after masking."""

SPATIAL_KEYS: tuple[str, str, str] = ("image", "label", "annotation")
"""Keys moved by every spatial transform after pre-processing."""

SPATIAL_MODES: tuple[str, str, str] = ("bilinear", "nearest", "nearest")
"""Interpolation of ``image``, ``label`` and ``annotation`` in the elastic deformation."""

NIFTI_READER = "NibabelReader"
"""MONAI reader for NIfTI files: keeps the stored voxel order (no reorientation)."""


@dataclass(frozen=True)
class AugmentationConfig:
    """Probabilities and ranges of the training augmentation (§3.2.2).

    Every transform is applied independently with its own probability, so a patch is often left
    unaltered, as in the paper, which gives no probabilities or ranges. The defaults follow
    nnU-Net's (Isensee et al., 2021) where the two overlap: mirroring each axis with probability
    0.5; elastic deformation 0.2 with nnU-Net's ``sigma`` 9-13 and ``alpha`` 0-900 (same formula
    as MONAI's: uniform noise, Gaussian-smoothed, times the magnitude; a displacement of up to
    about 3 voxels RMS); noise 0.1; blur 0.2; brightness 0.15. (nnU-Net's standard trainer
    turns elastic deformation off; the intensity shift, which nnU-Net does not have, and its
    values are neonb's choice.) The authors' public code used other values: flips 0.1 per
    axis; elastic deformation 0.24 (sigma 5-8, magnitude 40-80, with small rotations,
    scaling and translation); noise 0.13 (std 0.01); smoothing 0.13 (sigma 0.5-1.15);
    scaling and shifting 0.24 (±0.1). Intensities are z-scores, so ``noise_std`` and
    ``shift_offset`` are in units of the channel's standard deviation.

    Attributes:
        flip_prob: probability of flipping, drawn separately for each axis in ``flip_axes``.
        flip_axes: spatial axes (0 = X, 1 = Y, 2 = Z) that may be flipped.
        elastic_prob: probability of a 3D elastic deformation.
        elastic_sigma: range of the standard deviation, in voxels, of the Gaussian that smooths
            the random displacement field (larger: smoother, gentler deformations).
        elastic_magnitude: range of the factor applied to the smoothed field, uniform noise in
            [-1, 1) before smoothing (``monai.transforms.Rand3DElasticd``).
        noise_prob: probability of adding Gaussian noise.
        noise_std: the noise standard deviation is drawn from ``U(0, noise_std)``.
        smooth_prob: probability of Gaussian smoothing.
        smooth_sigma: range of the smoothing sigma per axis, in voxels.
        scale_prob: probability of intensity scaling.
        scale_factor: intensities are multiplied by ``1 + U(-scale_factor, scale_factor)``.
        shift_prob: probability of intensity shifting.
        shift_offset: ``U(-shift_offset, shift_offset)`` is added to the intensities.

    Raises:
        ConfigError: when a probability is outside [0, 1], a range is reversed or negative, or an
            axis is not 0, 1 or 2.
    """

    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (0, 1, 2)
    elastic_prob: float = 0.2
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    elastic_magnitude: tuple[float, float] = (0.0, 900.0)
    noise_prob: float = 0.1
    noise_std: float = 0.1
    smooth_prob: float = 0.2
    smooth_sigma: tuple[float, float] = (0.5, 1.0)
    scale_prob: float = 0.15
    scale_factor: float = 0.25
    shift_prob: float = 0.15
    shift_offset: float = 0.1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        for name in self.probability_fields():
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], but found {value!r}")
        for name in ("elastic_sigma", "elastic_magnitude", "smooth_sigma"):
            low, high = _as_range(getattr(self, name), name)
            object.__setattr__(self, name, (low, high))
        if self.elastic_sigma[0] <= 0.0:
            raise ConfigError(f"elastic_sigma must be positive, but found {self.elastic_sigma!r}")
        for name in ("noise_std", "scale_factor", "shift_offset"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"{name} must be at least 0, but found {getattr(self, name)!r}")
        axes = self.flip_axes
        if len(set(axes)) != len(axes) or not all(a in (0, 1, 2) for a in axes):
            raise ConfigError(
                f"flip_axes must be distinct axes among 0, 1 and 2, but found {axes!r}"
            )

    @staticmethod
    def probability_fields() -> tuple[str, ...]:
        """Names of the probability fields."""
        return tuple(
            f.name for f in dataclasses.fields(AugmentationConfig) if f.name.endswith("_prob")
        )

    @classmethod
    def none(cls) -> AugmentationConfig:
        """No augmentation: only the random patch crop remains."""
        return cls(**dict.fromkeys(cls.probability_fields(), 0.0))

    @classmethod
    def always(cls) -> AugmentationConfig:
        """Every augmentation on every call (probability 1): for figures and tests."""
        return cls(**dict.fromkeys(cls.probability_fields(), 1.0))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AugmentationConfig:
        """Build a config from a plain mapping (YAML/JSON); missing fields keep their defaults.

        Raises:
            ConfigError: for an unknown field (the message lists the known ones) or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


class LoadVolumed(MapTransform):
    """Load NIfTI files, or wrap arrays, as channel-first float32 ``MetaTensor`` volumes.

    A path is read with MONAI's ``LoadImage`` (nibabel reader, voxel order and affine as stored,
    channel added: ``(1, X, Y, Z)``). An array or tensor of shape ``(X, Y, Z)`` gets a channel
    axis, one of shape ``(1, X, Y, Z)`` is kept; plain arrays get an identity affine and are
    copied. After loading, every loaded key must have the same spatial shape.

    Args:
        keys: keys that must be present, holding paths or arrays.
        optional_keys: keys loaded only when present and not ``None`` (e.g. ``annotation``).
        allow_missing_keys: skip missing ``keys`` too instead of raising ``KeyError``.

    Raises:
        KeyError: when one of ``keys`` is missing (naming it).
        DataError: for a missing file, an array of the wrong dimensionality, or volumes of one
            sample on different voxel grids (naming both files).
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        optional_keys: Sequence[str] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.optional_keys = tuple(optional_keys)
        self.loader = LoadImage(
            reader=NIFTI_READER, image_only=True, ensure_channel_first=True, dtype=np.float32
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        keys += [k for k in self.optional_keys if d.get(k) is not None and k not in keys]
        for key in keys:
            d[key] = self._load(d[key], key)
        _check_same_grid(d, keys)
        return d

    def _load(self, value: Any, key: Hashable) -> MetaTensor:
        if isinstance(value, str | os.PathLike):
            if not Path(value).is_file():
                raise DataError(value, f"{key} image not found")
            return self.loader(value)
        if isinstance(value, np.ndarray | torch.Tensor):
            meta = dict(value.meta) if isinstance(value, MetaTensor) else {}
            plain = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            plain = plain.to(torch.float32, copy=True)
            if plain.ndim == 3:
                plain = plain.unsqueeze(0)
            if plain.ndim != 4 or plain.shape[0] != 1:
                raise DataError(
                    f"<{key} array>", f"has shape {tuple(value.shape)}; expected (X, Y, Z)"
                )
            # channel first before wrapping: MetaTensor infers 3 spatial dims from a 4D tensor
            return MetaTensor(plain, meta=meta)
        raise DataError(
            f"<{key}>", f"expected a path or an array, but found {type(value).__name__}"
        )


class EnsureAnnotationd(MapTransform):
    """Give every sample an ``annotation`` mask of 0 and 1, all ones when it has none.

    A fully labelled sample has no ``annotation`` key; it gets a mask of ones shaped and placed
    like the label, so that the loss treats every voxel as annotated. A given mask is binarised
    (non-zero becomes 1).

    Args:
        label_key: key of the loaded label, ``(1, X, Y, Z)``.
        annotation_key: key of the mask to create or binarise.
    """

    def __init__(self, label_key: str = "label", annotation_key: str = "annotation") -> None:
        super().__init__([annotation_key], allow_missing_keys=True)
        self.label_key = label_key
        self.annotation_key = annotation_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.annotation_key)
        if mask is None:
            d[self.annotation_key] = torch.ones_like(d[self.label_key])
        else:
            d[self.annotation_key] = (mask != 0).to(torch.float32)
        return d


class ApplyBrainMaskd(MapTransform):
    """Zero every channel of ``image`` outside the brain mask, then drop the mask.

    The skull stripping of the paper's "skull-stripped" scans (§4.1.1), made a choice: a
    sample gets it only when it carries a mask. Voxels where the mask is > 0 keep their
    values exactly (MONAI's ``MaskIntensity``); a single-channel mask ``(1, X, Y, Z)`` applies
    to every channel. A sample without ``mask_key`` (or with ``None``) passes unchanged.

    Args:
        keys: keys of the images to mask, each ``(C, X, Y, Z)``.
        mask_key: key of the loaded mask, ``(1, X, Y, Z)`` on the same grid.
    """

    def __init__(self, keys: Sequence[str] | str = "image", mask_key: str = BRAIN_MASK_KEY) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.mask = MaskIntensity(mask_data=None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.pop(self.mask_key, None)
        if mask is not None:
            for key in self.key_iterator(d):
                d[key] = self.mask(d[key], mask_data=mask)
        return d


def preprocessing_transforms(
    *,
    crop: bool = True,
    keep_box: bool = False,
    label: bool = True,
    channels: Sequence[str] = MODALITY_KEYS,
) -> Compose:
    """Deterministic pre-processing of a raw sample (§3.2.1), safe to cache.

    Steps: load the volumes (:class:`LoadVolumed`), create the annotation mask when missing
    (:class:`EnsureAnnotationd`), concatenate T1w and T2w into ``image`` (``ConcatItemsd``, the
    ``t1w``/``t2w`` keys are then dropped), zero ``image`` outside the brain when the sample has
    a ``brain_mask`` (:class:`ApplyBrainMaskd`), crop ``image``, ``label`` and ``annotation`` to the
    bounding box of the voxels that are non-zero in any channel of ``image`` (``CropForegroundd``),
    z-normalise each channel over its non-zero voxels (``NormalizeIntensityd``; zeros stay 0), and
    make float32 tensors (``EnsureTyped``).

    Args:
        crop: crop to the non-zero bounding box. Use ``False`` for whole-volume inference, so that
            the prediction lies on the grid of the input NIfTI file.
        keep_box: with ``crop``, also keep the crop box as ``foreground_start_coord`` and
            ``foreground_end_coord`` (voxel indices on the stored grid, end exclusive), for
            masks loaded after the disk cache (:class:`neonb.cache.VolumeDataset`).
        label: load ``label`` and make ``annotation``; ``False`` for images alone, as
            ``neonb segment`` prepares a scan (:mod:`neonb.segmentation`).
        channels: the modality keys concatenated into ``image``, in order (T1w, T2w).

    Returns:
        A ``Compose`` mapping a raw sample to ``image`` ``(2, X, Y, Z)``, ``label`` and
        ``annotation`` ``(1, X, Y, Z)``; other keys pass through.
    """
    spatial = list(SPATIAL_KEYS) if label else ["image"]
    transforms: list[Any] = [
        LoadVolumed(
            [*channels, "label"] if label else list(channels),
            optional_keys=("annotation", BRAIN_MASK_KEY) if label else (BRAIN_MASK_KEY,),
        ),
        *([EnsureAnnotationd()] if label else []),
        ConcatItemsd(keys=list(channels), name="image", dim=0),
        DeleteItemsd(keys=list(channels)),
        ApplyBrainMaskd("image"),
    ]
    if crop:
        transforms.append(
            CropForegroundd(
                keys=spatial,
                source_key="image",
                select_fn=_is_nonzero,
                start_coord_key="foreground_start_coord" if keep_box else None,
                end_coord_key="foreground_end_coord" if keep_box else None,
            )
        )
    transforms += [
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys=spatial, dtype=torch.float32),
    ]
    return Compose(transforms)


def augmentation_transforms(
    patch_size: int | Sequence[int],
    config: AugmentationConfig | None = None,
    *,
    model: ModelConfig | None = None,
    synthesis: SynthesisConfig | None = None,
) -> Compose:
    """Random patch and training augmentation of a pre-processed sample (§3.2.2).

    Steps: zero-pad ``image``, ``label`` and ``annotation`` to at least ``patch_size``
    (``SpatialPadd``; padded voxels are unannotated), cut a random patch (``RandSpatialCropd``),
    then, each with its own probability from ``config``: flips (``RandFlipd``, one per axis), 3D
    elastic deformation (``Rand3DElasticd``: bilinear for the image, nearest-neighbour for label
    and annotation, reflection at the border), Gaussian noise, Gaussian smoothing, intensity
    scaling and intensity shifting (image only). Transforms with probability 0 are left out.

    With ``synthesis``, the image of the patch is replaced by one drawn from its label
    (:class:`neonb.synthesis.SynthesizeImaged`, domain randomisation) after the flips and
    the elastic deformation, so that the synthetic image is drawn from the moved label and
    is sharp (not interpolated), and before the intensity augmentations, which then act on
    it as on a real image.

    Args:
        patch_size: patch size in voxels, one int or ``(X, Y, Z)``.
        config: augmentation settings; ``None`` for the defaults.
        model: network the patches are for; each patch dimension must be divisible by its total
            stride. ``None`` for the paper's network (total stride 32).
        synthesis: domain-randomisation settings; ``None`` (the default) for none, the chain
            of the paper.

    Returns:
        A ``Compose`` whose output has ``image`` ``(2, *patch_size)`` and ``label``,
        ``annotation`` ``(1, *patch_size)``.

    Raises:
        ConfigError: when ``patch_size`` does not suit the network.
    """
    patch = check_patch_size(patch_size, model)
    config = AugmentationConfig() if config is None else config
    return Compose(_patch_transforms(patch) + _random_transforms(config, synthesis))


def validation_transforms(
    patch_size: int | Sequence[int], *, model: ModelConfig | None = None
) -> Compose:
    """Deterministic validation patch: zero-pad to at least ``patch_size``, then centre crop.

    The paper validates on patches of the training size (§3.2.5), not on whole volumes.

    Args:
        patch_size: patch size in voxels, one int or ``(X, Y, Z)``.
        model: network the patches are for (``None``: the paper's).

    Raises:
        ConfigError: when ``patch_size`` does not suit the network.
    """
    patch = check_patch_size(patch_size, model)
    return Compose(
        [
            SpatialPadd(keys=list(SPATIAL_KEYS), spatial_size=patch),
            CenterSpatialCropd(keys=list(SPATIAL_KEYS), roi_size=patch),
        ]
    )


def train_transforms(
    patch_size: int | Sequence[int],
    config: AugmentationConfig | None = None,
    *,
    model: ModelConfig | None = None,
) -> Compose:
    """Pre-processing (cropped) followed by the augmentation chain, as one flat ``Compose``.

    One flat chain, for a single sample (figures, tests); training caches the pre-processing
    on disk instead (:class:`neonb.cache.VolumeDataset`). See :func:`preprocessing_transforms`
    and :func:`augmentation_transforms`.
    """
    augment = augmentation_transforms(patch_size, config, model=model)
    return Compose([preprocessing_transforms(crop=True), augment]).flatten()


def eval_transforms(
    patch_size: int | Sequence[int] | None = None,
    *,
    crop: bool = True,
    model: ModelConfig | None = None,
) -> Compose:
    """Deterministic transforms for validation or inference.

    Args:
        patch_size: if given, end with the centre patch of :func:`validation_transforms`;
            ``None`` keeps the whole (cropped or uncropped) volume for sliding-window inference.
        crop: crop to the non-zero bounding box; ``False`` keeps the grid of the input files.
        model: network the patches are for (``None``: the paper's); only used with a patch size.
    """
    transforms = [preprocessing_transforms(crop=crop)]
    if patch_size is not None:
        transforms.append(validation_transforms(patch_size, model=model))
    return Compose(transforms).flatten()


def augmented_example(
    sample: Mapping[str, Any],
    patch_size: int | Sequence[int],
    config: AugmentationConfig | None = None,
    seed: int = 0,
    *,
    model: ModelConfig | None = None,
    synthesis: SynthesisConfig | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same patch before and after augmentation, as in the paper's Figure 2.

    Args:
        sample: a raw sample (data contract) or an already pre-processed one (with ``image``).
        patch_size: patch size in voxels.
        config: augmentation settings; :meth:`AugmentationConfig.always` shows every transform.
        seed: seeds both the patch location and the augmentation.
        model: network the patches are for (``None``: the paper's).
        synthesis: domain randomisation as in :func:`augmentation_transforms` (``None``: none).

    Returns:
        ``(before, after)``: dicts with numpy arrays ``image`` ``(2, *patch)``, ``label`` and
        ``annotation`` ``(1, *patch)``, cut at the same place.
    """
    patch = check_patch_size(patch_size, model)
    config = AugmentationConfig() if config is None else config
    data = dict(sample)
    if "image" not in data:
        data = preprocessing_transforms(crop=True)(data)
    seeds = np.random.RandomState(seed).randint(MAX_SEED, size=2, dtype="uint32")
    crop = Compose(_patch_transforms(patch)).set_random_state(seed=int(seeds[0]))
    augment = Compose(_random_transforms(config, synthesis))
    augment = augment.set_random_state(seed=int(seeds[1]))
    before = crop(data)
    before_arrays = _to_numpy(before)
    after = augment(dict(before))
    return before_arrays, _to_numpy(after)


def _patch_transforms(patch: tuple[int, int, int]) -> list[Any]:
    keys = list(SPATIAL_KEYS)
    return [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandSpatialCropd(keys=keys, roi_size=patch, random_size=False),
    ]


def _random_transforms(
    config: AugmentationConfig, synthesis: SynthesisConfig | None = None
) -> list[Any]:
    keys = list(SPATIAL_KEYS)
    transforms: list[Any] = []
    if config.flip_prob > 0:
        transforms += [
            RandFlipd(keys=keys, prob=config.flip_prob, spatial_axis=axis)
            for axis in config.flip_axes
        ]
    if config.elastic_prob > 0:
        transforms.append(_elastic(config))
    if synthesis is not None:
        # imported here: TorchIO is loaded only by chains that synthesise
        from neonb.synthesis import SynthesizeImaged

        transforms.append(SynthesizeImaged(synthesis))
    if config.noise_prob > 0:
        transforms.append(
            RandGaussianNoised(keys="image", prob=config.noise_prob, std=config.noise_std)
        )
    if config.smooth_prob > 0:
        sigma = config.smooth_sigma
        transforms.append(
            RandGaussianSmoothd(
                keys="image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=config.smooth_prob
            )
        )
    if config.scale_prob > 0:
        transforms.append(
            RandScaleIntensityd(keys="image", factors=config.scale_factor, prob=config.scale_prob)
        )
    if config.shift_prob > 0:
        transforms.append(
            RandShiftIntensityd(keys="image", offsets=config.shift_offset, prob=config.shift_prob)
        )
    return transforms


def _elastic(config: AugmentationConfig) -> Any:
    """``Rand3DElasticd`` applied with probability ``elastic_prob``.

    ``Rand3DElasticd`` draws a full-size noise field and resamples every key even when its own
    ``prob`` says no (with an identity grid), which costs as much as a deformation; ``OneOf``
    with ``Identityd`` skips that work.
    """
    elastic = Rand3DElasticd(
        keys=list(SPATIAL_KEYS),
        sigma_range=config.elastic_sigma,
        magnitude_range=config.elastic_magnitude,
        prob=1.0,
        mode=list(SPATIAL_MODES),
        padding_mode="reflection",
    )
    if config.elastic_prob >= 1.0:
        return elastic
    p = config.elastic_prob
    return OneOf([elastic, Identityd(keys=list(SPATIAL_KEYS))], weights=[p, 1.0 - p])


def _is_nonzero(x: Any) -> Any:
    """Foreground selector for ``CropForegroundd`` (a named function, so it pickles)."""
    return x != 0


def _as_range(value: Any, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high), but found {value!r}") from None
    if not 0.0 <= low <= high:
        raise ConfigError(f"{name} must satisfy 0 <= low <= high, but found {value!r}")
    return low, high


def _check_same_grid(d: Mapping[Hashable, Any], keys: Sequence[Hashable]) -> None:
    if not keys:
        return
    first = keys[0]
    for key in keys[1:]:
        if d[key].shape[1:] != d[first].shape[1:]:
            raise DataError(
                _source(d[key], key),
                f"{key} has {tuple(d[key].shape[1:])} voxels but {first} "
                f"({_source(d[first], first)}) has {tuple(d[first].shape[1:])}",
                "all images of a session must share one voxel grid; neonb does not resample",
            )


def _source(volume: Any, key: Hashable) -> str:
    meta = getattr(volume, "meta", {})
    return str(meta.get("filename_or_obj") or f"<{key} array>")


def _to_numpy(d: Mapping[Hashable, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key in SPATIAL_KEYS:
        value = d[key]
        tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
        out[key] = tensor.detach().cpu().numpy().copy()
    return out
