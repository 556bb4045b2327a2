"""Sparse kernels: exact masked-dense semantics, gradients, attachment, and the per-layer choice.

A kernel is only allowed to change *how* a masked layer is computed, never *what*: forward and
gradients must equal masked dense compute, the parameter stays the optimiser's and the
state_dict's, and the chooser must never pick a kernel the profile does not show to be faster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device.errors import ConfigError, NotFoundError
from device.sparse.kernels import (
    DEFAULT_MARGIN,
    attach,
    choose_plan,
    conv2d_sparse,
    csr_structure,
    interpolate_point,
    layer_cost,
    linear_sparse,
    supports_sparse,
)
from device.wire.messages import DeviceProfile, LayerProfile, ProfilePoint

DENSITIES = (0.0, 0.1, 0.5, 1.0)

# pytest re-enables every warning inside a test; torch's one-time "CSR is beta" notice is noise.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


class SmallNet(nn.Module):
    """femnist_cnn's layer types in miniature: conv, pool, conv, linear, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))  # type: ignore[no-any-return]


def _small_net_and_masks(density: float, seed: int = 0) -> tuple[SmallNet, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    net = SmallNet()
    masks = {
        name: _mask(tuple(p.shape), density, seed + i)
        for i, (name, p) in enumerate(net.named_parameters())
        if name.endswith("weight")
    }
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return net, masks


# --- CSR structure -------------------------------------------------------------------------


@pytest.mark.parametrize("density", DENSITIES)
def test_csr_structure_and_its_transpose_hold_exactly_the_mask(density: float) -> None:
    """Both CSR matrices must put every weight value back where the mask keeps it, or the
    forward and the input gradient would read the wrong weights."""
    mask = _mask((7, 11), density, seed=1)
    weight = _randn(7, 11, seed=2) * mask
    structure = csr_structure(mask)
    values = weight.reshape(-1)[structure.flat_index]
    assert structure.nnz == int(mask.sum())
    assert torch.equal(structure.matrix(values).to_dense(), weight)
    assert torch.equal(structure.transposed(values).to_dense(), weight.t())


def test_csr_structure_refuses_a_non_bool_mask() -> None:
    """A float mask would silently keep every entry; it must be rejected with a clear error."""
    with pytest.raises(ConfigError, match="2-D bool mask"):
        csr_structure(torch.ones(3, 3))


# --- linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradcheck(density: float, with_bias: bool) -> None:
    """The custom backward must be the exact derivative of the custom forward (float64)."""
    mask = _mask((5, 7), density, seed=3)
    structure = csr_structure(mask)
    x = _randn(4, 7, seed=4).requires_grad_()
    weight = _randn(5, 7, seed=5).requires_grad_()
    bias = _randn(5, seed=6).requires_grad_() if with_bias else None

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear_sparse(x, weight, bias, structure)

    assert torch.autograd.gradcheck(f, (x, weight, bias))  # type: ignore[arg-type]


def _linear_case(
    density: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = _mask((32, 48), density, seed=7)
    x = _randn(3, 5, 48, seed=8, dtype=dtype)  # extra leading dims, as nn.Linear allows
    weight = _randn(32, 48, seed=9, dtype=dtype)
    bias = _randn(32, seed=10, dtype=dtype)
    grad_out = _randn(3, 5, 32, seed=11, dtype=dtype)
    return mask, x, weight, bias, grad_out


@pytest.mark.parametrize("density", DENSITIES)
def test_linear_matches_masked_dense_in_float32(density: float) -> None:
    """Output, input gradient, weight gradient (masked) and bias gradient equal masked dense
    compute within 1e-5: switching kernels must not change training."""
    mask, x, weight, bias, grad_out = _linear_case(density, torch.float32)
    results = []
    for sparse in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        if sparse:
            y = linear_sparse(xs, ws, bs, csr_structure(mask))
        else:
            y = F.linear(xs, ws * mask, bs)
        torch.autograd.backward(y, grad_out)
        assert ws.grad is not None and xs.grad is not None and bs.grad is not None
        results.append((y.detach(), xs.grad, ws.grad * mask, bs.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_weight_gradient_is_exactly_zero_outside_the_mask() -> None:
    """With exact zeros there, SGD keeps pruned weights and momentum at zero without masking."""
    mask, x, weight, bias, grad_out = _linear_case(0.2, torch.float32)
    w = weight.clone().requires_grad_()
    torch.autograd.backward(linear_sparse(x, w, bias, csr_structure(mask)), grad_out)
    assert w.grad is not None
    assert torch.count_nonzero(w.grad[~mask]) == 0
    assert torch.count_nonzero(w.grad[mask]) == int(mask.sum())


def test_linear_full_weight_grad_gives_the_dense_gradient() -> None:
    """Growth (RigL/FedDST) and PruneFL importance need the gradient at pruned positions too."""
    mask, x, weight, bias, grad_out = _linear_case(0.2, torch.float32)
    w_sparse = weight.clone().requires_grad_()
    out = linear_sparse(x, w_sparse, bias, csr_structure(mask), full_weight_grad=True)
    torch.autograd.backward(out, grad_out)
    assert w_sparse.grad is not None
    want = grad_out.reshape(-1, 32).t() @ x.reshape(-1, 48)
    torch.testing.assert_close(w_sparse.grad, want, atol=1e-5, rtol=1e-5)


def test_a_full_weight_gradient_still_set_is_added_to_in_place() -> None:
    """A weight whose dense gradient is still set (a trainer summing growth gradients there)
    gets the next backward's dense product added to it in the same memory, as autograd would
    add it (no new weight-sized tensor); linear and conv alike."""
    mask, x, weight, bias, grad_out = _linear_case(0.2, torch.float32)
    conv_mask = _mask((8, 4, 3, 3), 0.2, seed=26)
    conv_x, conv_out = _randn(2, 4, 7, 7, seed=27), _randn(2, 8, 7, 7, seed=28)
    cases = [
        (
            (weight * mask).clone().requires_grad_(),
            lambda w: linear_sparse(x, w, bias, csr_structure(mask), full_weight_grad=True),
            lambda w: F.linear(x, w, bias),
            grad_out,
        ),
        (
            (_randn(8, 4, 3, 3, seed=29) * conv_mask).requires_grad_(),
            lambda w: conv2d_sparse(
                conv_x,
                w,
                None,
                csr_structure(conv_mask.reshape(8, -1)),
                padding=1,
                full_weight_grad=True,
            ),
            lambda w: F.conv2d(conv_x, w, None, padding=1),
            conv_out,
        ),
    ]
    for w, sparse, dense, out_grad in cases:
        reference = w.detach().clone().requires_grad_()
        handed: list[torch.Tensor] = []  # dense gradients the kernel gave autograd for w
        w.register_hook(lambda grad, seen=handed: None if grad is None else seen.append(grad))
        for scale in (0.5, 0.5, 1.0):
            torch.autograd.backward(sparse(w), out_grad * scale)
            torch.autograd.backward(dense(reference), out_grad * scale)
        assert len(handed) == 1, "a set gradient got a new weight-sized tensor added to it"
        torch.testing.assert_close(w.grad, reference.grad, atol=1e-5, rtol=1e-5)


# --- conv2d ----------------------------------------------------------------------------------


CONV_GEOMETRIES = [
    {"stride": 1, "padding": 1, "dilation": 1},
    {"stride": (2, 1), "padding": (0, 2), "dilation": 1},
    {"stride": 1, "padding": 2, "dilation": 2},
]


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv2d_gradcheck(density: float, geometry: dict[str, int | tuple[int, int]]) -> None:
    """The im2col + CSR backward must be the exact derivative of its forward (float64)."""
    mask = _mask((3, 2, 3, 3), density, seed=12)
    structure = csr_structure(mask.reshape(3, -1))
    x = _randn(2, 2, 6, 5, seed=13).requires_grad_()
    weight = _randn(3, 2, 3, 3, seed=14).requires_grad_()
    bias = _randn(3, seed=15).requires_grad_()

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return conv2d_sparse(x, weight, bias, structure, **geometry)  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv2d_matches_masked_dense_in_float32(
    density: float, geometry: dict[str, int | tuple[int, int]]
) -> None:
    """Output and all gradients equal ``F.conv2d`` on the masked weight within 1e-5."""
    mask = _mask((8, 4, 3, 3), density, seed=16)
    x = _randn(3, 4, 9, 8, seed=17, dtype=torch.float32)
    weight = _randn(8, 4, 3, 3, seed=18, dtype=torch.float32)
    bias = _randn(8, seed=19, dtype=torch.float32)
    results = []
    for sparse in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        if sparse:
            y = conv2d_sparse(xs, ws, bs, csr_structure(mask.reshape(8, -1)), **geometry)  # type: ignore[arg-type]
        else:
            y = F.conv2d(xs, ws * mask, bs, **geometry)  # type: ignore[arg-type]
        torch.autograd.backward(y, _randn(*y.shape, seed=20, dtype=torch.float32))
        assert ws.grad is not None and xs.grad is not None and bs.grad is not None
        results.append((y.detach(), xs.grad, ws.grad * mask, bs.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_conv2d_full_weight_grad_gives_the_dense_gradient() -> None:
    """The growth window and importance steps need the conv gradient at pruned positions too:
    the gradient of the loss w.r.t. the masked weight, as dense compute gives it."""
    mask = _mask((8, 4, 3, 3), 0.2, seed=26)
    x = _randn(2, 4, 7, 7, seed=27)
    grad_out = _randn(2, 8, 7, 7, seed=28)
    w_sparse = (_randn(8, 4, 3, 3, seed=29) * mask).requires_grad_()
    w_dense = w_sparse.detach().clone().requires_grad_()
    structure = csr_structure(mask.reshape(8, -1))
    out = conv2d_sparse(x, w_sparse, None, structure, padding=1, full_weight_grad=True)
    torch.autograd.backward(out, grad_out)
    torch.autograd.backward(F.conv2d(x, w_dense, None, padding=1), grad_out)
    assert w_sparse.grad is not None and w_dense.grad is not None
    torch.testing.assert_close(w_sparse.grad, w_dense.grad)
    assert torch.count_nonzero(w_sparse.grad[~mask]) > 0


def test_conv2d_accepts_an_unbatched_input_like_nn_conv2d() -> None:
    """nn.Conv2d takes ``[C, H, W]``; an attached layer must not break such callers."""
    mask = _mask((4, 2, 3, 3), 0.5, seed=21)
    x = _randn(2, 6, 6, seed=22)
    weight = _randn(4, 2, 3, 3, seed=23)
    got = conv2d_sparse(x, weight, None, csr_structure(mask.reshape(4, -1)), padding=1)
    torch.testing.assert_close(got, F.conv2d(x, weight * mask, None, padding=1))


def test_supports_sparse_only_where_a_kernel_exists() -> None:
    """Grouped or non-zero-padded convolutions have no kernel and must stay dense."""
    assert supports_sparse(nn.Linear(3, 2))
    assert supports_sparse(nn.Conv2d(2, 4, 3, padding=1))
    assert not supports_sparse(nn.Conv2d(2, 4, 3, groups=2))
    assert not supports_sparse(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"))
    assert not supports_sparse(nn.Conv2d(2, 4, 3, padding="same"))
    assert not supports_sparse(nn.Conv1d(2, 4, 3))


# --- attach / refresh / detach ---------------------------------------------------------------

PLAN = frozenset({"conv2.weight", "fc1.weight", "fc2.weight"})


def test_attach_keeps_state_dict_keys_and_values() -> None:
    """Checkpoints, deltas and the wire format are keyed by state_dict names: attaching
    kernels must not add, rename or alter a single entry, nor must detaching."""
    net, masks = _small_net_and_masks(0.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    handle = attach(net, masks, PLAN)
    during = net.state_dict()
    handle.detach()
    after = net.state_dict()
    for state in (during, after):
        assert list(state) == list(before)
        for key, value in before.items():
            assert torch.equal(state[key], value), key


def test_attached_model_computes_what_the_masked_dense_model_computes() -> None:
    """Output and every parameter gradient (on the mask) match the dense model."""
    net, masks = _small_net_and_masks(0.3)
    x = _randn(4, 1, 8, 8, seed=24, dtype=torch.float32)
    dense_out = net(x)
    torch.autograd.backward(dense_out.sum())
    dense_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    handle = attach(net, masks, PLAN)
    sparse_out = net(x)
    torch.autograd.backward(sparse_out.sum())
    handle.detach()
    torch.testing.assert_close(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    for name, param in net.named_parameters():
        assert param.grad is not None
        want = dense_grads[name] * masks[name] if name in PLAN else dense_grads[name]
        torch.testing.assert_close(param.grad, want, atol=1e-5, rtol=1e-5)


def test_sgd_with_kernels_trains_like_masked_dense() -> None:
    """The optimiser updates the real Parameter, and kernels read its new values next step:
    three SGD steps with kernels land on the weights masked dense training reaches."""
    results = []
    for use_kernels in (True, False):
        net, masks = _small_net_and_masks(0.3, seed=5)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        handle = attach(net, masks, PLAN) if use_kernels else None
        for step in range(3):
            x = _randn(4, 1, 8, 8, seed=30 + step, dtype=torch.float32)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(net(x).square().mean())
            with torch.no_grad():
                for name, param in net.named_parameters():
                    if name in masks and param.grad is not None:
                        param.grad.mul_(masks[name])
            optimizer.step()
        if handle is not None:
            handle.detach()
        results.append(net.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=1e-5)


def test_sgd_keeps_pruned_weights_exactly_zero_without_masking() -> None:
    """Why a trainer may skip masking for kernel layers: exact-zero gradients outside the mask
    leave pruned weights and momentum at exactly 0.0 through SGD with momentum and decay."""
    net, masks = _small_net_and_masks(0.3, seed=6)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    handle = attach(net, masks, PLAN)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(net(_randn(4, 1, 8, 8, seed=50 + step, dtype=torch.float32)).sum())
        optimizer.step()
    handle.detach()
    params = dict(net.named_parameters())
    for name in PLAN:
        pruned = ~masks[name]
        assert torch.count_nonzero(params[name][pruned]) == 0, name
        momentum = optimizer.state[params[name]]["momentum_buffer"]
        assert torch.count_nonzero(momentum[pruned]) == 0, name
        assert torch.count_nonzero(params[name][masks[name]]) > 0, name  # it did train


def test_refresh_uses_the_new_mask() -> None:
    """After a readjustment the kernels must compute with the new mask, not the old one."""
    net, masks = _small_net_and_masks(0.3)
    x = _randn(2, 1, 8, 8, seed=25, dtype=torch.float32)
    handle = attach(net, masks, PLAN)
    new_masks = {
        n: _mask(tuple(m.shape), 0.6, seed=40 + i) for i, (n, m) in enumerate(masks.items())
    }
    handle.refresh(new_masks)
    got = net(x)
    handle.detach()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name in PLAN:
                param.mul_(new_masks[name])  # what masked dense computes with the new mask
    torch.testing.assert_close(got, net(x), atol=1e-5, rtol=1e-5)


def _on_mask_grads(
    net: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Masked dense gradients of the planned weights at their kept entries, in CSR value order
    (what values mode must give its ``[nnz]`` tensors)."""
    reference = copy.deepcopy(net)
    torch.autograd.backward(reference(x).square().mean())
    params = dict(reference.named_parameters())
    return {n: params[n].grad.reshape(-1)[masks[n].reshape(-1)] for n in PLAN}  # type: ignore[union-attr]


def test_values_mode_gradients_reuse_one_buffer_and_accumulate_like_autograd() -> None:
    """In values mode a layer's kept-value gradient is written into one buffer and set on the
    values tensor (no allocation per step): cleared between steps it comes back in the same
    memory holding that step's gradient; not cleared, the next backward adds to it."""
    net, masks = _small_net_and_masks(0.3, seed=3)
    xs = [_randn(4, 1, 8, 8, seed=50 + i, dtype=torch.float32) for i in range(3)]
    wanted = [_on_mask_grads(net, masks, x) for x in xs]
    handle = attach(net, masks, PLAN, train_values=True)
    values = {n: handle.values(n) for n in PLAN}
    held: dict[str, list[torch.Tensor]] = {n: [] for n in PLAN}
    for x, want in zip(xs, wanted, strict=True):
        for tensor in values.values():
            tensor.grad = None
        torch.autograd.backward(net(x).square().mean())
        for name, tensor in values.items():
            assert tensor.grad is not None
            torch.testing.assert_close(tensor.grad, want[name], atol=1e-5, rtol=1e-5)
            held[name].append(tensor.grad)  # held: a new gradient could not reuse its memory
    for seen in held.values():
        assert len({g.data_ptr() for g in seen}) == 1
    torch.autograd.backward(net(xs[0]).square().mean())  # not cleared: accumulates
    for name, tensor in values.items():
        torch.testing.assert_close(
            tensor.grad, wanted[2][name] + wanted[0][name], atol=1e-5, rtol=1e-5
        )
    handle.detach()


def test_values_mode_layer_used_twice_in_one_graph_gets_the_summed_gradient() -> None:
    """Both uses' gradients must add up: the second backward call must not overwrite the first
    one's gradient in the reused buffer."""
    torch.manual_seed(7)
    layer = nn.Linear(6, 6)
    mask = _mask((6, 6), 0.5, seed=8)
    with torch.no_grad():
        layer.weight.mul_(mask)
    x = _randn(3, 6, seed=9, dtype=torch.float32)
    reference = copy.deepcopy(layer)
    torch.autograd.backward(reference(reference(x)).square().sum())
    assert reference.weight.grad is not None
    want = reference.weight.grad.reshape(-1)[mask.reshape(-1)]
    handle = attach(layer, {"weight": mask}, frozenset({"weight"}), train_values=True)
    torch.autograd.backward(layer(layer(x)).square().sum())
    got = handle.values("weight").grad
    handle.detach()
    assert got is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_detach_restores_the_modules_own_forward() -> None:
    """After detach, the layers run their class forward again (dense, unmasked)."""
    net, masks = _small_net_and_masks(0.3)
    handle = attach(net, masks, PLAN)
    assert handle.attached and "forward" in net.fc1.__dict__
    handle.detach()
    handle.detach()  # idempotent
    assert not handle.attached
    for name in PLAN:
        assert "forward" not in net.get_submodule(name.rpartition(".")[0]).__dict__


def test_attach_rejects_unknown_names_and_unsupported_layers() -> None:
    """A plan must name supported layers of this model; anything else is a named error."""
    net, masks = _small_net_and_masks(0.3)
    with pytest.raises(NotFoundError, match="fc9"):
        attach(net, masks, frozenset({"fc9.weight"}))
    with pytest.raises(ConfigError, match="weights only"):
        attach(net, masks, frozenset({"fc1.bias"}))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="no sparse kernel"):
        attach(
            grouped, {"0.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool)}, frozenset({"0.weight"})
        )


def test_attach_rejects_missing_or_malformed_masks() -> None:
    """Without its mask (or with a mask of the wrong shape or type) a layer cannot be sparse."""
    net, masks = _small_net_and_masks(0.3)
    with pytest.raises(ConfigError, match="no mask"):
        attach(net, {}, frozenset({"fc1.weight"}))
    with pytest.raises(ConfigError, match="must be bool"):
        attach(net, {"fc1.weight": masks["fc1.weight"].float()}, frozenset({"fc1.weight"}))
    with pytest.raises(ConfigError, match="must be bool of shape"):
        attach(net, {"fc1.weight": masks["fc1.weight"].t()}, frozenset({"fc1.weight"}))


def test_attach_twice_is_refused() -> None:
    """Two handles on one layer would make detach order matter; the second is refused."""
    net, masks = _small_net_and_masks(0.3)
    handle = attach(net, masks, frozenset({"fc1.weight"}))
    with pytest.raises(ConfigError, match="attached twice"):
        attach(net, masks, frozenset({"fc1.weight"}))
    handle.detach()


# --- choosing kernels from a profile ---------------------------------------------------------


def _layer(name: str, points: list[tuple[float, float, float]]) -> LayerProfile:
    return LayerProfile(
        name=name,
        numel=1000,
        points=tuple(ProfilePoint(d, dense, sparse) for d, dense, sparse in points),
    )


def _profile(*layers: LayerProfile) -> DeviceProfile:
    return DeviceProfile(model_name="test", batch_size=20, step_overhead_s=0.001, layers=layers)


# A layer whose sparse kernel wins below density ~0.3 and loses above (like a large linear).
FC = _layer("fc.weight", [(1.0, 10.0, 40.0), (0.5, 10.0, 20.0), (0.2, 10.0, 6.0), (0.1, 10.0, 3.0)])
# A layer whose sparse kernel always loses (like a small convolution).
CONV = _layer("conv.weight", [(1.0, 5.0, 50.0), (0.1, 5.0, 14.0), (0.05, 5.0, 12.0)])
# A layer with no sparse kernel at all.
NOKERNEL = _layer("norm.weight", [(1.0, 1.0, 0.0), (0.1, 1.0, 0.0)])


def test_choose_plan_picks_sparse_only_where_it_is_faster() -> None:
    """The whole point: sparse where measured faster, masked dense everywhere else."""
    profile = _profile(FC, CONV, NOKERNEL)
    assert choose_plan(profile, {"fc.weight": 0.1, "conv.weight": 0.05, "norm.weight": 0.1}) == {
        "fc.weight"
    }
    assert choose_plan(profile, {"fc.weight": 0.5, "conv.weight": 0.1, "norm.weight": 0.1}) == set()


def test_choose_plan_interpolates_between_measured_densities() -> None:
    """At 0.3 the interpolated sparse time (10.67) is above dense: dense; at 0.25 (8.33) it wins
    by more than the margin: sparse."""
    profile = _profile(FC)
    assert interpolate_point(FC, 0.3) == pytest.approx((10.0, 6.0 + (0.1 / 0.3) * 14.0))
    assert choose_plan(profile, {"fc.weight": 0.3}) == set()
    assert choose_plan(profile, {"fc.weight": 0.25}) == {"fc.weight"}


def test_choose_plan_demands_the_margin() -> None:
    """A sparse kernel only 5% faster stays unused at the default margin (noise protection)."""
    layer = _layer("fc.weight", [(1.0, 10.0, 9.5), (0.1, 10.0, 9.5)])
    assert choose_plan(_profile(layer), {"fc.weight": 0.1}) == set()
    assert choose_plan(_profile(layer), {"fc.weight": 0.1}, margin=1.0) == {"fc.weight"}
    with pytest.raises(ConfigError, match="margin"):
        choose_plan(_profile(layer), {"fc.weight": 0.1}, margin=0.0)


def test_choose_plan_is_not_fooled_by_a_dense_time_spike() -> None:
    """Dense work does not depend on density, so one slow dense measurement (load from another
    process) must not make the sparse kernel look faster at that density."""
    spiky = _layer("fc.weight", [(1.0, 10.0, 40.0), (0.5, 80.0, 20.0), (0.1, 10.0, 3.0)])
    assert choose_plan(_profile(spiky), {"fc.weight": 0.5}) == set()


def test_choose_plan_is_not_fooled_by_a_lucky_sparse_time() -> None:
    """Sparse work grows with density, so a sparse time below the one measured at a lower
    density is noise; the chooser uses the larger one. (Measured on the development machine:
    conv1 of femnist_cnn timed 2.25 ms sparse at 0.1 but 3.98 ms at 0.05, against 2.5 ms dense.)
    """
    lucky = _layer(
        "conv.weight",
        [
            (1.0, 2.27, 4.37),
            (0.5, 2.54, 2.84),
            (0.2, 2.34, 3.68),
            (0.1, 3.13, 2.25),
            (0.05, 2.57, 3.98),
        ],
    )
    assert choose_plan(_profile(lucky), {"conv.weight": 0.1}) == set()
    assert layer_cost(_profile(lucky), "conv.weight", 0.1) == pytest.approx(2.54)


def test_choose_plan_clamps_outside_the_measured_range() -> None:
    """Below the sparsest measured density the sparsest point is used (an upper bound on the
    sparse time); density 0 (a fully pruned layer) is valid."""
    profile = _profile(FC, CONV)
    assert choose_plan(profile, {"fc.weight": 0.0, "conv.weight": 0.0}) == {"fc.weight"}
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        choose_plan(profile, {"fc.weight": 1.5})


def test_choose_plan_ignores_layers_the_profile_does_not_know() -> None:
    """No measurement, no kernel: unknown layers stay masked dense."""
    assert choose_plan(_profile(FC), {"other.weight": 0.01}) == set()


def test_layer_cost_is_the_cost_of_the_kernel_the_plan_uses() -> None:
    """PruneFL's c_l * nnz_l must describe the kernel the device really runs at that density."""
    profile = _profile(FC, CONV)
    assert layer_cost(profile, "fc.weight", 0.1) == pytest.approx(3.0)
    assert layer_cost(profile, "fc.weight", 0.5) == pytest.approx(10.0)
    assert layer_cost(profile, "conv.weight", 0.05) == pytest.approx(5.0)
    assert layer_cost(profile, "fc.weight", 0.15) == pytest.approx(4.5)
    with pytest.raises(NotFoundError, match=r"known: fc\.weight, conv\.weight"):
        layer_cost(profile, "missing.weight", 0.1)


def test_default_margin_leaves_room_for_noise() -> None:
    """The default must demand a real gain, or noise alone could pick a slower kernel."""
    assert 0.0 < DEFAULT_MARGIN < 1.0
