"""Tests of neonb.budgeting: slice selection, masks, and the masked loss they feed."""

from __future__ import annotations

import dataclasses
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neonb import budgeting as B
from neonb import experiment
from neonb.errors import ConfigError, DataError
from neonb.experiment import TrainingConfig
from neonb.losses import SegmentationLoss
from neonb.models import ModelConfig, build_model
from neonb.transforms import AugmentationConfig, train_transforms

SHAPE = (20, 24, 22)
BOX = (slice(2, 18), slice(3, 23), slice(1, 21))
"""Non-zero box of the synthetic label: extents 16 (sagittal), 20 (coronal), 20 (axial)."""
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
TINY = ModelConfig(filters=(4, 8, 16), strides=(1, 2, 2), deep_supr_num=1)
STRONG = dataclasses.replace(
    AugmentationConfig.always(), elastic_sigma=(3.0, 4.0), elastic_magnitude=(50.0, 100.0)
)
SPATIAL_ONLY = {
    "crop": AugmentationConfig.none(),
    "flip": dataclasses.replace(AugmentationConfig.none(), flip_prob=1.0),
    "elastic": dataclasses.replace(
        AugmentationConfig.none(),
        elastic_prob=1.0,
        elastic_sigma=(3.0, 4.0),
        elastic_magnitude=(50.0, 100.0),
    ),
    "all": STRONG,
}
"""Each spatial augmentation alone (after the random crop), then every augmentation."""


