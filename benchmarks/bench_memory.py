"""Host memory of the paper configuration's training loader against the number of 0.5 mm sessions.

Compares the loader neonb used before (MONAI ``CacheDataset``: every pre-processed volume held
in memory as float32) with the disk cache (:class:`neonb.cache.VolumeDataset`, what
:func:`neonb.experiment.training_loader` builds now), and times loading with and without
data-loading workers. Every measurement runs in a fresh Python process, so each peak is that
measurement's own.

* ``memory``: peak resident set (``VmHWM``) of a process that builds the loader of the
  ``training:`` block of ``params/paper/01_pipeline.yaml`` (128³ patches, batch 2, the paper's
  augmentation) on ``n`` sessions and draws two epochs of batches, ``num_workers=0``. For the
  disk cache the entries exist already (written once beforehand; the run that writes them is
  the ``fill`` row). The growth per session is the least-squares slope over the counts of at
  least 2 (one session fills only half a batch of 2).
* ``loading``: seconds per batch over ``--batches`` batches from the disk-cached loader with
  ``num_workers`` 0 and 2 (after one untimed batch that starts the workers), and the peak of
  the summed resident sets of the main process and its workers (sampled every 20 ms; shared
  pages count once per process, so this overstates the total).

Usage::

    .venv/bin/python benchmarks/bench_memory.py                  # sessions 1,2,4,8; ~10 min
    .venv/bin/python benchmarks/bench_memory.py --sessions 1,2,4 --cohort-dir /tmp/c05
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
PAPER_SESSIONS = 342  # chapter 03 of params/paper: the largest training set


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _paper_workers() -> int:
    import yaml

    block = yaml.safe_load((REPO / "params/paper/01_pipeline.yaml").read_text())["training"]
    return int(block.get("num_workers", 0))


def _paper_config(**changes):
    import yaml

    from neonb.experiment import TrainingConfig

    block = yaml.safe_load((REPO / "params/paper/01_pipeline.yaml").read_text())["training"]
    block = {k: v for k, v in block.items() if k not in ("num_workers", "cache_dir")}
    return TrainingConfig.from_dict({**block, **changes})


def _records(cohort: str, n: int) -> list[dict]:
    from neonb import data

    manifest = data.read_manifest(cohort, progress=False)
    return data.to_data_dicts(manifest)[:n]


def _old_loader(records, config):
    """neonb's training loader before the disk cache (CacheDataset of train_transforms)."""
    from monai.data import CacheDataset
    from torch.utils.data import RandomSampler

    from neonb.engine import make_loader
    from neonb.transforms import train_transforms

    transform = train_transforms(config.patch_size, config.augmentation, model=config.model)
    dataset = CacheDataset([dict(r) for r in records], transform, progress=False)
    sampler = RandomSampler(dataset, num_samples=len(dataset) * config.samples_per_volume)
    return make_loader(dataset, config.batch_size, seed=config.seed, num_workers=0, sampler=sampler)


