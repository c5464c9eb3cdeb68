"""The README's Python examples run as written, on real PNG files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_transform_examples_run(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3, "README lost its examples"
    namespace: dict = {}
    exec(blocks[0], namespace)  # noqa: S102 - running the README as written is the test; builds net, loss, transforms

    rng = np.random.default_rng(0)
    rgb = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 10:24] = 255
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    transforms = namespace["train_transforms"]
    transforms.set_random_state(seed=1)
    outputs = [
        transforms({"image": str(tmp_path / "image.png"), "label": str(tmp_path / "mask.png")}) for _ in range(6)
    ]
    load = namespace["Compose"](
        [namespace["LoadImaged"](keys="image"), namespace["EnsureChannelFirstd"](keys="image"),
         namespace["ScaleIntensityd"](keys="image")]
    )  # fmt: skip
    clean = load({"image": str(tmp_path / "image.png")})["image"]
    changed = [bool((out["image"] - clean).abs().max() > 1e-6) for out in outputs]
    assert any(changed) and not all(changed), "prob=0.5 should perturb some calls and not others"
    for out in outputs:
        assert isinstance(out["image"], MetaTensor) and (out["image"] - clean).abs().max() <= 0.1 + 1e-6

    image = torch.rand(3, 32, 32)
    label = (torch.rand(1, 32, 32) > 0.5).float()
    images, labels = image[None].repeat(2, 1, 1, 1), label[None].repeat(2, 1, 1, 1)
    namespace.update(image=image, label=label, images=images, labels=labels)
    exec(blocks[1], namespace)  # noqa: S102 - the README example itself
    x_adv = namespace["x_adv"]
    assert x_adv.shape == image.shape and 0.0 <= x_adv.min() and x_adv.max() <= 1.0
    assert abs((x_adv - image).abs().max().item() - 0.1) < 1e-6
    assert namespace["batch_adv"].shape == images.shape
    assert (namespace["batch_adv"] - images).abs().max() <= 0.05 + 1e-6
