import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paser.errors import ConfigError
from paser.selection.allocate import ALLOCATION_RULES, allocate, apportion, ies, rank_within

clusters = st.integers(1, 12).flatmap(lambda k: st.tuples(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=k, max_size=k),
    st.lists(st.integers(0, 60), min_size=k, max_size=k),
    st.integers(0, 400)))


@given(clusters)
@settings(max_examples=300, deadline=None)
def test_apportion_is_exact_and_capped(case):
    weights, capacity, budget = map(np.array, case)
    alloc = apportion(weights, int(budget), capacity)
    assert alloc.sum() == min(budget, capacity.sum())
    assert np.all(alloc >= 0) and np.all(alloc <= capacity)
    # Zero-weight clusters only get budget once every positive-weight cluster is full.
    positive = weights > 0
    if np.any(alloc[~positive] > 0):
        assert np.all(alloc[positive] == capacity[positive])


@given(st.lists(st.floats(0.01, 1), min_size=2, max_size=10), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_apportion_is_proportional_when_no_cap_binds(weights, budget):
    weights = np.array(weights)
    alloc = apportion(weights, budget, np.full(len(weights), 10_000))
    ideal = budget * weights / weights.sum()
    assert np.all(np.abs(alloc - ideal) < 1.0)


def test_leftover_from_full_cluster_goes_by_weight():
    alloc = apportion(np.array([10.0, 3.0, 1.0]), 40, np.array([5, 100, 100]))
    assert alloc.tolist() == [5, 26, 9]


@given(clusters)
@settings(max_examples=100, deadline=None)
def test_every_rule_is_exact(case):
    cds, sizes, budget = map(np.array, case)
    for rule in ALLOCATION_RULES:
        result = allocate(sizes, cds, int(budget), rule)
        assert result.budgets.sum() == min(budget, sizes.sum())
        assert np.all(result.budgets <= sizes)


def test_zero_cds_falls_back_to_size_and_says_so():
    result = allocate(np.array([30, 10]), np.zeros(2), 8, "cds")
    assert result.budgets.tolist() == [6, 2]
    assert "identical models" in result.fallback


def test_cds_and_mass_differ():
    sizes, cds = np.array([90, 30]), np.array([0.1, 0.6])
    assert allocate(sizes, cds, 20, "cds").budgets.tolist() == [3, 17]
    assert allocate(sizes, cds, 20, "mass").budgets.tolist() == [7, 13]


def test_blend_is_half_size_half_mass():
    sizes, cds = np.array([90, 30]), np.array([0.1, 0.6])
    # size shares 15 / 5, mass shares 6.67 / 13.33: their mean 10.83 / 9.17
    assert allocate(sizes, cds, 20, "blend").budgets.tolist() == [11, 9]
    sizes, cds = np.array([500, 100, 100]), np.array([0.01, 0.5, 0.5])  # a large, barely damaged cluster
    budgets = allocate(sizes, cds, 70, "blend").budgets
    assert budgets[0] >= 0.5 * 70 * 500 / 700  # at least half its pool share (25 of 50) ...
    assert allocate(sizes, cds, 70, "mass").budgets[0] <= 4  # ... where mass gives it 3


def test_new_rule_is_a_few_lines():
    @ALLOCATION_RULES.register("uniform_test")
    def uniform(sizes, cds):
        return np.ones(len(sizes))

    try:
        assert allocate(np.array([50, 50, 50]), np.array([0.1, 0.2, 0.3]), 9, "uniform_test").budgets.tolist() == [3, 3, 3]
    finally:
        ALLOCATION_RULES.unregister("uniform_test")
    with pytest.raises(ConfigError, match="unknown allocation rule"):
        allocate(np.array([1]), np.array([1.0]), 1, "uniform_test")


def test_ies_guards_small_costs_and_ranks_deterministically():
    values = ies(np.array([0.2, 0.2, 0.2]), np.array([1, 2, 100]))
    assert values[0] == values[1] == pytest.approx(0.2)  # log floored at 1
    assert values[2] == pytest.approx(0.2 / math.log(100))
    assert rank_within(np.array([0.5, 0.9, 0.5, 0.1])).tolist() == [1, 0, 2, 3]
