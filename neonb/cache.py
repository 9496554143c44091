"""A disk cache of pre-processed volumes, so that training holds one volume in memory at a time.

Pre-processing a session (loading the NIfTI files, cropping, z-normalising:
:func:`neonb.transforms.preprocessing_transforms`) is deterministic and slow; the random patch
and augmentation after it are cheap by comparison. :class:`VolumeDataset` runs the
pre-processing once per session and stores the result as one ``.pt`` file per session in a
cache folder; later epochs, runs and chapters read that file instead. Only the sample being
transformed is in memory, so host memory does not grow with the number of sessions, as it
did with MONAI's in-memory ``CacheDataset`` (about 130 MB per 0.5 mm dHCP session; see
``benchmarks/bench_memory.py``).

It is MONAI's :class:`~monai.data.PersistentDataset` with four changes:

* **Key.** The file name is the SHA-256 of the record (:func:`record_key`: every value, and for
  each path its absolute name, size and modification time, so a replaced file is never read
  from a stale entry) followed by the SHA-256 of the pre-processing (:func:`transform_key`:
  every deterministic transform with its settings, the MONAI version and
  :data:`CACHE_FORMAT`). MONAI's own transform hash falls back to the transforms' class
  names when they are not JSON-serialisable, which neonb's are not. The input channels are
  settings of the pre-processing (the keys it loads and concatenates), so a T2w-only and a
  T1w+T2w entry of one session never collide.
* **Atomic writes in place.** An entry is written to a unique hidden temporary file in the
  cache folder and renamed (MONAI writes to the system's temporary folder and moves the file
  from there, which is a copy, not a rename, when that is another file system).
* **Small entries.** Every tensor that holds integers 0-255 (label, annotation and brain
  masks) is stored as ``uint8`` and read back as the ``float32`` the transforms expect (bit
  for bit the same values); the image stays ``float32`` (z-scores, which ``float16`` would
  round to three significant digits).
* **Uncached keys.** ``annotation`` (the label-budgeting mask) is not part of the entry: the
  same session is trained under many masks, and each would otherwise store its own copy of
  the image. The mask is loaded after the cache and cropped to the box the pre-processing
  recorded.

Entries are read with ``torch.load(weights_only=True)``: tensors, strings and numbers only
(MONAI metadata is dropped before storing, ``track_meta=False``), so a cache file cannot run
code. An entry that cannot be read (truncated by a full disk, say) is deleted and recomputed
with a warning. Nothing removes old entries: delete the folder to reclaim the space.

Example:
    >>> from neonb.transforms import augmentation_transforms, preprocessing_transforms
    >>> dataset = VolumeDataset(records, preprocessing_transforms(), augmentation_transforms(64),
    ...                         cache_dir="results/paper/cache")
    >>> sample = dataset[0]          # pre-processed once, then read from the cache
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import types
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose
from monai.utils import convert_to_tensor

from neonb.errors import DataError

__all__ = [
    "CACHE_FORMAT",
    "UNCACHED_KEYS",
    "VolumeDataset",
    "record_key",
    "transform_key",
]

CACHE_FORMAT = 1
"""Layout of an entry; part of :func:`transform_key`, so a new layout never reads an old one."""

UNCACHED_KEYS: tuple[str, ...] = ("annotation",)
"""Record keys loaded after the cache rather than stored in it (see the module docstring)."""

NARROWED_KEY = "neonb_uint8"
"""Entry key listing the tensors stored as ``uint8``; removed when the entry is read."""

GRID_KEYS: tuple[str, ...] = ("t2w", "t1w", "label")
"""Record keys whose image gives a session's voxel grid, the first one present (a T1w-only
session has no T2w)."""

BOX_KEYS = ("foreground_start_coord", "foreground_end_coord")
"""Where :func:`neonb.transforms.preprocessing_transforms` records its crop box."""


def _file_facts(value: Any) -> Any:
    """A path as ``(absolute name, size, mtime_ns)`` when it names a file; else the value."""
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        if path.is_file():
            stat = path.stat()
            return ("file", os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        return ("path", os.fspath(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), value.cpu().numpy().tobytes())
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.shape, np.ascontiguousarray(value).tobytes())
    return value


def record_key(record: Mapping[Hashable, Any]) -> bytes:
    """SHA-256 of a record, its files' sizes and modification times included.

    Used as ``hash_func`` of :class:`VolumeDataset`: rewriting, replacing or touching an
    input file gives a new key, and so a new cache entry.

    Args:
        record: a MONAI data dict (paths or arrays, ids, numbers).

    Returns:
        The hexadecimal digest as bytes (what MONAI's ``hash_func`` returns).
    """
    items = sorted((str(key), _file_facts(value)) for key, value in record.items())
    digest = hashlib.sha256(pickle.dumps(items, protocol=4))
    return digest.hexdigest().encode("ascii")


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform and every setting it holds."""
    if depth > 12:
        return f"<{type(obj).__qualname__}>"
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list | tuple | set | frozenset):
        values = [_describe(v, depth + 1) for v in obj]
        return sorted(values, key=repr) if isinstance(obj, set | frozenset) else values
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=str)}
    if isinstance(obj, torch.dtype | np.dtype):
        return str(obj)
    if isinstance(obj, torch.Tensor | np.ndarray):
        array = obj.cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return _describe(obj.__func__, depth + 1)
    if hasattr(obj, "__dict__"):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {"class": _describe(type(obj)), **_describe(state, depth + 1)}
    return f"<{type(obj).__qualname__}>"