def _label(seed=0):
    label = np.zeros(SHAPE, np.float32)
    i, j, k = np.indices(tuple(s.stop - s.start for s in BOX))
    label[BOX] = (i // 2 + j // 3 + k // 2) % 9 + 1
    label[BOX][0] = 4  # inner background on the edge still counts as foreground
    return label


def _write(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for n in range(3):
        label = _label()
        t2w = np.where(label > 0, rng.uniform(100, 200, SHAPE), 0).astype(np.float32)
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        out.append(
            {
                "t1w": _write(folder / "t1w.nii.gz", t2w * 0.5),
                "t2w": _write(folder / "t2w.nii.gz", t2w),
                "label": _write(folder / "label.nii.gz", label),
                "scan_age": 38.0 + n,
                "participant_id": f"P{n}",
                "session_id": "1",
            }
        )
    return out


def _extents_row(lengths=(50, 60, 40), starts=(3, 4, 5)):
    row = {"participant_id": "P0", "session_id": "1", "orientation": "RAS"}
    for plane, start, length in zip(B.PLANES, starts, lengths, strict=True):
        row |= {f"{plane}_start": start, f"{plane}_stop": start + length}
    return pd.Series(row)


def _sessions(assigned, records):
    ids = {r["participant_id"]: r["session_id"] for r in records}
    return pd.DataFrame(
        [(c, p, ids[p]) for c, ps in assigned.items() for p in ps],
        columns=["condition", "participant_id", "session_id"],
    )


# --- orientation -------------------------------------------------------------------------


def test_planes_of_a_ras_image():
    assert [B.plane_axis(AFFINE, p) for p in B.PLANES] == [0, 1, 2]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [(("L", "P", "S"), [0, 1, 2]), (("A", "S", "R"), [2, 0, 1]), (("I", "L", "A"), [1, 2, 0])],
)
def test_planes_follow_the_affine(codes, expected):
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        affine[int(world_axis), voxel_axis] = 2.0 * flip
    assert nib.aff2axcodes(affine) == codes
    assert [B.plane_axis(affine, p) for p in B.PLANES] == expected


def test_a_sagittal_mask_is_constant_in_the_first_voxel_axis(records):
    extents = B.session_extents(records[:1])
    condition = B.Condition("sagittal", 1, "sagittal", fraction=1 / 3)
    slices = B.slice_table([condition], _sessions({"sagittal": ["P0"]}, records), extents)
    mask = B.annotation_mask(SHAPE, slices)
    per_slice = mask.reshape(SHAPE[0], -1)
    assert np.all(per_slice.min(1) == per_slice.max(1))  # each sagittal plane all 0 or all 1
    assert sorted(np.flatnonzero(per_slice[:, 0])) == sorted(slices["slice"])
    assert set(slices["axis"]) == {0}


def test_unknown_plane_raises():
    with pytest.raises(ConfigError, match="plane must be one of"):
        B.plane_axis(AFFINE, "oblique")


# --- extents, counts, margins -----------------------------------------------------------


def test_extent_counts_inner_background_as_foreground(records):
    extents = B.session_extents(records[:1]).iloc[0]
    assert (extents["sagittal_start"], extents["sagittal_stop"]) == (2, 18)
    assert (extents["coronal_start"], extents["coronal_stop"]) == (3, 23)
    assert (extents["axial_start"], extents["axial_stop"]) == (1, 21)
    label = np.zeros(SHAPE)
    label[5, 6, 7] = 4
    assert B.foreground_extent(label) == ((5, 6), (6, 7), (7, 8))


def test_empty_volume_has_no_extent():
    with pytest.raises(ConfigError, match="no non-zero voxel"):
        B.foreground_extent(np.zeros(SHAPE))


@pytest.mark.parametrize("placement", B.PLACEMENTS)
@pytest.mark.parametrize("plane", B.PLANES)
@pytest.mark.parametrize("fraction", [1 / 3, 0.1])
def test_slice_counts_and_margins(plane, placement, fraction):
    row = _extents_row()
    condition = B.Condition("c", 1, plane, fraction=fraction, placement=placement)
    chosen = B.select_slices(row, condition, np.random.default_rng(0))
    start, stop = row[f"{plane}_start"], row[f"{plane}_stop"]
    length = stop - start
    assert len(chosen) == round(fraction * length)
    indices = np.array([index for p, index in chosen])
    assert {p for p, _ in chosen} == {plane}
    assert len(set(indices)) == len(indices)
    assert np.all(indices - start >= 0.1 * length)
    assert np.all(stop - 1 - indices >= 0.1 * length)


def test_the_largest_fraction_fills_exactly_the_inner_80_percent():
    row = _extents_row(lengths=(50, 60, 40))
    condition = B.Condition("c", 1, "sagittal", fraction=0.8)
    indices = [i for _, i in B.select_slices(row, condition, np.random.default_rng(0))]
    assert indices == list(range(3 + 5, 3 + 50 - 5))


def test_random_plane_draws_a_plane_per_slice():
    row = _extents_row(lengths=(50, 60, 40))
    condition = B.Condition("c", 1, "random", fraction=1 / 3, placement="random")
    chosen = B.select_slices(row, condition, np.random.default_rng(0))
    assert len(chosen) == round(np.mean([50, 60, 40]) / 3)
    assert {p for p, _ in chosen} == set(B.PLANES)
    for plane in B.PLANES:
        start, stop = row[f"{plane}_start"], row[f"{plane}_stop"]
        indices = [i for p, i in chosen if p == plane]
        assert min(indices) >= start + math.ceil(0.1 * (stop - start))
        assert max(indices) < stop - math.ceil(0.1 * (stop - start))


def test_equidistant_placement():
    candidates = np.arange(10, 40)
    assert B.place_slices(candidates, 1, "equidistant", None).tolist() == [25]
    picked = B.place_slices(candidates, 10, "equidistant", None)
    assert set(np.diff(picked)) == {3}
    assert picked[0] - 10 == 1 and 39 - picked[-1] == 1


def test_one_slice_per_subject_is_the_middle_eligible_slice():
    row = _extents_row(lengths=(50, 60, 41), starts=(0, 0, 0))
    condition = B.Condition("one", 1, "axial", slices_per_subject=1)
    assert B.select_slices(row, condition, np.random.default_rng(0)) == [("axial", 20)]


def test_too_many_slices_raise():
    with pytest.raises(ConfigError, match="cannot place 5 slices among 3"):
        B.place_slices(np.arange(3), 5, "random", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="leaves no slice"):
        B.eligible_slices(0, 2, margin=0.49)


# --- reproducibility and TSV ------------------------------------------------------------


def test_selection_is_seeded_per_session(records):
    extents = B.session_extents(records)
    condition = B.Condition("axial", 3, "axial", fraction=0.25, placement="random")
    everyone = _sessions({"axial": ["P0", "P1", "P2"]}, records)
    first = B.slice_table([condition], everyone, extents, seed=1)
    again = B.slice_table([condition], everyone, extents, seed=1)
    pd.testing.assert_frame_equal(first, again)
    alone = B.slice_table([condition], everyone.iloc[[2]], extents, seed=1)
    mine = first[first["participant_id"] == "P2"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, mine)
    other = B.slice_table([condition], everyone, extents, seed=2)
    assert not first["slice"].equals(other["slice"])


def test_slices_tsv_round_trip(records, tmp_path):
    extents = B.session_extents(records)
    design = [B.Condition("random", 3, "random", fraction=1 / 3, placement="random")]
    slices = B.slice_table(design, _sessions({"random": ["P0", "P1", "P2"]}, records), extents)
    path = B.write_slices(slices, tmp_path / "slices.tsv")
    pd.testing.assert_frame_equal(B.read_slices(path), slices)
    with pytest.raises(DataError, match="no such slices file"):
        B.read_slices(tmp_path / "missing.tsv")


# --- masks on disk ----------------------------------------------------------------------


def test_masks_are_uint8_nifti_with_the_label_affine(records, tmp_path):
    extents = B.session_extents(records)
    condition = B.Condition("coronal", 2, "coronal", fraction=0.2)
    slices = B.slice_table([condition], _sessions({"coronal": ["P0", "P1"]}, records), extents)
    masks = B.write_masks(slices, records, tmp_path / "masks")
    assert list(masks["participant_id"]) == ["P0", "P1"]
    path = masks.loc[0, "mask"]
    assert path.endswith("sub-P0_ses-1_desc-coronal_mask.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(image.affine, AFFINE)
    mask = np.asarray(image.dataobj)
    assert mask.sum() == masks.loc[0, "n_slices"] * SHAPE[0] * SHAPE[2]
    assert masks.loc[0, "n_slices"] == round(0.2 * 20)
    assert masks.loc[0, "annotated_fraction"] == pytest.approx(4 / 20)


def test_records_get_their_mask_or_none(records, tmp_path):
    extents = B.session_extents(records)
    condition = B.Condition("axial", 2, "axial", fraction=0.2)
    slices = B.slice_table([condition], _sessions({"axial": ["P1", "P2"]}, records), extents)
    masks = B.write_masks(slices, records, tmp_path)
    chosen = B.condition_records(records, ["P2", "P1"], masks, "axial")
    assert [r["participant_id"] for r in chosen] == ["P1", "P2"]
    assert chosen[0]["annotation"].endswith("sub-P1_ses-1_desc-axial_mask.nii.gz")
    assert "annotation" not in records[1]
    full = B.condition_records(records, ["P0"])
    assert "annotation" not in full[0]
    with pytest.raises(DataError, match="no mask for condition"):
        B.condition_records(records, ["P0"], masks, "axial")


# --- masks through augmentation ---------------------------------------------------------


@pytest.mark.parametrize("augmentation", list(SPATIAL_ONLY))
@pytest.mark.parametrize("plane", B.AXIS_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_label_equal_to_the_mask_stays_equal_after_augmentation(
    records, tmp_path, plane, augmentation, seed
):
    """The label is the mask pattern itself; any misalignment would show as a difference."""
    extents = B.session_extents(records[:1])
    condition = B.Condition("c", 1, plane, fraction=0.25, placement="random")
    slices = B.slice_table([condition], _sessions({"c": ["P0"]}, records), extents, seed=seed)
    masks = B.write_masks(slices, records, tmp_path / "masks")
    (record,) = B.condition_records(records[:1], ["P0"], masks, "c")
    mask = np.asarray(nib.load(record["annotation"]).dataobj).astype(np.float32)
    record["label"] = _write(tmp_path / "mask_as_label.nii.gz", mask)
    tf = train_transforms((12, 12, 12), SPATIAL_ONLY[augmentation], model=TINY)
    out = tf.set_random_state(seed=seed)(record)
    label, annotation = out["label"].as_tensor(), out["annotation"].as_tensor()
    assert torch.equal(label, annotation)
    if augmentation == "crop":
        assert 0 < annotation.sum() < annotation.numel()


# --- the loss ignores unannotated voxels at every head ----------------------------------


def _network_batch(seed=0):
    torch.manual_seed(seed)
    net = build_model(TINY).train()
    x = torch.randn(2, 2, 8, 8, 8)
    label = torch.randint(0, 10, (2, 1, 8, 8, 8)).float()
    mask = torch.zeros_like(label)
    mask[..., ::4] = 1  # every fourth axial slice annotated
    return net, x, label, mask


def test_masked_voxels_get_zero_gradient_at_every_deep_supervision_head():
    net, x, label, mask = _network_batch()
    outputs = net(x)  # (B, heads, C, X, Y, Z)
    outputs.retain_grad()
    SegmentationLoss()(outputs, {"label": label, "annotation": mask}).backward()
    assert outputs.shape[1] == 2
    for head in range(outputs.shape[1]):
        grad = outputs.grad[:, head]
        outside = (mask == 0).expand_as(grad)
        assert torch.count_nonzero(grad[outside]) == 0
        assert torch.count_nonzero(grad[~outside]) > 0


def test_labels_of_masked_voxels_do_not_change_the_weight_gradients():
    net, x, label, mask = _network_batch()
    scrambled = torch.where(mask > 0, label, torch.randint(0, 10, label.shape).float())
    assert not torch.equal(scrambled, label)
    grads = []
    for target in (label, scrambled):
        net.zero_grad()
        SegmentationLoss()(net(x), {"label": target, "annotation": mask}).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# --- design -----------------------------------------------------------------------------


def _pool(n=41, length=80):
    ages = pd.Series(np.linspace(30, 44, n), index=[f"P{k:02d}" for k in range(n)])
    extents = pd.DataFrame(
        [
            {"participant_id": p, "session_id": "1", "orientation": "RAS"}
            | {f"{plane}_start": 2 for plane in B.PLANES}
            | {f"{plane}_stop": 2 + length + k % 3 for plane in B.PLANES}
            for k, p in enumerate(ages.index)
        ]
    )
    return ages, extents


def test_plan_of_the_paper_and_the_shared_sweep():
    ages, extents = _pool()
    train = list(ages.index[::2])
    plan = B.plan_budget(ages, train, extents, n_full=4, seed=0)
    table = {
        c.name: (c.plane, c.n_subjects, c.fraction, c.slices_per_subject) for c in plan.conditions
    }
    assert table == {
        "full": ("full", 4, None, None),
        "random": ("random", 12, 1 / 3, None),
        "sagittal": ("sagittal", 12, 1 / 3, None),
        "coronal": ("coronal", 12, 1 / 3, None),
        "axial": ("axial", 12, 1 / 3, None),
        "axial10": ("axial", 40, 0.1, None),
        "axial1slice": ("axial", 41, None, 1),
    }
    assert plan.table3 == ["full", "random", "sagittal", "coronal", "axial"]
    assert plan.sweep == ["full", "axial", "axial10", "axial1slice"]
    assert set(plan.participants["full"]) <= set(train)
    assert {c: len(p) for c, p in plan.participants.items()} == {
        c: n for c, (_, n, _, _) in table.items()
    }
    records = [{"participant_id": p, "session_id": "1"} for p in ages.index]
    sessions = plan.sessions(records)
    assert len(sessions) == sum(len(p) for p in plan.participants.values())
    assert set(sessions.loc[sessions["condition"] == "full", "participant_id"]) == set(
        plan.participants["full"]
    )
    (note,) = plan.notes
    assert "axial1slice" in note and "pool has 41" in note
    budget = B.budget_slices(extents, plan.participants["full"], "axial")
    assert budget > 41  # one slice per subject would need more participants than the pool


def test_plan_with_a_separate_sweep_budget():
    ages, extents = _pool(60, length=20)
    plan = B.plan_budget(ages, ages.index[:30], extents, n_full=6, sweep_n_full=1, seed=3)
    sweep = {c.name: c.n_subjects for c in plan.conditions if c.name in plan.sweep}
    one = B.budget_slices(extents, plan.participants["sweepfull"], "axial")
    assert sweep == {"sweepfull": 1, "sweepaxial": 3, "sweepaxial10": 10, "sweepaxial1slice": one}
    assert plan.notes == []
    assert set(plan.participants["sweepfull"]) <= set(plan.participants["full"])
    with pytest.raises(ConfigError, match="training split has 30"):
        B.plan_budget(ages, ages.index[:30], extents, n_full=31)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "axial-33"}, "alphanumeric"),
        ({"plane": "oblique"}, "plane must be one of"),
        ({"fraction": 0.9}, "fraction must be in"),
        ({"slices_per_subject": 1}, "exactly one of"),
        ({"fraction": None}, "exactly one of"),
        ({"placement": "clustered"}, "placement must be one of"),
        ({"n_subjects": 0}, "at least 1"),
        ({"margin": 0.5}, "margin must be in"),
    ],
)
def test_bad_conditions_raise(kwargs, match):
    values = {"name": "axial", "n_subjects": 3, "plane": "axial", "fraction": 0.3} | kwargs
    with pytest.raises(ConfigError, match=match):
        B.Condition(**values)


