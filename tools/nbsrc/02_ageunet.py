# %% [markdown]
# # AgeU-Net: predicting the age at scan from the segmentation network

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
n_runs = 1  # runs per variant (the paper: 2)
init = "baseline"  # "baseline": start from the pipeline chapter's weights; "scratch"
training = {"learning_rate": 0.001, "epochs": 1}  # changes to the baseline's settings
head = {"reduction": "conv", "conv_layers": 2, "hidden": 32, "alpha": 0.01, "standardize": False}
variants = {
    "paper": {},
    "standardized": {"head": {"standardize": True}},
    "head_lr": {"head": {"head_learning_rate": 0.01}},
    "alpha_ramp": {"head": {"alpha_schedule": "linear", "alpha_start": 0.001, "alpha": 0.1}},
    "staged": {
        "head": {"staged": True, "standardize": True},
        "training": {"epochs": 5, "learning_rate": 0.003},
    },
}

# %% [markdown]
# ---
#
# ## Overview
#
# Richter & Fetit (2022, §3.3) extend their U-Net with an **age pathway**: the bottleneck
# features, where the image is most condensed, are reduced by strided convolutions to one
# vector and regressed onto the post-menstrual age at scan by a fully connected layer.
# Trained with `Dice + CE + α · MSE(age)`, their AgeU-Net segmented a little worse than the
# baseline and its age head "primarily learned to estimate the mean value of the age
# distribution" (§4.1.2). Their discussion proposes three remedies, which this chapter
# compares with the paper's recipe:
#
# 1. the AgeU-Net model and its loss,
# 2. training the paper's recipe, the same recipe on standardised ages, and the three
#    remedies: a **separate learning rate** for the head, an **increasing α**, and
#    **staged training** (segmentation first, then the head alone),
# 3. the validation Dice over epochs (the paper's Figure 9),
# 4. segmentation and age on the test set, against the baseline and the **mean
#    predictor** (every infant gets the mean training age), with a stated rule for each
#    verdict, and
# 5. predicted against true age, preterm- and term-born infants apart.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The pipeline chapter](01_pipeline) | Necessary | the baseline this chapter extends |
# | [Multi-task learning](https://arxiv.org/abs/1706.05098) | Helpful | one network, two losses |
# | [Brain-age prediction](https://doi.org/10.1016/j.neuroimage.2017.07.059) | Helpful | Cole *et al.* (2017) |
#
# - **Time to learn**: 15 minutes
# - **System requirements**: the demo runs on a CPU in a few minutes; the paper's scale
#   needs a GPU with 16 GB
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import pandas as pd

from neonb import ageunet, experiment, paper, plots, runs, splits, study
from neonb.inference import describe_hardware

plots.use_book_renderer()
out = Path(results_dir) / "02_ageunet"
out.mkdir(parents=True, exist_ok=True)
baseline_dir = Path(results_dir) / "01_pipeline" / "run-0"

# %% [markdown]
# ## Sessions, and the baseline of the pipeline chapter
#
# The same training, validation and test sessions as the baseline (the data chapter's
# `splits_pipeline.tsv`, read back).
# The AgeU-Net keeps the settings of the baseline's run folder (network, patch size,
# optimiser, augmentation; the pipeline chapter must have trained it), changing only what
# `training` lists: the paper lowers the learning rate to a "medium" rate it writes as
# "10e-3", read here as 1e-3 (below the baseline's 1e-2).

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
chapter = runs.ageunet_runs(
    cohort,
    pipeline_splits,
    results_dir=results_dir,
    seed=seed,
    training=training,
    head=head,
    variants=variants,
    init=init,
    n_runs=n_runs,
)
records, config = chapter.records, chapter.config
hardware = describe_hardware(config.device)
mean_age = float(pd.Series([r["scan_age"] for r in records["train"]]).mean())
print(f"{dataset} at {root}; baseline from {baseline_dir}; results in {out}; on {hardware}")
print(f"mean training age (the mean predictor): {mean_age:.2f} weeks")
in_sets = pipeline_splits[pipeline_splits["split"].isin(splits.PIPELINE_SETS)]
in_sets.groupby("split")["scan_age"].describe()[["count", "mean", "std", "min", "max"]]

