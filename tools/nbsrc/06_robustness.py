# %% [markdown]
# # Beyond the paper: robustness to the scans clinics have

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
init = "baseline"
training = {"epochs": 1, "learning_rate": 0.001}
models = {
    "t2w": {"channels": ["t2w"]},
    "randomized": {"channels": ["t2w"], "synthesis": {"real_prob": 0.2}},
}
n_runs = 1
n_eval = 2
shifts = {"scanner": [1.0], "thick_slices": [6.0], "noise": [0.2]}
qc_dice = 0.7
qc_levels = "all"
qc_all = False
overlap = 0.0
sw_batch_size = 8
backend = "auto"  # every window of the chapter (scores, QC): OpenVINO on the CPU where installed

# %% [markdown]
# ---
#
# ## Overview
#
# The paper's network reads a bias-corrected, super-resolved dHCP T1w **and** T2w pair.
# Clinical neonatal scans rarely have a usable T1w, come from other scanners and
# sequences, and are often acquired as thick 2D slices. This chapter asks how far the
# paper's recipe carries to such scans, and whether the field's answer, *domain
# randomisation*, does better. It
#
# 1. renders the test sessions under six kinds of shift, each at rising severity,
# 2. trains two networks besides the paper's T1w+T2w one: one on the T2w alone, and one
#    on the T2w alone with domain-randomised training images,
# 3. exports the three as model folders, as `neonb segment` reads them,
# 4. scores each network on every shifted session (Dice against severity), and
# 5. asks whether `neonb segment --tta`'s QC score tells the good segmentations from the
#    bad ones, clean and shifted.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The pipeline chapter](01_pipeline) | Necessary | the paper's network, whole-volume Dice |
# | [SynthSeg](https://doi.org/10.1016/j.media.2023.102789) (Billot *et al.*, 2023) | Helpful | training on images synthesised from label maps |
# | [TorchIO](https://torchio.readthedocs.io) (Pérez-García *et al.*, 2021) | Helpful | the transforms that render the images and the shifts |
# | [ROC curves](https://en.wikipedia.org/wiki/Receiver_operating_characteristic) | Helpful | the QC score's AUC |
#
# - **Time to learn**: 15 minutes
# - **System requirements**: the demo runs in minutes on a CPU
#
# ---

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import pandas as pd

from neonb import experiment, export, plots, robustness, runs, splits, study, transforms
from neonb.inference import describe_hardware

plots.use_book_renderer()
out = Path(results_dir) / "06_robustness"
out.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Three networks
#
# - **paper**: the pipeline chapter's `run-0`, the paper's T1w+T2w network, as trained there.
# - **t2w**: the same network and settings reading the T2w alone.
# - **randomized**: the T2w network trained on *domain-randomised* images: for most
#   training patches, the image is thrown away and a new one is synthesised from the
#   patch's label map, with a random intensity per tissue (a Gaussian mixture, as SynthSeg),
#   a random bias field, random blur and thick slices along a random axis, random gamma
#   and noise (`neonb.synthesis`, built on TorchIO's `RandomLabelsToImage`,
#   `RandomBiasField`, `RandomAnisotropy`, `RandomBlur`, `RandomGamma`, `RandomNoise`); with
#   probability `real_prob` the real T2w is kept. The network cannot learn one scanner's
#   intensities, only shapes.
#
# Both new networks keep every other setting of the baseline, changed by `training`; with
# `init: baseline` they start from the baseline's weights (its T2w filters), as the
# AgeU-Net chapter does. Their runs are defined once, in `neonb.runs`; `neonb train
# --chapter 06_robustness` trains the same runs outside the notebook.

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
dataset = cohort.description
pipeline_splits = splits.load_study_splits(results_dir, cohort.manifest)["pipeline"]
chapter = runs.robustness_runs(
    cohort,
    pipeline_splits,
    results_dir=results_dir,
    seed=seed,
    training=training,
    models=models,
    init=init,
    n_runs=n_runs,
)
records = chapter.records
baseline, baseline_config = experiment.load_trained_run(chapter.baseline_dir)
hardware = describe_hardware(baseline_config.device)
print(f"{dataset}; results in {out}; running on {hardware}")
pd.DataFrame(
    [
        {"model": "paper", "channels": "+".join(baseline_config.channels), "synthesis": "-"},
        *(
            {
                "model": run.group,
                "channels": "+".join(run.config.channels),
                "synthesis": "yes" if run.config.synthesis is not None else "-",
            }
            for run in chapter
            if run.replicate == 0
        ),
    ]
)

