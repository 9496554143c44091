# %% [markdown]
# # The paper beside neonb: Tables 1–6 and the figures

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

# %% [markdown]
# ---
#
# ## Overview
#
# Each chapter of this book computed its tables beside the paper's. This chapter gathers
# them in one place, reading the TSV files the chapters wrote, so every number here is the
# one its chapter computed in this build:
#
# 1. where the numbers come from: the data, and the hardware and software of every run,
# 2. the segmentation pipeline (Tables 1 and 2) and AgeU-Net (§4.1.2),
# 3. label budgeting (Table 3),
# 4. transfer learning (Tables 4, 5 and 6, and which of the paper's findings hold),
# 5. all Dice values at once against the paper's, and
# 6. where each of the paper's figures is regenerated.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [Methods in brief](../methods) | Helpful | what each experiment does |
# | The chapters 01–04 | Necessary | this chapter only reads what they wrote |
#
# - **Time to learn**: 10 minutes
# - **System requirements**: none; nothing is trained here
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import pandas as pd

from neonb import paper, plots
from neonb.results import pair_with_paper, read_table, run_environments

plots.use_book_renderer()
results = Path(results_dir)
dataset = (
    f"dHCP release at {data_root}"
    if data_root
    else f"synthetic cohort of {n_subjects} sessions at {voxel_size:g} mm"
)

# %% [markdown]
# ## Where the numbers come from
#
# The paper's numbers are from the dHCP third release (709 complete sessions), computed
# on NVIDIA Tesla T4 GPUs. neonb's are from the data below, and each training run recorded
# the machine it ran on (`environment.json` in its folder):

# %%
print(f"neonb's data: {dataset}; results in {results}")
print(f"the paper's: {paper.DATA}, on {paper.HARDWARE}")
environments = run_environments(results)
environments.groupby(["chapter", "environment"]).agg(
    runs=("run", "count"), first_started=("started", "min")
)

# %% [markdown]
# ## Table 1: mean Dice of the segmentation pipeline
#
# Validation Dice is measured on one centre patch per validation volume at the best epoch,
# test Dice on whole volumes with sliding windows; "no BG" leaves out the two background
# classes.

# %%
table1 = read_table(results, "01_pipeline", "table1.tsv", index_col=[0, 1])
table1

# %% [markdown]
# ## Table 2: Dice per tissue

# %%
table2 = read_table(results, "01_pipeline", "table2.tsv", index_col=[0, 1])
table2

# %% [markdown]
# ## AgeU-Net (§4.1.2)
#
# The paper reports a test Dice (no BG) of 0.866 for AgeU-Net and a final training MSE
# of 2.45 weeks² (the "average deviation of 1.57 weeks" it quotes is the root of that MSE,
# an RMSE, not a mean absolute error), but found that its age head predicted the mean age
# on the test set. The age chapter therefore puts every variant's test error beside that
# of always predicting the training set's mean age.

# %%
print("paper (dHCP):", ", ".join(f"{k} {v:g}" for k, v in paper.AGEUNET.items()))
ageunet = read_table(results, "02_ageunet", "table_ageunet.tsv", index_col=0)
ageunet.round(3)

# %% [markdown]
# ## Table 3: label budgeting
#
# Each condition spends the same number of annotated slices: whole volumes of N subjects
# ("full"), or a third of the slices of 3N subjects along one axis or a random axis per
# slice.

# %%
table3 = read_table(results, "03_budgeting", "table3.tsv", header=[0, 1], index_col=[0, 1])
table3

# %% [markdown]
# ## Table 4: transfer strategies on the preterm test set

# %%
table4 = read_table(results, "04_transfer", "table4.tsv", index_col=[0, 1])
table4

# %% [markdown]
# ## Tables 5 and 6: pairwise tests between strategies
#
# Two-sided independent t-tests on per-subject mean Dice, without (Table 5) and with
# (Table 6) the background classes, Bonferroni-corrected over the ten pairs; the paper's
# corrected p-values beside ours.

# %%
columns = ["group_a", "group_b", "mean_a", "mean_b", "p_corrected", "p_corrected_paper"]
p_format = {"mean_a": "{:.3f}", "mean_b": "{:.3f}", "p_corrected": "{:.2g}"}
p_format["p_corrected_paper"] = "{:.2g}"
table5 = read_table(results, "04_transfer", "table5.tsv")[columns]
table5.style.format(p_format, na_rep="").hide(axis="index")

# %%
table6 = read_table(results, "04_transfer", "table6.tsv")[columns]
table6.style.format(p_format, na_rep="").hide(axis="index")

# %% [markdown]
# ## Do the paper's findings hold here?
#
# Each finding of the label-budgeting and transfer chapters, with its verdict and the test
# that decided it (the rules are listed in those chapters): "holds" only where a corrected
# test supports it, "not contradicted" where the difference points the paper's way without
# significance, "not supported" where it points the other way, "contradicted" where a test
# finds the opposite.