# %% [markdown]
# ## The model
#
# `AgeUNet` is MONAI's `DynUNet` (the baseline's very modules, so the baseline's weights
# load into it) with an `AgeHead` that reads the output of the bottleneck block through a
# forward hook. The head's strided convolutions bring the bottleneck grid to 1×1×1, then
# two fully connected layers give one number, the age in weeks.
#
# **The weight of the age term.** The paper's loss is `Dice + CE + α · MSE` with the MSE of
# ages in weeks² and α = 1e-2 (§3.3); the `paper` variant uses exactly that
# (`standardize: false`). neonb also offers standardised ages (`standardize: true`, the
# `standardized` variant): the head predicts `(age − mean) / SD` of the training ages and
# the MSE is of those z-scores, i.e. the MSE in weeks² divided by the variance of the
# training ages (about 12 on the dHCP), so the same α weighs the age term that many times
# less. Comparing the two says whether the weight of the age term matters.
#
# **Where the head starts (neonb's choice).** A new head outputs about 0: 0 weeks without
# standardisation, whose squared errors (~1500 weeks²), even times α, swamp the
# segmentation loss in the first steps. Every head here therefore starts at the mean
# training age: the bias of its last layer is set to it (`AgeHead.start_at`). This moves
# the head's starting point, not the loss the paper weighs.

# %%
head_config = chapter.head
network = ageunet.build_ageunet(config.model, head_config)
n_head = sum(p.numel() for p in network.head_parameters())
n_all = sum(p.numel() for p in network.parameters())
print(network.age_head)
print(f"{n_head:,} of {n_all:,} parameters are in the age head")
target = "standardised ages" if head_config.standardize else "ages in weeks (weeks²)"
print(f"age term of the base head: α = {head_config.alpha:g} × the MSE of {target}")

# %% [markdown]
# ## Training the paper's recipe and the three remedies
#
# | variant | what changes |
# | --- | --- |
# | `paper` | `Dice + CE + α · MSE` (weeks²), α constant, one learning rate (§3.3, §4.1.2) |
# | `standardized` | the same, with the MSE of standardised ages (neonb's option) |
# | `head_lr` | the head gets its own, larger learning rate |
# | `alpha_ramp` | α grows linearly over the epochs, from `alpha_start` to `alpha` |
# | `staged` | the baseline's network frozen; only the head trains, on cached features |
#
# The two joint remedies keep the paper's weighting, so each differs from `paper` in one
# setting; the staged head has no segmentation loss to be weighed against and regresses
# standardised ages (neonb's choice).
#
# With `init = "baseline"` the joint variants start from the baseline's weights with a
# new head (fine-tuning), as the CPU demo cannot train five networks from scratch; the
# paper's parameter set trains them from scratch (`init = "scratch"`), as the paper did.
# The staged variant always starts from the baseline. The joint runs keep the epoch with
# the best validation Dice, as the baseline does.
#
# **Staged training on cached features.** Trained on one or two random patches per volume
# for a few dozen steps, a head only sees each infant's age a handful of times, and the
# cheapest way to lower the MSE is to predict the mean. Yet the frozen baseline's
# bottleneck does carry age: the staged variant therefore runs the frozen network **once**
# over every training and validation volume, on the very sliding windows used at test time
# (`ageunet.window_features`: MONAI's windows inside the foreground box, a forward hook on
# the bottleneck, the decoder skipped), and caches each window's bottleneck features with
# its volume's age. The head (the same strided convolutions and fully connected layers
# that `segment_with_age` runs at test time) then trains on those cached features alone
# for many epochs, with standardised targets, and the run keeps the epoch whose
# validation volumes (mean of their windows' ages) have the lowest age MAE. A head epoch
# costs milliseconds, as no U-Net forward or backward pass is needed.
#
# **Replicates.** Every variant trains `n_runs` times, run `k` with seed `seed + k` (in
# `02_ageunet/<variant>` for run 0, `<variant>-run<k>` after it); the paper ran its
# AgeU-Net twice, the paper's parameter set does too, while the demo's time budget allows
# one run each. With one run, a difference between variants may be the seed's.
#
# The runs are defined once, in `neonb.runs` (`neonb train --chapter 02_ageunet` trains the
# same runs outside the notebook); a finished run is reloaded here, not trained again.

