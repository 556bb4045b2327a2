"""Per-layer density allocation: the global budget is met exactly and ERK follows RigL."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.errors import ConfigError
from device.sparse.density import allocate, erk, erk_raw, kept_count, total_kept, uniform

# A FedDST mnist_cnn-like set of shapes: conv, conv, a huge linear, a small output linear.
MNIST_SHAPES = {
    "conv1.weight": (10, 1, 5, 5),
    "conv2.weight": (20, 10, 5, 5),
    "fc1.weight": (50, 5120),
    "fc2.weight": (10, 50),
}

shape_st = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 5), st.integers(1, 5)),
)
shapes_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4), shape_st, min_size=1, max_size=6
)


def rigl_erk_reference(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """RigL's get_sparsities_erdos_renyi loop transcribed with sparsities, as real numbers."""
    sparsity = 1.0 - density
    dense: set[str] = set()
    while True:
        divisor = 0.0
        rhs = 0.0
        raw: dict[str, float] = {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            n_zeros = n_param * sparsity
            n_ones = n_param * (1 - sparsity)
            if name in dense:
                rhs -= n_zeros
            else:
                rhs += n_ones
                raw[name] = sum(shape) / math.prod(shape)
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense.update(n for n, p in raw.items() if p == max_prob)
        else:
            break
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@given(shapes=shapes_st, density=st.floats(0.0, 1.0))
@settings(max_examples=200, deadline=None)
def test_uniform_meets_the_global_budget_exactly(
    shapes: dict[str, tuple[int, ...]], density: float
) -> None:
    """The budget is what the user asked for: rounding per layer must not drift from it."""
    total = sum(math.prod(s) for s in shapes.values())
    densities = uniform(shapes, density)
    assert total_kept(densities, shapes) == round(density * total)
    for name, shape in shapes.items():
        assert abs(kept_count(densities[name], math.prod(shape)) - density * math.prod(shape)) <= 1


@given(shapes=shapes_st, density=st.floats(0.0, 1.0))
@settings(max_examples=200, deadline=None)
def test_erk_meets_the_global_budget_exactly(
    shapes: dict[str, tuple[int, ...]], density: float
) -> None:
    """ERK redistributes the budget between layers but must keep its total."""
    total = sum(math.prod(s) for s in shapes.values())
    densities = erk(shapes, density)
    assert set(densities) == set(shapes)
    assert all(0.0 <= d <= 1.0 for d in densities.values())
    assert total_kept(densities, shapes) == round(density * total)


@given(shapes=shapes_st, density=st.floats(0.0, 0.999))
@settings(max_examples=200, deadline=None)
def test_erk_matches_rigls_real_valued_allocation_within_one_parameter_per_layer(
    shapes: dict[str, tuple[int, ...]], density: float
) -> None:
    """Same allocation as RigL's sparse_utils; only the integer apportionment may move a unit.

    (RigL's loop divides by zero at density 1, which ``erk`` handles as all-dense.)"""
    reference = rigl_erk_reference(shapes, density)
    densities = erk(shapes, density)
    for name, shape in shapes.items():
        n = math.prod(shape)
        assert abs(kept_count(densities[name], n) - reference[name] * n) < 1.0 + 1e-6


def test_erk_makes_a_layer_dense_when_its_share_would_exceed_one() -> None:
    """Hand-computed: a 2x2 layer's raw ERK share is 1 (eps = 24.5 would give it 24.5x its size),
    so it becomes dense and the 100x100 layer gets the rest: (5002 - 4) / 10000 = 0.4998."""
    densities = erk({"small": (2, 2), "big": (100, 100)}, 0.5)
    assert densities == {"small": 1.0, "big": 0.4998}


def test_erk_raw_is_erdos_renyi_for_linear_and_adds_kernel_dims_for_conv() -> None:
    """Linear: (n_in + n_out) / (n_in * n_out); conv: the kernel dims join sum and product."""
    assert erk_raw((50, 5120)) == pytest.approx((50 + 5120) / (50 * 5120))
    assert erk_raw((20, 10, 5, 5)) == pytest.approx((20 + 10 + 5 + 5) / (20 * 10 * 5 * 5))
    assert erk_raw((20, 10, 5, 5), power_scale=0.5) == pytest.approx(
        ((20 + 10 + 5 + 5) / (20 * 10 * 5 * 5)) ** 0.5
    )


def test_erk_orders_layer_densities_by_their_raw_share() -> None:
    """ERK spends the budget where (sum of dims / size) is large: the 500-weight output layer
    (share 0.12, so eps * share > 1) becomes dense, then conv1 (0.084), fc1 (0.020),
    conv2 (0.008)."""
    densities = erk(MNIST_SHAPES, 0.2)
    assert densities["fc2.weight"] == 1.0
    assert 1.0 > densities["conv1.weight"] > densities["fc1.weight"] > densities["conv2.weight"]


def test_erk_with_power_scale_zero_is_uniform() -> None:
    """power_scale 0 makes every raw share 1, i.e. the uniform allocation."""
    assert erk(MNIST_SHAPES, 0.2, power_scale=0.0) == uniform(MNIST_SHAPES, 0.2)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("name", ["uniform", "erk"])
def test_the_extreme_densities_prune_everything_or_nothing(name: str, density: float) -> None:
    """Density 1 must be dense (FedAvg through the same code) and 0 must keep nothing."""
    assert allocate(name, MNIST_SHAPES, density) == dict.fromkeys(MNIST_SHAPES, density)


def test_allocate_dispatches_by_name() -> None:
    """The registry returns the named allocator's result."""
    assert allocate("erk", MNIST_SHAPES, 0.1) == erk(MNIST_SHAPES, 0.1)
    assert allocate("uniform", MNIST_SHAPES, 0.1) == uniform(MNIST_SHAPES, 0.1)


def test_allocate_rejects_an_unknown_name_listing_the_known_ones() -> None:
    """A typo in a config must say what would have been accepted."""
    with pytest.raises(
        ValueError, match=r"unknown density allocation 'erdos'; known: erk, uniform"
    ):
        allocate("erdos", MNIST_SHAPES, 0.2)


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan")])
def test_a_density_outside_zero_one_is_a_config_error(density: float) -> None:
    """Densities are kept fractions; anything else is a configuration mistake."""
    with pytest.raises(ConfigError, match="density"):
        erk(MNIST_SHAPES, density)
    with pytest.raises(ConfigError, match="density"):
        uniform(MNIST_SHAPES, density)


def test_an_empty_dimension_is_a_config_error_naming_the_tensor() -> None:
    """A zero-sized tensor cannot be given a density; the message says which one."""
    with pytest.raises(ConfigError, match="'bad'"):
        erk({"ok": (3, 3), "bad": (0, 3)}, 0.5)
