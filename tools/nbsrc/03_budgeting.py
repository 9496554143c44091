# %% [markdown]
# # Label budgeting: whole brains, or slices spread over more brains?

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
n_full = 1
planes = ["random", "sagittal", "coronal", "axial"]
dispersion = 3
placement = "equidistant"
margin = 0.1
sweep_plane = "axial"
sweep_dispersions = [3, 10]
sweep_n_full = None
one_slice = True
schedule = "steps"
samples_per_epoch = 4
both_schedules = True
n_runs = 2
n_test_eval = 0
test_overlap = 0.0
training = {
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "epochs": 1,
    "samples_per_volume": 1,
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "overlap": 0.25,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}

# %% [markdown]
# ---
#
# ## Overview
#
# Labelling a neonatal brain by hand takes an expert many hours, so labels come with a
# budget: a number of 2D slices someone can annotate. Richter & Fetit (2022, §3.4, §4.2)
# ask how to spend it. Label a few brains completely, or a third of the slices of three
# times as many brains? And along which axis should the slices run? They hide existing
# labels to simulate the choice and train one network per condition for 20 epochs. This
# chapter
#
# 1. draws the sessions that may be annotated, and the conditions with their participants,
# 2. chooses the annotated slices before any transform and saves them (TSV and NIfTI masks),
# 3. checks that the masks follow every augmentation and that the loss ignores what they hide,
# 4. trains `n_runs` seeded networks per condition and scores them (Table 3), at equal
#    optimiser steps and, for the fully labelled condition, at equal epochs too,
# 5. decides each of the paper's findings with a stated test, and
# 6. goes beyond the paper: a sweep of label dispersion at an equal budget, from full
#    volumes down to one slice per subject.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The pipeline chapter](01_pipeline) | Necessary | network, loss, training, evaluation |
# | Anatomical planes (sagittal, coronal, axial) | Necessary | how slices are taken |
# | [Deep supervision](https://arxiv.org/abs/1505.02496) | Helpful | the loss on lower-resolution outputs |
#
# - **Time to learn**: 20 minutes
# - **System requirements**: a CPU runs the demo in a few minutes; the paper's scale trains
#   one network per condition for a day on a 16 GB GPU
#
# ---

# %% [markdown]
# ## Imports

# %%
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neonb import budgeting, experiment, plots, report, runs, splits, statistics, study
from neonb.inference import describe_hardware
from neonb.metrics import case_summary

plots.use_book_renderer()
out = Path(results_dir) / "03_budgeting"
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Who may be annotated
#
# The validation and test sessions are those of the pipeline chapter (the data chapter's
# `splits_pipeline.tsv`, read back) and stay fully labelled: every model is validated and
# tested on complete labels. Every other participant belongs to the *pool* that
# annotations may be spent on, with the one session the splits gave it (its training
# session, or a session drawn into no set). The fully labelled condition takes its `n_full`
# sessions from the pipeline's training split (at the paper's scale, all 114 of them); the
# dispersed conditions add sessions from the rest of the pool (the paper "tripled" its
# training set to 342).
#
# For each pooled session we need the extent of the head along each axis: the range of
# slices holding any label other than 0. Label 0 is the outer background, where the image is
# 0, so this is the bounding box that pre-processing crops every training volume to; the
# inner background (label 4) counts as inside. The plane of a voxel axis is read from the
# affine: in the RAS images of the dHCP, sagittal slices are perpendicular to the first
# voxel axis, coronal to the second, axial to the third.
#
# The pool, the extents, the conditions below and their slices are drawn by
# `neonb.runs.budgeting_runs`, which defines the chapter's runs (one per condition) once
# for this notebook and for `neonb train --chapter 03_budgeting`.

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
chapter = runs.budgeting_runs(
    cohort,
    pipeline_splits,
    results_dir=results_dir,
    seed=seed,
    training=training,
    n_full=n_full,
    schedule=schedule,
    samples_per_epoch=samples_per_epoch,
    both_schedules=both_schedules,
    n_runs=n_runs,
    planes=planes,
    dispersion=dispersion,
    sweep_plane=sweep_plane,
    sweep_dispersions=sweep_dispersions,
    sweep_n_full=sweep_n_full,
    one_slice=one_slice,
    placement=placement,
    margin=margin,
)
config, records = chapter.config, chapter.records
hardware = describe_hardware(config.device)
pool_records, pool_ages, train_ids = chapter.pool_records, chapter.pool_ages, chapter.train_ids
extents = chapter.extents
lengths = budgeting.extent_lengths(extents)
print(
    f"{dataset} at {root}; {len(pool_ages)} participants in the pool "
    f"({len(train_ids)} in the pipeline's training split), {len(records['val'])} validation "
    f"and {len(records['test'])} test sessions; results in {out}; running on {hardware}"
)
lengths.describe().loc[["mean", "min", "max"]].round(1).rename_axis("slices in the extent")