# %%
settings, trained = chapter.settings, {}
for name, spec in chapter.runs.items():
    run_config, run_head = settings[name]
    trained[name] = spec.train(progress=False)
    age_log = pd.read_csv(spec.run_dir / ageunet.AGE_LOG_FILE, sep="\t")
    print(
        f"{name} (seed {run_config.seed}): {len(trained[name].log)} epochs of "
        f"{run_config.epochs} in "
        f"{trained[name].train_time_s:.1f} s, lr {run_config.learning_rate:g}"
        f" (head {run_head.head_learning_rate or run_config.learning_rate:g}), "
        f"last training age MAE {age_log['train_age_mae_w'].iloc[-1]:.2f} weeks"
    )
    if run_head.staged:
        log = trained[name].log
        best_epoch = log.loc[log["val_age_mae_w"].idxmin()]
        print(
            f"  features cached in {log['data_time_s'].iloc[0]:.1f} s, head trained in "
            f"{log['epoch_time_s'].sum() - log['data_time_s'].iloc[0]:.1f} s; kept epoch "
            f"{best_epoch['epoch']:.0f}: validation age MAE {best_epoch['val_age_mae_w']:.2f} "
            f"weeks"
        )

# %% [markdown]
# ## Validation Dice over epochs (the paper's Figure 9)
#
# The paper's recipe, one line per tissue: the validation patches after every epoch.
# With `init = "baseline"` the curve starts where the baseline ended.

# %%
plots.dice_curves(
    trained[runs.replicate_id("paper", 0)].log,
    title=f"AgeU-Net ({'from the baseline' if init == 'baseline' else 'from scratch'}): "
    f"validation Dice per tissue ({dataset})",
)

# %% [markdown]
# ## The test set: segmentation and age
#
# Each test volume is segmented with the baseline's sliding windows (same size and
# overlap, so the Dice compares with the pipeline chapter's). Every window also predicts
# an age; the volume's age is their **mean**, or their **foreground-weighted** mean, where
# a window counts by its mean tissue probability, so windows that see mostly background
# count less. The volumes are loaded once for all variants; HD95 is not computed here.

# %%
volumes = experiment.prepare_volumes(
    records["test"], cache_dir=config.cache_dir, channels=config.channels
)
per_class, ages = [], []
for name, run in trained.items():
    variant, k = chapter.replicates[name]
    table, predicted = experiment.evaluate(
        run.model, volumes, settings[name][0], window_hook=ageunet.WindowAges
    )
    per_class.append(table.assign(variant=variant, run=k))
    ages.append(predicted.assign(variant=variant, run=k))
    print(
        f"{name}: {len(predicted)} test volumes, {predicted['n_windows'].sum()} windows, "
        f"{predicted['inference_s'].sum():.0f} s"
    )
per_class = pd.concat(per_class, ignore_index=True)
ages = pd.concat(ages, ignore_index=True).merge(
    manifest[["participant_id", "session_id", "preterm"]], how="left"
)
per_class.to_csv(out / "test_per_class.tsv", sep="\t", index=False)
ages.to_csv(out / "test_ages.tsv", sep="\t", index=False)
print(f"per-subject ages in {out / 'test_ages.tsv'}")

# %% [markdown]
# ## Segmentation Dice and age error, against the baseline and the mean predictor
#
# Test Dice without background (mean over sessions of the mean over the eight tissues);
# age MAE in weeks and MSE in weeks² over the test sessions. The baseline's Dice comes
# from the pipeline chapter (`test_per_class.tsv`), computed with the same windows. A
# variant's row is the mean over its runs; with more than one run, each run follows on a
# row of its own.

# %%
baseline_per_class = pd.read_csv(Path(results_dir) / "01_pipeline" / "test_per_class.tsv", sep="\t")
table = ageunet.summary_table(
    per_class, ages, baseline_per_class[baseline_per_class["run"] == 0], mean_age
)
table.to_csv(out / "table_ageunet.tsv", sep="\t")
print(f"{dataset}, {hardware}; table in {out / 'table_ageunet.tsv'}")
table.round(3)

