"""Tests of the pure torch core :func:`monai_adv.attacks.gradient_sign_attack` and its pieces."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from monai_adv.attacks import (
    AttackResult,
    NonFiniteLossError,
    ZeroInputGradientError,
    clamp_bounds,
    gradient_sign_attack,
    input_gradient,
    project_and_clamp,
    signed_gradient_step,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class MaskLeftHalf(nn.Module):
    """Zeroes the left half of the input, so the input gradient there is exactly zero."""

    def forward(self, x):
        mask = torch.ones_like(x)
        mask[..., : x.shape[-1] // 2] = 0
        return x * mask


class DeepSupervision(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out, 0.5 * out


def train_tiny_net(net, images, labels, loss_fn, steps=30, lr=0.05):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(images), labels).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


# ----------------------------------------------------------------------------------------------
# 1. exact agreement with an independent reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction,sign", [("ascend", 1.0), ("descend", -1.0)])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_matches_reference_float32(
    make_tiny_net, make_square_data, reference_fgsm, reference_input_grad, loss_case, direction, sign, eps
):
    torch.manual_seed(0)
    net = make_tiny_net(out_channels=loss_case.out_channels, seed=1).eval()
    images, mask = make_square_data(batch=2, size=16, seed=2)
    labels = loss_case.labels(mask)
    loss_fn = loss_case.make_loss()

    result = gradient_sign_attack(net, loss_fn, images, labels, eps, direction=direction)
    expected = reference_fgsm(net, loss_fn, images, labels, eps, sign)
    grad = reference_input_grad(net, loss_fn, images, labels)

    assert isinstance(result, AttackResult)
    assert bool((grad != 0).any())
    assert not torch.equal(result.images, images)
    assert torch.equal(result.images, expected)
    assert result.images.dtype == images.dtype and result.images.shape == images.shape
    torch.testing.assert_close(result.epsilon, torch.full((2,), eps))
    with torch.no_grad():
        torch.testing.assert_close(result.loss_before, loss_fn(net(images), labels))
    assert result.loss_after is None


@pytest.mark.parametrize("direction,sign", [("ascend", 1.0), ("descend", -1.0)])
def test_matches_reference_float64_dyadic_epsilon(
    make_tiny_net, make_square_data, reference_fgsm, loss_case, direction, sign
):
    # epsilon = 2**-4 is exact in every float format, so this isolates the gradient-sign logic.
    net = make_tiny_net(out_channels=loss_case.out_channels, seed=3, dtype=torch.float64).eval()
    images, mask = make_square_data(batch=3, size=16, seed=4, dtype=torch.float64)
    labels = loss_case.labels(mask)
    loss_fn = loss_case.make_loss()
    result = gradient_sign_attack(net, loss_fn, images, labels, 0.0625, direction=direction)
    expected = reference_fgsm(net, loss_fn, images, labels, 0.0625, sign)
    assert result.images.dtype == torch.float64
    assert torch.equal(result.images, expected)


def test_float64_epsilon_is_not_rounded_to_float32(make_tiny_net, make_square_data, reference_fgsm):
    net = make_tiny_net(seed=3, dtype=torch.float64).eval()
    images, mask = make_square_data(batch=2, size=16, seed=4, dtype=torch.float64)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    result = gradient_sign_attack(net, loss_fn, images, mask, 0.1, clamp="none")
    expected = reference_fgsm(net, loss_fn, images, mask, 0.1, 1.0, clamp=None)
    # float64 rounding of (x + 0.1) - x only; float32(0.1) would overshoot by 1.5e-9.
    assert (result.images - images).abs().max().item() <= 0.1 + 1e-15
    assert torch.equal(result.images, expected)


def test_matches_reference_basic_unet(make_basic_unet, make_square_data, reference_fgsm):
    net = make_basic_unet(seed=0).eval()
    images, mask = make_square_data(batch=2, size=32, seed=5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for direction, sign in (("ascend", 1.0), ("descend", -1.0)):
        result = gradient_sign_attack(net, loss_fn, images, mask, 0.03, direction=direction)
        expected = reference_fgsm(net, loss_fn, images, mask, 0.03, sign)
        assert torch.equal(result.images, expected)


def test_deep_supervision_uses_first_output(make_tiny_net, make_square_data, reference_fgsm):
    inner = make_tiny_net(seed=6).eval()
    net = DeepSupervision(inner)
    images, mask = make_square_data(seed=6)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    result = gradient_sign_attack(net, loss_fn, images, mask, 0.1)
    expected = reference_fgsm(inner, loss_fn, images, mask, 0.1, 1.0)
    assert torch.equal(result.images, expected)


def test_pieces_compose_to_the_attack(make_tiny_net, make_square_data, reference_input_grad):
    net = make_tiny_net(seed=7).eval()
    images, mask = make_square_data(seed=7)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    grad, loss = input_gradient(net, loss_fn, images, mask)
    assert grad.shape == images.shape and grad.grad_fn is None and loss.grad_fn is None
    torch.testing.assert_close(grad, reference_input_grad(net, loss_fn, images, mask), rtol=0, atol=0)
    step = signed_gradient_step(images, grad, 0.1, "ascend")
    adv = project_and_clamp(step, images, 0.1, clamp_bounds(images, "range", (0.0, 1.0)))
    assert torch.equal(adv, gradient_sign_attack(net, loss_fn, images, mask, 0.1).images)
    down = signed_gradient_step(images, grad, torch.tensor([0.1, 0.2]), "descend")
    torch.testing.assert_close(down[1] - images[1], -0.2 * grad[1].sign())
    with pytest.raises(ValueError, match="direction"):
        signed_gradient_step(images, grad, 0.1, "sideways")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# 2. the perturbation bound and clamping
# ----------------------------------------------------------------------------------------------

TOL32 = 1e-6  # float32 rounding of (x + d) - x for x in [0, 1]


@pytest.mark.parametrize("direction", ["ascend", "descend"])
def test_single_step_moves_exactly_epsilon_where_gradient_nonzero(
    make_tiny_net, make_square_data, reference_input_grad, direction
):
    net = nn.Sequential(MaskLeftHalf(), make_tiny_net(seed=8)).eval()
    images, mask = make_square_data(batch=2, size=16, seed=8)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    eps = 0.07
    result = gradient_sign_attack(net, loss_fn, images, mask, eps, direction=direction, clamp="none")
    grad = reference_input_grad(net, loss_fn, images, mask)
    delta = result.images - images
    zero = grad == 0
    assert bool(zero.any()) and bool((~zero).any())
    assert torch.equal(delta[zero], torch.zeros_like(delta[zero]))
    torch.testing.assert_close(delta[~zero].abs(), torch.full_like(delta[~zero], eps), rtol=0, atol=TOL32)
    sign = 1.0 if direction == "ascend" else -1.0
    assert torch.equal(delta[~zero].sign(), sign * grad[~zero].sign())
    assert delta.abs().max().item() <= eps + TOL32


@pytest.mark.parametrize("clamp", ["none", "range"])
@pytest.mark.parametrize("direction", ["ascend", "descend"])
def test_iterative_with_random_start_stays_in_ball(make_tiny_net, make_square_data, clamp, direction):
    net = make_tiny_net(seed=9).eval()
    images, mask = make_square_data(batch=2, size=16, seed=9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    eps = 0.05
    for num_steps, step_size in ((3, None), (7, 0.02), (4, 1.0)):
        gen = torch.Generator().manual_seed(num_steps)
        result = gradient_sign_attack(
            net,
            loss_fn,
            images,
            mask,
            eps,
            direction=direction,
            num_steps=num_steps,
            step_size=step_size,
            random_start=True,
            generator=gen,
            clamp=clamp,
        )
        delta = result.images - images
        assert delta.abs().max().item() <= eps + TOL32
        assert delta.abs().max().item() > 0.5 * eps
        if clamp == "range":
            assert result.images.min().item() >= 0.0 and result.images.max().item() <= 1.0


def test_random_start_reproducible_with_generator_and_loss_before_is_clean(make_tiny_net, make_square_data):
    net = make_tiny_net(seed=10).eval()
    images, mask = make_square_data(seed=10)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def run(seed):
        return gradient_sign_attack(
            net,
            loss_fn,
            images,
            mask,
            0.05,
            num_steps=2,
            random_start=True,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    with torch.no_grad():
        clean = loss_fn(net(images), mask)
    torch.testing.assert_close(a.loss_before, clean)


def test_clamp_range_keeps_values_in_range(make_tiny_net):
    net = nn.Sequential(Scale(1 / 255), make_tiny_net(seed=11)).eval()
    gen = torch.Generator().manual_seed(11)
    # Many pixels sit exactly on the bounds, so about half of them would be pushed out without clamping.
    images = torch.randint(0, 3, (2, 1, 16, 16), generator=gen).float() * 127.5
    mask = (images > 100).float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for direction in ("ascend", "descend"):
        result = gradient_sign_attack(
            net, loss_fn, images, mask, 10.0, direction=direction, clamp="range", value_range=(0, 255)
        )
        assert result.images.min().item() >= 0.0 and result.images.max().item() <= 255.0
        unclamped = gradient_sign_attack(net, loss_fn, images, mask, 10.0, direction=direction, clamp="none")
        assert unclamped.images.min().item() < 0.0 and unclamped.images.max().item() > 255.0


def test_clamp_image_keeps_each_image_within_its_own_range(make_tiny_net):
    net = nn.Sequential(Scale(1 / 1000), make_tiny_net(seed=12)).eval()
    gen = torch.Generator().manual_seed(12)
    images = torch.empty(2, 1, 16, 16)
    images[0] = torch.rand(1, 16, 16, generator=gen) * 2000 - 1000  # HU-like [-1000, 1000]
    images[1] = torch.rand(1, 16, 16, generator=gen) * 800 - 500  # [-500, 300]
    images[0, 0, 0, 0], images[0, 0, 0, 1] = -1000.0, 1000.0
    mask = (images > 0).float()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for direction in ("ascend", "descend"):
        result = gradient_sign_attack(net, loss_fn, images, mask, 10.0, direction=direction, clamp="image")
        delta = result.images - images
        assert delta.abs().max().item() <= 10.0 + 1e-3
        for b in range(2):
            assert result.images[b].min() >= images[b].min()
            assert result.images[b].max() <= images[b].max()
        unclamped = gradient_sign_attack(net, loss_fn, images, mask, 10.0, direction=direction, clamp="none")
        assert any(
            unclamped.images[b].min() < images[b].min() or unclamped.images[b].max() > images[b].max() for b in range(2)
        )
    # A fixed [0, 1] range would destroy HU data: refuse it loudly.
    with pytest.raises(ValueError, match="value_range"):
        gradient_sign_attack(net, loss_fn, images, mask, 10.0, clamp="range")


def test_per_sample_epsilon_tensor(make_tiny_net, make_square_data):
    net = make_tiny_net(seed=13).eval()
    images, mask = make_square_data(batch=3, seed=13)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    eps = torch.tensor([0.0, 0.02, 0.2])
    result = gradient_sign_attack(net, loss_fn, images, mask, eps, clamp="none")
    delta = (result.images - images).flatten(1).abs().max(dim=1).values
    torch.testing.assert_close(delta, eps, rtol=0, atol=TOL32)
    assert torch.equal(result.images[0], images[0])
    scalar = gradient_sign_attack(net, loss_fn, images, mask, torch.tensor(0.02), clamp="none")
    torch.testing.assert_close(scalar.epsilon, torch.full((3,), 0.02))
    with pytest.raises(ValueError, match="epsilon"):
        gradient_sign_attack(net, loss_fn, images, mask, torch.tensor([0.1, 0.2]))


# ----------------------------------------------------------------------------------------------
# 3. on a trained network FGSM raises the loss and Inverse FGSM lowers it
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(make_tiny_net, make_square_data):
    torch.manual_seed(0)
    net = make_tiny_net(hidden=8, seed=14)
    images, mask = make_square_data(batch=8, size=16, seed=14)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    train_tiny_net(net, images, mask, loss_fn, steps=30)
    test_images, test_mask = make_square_data(batch=4, size=16, seed=15)
    return net, loss_fn, test_images, test_mask


@pytest.mark.parametrize("num_steps", [1, 3])
def test_fgsm_raises_and_inverse_lowers_loss_on_trained_net(trained, num_steps):
    net, loss_fn, images, mask = trained
    with torch.no_grad():
        clean = loss_fn(net(images), mask)
    up = gradient_sign_attack(net, loss_fn, images, mask, 0.05, "ascend", num_steps=num_steps, return_loss_after=True)
    down = gradient_sign_attack(
        net, loss_fn, images, mask, 0.05, "descend", num_steps=num_steps, return_loss_after=True
    )
    with torch.no_grad():
        up_loss = loss_fn(net(up.images), mask)
        down_loss = loss_fn(net(down.images), mask)
    torch.testing.assert_close(up.loss_before, clean)
    torch.testing.assert_close(down.loss_before, clean)
    torch.testing.assert_close(up.loss_after, up_loss)
    torch.testing.assert_close(down.loss_after, down_loss)
    assert up.loss_after > up.loss_before
    assert down.loss_after < down.loss_before
    assert up_loss > clean > down_loss
    assert up.loss_after.grad_fn is None and down.loss_after.grad_fn is None


# ----------------------------------------------------------------------------------------------
# 7. bad input
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def setup(make_tiny_net, make_square_data):
    net = make_tiny_net(seed=16).eval()
    images, mask = make_square_data(seed=16)
    return net, DiceCELoss(to_onehot_y=True, softmax=True), images, mask


@pytest.mark.parametrize("eps", [-0.1, math.nan, math.inf])
def test_bad_epsilon(setup, eps):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError, match="epsilon"):
        gradient_sign_attack(net, loss_fn, images, mask, eps)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_image(setup, bad):
    net, loss_fn, images, mask = setup
    images = images.clone()
    images[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN"):
        gradient_sign_attack(net, loss_fn, images, mask, 0.1)


def test_non_finite_label(setup):
    net, loss_fn, images, mask = setup
    mask = mask.clone()
    mask[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        gradient_sign_attack(net, loss_fn, images, mask, 0.1)


def test_shape_mismatch_names_both_shapes(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError) as info:
        gradient_sign_attack(net, loss_fn, images, mask[..., :15], 0.1)
    assert "(2, 1, 16, 15)" in str(info.value) and "(2, 1, 16, 16)" in str(info.value)
    with pytest.raises(ValueError, match="batch"):
        gradient_sign_attack(net, loss_fn, images, mask[:1], 0.1)


def test_label_mask_0_255_for_softmax_loss(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError, match="class indices"):
        gradient_sign_attack(net, loss_fn, images, mask * 255, 0.1)


def test_cross_entropy_label_out_of_range(setup):
    net, _, images, mask = setup
    with pytest.raises(ValueError, match="class indices"):
        gradient_sign_attack(net, nn.CrossEntropyLoss(), images, (mask[:, 0] * 2).long(), 0.1)


def test_one_hot_labels_above_one(setup):
    net, _, images, mask = setup
    one_hot = torch.cat([1 - mask, mask], dim=1) * 2
    with pytest.raises(ValueError, match="one-hot"):
        gradient_sign_attack(net, DiceLoss(softmax=True), images, one_hot, 0.1)
    # the well-formed one-hot label is accepted
    gradient_sign_attack(net, DiceLoss(softmax=True), images, one_hot / 2, 0.1)


def test_integer_image(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(TypeError, match="floating point"):
        gradient_sign_attack(net, loss_fn, (images * 255).to(torch.uint8), mask, 0.1)


def test_non_tensor_and_unbatched_input(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(TypeError):
        gradient_sign_attack(net, loss_fn, images.numpy(), mask, 0.1)
    with pytest.raises(ValueError, match="batch"):
        gradient_sign_attack(net, loss_fn, images[0, 0], mask[0, 0], 0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.0}, "num_steps"),
        ({"num_steps": 3, "step_size": -0.1}, "step_size"),
        ({"num_steps": 3, "step_size": math.nan}, "step_size"),
        ({"direction": "up"}, "direction"),
        ({"clamp": "both"}, "clamp"),
        ({"value_range": (1.0, 0.0)}, "value_range"),
        ({"on_zero_gradient": "shrug"}, "on_zero_gradient"),
        ({"network_mode": "inference"}, "network_mode"),
    ],
)
def test_bad_settings(setup, kwargs, match):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError, match=match):
        gradient_sign_attack(net, loss_fn, images, mask, 0.1, **kwargs)


def test_image_outside_value_range(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError, match="value_range"):
        gradient_sign_attack(net, loss_fn, images * 3, mask, 0.1)


@pytest.mark.parametrize("error", [RuntimeError, torch.OutOfMemoryError, KeyError])
def test_loss_function_failure_keeps_its_type(setup, error):
    # an out-of-memory error must stay one (a caller may catch it and retry smaller); the note says what the loss got
    net, _, images, mask = setup

    def broken(pred, label):
        raise error("boom")

    with pytest.raises(error, match="boom") as info:
        gradient_sign_attack(net, broken, images, mask, 0.1)
    assert type(info.value) is error
    assert any("shape (2, 2, 16, 16)" in note for note in getattr(info.value, "__notes__", []))


def test_zero_input_gradient(make_tiny_net, make_square_data):
    # softmax over a single channel is constant: the input gradient is identically zero
    net = make_tiny_net(out_channels=1, seed=17).eval()
    images, _ = make_square_data(seed=17)
    labels = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ZeroInputGradientError, match="zero") as info:
        gradient_sign_attack(net, loss_fn, images, labels, 0.1)
    assert isinstance(info.value, ValueError)
    with pytest.warns(UserWarning, match="zero"):
        result = gradient_sign_attack(net, loss_fn, images, labels, 0.1, on_zero_gradient="warn")
    assert torch.equal(result.images, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gradient_sign_attack(net, loss_fn, images, labels, 0.1, on_zero_gradient="ignore")
    assert torch.equal(result.images, images)


def test_amp_on_cpu_moves_pixels_by_epsilon(make_basic_unet, make_square_data):
    """autocast on the CPU (bfloat16): the scaled-loss gradient path still gives signed steps almost everywhere
    (a few pixels' gradients cancel exactly in bfloat16)."""
    net = make_basic_unet(seed=0).eval()
    images, mask = make_square_data(batch=2, size=32, seed=5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    result = gradient_sign_attack(net, loss_fn, images, mask, 0.05, clamp="none", amp=True)
    delta = (result.images - images).abs()
    assert result.images.dtype == images.dtype
    assert delta.max() <= 0.05 + 1e-6
    assert (delta > 0.05 - 1e-6).float().mean() > 0.99
    assert result.loss_before.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 8. failure cases that used to pass silently (issue 8, items 9 and 12)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", [False, True])
def test_nan_weights_raise_naming_the_parameter(setup, amp):
    # sign(NaN) is 0: without the check the attack returned the clean images unchanged.
    net, loss_fn, images, mask = setup
    with torch.no_grad():
        net[2].bias[0] = math.nan
    with pytest.raises(NonFiniteLossError, match=r"loss is nan.*2\.bias") as info:
        gradient_sign_attack(net, loss_fn, images, mask, 0.1, amp=amp, on_zero_gradient="ignore")
    assert isinstance(info.value, ValueError)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        input_gradient(net, loss_fn, images, mask)


def test_nan_loss_with_finite_weights_raises(setup):
    net, _, images, mask = setup

    def nan_loss(pred, label):
        return (pred * math.nan).mean()

    with pytest.raises(NonFiniteLossError, match="parameters are finite"):
        gradient_sign_attack(net, nan_loss, images, mask, 0.1, num_steps=3)


def test_non_finite_gradient_of_a_finite_loss_raises(make_square_data):
    # d sqrt(x) / dx is infinite at x = 0, while sqrt(0) = 0 keeps the loss finite.
    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.cat([x.sqrt(), -x.sqrt()], dim=1)

    images, mask = make_square_data(seed=18)
    images = images.clone()
    images[0, 0, 0, 0] = 0.0
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    with pytest.raises(NonFiniteLossError, match="gradient .* NaN or Inf .* although the loss is finite"):
        gradient_sign_attack(Sqrt(), loss_fn, images, mask, 0.1)


@pytest.mark.parametrize("eps,value_range", [(1.0, (0.0, 1.0)), (8.0, (0.0, 1.0)), (300.0, (0.0, 255.0))])
def test_epsilon_as_wide_as_the_value_range_warns(setup, eps, value_range):
    net, loss_fn, images, mask = setup
    scale = value_range[1]
    with pytest.warns(UserWarning, match="at least the whole value range"):
        gradient_sign_attack(net, loss_fn, images * scale, mask, eps, value_range=value_range)


def test_epsilon_within_range_or_unclamped_does_not_warn(setup):
    net, loss_fn, images, mask = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_sign_attack(net, loss_fn, images, mask, torch.tensor([0.0, 0.99]))
        gradient_sign_attack(net, loss_fn, images, mask, 5.0, clamp="none")


def test_empty_batch_is_refused_clearly(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 1, 16, 16\)\)"):
        gradient_sign_attack(net, loss_fn, images[:0], mask[:0], 0.1)


class DictOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"out": self.net(x), "aux": self.net(x)}