# %%
shown = ["finding", "paper (dHCP)", "difference", "test", "p_corrected", "verdict"]
findings = pd.concat(
    [
        read_table(results, chapter, "findings.tsv").assign(chapter=chapter)
        for chapter in ("03_budgeting", "04_transfer")
    ],
    ignore_index=True,
)
findings[["chapter", *shown]].style.format({"difference": "{:+.3f}", "p_corrected": "{:.2g}"}).hide(
    axis="index"
)

# %% [markdown]
# ## Beyond the paper: scans from the wild
#
# The [robustness chapter](06_robustness) asked what the paper did not: how the paper's
# T1w+T2w network, a T2w-only network and a domain-randomised T2w network hold up when the
# test scans come from another scanner, another age, or a thick-slice acquisition. Its
# goals are neonb's, decided by the same rules.

# %%
goals = read_table(results, "06_robustness", "goals.tsv")
goals[["finding", "difference", "test", "p_corrected", "verdict"]].style.format(
    {"difference": "{:+.3f}", "p_corrected": "{:.2g}"}
).hide(axis="index")

# %% [markdown]
# And how well `neonb segment --tta`'s QC score singled out the poor segmentations among
# the shifted scans:

# %%
qc_separation = read_table(results, "06_robustness", "qc_separation.tsv")
qc_separation

# %% [markdown]
# ## Every Dice value against the paper's
#
# Each point is one cell of Table 2 (a tissue on the validation or test set), Table 3 (a
# budgeting condition's mean Dice) or Table 4 (a tissue under a transfer strategy): the
# paper's value across, neonb's up.
# Hover for the cell; click a table in the legend to hide it.

# %%
pairs = pd.concat(
    [
        pair_with_paper(table2, "Table 2"),
        pair_with_paper(table3, "Table 3"),
        pair_with_paper(table4, "Table 4"),
    ],
    ignore_index=True,
)
plots.paper_vs_neonb(pairs, title=f"Dice: neonb ({dataset}) against the paper (dHCP)")

# %% [markdown]
# ## The paper's figures, regenerated
#
# | Paper | What it shows | Regenerated in |
# | --- | --- | --- |
# | Figure 1 | scan ages of the cohort | [The data](00_data) |
# | Figure 2 | a training patch before and after augmentation | [The pipeline](01_pipeline) |
# | Figure 4 | the annotated slices of label budgeting | [Label budgeting](03_budgeting), every condition, from its masks |
# | Figure 5 | the youngest and the oldest infant | [The data](00_data); their ages bound the sets of [Transfer](04_transfer) |
# | Figure 6 | validation Dice per tissue over epochs | [The pipeline](01_pipeline) |
# | Figures 7, 8 | a test segmentation beside its reference | [The pipeline](01_pipeline) |
# | Figure 9 | AgeU-Net's validation Dice over epochs | [AgeU-Net](02_ageunet) |
# | Figure 10 | ages of the source, target-train and target-test sets | [Transfer](04_transfer) |
# | Figure 11 | per-subject Dice of each transfer strategy | [Transfer](04_transfer) |
# | (none) | Dice against the severity of scanner, age, bias, slice, motion and noise shifts | [Robustness](06_robustness), beyond the paper |
#
# Figure 3 of the paper is a diagram of the AgeU-Net architecture; the AgeU-Net chapter
# describes the head neonb builds on the bottleneck.

# %% [markdown]
# ---
#
# ## Summary

# %%
test_nobg = table1.loc[("test", "Mean DSC (no BG)")]
print(
    f"On the {dataset}, the pipeline's test Dice without background was "
    f"{test_nobg.drop('paper').iloc[0]} (paper, dHCP: {test_nobg['paper']}); "
    f"of the findings checked, {(findings['verdict'] == 'holds').sum()} of {len(findings)} "
    f"hold here by their stated tests "
    f"({', '.join(f'{n} {v}' for v, n in findings['verdict'].value_counts().items())}). "
    f"Beyond the paper, {(goals['verdict'] == 'holds').sum()} of {len(goals)} robustness "
    "goals hold. "
    f"Runs: {len(environments)}, on "
    f"{'; '.join(sorted(environments['environment'].unique()))}."
)

# %% [markdown]
# The tables above are the paper's experiments run again by neonb. Where neonb ran on the
# synthetic cohort, agreement or disagreement with the paper says how the methods behave on
# a phantom whose anatomy and contrast change with age, not how they do on real infants;
# run the study on the dHCP release (`make study PARAMS=params/paper DATA=...`) for that.
#
# ## What's next?
#
# Segment your own scans with a model the study trained: `neonb export` and
# `neonb segment`, described in the repository's README.
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532.