# %% [markdown]
# The paper's AgeU-Net (dHCP, 2 runs of 60 epochs, from scratch) reached a test Dice (no
# BG) of 0.866 against the baseline's 0.917; its training MSE and RMSE below are
# **training** values — on the test set it did no better than the mean.

# %%
pd.Series(paper.AGEUNET, name="paper (dHCP)").to_frame()

# %% [markdown]
# ## Predicted against true age
#
# One panel per variant (one point per test session and run); the dotted line is a perfect
# prediction, and a flat row of points at the mean age is what the paper saw. The table's
# `predicted SD` and `r` columns say the same in numbers: a head that learned the mean has
# an SD near 0.

# %%
plots.age_scatter(ages, title=f"Predicted (window mean) against true age, test set ({dataset})")

# %% [markdown]
# ---
#
# ## Summary

# %% [markdown]
# Each variant's verdict follows two rules, applied in turn (`ageunet.age_verdicts`; the
# `rule` column gives each verdict with its numbers): a head whose predictions spread less
# than a quarter of the true ages' SD has **learned the mean age**; otherwise its
# per-session absolute errors are compared with the mean predictor's on the same test
# sessions by a two-sided **Wilcoxon signed-rank test** (paired, and free of any normality
# assumption about a dozen errors), and it **beats the mean predictor** only with a lower
# MAE and p < 0.05. A lower MAE alone is "not shown to beat the mean predictor". With
# several runs, a session's error is the mean over the runs.

# %%
verdicts = ageunet.age_verdicts(ages, mean_age)
verdicts.to_csv(out / "age_verdicts.tsv", sep="\t", index=False)
best = verdicts.loc[verdicts["MAE (weeks)"].idxmin()]
print(
    f"On the {dataset} ({hardware}), with {n_runs} run(s) per variant, the lowest test age "
    f"MAE was {best['variant']}'s: {best['MAE (weeks)']:.2f} weeks against "
    f"{best['mean predictor MAE (weeks)']:.2f} for the mean predictor ({best['verdict']}); "
    f"its test Dice (no BG) {table.loc[f'AgeU-Net: {best.variant}', 'test Dice (no BG)']:.3f} "
    f"(baseline {table.loc['baseline', 'test Dice (no BG)']:.3f})."
)
for row in verdicts.itertuples(index=False):
    print(f"  {row.variant}: {row.verdict} ({row.rule})")
verdicts.drop(columns="rule").round(3)

# %% [markdown]
# The AgeU-Net adds one head and one forward hook to the baseline; whether its
# age head predicts more than the mean age, and what the segmentation pays for it, is
# what the table and the lines above say, on the data and hardware they name. The staged
# variant cannot change the segmentation (its Dice is the baseline's by construction);
# what it tests is whether the baseline's bottleneck carries age, and whether a head
# trained on enough examples of it (every window of every training volume, many epochs)
# reads it out, where the joint variants, trained on a few random patches, may not. The
# verdicts above follow the rules stated beside them; with a dozen test sessions, a
# difference of a few tenths of a week in MAE is usually within noise, which is why
# "beats the mean predictor" needs the paired test. On the synthetic cohort, age is
# written into the images by the phantom's growth model (brain size, folding, ventricles,
# contrast), so these numbers say how well the network reads that model, not how well it
# would age real infants.
#
# ## What's next?
#
# The next chapter returns to segmentation and asks how to spend a limited budget of
# annotated slices.
#
# ## Resources and references
#
# - Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep
#   learning. *Front. Neuroinform.* 16:1006532 (§3.3, §4.1.2, Figure 9).
# - Cole JH *et al.* (2017). Predicting brain age with deep learning from raw imaging data
#   results in a reliable and heritable biomarker. *NeuroImage* 163:115–124.
# - Ruder S (2017). An overview of multi-task learning in deep neural networks.
#   arXiv:1706.05098.
# - MONAI: `DynUNet`, `sliding_window_inference` — <https://docs.monai.io>