def test_full_condition_takes_no_fraction():
    with pytest.raises(ConfigError, match="takes no fraction"):
        B.Condition("full", 2, fraction=0.5)


def test_assign_subjects_nests_the_full_subjects_and_shares_equal_sizes():
    ages = pd.Series(np.linspace(30, 44, 20), index=[f"P{n:02d}" for n in range(20)])
    design = B.budget_design(2, planes=("sagittal", "axial")) + B.sweep_design(
        2, dispersions=(3, 5)
    )
    assigned = B.assign_subjects(design, ages, ["P03", "P15"], seed=0)
    assert assigned["full"] == ["P03", "P15"]
    assert len(assigned["axial"]) == 6 and len(assigned["axial20"]) == 10
    assert assigned["sagittal"] == assigned["axial"]
    for ids in assigned.values():
        assert {"P03", "P15"} <= set(ids)
    with pytest.raises(ConfigError, match="pool has 20"):
        B.assign_subjects(B.budget_design(7), ages, ["P03"], seed=0)


def test_equal_steps_schedule():
    config = TrainingConfig(patch_size=(16, 16, 16), model=TINY, epochs=3, batch_size=2)
    assert B.condition_config(config, 12) is config
    steps = {
        n: experiment.optimizer_steps(
            n, B.condition_config(config, n, schedule="steps", samples_per_epoch=48)
        )
        for n in (4, 12, 40)
    }
    assert steps == {4: 72, 12: 72, 40: 60}
    assert experiment.optimizer_steps(12, config) == 3 * 6
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        B.condition_config(config, 4, schedule="steps")


