"""``--channels_last true``: the bundle's network in channels-last memory, with the same predictions, attacks and
training step as the default format (up to rounding), in 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from monai_adv.attacks import AttackSpec, run_attack
from monai_adv.bundle import check_settings, memory_format
from monai_adv.errors import SettingsError


def _network(bundle, root, **settings):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle.train_json))
    parser.update({"bundle_root": str(root), "features": bundle.tiny_features, "device": "$torch.device('cpu')",
                   **settings})  # fmt: skip
    torch.manual_seed(0)
    return parser.get_parsed_content("network")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_network_matches_the_default_format(bundle, tmp_path, spatial_dims, one_torch_thread):
    expected_format = {2: torch.channels_last, 3: torch.channels_last_3d}[spatial_dims]
    plain = _network(bundle, tmp_path, spatial_dims=spatial_dims)
    fast = _network(bundle, tmp_path, spatial_dims=spatial_dims, channels_last="true")  # as the CLI passes it
    weight = next(p for p in fast.parameters() if p.ndim == spatial_dims + 2)
    assert weight.is_contiguous(memory_format=expected_format) and not weight.is_contiguous()
    assert all(p.is_contiguous() for p in plain.parameters())
    fast.load_state_dict(plain.state_dict())  # a checkpoint of either format loads into the other
    assert weight.is_contiguous(memory_format=expected_format)
    size = (32,) * spatial_dims  # four poolings leave 2 per side
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    labels = (images[:, :1] > 0.5).long()
    torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-5)
    spec = AttackSpec.create(epsilon=2 / 255, loss="ce", num_steps=2, relative_step=0.5)
    attacked = run_attack(fast, images, labels, spec).images
    reference = run_attack(plain, images, labels, spec).images
    # signs of near-zero gradients may flip under rounding: nearly all pixels agree
    assert (attacked - reference).abs().gt(1e-6).float().mean() < 0.01
    # one training step moves both networks alike
    for network in (fast, plain):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(network(images), labels[:, 0])
        loss.backward()
        optimizer.step()
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_settings_are_checked():
    assert memory_format(False, 2) is torch.contiguous_format and memory_format("no", 3) is torch.contiguous_format
    assert memory_format(True, 2) is torch.channels_last and memory_format("true", 3) is torch.channels_last_3d
    with pytest.raises(SettingsError, match="--channels_last must be true or false, got 'fast'"):
        check_settings({"channels_last": "fast"})
    with pytest.raises(SettingsError, match="spatial_dims 2 or 3, got 1"):
        memory_format(True, 1)
