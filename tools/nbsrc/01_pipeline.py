# %% [markdown]
# # The segmentation pipeline: a 3D U-Net for nine neonatal tissues

# %% tags=["parameters"]
data_root = ""  # dHCP release folder; empty: the synthetic cohort
synthetic_base = "data"
n_subjects = 14
voxel_size = 4.0
seed = 0
results_dir = "results/smoke"
images = "restore"  # "restore": bias-corrected T1w/T2w; "plain": as acquired
brain_mask = "ignore"  # "apply": zero the images outside the dHCP brain mask
n_train = 6
n_val = 1
n_test = 3
n_source = 4
n_source_val = 1
n_target = 5
n_target_train = 2
n_runs = 1
training = {
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "epochs": 2,
    "samples_per_volume": 1,
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "overlap": 0.25,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}
backend = "auto"  # the test set's windows: OpenVINO on the CPU where installed, else PyTorch

# %% [markdown]
# ---
#
# ## Overview
#
# Richter & Fetit (2022) segment the dHCP `drawem9` tissues with a 3D U-Net in the
# style of nnU-Net: two input channels (T1w and T2w), residual convolution blocks with
# instance normalisation, deep supervision, a Dice + cross-entropy loss and a sliding
# window over whole volumes at test time. This chapter
#
# 1. prepares the training, validation and test sessions,
# 2. shows what pre-processing and augmentation do to a training patch (Figure 2),
# 3. builds the network and trains it, validating after every epoch (Figure 6),
# 4. segments the test volumes and scores every tissue (Tables 1 and 2), and
# 5. shows a prediction beside its reference labels (Figures 7 and 8).
#
# The network trained here is the **baseline** the later chapters compare against.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The data chapter](00_data) | Necessary | cohort, labels and splits |
# | [U-Net](https://arxiv.org/abs/1505.04597), [nnU-Net](https://arxiv.org/abs/1809.10486) | Helpful | the design this pipeline follows |
# | [MONAI](https://docs.monai.io) | Helpful | transforms, DynUNet, sliding windows |
#
# - **Time to learn**: 20 minutes
# - **System requirements**: a CPU runs the demo in minutes; the paper's scale needs a
#   GPU with 16 GB
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neonb import experiment, models, plots, report, runs, splits, study, transforms
from neonb.inference import describe_hardware
from neonb.metrics import case_summary

plots.use_book_renderer()
out = Path(results_dir) / "01_pipeline"
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Sessions and splits
#
# The splits are those the data chapter drew and wrote (`splits_pipeline.tsv`), read
# back: an age-representative subset divided into training and validation, and an
# independent test set, one session per infant.

# %%
cohort = study.open_cohort(
    data_root,
    synthetic_base=synthetic_base,
    n=n_subjects,
    seed=seed,
    voxel_size=voxel_size,
    images=images,
    brain_mask=brain_mask,
)
root, manifest, dataset = cohort.root, cohort.manifest, cohort.description
pipeline_splits = splits.load_study_splits(results_dir, manifest)["pipeline"]
chapter = runs.pipeline_runs(
    cohort,
    pipeline_splits,
    results_dir=results_dir,
    seed=seed,
    training=training,
    n_runs=n_runs,
)
records, config = chapter.records, chapter.config
hardware = describe_hardware(config.device)
print(f"{dataset} at {root}; results in {out}; running on {hardware}")
in_sets = pipeline_splits[pipeline_splits["split"].isin(splits.PIPELINE_SETS)]
in_sets.groupby("split")["scan_age"].describe()[["count", "min", "50%", "max"]]

# %% [markdown]
# ## Pre-processing and augmentation (the paper's Figure 2)
#
# Each scan is cropped to the bounding box of its non-zero voxels and each channel is
# z-normalised over those voxels; nothing is resampled. A training patch is then cut at
# random and augmented, each step with its own probability: flips, 3D elastic
# deformation, Gaussian noise and smoothing, intensity scaling and shifting. The labels
# (and the annotation mask of the label-budgeting chapter) follow every spatial step.

# %%
before, after = transforms.augmented_example(
    records["train"][0],
    config.patch_size,
    transforms.AugmentationConfig.always(),
    seed=seed,
    model=config.model,
)
plots.augmentation_pair(before, after)

# %% [markdown]
# ## The network
#
# MONAI's `DynUNet`, configured as in the paper (§3.2.4) or scaled down for the CPU demo:

# %%
network = models.build_model(config.model)
n_parameters = sum(p.numel() for p in network.parameters())
pd.Series(
    {
        **{k: str(v) for k, v in config.model.to_dict().items()},
        "patch size": str(config.patch_size),
        "bottleneck size": str(models.bottleneck_size(config.patch_size, config.model)),
        "parameters": f"{n_parameters:,}",
        "optimiser": f"{config.optimizer}, lr {config.learning_rate:g}, poly decay",
    },
    name="value",
).to_frame()

# %% [markdown]
# ## Training
#
# Each run trains with its own seed. After every epoch the model is scored on one
# centre patch per validation volume (the paper validates on patches too), the epoch is
# logged to `log.tsv`, and a checkpoint is written, so an interrupted run resumes where it
# stopped and a finished one is reloaded rather than trained again. The runs are defined
# once, in `neonb.runs`: `neonb train --params ... --chapter 01_pipeline` trains the very
# same runs outside the notebook (on several GPUs with torchrun), and this cell then only
# reloads them.

# %%
trained_runs, logs = [], []
for run, spec in enumerate(chapter):
    trained = spec.train(progress=False)
    trained_runs.append(trained)
    logs.append(trained.log.assign(run=run))
    print(
        f"{spec.id}: {len(trained.log)} epochs, {trained.train_time_s / 60:.1f} min of training, "
        f"best validation Dice (no BG) {trained.best['val_dice_nobg']:.3f} "
        f"at epoch {int(trained.best['epoch'])}"
    )
