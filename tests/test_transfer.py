"""Freezing by DynUNet block, the fine-tuning strategies and their tables."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from neonb import data, experiment, plots, report, transfer
from neonb.errors import ConfigError
from neonb.experiment import TrainingConfig, build_optimizer, segmentation_loss
from neonb.metrics import case_summary
from neonb.models import ModelConfig, build_model
from neonb.phantom import write_cohort
from neonb.statistics import CONTRADICTED, HOLDS

FIVE_LEVELS = {"strides": [1, 2, 2, 2, 2], "filters": [2, 4, 4, 8, 8], "deep_supr_num": 2}
DEMO_DEPTHS = {"shallow": 1, "medium": 2, "deep": 3}


@pytest.fixture
def small():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(FIVE_LEVELS))


def _blocks(model):
    return {block.name: block for block in transfer.dynunet_blocks(model)}


def test_levels_count_resolution_steps_from_the_bottleneck(small):
    """A block's level is how many halvings its output is above the bottleneck's."""
    sizes = {}
    hooks = [
        block.module.register_forward_hook(
            lambda _m, _i, out, name=block.name: sizes.__setitem__(name, out.shape[-1])
        )
        for block in transfer.dynunet_blocks(small)
    ]
    small.train()(torch.zeros(1, 2, 32, 32, 32))
    for hook in hooks:
        hook.remove()
    blocks = _blocks(small)
    assert set(sizes) == set(blocks)  # every block ran, the heads included
    for name, block in blocks.items():
        assert block.level == transfer.outermost_level(small) - math.log2(32 // sizes[name]), name
    assert blocks["bottleneck"].level == 0
    assert blocks["downsamples.2"].level == blocks["upsamples.0"].level == 1


def test_every_parameter_is_in_exactly_one_block(small):
    seen = [id(p) for block in transfer.dynunet_blocks(small) for p in block.module.parameters()]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in small.parameters()}


def test_paper_strategies_train_the_blocks_the_paper_names():
    model = build_model(ModelConfig())  # the paper's six-stride network
    shallow = ["downsamples.3", "bottleneck", "upsamples.0"]
    medium = ["downsamples.2", *shallow, "upsamples.1"]
    assert transfer.trained_blocks(model, "none") == []
    assert transfer.trained_blocks(model, "shallow") == shallow
    assert sorted(transfer.trained_blocks(model, "medium")) == sorted(medium)
    frozen_by_deep = {
        name for name in _blocks(model) if name not in transfer.trained_blocks(model, "deep")
    }
    assert frozen_by_deep == {"input_block", "upsamples.4", "output_block"}
    assert transfer.trained_blocks(model, "full") == list(_blocks(model))
    assert transfer.trained_blocks(model, "scratch") == list(_blocks(model))


@pytest.mark.parametrize("strategy", transfer.STRATEGIES)
def test_apply_strategy_sets_requires_grad_by_block(small, strategy):
    names = set(transfer.apply_strategy(small, strategy, DEMO_DEPTHS))
    for name, block in _blocks(small).items():
        flags = {p.requires_grad for p in block.module.parameters()}
        assert flags == {name in names}, name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("strategy", transfer.FINE_TUNED)
def test_frozen_parameters_stay_and_trainable_ones_move(small, strategy, optimizer):
    config = TrainingConfig.from_dict(
        {"patch_size": [16, 16, 32], "optimizer": optimizer, "model": FIVE_LEVELS}
    )
    names = set(transfer.apply_strategy(small, strategy, DEMO_DEPTHS))
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    trainable = [p for p in small.parameters() if p.requires_grad]
    step = build_optimizer(trainable, config)
    loss_fn = segmentation_loss(config)
    generator = torch.Generator().manual_seed(0)
    batch = {"label": torch.randint(0, 10, (2, 1, 16, 16, 32), generator=generator)}
    small.train()
    for _ in range(2):
        step.zero_grad()
        loss_fn(small(torch.randn(2, 2, 16, 16, 32, generator=generator)), batch).backward()
        step.step()
    for name, block in _blocks(small).items():
        moved = [
            not torch.equal(before[n], p)
            for n, p in small.named_parameters()
            if any(p is q for q in block.module.parameters())
        ]
        if name in names:
            assert any(moved), f"{name} should train under {strategy}"
        else:
            assert not any(moved), f"{name} should stay frozen under {strategy}"


def test_strategy_table_counts_parameters(small):
    table = transfer.strategy_table(small, DEMO_DEPTHS)
    assert list(table.index) == list(transfer.STRATEGIES)
    sizes = {name: block.parameters for name, block in _blocks(small).items()}
    total = sum(p.numel() for p in small.parameters())
    assert table.loc["none", "trained parameters"] == 0
    assert table.loc["full", "trained parameters"] == total
    shallow = sizes["downsamples.2"] + sizes["bottleneck"] + sizes["upsamples.0"]
    assert table.loc["shallow", "trained parameters"] == shallow
    assert table.loc["deep", "levels"] == "0–3"
    counts = table["trained parameters"].tolist()
    assert counts[:5] == sorted(counts[:5])
    blocks = transfer.block_table(small, DEMO_DEPTHS)
    assert blocks["parameters"].sum() == total
    assert blocks.loc[blocks["block"] == "output_block", "deep"].item() == ""
    assert blocks.loc[blocks["block"] == "output_block", "full"].item() == "train"


def test_bad_strategies_depths_and_blocks_are_refused(small):
    with pytest.raises(ConfigError, match="strategy must be one of"):
        transfer.trained_blocks(small, "shallowest")
    with pytest.raises(ConfigError, match="no block"):
        transfer.freeze_blocks(small, ["bottleneck", "middle_block"])
    with pytest.raises(ConfigError, match="grow"):
        transfer.check_depths({"shallow": 2, "medium": 2})
    with pytest.raises(ConfigError, match=">= 1"):
        transfer.check_depths({"shallow": 0})
    with pytest.raises(ConfigError, match="partial strategies"):
        transfer.check_depths({"full": 5})
    with pytest.raises(ConfigError, match="DynUNet"):
        transfer.dynunet_blocks(torch.nn.Conv3d(2, 2, 3))
    with pytest.warns(RuntimeWarning, match="as under 'full'"):
        transfer.check_depths(transfer.PAPER_DEPTHS, small)  # deep = 4 = outermost here
    with pytest.raises(ConfigError, match="fine_tune"):
        transfer.fine_tune(small, "scratch", [], [], TrainingConfig(), "unused")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_cohort(
        tmp_path_factory.mktemp("cohort"), n=3, seed=2, voxel_size=6.0, progress=False
    )
    return data.to_data_dicts(data.read_manifest(root, progress=False))


def test_fine_tune_trains_a_copy_and_scores_it(records, tmp_path):
    tiny = {"strides": [1, 2, 2, 2], "filters": [2, 4, 4, 8], "deep_supr_num": 1}
    config = TrainingConfig.from_dict(
        {"patch_size": [16, 16, 16], "epochs": 1, "optimizer": "sgd", "model": tiny}
    )
    torch.manual_seed(0)
    source = build_model(config.model)
    original = {n: p.detach().clone() for n, p in source.named_parameters()}
    run = transfer.fine_tune(
        source, "shallow", records[:2], records[2:], config, tmp_path / "shallow"
    )
    assert all(torch.equal(original[n], p) for n, p in source.named_parameters())
    tuned = dict(run.model.named_parameters())
    trained = transfer.trained_blocks(source, "shallow")
    for block in transfer.dynunet_blocks(run.model):
        names = [n for n in tuned if n.startswith(block.name + ".")]
        same = all(torch.equal(original[n], tuned[n]) for n in names)
        assert same == (block.name not in trained), block.name
    again = transfer.fine_tune(
        source, "shallow", records[:2], records[2:], config, tmp_path / "shallow"
    )
    pd.testing.assert_frame_equal(again.log, run.log)  # reloaded, not trained again

    volumes = experiment.prepare_volumes(records[2:])
    scores = experiment.evaluate(run.model, volumes, config).per_class.assign(strategy="shallow")
    assert len(scores) == 10 and scores["dice"].dropna().between(0, 1).all()
    subjects = case_summary(scores, by=("strategy", "participant_id", "session_id", "scan_age"))
    assert len(subjects) == 1
    tissue = scores.loc[~scores["is_background"], "dice"]
    assert subjects["dice_mean_nobg"].item() == pytest.approx(tissue.mean())


def test_frozen_batch_norm_blocks_do_not_change_in_training():
    tiny = {"strides": [1, 2, 2, 2], "filters": [2, 4, 4, 8], "deep_supr_num": 1}
    model = build_model(ModelConfig.from_dict({**tiny, "norm": "batch"}))
    trained = transfer.apply_strategy(model, "shallow")
    model = copy.deepcopy(model)  # as fine_tune does: the copy stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    for _ in range(3):
        model.train()  # what neonb.engine.fit does every epoch
        outputs = model(torch.randn(2, 2, 16, 16, 16))
        optimizer.zero_grad()
        outputs.square().mean().backward()
        optimizer.step()
    after = model.state_dict()
    assert any(k.endswith("running_mean") for k in after)
    for block in transfer.dynunet_blocks(model):
        keys = [k for k in after if k.startswith(block.name + ".")]
        assert keys, block.name
        frozen = block.name not in trained
        assert transfer.is_kept_in_eval(block.module) == frozen
        assert all(m.training != frozen for m in block.module.modules()), block.name
        for key in keys:  # parameters and buffers (running_mean/var, num_batches_tracked)
            same = torch.equal(before[key], after[key])
            if frozen:
                assert same, key
            elif key.endswith(("running_mean", "num_batches_tracked")):
                assert not same, key
    transfer.freeze_blocks(model, [b.name for b in transfer.dynunet_blocks(model)])
    model.train()
    assert all(m.training for m in model.modules())  # unfrozen blocks train again


def test_fine_tuning_leaves_frozen_batch_norm_blocks_exactly_as_they_were(records, tmp_path):
    tiny = {"strides": [1, 2, 2, 2], "filters": [2, 4, 4, 8], "deep_supr_num": 1, "norm": "batch"}
    config = TrainingConfig.from_dict(
        {"patch_size": [16, 16, 16], "epochs": 1, "optimizer": "sgd", "model": tiny}
    )
    torch.manual_seed(0)
    source = build_model(config.model)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    run = transfer.fine_tune(source, "medium", records[:2], records[2:], config, tmp_path / "m")
    after = run.model.state_dict()
    trained = transfer.trained_blocks(source, "medium")
    for block in transfer.dynunet_blocks(source):
        keys = [k for k in after if k.startswith(block.name + ".")]
        stats = [k for k in keys if k.endswith("running_mean")]
        if block.name in trained:
            assert all(not torch.equal(before[k], after[k]) for k in stats), block.name
        else:
            assert all(torch.equal(before[k], after[k]) for k in keys), block.name


def _cases(means, spread=0.01, n=6):
    """Per-subject scores whose group means and standard deviations are exactly as given."""
    z = np.linspace(-1, 1, n)
    z /= z.std(ddof=1)
    rows = []
    for strategy, mean in means.items():
        sd = spread(strategy) if callable(spread) else spread
        for i, dice in enumerate(mean + sd * z):
            rows.append(
                {
                    "strategy": strategy,
                    "participant_id": f"S{i}",
                    "scan_age": 30.0 + i,
                    "dice_mean_nobg": dice,
                    "dice_mean": dice + 0.05,
                }
            )
    return pd.DataFrame(rows)


def test_paper_findings_hold_or_not_on_constructed_results():
    paper_like = {
        "none": 0.6,
        "shallow": 0.60,
        "medium": 0.7105,
        "deep": 0.73,
        "full": 0.71,
        "scratch": 0.55,
    }
    cases = _cases(paper_like, spread=lambda s: 0.01 if s == "shallow" else 0.02, n=12)
    # a paired design: every strategy moves each subject alike, apart from a small jitter
    jitter = np.tile(np.linspace(-0.002, 0.002, 12), len(paper_like))
    cases["dice_mean_nobg"] += np.where(cases["strategy"] == "shallow", 0.0, jitter)
    findings = transfer.paper_findings(cases)
    assert list(findings.columns[:3]) == ["paper (dHCP)", "source", "a"]
    verdicts = findings["verdict"]
    assert (verdicts.drop("shallow spreads less than full fine-tuning") == HOLDS).all(), findings
    assert "Table 5" in findings.loc["medium fine-tuning beats shallow", "paper (dHCP)"]
    assert (findings["p_corrected"] == np.minimum(1, 6 * findings["p"])).all()

    reversed_ = {k: 1.3 - v for k, v in paper_like.items()}
    findings = transfer.paper_findings(_cases(reversed_, n=12))
    assert findings.loc["medium fine-tuning beats shallow", "verdict"] == CONTRADICTED
    assert findings.loc["full fine-tuning beats scratch", "verdict"] == CONTRADICTED
    assert findings.loc["deep fine-tuning beats medium", "verdict"] == CONTRADICTED


def test_table4_and_figures_show_every_strategy():
    rows = []
    for strategy, dice in (("none", 0.5), ("full", 0.8)):
        for label, short in enumerate(
            [
                "BG (outer)",
                "CSF",
                "cGM",
                "WM",
                "BG (inner)",
                "Ventr.",
                "Cereb.",
                "dGM",
                "BS",
                "Hippoc.",
            ]
        ):
            rows.append(
                {
                    "strategy": strategy,
                    "participant_id": "S1",
                    "label": label,
                    "short_name": short,
                    "is_background": label in (0, 4),
                    "dice": dice + 0.01 * label,
                }
            )
    table = report.table4(pd.DataFrame(rows), label="neonb")
    assert list(table.index) == [
        ("none", "neonb"),
        ("none", "paper"),
        ("full", "neonb"),
        ("full", "paper"),
    ]
    assert table.loc[("full", "neonb"), "CSF"] == pytest.approx(0.81)
    assert table.loc[("full", "paper"), "CSF"] == 0.811
    cases = _cases({"shallow": 0.6, "full": 0.7})
    fig = plots.strategy_boxplots(cases)
    assert len(fig.data) == 2 and list(dict.fromkeys(fig.data[0].x)) == ["shallow", "full"]
    ages = pd.DataFrame({"scan_age": [30.0, 31.0, 43.0], "dataset": ["target", "target", "source"]})
    fig = plots.age_distributions(ages)
    assert [trace.name.split(" (")[0] for trace in fig.data] == ["target", "source"]
