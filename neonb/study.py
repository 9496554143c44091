"""Run the study: the notebooks with papermill, in order or a few at once, then the Jupyter Book.

The study is a set of parameterised notebooks (``notebooks/NN_name.ipynb``) and one
folder of parameters per scale (``params/smoke``, ``params/demo``, ``params/paper``).
A parameters folder holds ``study.yaml`` (values shared by every notebook: data root,
synthetic cohort size, seed, results folder) and one ``NN_name.yaml`` per notebook to
run; a notebook without a YAML file in the folder is not run at that scale.

Executed notebooks are written to ``book/notebooks/``, where the book's table of
contents expects them; the book build does not execute them again. With ``jobs: 2`` in
``study.yaml`` (the demo's) two notebooks run at once, each kernel with half the cores
(:func:`run_chapters`; :data:`READS` says which chapter waits for which).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from neonb.errors import ConfigError, DataError, NeonbError
from neonb.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = (
    "00_data",
    "01_pipeline",
    "02_ageunet",
    "03_budgeting",
    "04_transfer",
    "06_robustness",
    "05_paper_vs_neonb",
)
"""The study's notebooks, in the order they run one at a time (later ones reuse earlier
results): the robustness chapter goes beyond the paper, and runs before the closing chapter,
which shows its findings beside the others."""

READS: dict[str, tuple[str, ...]] = {
    "02_ageunet": ("01_pipeline",),
    "06_robustness": ("01_pipeline",),
    "05_paper_vs_neonb": NOTEBOOKS[:-1],
}
"""The chapters that read another chapter's results, and whose. The others read only the
cohort, the splits and the plan, which exist before any chapter runs, so with ``jobs`` > 1
they run beside each other."""

LONGEST_FIRST = (
    "01_pipeline",
    "06_robustness",
    "04_transfer",
    "03_budgeting",
    "02_ageunet",
    "00_data",
    "05_paper_vs_neonb",
)
"""With ``jobs`` > 1, the order in which chapters that can start do start: the pipeline
first (two chapters wait for it), then by running time in the demo (measured on 2 cores:
06 and 04 about 200 s each, 03 130 s, 02 80 s, 00 15 s), so that the longest do not end
up last and alone."""


class NotebookError(NeonbError):
    """A notebook of the study failed; the message names the notebook, the cell and the error."""


MAX_IMPLICIT_SYNTHETIC_VOXELS = 2_000_000_000
"""Largest synthetic cohort (sessions × voxels) generated without being asked for by name."""
SYNTHETIC_BYTES_PER_VOXEL = 4.8
"""Disk use of the cohort's six gzipped images, per voxel (measured at 0.5 mm)."""


def synthetic_cohort_dir(base: str | os.PathLike, *, n: int, seed: int, voxel_size: float) -> Path:
    """Folder of the synthetic cohort with these parameters (``data/synthetic-n60-1.5mm-seed0``).

    Each parameter set gets its own folder, so the smoke, demo and paper cohorts coexist.
    """
    return Path(base) / f"synthetic-n{n}-{voxel_size:g}mm-seed{seed}"


def resolve_data_root(
    data_root: str | os.PathLike | None,
    *,
    synthetic_base: str | os.PathLike = "data",
    n: int = 60,
    seed: int = 0,
    voxel_size: float = 1.5,
    progress: bool = True,
) -> Path:
    """The release folder to read: ``data_root`` if given, else the synthetic cohort.

    The synthetic cohort is generated on first use (:func:`neonb.phantom.write_cohort`)
    and reused afterwards.

    Raises:
        DataError: if ``data_root`` is given but is not a folder.
        ConfigError: if no ``data_root`` is given and the synthetic cohort would exceed
            :data:`MAX_IMPLICIT_SYNTHETIC_VOXELS` (the paper's scale: about 62 GB).
    """
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(
                root,
                "no such folder",
                "give the dHCP release folder, or leave the "
                "data root empty to use the synthetic cohort",
            )
        return root
    from neonb.phantom import grid_shape, write_cohort

    voxels = n * math.prod(grid_shape(voxel_size))
    if voxels > MAX_IMPLICIT_SYNTHETIC_VOXELS:
        raise ConfigError(
            f"no data root given, and the synthetic cohort these parameters ask for "
            f"({n} sessions at {voxel_size:g} mm) would take about "
            f"{voxels * SYNTHETIC_BYTES_PER_VOXEL / 1e9:.0f} GB of disk: give the dHCP "
            "release folder (make study DATA=... / neonb study --data ...), or write the "
            "cohort explicitly with `neonb phantom` and give that folder"
        )
    folder = synthetic_cohort_dir(synthetic_base, n=n, seed=seed, voxel_size=voxel_size)
    return write_cohort(folder, n=n, seed=seed, voxel_size=voxel_size, progress=progress)


