"""The ``neonb`` command line and the study runner, as a user runs them."""

from __future__ import annotations

import _thread
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from neonb.cli import main
from neonb.errors import ConfigError
from neonb.study import (
    NOTEBOOKS,
    READS,
    NotebookError,
    load_params,
    open_cohort,
    resolve_data_root,
    run_chapters,
    run_notebook,
    run_study,
)

ROOT = Path(__file__).resolve().parents[1]


def test_phantom_then_manifest(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "cohort"), "--n", "3", "--voxel-size", "8"]) == 0
    assert (
        main(["manifest", str(tmp_path / "cohort"), "--out", str(tmp_path / "m.tsv"), "--check"])
        == 0
    )
    out = capsys.readouterr().out
    assert "found 3 sessions" in out
    manifest = pd.read_csv(tmp_path / "m.tsv", sep="\t")
    assert manifest["complete"].all() and len(manifest) == 3


def test_errors_are_one_line_with_exit_status_1(tmp_path, capsys):
    assert main(["manifest", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neonb manifest: error: ") and "nowhere" in err
    assert "\n" not in err
    assert main(["phantom", str(tmp_path / "c"), "--n", "0"]) == 1
    assert "neonb phantom: error:" in capsys.readouterr().err


def test_load_params_merges_study_and_notebook_files(tmp_path):
    (tmp_path / "study.yaml").write_text("seed: 1\nn_subjects: 5\n")
    (tmp_path / "00_data.yaml").write_text("n_subjects: 7\n")
    assert load_params(tmp_path, "00_data") == {"seed": 1, "n_subjects": 7}
    assert load_params(tmp_path, "01_pipeline") is None


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    with pytest.raises(NotebookError, match=r"00_data.ipynb failed in cell \d+ .*no such folder"):
        run_notebook(
            "00_data", {"data_root": "/no/such/release"}, output_dir=tmp_path, cwd=tmp_path
        )


class _Chapters:
    """A fake ``run_one`` that records when each chapter starts and ends (no papermill)."""

    def __init__(self, seconds: float = 0.02, fail: str | None = None):
        self.seconds, self.fail = seconds, fail
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, name: str) -> None:
        with self.lock:
            self.events.append(("start", name))
        time.sleep(self.seconds)
        with self.lock:
            self.events.append(("end", name))
        if name == self.fail:
            raise NotebookError(f"notebook {name}.ipynb failed")

    def running_at_most(self) -> int:
        running = peak = 0
        for kind, _ in self.events:
            running += 1 if kind == "start" else -1
            peak = max(peak, running)
        return peak


def test_one_job_runs_the_chapters_in_the_study_order():
    chapters, lines = _Chapters(seconds=0), []
    run_chapters(NOTEBOOKS, chapters, jobs=1, echo=lambda *a, **k: lines.append(a[0]))
    assert [name for kind, name in chapters.events if kind == "start"] == list(NOTEBOOKS)
    assert chapters.running_at_most() == 1
    assert lines[:2] == ["[1/7] 00_data ...", lines[1]] and lines[1].startswith("done in")


def test_two_jobs_run_two_chapters_at_once_after_those_they_read():
    chapters, lines = _Chapters(), []
    run_chapters(NOTEBOOKS, chapters, jobs=2, echo=lambda *a, **k: lines.append(a[0]))
    events = chapters.events
    assert chapters.running_at_most() == 2
    assert sorted(name for kind, name in events if kind == "end") == sorted(NOTEBOOKS)
    for chapter, reads in READS.items():
        for other in reads:
            assert events.index(("end", other)) < events.index(("start", chapter)), (
                f"{chapter} started before {other}, whose results it reads, had finished"
            )
    assert events[:2] == [("start", "01_pipeline"), ("start", "04_transfer")]
    assert sum(line.endswith("started") for line in lines) == len(NOTEBOOKS)
    assert any(line.startswith("[7/7] 05_paper_vs_neonb done in") for line in lines)


def test_a_failed_chapter_stops_new_ones_and_is_raised_after_the_running_finish():
    chapters, lines = _Chapters(fail="01_pipeline"), []
    with pytest.raises(NotebookError, match="01_pipeline"):
        run_chapters(NOTEBOOKS, chapters, jobs=2, echo=lambda *a, **k: lines.append(a[0]))
    started = {name for kind, name in chapters.events if kind == "start"}
    ended = {name for kind, name in chapters.events if kind == "end"}
    assert started == ended == {"01_pipeline", "04_transfer"}
    assert any("01_pipeline failed after" in line for line in lines)
    with pytest.raises(ConfigError, match="at least 1"):
        run_chapters(NOTEBOOKS, chapters, jobs=0)


def test_ctrl_c_stops_the_chapters_at_once_and_says_which():
    chapters, lines = _Chapters(seconds=0.5), []
    threading.Timer(0.1, _thread.interrupt_main).start()  # what a Ctrl-C does
    with pytest.raises(KeyboardInterrupt):
        run_chapters(NOTEBOOKS, chapters, jobs=2, echo=lambda *a, **k: lines.append(a[0]))
    running = "01_pipeline, 04_transfer"
    assert lines[-1] == f"interrupted: stopping {running} (finished runs and epochs are kept)"
    assert {name for kind, name in chapters.events if kind == "start"} == set(running.split(", "))


def test_chapters_at_once_share_the_cores_and_the_user_s_thread_count_wins(monkeypatch):
    from neonb.study import _threads_per_chapter

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(5)))
    with _threads_per_chapter(2) as threads:
        assert threads == "2" and os.environ["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
    with _threads_per_chapter(8) as threads:
        assert threads == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with _threads_per_chapter(2) as threads:
        assert threads == "3"
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested form, not a number
    with _threads_per_chapter(2) as threads:
        assert threads == "4,2"


def test_a_notebook_runs_in_its_folder_without_moving_this_process(tmp_path):
    import nbformat

    notebooks, work = tmp_path / "notebooks", tmp_path / "work"
    notebooks.mkdir(), work.mkdir()
    probe = nbformat.v4.new_notebook()
    probe.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "3"}
    probe.cells = [
        nbformat.v4.new_code_cell("out = 'cwd.txt'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, time\ntime.sleep(1)\nopen(out, 'w').write(os.getcwd())"
        ),
    ]
    nbformat.write(probe, notebooks / "probe.ipynb")
    before, seen = os.getcwd(), set()
    runner = threading.Thread(
        target=run_notebook,
        args=("probe", {"out": "cwd.txt"}),
        kwargs={"notebooks_dir": notebooks, "output_dir": tmp_path / "executed", "cwd": work},
    )
    runner.start()
    while runner.is_alive():  # chapters run in threads: none may move the others' folder
        seen.add(os.getcwd())
        time.sleep(0.01)
    assert seen == {before}
    assert (work / "cwd.txt").read_text() == str(work.resolve())
    assert (tmp_path / "executed" / "probe.ipynb").is_file()