# %% [markdown]
# What the randomised network sees: a training patch of one session, its label map, and
# images synthesised from it with different seeds (the real T2w first).

# %%
randomized = next(run for run in chapter if run.config.synthesis is not None).config
always = randomized.synthesis.replace(real_prob=0.0)
examples = [
    transforms.augmented_example(
        records["train"][0],
        randomized.patch_size,
        transforms.AugmentationConfig.none(),
        seed=seed + i,
        model=randomized.model,
        synthesis=always,
    )
    for i in range(3)
]
plots.synthesis_examples(examples[0][0], [after for _, after in examples])

# %% [markdown]
# ## Shifted test sessions
#
# Each of the first `n_eval` test sessions is rendered under every shift at every
# severity (`shifts`: kind → severities), once, seeded per session, shift and level, and
# kept beside the results (`shifted/`, listed in `shifted/shifted.tsv`, a manifest
# `neonb segment --batch` reads):
#
# | shift | what it imitates | severity |
# | --- | --- | --- |
# | `scanner` | another scanner's T2w contrast: a non-linear remapping of intensities | strength of the remapping |
# | `age_contrast` | tissue contrast beyond the training ages: white-grey matter contrast reduced, then inverted, as myelination changes it | fraction of the way to inversion |
# | `bias` | an uncorrected bias field | TorchIO coefficient |
# | `thick_slices` | a 2D acquisition of thick slices along one axis, resampled back | slice thickness (mm) |
# | `motion` | head motion during the acquisition | TorchIO motion: degrees |
# | `noise` | a lower signal-to-noise ratio | noise SD / brain intensity SD |

# %%
eval_records = records["test"][:n_eval]
shifted = robustness.write_shifted_sessions(
    eval_records, shifts, out / "shifted", seed=seed, progress=False
)
shifted.groupby(["shift", "severity"], sort=False).size().rename("sessions").to_frame()

# %%
plots.shift_gallery(shifted)

# %% [markdown]
# ## Training the T2w and the randomised networks

# %%
trained = runs.train_runs(chapter)
trained.facts(by="model").round(3)

# %% [markdown]
# ## The three networks as model folders
#
# Each network is exported as `neonb export` writes it (`models/<name>/`: weights,
# `model.json` with its input channels, grid and norms), so that the networks compared
# here are the ones a user would run with `neonb segment`. Each folder declares the
# chapter's window `overlap` (`neonb export --overlap`), which `neonb segment` then uses, so
# the QC study below segments with the same windows as the scores. The paper's network also
# gets its QC threshold, calibrated on the validation sessions of its run (8 TTA passes
# each, at that overlap); with `qc_all` the other two do too (`neonb export --calibrate-qc`
# adds one later).

# %%
model_dirs = {"paper": chapter.baseline_dir}
model_dirs.update({run.group: run.run_dir for run in chapter if run.replicate == 0})
exported = {
    name: export.export_run(
        run_dir,
        out / "models" / name,
        data_root=cohort.root,
        images=images,
        calibrate_qc="auto" if name == "paper" or qc_all else False,
        overlap=overlap,
        backend=backend,
    )
    for name, run_dir in model_dirs.items()
}
pd.Series({name: str(folder) for name, folder in exported.items()}, name="folder").to_frame()