@dataclass(frozen=True)
class Cohort:
    """The sessions a chapter works on.

    Attributes:
        root: the release folder (the dHCP download, or the synthetic cohort's folder).
        manifest: one row per session (:func:`neonb.data.read_manifest`).
        description: what the data is, for table headings: ``"dHCP"`` or
            ``"synthetic cohort, 1.5 mm"``.
        brain_mask: ``"apply"`` or ``"ignore"``: whether the records of :meth:`records`
            carry the brain mask for the transforms to apply.
    """

    root: Path
    manifest: pd.DataFrame
    description: str
    brain_mask: str = "ignore"

    def records(self, sessions: pd.DataFrame) -> list[dict[str, Any]]:
        """Training records (MONAI data dicts) of ``sessions``, rows of :attr:`manifest`.

        The one way the chapters turn sessions into records, so the brain-mask setting
        reaches every one (:func:`neonb.data.to_data_dicts`).
        """
        from neonb.data import to_data_dicts

        return to_data_dicts(sessions, brain_mask=self.brain_mask)


def open_cohort(
    data_root: str | os.PathLike | None,
    *,
    synthetic_base: str | os.PathLike = "data",
    n: int = 60,
    seed: int = 0,
    voxel_size: float = 1.5,
    images: str = "restore",
    brain_mask: str = "ignore",
) -> Cohort:
    """Resolve the data root (:func:`resolve_data_root`) and read its manifest.

    Every chapter starts here with its ``study.yaml`` parameters, so all of them read the
    same sessions.

    Args:
        data_root: the dHCP release (or its ``derivatives/dhcp_anat_pipeline``); empty or
            ``None`` for the synthetic cohort.
        synthetic_base, n, seed, voxel_size: the synthetic cohort (see
            :func:`resolve_data_root`).
        images: ``"restore"`` (bias-corrected) or ``"plain"`` T1w/T2w pair
            (:func:`neonb.data.read_manifest`).
        brain_mask: ``"apply"`` makes the brain mask a required image, and the records of
            :meth:`Cohort.records` carry it for the transforms to apply; ``"ignore"`` lists
            masks without using them.

    Raises:
        ConfigError: when ``images`` or ``brain_mask`` is not an accepted value.
    """
    from neonb.data import check_brain_mask_policy, check_image_kind, read_manifest

    check_image_kind(images)
    check_brain_mask_policy(brain_mask)
    root = resolve_data_root(
        data_root,
        synthetic_base=synthetic_base,
        n=n,
        seed=seed,
        voxel_size=voxel_size,
        progress=False,
    )
    description = "dHCP" if data_root else f"synthetic cohort, {voxel_size:g} mm"
    manifest = read_manifest(root, images=images, brain_mask=brain_mask, progress=False)
    return Cohort(root, manifest, description, brain_mask)


def open_cohort_from_params(
    params: Mapping[str, Any], *, data_root: str | os.PathLike | None = None
) -> Cohort:
    """:func:`open_cohort` with the values of a chapter's parameters (``study.yaml``).

    Args:
        params: merged parameters (:func:`load_params`); missing keys take
            :func:`open_cohort`'s defaults.
        data_root: overrides the parameters' ``data_root`` (``neonb ... --data``).
    """
    return open_cohort(
        data_root or params.get("data_root") or None,
        synthetic_base=params.get("synthetic_base", "data"),
        n=params.get("n_subjects", 60),
        seed=params.get("seed", 0),
        voxel_size=params.get("voxel_size", 1.5),
        images=params.get("images", "restore"),
        brain_mask=params.get("brain_mask", "ignore"),
    )