def test_summary_counts_slices_and_voxels(records, tmp_path):
    extents = B.session_extents(records)
    design = [B.Condition("full", 1), B.Condition("axial", 3, "axial", fraction=0.25)]
    assigned = {"full": ["P0"], "axial": ["P0", "P1", "P2"]}
    slices = B.slice_table(design, _sessions(assigned, records), extents)
    masks = B.write_masks(slices, records, tmp_path)
    summary = B.condition_summary(design, assigned, extents, masks).set_index("condition")
    assert summary.loc["full", "annotated_slices"] == 20
    assert summary.loc["axial", "annotated_slices"] == 3 * 5
    assert summary.loc["axial", "n_sessions"] == 3
    assert summary.loc["full", "slices_per_session"] == 20
    assert summary.loc["axial", "annotated_voxel_fraction"] == pytest.approx(0.25)


def test_evaluate_dice_only_rows(records):
    config = TrainingConfig(patch_size=(8, 8, 8), model=TINY, device="cpu", overlap=0.0)
    torch.manual_seed(0)
    rows = experiment.evaluate(
        build_model(TINY).eval(), experiment.prepare_volumes(records[:2]), config
    ).per_class
    assert len(rows) == 2 * 10
    assert set(rows["participant_id"]) == {"P0", "P1"}
    assert rows["is_background"].sum() == 2 * 2
    valid = rows["dice"].dropna()
    assert ((valid >= 0) & (valid <= 1)).all()


