"""Tests of the array transforms FGSM and InvFGSM."""

from __future__ import annotations

import gc
import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceLoss
from torch import nn

from monai_adv.attacks import ZeroInputGradientError
from monai_adv.transforms import FGSM, GradientSign, InvFGSM


@pytest.fixture
def net(make_tiny_net):
    return make_tiny_net(seed=31).eval()


@pytest.fixture
def data(make_square_data):
    return make_square_data(batch=2, size=16, seed=31)


# ----------------------------------------------------------------------------------------------
# 1. agreement with an independent reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,sign", [(FGSM, 1.0), (InvFGSM, -1.0)])
def test_batched_matches_reference(make_tiny_net, data, loss_case, cls, sign, reference_fgsm):
    loss_factory = loss_case.make_loss
    net = make_tiny_net(out_channels=loss_case.out_channels, seed=32).eval()
    images, mask = data
    labels = loss_case.labels(mask)
    transform = cls(net, loss_factory(), epsilon=0.08, batched=True)
    out = transform(images, labels)
    expected = reference_fgsm(net, loss_factory(), images, labels, 0.08, sign)
    assert type(out) is torch.Tensor
    assert not torch.equal(out, images)
    assert torch.equal(out, expected)
    assert float(transform.last_stats["epsilon"]) == pytest.approx(0.08)
    with torch.no_grad():
        torch.testing.assert_close(transform.last_stats["loss_before"], loss_factory()(net(images), labels))


@pytest.mark.parametrize("cls,sign", [(FGSM, 1.0), (InvFGSM, -1.0)])
def test_unbatched_matches_reference(make_tiny_net, data, loss_case, cls, sign, reference_fgsm):
    loss_factory = loss_case.make_loss
    net = make_tiny_net(out_channels=loss_case.out_channels, seed=33).eval()
    images, mask = data
    labels = loss_case.labels(mask)
    out = cls(net, loss_factory(), epsilon=0.08)(images[1], labels[1])
    expected = reference_fgsm(net, loss_factory(), images[1:], labels[1:], 0.08, sign)[0]
    assert out.shape == images[1].shape
    assert torch.equal(out, expected)


def test_float64_network_matches_reference_in_float64(make_tiny_net, make_square_data, make_dicece, reference_fgsm):
    net = make_tiny_net(seed=34, dtype=torch.float64).eval()
    images, mask = make_square_data(batch=2, size=16, seed=34, dtype=torch.float64)
    out = FGSM(net, make_dicece(), epsilon=0.0625, batched=True)(images.numpy(), mask.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, reference_fgsm(net, make_dicece(), images, mask, 0.0625, 1.0).numpy())


def test_fgsm_and_inverse_are_opposite(net, data, make_dicece):
    images, mask = data
    up = FGSM(net, make_dicece(), epsilon=0.05, clamp="none")(images[0], mask[0])
    down = InvFGSM(net, make_dicece(), epsilon=0.05, clamp="none")(images[0], mask[0])
    torch.testing.assert_close(up - images[0], -(down - images[0]), rtol=0, atol=1e-6)
    assert FGSM.direction == "ascend" and InvFGSM.direction == "descend"
    assert issubclass(FGSM, GradientSign) and issubclass(InvFGSM, GradientSign)


# ----------------------------------------------------------------------------------------------
# 2. bound and clamping through the transform
# ----------------------------------------------------------------------------------------------


def test_iterative_random_start_bound_and_reproducibility(net, data, make_dicece):
    images, mask = data

    def run(seed):
        t = FGSM(net, make_dicece(), epsilon=0.05, num_steps=4, random_start=True, batched=True)
        t.set_random_state(seed)
        return t(images, mask)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for out in (a, c):
        assert (out - images).abs().max().item() <= 0.05 + 1e-6
        assert out.min().item() >= 0 and out.max().item() <= 1


