"""A tiny cohort and a tiny trained run, shared by the tests of export, segment, QC and norms."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from neonb import data
from neonb.experiment import TrainingConfig, train_segmentation
from neonb.phantom import write_cohort

TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 2,
    "batch_size": 2,
    "samples_per_volume": 2,
    "overlap": 0.25,
    "optimizer": "adamw",
    "learning_rate": 3e-3,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}
"""Two epochs of a three-level network on 16³ patches: seconds on a CPU."""


def tiny_cohort(folder: Path, seed: int) -> Path:
    """Four synthetic sessions at 6 mm."""
    return write_cohort(folder, n=4, seed=seed, voxel_size=6.0, progress=False)


def tiny_run(manifest: pd.DataFrame, folder: Path) -> Path:
    """A run trained on the first three sessions of ``manifest``, validated on the fourth."""
    records = data.to_data_dicts(manifest)
    train_segmentation(
        records[:3], records[3:], TrainingConfig.from_dict(TINY), folder, progress=False
    )
    return folder


def tiny_channel_run(manifest: pd.DataFrame, folder: Path, channels: tuple[str, ...]) -> Path:
    """One epoch of a run on ``channels`` alone, trained and validated like :func:`tiny_run`;
    its records hold only the images of ``channels`` (and the label)."""
    unused = {"t1w", "t2w"} - set(channels)
    records = [
        {key: value for key, value in record.items() if key not in unused}
        for record in data.to_data_dicts(manifest)
    ]
    config = TrainingConfig.from_dict({**TINY, "epochs": 1, "channels": list(channels)})
    train_segmentation(records[:3], records[3:], config, folder, progress=False)
    return folder