logs = pd.concat(logs, ignore_index=True)
logs.to_csv(out / "training_log.tsv", sep="\t", index=False)

# %% [markdown]
# ## Validation Dice over epochs (the paper's Figure 6)
#
# One line per tissue (the mean over runs, with thin lines for single runs). Click a
# tissue in the legend to hide it; double-click to show it alone.

# %%
plots.dice_curves(logs, title=f"Validation Dice per tissue ({dataset}, {hardware})")

# %% [markdown]
# ## The test set: whole volumes, sliding windows
#
# Test volumes are segmented whole: overlapping windows of the training patch size are
# averaged into one probability map per class (MONAI's sliding-window inference). On a
# CPU the windows run through OpenVINO (`backend = "auto"`), which fuses each convolution
# with its normalisation and activation: about twice PyTorch's speed there, the same
# labels up to float rounding (`benchmarks/README.md`), as `neonb segment --backend auto`. Each
# prediction is saved as a NIfTI file with the input's affine, named as a BIDS derivative
# (`sub-X_ses-Y_desc-neonb_dseg.nii.gz`), and scored per tissue: Dice, and the 95th
# percentile Hausdorff distance in mm.

# %%
test_volumes = experiment.prepare_volumes(
    records["test"], cache_dir=config.cache_dir, channels=config.channels
)
per_case = pd.concat(
    [
        experiment.evaluate(
            trained.model,
            test_volumes,
            config,
            hd95=True,
            out_dir=trained.run_dir / "test",
            backend=backend,
        ).per_class.assign(run=run)
        for run, trained in enumerate(trained_runs)
    ],
    ignore_index=True,
)
per_case.to_csv(out / "test_per_class.tsv", sep="\t", index=False)
cases = case_summary(per_case, by=["run", "participant_id", "session_id", "scan_age"])
cases.to_csv(out / "test_per_subject.tsv", sep="\t", index=False)
seconds = per_case.groupby(["run", "participant_id", "session_id"])["inference_s"].first()
print(
    f"{len(cases)} test segmentations in {seconds.sum():.0f} s "
    f"({seconds.mean():.1f} s per volume); per-subject scores in {out / 'test_per_subject.tsv'}"
)
cases.describe()[["dice_mean", "dice_mean_nobg", "hd95_mean_nobg_mm"]].round(3)

# %% [markdown]
# ## Table 1: mean Dice, beside the paper's
#
# Mean over classes of the per-class Dice; validation on patches of the best epoch, test
# on whole volumes. The paper's column is the dHCP result on NVIDIA T4 GPUs (4 runs of 60
# epochs); ours says what it was computed on.

# %%
label = f"neonb ({dataset}, {hardware}, {n_runs} run{'s' * (n_runs > 1)})"
class_dice = pd.concat(
    [report.validation_class_dice(logs), report.case_class_dice(per_case)], ignore_index=True
)
class_dice.to_csv(out / "class_dice.tsv", sep="\t", index=False)
table1 = report.table1(class_dice, label=label)
table1.to_csv(out / "table1.tsv", sep="\t")
table1

# %% [markdown]
# ## Table 2: Dice per tissue

# %%
table2 = report.table2(class_dice, label="neonb")
table2.to_csv(out / "table2.tsv", sep="\t")
table2

# %% [markdown]
# ## Test Dice against age
#
# Not in the paper, but telling: is the network as good on the youngest brains as on
# term ones? Each point is one test session (mean Dice over the eight tissues).

# %%
plots.dice_by_age(cases)

# %% [markdown]
# ## A prediction beside its reference (the paper's Figures 7 and 8)
#
# The test session closest to the median test age: neonb's segmentation on top, the
# reference `drawem9` labels below.

# %%
test_ages = np.array([record["scan_age"] for record in records["test"]])
example = records["test"][int(np.argmin(np.abs(test_ages - np.median(test_ages))))]
predicted_path = (
    trained_runs[0].run_dir
    / "test"
    / experiment.prediction_filename(example["participant_id"], example["session_id"])
)
t2w = nib.load(example["t2w"])
print(f"reference: {example['label']}\nprediction: {predicted_path}")
plots.compare_segmentations(
    np.asarray(t2w.dataobj, dtype=np.float32),
    np.asarray(nib.load(example["label"]).dataobj),
    np.asarray(nib.load(predicted_path).dataobj),
    voxel_size=t2w.header.get_zooms()[:3],
    title=f"sub-{example['participant_id']} ses-{example['session_id']}, "
    f"{example['scan_age']:.1f} weeks",
)

# %% [markdown]
# ---
#
# ## Summary

# %%
test_row = table1.loc[("test", "Mean DSC (no BG)")]
print(
    f"On the {dataset}, the baseline reached a test Dice without background of "
    f"{test_row[label]} (paper, dHCP: {test_row['paper']}), trained for "
    f"{sum(r.train_time_s for r in trained_runs) / 60:.1f} min on {hardware}."
)

# %% [markdown]
# The pipeline trains, validates, checkpoints and segments whole volumes; the tables
# above compare it with the paper on the data named in their headings. On the synthetic
# cohort the numbers describe how well neonb learns the phantom, not real infants.
#
# ## What's next?
#
# The next chapter adds an age-prediction pathway to this network (AgeU-Net) and asks
# whether it predicts more than the mean age.
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532.
# - Isensee F *et al.* (2021). nnU-Net: a self-configuring method for deep
#   learning-based biomedical image segmentation. *Nat. Methods* 18:203–211.
# - MONAI: `DynUNet`, `sliding_window_inference`, `DiceMetric`,
#   `compute_hausdorff_distance` — <https://docs.monai.io>