def load_params(params_dir: str | os.PathLike, notebook: str) -> dict[str, Any] | None:
    """Parameters of ``notebook`` at one scale: ``study.yaml`` updated by ``<notebook>.yaml``.

    Returns:
        The merged parameters, or ``None`` when the folder has no YAML for this notebook.

    Raises:
        DataError: if the folder is missing or a YAML file is not a mapping.
    """
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise DataError(
            params_dir,
            "no such parameters folder",
            "expected e.g. params/demo with study.yaml and NN_name.yaml files",
        )
    own = params_dir / f"{notebook}.yaml"
    if not own.is_file():
        return None
    merged: dict[str, Any] = {}
    for path in (params_dir / "study.yaml", own):
        if path.is_file():
            values = yaml.safe_load(path.read_text()) or {}
            if not isinstance(values, dict):
                raise DataError(path, "must hold a mapping of parameter names to values")
            merged.update(values)
    return merged


@contextlib.contextmanager
def _kernel_config() -> Iterator[Any]:
    """Kernel settings for papermill: local IPC sockets in a private folder on POSIX.

    The default TCP transport makes the kernel warn that it runs without encryption;
    a kernel on the same machine needs no network port at all.
    """
    from traitlets.config import Config

    config = Config()
    if os.name != "posix":
        yield config
        return
    with tempfile.TemporaryDirectory(prefix="neonb-kernel-") as sockets:
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(Path(sockets) / "kernel")
        yield config


_KERNEL_PIDS: set[int] = set()
"""Process ids of the chapter kernels now running (each in a session of its own, so that a
Ctrl-C at the terminal reaches only ``neonb study``: :func:`run_chapters` passes it on)."""
_KERNEL_PIDS_LOCK = threading.Lock()


@functools.cache
def _chapter_kernel_manager() -> type:
    """nbclient's kernel manager, recording each kernel's process id in :data:`_KERNEL_PIDS`."""
    from jupyter_client import AsyncKernelManager

    class ChapterKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kwargs: Any) -> None:
            await super().start_kernel(**kwargs)
            with _KERNEL_PIDS_LOCK:
                _KERNEL_PIDS.add(self.provisioner.pid)

        async def shutdown_kernel(self, *args: Any, **kwargs: Any) -> None:
            pid = getattr(self.provisioner, "pid", None)
            await super().shutdown_kernel(*args, **kwargs)
            with _KERNEL_PIDS_LOCK:
                _KERNEL_PIDS.discard(pid)

    return ChapterKernelManager


def _signal_kernels(signum: int) -> None:
    """Send ``signum`` to every chapter kernel: ``SIGINT`` interrupts the running cell (as
    Jupyter's interrupt button), ``SIGTERM`` ends the kernel (files are written atomically,
    so a run stops at its last checkpoint)."""
    with _KERNEL_PIDS_LOCK:
        pids = list(_KERNEL_PIDS)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def run_notebook(
    notebook: str,
    parameters: dict[str, Any],
    *,
    notebooks_dir: str | os.PathLike = REPO_ROOT / "notebooks",
    output_dir: str | os.PathLike = REPO_ROOT / "book" / "notebooks",
    cwd: str | os.PathLike = REPO_ROOT,
) -> Path:
    """Execute one notebook with papermill and write the executed copy to ``output_dir``.

    Relative paths in the parameters are relative to ``cwd`` (the repository root).

    Raises:
        NotebookError: naming the notebook, the failing cell and the error.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = Path(notebooks_dir) / f"{notebook}.ipynb"
    if not source.is_file():
        raise DataError(source, "no such notebook")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = output_dir / source.name
    try:
        with _kernel_config() as kernel_config:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                kernel_name="python3",
                progress_bar=False,
                # The kernel starts in ``cwd`` (nbclient's resources path): papermill's own
                # ``cwd`` changes this process's folder, which chapters run at once would race.
                resources={"metadata": {"path": str(Path(cwd).resolve())}},
                config=kernel_config,
                kernel_manager_class=_chapter_kernel_manager(),
            )
    except PapermillExecutionError as error:
        first_line = error.source.strip().splitlines()[0] if error.source.strip() else ""
        raise NotebookError(
            f"notebook {source.name} failed in cell {error.exec_count} "
            f"(`{first_line}`): {error.ename}: {error.evalue}. "
            f"The executed notebook with the traceback is {executed}"
        ) from None
    _fold_parameter_cells(executed)
    return executed


def _fold_parameter_cells(path: Path) -> None:
    """Tag the parameters cells ``hide-input``, so the book shows them folded."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = cell.metadata.get("tags", [])
        if {"parameters", "injected-parameters"} & set(tags) and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
    atomic_write(path, lambda tmp: nbformat.write(notebook, tmp))