def transform_key(transform: Callable[..., Any]) -> str:
    """SHA-256 of a deterministic transform chain: its transforms, their settings and versions.

    Each transform is described by its class and every public attribute, recursively
    (keys, modes, dtypes, selector functions by name), together with :data:`CACHE_FORMAT` and
    the MONAI version. Changing a setting, adding or removing a step, or upgrading MONAI
    gives a new key. Changes to neonb's own transform code need a new :data:`CACHE_FORMAT`.
    """
    description = {
        "format": CACHE_FORMAT,
        "monai": monai.__version__,
        "transform": _describe(transform),
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _narrow(sample: dict[Hashable, Any]) -> dict[Hashable, Any]:
    """Store integer-valued tensors (0-255) as ``uint8``; list them under :data:`NARROWED_KEY`."""
    narrowed = []
    for key, value in sample.items():
        if key == "image" or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        small = value.to(torch.uint8)
        if torch.equal(small.to(value.dtype), value):
            sample[key] = small
            narrowed.append(str(key))
    sample[NARROWED_KEY] = narrowed
    return sample


def _widen(entry: dict[Hashable, Any]) -> dict[Hashable, Any]:
    """Undo :func:`_narrow`: the listed tensors as ``float32`` again."""
    for key in entry.pop(NARROWED_KEY, []):
        entry[key] = entry[key].to(torch.float32)
    return entry


def _spatial_shape(value: Any) -> tuple[int, ...]:
    """Voxel grid of a path (from the NIfTI header) or an array."""
    if isinstance(value, str | os.PathLike):
        return tuple(int(n) for n in nib.load(os.fspath(value)).shape[:3])
    shape = tuple(value.shape)
    return shape[1:] if len(shape) == 4 else shape


class VolumeDataset(PersistentDataset):
    """Sessions pre-processed once into a disk cache, then transformed afresh on every access.

    ``dataset[i]`` is ``transform(preprocess(records[i]))``, where ``preprocess`` comes from
    the cache folder when it has run before on the same record and the same files (see the
    module docstring). Random transforms belong in ``transform``; MONAI's ``set_rnd`` and the
    data loader's worker seeding reach them as they reach a ``PersistentDataset``'s.

    Args:
        records: MONAI data dicts (:func:`neonb.data.to_data_dicts`).
        preprocess: the deterministic pre-processing, e.g.
            :func:`neonb.transforms.preprocessing_transforms`. It must record its crop box
            under :data:`BOX_KEYS` when it crops, for the uncached annotation mask.
        transform: what runs after the cache (random patch, augmentation); ``None``: nothing.
        cache_dir: the cache folder (made if missing; entries of any number of datasets,
            runs and chapters can share it). ``None``: no cache, every access pre-processes
            again (still one volume in memory at a time).
        uncached_keys: record keys left out of the entry (:data:`UNCACHED_KEYS`); each is
            loaded after the cache, cropped to the recorded box and binarised; a missing or
            ``None`` one becomes all ones on the grid of ``label``.

    Raises:
        DataError: from the pre-processing, or when an uncached mask is not on the session's
            voxel grid.
    """

    def __init__(
        self,
        records: Sequence[Mapping[Hashable, Any]],
        preprocess: Callable[[dict], dict],
        transform: Callable[[dict], dict] | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        uncached_keys: Sequence[str] = UNCACHED_KEYS,
    ) -> None:
        super().__init__(
            data=[dict(record) for record in records],
            transform=transform if transform is not None else Compose([]),
            cache_dir=cache_dir,
            hash_func=record_key,
            track_meta=False,
            weights_only=True,
        )
        self.preprocess = preprocess
        self.uncached_keys = tuple(uncached_keys)
        self.transform_hash = transform_key(preprocess)

    def entry_path(self, record: Mapping[Hashable, Any]) -> Path | None:
        """The cache file of ``record`` (``None`` without a cache folder)."""
        if self.cache_dir is None:
            return None
        cached = {k: v for k, v in record.items() if k not in self.uncached_keys}
        name = self.hash_func(cached).decode("ascii") + self.transform_hash
        return self.cache_dir / f"{name}.pt"

    def preprocessed(self, index: int) -> dict[Hashable, Any]:
        """Sample ``index`` after the pre-processing (from the cache) and the uncached masks."""
        record = self.data[index]
        cached = {k: v for k, v in record.items() if k not in self.uncached_keys}
        sample = _widen(self._cachecheck(cached))
        for key in self.uncached_keys:
            sample[key] = self._mask(record, key, sample)
        for key in BOX_KEYS:
            sample.pop(key, None)
        return sample

    def _transform(self, index: int) -> Any:
        return self.transform(self.preprocessed(index))

    def _compute(self, record: dict[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(self.preprocess(dict(record)))
        for key in self.uncached_keys:
            sample.pop(key, None)
        sample = convert_to_tensor(sample, convert_numeric=False, track_meta=False)
        return _narrow(sample)

    def _cachecheck(self, item_transformed: dict[Hashable, Any]) -> dict[Hashable, Any]:
        path = self.entry_path(item_transformed)
        if path is None:
            return self._compute(item_transformed)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception as err:  # a damaged entry is recomputed, never trusted
                warnings.warn(
                    f"{path}: unreadable cache entry ({err}); recomputing it",
                    RuntimeWarning,
                    stacklevel=2,
                )
                path.unlink(missing_ok=True)
        entry = self._compute(item_transformed)
        self._store(entry, path)
        return entry

    def _store(self, entry: dict[Hashable, Any], path: Path) -> None:
        """Write ``entry`` to a unique temporary file beside ``path``, then rename it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        os.close(handle)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _mask(
        self, record: Mapping[Hashable, Any], key: str, sample: Mapping[Hashable, Any]
    ) -> torch.Tensor:
        """An uncached mask on the grid of ``sample``: loaded, cropped, binarised (float32)."""
        value = record.get(key)
        if value is None:
            return torch.ones_like(sample["label"], dtype=torch.float32)
        from neonb.transforms import LoadVolumed

        mask = LoadVolumed([key])({key: value})[key].as_tensor()
        image_key = next(k for k in GRID_KEYS if record.get(k) is not None)
        grid = _spatial_shape(record[image_key])
        if tuple(mask.shape[1:]) != grid:
            raise DataError(
                value if isinstance(value, str | os.PathLike) else f"<{key} array>",
                f"{key} has {tuple(mask.shape[1:])} voxels but the {image_key} image has {grid}",
                "a mask must lie on the voxel grid of its session",
            )
        if all(k in sample for k in BOX_KEYS):
            start, end = (np.asarray(sample[k]).astype(int) for k in BOX_KEYS)
            mask = mask[(slice(None), *(slice(a, b) for a, b in zip(start, end, strict=True)))]
        return (mask != 0).to(torch.float32)

    def __repr__(self) -> str:
        where = self.cache_dir or "no cache"
        return f"{type(self).__name__}({len(self)} records, {where})"
