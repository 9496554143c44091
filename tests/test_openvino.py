"""Tests of the OpenVINO backend: PyTorch's probabilities and labels, chosen as documented."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_model import tiny_cohort, tiny_run

from neonb import data, inference
from neonb.ageunet import AgeHeadConfig, build_ageunet
from neonb.cli import main
from neonb.errors import ConfigError
from neonb.export import calibrate_qc, export_run, load_exported_model
from neonb.metrics import dice_per_class
from neonb.models import ModelConfig, build_model
from neonb.segmentation import segment_batch, segment_scan

pytest.importorskip("openvino")

CPU = torch.device("cpu")
SMALL = ModelConfig(strides=(1, 2, 2, 2), filters=(4, 8, 16, 16), deep_supr_num=1)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_model(SMALL).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cohort = tiny_cohort(tmp_path_factory.mktemp("cohort"), seed=5)
    manifest = data.read_manifest(cohort, progress=False)
    run = tiny_run(manifest, tmp_path_factory.mktemp("run"))
    model = export_run(
        run, tmp_path_factory.mktemp("model") / "tiny", data_root=cohort, calibrate_qc=False
    )
    return model, manifest


def count_compiles(monkeypatch) -> list[int]:
    """A list that grows by one each time an :class:`OpenVINONetwork` is compiled."""
    calls = []
    original = inference.OpenVINONetwork.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(inference.OpenVINONetwork, "__init__", counting)
    return calls


def test_auto_picks_openvino_for_a_plain_network_on_the_cpu(network):
    assert inference.resolve_backend("auto", CPU, network) == "openvino"
    assert inference.resolve_backend("torch", CPU, network) == "torch"
    assert inference.resolve_backend("auto", torch.device("cuda"), network) == "torch"
    compiled = inference.compile_network(network, patch_size=(16, 16, 16), device="cpu")
    assert isinstance(compiled, inference.OpenVINONetwork)
    assert inference.backend_name(compiled) == "openvino"
    assert inference.compile_network(network, patch_size=(16,) * 3, backend="torch") is network


def test_openvino_refuses_what_it_cannot_run(network):
    age_net = build_ageunet(SMALL, AgeHeadConfig(), age_mean=40.0, age_std=2.0)
    assert inference.resolve_backend("auto", CPU, age_net) == "torch"  # its output is a dict
    with pytest.raises(ConfigError, match="AgeUNet has another output"):
        inference.resolve_backend("openvino", CPU, age_net)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        inference.resolve_backend("openvino", torch.device("cuda"), network)
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, openvino"):
        inference.resolve_backend("onnx", CPU, network)


def test_smallest_traced_input_is_two_voxels_at_the_bottleneck(network):
    assert inference._smallest_input(network, (48, 48, 48)) == (16, 16, 16)
    assert inference._smallest_input(network, (8, 32, 12)) == (8, 16, 12)


def test_openvino_gives_pytorchs_probabilities(network):
    """fp32 OpenVINO against fp32 PyTorch on a volume larger than one window, with overlap and
    a partial window at the edge: float rounding only, on every window size it is given."""
    torch.manual_seed(1)
    image = torch.randn(2, 30, 41, 23)
    compiled = inference.compile_network(network, patch_size=(16, 16, 16), device="cpu")
    assert compiled.precision == "f32"
    for patch, batch in (((16, 16, 16), 3), ((24, 24, 16), 1)):
        kwargs = {"patch_size": patch, "overlap": 0.25, "sw_batch_size": batch, "device": "cpu"}
        reference = inference.predict_volume(network, image, **kwargs)
        probs = inference.predict_volume(compiled, image, **kwargs)
        assert probs.shape == reference.shape == (SMALL.out_channels, 30, 41, 23)
        assert torch.allclose(probs, reference, atol=1e-4)
        assert (probs.argmax(0) == reference.argmax(0)).float().mean() > 0.999


def test_a_compiled_network_keeps_the_weights_it_was_compiled_with(network):
    torch.manual_seed(2)
    model = build_model(SMALL).eval()
    image = torch.randn(2, 16, 16, 16)
    compiled = inference.compile_network(model, patch_size=(16, 16, 16), device="cpu")
    before = inference.predict_volume(compiled, image, patch_size=(16, 16, 16), device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    after = inference.predict_volume(compiled, image, patch_size=(16, 16, 16), device="cpu")
    assert torch.equal(before, after)
    assert model.training is False


def test_segment_records_the_backend_and_both_agree(model_dir, tmp_path):
    model_path, manifest = model_dir
    row = manifest.iloc[0]
    labels = {}
    for backend in ("torch", "openvino"):
        result = segment_scan(
            model_path, row["t2w"], tmp_path / backend, t1w=row["t1w"], device="cpu",
            amp=False, backend=backend,
        )  # fmt: skip
        sidecar = json.loads(result.outputs["sidecar"].read_text())
        assert sidecar["InferenceBackend"] == backend
        assert sidecar["InferencePrecision"] == "fp32"
        labels[backend] = np.asarray(nib.load(result.outputs["dseg"]).dataobj)
    dice = dice_per_class(labels["openvino"], labels["torch"], num_classes=10)
    present = [d for d in dice if not np.isnan(d)]
    assert min(present) > 0.99


def test_neonb_segment_runs_on_openvino_on_the_cpu_by_default(model_dir, tmp_path):
    model_path, manifest = model_dir
    row = manifest.iloc[0]
    out = tmp_path / "default"
    args = ["--t2", row["t2w"], "--t1", row["t1w"], "--model", str(model_path), "--out", str(out)]
    assert main(["segment", *args, "--device", "cpu", "--precision", "fp32"]) == 0
    (sidecar,) = out.rglob("*_dseg.json")
    assert json.loads(sidecar.read_text())["InferenceBackend"] == "openvino"


def test_a_batch_compiles_the_network_once(model_dir, tmp_path, monkeypatch):
    model_path, manifest = model_dir
    calls = count_compiles(monkeypatch)
    table = manifest[["participant_id", "session_id", "scan_age", "t2w", "t1w"]].iloc[:3]
    tsv = tmp_path / "batch.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    result = segment_batch(
        model_path, tsv, tmp_path / "out", device="cpu", progress=False, backend="openvino"
    )
    assert (result.summary["status"] == "done").all()
    assert len(calls) == 1
    model = load_exported_model(model_path)
    assert model.network("auto", "cpu") is model.network("auto", "cpu")


def test_qc_calibration_runs_on_the_backend_given_and_scores_as_pytorch(
    model_dir, tmp_path, monkeypatch
):
    model_path = shutil.copytree(model_dir[0], tmp_path / "model")  # calibrating writes to it
    manifest = model_dir[1]
    table = manifest[["participant_id", "session_id", "scan_age", "t2w", "t1w"]].iloc[:2]
    sessions = tmp_path / "sessions.tsv"
    table.to_csv(sessions, sep="\t", index=False)
    scores = {
        backend: calibrate_qc(model_path, sessions, device="cpu", amp=False, backend=backend)[
            "scores"
        ]
        for backend in ("torch", "openvino")
    }
    assert scores["openvino"].keys() == scores["torch"].keys()
    for name, score in scores["torch"].items():
        assert scores["openvino"][name] == pytest.approx(score, abs=1e-3)
    calls = count_compiles(monkeypatch)
    calibrate_qc(model_path, sessions, device="cpu", amp=False, backend="openvino")
    assert len(calls) == 1  # one network for both sessions


def test_every_network_compiles_on_the_one_core_of_the_process(network, monkeypatch):
    import openvino as ov

    made = []

    class CountingCore(ov.Core):
        def __init__(self):
            made.append(1)
            super().__init__()

    monkeypatch.setattr(ov, "Core", CountingCore)
    inference.openvino_core.cache_clear()
    try:
        first = inference.OpenVINONetwork(network, patch_size=(16, 16, 16))
        second = inference.OpenVINONetwork(network, patch_size=(16, 16, 16))
        assert len(made) == 1  # a Core per network left freed signal stacks behind (issue 16)
        x = torch.randn(1, 2, 16, 16, 16)
        torch.testing.assert_close(first(x), second(x))
    finally:
        inference.openvino_core.cache_clear()
