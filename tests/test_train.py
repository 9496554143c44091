"""``neonb train`` and DistributedDataParallel on the CPU (gloo), with torchrun and the smoke data.

Two torchrun launches of two processes each: the smoke pipeline chapter through the command
line, and a tiny run (augmentation off, SGD) trained under two processes with batch 1 each,
compared with one process with batch 2, and resumed by one process after an interruption.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from neonb.cli import main
from neonb.engine import CHECKPOINT_FILE, ENVIRONMENT_FILE, EpochSampler, sample_seed
from neonb.errors import ConfigError
from neonb.experiment import train_segmentation
from neonb.files import exclusive_lock
from neonb.runs import FINISHED, LOCK_FILE, NOT_STARTED, load_chapter, run_status

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke"
sys.path.insert(0, str(Path(__file__).parent))

import ddp_worker  # noqa: E402


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", *args]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a hang ends with all of it
    )
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"torchrun hung:\n{out[-3000:]}\n{err[-3000:]}")
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with the smoke cohort and splits, as chapter 00 leaves them."""
    folder = tmp_path_factory.mktemp("train")
    with contextlib.chdir(folder):
        load_chapter(SMOKE, "01_pipeline")
    return folder


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["model"]


def test_every_process_draws_its_share_of_the_batch_one_process_draws():
    one = EpochSampler(7, 14, seed=3, rank=0, world_size=1)
    two = [EpochSampler(7, 14, seed=3, rank=r, world_size=2) for r in range(2)]
    four = [EpochSampler(7, 14, seed=3, rank=r, world_size=4) for r in range(4)]
    for sampler in [one, *two, *four]:
        sampler.set_epoch(5)
    single = list(one)
    assert sorted(i for _, i in single) == sorted(list(range(7)) * 2)  # two permutations
    assert [s for s, _ in single] == [sample_seed(3 + 5, p) for p in range(14)]
    # step k of two processes with batch 1 = batch k of one process with batch 2
    for k, pair in enumerate(zip(*(list(s) for s in two), strict=True)):
        assert list(pair) == single[2 * k : 2 * k + 2]
    # 14 samples over 4 processes: padded to 16 with the epoch's first two volumes
    shares = [list(s) for s in four]
    assert [len(s) for s in shares] == [4] * 4 and len(four[0]) == 4
    steps = [item for step in zip(*shares, strict=True) for item in step]
    assert steps[:14] == single
    assert [i for _, i in steps[14:]] == [i for _, i in single[:2]]
    one.set_epoch(6)
    assert list(one) != single


def test_torchrun_trains_the_smoke_pipeline_and_the_notebook_reuses_it(workdir, capsys):
    args = ["-m", "neonb.cli", "train", "--params", str(SMOKE), "--chapter", "01_pipeline"]
    result = _torchrun([*args, "--no-progress"], workdir)
    assert result.stdout.count("01_pipeline run-0: training") == 1  # process 0 alone prints
    run_dir = workdir / "results" / "smoke" / "01_pipeline" / "run-0"
    environment = json.loads((run_dir / ENVIRONMENT_FILE).read_text())
    assert environment["world_size"] == 2 and len(environment["devices"]) == 2
    written = (run_dir / CHECKPOINT_FILE).stat().st_mtime_ns
    with contextlib.chdir(workdir):
        chapter = load_chapter(SMOKE, "01_pipeline")
        assert chapter["run-0"].status() == FINISHED
        trained = chapter["run-0"].train()  # what the notebook calls
        assert main(["train", "--params", str(SMOKE), "--chapter", "pipeline", "--list"]) == 0
    assert (run_dir / CHECKPOINT_FILE).stat().st_mtime_ns == written  # not trained again
    assert len(trained.log) == chapter.config.epochs == 2
    listed = capsys.readouterr().out
    assert "run-0" in listed and FINISHED in listed


