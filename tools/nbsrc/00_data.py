# %% [markdown]
# # The data: a neonatal cohort, its ages and its anatomy

# %% tags=["parameters"]
data_root = ""  # dHCP release folder; empty: generate the synthetic cohort
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

# %% [markdown]
# ---
#
# ## Overview
#
# Every experiment of this study starts from one table: which scans there are, how old
# each infant was at the scan, and whether all three files a session needs — T1-weighted,
# T2-weighted and the `drawem9` tissue labels — are there and readable. This chapter
#
# 1. finds the cohort (a dHCP release folder, or the synthetic cohort neonb generates),
# 2. draws the scan-age histogram, the paper's Figure 1,
# 3. shows the youngest and the oldest infant, with their tissue labels (the paper's Figure 5),
# 4. plots tissue volumes against age, and
# 5. fixes the training, validation and test splits that the later chapters use.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [BIDS naming](https://bids-specification.readthedocs.io) | Helpful | dHCP follows it |
# | Neonatal MRI contrast | Helpful | myelination inverts T1w white matter contrast |
# | [pandas](https://pandas.pydata.org) | Necessary | the cohort is a DataFrame |
#
# - **Time to learn**: 10 minutes
# - **System requirements**: a CPU; the synthetic cohort takes seconds to generate
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neonb import data, plots, splits, study
from neonb.cohort import age_ranges, compare_with_paper, complete_sessions, tissue_volumes

plots.use_book_renderer()
results = Path(results_dir)
results.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The cohort
#
# With an empty `data_root` neonb writes its synthetic neonatal cohort in the dHCP
# release layout and names (`sub-*/ses-*/anat/sub-*_ses-*_T2w.nii.gz`, its bias-corrected
# `_desc-restore_T2w`, the same two for T1w, `_desc-drawem9_dseg`, `_desc-brain_mask`,
# `participants.tsv`, `*_sessions.tsv`) and reads it back with the same reader a real
# release goes through. The reader lists every session, and says for each incomplete one
# what is missing; the paper kept the 709 complete sessions of 783.
#
# `images` chooses the T1w/T2w pair: the bias-corrected `restore` images or the `plain`
# ones the paper's authors extracted; a session never mixes the two. `brain_mask` says
# whether the images are zeroed outside the dHCP brain mask before training.

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
root, manifest = cohort.root, cohort.manifest
source = "dHCP release" if data_root else f"synthetic cohort (seed {seed}, {voxel_size:g} mm)"
print(f"Reading the {source} at {root}: {images} images, brain mask {brain_mask}")
print(data.summarize_manifest(manifest))
manifest_path = data.write_manifest(manifest, results / "manifest.tsv")
print(f"Manifest written to {manifest_path}")
manifest.drop(columns=["t1w", "t2w", "dseg", "brain_mask"]).head(10)

# %% [markdown]
# ## Scan age (the paper's Figure 1)
#
# The dHCP cohort is skewed towards term: most infants are scanned soon after a term
# birth, while preterm-born infants contribute the long tail of younger scan ages. The
# table compares the complete sessions of this cohort with the 709 dHCP sessions the paper
# used (§3.1, `neonb.paper.COHORT`); the paper counts sessions as "subjects" and says
# nothing of infants scanned twice, so those cells of its column are blank.

# %%
complete = complete_sessions(manifest)
ages = complete["scan_age"]
compare_with_paper(manifest, label=f"this run ({source})").round(2)

# %% [markdown]
# Scan ages by birth. An infant scanned before 37 weeks post-menstrual age was born
# before 37 weeks, so the youngest scans are all of preterm-born infants; the dHCP scanned
# some of them again at term-equivalent age (the rescanned infants above).

# %%
age_ranges(manifest).round(2)

# %%
plots.age_histogram(complete)

