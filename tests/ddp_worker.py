"""Run by tests/test_train.py under torchrun: train the same tiny run as one process would.

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py WORKDIR``, in a folder holding the
smoke cohort (``data/``) and splits (``results/smoke``). Trains ``WORKDIR/ddp`` for all of
:data:`EPOCHS` epochs, and ``WORKDIR/interrupted`` stopped before its second epoch (to be
resumed by one process).
"""

from __future__ import annotations

import sys
from pathlib import Path

from neonb import distributed
from neonb.experiment import TrainingConfig, segmentation_loss, train_segmentation
from neonb.runs import load_chapter

SMOKE = Path(__file__).resolve().parents[1] / "params" / "smoke"
EPOCHS = 2
TINY = {
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "epochs": EPOCHS,
    "optimizer": "sgd",
    "learning_rate": 0.01,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
    "augmentation": {
        "flip_prob": 0.0,
        "elastic_prob": 0.0,
        "noise_prob": 0.0,
        "smooth_prob": 0.0,
        "scale_prob": 0.0,
        "shift_prob": 0.0,
    },
}


class Interrupted(Exception):
    """Stands for a job killed between two epochs."""


class StopBefore:
    """The segmentation loss, raising :class:`Interrupted` when epoch ``epoch`` starts."""

    def __init__(self, config: TrainingConfig, epoch: int) -> None:
        self.loss = segmentation_loss(config)
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise Interrupted

    def __call__(self, outputs, batch):
        return self.loss(outputs, batch)


def tiny_config(workdir: Path) -> TrainingConfig:
    return TrainingConfig.from_dict({**TINY, "cache_dir": str(workdir / "cache")})


def records() -> dict[str, list[dict]]:
    return load_chapter(SMOKE, "01_pipeline").records


def main(workdir: Path) -> None:
    distributed.init_from_env()
    try:
        with distributed.main_first():  # process 0 writes the cohort and splits if missing
            sets = records()
        config = tiny_config(workdir)
        train_segmentation(sets["train"], sets["val"], config, workdir / "ddp", progress=False)
        try:
            train_segmentation(
                sets["train"],
                sets["val"],
                config,
                workdir / "interrupted",
                loss_fn=StopBefore(config, 1),
                progress=False,
            )
        except Interrupted:
            pass
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