def _ship_plotly_js(static_dir: Path) -> Path:
    """Copy plotly.js from the installed plotly package into the book's static files."""
    import shutil

    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    static_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, static_dir / "plotly.min.js"))


def build_book(book_dir: str | os.PathLike = REPO_ROOT / "book") -> Path:
    """Build the Jupyter Book to static HTML; returns the path of ``index.html``.

    Raises:
        NotebookError: if the build fails (its output is shown).
    """
    book_dir = Path(book_dir)
    _ship_plotly_js(book_dir / "_static")
    command = [
        str(Path(sys.executable).with_name("jupyter-book")),
        "build",
        str(book_dir),
        "--all",
        "--warningiserror",
        "--keep-going",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NotebookError(
            f"the book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return book_dir / "_build" / "html" / "index.html"


def run_chapters(
    names: tuple[str, ...] | list[str],
    run_one: Callable[[str], Any],
    *,
    jobs: int = 1,
    echo: Callable[..., Any] = print,
) -> None:
    """Run chapters one at a time in the given order, or ``jobs`` at a time by :data:`READS`.

    With ``jobs`` = 1 the chapters run in ``names``' order. With more, a chapter starts once
    every chapter it reads (:data:`READS`, among ``names``) has finished and fewer than
    ``jobs`` are running; of those that can start, the first in :data:`LONGEST_FIRST` does.
    When a chapter fails, no other starts; the running ones finish (their runs and results
    are kept), then the first failure is raised. A Ctrl-C interrupts the running chapters'
    kernels (ends them if they have not stopped 10 s later), then raises
    :class:`KeyboardInterrupt`.

    Args:
        names: the chapters to run (a subset of :data:`NOTEBOOKS`).
        run_one: runs one chapter by name (:func:`run_notebook` with its parameters).
        jobs: how many chapters may run at once (≥ 1).
        echo: where progress lines go (``[k/n] name ... done in S s``).
    """
    _check_jobs(jobs)
    names = list(names)
    total = len(names)
    if jobs == 1:
        for step, name in enumerate(names, start=1):
            echo(f"[{step}/{total}] {name} ...", end=" ", flush=True)
            tick = time.perf_counter()
            run_one(name)
            echo(f"done in {time.perf_counter() - tick:.0f} s")
        return
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    waiting = sorted(names, key=lambda name: order.get(name, len(order)))
    finished: set[str] = set()
    running: dict[Future, tuple[str, int, float]] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="neonb-chapter") as pool:
        while running or (waiting and failure is None):
            for name in list(waiting):
                if failure is not None or len(running) >= jobs:
                    break
                if all(dep in finished or dep not in names for dep in READS.get(name, ())):
                    waiting.remove(name)
                    step = total - len(waiting)
                    echo(f"[{step}/{total}] {name} started")
                    running[pool.submit(run_one, name)] = (name, step, time.perf_counter())
            if not running:
                break
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                names_running = ", ".join(name for name, _, _ in running.values())
                echo(f"interrupted: stopping {names_running} (finished runs and epochs are kept)")
                _signal_kernels(signal.SIGINT)
                if wait(running, timeout=10).not_done:  # idle between two cells, or in C code
                    _signal_kernels(signal.SIGTERM)
                    wait(running)
                raise
            for future in done:
                name, step, tick = running.pop(future)
                error = future.exception()
                if error is None:
                    finished.add(name)
                    echo(f"[{step}/{total}] {name} done in {time.perf_counter() - tick:.0f} s")
                else:
                    echo(f"[{step}/{total}] {name} failed after {time.perf_counter() - tick:.0f} s")
                    failure = failure or error
    if failure is not None:
        raise failure


def _check_jobs(jobs: Any) -> None:
    """Refuse a ``jobs`` count (``study.yaml``, ``--jobs``) that is not a whole number ≥ 1."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number of at least 1, got {jobs!r}")


@contextlib.contextmanager
def _threads_per_chapter(jobs: int) -> Iterator[str]:
    """Give each of ``jobs`` chapter kernels an equal share of this process's CPU cores.

    Kernels inherit the environment, and PyTorch (and OpenVINO through
    :func:`neonb.inference`) take ``OMP_NUM_THREADS`` threads: ``cores // jobs``, at least one,
    unless the user set ``OMP_NUM_THREADS``. The same count for every chapter whatever the
    schedule, so that a chapter's numbers do not depend on which other chapter ran beside it.
    Yields ``OMP_NUM_THREADS`` as the kernels see it (unset: ``""``, with one job).
    """
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        yield os.environ.get("OMP_NUM_THREADS", "")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // jobs))
    os.environ["OMP_NUM_THREADS"] = threads
    try:
        yield threads
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def run_study(
    params_dir: str | os.PathLike,
    *,
    data_root: str | None = None,
    notebooks: tuple[str, ...] = NOTEBOOKS,
    book: bool = True,
    book_dir: str | os.PathLike = REPO_ROOT / "book",
    workdir: str | os.PathLike = REPO_ROOT,
    jobs: int | None = None,
    echo=print,
) -> Path | None:
    """Plan the study, run every notebook that has parameters in ``params_dir``, build the book.

    The plan (:func:`neonb.plan.check_plan`) comes first, so parameters or data that cannot
    work stop the study in seconds rather than after a day of training.

    Args:
        params_dir: e.g. ``params/demo``.
        data_root: a dHCP release folder; overrides ``data_root`` in the YAML files.
            Empty or ``None`` keeps the YAML value (empty there: the synthetic cohort).
        notebooks: which notebooks to consider, in order.
        book: whether to build the book afterwards.
        book_dir: the book; executed notebooks go to its ``notebooks/`` folder.
        workdir: folder the notebooks run in; relative paths in the parameters
            (cohort, results) are relative to it.
        jobs: how many chapters run at once (:func:`run_chapters`), each kernel with
            ``cores // jobs`` threads; default: ``jobs`` in the folder's ``study.yaml``
            (a chapter's YAML file does not change it), else 1.
            Two on 2 cores made the demo study take 0.84 and 0.78 times as long as one
            chapter at a time with two threads, on two AMD EPYC VMs (``benchmarks/README.md``).
        echo: where progress lines go.

    Returns:
        The path of the built book's ``index.html``, or ``None`` if ``book`` is False.
    """
    plan = [(name, load_params(params_dir, name)) for name in notebooks]
    plan = [(name, params) for name, params in plan if params is not None]
    if not plan:
        raise ConfigError(f"{params_dir} holds no parameters for any of {list(notebooks)}")
    if jobs is None:
        shared = Path(params_dir) / "study.yaml"
        jobs = (yaml.safe_load(shared.read_text()) or {}).get("jobs", 1) if shared.is_file() else 1
    _check_jobs(jobs)
    started = time.perf_counter()
    from neonb.plan import check_plan

    echo("planning the study (nothing is trained) ...")
    root = Path(data_root).expanduser().resolve() if data_root else None
    with contextlib.chdir(workdir):
        check_plan(Path(params_dir).resolve(), data_root=root, echo=echo)
    chapter_params = dict(plan)
    for params in chapter_params.values():
        params.pop("jobs", None)  # the schedule's, not a notebook parameter
        if data_root:
            params["data_root"] = str(Path(data_root).expanduser().resolve())
    with _threads_per_chapter(jobs) as threads:
        if jobs > 1:
            echo(f"running up to {jobs} chapters at once, {threads} thread(s) each")
        run_chapters(
            list(chapter_params),
            lambda name: run_notebook(
                name, chapter_params[name], output_dir=Path(book_dir) / "notebooks", cwd=workdir
            ),
            jobs=jobs,
            echo=echo,
        )
    index = None
    if book:
        echo("building the book ...", end=" ", flush=True)
        tick = time.perf_counter()
        index = build_book(book_dir)
        echo(f"done in {time.perf_counter() - tick:.0f} s")
        echo(f"open {index}")
    echo(f"study finished in {(time.perf_counter() - started) / 60:.1f} min")
    return index