def test_clamp_image_hounsfield(make_tiny_net, make_dicece):
    net = make_tiny_net(seed=35).eval()
    with torch.no_grad():
        net[0].weight /= 1000  # so that HU values do not saturate the network
    gen = torch.Generator().manual_seed(35)
    image = torch.rand(1, 16, 16, generator=gen) * 2000 - 1000
    image[0, 0, :2] = torch.tensor([-1000.0, 1000.0])
    label = (image > 0).float()
    for cls in (FGSM, InvFGSM):
        out = cls(net, make_dicece(), epsilon=10.0, clamp="image")(image, label)
        assert out.min() >= image.min() and out.max() <= image.max()
        assert (out - image).abs().max().item() <= 10.0 + 1e-3
        assert (out - image).abs().max().item() >= 10.0 - 1e-3
    with pytest.raises(ValueError, match="value_range"):
        FGSM(net, make_dicece(), epsilon=10.0)(image, label)


def test_clamp_none_moves_every_pixel_by_epsilon(net, data, make_dicece):
    images, mask = data
    out = FGSM(net, make_dicece(), epsilon=0.2, clamp="none")(images[0], mask[0])
    torch.testing.assert_close((out - images[0]).abs(), torch.full_like(images[0], 0.2), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 5. types, dtypes, dimensions, metadata
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("batched", [False, True])
def test_2d_3d_batched_unbatched(make_tiny_net, make_square_data, spatial_dims, batched, make_dicece, reference_fgsm):
    net = make_tiny_net(spatial_dims=spatial_dims, seed=36).eval()
    images, mask = make_square_data(batch=2, size=16, spatial_dims=spatial_dims, seed=36)
    img, lab = (images, mask) if batched else (images[0], mask[0])
    out = FGSM(net, make_dicece(), epsilon=0.1, batched=batched)(img, lab)
    assert out.shape == img.shape
    expected = reference_fgsm(
        net, make_dicece(), images if batched else images[:1], mask if batched else mask[:1], 0.1, 1.0
    )
    assert torch.equal(out, expected if batched else expected[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out(net, data, dtype, make_dicece):
    images, mask = data
    img = images[0].numpy().astype(dtype)
    original = img.copy()
    out = FGSM(net, make_dicece(), epsilon=0.1)(img, mask[0].numpy().astype(np.uint8))
    assert isinstance(out, np.ndarray)
    assert out.dtype == dtype and out.shape == img.shape
    np.testing.assert_array_equal(img, original)  # the input is not modified
    assert np.abs(out - img).max() <= 0.1 + 1e-6
    assert np.abs(out - img).max() >= 0.1 - 1e-6


def test_float64_input_with_float32_network_keeps_precision(net, make_dicece):
    img = np.random.RandomState(0).rand(1, 16, 16)
    label = (img > 0.5).astype(np.float64)
    unchanged = FGSM(net, make_dicece(), epsilon=0.0)(img, label)
    assert unchanged.dtype == np.float64
    np.testing.assert_array_equal(unchanged, img)
    out = FGSM(net, make_dicece(), epsilon=0.125, clamp="none")(img, label)
    # float64 rounding of (x + eps) - x only; a float32 round trip would be off by ~1e-8.
    np.testing.assert_allclose(np.abs(out - img), 0.125, rtol=0, atol=1e-15)


def test_torch_float16_in_float16_out(net, data, make_dicece):
    images, mask = data
    img = images[0].half()
    out = FGSM(net, make_dicece(), epsilon=0.1)(img, mask[0])
    assert type(out) is torch.Tensor and out.dtype == torch.float16 and out.device == img.device
    delta = (out.float() - img.float()).abs()
    assert delta.max().item() <= 0.1 + 2**-11  # half an ulp of float16 near 1
    assert delta.max().item() >= 0.1 - 2**-11


def test_metatensor_meta_preserved(net, data, make_dicece, reference_fgsm):
    images, mask = data
    affine = torch.diag(torch.tensor([0.5, 0.7, 1.0, 1.0], dtype=torch.float64))
    img = MetaTensor(images[0].clone(), affine=affine, meta={"filename_or_obj": "case_001.nii.gz", "foo": 3})
    img.applied_operations = [{"class": "Dummy", "id": 1}]
    label = MetaTensor(mask[0].clone(), affine=affine)
    out = FGSM(net, make_dicece(), epsilon=0.1)(img, label)
    assert isinstance(out, MetaTensor)
    assert out.dtype == img.dtype and out.device == img.device
    assert out.meta["filename_or_obj"] == "case_001.nii.gz" and out.meta["foo"] == 3
    assert torch.equal(out.affine, affine)
    assert out.applied_operations == img.applied_operations
    assert torch.equal(img.as_tensor(), images[0])  # input not modified
    assert torch.equal(out.as_tensor(), reference_fgsm(net, make_dicece(), images[:1], mask[:1], 0.1, 1.0)[0])


def test_output_has_no_graph_and_input_not_modified(net, data, make_dicece):
    images, mask = data
    img = images[0].clone()
    t = FGSM(net, make_dicece(), epsilon=0.1, return_loss_after=True)
    out = t(img, mask[0])
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(img, images[0])
    for key in ("epsilon", "loss_before", "loss_after"):
        assert t.last_stats[key].grad_fn is None and not t.last_stats[key].requires_grad
    assert t.last_stats["loss_after"] > t.last_stats["loss_before"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_input_with_cuda_network_returns_cpu(make_tiny_net, data, make_dicece):
    net = make_tiny_net(seed=31).eval().cuda()
    images, mask = data
    out = FGSM(net, make_dicece(), epsilon=0.1)(images[0], mask[0])
    assert out.device.type == "cpu"
    assert (out - images[0]).abs().max().item() == pytest.approx(0.1, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. repeated calls do not accumulate memory
# ----------------------------------------------------------------------------------------------


def _live_tensors() -> int:
    gc.collect()
    # type() rather than isinstance(): isinstance can trip lazy module proxies found among gc objects
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.parametrize(
    "cls,kwargs",
    [(FGSM, {"num_steps": 2, "random_start": True, "return_loss_after": True}), (InvFGSM, {})],
)
def test_repeated_calls_do_not_accumulate_tensors(net, data, cls, kwargs, make_dicece):
    images, mask = data
    t = cls(net, make_dicece(), epsilon=(0.01, 0.1), **kwargs)
    img, label = images[0], mask[0]
    for _ in range(20):  # warm-up
        out = t(img, label)
    del out
    baseline = _live_tensors()
    outputs_alive = []
    for _ in range(300):
        out = t(img, label)
        outputs_alive.append(out.grad_fn is None)
    del out
    assert all(outputs_alive)
    assert _live_tensors() <= baseline + 5


# ----------------------------------------------------------------------------------------------
# 7. bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [-0.1, math.nan, math.inf, (0.2, 0.1), (-0.1, 0.1), (0.0, math.nan)])
def test_bad_epsilon_at_construction(net, epsilon, make_dicece):
    with pytest.raises(ValueError, match="epsilon"):
        FGSM(net, make_dicece(), epsilon=epsilon)


@pytest.mark.parametrize("epsilon", ["0.1", (0.1, 0.2, 0.3), True])
def test_badly_typed_epsilon(net, epsilon, make_dicece):
    with pytest.raises(TypeError, match="epsilon"):
        InvFGSM(net, make_dicece(), epsilon=epsilon)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_image(net, data, bad, make_dicece):
    images, mask = data
    img = images[0].clone()
    img[0, 5, 5] = bad
    with pytest.raises(ValueError, match="NaN"):
        FGSM(net, make_dicece())(img, mask[0])
    with pytest.raises(ValueError, match="NaN"):
        FGSM(net, make_dicece())(img.numpy(), mask[0].numpy())


def test_shape_mismatch(net, data, make_dicece):
    images, mask = data
    with pytest.raises(ValueError) as info:
        FGSM(net, make_dicece())(images[0], mask[0][:, :, :12])
    assert "16, 12" in str(info.value) and "16, 16" in str(info.value)


def test_wrong_label_kind(net, data, make_dicece):
    images, mask = data
    with pytest.raises(ValueError, match="class indices"):
        FGSM(net, make_dicece())(images[0], (mask[0] * 255).numpy().astype(np.uint8))
    one_hot = torch.cat([1 - mask[0], mask[0]]) * 3
    with pytest.raises(ValueError, match="one-hot"):
        FGSM(net, DiceLoss(softmax=True))(images[0], one_hot)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_integer_image(net, data, dtype, make_dicece):
    images, mask = data
    img = (images[0] * 200).to(dtype)
    with pytest.raises(TypeError, match="floating point"):
        FGSM(net, make_dicece())(img, mask[0])
    with pytest.raises(TypeError, match="floating point"):
        FGSM(net, make_dicece())(img.numpy(), mask[0].numpy())


def test_non_array_input(net, data, make_dicece):
    images, mask = data
    with pytest.raises(TypeError):
        FGSM(net, make_dicece())(images[0].tolist(), mask[0])


def test_missing_batch_dimension(net, data, make_dicece):
    images, mask = data
    with pytest.raises(ValueError, match="B, C"):
        FGSM(net, make_dicece(), batched=True)(images[0, 0], mask[0, 0])
    with pytest.raises(ValueError, match="channel-first"):
        FGSM(net, make_dicece())(images[0, 0, 0], mask[0, 0, 0])


def test_batch_without_batched_names_the_fix(net, make_tiny_net, data, make_dicece):
    gray, mask = data  # a batch of 2: (2, 1, 16, 16) images and masks
    rgb, rgb_net = gray.repeat(1, 3, 1, 1), make_tiny_net(in_channels=3).eval()
    with pytest.raises(ValueError, match="batched=True") as info:
        FGSM(rgb_net, make_dicece())(rgb, mask)
    assert "(2, 1, 16, 16)" in str(info.value) and "(2, 3, 16, 16)" in str(info.value)
    # (2, 1, 16, 16) with its mask also fits one 3D item, so the 2D network fails: the hint is a note on its error
    with pytest.raises(RuntimeError) as info:
        FGSM(net, make_dicece())(gray, mask)
    assert any("batched=True" in note for note in getattr(info.value, "__notes__", []))
    assert FGSM(rgb_net, make_dicece(), batched=True)(rgb, mask).shape == rgb.shape


def test_no_network_or_loss(net, data, make_dicece):
    images, mask = data
    t = FGSM(loss_function=make_dicece())
    with pytest.raises(RuntimeError, match="network"):
        t(images[0], mask[0])
    with pytest.raises(RuntimeError, match="loss_function"):
        FGSM(network=net)(images[0], mask[0])
    t.network = net  # attached later, e.g. by the handler
    assert t(images[0], mask[0]).shape == images[0].shape


def test_zero_input_gradient(make_tiny_net, data):
    net = make_tiny_net(out_channels=1, seed=37).eval()
    images, _ = data
    label = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ZeroInputGradientError, match="zero") as info:
        FGSM(net, nn.CrossEntropyLoss())(images[0], label)
    assert isinstance(info.value, ValueError)
    with pytest.warns(UserWarning, match="zero"):
        out = FGSM(net, nn.CrossEntropyLoss(), on_zero_gradient="warn")(images[0], label)
    assert torch.equal(out, images[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = InvFGSM(net, nn.CrossEntropyLoss(), on_zero_gradient="ignore")(images[0], label)
    assert torch.equal(out, images[0])


def test_a_given_non_finite_gradient_is_a_non_finite_loss_error():
    """The fused handler's gradient comes from the training step: NaN there must be named as in the core."""
    from monai_adv.attacks import NonFiniteLossError
    from monai_adv.transforms.array import check_input_gradient

    images = torch.rand(2, 1, 8, 8)
    gradient = torch.randn(2, 1, 8, 8)
    check_input_gradient(images, gradient)  # finite: passes
    gradient[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="NaN or Inf"):
        check_input_gradient(images, gradient)
    check_input_gradient(images, gradient, check_finite=False)  # under a GradScaler, which skips such steps
