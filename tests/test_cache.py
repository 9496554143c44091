"""Tests of neonb.cache: the disk cache of pre-processed volumes, and the loaders built on it."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from neonb import data
from neonb.cache import VolumeDataset, record_key, transform_key
from neonb.experiment import TrainingConfig, prepare_volumes, train_segmentation, training_loader
from neonb.phantom import write_cohort
from neonb.transforms import eval_transforms, preprocessing_transforms

TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 1,
    "batch_size": 2,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_cohort(
        tmp_path_factory.mktemp("cohort"), n=3, seed=3, voxel_size=6.0, progress=False
    )
    return data.to_data_dicts(data.read_manifest(root, progress=False))


def _entries(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt")


def _box_preprocessing():
    return preprocessing_transforms(crop=True, keep_box=True)


def test_entry_is_written_once_small_and_safe_and_reads_back_exactly(records, tmp_path):
    reference = preprocessing_transforms(crop=True)(dict(records[0]))
    dataset = VolumeDataset(records[:1], _box_preprocessing(), cache_dir=tmp_path)
    first = dataset[0]
    (entry,) = _entries(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file
    stored = torch.load(entry, weights_only=True)  # plain tensors, strings and numbers only
    assert stored["label"].dtype == torch.uint8 and stored["image"].dtype == torch.float32
    assert "annotation" not in stored  # never cached: loaded after the cache
    written = entry.stat().st_mtime_ns
    again = VolumeDataset(records[:1], _box_preprocessing(), cache_dir=tmp_path)[0]
    assert entry.stat().st_mtime_ns == written and _entries(tmp_path) == [entry]
    for sample in (first, again):
        assert set(sample) == set(reference)
        for key in ("image", "label", "annotation"):
            assert sample[key].dtype == torch.float32, key
            assert torch.equal(sample[key], reference[key].as_tensor()), key


def test_changed_files_or_transforms_never_reuse_an_entry(records, tmp_path):
    record = dict(records[0])
    label_path = tmp_path / "label.nii.gz"
    original = nib.load(record["label"])
    nib.save(original, label_path)
    record["label"] = str(label_path)
    first = VolumeDataset([record], _box_preprocessing(), cache_dir=tmp_path / "c")[0]

    changed = np.asarray(original.dataobj).copy()
    changed[changed == 1] = 3  # same file name, new content
    nib.save(nib.Nifti1Image(changed, original.affine, original.header), label_path)
    os.utime(label_path, ns=(1, 1))  # even with an old modification time: the size differs
    second = VolumeDataset([record], _box_preprocessing(), cache_dir=tmp_path / "c")[0]
    assert len(_entries(tmp_path / "c")) == 2
    assert not torch.equal(first["label"], second["label"])
    assert int((second["label"] == 1).sum()) == 0

    uncropped = VolumeDataset([record], preprocessing_transforms(crop=False), None, tmp_path / "c")
    assert uncropped[0]["image"].shape[1:] == changed.shape
    assert len(_entries(tmp_path / "c")) == 3
    keys = {
        transform_key(preprocessing_transforms(crop=c, keep_box=b)) for c in (0, 1) for b in (0, 1)
    }
    assert len(keys) == 3  # keep_box changes nothing without a crop
    assert transform_key(_box_preprocessing()) == transform_key(_box_preprocessing())
    assert record_key(record) != record_key({**record, "scan_age": 40.0})


def test_damaged_entry_is_recomputed_with_a_warning(records, tmp_path):
    expected = VolumeDataset(records[:1], _box_preprocessing(), cache_dir=tmp_path)[0]
    (entry,) = _entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="unreadable cache entry"):
        again = VolumeDataset(records[:1], _box_preprocessing(), cache_dir=tmp_path)[0]
    assert torch.equal(again["image"], expected["image"])
    assert torch.load(entry, weights_only=True)["image"].shape == expected["image"].shape


def test_annotation_masks_share_one_entry_and_are_cropped_like_the_image(records, tmp_path):
    record = dict(records[1])
    shape = nib.load(record["t2w"]).shape
    masks = []
    for i, axis_slice in enumerate((5, 9)):
        mask = np.zeros(shape, np.uint8)
        mask[:, :, axis_slice] = 1
        path = tmp_path / f"mask{i}.nii.gz"
        nib.save(nib.Nifti1Image(mask, nib.load(record["t2w"]).affine), path)
        masks.append(str(path))
    with_masks = [{**record, "annotation": path} for path in masks]
    dataset = VolumeDataset(with_masks, _box_preprocessing(), cache_dir=tmp_path / "c")
    for i, path in enumerate(masks):
        reference = preprocessing_transforms(crop=True)({**record, "annotation": path})
        assert torch.equal(dataset[i]["annotation"], reference["annotation"].as_tensor())
    assert len(_entries(tmp_path / "c")) == 1

    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), wrong)
    bad = VolumeDataset([{**record, "annotation": str(wrong)}], _box_preprocessing())
    with pytest.raises(Exception, match="voxel grid"):
        bad[0]


def test_prepared_volumes_are_lazy_and_match_the_eval_transforms(records, tmp_path):
    volumes = prepare_volumes(records, cache_dir=tmp_path)
    assert len(volumes) == 3 and _entries(tmp_path) == []  # nothing loaded yet
    for record, volume in zip(records, volumes, strict=True):
        reference = eval_transforms(crop=False)(dict(record))
        assert torch.equal(volume["image"], reference["image"].as_tensor())
        assert volume["label"].dtype == np.uint8
        assert np.array_equal(volume["label"], reference["label"][0].numpy())
        assert volume["session_id"] == record["session_id"]
    assert len(_entries(tmp_path)) == 3
    with pytest.raises(IndexError):
        volumes[3]


def test_entries_of_other_channels_never_collide(records, tmp_path):
    """A T2w-only, a T1w-only and a T1w+T2w pre-processing of one session: three entries."""
    images = {}
    for channels in (("t1w", "t2w"), ("t2w",), ("t1w",)):
        volume = prepare_volumes(records[:1], cache_dir=tmp_path, channels=channels)[0]
        images[channels] = volume["image"]
        assert volume["image"].shape[0] == len(channels)
    assert len(_entries(tmp_path)) == 3
    assert torch.equal(images[("t2w",)][0], images[("t1w", "t2w")][1])
    assert torch.equal(images[("t1w",)][0], images[("t1w", "t2w")][0])
    for channels in (("t2w",), ("t1w", "t2w")):  # read back: each its own entry, no new one
        again = prepare_volumes(records[:1], cache_dir=tmp_path, channels=channels)[0]
        assert torch.equal(again["image"], images[channels])
    assert len(_entries(tmp_path)) == 3
    keys = {
        transform_key(preprocessing_transforms(crop=False, channels=c))
        for c in (("t1w", "t2w"), ("t2w",), ("t1w",))
    }
    assert len(keys) == 3


def test_a_t1w_only_session_crops_its_annotation_on_the_t1w_grid(records, tmp_path):
    record = {k: v for k, v in records[0].items() if k != "t2w"}
    record["annotation"] = record["label"]
    preprocess = preprocessing_transforms(crop=True, keep_box=True, channels=("t1w",))
    sample = VolumeDataset([record], preprocess, cache_dir=tmp_path)[0]
    assert sample["annotation"].shape == sample["label"].shape
    assert torch.equal(sample["annotation"], (sample["label"] != 0).to(torch.float32))


def _epoch(loader, seed):
    """One epoch of batches, seeded as neonb.engine.fit seeds them."""
    from monai.data.utils import set_rnd
    from monai.utils import set_determinism

    set_determinism(seed)
    loader.generator.manual_seed(seed)
    set_rnd(loader.dataset, seed)
    loader.sampler.set_epoch(seed)  # the order and each patch's seed (neonb.engine.EpochSampler)
    return [batch["image"].clone() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_patches_repeat_for_a_seed_with_and_without_workers(records, tmp_path, workers):
    config = TrainingConfig.from_dict({**TINY, "num_workers": workers, "cache_dir": str(tmp_path)})
    first = _epoch(training_loader(records, config), 5)
    second = _epoch(training_loader(records, config), 5)
    other = _epoch(training_loader(records, config), 6)
    assert len(first) == 2 and len(_entries(tmp_path)) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_training_caches_beside_the_runs_unless_told(records, tmp_path):
    config = TrainingConfig.from_dict({**TINY, "num_workers": 1})
    train_segmentation(records[:2], records[2:], config, tmp_path / "run", progress=False)
    assert len(_entries(tmp_path / "cache")) == 3  # shared by the runs of one folder
    elsewhere = config.replace(cache_dir=str(tmp_path / "shared"))
    train_segmentation(records[:2], records[2:], elsewhere, tmp_path / "b" / "run", progress=False)
    assert len(_entries(tmp_path / "shared")) == 3 and not (tmp_path / "b" / "cache").exists()
    with pytest.raises(Exception, match="num_workers"):
        TrainingConfig.from_dict({**TINY, "num_workers": -1})
