"""MONAI's own bundle checks: metadata schema, network input/output, TorchScript export, workflow properties."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

SCHEMA_NAME = "meta_schema_20240725.json"


@pytest.fixture
def schema_copy(bundle, tmp_path):
    """A writable copy of the metadata schema (verify_metadata downloads to --filepath when it is absent)."""
    schema = bundle.shared_dir / "monai-schema" / SCHEMA_NAME
    if not schema.is_file():
        pytest.skip(f"{schema} is absent: verify_metadata would have to download the schema (no network here)")
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema (pip install monai-adv[test])")
    return shutil.copy(schema, tmp_path / SCHEMA_NAME)


def test_metadata_names_the_schema_it_is_checked_against(bundle):
    metadata = json.loads(bundle.metadata_json.read_text())
    assert metadata["schema"].endswith("/" + SCHEMA_NAME)
    network_format = metadata["network_data_format"]
    assert network_format["inputs"]["image"]["num_channels"] == 3
    assert network_format["outputs"]["pred"]["num_channels"] == 2


def test_metadata_cites_its_sources_and_logs_each_version(bundle):
    import monai_adv

    metadata = json.loads(bundle.metadata_json.read_text())
    assert metadata["version"] in metadata["changelog"], "the current version needs a changelog entry"
    assert metadata["required_packages_version"]["monai-adv"] == monai_adv.__version__
    assert "pip install -e ." in metadata["description"], "say how the bundle finds monai-adv"
    references = " ".join(metadata["references"])
    assert "arXiv:2105.12106" in references and "Kvasir-SEG" in references
    data_license = (bundle.bundle_dir / "docs" / "data_license.txt").read_text()
    assert "doi:10.1007/978-3-030-37734-2_37" in data_license and "synthetic" in data_license
    readme = (bundle.bundle_dir / "docs" / "README.md").read_text()
    assert "arXiv:2105.12106" in readme and "data_license.txt" in readme


@pytest.mark.slow
def test_verify_metadata(bundle, schema_copy):
    run = bundle.run("verify_metadata", "--meta_file", bundle.metadata_json, "--filepath", schema_copy)
    assert "metadata is verified with no error" in run.output, run.describe()
    assert "Downloading" not in run.output


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_verify_metadata_rejects_a_broken_file(bundle, schema_copy, tmp_path):
    """The same check in-process, on a copy without "version": the schema is really applied."""
    from monai.bundle import verify_metadata

    metadata = json.loads(bundle.metadata_json.read_text())
    del metadata["version"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(Exception, match="'version' is a required property"):
        verify_metadata(meta_file=str(broken), filepath=str(schema_copy))


@pytest.mark.slow
def test_verify_net_in_out(bundle):
    run = bundle.run(
        "verify_net_in_out", "--net_id", "network_def", "--meta_file", bundle.metadata_json,
        "--config_file", bundle.inference_json, *bundle.overrides({"features": [4, 4, 8, 8, 16, 4]}),
    )  # fmt: skip
    assert "data shape of network is verified with no error" in run.output, run.describe()


@pytest.mark.slow
def test_ckpt_export_gives_torchscript_equal_to_the_eager_network(bundle, trained_bundle, tmp_path):
    exported = tmp_path / "model.ts"
    checkpoint = trained_bundle.root / "models" / "model.pt"
    bundle.run(
        "ckpt_export", "--net_id", "network_def", "--filepath", exported, "--ckpt_file", checkpoint,
        "--meta_file", bundle.metadata_json, "--config_file", bundle.inference_json,
        *bundle.overrides(bundle.tiny_net),
    )  # fmt: skip
    extra_files = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra_files)
    metadata = json.loads(bundle.metadata_json.read_text())
    assert json.loads(extra_files["metadata.json"])["version"] == metadata["version"]
    assert json.loads(extra_files["inference.json"])["network_def"]["_target_"] == "monai.networks.nets.BasicUNet"
    eager = bundle.load_tiny_network(checkpoint)
    size = bundle.tiny_image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(images)
        actual = scripted.eval()(images)
    assert actual.shape == (2, 2, size, size)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # the trained weights were exported, not a fresh initialisation
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    scripted_state = scripted.state_dict()
    for name, value in state.items():
        torch.testing.assert_close(scripted_state[name], value, rtol=0, atol=0)


@contextmanager
def properties_workflow(bundle, tmp_path, config_file, workflow_type, **override):
    """The bundle's workflow, initialised, and finalised on leaving (train.json's initialize takes the training's
    lock and SIGTERM handler)."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(config_file), meta_file=str(bundle.metadata_json), workflow_type=workflow_type,
        logging_file=False, bundle_root=str(tmp_path), **override,
    )  # fmt: skip
    workflow.initialize()
    try:
        yield workflow
    finally:
        workflow.finalize()


TRAIN_OVERRIDES = {"features": [4, 4, 8, 8, 16, 4], "image_size": 32, "max_train": 8, "max_val": 4}


def test_train_workflow_has_the_required_properties(bundle, tmp_path, one_torch_thread, restore_determinism):
    from monai.bundle.workflows import BundleWorkflow
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    with properties_workflow(bundle, tmp_path, bundle.train_json, "train", **TRAIN_OVERRIDES) as workflow:
        missing = BundleWorkflow.check_properties(workflow)  # the required part of ConfigWorkflow.check_properties
        assert missing == [], f"missing required properties: {missing}"
        assert isinstance(workflow.trainer, SupervisedTrainer)
        assert isinstance(workflow.evaluator, SupervisedEvaluator)
        assert workflow.max_epochs == 5 and workflow.val_interval == 1
        assert len(workflow.train_dataset) == 8 and len(workflow.val_dataset) == 4


def test_train_workflow_check_properties(bundle, tmp_path, one_torch_thread, restore_determinism):
    with properties_workflow(bundle, tmp_path, bundle.train_json, "train", **TRAIN_OVERRIDES) as workflow:
        missing = workflow.check_properties()
    assert not missing, f"missing or wrongly referenced properties: {missing}"


def test_infer_workflow_check_properties(bundle, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").touch()  # initialize only checks that the checkpoint exists
    images = tmp_path / "data" / "synthetic_2d" / "images"  # the default input_dir (dataset_dir)
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    with properties_workflow(
        bundle, tmp_path, bundle.inference_json, "infer", features=[4, 4, 8, 8, 16, 4]
    ) as workflow:
        missing = workflow.check_properties()
    assert not missing, f"missing or wrongly referenced properties: {missing}"