# %% [markdown]
# ## The conditions
#
# Table 3 compares `n_full` fully labelled volumes with a third of the slices of
# `3 × n_full` volumes, taken along each plane or, for `random`, each slice along a plane
# drawn at random. Both spend about the same number of annotated slices. Beyond the paper,
# the sweep keeps that budget and spreads it further along one plane: a tenth of the slices
# of ten times the subjects, and finally one slice per subject, which needs as many subjects
# as the full volumes have slices. The conditions the two share are trained once.

# %%
plan = chapter.plan
for note in plan.notes:
    print("Note:", note)
sessions = plan.sessions(pool_records)
sessions.to_csv(out / "sessions.tsv", sep="\t", index=False)
pd.DataFrame([{"condition": c.name, "description": c.describe()} for c in plan.conditions])

# %% [markdown]
# ## Choosing the slices, before any transform
#
# For every session of a partial condition the annotated slices are fixed once, from the
# session's own seed (so adding a condition or a session changes no other choice), and
# saved: `slices.tsv` has one row per slice (condition, session, plane, voxel axis, slice
# index, and the extent it was chosen in). Slices come from the inner 80 % of the extent,
# never from the outer 10 % at either end, where few tissues are visible. Each mask is then
# written as a NIfTI file on the label's grid and with its affine, one per condition and
# session (`sub-X_ses-Y_desc-<condition>_mask.nii.gz`), so that a training record simply
# names it under its `annotation` key.

# %%
slices = chapter.slices
budgeting.write_slices(slices, out / "slices.tsv")
masks = budgeting.write_masks(slices, pool_records, chapter.masks_dir)
summary = budgeting.condition_summary(
    plan.conditions, plan.participants, extents, masks, full_plane=sweep_plane or "axial"
)
summary.to_csv(out / "conditions.tsv", sep="\t", index=False)
print(
    f"{len(slices)} annotated slices in {out / 'slices.tsv'}; {len(masks)} masks in {out / 'masks'}"
)
summary.round(3)

# %% [markdown]
# `annotated_slices` is the budget each condition spent: the slices along the sweep's plane
# for full volumes, the chosen slices otherwise. Conditions draw participants, each with the
# one session the pipeline's splits gave it, so `n_sessions` equals `n_subjects`. Slices along different planes cross, so the
# random condition annotates slightly fewer voxels (`annotated_voxel_fraction`, within the
# head's bounding box) for the same number of slices.
#
# ## What the network is shown (the paper's Figure 4)
#
# One participant of every condition, with its labels drawn only where annotated. Slices
# chosen along one plane appear as stripes in the other two views.

# %%
example_id = plan.participants[plan.table3[0]][0]
example = next(r for r in pool_records if r["participant_id"] == example_id)
shown = [name for name in [*plan.table3, *plan.sweep] if name != "full"]
example_masks = {}
for name in dict.fromkeys(shown):
    row = masks[(masks["condition"] == name) & (masks["participant_id"] == example_id)]
    example_masks[name] = np.asarray(nib.load(row["mask"].iloc[0]).dataobj)