class _TreeSampler:
    """Peak of the summed RSS of this process and its children, sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> _TreeSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def _child(task: dict) -> dict:
    """One measurement, in a fresh process."""
    import torch
    from monai.utils import set_determinism

    from neonb.experiment import training_loader

    torch.set_num_threads(task.get("threads", torch.get_num_threads()))
    set_determinism(0)
    records = _records(task["cohort"], task["n"])
    started = time.perf_counter()
    if task["kind"] == "memory":
        if task["mode"] == "ram":
            loader = _old_loader(records, _paper_config())
        else:
            loader = training_loader(records, _paper_config(cache_dir=task["cache"]))
        batches = 0
        for _ in range(2):
            for batch in loader:
                batches += int(batch["image"].shape[0] > 0)
        return {
            "peak_rss_mb": _vm_hwm_bytes() / MB,
            "seconds": time.perf_counter() - started,
            "batches": batches,
        }
    config = _paper_config(cache_dir=task["cache"], num_workers=task["workers"])
    loader = training_loader(records, config)
    times = []
    with _TreeSampler() as sampler:
        while len(times) <= task["batches"]:
            tick = time.perf_counter()
            for batch in loader:
                assert batch["image"].shape[1:] == (2, *config.patch_size)
                times.append(time.perf_counter() - tick)
                if len(times) > task["batches"]:
                    break
                tick = time.perf_counter()
    timed = times[1:]  # the first batch starts the workers
    return {
        "s_per_batch": sum(timed) / len(timed),
        "tree_peak_rss_mb": sampler.peak / MB,
        "main_peak_rss_mb": _vm_hwm_bytes() / MB,
    }


def _run(task: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``; returns ``(a, b)``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _header() -> None:
    import monai
    import torch

    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(
        f"CPU: {model}, {os.cpu_count()} cores, {total:.1f} GB RAM; load average "
        f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}, torch {torch.__version__}"
        f", MONAI {monai.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,2,4,8", help="session counts (comma-separated)")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loading row")
    parser.add_argument("--workers", default="0,2", help="num_workers of the loading rows")
    parser.add_argument("--cohort-dir", help="write (and reuse) the 0.5 mm sessions here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    counts = sorted({int(n) for n in args.sessions.split(",")})
    workers = [int(w) for w in args.workers.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        cohort = Path(args.cohort_dir or Path(scratch) / "cohort")
        if not (cohort / "participants.tsv").is_file():
            from neonb.phantom import write_cohort

            _say(f"writing {max(counts)} sessions at 0.5 mm into {cohort} ...")
            write_cohort(cohort, n=max(counts), seed=args.seed, voxel_size=0.5, progress=False)
        cache = str(Path(scratch) / "cache")
        _header()
        _say("fill: writing the disk cache ...")
        common = {"kind": "memory", "cohort": str(cohort), "cache": cache}
        fill = _run({**common, "mode": "disk", "n": max(counts)})
        entries = list(Path(cache).glob("*.pt"))
        entry_mb = sum(p.stat().st_size for p in entries) / len(entries) / MB
        rows = []
        for mode in ("ram", "disk"):
            for n in counts:
                _say(f"memory: {mode}, {n} sessions ...")
                rows.append({"mode": mode, "n": n, **_run({**common, "mode": mode, "n": n})})
        loading = []
        for w in workers:
            _say(f"loading: {w} workers ...")
            task = {
                "kind": "loading",
                "n": max(counts),
                "workers": w,
                "batches": args.batches,
                "cohort": str(cohort),
                "cache": cache,
            }
            loading.append({"workers": w, **_run(task)})

    print()
    print("peak RSS of the training loader (num_workers=0, two epochs), MB")
    names = {"ram": "CacheDataset (before)", "disk": "disk cache (now)"}
    print(f"{'loader':<24}" + "".join(f"{n:>10}" for n in counts) + f"{'MB/session':>12}")
    fits = {}
    fitted = [n for n in counts if n >= 2] or counts  # a batch of 2 needs 2 sessions
    for mode in ("ram", "disk"):
        peaks = [r["peak_rss_mb"] for r in rows if r["mode"] == mode]
        fits[mode] = _slope(fitted, [p for n, p in zip(counts, peaks, strict=True) if n in fitted])
        cells = "".join(f"{p:>10.0f}" for p in peaks)
        print(f"{names[mode]:<24}{cells}{fits[mode][1]:>12.1f}")
    print(
        f"{'fill (empty cache)':<24}{'':>{10 * (len(counts) - 1)}}{fill['peak_rss_mb']:>10.0f}"
        f"{'':>12}   ({max(counts)} sessions, {fill['seconds']:.0f} s)"
    )
    print(f"cache entry on disk: {entry_mb:.0f} MB per session (cropped, uint8 label)")
    print()
    print(f"loading {max(counts)} cached sessions, paper augmentation, batch 2 (128³)")
    print(f"{'num_workers':>12}{'s/batch':>10}{'tree peak MB':>14}{'main peak MB':>14}")
    for row in loading:
        print(
            f"{row['workers']:>12}{row['s_per_batch']:>10.2f}{row['tree_peak_rss_mb']:>14.0f}"
            f"{row['main_peak_rss_mb']:>14.0f}"
        )
    if len(loading) >= 2:
        a, b = loading[0], loading[-1]
        print(
            f"ratio s/batch {a['workers']} vs {b['workers']} workers: "
            f"{a['s_per_batch'] / b['s_per_batch']:.2f}"
        )
    print()
    for mode in ("ram", "disk"):
        base, slope = fits[mode]
        at = base + max(slope, 0.0) * PAPER_SESSIONS  # a flat loader does not shrink
        verdict = "within" if at <= 16e3 else "over"
        print(
            f"{names[mode]}: {base:.0f} MB + {slope:.1f} MB/session -> {at / 1e3:.1f} GB at "
            f"{PAPER_SESSIONS} sessions ({verdict} 16 GB)"
        )
    if len(loading) >= 2 and loading[-1]["workers"] > 0:
        w = loading[-1]["workers"]
        per_worker = (loading[-1]["tree_peak_rss_mb"] - loading[0]["tree_peak_rss_mb"]) / w
        paper = _paper_workers()
        total = loading[0]["tree_peak_rss_mb"] + paper * per_worker
        print(
            f"workers: {per_worker:.0f} MB each (summed RSS); {paper} workers, as params/paper "
            f"sets: about {total / 1e3:.1f} GB for the loader"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s; timings on a shared machine are rough")
    return 0


if __name__ == "__main__":
    sys.exit(main())
