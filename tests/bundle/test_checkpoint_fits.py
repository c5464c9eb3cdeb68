"""A checkpoint of another network size is refused in one error that names the settings to repeat (issue 15, 10)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from monai_adv.bundle import TrainingRun, check_checkpoint_fits
from monai_adv.errors import CheckpointError, MissingFileError

SMALL = (8, 8, 16, 16, 32, 8)


def unet(features=SMALL, in_channels=3, spatial_dims=2):
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, features=features)


@pytest.fixture
def saved(tmp_path):
    """``models/model.pt`` of a small RGB BasicUNet, with the training_run.json a bundle training writes."""
    models = tmp_path / "models"
    run = TrainingRun(models, settings={"features": list(SMALL), "in_channels": 3, "spatial_dims": 2, "image_size": 32})
    run.start()
    run.finish()
    torch.save(unet().state_dict(), models / "model.pt")
    return models / "model.pt"


def test_the_same_network_fits(saved):
    check_checkpoint_fits(unet(), saved)
    check_checkpoint_fits(unet(), {"model": torch.load(saved, weights_only=True)})  # a training checkpoint's entry


def test_other_features_are_named_with_the_recorded_settings(saved):
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_fits(unet(features=(32, 32, 64, 128, 256, 32)), saved)
    message = str(info.value)
    assert message.startswith(f"{saved} was saved from a network of another size: ")
    assert "conv_0.conv_0.conv.weight: checkpoint (8, 3, 3, 3), network (32, 3, 3, 3)" in message
    assert "Its weights have in_channels 3, out_channels 2, spatial_dims 2, first features 8" in message
    assert "--features [8, 8, 16, 16, 32, 8] --in_channels 3 --spatial_dims 2 --image_size 32" in message
    assert "Repeat the training's --features, --in_channels, --out_channels and --spatial_dims" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("network", [unet(in_channels=1), unet(spatial_dims=3)])
def test_other_channels_or_dims_are_refused(saved, network):
    with pytest.raises(CheckpointError, match="another shape"):
        check_checkpoint_fits(network, saved)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match="checkpoint .*nothing.pt does not exist"):
        check_checkpoint_fits(unet(), tmp_path / "nothing.pt")
