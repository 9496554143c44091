# %% [markdown]
# # Transfer learning: from term-equivalent to preterm brains

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
training = {
    "patch_size": [16, 16, 32],
    "batch_size": 2,
    "epochs": 2,
    "samples_per_volume": 1,
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "overlap": 0.0,
    "model": {"strides": [1, 2, 2, 2, 2], "filters": [4, 4, 8, 8, 8], "deep_supr_num": 1},
}
fine_tuning = {"epochs": 1, "learning_rate": 0.001}
scratch = {"epochs": 2}
depths = {"shallow": 1, "medium": 2, "deep": 3}
sw_batch_size = 8
backend = "torch"  # "auto" (OpenVINO) compiles each network (~5 s): slower here
n_runs = 2
equivalence_margin = 0.01

# %% [markdown]
# ---
#
# ## Overview
#
# Labelled preterm brains are scarce. Richter & Fetit (2022, §3.5, §4.3) ask whether a
# network pre-trained on the *oldest* infants of dHCP (the source) can be adapted to the
# *youngest* (the target) with few labelled target scans, and how much of it should be
# retrained. This chapter
#
# 1. draws the source and target sets and plots their ages (Figure 10),
# 2. maps the paper's fine-tuning strategies onto the blocks of MONAI's DynUNet,
# 3. pre-trains the network on the source,
# 4. adapts it to the target in five ways and trains a sixth network from scratch,
# 5. scores all six on the target test set (Table 4, Figure 11), and
# 6. compares the strategies pair by pair with Bonferroni-corrected t-tests (Tables 5, 6).
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The pipeline chapter](01_pipeline) | Necessary | network, training, sliding windows |
# | [Transfer learning](https://arxiv.org/abs/1411.1792) (Yosinski *et al.*, 2014) | Helpful | why early layers transfer |
# | [t-tests](https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.ttest_ind.html), [Bonferroni](https://www.statsmodels.org/stable/generated/statsmodels.stats.multitest.multipletests.html) | Helpful | Tables 5 and 6 |
#
# - **Time to learn**: 20 minutes
# - **System requirements**: the demo runs in minutes on a CPU; the paper's scale needs
#   a GPU with 16 GB
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import pandas as pd

from neonb import (
    experiment,
    models,
    paper,
    plots,
    report,
    runs,
    splits,
    statistics,
    study,
    transfer,
)
from neonb.inference import describe_hardware
from neonb.metrics import case_summary