# %% [markdown]
# ## Dice against severity
#
# Every network segments every shifted session whole (the study's one evaluation:
# `experiment.evaluate`, windows of the training patch size, all three with the window
# overlap `overlap`), and its Dice over the eight
# tissues is recorded per session, shift and severity (`robustness.tsv`). Severity 0 is the
# clean session.

# %%
networks = {"paper": (baseline.model, baseline_config.replace(overlap=overlap))}
networks.update(
    {
        run.group: (trained.trained[run.id].model, run.config.replace(overlap=overlap))
        for run in chapter
    }
)
scores = robustness.score_shifts(
    networks, shifted, cache_dir=baseline_config.cache_dir, sw_batch_size=sw_batch_size,
    backend=backend,
)  # fmt: skip
scores.to_csv(out / "robustness.tsv", sep="\t", index=False)
table = robustness.severity_table(scores)
table.to_csv(out / "severity_table.tsv", sep="\t", index=False)
plots.dice_against_severity(table, title=f"Dice (no BG) against severity ({dataset}, {hardware})")

# %% [markdown]
# The loss from each network's clean score at the most severe level of each shift, with a
# 95 % interval over the sessions:

# %%
losses = robustness.severe_losses(scores)
losses.round(3)

# %% [markdown]
# ## The goals, checked
#
# The goals set for the randomised network (neonb's, from the issue that asked for this
# chapter): at the most severe level of every shift it loses at most 0.05 Dice from its
# clean score, while the paper's network loses more; on clean sessions it is within 0.03
# of the paper's network. Each is decided by the rule beside it.

# %%
goals = robustness.check_goals(scores, max_loss=0.05, clean_margin=0.03)
goals.to_csv(out / "goals.tsv", sep="\t")
goals

# %% [markdown]
# ## When not to trust a segmentation: the QC score
#
# `neonb segment --tta` segments each scan with flip test-time augmentation, writes the
# entropy of the averaged probabilities as an uncertainty map, and scores the scan with
# the mean uncertainty inside the predicted brain; a score above the model folder's
# threshold (calibrated at export on the run's validation sessions) flags the scan.
# Here the shifted sessions go through `neonb segment --batch --tta --backend` (the
# chapter's `backend`) with the paper's network, as a user would run it, with their reference labels, so each segmentation's
# Dice is known: the clean sessions and the levels `qc_levels` of every shift (`severe`:
# the most severe one; `all`: every level). A useful QC score is high where the Dice is low. The ROC AUC says how well it
# separates the segmentations below `qc_dice` Dice from the rest (0.5: no better than
# chance, 1: perfectly).

# %%
qc_sessions = robustness.select_levels(shifted, qc_levels, out / "qc_sessions.tsv")
qc = robustness.qc_study(exported["paper"], qc_sessions, out / "qc", backend=backend)
qc.to_csv(out / "qc.tsv", sep="\t", index=False)
separation = pd.DataFrame([robustness.qc_separation(qc, dice_threshold=qc_dice)])
separation.to_csv(out / "qc_separation.tsv", sep="\t", index=False)
separation.round(3)

# %%
threshold = export.load_exported_model(exported["paper"]).metadata.get("qc", {}).get("threshold")
plots.qc_against_dice(
    qc, dice_threshold=qc_dice, threshold=threshold, title=f"QC score against Dice ({dataset})"
)

# %% [markdown]
# ---
#
# ## Summary

# %%
print(
    robustness.summary_text(
        losses, goals, separation.iloc[0], qc_dice=qc_dice, dataset=dataset, hardware=hardware
    )
)

# %% [markdown]
# ## What's next?
#
# The [closing chapter](05_paper_vs_neonb) sets these findings beside the paper's. To
# segment your own scans with one of the networks compared here, point `neonb segment` at
# its folder under `06_robustness/models/`.