t2w = nib.load(example["t2w"])
plots.annotation_masks(
    np.asarray(t2w.dataobj, dtype=np.float32),
    np.asarray(nib.load(example["label"]).dataobj),
    example_masks,
    voxel_size=t2w.header.get_zooms()[:3],
    title=f"sub-{example_id}: annotated labels per condition",
)

# %% [markdown]
# ## The mask follows every spatial transform
#
# A mask is only useful if it still covers the annotated voxels after cropping, flipping and
# elastic deformation. MONAI's dictionary transforms draw their random parameters once per
# sample and apply them to `image`, `label` and `annotation` alike (nearest-neighbour for
# the last two). To see it, replace the label by the mask itself: after any augmentation,
# the two must still be identical, voxel for voxel.

# %%
mask_path = masks.loc[masks["participant_id"] == example_id, "mask"].iloc[0]
identical = budgeting.mask_follows_augmentation(example, mask_path, config, draws=10, seed=seed)
print(f"label and mask identical after {sum(identical)} of {len(identical)} random augmentations")

# %% [markdown]
# ## The loss sees annotated voxels only, at every deep-supervision level
#
# The loss (`neonb.losses.SegmentationLoss`) is Dice + cross-entropy over the voxels whose
# mask is 1, summed over the deep-supervision heads with weights halving per level. How is
# the mask brought to the lower-resolution heads? It is not downsampled at all: MONAI's
# `DynUNet` upsamples each lower head to the full patch size (nearest-neighbour
# interpolation, `torch.nn.functional.interpolate`) before stacking the heads, so every head
# is compared with the full-resolution label under the full-resolution mask. A coarse output
# voxel is thus trained on the annotated fine voxels it covers, and no coarse label or mask
# has to be invented by pooling. (nnU-Net instead downsamples the label for each head; a
# mask would then need its own, matching downsampling.)
#
# The check below trains nothing: it takes one augmented training patch, runs the network
# in training mode and measures which logits of each head receive a gradient.

# %%
partial = next(c.name for c in plan.conditions if not c.is_full)
record = budgeting.condition_records(pool_records, [example_id], masks, partial)[0]
budgeting.gradient_probe(record, config, seed=seed).round(4)

# %% [markdown]
# ## Training `n_runs` networks per condition
#
# Every condition trains from scratch with the pipeline's loss and augmentation, and is
# validated after every epoch on the fully labelled validation patches. Replicate *k* of
# every condition uses seed `seed + k` (initialisation, patches, augmentation) on the same
# participants and slices, so replicates show how much training's own randomness moves a
# result; one run per condition, as in the paper, cannot tell a real difference from that.
#
# How long? The paper gives every condition the same number of **epochs** (20), so a
# condition with three times the subjects also takes three times the optimiser steps: its
# advantage mixes more diverse labels with more training. With `schedule = "steps"` every
# condition instead draws about `samples_per_epoch` patches per epoch, so all take about the
# same number of **steps** and differ only in where the labels are. The dispersed conditions
# train alike under both schedules; only the fully labelled condition differs, so
# `both_schedules` adds it under the other schedule (`fullepochs` here: the dispersed
# conditions' epochs and patches per volume, a third of their steps), and Table 3 can be
# read both ways. The training time of every run is recorded.

# %%
trained = runs.train_runs(chapter)
logs = trained.logs(by="condition")
logs.to_csv(out / "training_log.tsv", sep="\t", index=False)
facts = trained.facts(by="condition")
facts.to_csv(out / "training_runs.tsv", sep="\t", index=False)
facts.groupby("condition", sort=False)[
    ["epochs", "samples_per_volume", "steps", "train_time_s"]
].mean().round(1)

# %%
plots.budget_curves(logs)

# %% [markdown]
# ## Test Dice on whole volumes
#
# As in the paper, the model of each condition's best validation epoch is evaluated on
# whole, fully labelled test volumes with sliding windows of the training patch size. To
# keep the many models affordable, this uses a fixed age-representative subset of
# `n_test_eval` test sessions (0: all of them), the same for every condition, with window
# overlap `test_overlap`, and computes Dice only.

