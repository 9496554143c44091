"""Tests of neonb.norms: centile curves of tissue volume against age, export and segment."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_model import tiny_cohort, tiny_run

from neonb import data, norms
from neonb.cli import main
from neonb.errors import ConfigError, DataError, NeonbWarning
from neonb.export import export_run, write_norms
from neonb.labels import TISSUE_LABELS, short_names
from neonb.norms import NORMS_FILE, fit_norms, load_norms, save_norms
from neonb.segmentation import output_prefix, segment_batch, segment_scan
from neonb.splits import write_splits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _volumes(n=60, seed=0, tissues=("WM", "CSF"), ages=(28.0, 44.0)) -> pd.DataFrame:
    """A cohort whose volumes grow with age: ``base + 4 (age - 36) + 0.1 (age - 36)²``,
    plus uniform noise of half-width 6 mL (so the true median is the curve itself)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = rng.uniform(*ages)
        for base, tissue in zip((100.0, 40.0), tissues, strict=False):
            volume = base + 4 * (age - 36) + 0.1 * (age - 36) ** 2 + rng.uniform(-6, 6)
            rows.append(
                {"participant_id": f"p{i}", "session_id": "1", "scan_age": age,
                 "preterm": False, "tissue": tissue, "volume_ml": volume}
            )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fitted():
    return fit_norms(_volumes(), source={"description": "test"})


def test_fitted_median_follows_the_cohort_and_centiles_read_it_as_50(fitted):
    for age in (29.0, 36.0, 43.0):
        true_median = 100 + 4 * (age - 36) + 0.1 * (age - 36) ** 2
        on_median = float(np.interp(0.5, fitted.quantiles, fitted.curves("WM", [age])[0]))
        assert on_median == pytest.approx(true_median, abs=3.0)  # noise half-width 6
        read = fitted.centile("WM", age, on_median)
        assert read.centile == pytest.approx(50.0) and read.text == "50.0" and read.note == ""
        assert read.median_ml == pytest.approx(on_median)
    # the 3rd-97th band spans about the noise's 94 % (11.3 mL of 12), not far more or less
    band = np.diff(fitted.curves("WM", [36.0])[0][[0, -1]])[0]
    assert 8.0 < band < 15.0


def test_centiles_are_monotone_in_volume_and_clipped_outside_the_curves(fitted):
    volumes = np.linspace(60, 140, 401)
    read = [fitted.centile("WM", 36.0, float(v)) for v in volumes]
    centiles = np.array([r.centile for r in read])
    assert np.all(np.diff(centiles) >= 0) and centiles.min() == 3 and centiles.max() == 97
    assert read[0].text == "<3" and read[-1].text == ">97"
    inside = [(float(r.text), r.centile) for r in read if 3 < r.centile < 97]
    assert inside and all(text == pytest.approx(c, abs=0.05) for text, c in inside)


def test_crossing_curves_are_sorted():
    crossing = norms.Norms(
        quantiles=(0.25, 0.5, 0.75), degree=1, age_centre_weeks=36.0,
        age_range_weeks=(30.0, 42.0),
        coefficients={"WM": np.array([[10.0, 1.0], [11.0, 0.0], [12.0, -1.0]])},
        n_sessions=30, n_participants=30,
    )  # fmt: skip
    curves = crossing.curves("WM", [30.0, 36.0, 42.0])
    assert np.all(np.diff(curves, axis=1) >= 0)
    centiles = [crossing.centile("WM", 41.0, v).centile for v in np.linspace(5, 20, 50)]
    assert np.all(np.diff(centiles) >= 0)


def test_no_centile_outside_the_age_range_or_for_other_classes(fitted):
    low, high = fitted.age_range_weeks
    assert fitted.centile("WM", low, 100.0).note == ""  # the ends are in range
    for age in (low - 0.5, high + 0.5, math.nan):
        read = fitted.centile("WM", age, 100.0)
        assert math.isnan(read.centile) and math.isnan(read.median_ml) and read.text == "n/a"
        if math.isfinite(age):
            assert "outside the norms' age range" in read.note
    assert fitted.centile("BG", 36.0, 1.0).note == "no norm for this class"


def test_norms_round_trip_through_json(fitted, tmp_path):
    path = save_norms(fitted, tmp_path)
    assert path == tmp_path / NORMS_FILE
    stored = json.loads(path.read_text())
    assert stored["quantiles"] == list(norms.QUANTILES) and stored["degree"] == norms.DEGREE
    assert stored["n_sessions"] == 60 and "QuantReg" in stored["method"]
    assert "not clinical norms" in stored["caveat"] and norms.REAL_NORMS_NEED in stored["caveat"]
    loaded = load_norms(tmp_path)
    assert loaded.age_range_weeks == fitted.age_range_weeks and loaded.tissues == ["WM", "CSF"]
    ages = np.linspace(*fitted.age_range_weeks, 7)
    np.testing.assert_allclose(loaded.curves("CSF", ages), fitted.curves("CSF", ages))
    assert loaded.centile("WM", 37.0, 104.0) == fitted.centile("WM", 37.0, 104.0)
    assert load_norms(tmp_path / "nowhere") is None


