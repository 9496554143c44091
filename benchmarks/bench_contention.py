"""Benchmark: the demo training step beside one competing CPU-bound process, against it idle.

Each thread setting (the OpenMP environment variables and the number of torch threads) runs in
a fresh Python process, because OpenMP reads its environment once, when torch loads it. That
process times the demo's training step (the network, patch, batch and optimiser of
``params/demo/01_pipeline.yaml``: forward pass, loss, backward pass, AdamW step, on a random
batch) in alternating phases: ``idle`` (nothing else started by this benchmark) and ``busy``
(with one competing process beside it, started before the phase and stopped after it). Each
phase times ``--steps`` steps after one untimed step; ``--rounds`` pairs of phases, and the
table gives the median step of each kind and their ratio, which is what the goal (at most
2.5 times idle) is about, and each setting's idle step against the first setting's.

Competitors (``--competitor``):

* ``spin``: one Python busy loop, one thread that never sleeps (the default);
* ``torch``: a second torch process multiplying matrices on as many threads as torch gives it,
  under the libgomp defaults (what a second neonb process, e.g. ``neonb segment``, did before
  neonb set its defaults).

The step measured is the one :func:`neonb.engine.fit` takes now (channels-last layout, fused
loss); ``--step today`` measures the one it took before (default layout, per-head loss).

Usage:
    .venv/bin/python benchmarks/bench_contention.py                      # all settings
    .venv/bin/python benchmarks/bench_contention.py --settings libgomp,neonb --rounds 4
    .venv/bin/python benchmarks/bench_contention.py --competitor torch --step today
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

OMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")
"""Removed from each child's environment before its setting's variables are added."""

SETTINGS: dict[str, dict[str, str]] = {
    "libgomp": {},
    "neonb": {"<neonb>": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin0": {"GOMP_SPINCOUNT": "0"},
    "1thread": {"<threads>": "1"},
}
"""Settings: environment variables of the child (``<threads>``: ``torch.set_num_threads``;
``<neonb>``: the defaults :mod:`neonb` sets, :data:`neonb.OMP_DEFAULTS`). ``libgomp`` is
PyTorch's OpenMP runtime left at its own defaults, what neonb ran under before."""

SPIN = "while True:\n    pass\n"
TORCH_COMPETITOR = (
    "import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a * 1e-3)\n"
)


def child_env(setting: dict[str, str]) -> dict[str, str]:
    """The environment of a child that measures ``setting``."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if "<neonb>" in setting:
        sys.path.insert(0, str(REPO_ROOT))
        from neonb import OMP_DEFAULTS

        env.update(OMP_DEFAULTS)
    env.update({k: v for k, v in setting.items() if not k.startswith("<")})
    return env


def start_competitor(kind: str) -> subprocess.Popen:
    """One competing CPU-bound process (see the module docstring)."""
    code = SPIN if kind == "spin" else TORCH_COMPETITOR
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    time.sleep(1.0 if kind == "torch" else 0.2)  # let torch load before timing
    return process


def stop(process: subprocess.Popen) -> None:
    """End the competitor this benchmark started."""
    process.terminate()
    process.wait(timeout=30)


# ---------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """Time the demo step in idle and busy phases; print one JSON line."""
    import torch  # first: OpenMP reads the environment the parent gave this process

    from neonb.losses import SegmentationLoss, deep_supervision_weights
    from neonb.models import ModelConfig, build_model, channels_last

    threads = args.threads
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        {"strides": [1, 2, 2, 2, 2], "filters": [8, 16, 32, 64, 128], "deep_supr_num": 2}
    )
    model = build_model(config).train()
    image = torch.randn(2, 2, 48, 48, 48)
    if args.step == "new":
        model = channels_last(model)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    batch = {
        "label": torch.randint(0, 10, (2, 1, 48, 48, 48)).float(),
        "annotation": torch.ones(2, 1, 48, 48, 48),
    }
    loss_fn = SegmentationLoss(deep_supervision_weights(3), fused=args.step == "new")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step() -> float:
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), batch)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - tick

    times: dict[str, list[float]] = {"idle": [], "busy": []}
    for _ in range(args.rounds):
        for phase in ("idle", "busy"):
            competitor = start_competitor(args.competitor) if phase == "busy" else None
            try:
                step()
                times[phase] += [step() for _ in range(args.steps)]
            finally:
                if competitor is not None:
                    stop(competitor)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "idle": statistics.median(times["idle"]),
                "busy": statistics.median(times["busy"]),
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------------------------- parent


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run the child for setting ``name``; its medians."""
    setting = SETTINGS[name]
    command = [
        sys.executable,
        __file__,
        "--child",
        "--steps",
        str(args.steps),
        "--rounds",
        str(args.rounds),
        "--competitor",
        args.competitor,
        "--step",
        args.step,
        "--threads",
        setting.get("<threads>", "0"),
    ]
    done = subprocess.run(
        command, env=child_env(setting), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"setting {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(name: str) -> str:
    """The setting's variables as ``KEY=value`` words."""
    setting = dict(SETTINGS[name])
    if "<neonb>" in setting:
        sys.path.insert(0, str(REPO_ROOT))
        from neonb import OMP_DEFAULTS

        setting.pop("<neonb>")
        setting.update(OMP_DEFAULTS)
    if "<threads>" in setting:
        setting["torch threads"] = setting.pop("<threads>")
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "(libgomp defaults)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, the first the reference; of {', '.join(SETTINGS)}",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle/busy pairs of phases")
    parser.add_argument("--competitor", choices=("spin", "torch"), default="spin")
    parser.add_argument("--step", choices=("new", "today"), default="new")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every setting and print the table."""
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    started = time.perf_counter()
    names = args.settings.split(",")
    print(
        f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; load average at start: "
        f"{load_average()}; step: {args.step}; competitor: {args.competitor}; "
        f"{args.rounds} rounds x {args.steps} steps per phase",
        flush=True,
    )
    results = {}
    for name in names:
        results[name] = measure(name, args)
        r = results[name]
        print(f"  {name}: idle {r['idle']:.3f} s, busy {r['busy']:.3f} s", file=sys.stderr)
    base = results[names[0]]["idle"]
    rows = [["setting", "threads", "idle_s", "busy_s", "busy/idle", "idle/ref", "variables"]]
    for name in names:
        r = results[name]
        rows.append(
            [
                name,
                str(r["threads"]),
                f"{r['idle']:.3f}",
                f"{r['busy']:.3f}",
                f"{r['busy'] / r['idle']:.2f}",
                f"{r['idle'] / base:.2f}",
                describe(name),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    print("\n".join(lines))
    print(
        f"busy/idle: median step beside one competing process / median step idle (goal <= 2.5); "
        f"idle/ref: idle step / {names[0]}'s idle step"
    )
    print(f"load average at end: {load_average()}; total {time.perf_counter() - started:.0f} s")
    return 0


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