# %%
test_records = budgeting.evaluation_subset(records["test"], n_test_eval, seed=seed)
started = time.perf_counter()
test_volumes = experiment.prepare_volumes(
    test_records, cache_dir=config.cache_dir, channels=config.channels
)
per_case = trained.evaluate(test_volumes, config.replace(overlap=test_overlap), by="condition")
per_case.to_csv(out / "test_per_class.tsv", sep="\t", index=False)
cases = case_summary(per_case, by=("condition", "run", "participant_id", "session_id", "scan_age"))
cases.to_csv(out / "test_per_subject.tsv", sep="\t", index=False)
print(
    f"{len(trained.trained)} models x {len(test_records)} test volumes segmented in "
    f"{time.perf_counter() - started:.0f} s; per-class scores in {out / 'test_per_class.tsv'}"
)

# %% [markdown]
# ## Table 3: mean Dice per condition, beside the paper's
#
# Validation on patches at the best epoch, test on whole volumes; mean over classes of the
# per-class Dice, with and without the two background classes, as mean ± standard deviation
# over the runs. The paper's rows are the dHCP results on NVIDIA T4 GPUs (one run per
# condition, 20 epochs, equal epochs); ours say what they were computed on. `full` is
# trained at the chapter's `schedule`; `fullepochs` or `fullsteps`, if trained, at the other
# one (rows beyond the paper's are listed below the table).

# %%
class_dice = pd.concat(
    [
        report.validation_class_dice(log).assign(condition=name)
        for name, log in logs.groupby("condition", sort=False)
    ]
    + [
        report.case_class_dice(part).assign(condition=name)
        for name, part in per_case.groupby("condition", sort=False)
    ],
    ignore_index=True,
)
class_dice.to_csv(out / "class_dice.tsv", sep="\t", index=False)
label = f"neonb ({dataset}, {hardware})"
table3 = report.table3(class_dice, label=label)
table3.to_csv(out / "table3.tsv", sep="\t")
table3

# %% [markdown]
# ## Mean test Dice with 95 % intervals
#
# Each condition's mean test Dice (8 tissues) with two intervals: over its runs (how far
# another training run could move it) and over the test subjects (each subject's Dice
# averaged over the runs; how far other test subjects could move it).

# %%
summary_ci = statistics.replicate_summary(cases, "dice_mean_nobg", by="condition")
summary_ci.to_csv(out / "test_intervals.tsv", sep="\t", index=False)
plots.replicate_intervals(
    summary_ci,
    by="condition",
    title=f"Test Dice (no BG) per condition, {n_runs} runs each ({dataset}, {hardware})",
)

# %% [markdown]
# ## Budget, cost and Dice of every condition
#
# The paper notes the price of dispersion (§4.2): a dispersed condition, three times the
# subjects for 20 epochs, took 27 h 42 min to train on average (standard deviation 4 h 20 min),
# 49 % longer than the baseline's 60 epochs on the fully labelled volumes (18.6 h, §4.1.1).
# Both runs amount to the same 6,840 patches (342 × 20 = 114 × 60, one patch per volume and
# epoch as in the authors' code), and to three times the optimiser steps of the 20-epoch
# full-volume condition that Table 3 compares them with. `steps` and `train_time_s` show what
# each condition cost here.

# %%
per_condition = facts.groupby("condition", sort=False)[["steps", "train_time_s"]].mean()
results = budgeting.condition_results(summary, class_dice, per_condition.reset_index())
results.to_csv(out / "conditions_results.tsv", sep="\t", index=False)
results[
    [
        "condition",
        "n_subjects",
        "n_sessions",
        "annotated_slices",
        "steps",
        "train_time_s",
        "val_dice_nobg",
        "test_dice_nobg",
    ]
].round(3)