def test_unknown_runs_and_unfinished_prerequisites_are_one_line_errors(workdir, capsys):
    with contextlib.chdir(workdir):
        code = main(["train", "--params", str(SMOKE), "--chapter", "03_budgeting", "--run", "x"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err
        assert "03_budgeting has no run 'x'; its runs: full/run-0, full/run-1, random/run-0" in err
        assert "fullepochs/run-1" in err  # the full volumes at equal epochs (both_schedules)
        code = main(
            ["train", "--params", str(SMOKE), "--chapter", "04_transfer", "--run", "deep/run-1"]
        )
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err
        assert "04_transfer deep/run-1 starts from another run: 04_transfer source" in err
        assert "--chapter 04_transfer --run source" in err
        chapter = load_chapter(SMOKE, "04_transfer")
        full = workdir / "results" / "smoke" / "03_budgeting" / "runs" / "full" / "run-0"
        full.mkdir(parents=True)
        with exclusive_lock(full / LOCK_FILE, "a neonb train"):  # another job trains it
            code = main(
                [
                    "train",
                    "--params",
                    str(SMOKE),
                    "--chapter",
                    "03_budgeting",
                    "--run",
                    "full/run-0",
                ]
            )
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err and "locked by a neonb train" in err
        assert run_status(full) == NOT_STARTED
        assert chapter["deep/run-0"].status() == NOT_STARTED  # run folders are relative
        assert [n.run for n in chapter["deep/run-0"].unmet()] == ["source"]
    # replicates share their data and differ in their seed
    deep = chapter.groups()["deep"]
    assert [r.replicate for r in deep] == [0, 1]
    assert [r.config.seed for r in deep] == [deep[0].config.seed, deep[0].config.seed + 1]
    assert deep[1].run_dir == chapter.folder / "deep" / "run-1"
    with pytest.raises(ConfigError, match="no chapter 'data' trains"):
        load_chapter(SMOKE, "data")


def test_two_processes_with_batch_1_take_the_steps_of_one_with_batch_2(workdir):
    _torchrun([str(Path(__file__).parent / "ddp_worker.py"), str(workdir)], workdir)
    config = ddp_worker.tiny_config(workdir)
    with contextlib.chdir(workdir):
        sets = ddp_worker.records()
        single = train_segmentation(sets["train"], sets["val"], config, workdir / "single")
        ddp = pd.read_csv(workdir / "ddp" / "log.tsv", sep="\t")
        interrupted = workdir / "interrupted"
        assert len(pd.read_csv(interrupted / "log.tsv", sep="\t")) == 1
        assert run_status(interrupted, config.epochs) == "partial"
        resumed = train_segmentation(sets["train"], sets["val"], config, interrupted)
    reference = _weights(workdir / "single")
    for other in (workdir / "ddp", interrupted):
        for key, value in _weights(other).items():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    for log in (ddp, resumed.log):
        columns = ["train_loss", "val_dice_nobg"]
        pd.testing.assert_frame_equal(log[columns], single.log[columns], rtol=1e-4)
    environment = json.loads((interrupted / ENVIRONMENT_FILE).read_text())
    assert environment["world_size"] == 2
    assert [(r["after_epoch"], r["world_size"]) for r in environment["resumed"]] == [(1, 1)]


def test_a_run_folder_is_stamped_with_the_splits_it_was_trained_on(tmp_path):
    from neonb import splits
    from neonb.errors import DataError
    from neonb.experiment import TrainingConfig
    from neonb.runs import SPLITS_STAMP, Run

    for file in splits.STUDY_SPLITS.values():
        (tmp_path / file).write_text(
            "participant_id\tsession_id\tscan_age\tsplit\nA\t1\t40\ttrain\n"
        )
    calls = []
    run = Run(
        "01_pipeline",
        "run-0",
        tmp_path / "01_pipeline" / "run-0",
        TrainingConfig(),
        1,
        lambda progress: calls.append(progress),
        splits_dir=tmp_path,
    )
    run.train()
    assert calls == [False] and (run.run_dir / SPLITS_STAMP).is_file()
    run.train()  # the same splits: reloaded (here: the trainer called again)
    assert len(calls) == 2
    # the study's splits drawn anew: the finished run must not be reloaded as it is
    (tmp_path / splits.STUDY_SPLITS["pipeline"]).write_text(
        "participant_id\tsession_id\tscan_age\tsplit\nA\t1\t40\ttest\n"
    )
    with pytest.raises(DataError, match="run-0: was trained on other splits"):
        run.train()
    # a run trained before stamps existed is refused too
    (run.run_dir / SPLITS_STAMP).unlink()
    (run.run_dir / "log.tsv").write_text("epoch\n0\n")
    with pytest.raises(DataError, match="before neonb recorded the splits"):
        run.train()
    assert len(calls) == 2


def test_both_schedules_add_the_full_volumes_at_equal_epochs(workdir):
    from neonb.experiment import optimizer_steps

    with contextlib.chdir(workdir):
        chapter = load_chapter(SMOKE, "03_budgeting")
    groups = chapter.groups()
    assert list(groups)[-1] == "fullepochs" and len(groups["fullepochs"]) == 2

    def steps(name: str) -> int:
        run = groups[name][0]
        return optimizer_steps(run.sessions, run.config)

    # the dispersed conditions train alike under both schedules; at equal steps the full
    # condition matches them, at equal epochs it takes their patches per volume
    dispersed = groups["sagittal"][0]
    assert groups["fullepochs"][0].config.samples_per_volume == dispersed.config.samples_per_volume
    assert groups["fullepochs"][0].sessions == groups["full"][0].sessions
    assert steps("full") == steps("sagittal")
    assert steps("fullepochs") < steps("full")
    assert groups["fullepochs"][0].config.epochs == dispersed.config.epochs


def test_replicates_are_trained_reported_and_scored_by_group(workdir, monkeypatch):
    from neonb import experiment
    from neonb.runs import train_runs

    with contextlib.chdir(workdir):
        chapter = load_chapter(SMOKE, "03_budgeting")
        chosen = [*chapter.groups()["full"], *chapter.groups()["sagittal"][:1]]
        said = []
        trained = train_runs(chosen, say=said.append)
        facts = trained.facts(by="condition")
        logs = trained.logs(by="condition", names={"full": "whole"})
        volumes = experiment.prepare_volumes(chapter.records["test"][:1])
        per_case = trained.evaluate(volumes, chapter.config, by="condition")
    assert len(said) == 3 and "full/run-1" in said[1]
    assert list(facts["condition"]) == ["full", "full", "sagittal"]
    assert list(facts["run"]) == [0, 1, 0]
    assert (facts["steps"] > 0).all() and (facts["train_time_s"] > 0).all()
    assert set(logs["condition"]) == {"whole", "sagittal"}
    assert sorted(logs["run"].unique()) == [0, 1]
    assert per_case.groupby(["condition", "run"]).ngroups == 3
    # two seeds, two networks: their test scores differ
    full = per_case[per_case["condition"] == "full"]
    assert not full[full["run"] == 0]["dice"].equals(full[full["run"] == 1]["dice"])
    # the backend reaches the one evaluation path (OpenVINO's own tests run it)
    backends = []
    original = experiment.evaluate

    def recording(*args, backend, **kwargs):
        backends.append(backend)
        return original(*args, backend="torch", **kwargs)

    monkeypatch.setattr(experiment, "evaluate", recording)
    trained.evaluate(volumes, chapter.config, by="condition", backend="openvino")
    assert backends == ["openvino"] * 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, "3", True])
def test_every_chapter_refuses_an_n_runs_that_is_not_a_whole_number(workdir, bad):
    from neonb.runs import define_runs
    from neonb.splits import load_study_splits
    from neonb.study import load_params, open_cohort_from_params

    with contextlib.chdir(workdir):
        params = load_params(SMOKE, "01_pipeline")
        cohort = open_cohort_from_params(params)
        tables = load_study_splits(params["results_dir"], cohort.manifest)
        for chapter in ("01_pipeline", "03_budgeting", "04_transfer"):
            chapter_params = {**load_params(SMOKE, chapter), "n_runs": bad}
            with pytest.raises(ConfigError, match="n_runs must be a whole number"):
                define_runs(chapter, chapter_params, cohort, tables)