def test_network_returning_a_dict_is_refused_naming_its_keys(setup):
    net, loss_fn, images, mask = setup
    with pytest.raises(TypeError, match=r"dict with keys \['aux', 'out'\]"):
        gradient_sign_attack(DictOutput(net), loss_fn, images, mask, 0.1)
    with pytest.raises(TypeError, match="dict"):
        input_gradient(DictOutput(net), loss_fn, images, mask)


def test_network_returning_a_tuple_of_non_tensors_is_refused(setup):
    net, loss_fn, images, mask = setup

    class Odd(nn.Module):
        def forward(self, x):
            return ("pred", net(x))

    with pytest.raises(TypeError, match="tuple whose first element is str"):
        gradient_sign_attack(Odd(), loss_fn, images, mask, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_steps", [1, 3])
def test_one_synchronisation_for_the_checks_and_one_per_gradient_pass_on_cuda(
    make_tiny_net, make_square_data, num_steps
):
    net = make_tiny_net(seed=19).cuda().eval()
    images, mask = (t.cuda() for t in make_square_data(seed=19))
    labels = mask[:, 0].long()
    loss_fn = nn.CrossEntropyLoss()
    gradient_sign_attack(net, loss_fn, images, labels, 0.1, num_steps=num_steps)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gradient_sign_attack(net, loss_fn, images, labels, 0.1, num_steps=num_steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1 + num_steps, syncs