# %% [markdown]
# ## Do the paper's findings hold here?
#
# The paper found (§4.2, Table 3) that every dispersed condition beat the fully labelled
# volumes **at equal epochs**, and that sagittal slices, along its lowest-resolution axis,
# were the worst dispersed condition. neonb adds the comparison **at equal steps**, where
# the dispersed conditions get no more training. The paper ran one network per condition
# and tested none of these differences. Here each claim is decided on the test subjects'
# Dice (averaged over the runs), by the rule shown beside it; the p-values of all the
# claims are Bonferroni-corrected together.

# %%
findings = budgeting.paper_findings(
    cases,
    dispersed=[name for name in plan.table3 if name != "full"],
    full=budgeting.full_conditions(schedule, both_schedules),
)
findings.to_csv(out / "findings.tsv", sep="\t")
report.findings_view(findings)

# %% [markdown]
# The rules behind the verdicts:

# %%
pd.Series(statistics.RULES, name="rule").to_frame()

# %% [markdown]
# ## Beyond the paper: how far can the labels be spread?
#
# The sweep keeps the budget and spreads it over ever more subjects: full volumes, a third,
# a tenth, and a single slice per subject. Each tick names the condition, its scans
# (sessions) and slices per scan, and the total annotated slices (a condition capped at the pool size
# spends fewer). Hover over a point for the numbers. One thing changes along the sweep
# besides diversity: training patches are cut at random, so the thinner the labels, the more
# often a patch holds few or no annotated voxels and adds little or nothing to the loss (a
# patch of 32 slices misses a single axial slice more often than not).

# %%
sweep = results.set_index("condition").loc[plan.sweep].reset_index()
sweep.to_csv(out / "sweep.tsv", sep="\t", index=False)
if plan.sweep:
    figure = plots.dispersion_sweep(
        sweep, title=f"Dispersion sweep along the {sweep_plane} plane ({dataset}, {hardware})"
    )
else:
    figure = None
    print("No sweep at this scale (sweep_plane is empty): see params/paper or params/smoke.")
figure

# %% [markdown]
# ---
#
# ## Summary

# %%
intervals = summary_ci.set_index("condition")
full_row = intervals.loc["full"]
print(
    f"On the {dataset}, trained on {hardware}, {n_runs} runs per condition: the fully "
    f"labelled condition ({schedule} schedule) reached a test Dice without background of "
    f"{full_row['mean']:.3f} (95 % interval over runs {full_row['run_low']:.3f}-"
    f"{full_row['run_high']:.3f}) on {len(test_records)} test volumes. Total training time "
    f"{facts['train_time_s'].sum() / 60:.1f} min for {len(facts)} runs."
)
for finding, row in findings.iterrows():
    print(
        f"  {finding} ({row['source']}): {row['verdict']} (difference "
        f"{row['difference']:+.3f}, {row['test']}, corrected p {row['p_corrected']:.2g})"
    )

# %% [markdown]
# The annotated slices were fixed before any transform and saved, the masks followed every
# augmentation, and the loss ignored the unannotated voxels at every deep-supervision level.
# Each finding above carries its verdict and the test that decided it: "holds" only where
# the corrected test supports it, "not contradicted" where the difference points the
# paper's way without significance, "not supported" where it points the other way. On the
# synthetic cohort these verdicts describe the phantom, not real infants; a few short CPU
# runs and a handful of test subjects give little power, so "not contradicted" is the
# expected verdict for small real effects.
#
# ## What's next?
#
# The next chapter tackles the same scarcity of labels from another side: pre-training on
# older, term-born infants and fine-tuning on a few preterm ones (transfer learning).
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532 (§3.4, §4.2, Table 3).
# - Isensee F *et al.* (2021). nnU-Net: a self-configuring method for deep
#   learning-based biomedical image segmentation. *Nat. Methods* 18:203–211 (deep
#   supervision with downsampled labels).
# - MONAI: `DynUNet` (deep-supervision heads), `MaskedDiceLoss`, dictionary transforms —
#   <https://docs.monai.io>