# --- report and figures -----------------------------------------------------------------


def _class_dice(conditions=("full", "axial", "axial10")):
    rows = [
        {
            "condition": c,
            "run": 0,
            "set": s,
            "label": k,
            "short_name": str(k),
            "is_background": k in (0, 4),
            "dice": 0.5 + k / 100 + (s == "test") / 10,
        }
        for c in conditions
        for s in ("validation", "test")
        for k in range(10)
    ]
    return pd.DataFrame(rows)


def test_table3_puts_the_paper_beside_neonb():
    from neonb import report

    table = report.table3(_class_dice(), label="neonb")
    assert list(table.index.get_level_values("condition").unique()) == [
        "random",
        "sagittal",
        "coronal",
        "axial",
        "full",
    ]
    assert table.loc[("axial", "neonb"), ("test", "Mean DSC (no BG)")] == "0.651"
    assert table.loc[("full", "paper"), ("test", "Mean DSC (no BG)")] == "0.849"
    assert table.loc[("random", "neonb"), ("validation", "Mean DSC")] == ""


def test_condition_results_and_sweep_figure():
    from neonb import plots

    summary = pd.DataFrame(
        {
            "condition": ["full", "axial", "axial10"],
            "n_subjects": [1, 3, 10],
            "n_sessions": [1, 3, 10],
            "annotated_slices": [30, 30, 30],
            "slices_per_session": [30.0, 10.0, 3.0],
        }
    )
    runs = pd.DataFrame({"condition": ["full", "axial", "axial10"], "steps": [10, 10, 10]})
    results = B.condition_results(summary, _class_dice(), runs)
    assert results.loc[1, "test_dice_nobg"] == pytest.approx(
        0.6 + np.mean([1, 2, 3, 5, 6, 7, 8, 9]) / 100
    )
    assert results.loc[1, "val_dice"] == pytest.approx(0.545)
    fig = plots.dispersion_sweep(results)
    assert [trace.name for trace in fig.data] == ["validation (patches)", "test (whole volumes)"]
    assert list(fig.data[1].y) == list(results["test_dice_nobg"])