plots.use_book_renderer()
out = Path(results_dir) / "04_transfer"
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Source and target (the paper's Figure 10)
#
# The target is the youngest sessions, one per infant; the source the oldest sessions of
# the other infants. The source is split into training and validation sessions, the
# target into a small training set (for fine-tuning) and a test set. The splits are those
# the data chapter drew and wrote (`splits_transfer.tsv`), read back.

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
transfer_splits = splits.load_study_splits(results_dir, manifest)["transfer"]
chapter = runs.transfer_runs(
    cohort,
    transfer_splits,
    results_dir=results_dir,
    seed=seed,
    training=training,
    fine_tuning=fine_tuning,
    scratch=scratch,
    depths=depths,
    n_runs=n_runs,
)
records = chapter.records
source_config, tune_config, scratch_config = (
    chapter.configs[name] for name in ("source", "tune", "scratch")
)
hardware = describe_hardware(source_config.device)
datasets = transfer_splits[transfer_splits["split"] != splits.EXCLUDED]
datasets = datasets.assign(
    dataset=datasets["split"].map(
        {
            "source_train": "source",
            "source_val": "source",
            "target_train": "target train",
            "target_test": "target test",
        }
    )
)
print(f"{dataset} at {root}; results in {out}; running on {hardware}")
ages = datasets.groupby("dataset", sort=False)["scan_age"].describe()
ages[["count", "mean", "std", "min", "max"]].round(2)

# %%
plots.age_distributions(datasets, title=f"Scan age of the three sets ({dataset})")

# %% [markdown]
# The paper's source had a mean age of 43.70 ± 0.47 weeks (42.0-45.1) and its target
# 33.19 weeks (26.7-35.7). Compare with the table above: a smaller cohort has fewer very
# young infants, so its target reaches further up the age range and the gap between
# target and source is narrower.
#
# ## The network, block by block
#
# The paper's strategies train the network "from the inside to the outside": the
# bottleneck and the directly adjacent layers (*shallow*), one more encoder and decoder
# block (*medium*), two more (*deep*), everything (*full*). In MONAI's `DynUNet` every
# block has a **level**, its number of resolution steps from the bottleneck (level 0):
# the last downsampling block and the first upsampling block are level 1, and so on out
# to the input block, the last upsampling block and the output block. A strategy of
# depth *d* trains levels 0 to *d* and freezes the rest.
#
# Two decisions the paper leaves open:
#
# - **Output block and deep-supervision heads.** They are 1×1×1 convolutions reading one
#   decoder level, and they train with that level. The output block sits at the
#   outermost level, which the paper's shallow condition keeps fixed ("all parameters of
#   the outer layers ... remained fixed"), so only *full* and *scratch* retrain it.
# - **Depth of *deep*.** On the paper's six-stride network *deep* (depth 4) leaves
#   exactly the outermost level frozen. A network with one level fewer (the CPU demo's)
#   would train every block at depth 4, as *full* does; there the parameter `depths`
#   gives *deep* depth 3, which keeps "all but the outermost level".
#
# Which blocks each strategy trains (`train`), with their levels and sizes:

# %%
network = models.build_model(source_config.model)
depths = chapter.depths  # checked against the network (transfer.check_depths)
outer = transfer.outermost_level(network)
print(
    f"strides {list(source_config.model.strides)}: levels 0-{outer}; depths {depths}; "
    f"deep leaves level(s) {depths['deep'] + 1}-{outer} frozen"
)
transfer.block_table(network, depths)

# %% [markdown]
# And per strategy, the parameters it trains:

# %%
strategies = transfer.strategy_table(network, depths)
strategies.to_csv(out / "strategies.tsv", sep="\t")
strategies

# %% [markdown]
# Parameters concentrate near the bottleneck, where the filters are widest, while
# computation concentrates at the outer levels, where the images are largest: *shallow*
# already trains a large share of the parameters (`trained %`) but leaves the expensive
# outer blocks frozen.
#
# ## Pre-training on the source
#
# One network is trained on the source training sessions and validated on the source
# validation sessions after every epoch; its best epoch is the pre-trained model every
# fine-tuning starts from. A finished run is reloaded rather than trained again.

#
# Every run of this chapter is defined once, in `neonb.runs` (`neonb train --chapter
# 04_transfer` trains the same runs outside the notebook, the source first).

# %%
source = chapter.runs["source"].train(progress=False)
print(
    f"source: {len(source.log)} epochs, {source.train_time_s:.0f} s, best validation Dice "
    f"(no BG) {source.best['val_dice_nobg']:.3f} at epoch {int(source.best['epoch'])} "
    f"(paper, dHCP: mean Dice 0.897 after 20 epochs)"
)

# %% [markdown]
# ## Five ways to adapt, one network from scratch
#
# Each fine-tuning strategy starts from a copy of the pre-trained network, frozen by
# block; the optimiser sees only the trainable parameters. The scratch network starts
# from a fresh initialisation and trains for longer (the paper: 30 epochs from scratch; the
# 20 fine-tuning epochs are the authors' public code's). The target has no validation set of
# its own, and its test set must not choose the epoch, so every run is validated on centre
# patches of the target training sessions: the kept epoch is the one that fits those best.
#
# Every strategy and the scratch network are trained `n_runs` times, replicate *k* with
# seed `seed + k` (patches, augmentation, and for scratch the initialisation), all from the
# one pre-trained source network: the replicates show how much fine-tuning's own randomness
# moves a result, which the paper's single runs cannot.

# %%
trained = runs.train_runs(chapter)

# %% [markdown]
# Training time per run (the row `none` is the pre-training on the source, which every
# other row but `scratch` starts from). A frozen block needs no weight gradients, and the
# blocks below the lowest trainable one need no backward pass at all, so the partial
# strategies take fewer seconds per step. Times include the short validation after each
# epoch; compare them with each other, on the machine named above.

# %%
names = {"source": "none"}
timing = trained.facts(by="strategy", names=names)
timing.to_csv(out / "training_time.tsv", sep="\t", index=False)
timing.groupby("strategy", sort=False)[
    ["sessions", "epochs", "steps", "train_time_s", "s_per_step", "val_dice_nobg"]
].mean().round(3)

# %% [markdown]
# ## Scoring on the target test set
#
# Each network segments every target test volume whole, with sliding windows of the
# training patch size inside the foreground box (as in the pipeline chapter; overlap,
# windows per forward pass and `backend` as set above), and each tissue is scored with Dice.

# %%
volumes = experiment.prepare_volumes(
    records["target_test"], cache_dir=source_config.cache_dir, channels=source_config.channels
)
per_case = trained.evaluate(
    volumes,
    source_config,
    by="strategy",
    names=names,
    sw_batch_size=sw_batch_size,
    backend=backend,
)
per_case.to_csv(out / "test_per_class.tsv", sep="\t", index=False)
cases = case_summary(per_case, by=("strategy", "run", "participant_id", "session_id", "scan_age"))
cases.to_csv(out / "test_per_subject.tsv", sep="\t", index=False)
seconds = per_case.groupby(["strategy", "run", "participant_id"])["inference_s"].first()
print(
    f"{len(volumes)} test volumes × {len(trained.trained)} networks segmented in "
    f"{seconds.sum():.0f} s ({seconds.mean():.2f} s per volume, overlap "
    f"{source_config.overlap:g}); per-subject Dice in {out / 'test_per_subject.tsv'}"
)

# %% [markdown]
# Each strategy's mean test Dice (8 tissues) with two 95 % intervals: over its runs (how
# far another fine-tuning run could move it; `none` is one network, so it has none) and
# over the target test subjects (each subject's Dice averaged over the runs).

# %%
intervals = statistics.replicate_summary(cases, "dice_mean_nobg", by="strategy")
intervals.to_csv(out / "test_intervals.tsv", sep="\t", index=False)
intervals.round(3)

# %%
plots.replicate_intervals(
    intervals, title=f"Target test Dice (no BG) per strategy ({dataset}, {hardware})"
)

# %% [markdown]
# ## Table 4: Dice per tissue and strategy
#
# The mean over the target test subjects of each tissue's Dice, neonb's rows beside the
# paper's (dHCP, T4 GPUs).

# %%
label = f"neonb ({dataset})"
table4 = report.table4(per_case, label=label)
table4.to_csv(out / "table4.tsv", sep="\t")
table4

# %% [markdown]
# ## Figure 11: per-subject Dice by strategy
#
# One point per test subject, its Dice averaged over the strategy's runs (hover for its
# age); the boxes show quartiles. Left: the eight tissues; right: all ten classes.

# %%
subjects = statistics.average_runs(
    cases, ["dice_mean_nobg", "dice_mean"], by="strategy", keep=("session_id", "scan_age")
)
plots.strategy_boxplots(subjects, title=f"Target test Dice per strategy ({dataset}, {hardware})")

# %% [markdown]
# ## Tables 5 and 6: which differences are significant?
#
# As in the paper, each pair of the five trained strategies is compared with a
# two-sided independent t-test on the per-subject mean Dice (`scipy.stats.ttest_ind`; a
# subject's Dice averaged over the strategy's runs), and the ten p-values are
# Bonferroni-corrected (`statsmodels`' `multipletests`, overall α = 0.05). Cells give
# neonb's corrected p (`*` below 0.05), the paper's in brackets. Table 5 leaves out the two
# background classes; Table 6 includes them.

# %%
compared = ["shallow", "medium", "deep", "full", "scratch"]
tests = {}
for name, value, reference in [
    ("table5", "dice_mean_nobg", paper.table5()),
    ("table6", "dice_mean", paper.table6()),
]:
    tests[name] = report.pairwise_beside_paper(
        statistics.pairwise_ttests(subjects, value, by="strategy", order=compared), reference
    )
    tests[name].to_csv(out / f"{name}.tsv", sep="\t", index=False)
report.pvalue_triangle(tests["table5"])

# %%
report.pvalue_triangle(tests["table6"])

# %% [markdown]
# **The paired test.** Every strategy segments the *same* target test subjects, so the
# independent test above throws away what the design gives: much of a subject's Dice is
# the subject (its age, its anatomy), shared by every strategy. The paired t-test
# (`scipy.stats.ttest_rel`) compares each subject with itself. Its corrected p-values
# (Table 5's measure, without background), with the mean difference and its 95 % interval;
# the verdicts below use the paired tests.

# %%
paired = statistics.pairwise_paired_tests(cases, "dice_mean_nobg", by="strategy", order=compared)
paired.to_csv(out / "table5_paired.tsv", sep="\t", index=False)
report.pvalue_triangle(paired, paper.table5())

# %% [markdown]
# ## Do the paper's findings hold here?
#
# The paper reports that deeper fine-tuning was better than shallower (shallow clearly
# worst), that medium fine-tuning came close to full fine-tuning, that a network trained
# from scratch on the small target set was worse than the fine-tuned ones, and that
# training more parameters spread the results more. Each claim is decided here by a stated
# rule (below the table): a difference by the paired t-test, "as good as" by an equivalence
# test (TOST) with a margin of `equivalence_margin` Dice, a difference in spread by the
# Pitman-Morgan test; the six p-values are Bonferroni-corrected together. The paper counted
# p ≥ 0.05 as "comparable"; here that alone gives "not contradicted", not "holds".

# %%
findings = transfer.paper_findings(cases, margin=equivalence_margin)
findings.to_csv(out / "findings.tsv", sep="\t")
report.findings_view(findings)

# %% [markdown]
# The rules behind the verdicts:

# %%
pd.Series(statistics.RULES, name="rule").to_frame()

# %% [markdown]
# ---
#
# ## Summary

# %%
mean_nobg = intervals.set_index("strategy")["mean"]
paper_nobg = paper.table4().mean(axis=1)
best = mean_nobg.idxmax()
print(
    f"On the {dataset} ({hardware}), {n_runs} runs per strategy: the source network reached "
    f"{mean_nobg['none']:.3f} mean Dice (no BG) on the target test set without "
    f"fine-tuning; the best strategy was {best!r} ({mean_nobg[best]:.3f}), full "
    f"fine-tuning {mean_nobg['full']:.3f}, shallow {mean_nobg['shallow']:.3f}, scratch "
    f"{mean_nobg['scratch']:.3f} (paper, dHCP, mean of Table 4: full "
    f"{paper_nobg['full']:.3f}, shallow {paper_nobg['shallow']:.3f}, scratch "
    f"{paper_nobg['scratch']:.3f}). "
    f"{int((tests['table5']['p_corrected'] < 0.05).sum())} of 10 pairwise differences "
    f"(no BG) were significant by the paper's independent t-tests after Bonferroni "
    f"correction, {int((paired['p_corrected'] < 0.05).sum())} by paired t-tests "
    f"(paper: {int((paper.table5() < 0.05).sum().sum())}, independent)."
)
for finding, row in findings.iterrows():
    print(
        f"  {finding}: {row['verdict']} (difference {row['difference']:+.3f}, {row['test']}, "
        f"corrected p {row['p_corrected']:.2g})"
    )

# %% [markdown]
# The strategies, the freezing by block and the statistics run as the paper describes;
# the table of findings above says which of its conclusions the numbers here support.
# On the synthetic cohort the difference between target and source comes only from the
# phantom's age-dependent anatomy (brain size, folding, ventricle size) and contrast
# (myelination flips the white/grey order on T1w), and the target's ages overlap less
# with the paper's. With a few training epochs on a CPU, differences between strategies
# also reflect how far each got in its short training, not only what it could learn.
#
# ## What's next?
#
# The [closing chapter](05_paper_vs_neonb) gathers the tables of every chapter beside the
# paper's; the introduction lists how to run the whole study at the paper's scale on dHCP
# data.
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532.
# - Yosinski J *et al.* (2014). How transferable are features in deep neural networks?
#   *NeurIPS* 27.
# - Amiri M, Brooks R, Rivaz H (2019). Fine tuning U-Net for ultrasound image
#   segmentation: which layers? *DART/MIL3ID, LNCS* 11795.
# - Tajbakhsh N *et al.* (2016). Convolutional neural networks for medical image analysis:
#   full training or fine tuning? *IEEE Trans. Med. Imaging* 35:1299-1312.
# - MONAI `DynUNet`; `scipy.stats.ttest_ind`; `statsmodels.stats.multitest.multipletests`.