# %% [markdown]
# ## A preterm and a term brain (the paper's Figure 5)
#
# The youngest and the oldest infant of the cohort, T2-weighted with the `drawem9`
# labels on top; the paper's Figure 5 shows its two extremes, 26.71 and 45.14 weeks. Hover
# over the images to read the tissue under the cursor. Between the two, the brain grows
# about threefold, the cortex folds, and the white matter starts to myelinate — which is
# why the T1-weighted contrast of white against grey matter inverts between preterm and
# term infants (second figure of each pair).

# %%
youngest = complete.loc[ages.idxmin()]
oldest = complete.loc[ages.idxmax()]


def show_session(row: pd.Series, modality: str):
    image = nib.load(row[modality])
    labels = np.asarray(nib.load(row["dseg"]).dataobj)
    print(f"{modality}: {row[modality]}")
    return plots.triplanar(
        np.asarray(image.dataobj, dtype=np.float32),
        labels if modality == "t2w" else None,
        voxel_size=image.header.get_zooms()[:3],
        title=f"sub-{row['participant_id']} ses-{row['session_id']}, "
        f"{row['scan_age']:.1f} weeks, {modality.upper()}",
    )


show_session(youngest, "t2w")

# %%
show_session(youngest, "t1w")

# %%
show_session(oldest, "t2w")

# %%
show_session(oldest, "t1w")

# %% [markdown]
# ## Tissue volumes against age
#
# Volumes are counted from the label images (voxels × voxel volume). Brain tissues grow
# with age, the cerebellum fastest; the fluid spaces shrink relative to the brain. In the
# synthetic cohort preterm-born infants are given enlarged fluid spaces, so there the
# extracerebral CSF even shrinks in absolute volume with age — a property of the phantom
# to keep in mind, not a finding.

# %%
volumes = tissue_volumes(manifest)
volumes.to_csv(results / "tissue_volumes.tsv", sep="\t", index=False)
plots.volumes_by_age(volumes)

# %% [markdown]
# ## Splits
#
# The later chapters train and evaluate on fixed splits, drawn here once and saved as TSV
# next to the results (with `splits.json`, the sizes and seed they were drawn with), so
# every later chapter reads them back rather than drawing them again:
#
# - the segmentation pipeline (paper §4.1.1): an age-representative subset divided into
#   training and validation sessions, and an independent test set;
# - transfer learning (paper §3.5): the oldest sessions as the source, the youngest as
#   the target.
#
# Sizes count sessions, the paper's data units. Within one experiment a participant
# contributes one session, so that no infant's anatomy is in two sets: the pipeline takes
# one session of each rescanned infant, drawn at random; transfer learning takes the
# youngest for the target and the oldest for the source. Each table keeps the sessions
# this leaves out (split `excluded`); the pipeline's table also lists the sessions drawn
# into no set (`pool`), on which the label-budgeting chapter spends its extra annotations.

# %%
sizes = splits.SplitSizes(
    n_train=n_train,
    n_val=n_val,
    n_test=n_test,
    n_source=n_source,
    n_source_val=n_source_val,
    n_target=n_target,
    n_target_train=n_target_train,
    seed=seed,
)
tables = splits.ensure_study_splits(results, manifest, sizes)
for name, file in splits.STUDY_SPLITS.items():
    print(f"{name} splits: {results / file}")
summary = pd.concat(tables.values()).groupby("split", sort=False)["scan_age"]
summary.agg(["count", "min", "median", "max"]).round(1)

# %% [markdown]
# Sessions left out because their infant is in the experiment with another session:

# %%
pd.concat({name: splits.left_out(table) for name, table in tables.items()}).droplevel(1).round(1)

# %% [markdown]
# ---
#
# ## Summary
#
# The cohort table, its age distribution, two example brains, tissue volumes and the
# splits are in place, all read through the same code path a dHCP release takes.
#
# ## What's next?
#
# The next chapter trains the baseline 3D U-Net on the pipeline splits.
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532.
# - Makropoulos A *et al.* (2018). The developing human connectome project: a minimal
#   processing pipeline for neonatal cortical surface reconstruction. *NeuroImage* 173.
# - The dHCP data release: <https://www.developingconnectome.org>