def test_the_full_condition_under_each_schedule_is_named():
    assert B.other_schedule_condition("steps") == "fullepochs"
    assert B.other_schedule_condition("epochs") == "fullsteps"
    assert B.full_conditions("steps", both_schedules=False) == {"steps": "full"}
    assert B.full_conditions("epochs", both_schedules=True) == {
        "epochs": "full",
        "steps": "fullsteps",
    }
    with pytest.raises(ConfigError, match="schedule"):
        B.other_schedule_condition("minutes")


def test_budgeting_claims_follow_the_schedules_trained():
    dispersed = ["random", "sagittal", "axial"]
    paper_only = B.paper_claims(dispersed, {"epochs": "full"})
    assert [c.b for c in paper_only] == ["full"] * 3 + ["sagittal"] * 2
    assert all(c.source == "paper" for c in paper_only)
    both = B.paper_claims(dispersed, {"steps": "full", "epochs": "fullepochs"})
    at_epochs = [c for c in both if "equal epochs" in c.text]
    at_steps = [c for c in both if "equal steps" in c.text]
    assert {c.b for c in at_epochs} == {"fullepochs"} and {c.b for c in at_steps} == {"full"}
    assert {c.source for c in at_steps} == {"neonb"}


def test_budgeting_findings_on_constructed_results():
    # dispersed conditions 0.05 above full volumes, sagittal in between, same subjects
    rng = np.random.default_rng(0)
    subject = rng.normal(0, 0.03, 10)
    means = {"full": 0.80, "random": 0.86, "sagittal": 0.84, "axial": 0.86}
    rows = [
        (name, run, f"s{i}", mean + subject[i] + rng.normal(0, 0.003))
        for name, mean in means.items()
        for run in range(2)
        for i in range(10)
    ]
    cases = pd.DataFrame(rows, columns=["condition", "run", "participant_id", "dice_mean_nobg"])
    findings = B.paper_findings(cases, ["random", "sagittal", "axial"], {"epochs": "full"})
    assert (findings["verdict"] == "holds").all(), findings
    assert "Table 3" in findings.loc["sagittal beats full volumes at equal epochs", "paper (dHCP)"]
    assert (findings["p_corrected"] == np.minimum(1, 5 * findings["p"])).all()


