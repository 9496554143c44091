"""Domain randomisation: train on images synthesised from the labels (SynthSeg-style).

Billot et al. (SynthSeg, Medical Image Analysis 2023) train a segmentation network on images
drawn afresh from each label map: every label gets intensities from a Gaussian whose mean and
standard deviation are themselves random, and the image is then blurred, given a bias field,
a random resolution and a gamma curve. A network that never sees the same contrast twice
cannot rely on one scanner's contrast, which is what the robustness chapter tests
(:mod:`neonb.robustness`).

neonb does this with TorchIO's transforms (``RandomLabelsToImage``, ``RandomBlur``,
``RandomBiasField``, ``RandomMotion``, ``RandomGhosting``, ``RandomAnisotropy``,
``RandomGamma``, ``RandomNoise``) inside one MONAI dictionary transform,
:class:`SynthesizeImaged`, which :func:`neonb.transforms.augmentation_transforms` puts after
the spatial augmentation (flips and elastic deformation move the label first) and before the
intensity augmentations. Each patch is synthesised, so a volume gives a new image at every
epoch; with probability :attr:`SynthesisConfig.real_prob` the real image is kept, so the
network still sees real contrast (SynthSeg trains on synthetic images only).

TorchIO is imported when a synthesis transform is built, not when this module is imported,
so that ``neonb segment`` and :class:`SynthesisConfig` work without loading it.

Example:
    >>> import torch
    >>> from neonb.synthesis import SynthesisConfig, SynthesizeImaged
    >>> label = torch.zeros(1, 24, 24, 24)
    >>> label[:, 4:20, 4:20, 4:20] = 3
    >>> image = (label > 0).float().repeat(2, 1, 1, 1)
    >>> synth = SynthesizeImaged(SynthesisConfig(real_prob=0.0)).set_random_state(seed=0)
    >>> synth({"image": image, "label": label})["image"].shape
    torch.Size([2, 24, 24, 24])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import MAX_SEED

from neonb.errors import ConfigError

__all__ = ["SynthesisConfig", "SynthesizeImaged", "synthesize_image"]

BIAS_ORDER = 3
"""Order of the polynomial bias field (TorchIO's default)."""

_LABEL = "label"
_IMAGE = "image"


@dataclass(frozen=True)
class SynthesisConfig:
    """How :class:`SynthesizeImaged` draws an image from a label map.

    Every patch draws all of these afresh, separately for each channel (T1w and T2w get
    unrelated contrasts). Intensities are synthesised on a 0-1 scale, rescaled to [0, 1]
    before the gamma curve and z-normalised at the end, so the means, standard deviations
    and noise below are fractions of that scale. Lengths are in mm (the patch's affine gives
    the voxel size).

    Sources of the defaults. SynthSeg's generator (Billot et al., 2023; the defaults of its
    code) draws each label's mean from U(25, 225) and SD from U(5, 25) on a 0-255 scale, a
    bias field of log-SD up to 0.7, slices up to 8 mm thick and a gamma curve. TorchIO's
    defaults are of the same kind on a 0-1 scale and are taken as they are for the means
    (0.1-0.9, SynthSeg's range), SDs (0.01-0.1), bias coefficients (±0.5, order 3),
    anisotropy factor (1.5-5) and log-gamma (±0.3). neonb's choices: keep the real image
    20 % of the time; blur SD up to 1 mm (two dHCP voxels; TorchIO's 0-2 mm is meant for
    1 mm adult scans); anisotropy half of the time; noise SD up to 0.05 (TorchIO's 0.25 is
    several times the contrast between tissues here); no motion or ghosting (SynthSeg has
    neither; turned on, they take TorchIO's defaults: 2 movements of up to 10 deg and
    10 mm, 4-10 ghosts of intensity 0.5-1), which keeps motion an unseen shift for
    :mod:`neonb.robustness`.

    Attributes:
        real_prob: probability of leaving the patch's real image as it is.
        mean_range: range of each label's mean intensity, drawn uniformly per label.
        std_range: range of each label's intensity SD, drawn uniformly per label.
        blur_std: range of the Gaussian blur SD in mm, drawn per axis (partial volume).
        bias_coefficient: the bias-field polynomial coefficients are drawn from
            ``U(-c, c)``; 0 turns the bias field off.
        anisotropy_prob: probability of simulating thick slices.
        anisotropy_factor: range of the factor by which the voxel size along one random axis
            is multiplied before resampling back (nearest-neighbour down, linear up).
        gamma_log: range of ``log(gamma)``; the image, rescaled to [0, 1], is raised to
            ``gamma``.
        noise_std: range of the SD of the Gaussian noise added last (0-1 scale).
        motion_prob: probability of a simulated head movement (``RandomMotion``).
        ghosting_prob: probability of ghosting along a phase-encoding axis
            (``RandomGhosting``).

    Raises:
        ConfigError: when a probability is outside [0, 1], a range is not a pair
            ``low <= high``, or a mean, SD, blur, coefficient or noise is negative, or an
            anisotropy factor is below 1.
    """

    real_prob: float = 0.2
    mean_range: tuple[float, float] = (0.1, 0.9)
    std_range: tuple[float, float] = (0.01, 0.1)
    blur_std: tuple[float, float] = (0.0, 1.0)
    bias_coefficient: float = 0.5
    anisotropy_prob: float = 0.5
    anisotropy_factor: tuple[float, float] = (1.5, 5.0)
    gamma_log: tuple[float, float] = (-0.3, 0.3)
    noise_std: tuple[float, float] = (0.0, 0.05)
    motion_prob: float = 0.0
    ghosting_prob: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_prob"):
                if not 0.0 <= float(value) <= 1.0:
                    raise ConfigError(
                        f"{field.name} must be a probability in [0, 1], but found {value!r}"
                    )
                object.__setattr__(self, field.name, float(value))
            elif field.name == "bias_coefficient":
                if not float(value) >= 0.0:
                    raise ConfigError(f"bias_coefficient must be at least 0, but found {value!r}")
                object.__setattr__(self, field.name, float(value))
            else:
                low = None if field.name == "gamma_log" else 0.0
                if field.name == "anisotropy_factor":
                    low = 1.0
                object.__setattr__(self, field.name, _range(value, field.name, low))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SynthesisConfig:
        """Build a config from a plain mapping (YAML/JSON); missing fields keep their defaults.

        Raises:
            ConfigError: for an unknown field (the message lists the known ones) or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown synthesis setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> SynthesisConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def synthesize_image(
    label: torch.Tensor,
    affine: np.ndarray,
    config: SynthesisConfig,
    channels: int = 1,
) -> torch.Tensor:
    """Draw ``channels`` images from a label map with TorchIO's transforms.

    Uses torch's global random generator (TorchIO draws from it); seed or fork it to repeat
    a draw, as :class:`SynthesizeImaged` does.

    Args:
        label: integer-valued labels, shape ``(1, X, Y, Z)``.
        affine: 4 x 4 voxel-to-world matrix (mm) of the label.
        config: the synthesis settings (``real_prob`` is not used here).
        channels: number of independent images to draw.

    Returns:
        float32 tensor ``(channels, X, Y, Z)``, not masked or normalised: roughly in [0, 1]
        plus noise.
    """
    import torchio as tio

    subject = tio.Subject(
        {_LABEL: tio.LabelMap(tensor=label.detach().cpu().round().to(torch.int16), affine=affine)}
    )
    chain = _torchio_chain(config)
    images = [chain(subject)[_IMAGE].data[0].to(torch.float32) for _ in range(channels)]
    return torch.stack(images)


class SynthesizeImaged(MapTransform, Randomizable):
    """Replace every channel of ``image`` with one synthesised from ``label`` (SynthSeg).

    With probability ``config.real_prob`` the sample passes unchanged. Otherwise each channel
    of ``image`` becomes an image drawn by :func:`synthesize_image` (independently per
    channel), set to 0 outside the head (voxels where the original image is 0 in every
    channel: outside the head, and zero padding) and z-normalised over the head, as
    :func:`neonb.transforms.preprocessing_transforms` normalises real images. ``label`` and
    the other keys are untouched.

    The draw is set by MONAI's random state (``set_random_state``, or
    :class:`neonb.engine.SeededSamples` through ``Compose``): :meth:`randomize` draws the
    real/synthetic choice and a seed for torch's generator, which TorchIO uses; that
    generator is forked, so the global one is left as it was.

    Args:
        config: the synthesis settings; ``None`` for the defaults.
        keys: key of the image, ``(C, X, Y, Z)``.
        label_key: key of the labels, ``(1, X, Y, Z)``, on the same grid.
        allow_missing_keys: skip a sample without ``keys`` instead of raising ``KeyError``.

    Raises:
        KeyError: (when called) when the image or the label key is missing.
    """

    def __init__(
        self,
        config: SynthesisConfig | None = None,
        keys: Sequence[str] | str = _IMAGE,
        label_key: str = _LABEL,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.config = SynthesisConfig() if config is None else config
        self.label_key = label_key
        self._keep_real = True
        self._torch_seed = 0
        import torchio  # noqa: F401  (fail here, not in a data-loading worker)

    def randomize(self, data: Any = None) -> None:
        """Draw whether to keep the real image, and the seed of the synthesis."""
        self._keep_real = bool(self.R.rand() < self.config.real_prob)
        self._torch_seed = int(self.R.randint(MAX_SEED))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if self._keep_real:
            return d
        label = d[self.label_key]
        for key in self.key_iterator(d):
            d[key] = self._synthesize(d[key], label)
        return d

    def _synthesize(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        head = (plain != 0).any(dim=0)
        out = torch.zeros_like(plain, dtype=torch.float32)
        if head.any():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._torch_seed)
                synth = synthesize_image(
                    torch.as_tensor(label), _affine(image, label), self.config, plain.shape[0]
                )
            out[:] = _normalise(synth.to(plain.device), head)
        if isinstance(image, MetaTensor):
            return MetaTensor(out, meta=dict(image.meta))
        return out


def _torchio_chain(config: SynthesisConfig) -> Any:
    """The TorchIO transforms that draw one image from ``label`` into ``image``.

    Order: tissue intensities (Gaussian mixture), partial-volume blur, the coil's bias
    field, k-space artefacts (motion, ghosting), slice thickness, rescaling to [0, 1], gamma
    curve, then thermal noise.
    """
    import torchio as tio

    transforms = [
        tio.RandomLabelsToImage(
            label_key=_LABEL,
            image_key=_IMAGE,
            default_mean=config.mean_range,
            default_std=config.std_range,
        ),
        tio.RandomBlur(std=config.blur_std, include=[_IMAGE]),
    ]
    if config.bias_coefficient > 0:
        transforms.append(
            tio.RandomBiasField(
                coefficients=config.bias_coefficient, order=BIAS_ORDER, include=[_IMAGE]
            )
        )
    if config.motion_prob > 0:
        transforms.append(tio.RandomMotion(p=config.motion_prob, include=[_IMAGE]))
    if config.ghosting_prob > 0:
        transforms.append(tio.RandomGhosting(p=config.ghosting_prob, include=[_IMAGE]))
    if config.anisotropy_prob > 0:
        transforms.append(
            tio.RandomAnisotropy(
                downsampling=config.anisotropy_factor,
                p=config.anisotropy_prob,
                include=[_IMAGE],
            )
        )
    transforms += [
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), include=[_IMAGE]),
        tio.RandomGamma(log_gamma=config.gamma_log, include=[_IMAGE]),
        tio.RandomNoise(std=config.noise_std, include=[_IMAGE]),
    ]
    return tio.Compose(transforms)


def _normalise(image: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Each channel z-normalised over ``head`` (``(X, Y, Z)`` bool); 0 outside it."""
    out = torch.zeros_like(image)
    for c, channel in enumerate(image):
        values = channel[head].to(torch.float64)
        std = values.std(unbiased=False)
        scaled = (channel - values.mean()) / (std if std > 0 else 1.0)
        out[c] = torch.where(head, scaled.to(image.dtype), 0.0)
    return out


def _affine(image: Any, label: Any) -> np.ndarray:
    """The 4 x 4 affine of a ``MetaTensor`` (image first), else the identity."""
    for value in (image, label):
        if isinstance(value, MetaTensor):
            return np.asarray(value.affine, dtype=np.float64)
    return np.eye(4)


def _range(value: Any, name: str, low: float | None) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high), but found {value!r}") from None
    if not first <= second or (low is not None and first < low):
        bound = "" if low is None else f"{low:g} <= "
        raise ConfigError(f"{name} must satisfy {bound}low <= high, but found {value!r}")
    return first, second