def test_broken_norms_files_are_refused_naming_the_file(fitted, tmp_path):
    path = save_norms(fitted, tmp_path)
    good = json.loads(path.read_text())
    for broken in (
        "{not json",
        json.dumps({**good, "format": "other"}),
        json.dumps({**good, "format_version": 99}),
        json.dumps({**good, "quantiles": [0.5, 0.1]}),
        json.dumps({**good, "age_range_weeks": [44, 30]}),
        json.dumps({**good, "tissues": {"WM": {"coefficients": [[1, 2]]}}}),
    ):
        path.write_text(broken)
        with pytest.raises(DataError, match=NORMS_FILE):
            load_norms(tmp_path)


def test_fit_refuses_what_it_cannot_fit():
    volumes = _volumes(n=10)
    with pytest.raises(DataError, match="needs at least 20"):
        fit_norms(volumes, path="v.tsv")
    with pytest.raises(DataError, match="lacks the column"):
        fit_norms(_volumes().drop(columns="scan_age"))
    bad = _volumes().astype({"volume_ml": object})
    bad.loc[3, "volume_ml"] = "lots"
    with pytest.raises(DataError, match="'lots'.* is not a finite number"):
        fit_norms(bad)
    with pytest.raises(DataError, match="same scan age"):
        fit_norms(_volumes(ages=(40.0, 40.0)))
    with pytest.raises(ConfigError, match="median"):
        fit_norms(_volumes(), quantiles=(0.1, 0.9))


def test_synthetic_norms_say_so():
    caveat = fit_norms(_volumes(), synthetic=True).caveat
    assert "synthetic cohort" in caveat and "not clinical norms" in caveat


# --------------------------------------------------------------------------------------
# Export and segment
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), seed=3)


@pytest.fixture(scope="module")
def manifest(cohort):
    return data.read_manifest(cohort, progress=False)


@pytest.fixture(scope="module")
def run_dir(manifest, tmp_path_factory):
    run = tiny_run(manifest, tmp_path_factory.mktemp("run"))
    return run


@pytest.fixture(scope="module")
def model_dirs(run_dir, cohort, manifest, tmp_path_factory):
    """A model without norms and the same with norms around the cohort's ages."""
    with pytest.warns(NeonbWarning, match="no norms written.*needs at least 20"):
        plain = export_run(run_dir, tmp_path_factory.mktemp("plain") / "m", data_root=cohort)
    with_norms = tmp_path_factory.mktemp("norms") / "m"
    shutil.copytree(plain, with_norms)
    ages = manifest["scan_age"].astype(float)
    volumes = _volumes(n=30, ages=(ages.min() - 2, ages.max() + 2))
    volumes = pd.concat(
        [volumes.assign(tissue=t) for t in short_names(TISSUE_LABELS) if t != "BS"]
    ).drop_duplicates(["participant_id", "tissue"])
    write_norms(with_norms, volumes, source={"description": "crafted"})
    return plain, with_norms


def test_export_fits_norms_on_the_cohort_without_its_test_sessions(
    run_dir, cohort, manifest, tmp_path, monkeypatch
):
    monkeypatch.setattr(norms, "MIN_SESSIONS", 3)
    run = tmp_path / "results" / "01_pipeline" / "run-0"
    shutil.copytree(run_dir, run)
    splits = manifest[["participant_id", "session_id", "scan_age"]].assign(split="train")
    splits.loc[splits.index[-1], "split"] = "test"
    write_splits(splits, tmp_path / "results" / "splits_pipeline.tsv")
    out = export_run(run, tmp_path / "model", data_root=cohort)
    fitted = load_norms(out)
    assert fitted.n_sessions == len(manifest) - 1 and fitted.synthetic
    assert "synthetic cohort" in fitted.caveat and "test sessions" in fitted.source["sessions"]
    ages = manifest["scan_age"].astype(float).iloc[:-1]
    assert fitted.age_range_weeks == (ages.min(), ages.max())
    assert fitted.tissues == short_names(TISSUE_LABELS)


