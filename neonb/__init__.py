"""neonb: neonatal brain MRI segmentation and label-efficient studies.

A thin layer over PyTorch and MONAI that reproduces and extends Richter & Fetit (2022),
"Accurate segmentation of neonatal brain MRI with deep learning", Front. Neuroinform.
16:1006532, on the dHCP third release or on a synthetic neonatal cohort that neonb
generates itself.

Importing neonb before torch sets :data:`OMP_DEFAULTS` in the environment, for the variables the
user has not set (see :func:`set_omp_defaults`).
"""

import os
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neonb")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["OMP_DEFAULTS", "__version__", "set_omp_defaults"]

OMP_DEFAULTS: dict[str, str] = {"GOMP_SPINCOUNT": "10000"}
"""How PyTorch's OpenMP threads (libgomp) wait, unless the user says otherwise.

An OpenMP thread that runs out of work spins for ``GOMP_SPINCOUNT`` iterations (libgomp's
default: 300,000) before it sleeps. When another process wants the same cores, that spinning
takes the time slices the other thread of the same step needs, and a step that waits for both
threads many times over slows down by far more than the 1.5 times a fair share of two cores
would give. A shorter spin keeps most of the idle speed and stops the collapse
(``benchmarks/bench_contention.py``; measurements in ``benchmarks/README.md``)."""

OPT_OUT = "NEONB_OMP_DEFAULTS"
"""Set this environment variable to ``0`` to keep libgomp's own defaults."""


def set_omp_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Put :data:`OMP_DEFAULTS` into the environment where the user has set nothing.

    OpenMP reads its environment once, when torch loads it, so this acts only before the first
    ``import torch`` of the process: neonb's command line, a notebook or script that imports
    neonb first, and the data-loading workers (their fork server starts from this environment).
    A spin count is not set when the user chose ``OMP_WAIT_POLICY`` (``GOMP_SPINCOUNT`` would
    override it) and nothing is set when ``NEONB_OMP_DEFAULTS=0``.

    Args:
        environ: the environment to change (default ``os.environ``).

    Returns:
        The variables set.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1") == "0":
        return {}
    chosen = {}
    for key, value in OMP_DEFAULTS.items():
        if key in env or (key == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in env):
            continue
        env[key] = value
        chosen[key] = value
    return chosen


if "torch" not in sys.modules:  # afterwards OpenMP has read its environment already
    set_omp_defaults()