def test_a_study_with_a_bad_jobs_count_is_refused_before_planning(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "study.yaml").write_text("jobs: two\ndata_root: /no/such/release\n")
    (params / "00_data.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"jobs must be a whole number of at least 1, got 'two'"):
        run_study(params, book=False, workdir=tmp_path, echo=lambda *a, **k: None)


def test_a_study_that_cannot_be_planned_stops_before_any_notebook(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "00_data.yaml").write_text("data_root: /no/such/release\n")
    with pytest.raises(ConfigError, match=r"^00_data: /no/such/release: no such folder"):
        run_study(
            params,
            book=False,
            book_dir=tmp_path / "book",
            workdir=tmp_path,
            echo=lambda *a, **k: None,
        )
    assert not (tmp_path / "book" / "notebooks").exists()


def test_paper_scale_without_a_data_root_is_refused_before_writing(tmp_path):
    with pytest.raises(ConfigError, match=r"709 sessions at 0.5 mm.*GB.*DATA="):
        resolve_data_root("", synthetic_base=tmp_path, n=709, seed=0, voxel_size=0.5)
    assert not any(tmp_path.iterdir())


def test_open_cohort_reads_the_synthetic_cohort_it_writes(tmp_path):
    cohort = open_cohort("", synthetic_base=tmp_path, n=3, seed=2, voxel_size=8.0)
    assert cohort.root == tmp_path / "synthetic-n3-8mm-seed2"
    assert len(cohort.manifest) == 3 and cohort.manifest["complete"].all()
    assert cohort.description == "synthetic cohort, 8 mm"
    assert open_cohort(cohort.root).description == "dHCP"
