"""Tests of neonb's OpenMP defaults (neonb.set_omp_defaults)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from neonb import OMP_DEFAULTS, set_omp_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_sets_what_the_user_left_unset():
    env = {"PATH": "/bin"}
    assert set_omp_defaults(env) == OMP_DEFAULTS
    assert env == {"PATH": "/bin", **OMP_DEFAULTS}


def test_keeps_the_users_choices():
    env = {"GOMP_SPINCOUNT": "7"}
    assert set_omp_defaults(env) == {}
    assert env == {"GOMP_SPINCOUNT": "7"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # a spin count would override the user's policy
    set_omp_defaults(env)
    assert "GOMP_SPINCOUNT" not in env
    env = {"NEONB_OMP_DEFAULTS": "0"}
    assert set_omp_defaults(env) == {}
    assert env == {"NEONB_OMP_DEFAULTS": "0"}


def _spincount_after(code: str, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_importing_neonb_first_sets_the_default_in_a_new_process():
    code = "import os, neonb; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    assert _spincount_after(code) == OMP_DEFAULTS["GOMP_SPINCOUNT"]
    assert _spincount_after(code, GOMP_SPINCOUNT="123") == "123"