def test_export_cli_takes_a_volume_table_and_drops_stale_norms(run_dir, cohort, tmp_path):
    tsv = tmp_path / "tissue_volumes.tsv"
    _volumes(n=25).to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "model"
    args = ["export", str(run_dir), "--out", str(out), "--data-root", str(cohort)]
    assert main([*args, "--norms", str(tsv)]) == 0
    fitted = load_norms(out)
    assert fitted.n_sessions == 25 and fitted.source["volumes"] == str(tsv.resolve())
    with pytest.warns(NeonbWarning, match="no norms written"):
        export_run(run_dir, out, data_root=cohort)  # 4 sessions: too few
    assert not (out / NORMS_FILE).exists()  # not the earlier export's, on other data
    tsv.write_text("participant_id\tscan_age\nA\t40\n")
    assert main([*args, "--norms", str(tsv)]) == 1


def _prefix(manifest, i=0) -> tuple[dict[str, Path], str]:
    row = manifest.iloc[i]
    paths = {key: Path(row[key]) for key in ("t1w", "t2w")}
    return paths, output_prefix(paths["t2w"]) + "_desc-neonb"


def test_segment_without_norms_or_age_adds_nothing(model_dirs, manifest, tmp_path):
    plain, with_norms = model_dirs
    paths, prefix = _prefix(manifest)
    for model, age, name in ((plain, 40.0, "plain"), (with_norms, None, "no-age")):
        out = tmp_path / name
        result = segment_scan(
            model, paths["t2w"], out, t1w=paths["t1w"], scan_age=age, device="cpu"
        )
        assert "norms" not in result.outputs and not (out / f"{prefix}_norms.png").exists()
        table = pd.read_csv(out / f"{prefix}_volumes.tsv", sep="\t")
        assert list(table.columns) == ["index", "name", "abbreviation", "volume_ml"]
        assert "Norms" not in json.loads((out / f"{prefix}_dseg.json").read_text())


def test_segment_with_norms_and_age_gives_centiles_and_a_picture(model_dirs, manifest, tmp_path):
    _, with_norms = model_dirs
    fitted = load_norms(with_norms)
    paths, prefix = _prefix(manifest)
    age = float(np.mean(fitted.age_range_weeks))
    out = tmp_path / "out"
    args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"]), "--age", str(age)]
    assert main([*args, "--model", str(with_norms), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / f"{prefix}_norms.png").read_bytes()[:8] == PNG_MAGIC
    table = pd.read_csv(out / f"{prefix}_volumes.tsv", sep="\t", keep_default_na=False)
    assert {"centile", "norm_median_ml", "norm_note"} <= set(table.columns)
    for row in table.itertuples():
        expected = fitted.centile(row.abbreviation, age, row.volume_ml)
        assert row.centile == expected.text and row.norm_note == expected.note
    assert (table["abbreviation"] == "BS").any()
    assert table.set_index("abbreviation").loc["BS", "norm_note"] == "no norm for this class"
    sidecar = json.loads((out / f"{prefix}_dseg.json").read_text())
    assert sidecar["Norms"]["Caveat"] == fitted.caveat and sidecar["Norms"]["ScanAgeWeeks"] == age

    far = segment_scan(
        with_norms, paths["t2w"], tmp_path / "far", t1w=paths["t1w"],
        scan_age=fitted.age_range_weeks[1] + 5, device="cpu",
    )  # fmt: skip
    tissues = far.volumes[far.volumes["abbreviation"] == "WM"].iloc[0]
    assert tissues["centile"] == "n/a" and "outside the norms' age range" in tissues["norm_note"]
    assert far.outputs["norms"].is_file()  # the volumes are still drawn, beyond the curves


def test_batch_with_norms_gathers_centiles_and_resumes(model_dirs, manifest, tmp_path):
    _, with_norms = model_dirs
    tsv = tmp_path / "batch.tsv"
    rows = manifest.iloc[:2][["participant_id", "session_id", "t2w", "t1w", "scan_age"]]
    rows.to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "out"
    result = segment_batch(with_norms, tsv, out, device="cpu", progress=False)
    assert list(result.summary["status"]) == ["done", "done"]
    gathered = pd.read_csv(result.tables["volumes"], sep="\t")
    assert {"volume_ml_WM", "centile_WM", "centile_CSF"} <= set(gathered.columns)
    assert "centile_BS" not in gathered  # no norm: no column
    assert len(list(out.rglob("*_norms.png"))) == 2
    again = segment_batch(with_norms, tsv, out, device="cpu", progress=False)
    assert list(again.summary["status"]) == ["skipped", "skipped"]


def test_an_oversized_or_too_deep_norms_file_is_refused_naming_it(tmp_path):
    path = tmp_path / NORMS_FILE
    path.write_bytes(b" " * (norms.MAX_NORMS_BYTES + 1))
    with pytest.raises(DataError, match=r"norms\.json.*larger than 1 MiB"):
        load_norms(tmp_path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="not readable JSON"):
        load_norms(tmp_path)