def test_evaluation_subset_is_age_representative_and_fixed(records):
    one = B.evaluation_subset(records, 2, seed=0)
    assert len(one) == 2 and one == B.evaluation_subset(records, 2, seed=0)
    assert len(B.evaluation_subset(records, 0, seed=0)) == 3
    assert len(B.evaluation_subset(records, 10, seed=0)) == 3


def test_extent_lengths_count_the_slices_in_the_head():
    extents = pd.DataFrame([_extents_row(lengths=(50, 60, 40))])
    lengths = B.extent_lengths(extents)
    assert lengths.iloc[0].to_dict() == {"sagittal": 50, "coronal": 60, "axial": 40}


def test_a_mask_follows_augmentation_and_hides_voxels_from_the_loss(records, tmp_path):
    extents = B.session_extents(records)
    condition = B.Condition("coronal", 1, "coronal", fraction=0.3)
    slices = B.slice_table([condition], _sessions({"coronal": ["P0"]}, records), extents)
    masks = B.write_masks(slices, records, tmp_path / "masks")
    config = TrainingConfig(patch_size=(16, 16, 16), model=TINY)
    identical = B.mask_follows_augmentation(records[0], masks.loc[0, "mask"], config, draws=3)
    assert identical == [True, True, True]
    record = B.condition_records(records, ["P0"], masks, "coronal")[0]
    probe = B.gradient_probe(record, config, seed=0)
    assert list(probe["head"]) == ["final", "-1"]
    assert 0 < probe["unannotated voxels"].iloc[0] < 1
    assert (probe["gradient on unannotated logits"] == 0).all()
    assert (probe["logits with gradient, annotated"] > 0.9).all()


def test_the_other_schedule_changes_only_the_full_condition():
    dispersed = TrainingConfig(patch_size=(16, 16, 16), model=TINY, samples_per_volume=3)
    # the demo's schedule is steps: the full volumes at equal epochs take the same patches
    # per volume as the dispersed conditions
    assert B.other_schedule_config("steps", dispersed, 12, 4) == dispersed
    # the paper's schedule is epochs: at equal steps the full volumes take three times more
    at_steps = B.other_schedule_config("epochs", dispersed, 12, 4)
    assert at_steps.samples_per_volume == 9
    assert at_steps.replace(samples_per_volume=3) == dispersed
    with pytest.raises(ConfigError, match="schedule"):
        B.other_schedule_config("minutes", dispersed, 12, 4)
