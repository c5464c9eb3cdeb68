"""Tests of the dictionary transforms FGSMd and InvFGSMd."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, ScaleIntensityd

from monai_adv.transforms import FGSM, FGSMD, FGSMd, FGSMDict, GradientSignd, InvFGSM, InvFGSMD, InvFGSMd, InvFGSMDict


@pytest.fixture
def net(make_tiny_net):
    return make_tiny_net(seed=41).eval()


@pytest.fixture
def sample(make_square_data):
    images, mask = make_square_data(batch=2, size=16, seed=41)
    return {"image": images[0], "image2": images[1], "label": mask[0], "name": "case_0"}


def snapshot(data: dict) -> dict:
    return {
        k: (v, v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
        for k, v in data.items()
    }


def assert_unmodified(data: dict, snap: dict) -> None:
    assert data.keys() == snap.keys()
    for key, (obj, copy) in snap.items():
        assert data[key] is obj, f"{key} was replaced in the input dict"
        if isinstance(obj, torch.Tensor):
            torch.testing.assert_close(obj, copy, rtol=0, atol=0, equal_nan=True, msg=f"{key} was modified in place")
        elif isinstance(obj, np.ndarray):
            np.testing.assert_array_equal(obj, copy)  # NaN-aware


@pytest.mark.parametrize("cls,array_cls,sign", [(FGSMd, FGSM, 1.0), (InvFGSMd, InvFGSM, -1.0)])
def test_matches_array_transform_and_reference(net, sample, cls, array_cls, sign, make_dicece, reference_fgsm):
    snap = snapshot(sample)
    t = cls(keys="image", network=net, loss_function=make_dicece(), epsilon=0.1)
    out = t(sample)
    assert_unmodified(sample, snap)
    assert out is not sample
    assert out["label"] is sample["label"] and out["image2"] is sample["image2"] and out["name"] == "case_0"
    expected = reference_fgsm(net, make_dicece(), sample["image"][None], sample["label"][None], 0.1, sign)[0]
    assert torch.equal(out["image"], expected)
    assert torch.equal(out["image"], array_cls(net, make_dicece(), epsilon=0.1)(sample["image"], sample["label"]))
    assert isinstance(t.attack, array_cls)
    assert set(t.last_stats) == {"epsilon", "loss_before", "loss_after"}


def test_aliases():
    assert FGSMD is FGSMd and FGSMDict is FGSMd
    assert InvFGSMD is InvFGSMd and InvFGSMDict is InvFGSMd
    assert issubclass(FGSMd, GradientSignd) and issubclass(InvFGSMd, GradientSignd)


def test_in_compose_with_ordinary_transforms_metatensor(net, sample, make_dicece, reference_fgsm):
    affine = torch.diag(torch.tensor([0.8, 0.8, 1.0, 1.0], dtype=torch.float64))
    raw = MetaTensor(sample["image"] * 1000 + 50, affine=affine, meta={"filename_or_obj": "img_007.nii.gz"})
    data = {"image": raw, "label": (sample["label"] * 1).to(torch.uint8)}
    snap = snapshot(data)
    pipeline = Compose(
        [
            EnsureTyped(keys=["image", "label"], dtype=torch.float32),
            ScaleIntensityd(keys="image"),
            FGSMd(keys="image", label_key="label", network=net, loss_function=make_dicece(), epsilon=0.05),
        ]
    )
    out = pipeline(data)
    assert_unmodified(data, snap)
    image = out["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert image.meta["filename_or_obj"] == "img_007.nii.gz"
    assert torch.equal(image.affine, affine)
    scaled = Compose([EnsureTyped(keys=["image", "label"], dtype=torch.float32), ScaleIntensityd(keys="image")])(data)
    expected = reference_fgsm(
        net, make_dicece(), scaled["image"].as_tensor()[None], scaled["label"].as_tensor()[None], 0.05, 1.0
    )[0]
    assert torch.equal(image.as_tensor(), expected)
    assert image.min() >= 0 and image.max() <= 1


def test_numpy_dict_keeps_types(net, sample, make_dicece):
    data = {"image": sample["image"].numpy().astype(np.float64), "label": sample["label"].numpy().astype(np.uint8)}
    out = FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=0.1)(data)
    assert isinstance(out["image"], np.ndarray) and out["image"].dtype == np.float64
    assert out["label"] is data["label"]
    assert np.abs(out["image"] - data["image"]).max() == pytest.approx(0.1, abs=1e-6)


def test_batched_dictionary(net, make_square_data, make_dicece, reference_fgsm):
    images, mask = make_square_data(batch=3, size=16, seed=42)
    out = InvFGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=0.1, batched=True)(
        {"image": images, "label": mask}
    )
    assert torch.equal(out["image"], reference_fgsm(net, make_dicece(), images, mask, 0.1, -1.0))


def test_prob_zero_leaves_data_untouched(net, sample, make_dicece):
    snap = snapshot(sample)
    t = FGSMd(keys=["image", "image2"], network=net, loss_function=make_dicece(), epsilon=0.1, prob=0.0)
    for _ in range(5):
        out = t(sample)
        assert out.keys() == sample.keys()
        for key in sample:
            assert out[key] is sample[key]
        assert t.last_stats == {}
    assert_unmodified(sample, snap)


def _perturbed_pattern(t, sample, calls):
    pattern, outputs = [], []
    for _ in range(calls):
        out = t(sample)
        changed = out["image"] is not sample["image"]
        if changed:
            assert not torch.equal(out["image"], sample["image"])
        else:
            assert torch.equal(out["image"], sample["image"])
        pattern.append(changed)
        outputs.append(out["image"])
    return pattern, outputs


def test_prob_half_is_reproducible_and_mixed(net, sample, make_dicece):
    def make(seed):
        t = FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=(0.01, 0.1), prob=0.5)
        assert t.set_random_state(seed) is t
        return t

    pattern_a, outputs_a = _perturbed_pattern(make(123), sample, 24)
    pattern_b, outputs_b = _perturbed_pattern(make(123), sample, 24)
    assert pattern_a == pattern_b
    assert all(torch.equal(a, b) for a, b in zip(outputs_a, outputs_b))
    assert 0 < sum(pattern_a) < len(pattern_a)
    pattern_c, _ = _perturbed_pattern(make(321), sample, 24)
    assert pattern_c != pattern_a


def test_compose_set_random_state_reaches_the_transform(net, sample, make_dicece):
    def run(seed):
        pipeline = Compose(
            [FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=(0.0, 0.2), prob=0.5)]
        )
        pipeline.set_random_state(seed)
        return [pipeline(sample)["image"] for _ in range(8)]

    assert all(torch.equal(a, b) for a, b in zip(run(5), run(5)))


def test_epsilon_range_sampled_per_call_and_shared_across_keys(net, sample, make_dicece):
    low, high = 0.02, 0.2
    t = FGSMd(keys=["image", "image2"], network=net, loss_function=make_dicece(), epsilon=(low, high), clamp="none")
    t.set_random_state(0)
    epsilons = []
    for _ in range(8):
        out = t(sample)
        eps = float(t.last_stats["epsilon"])
        assert low <= eps <= high
        for key in ("image", "image2"):
            delta = (out[key] - sample[key]).abs()
            assert delta.max().item() == pytest.approx(eps, abs=1e-6)
            assert delta.min().item() == pytest.approx(eps, abs=1e-6)
        epsilons.append(eps)
    assert len({round(e, 6) for e in epsilons}) == len(epsilons)


def test_fixed_epsilon_is_used_every_call(net, sample, make_dicece):
    t = FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=0.07, clamp="none")
    for _ in range(3):
        out = t(sample)
        assert float(t.last_stats["epsilon"]) == pytest.approx(0.07)
        assert (out["image"] - sample["image"]).abs().max().item() == pytest.approx(0.07, abs=1e-6)


def test_missing_image_key(net, sample, make_dicece):
    data = {"label": sample["label"], "image": sample["image"]}
    with pytest.raises(KeyError, match="image2"):
        FGSMd(keys=["image", "image2"], network=net, loss_function=make_dicece())(data)
    only_label = {"label": sample["label"]}
    out = FGSMd(keys="image", network=net, loss_function=make_dicece(), allow_missing_keys=True)(only_label)
    assert out == only_label and out["label"] is only_label["label"]
    out = FGSMd(keys=["image", "image2"], network=net, loss_function=make_dicece(), allow_missing_keys=True)(data)
    assert "image2" not in out and not torch.equal(out["image"], data["image"])


def test_missing_label_key(net, sample, make_dicece):
    data = {"image": sample["image"], "label": sample["label"]}
    with pytest.raises(KeyError, match="seg"):
        FGSMd(keys="image", label_key="seg", network=net, loss_function=make_dicece())(data)


def test_error_leaves_input_untouched(net, sample, make_dicece):
    bad = sample["image2"].clone()
    bad[0, 0, 0] = math.nan
    data = {"image": sample["image"], "image2": bad, "label": sample["label"]}
    snap = snapshot(data)
    with pytest.raises(ValueError, match="NaN"):
        FGSMd(keys=["image", "image2"], network=net, loss_function=make_dicece())(data)
    assert_unmodified(data, snap)


def test_shape_mismatch_and_bad_label(net, sample, make_dicece):
    with pytest.raises(ValueError) as info:
        FGSMd(keys="image", network=net, loss_function=make_dicece())(
            {"image": sample["image"], "label": sample["label"][:, :8]}
        )
    assert "8, 16" in str(info.value) and "16, 16" in str(info.value)
    with pytest.raises(ValueError, match="class indices"):
        FGSMd(keys="image", network=net, loss_function=make_dicece())(
            {"image": sample["image"], "label": sample["label"] * 255}
        )


@pytest.mark.parametrize("epsilon", [-0.01, math.nan, (0.3, 0.1)])
def test_bad_epsilon_at_construction(net, epsilon, make_dicece):
    with pytest.raises(ValueError, match="epsilon"):
        FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=epsilon)


def test_bad_construction_arguments(net, make_dicece):
    with pytest.raises(ValueError, match="prob"):
        FGSMd(keys="image", network=net, loss_function=make_dicece(), prob=1.5)
    with pytest.raises(ValueError, match="label_key"):
        InvFGSMd(keys=["image", "label"], label_key="label", network=net, loss_function=make_dicece())


def test_integer_image_and_no_network(net, sample, make_dicece):
    with pytest.raises(TypeError, match="floating point"):
        FGSMd(keys="image", network=net, loss_function=make_dicece())(
            {"image": (sample["image"] * 255).to(torch.uint8), "label": sample["label"]}
        )
    t = FGSMd(keys="image", loss_function=make_dicece())
    with pytest.raises(RuntimeError, match="network"):
        t(sample)
    t.network = net
    assert t.attack.network is net and t.network is net
    loss = make_dicece()
    t.loss_function = loss
    assert t.attack.loss_function is loss
    assert not torch.equal(t(sample)["image"], sample["image"])


# ------------------------------------------------------------------------------------------ public surface, workers


def test_public_surface_for_the_handler(net, make_dicece):
    t = FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=(0.05, 0.1), prob=0.5, batched=True)
    assert (t.method, InvFGSMd(keys="image").method) == ("fgsm", "invfgsm")
    assert t.params == {"epsilon": [0.05, 0.1], "num_steps": 1, "prob": 0.5, "clamp": "range"}
    assert t.batched and t.single_step and not t.tracks_loss and not t.amp
    t.amp = True
    assert t.amp
    t.set_random_state(seed=0)
    draws = []
    for _ in range(20):
        t.randomize()
        draws.append(t.applied)
    assert any(draws) and not all(draws)


def test_perturb_with_gradient_matches_the_call(net, make_square_data, make_dicece):
    images, labels = make_square_data(batch=3, size=16, seed=2)
    t = InvFGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=0.07, batched=True)
    expected = t({"image": images, "label": labels})["image"]
    x = images.clone().requires_grad_(True)
    (3.0 * make_dicece()(net(x), labels)).backward()  # any positive multiple of the loss gives the same signs
    out = t.perturb_with_gradient({"image": images, "label": labels}, {"image": x.grad})
    torch.testing.assert_close(out["image"], expected, rtol=0, atol=1e-6)
    assert t.applied and float(t.last_stats["epsilon"]) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="NaN or Inf"):
        t.perturb_with_gradient({"image": images}, {"image": torch.full_like(images, float("nan"))})
    with pytest.raises(ValueError, match="single step"):
        FGSMd(keys="image", num_steps=3, batched=True).perturb_with_gradient({"image": images}, {"image": x.grad})


def test_empty_batch_is_refused(net, make_dicece):
    t = FGSMd(keys="image", network=net, loss_function=make_dicece(), batched=True)
    with pytest.raises(ValueError, match="empty batch"):
        t({"image": torch.zeros(0, 1, 8, 8), "label": torch.zeros(0, 1, 8, 8)})


class _Items(torch.utils.data.Dataset):
    def __init__(self, transform, images, labels):
        self.transform, self.images, self.labels = transform, images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.transform({"image": self.images[index], "label": self.labels[index]})
        out["warnings"] = [str(w.message) for w in caught]
        return out


def test_warns_once_inside_a_dataloader_worker(net, make_square_data, make_dicece):
    images, labels = make_square_data(batch=3, size=16, seed=1)
    t = FGSMd(keys="image", network=net, loss_function=make_dicece(), epsilon=0.05)
    loader = torch.utils.data.DataLoader(
        _Items(t, images, labels), batch_size=None, num_workers=1, multiprocessing_context="fork"
    )
    messages = [item["warnings"] for item in loader]
    assert len(messages[0]) == 1 and messages[1:] == [[], []]  # once per worker process
    assert "DataLoader worker" in messages[0][0] and "AdversarialAugmentationHandler" in messages[0][0]
    assert "never reach it" in messages[0][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t({"image": images[0], "label": labels[0]})  # the main process: no warning
    assert not [w for w in caught if "DataLoader worker" in str(w.message)]
