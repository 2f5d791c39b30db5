"""The netmoe test suite, one section per part: solver, placement, layer, training, kernels.

Distributed tests spawn gloo processes on the CPU; GPU tests (NCCL, kernels) skip without CUDA.
"""
import ast
import collections
import importlib.util
import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP, as train_gpt.py does: see there

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import click
from click.testing import CliRunner

import bench
import km
import netmoe
import train_gpt


# ---- solver: km.linear_sum_assignment and km.capacitated_assignment


def _fresh_cases(count):
    """`count` generators, each from a fresh seed that failures report, so any case replays."""
    for _ in range(count):
        seed = np.random.SeedSequence().entropy
        yield np.random.default_rng(seed), f"seed={seed}"


def _brute_lsap(c):
    """Exact optimum by trying every injective map of the shorter side (sides <= 7).
    Sums Python numbers, so integer input is summed exactly."""
    c = c if c.shape[0] <= c.shape[1] else c.T
    n, m = c.shape
    v = c.tolist()
    return min(sum(v[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


def _brute_capacitated(c, cap):
    """Exact optimum over every assignment of n <= 6 items with the given column counts."""
    v, cap = c.tolist(), tuple(int(x) for x in cap)
    return min(sum(v[i][a[i]] for i in range(len(v)))
               for a in itertools.product(range(len(cap)), repeat=len(v))
               if tuple(a.count(j) for j in range(len(cap))) == cap)


def _total(c, rows, cols):
    """The summed cost of a solution, exact (Python ints) for integer input."""
    return sum(c[i, j].item() for i, j in zip(rows, cols))


def _expanded_optimum(c, cap):
    """The paper's formulation: column j copied cap[j] times, solved as a square KM problem."""
    copies = np.repeat(np.arange(c.shape[1]), cap)
    r, e = km.linear_sum_assignment(c[:, copies])
    return _total(c, r, copies[e])


def _check_lsap_contract(c, r, col, why):
    n, m = c.shape
    assert r.dtype == col.dtype == np.int64 and r.shape == col.shape == (min(n, m),), why
    assert np.all(np.diff(r) > 0) and len(set(col.tolist())) == len(col), why
    assert np.all((0 <= r) & (r < n)) and np.all((0 <= col) & (col < m)), why


def _check_capacities(col, cap, why):
    assert col.dtype == np.int64 and np.array_equal(np.bincount(col, minlength=len(cap)), cap), why


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_lsap_finds_the_brute_force_optimum_of_small_matrices_of_any_shape(dtype):
    for rng, why in _fresh_cases(300):
        n, m = rng.integers(1, 7, size=2)
        c = rng.integers(-9, 10, size=(n, m)) if dtype == np.int64 else rng.normal(size=(n, m))
        r, col = km.linear_sum_assignment(c)
        _check_lsap_contract(c, r, col, why)
        assert _total(c, r, col) == pytest.approx(_brute_lsap(c), abs=1e-9), why


def test_lsap_ties_give_a_valid_optimum_and_the_same_answer_every_time():
    equal = np.full((5, 5), 3, dtype=np.int64)
    r, col = km.linear_sum_assignment(equal)
    _check_lsap_contract(equal, r, col, "all equal")
    assert sorted(col.tolist()) == [0, 1, 2, 3, 4]
    for rng, why in _fresh_cases(50):
        row = rng.integers(0, 4, size=int(rng.integers(3, 8)))
        same = np.tile(row, (int(rng.integers(1, len(row) + 1)), 1))   # repeated rows
        r, col = km.linear_sum_assignment(same)
        _check_lsap_contract(same, r, col, why)
        assert _total(same, r, col) == sum(sorted(row.tolist())[:len(same)]), why
        again = km.linear_sum_assignment(same.copy())
        assert np.array_equal(r, again[0]) and np.array_equal(col, again[1]), why


def test_lsap_is_exact_for_huge_and_negative_integers():
    for rng, why in _fresh_cases(60):
        n, m = rng.integers(1, 7, size=2)
        c = rng.integers(-2**40, 2**40, size=(n, m))
        r, col = km.linear_sum_assignment(c)
        assert _total(c, r, col) == _brute_lsap(c), why
        # near 2**54 float64 cannot tell neighbouring integers apart; int64 arithmetic can
        c = 2**54 + rng.integers(0, 16, size=(n, m))
        r, col = km.linear_sum_assignment(c)
        assert _total(c, r, col) == _brute_lsap(c), why


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_lsap_maximize_finds_the_largest_total(dtype):
    for rng, why in _fresh_cases(100):
        n, m = rng.integers(1, 7, size=2)
        c = rng.integers(-9, 10, size=(n, m)).astype(dtype)
        r, col = km.linear_sum_assignment(c, maximize=True)
        _check_lsap_contract(c, r, col, why)
        assert _total(c, r, col) == pytest.approx(-_brute_lsap(-c), abs=1e-9), why


@pytest.mark.parametrize("shape", [(0, 0), (0, 3), (3, 0)])
def test_lsap_of_an_empty_matrix_is_empty(shape):
    for c in (np.zeros(shape), np.zeros(shape, dtype=np.int64)):
        r, col = km.linear_sum_assignment(c)
        assert r.shape == col.shape == (0,) and r.dtype == col.dtype == np.int64


def test_lsap_never_uses_a_forbidden_infinite_entry():
    for rng, why in _fresh_cases(100):
        n, m = rng.integers(1, 7, size=2)
        c = rng.normal(size=(n, m))
        c[rng.random((n, m)) < 0.4] = np.inf
        best = _brute_lsap(c)
        if best == np.inf:
            with pytest.raises(ValueError, match="infeasible"):
                km.linear_sum_assignment(c)
            continue
        r, col = km.linear_sum_assignment(c)
        _check_lsap_contract(c, r, col, why)
        assert _total(c, r, col) == pytest.approx(best, abs=1e-9), why
        # maximize=True forbids -inf instead, as scipy does
        r, col = km.linear_sum_assignment(-c, maximize=True)
        assert _total(-c, r, col) == pytest.approx(-best, abs=1e-9), why


def test_lsap_raises_when_every_complete_matching_is_forbidden():
    c = np.array([[np.inf, 1.0, np.inf], [np.inf, 2.0, np.inf], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        km.linear_sum_assignment(c)


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_lsap_agrees_with_scipy(dtype):
    scipy_lsap = pytest.importorskip("scipy.optimize").linear_sum_assignment
    for rng, why in _fresh_cases(30):
        n = int(rng.integers(1, 200))
        m = n if rng.random() < 0.3 else int(rng.integers(1, 200))
        c = rng.integers(-1000, 1000, size=(n, m)) if dtype == np.int64 else rng.random((n, m))
        maximize = bool(rng.integers(2))
        r, col = km.linear_sum_assignment(c, maximize=maximize)
        r2, col2 = scipy_lsap(c, maximize=maximize)
        _check_lsap_contract(c, r, col, why)
        assert r.shape == r2.shape, why
        if n <= m:   # every row is matched: row_ind is 0..n-1 in both
            assert np.array_equal(r, r2), why
        if dtype == np.int64:
            assert _total(c, r, col) == _total(c, r2, col2), why
        else:
            assert c[r, col].sum() == pytest.approx(c[r2, col2].sum(), rel=1e-9), why


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_capacitated_equals_km_on_the_expanded_matrix(dtype):
    for rng, why in _fresh_cases(200):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 9))
        cap = rng.multinomial(n, rng.dirichlet(np.ones(k)))       # zero capacities happen too
        c = rng.integers(-30, 30, size=(n, k)) if dtype == np.int64 else rng.normal(size=(n, k))
        col = km.capacitated_assignment(c, cap)
        _check_capacities(col, cap, why)
        assert _total(c, range(n), col) == pytest.approx(_expanded_optimum(c, cap), abs=1e-9), why


def test_capacitated_finds_the_brute_force_optimum_of_tiny_problems():
    for rng, why in _fresh_cases(100):
        n, k = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.integers(-5, 6, size=(n, k)) if rng.random() < 0.5 else rng.normal(size=(n, k))
        col = km.capacitated_assignment(c, cap)
        _check_capacities(col, cap, why)
        assert _total(c, range(n), col) == pytest.approx(_brute_capacitated(c, cap), abs=1e-9), why


def test_capacitated_stays_optimal_when_most_items_prefer_one_column():
    # The skewed case: the cheapest-column start is far from balanced (warm start, long runs
    # of moves out of one column).
    for rng, why in _fresh_cases(6):
        n, k = int(rng.integers(300, 700)), int(rng.integers(2, 9))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.integers(0, 1000, size=(n, k))
        c[:, int(rng.integers(k))] -= int(rng.integers(0, 2000))
        col = km.capacitated_assignment(c, cap)
        _check_capacities(col, cap, why)
        assert _total(c, range(n), col) == _expanded_optimum(c, cap), why


def test_capacitated_edge_cases_one_column_zero_capacity_no_items():
    assert km.capacitated_assignment(np.arange(5.0)[:, None], [5]).tolist() == [0] * 5
    col = km.capacitated_assignment(np.array([[0, 9, 1], [0, 9, 2], [5, 0, 0]]), [0, 1, 2])
    assert col.tolist() == [2, 2, 1]
    empty = km.capacitated_assignment(np.zeros((0, 3)), [0, 0, 0])
    assert empty.shape == (0,) and empty.dtype == np.int64


def test_capacitated_is_deterministic_under_ties():
    for rng, why in _fresh_cases(20):
        n, k = int(rng.integers(1, 200)), int(rng.integers(1, 10))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.integers(0, 2, size=(n, k))        # many equal costs
        first = km.capacitated_assignment(c, cap)
        _check_capacities(first, cap, why)
        assert np.array_equal(first, km.capacitated_assignment(c.copy(), cap.copy())), why
        assert np.array_equal(first, km.capacitated_assignment(c.astype(np.int32), list(cap))), why
    ties = np.ones((12, 3), dtype=np.int64)
    assert np.array_equal(km.capacitated_assignment(ties, [4, 4, 4]),
                          km.capacitated_assignment(ties, [4, 4, 4]))


def test_capacitated_is_exact_for_huge_integers():
    for rng, why in _fresh_cases(20):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.integers(-2**40, 2**40, size=(n, k))
        col = km.capacitated_assignment(c, cap)
        assert _total(c, range(n), col) == _expanded_optimum(c, cap), why
        c = 2**54 + rng.integers(0, 16, size=(n, k))   # beyond float64's integer precision
        col = km.capacitated_assignment(c, cap)
        assert _total(c, range(n), col) == _expanded_optimum(c, cap), why
        if n <= 6:
            assert _total(c, range(n), col) == _brute_capacitated(c, cap), why


def test_capacitated_never_uses_a_forbidden_infinite_entry():
    for rng, why in _fresh_cases(100):
        n, k = int(rng.integers(1, 7)), int(rng.integers(2, 5))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.normal(size=(n, k))
        c[rng.random((n, k)) < 0.4] = np.inf
        c[np.arange(n), rng.integers(0, k, size=n)] = 1.0     # every row keeps a finite entry
        best = _brute_capacitated(c, cap)
        if best == np.inf:
            with pytest.raises(ValueError, match="infeasible"):
                km.capacitated_assignment(c, cap)
            continue
        col = km.capacitated_assignment(c, cap)
        _check_capacities(col, cap, why)
        assert _total(c, range(n), col) == pytest.approx(best, abs=1e-9), why


def test_capacitated_agrees_with_scipy_on_the_expanded_matrix():
    scipy_lsap = pytest.importorskip("scipy.optimize").linear_sum_assignment
    for rng, why in _fresh_cases(8):
        n, k = int(rng.integers(100, 800)), int(rng.integers(2, 17))
        cap = rng.multinomial(n, np.ones(k) / k)
        c = rng.integers(0, 5000, size=(n, k))
        if rng.random() < 0.5:
            c[:, 0] -= 3000          # skewed
        copies = np.repeat(np.arange(k), cap)
        r, e = scipy_lsap(c[:, copies])
        col = km.capacitated_assignment(c, cap)
        _check_capacities(col, cap, why)
        assert _total(c, range(n), col) == _total(c, r, copies[e]), why


def test_solvers_release_the_gil_while_they_solve():
    """Another Python thread keeps running while a solve is under way. It counts its turns: with
    the GIL held for the whole solve it would get none inside the solve (a thread cannot run
    Python without the GIL); released, it gets hundreds even on a busy 2-core machine, where the
    OS may pause it for a while, so the test counts turns rather than timing the gaps."""
    import threading
    import time
    rng = np.random.default_rng(0)
    square = rng.random((1200, 1200))
    skewed = rng.integers(0, 1000, size=(8192, 128))
    skewed[:, 0] -= 2000
    for solve in (lambda: km.linear_sum_assignment(square),
                  lambda: km.capacitated_assignment(skewed, np.full(128, 64))):
        stamps, stop = [], threading.Event()

        def tick():
            while not stop.is_set():
                stamps.append(time.perf_counter())
                time.sleep(0.0002)

        ticker = threading.Thread(target=tick)
        ticker.start()
        time.sleep(0.01)
        start = time.perf_counter()
        solve()
        end = time.perf_counter()
        stop.set()
        ticker.join()
        turns = sum(start < t < end for t in stamps)
        assert turns >= 20, f"the other thread ran {turns} times during a {end - start:.3f} s solve"


def test_capacitated_assignments_solve_each_block_as_capacitated_assignment_alone():
    for rng, why in _fresh_cases(60):
        m, k = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        cap = np.stack([rng.multinomial(int(rng.integers(0, 40)), rng.dirichlet(np.ones(k))) for _ in range(m)])
        n = int(cap.sum())            # blocks of no rows happen too
        kind = rng.integers(3)
        c = rng.integers(0, 3, size=(n, k)) if kind == 0 else rng.integers(-50, 50, size=(n, k)) if kind == 1 \
            else rng.normal(size=(n, k))
        ends = np.cumsum(cap.sum(1))
        alone = [km.capacitated_assignment(b, cp) for b, cp in zip(np.split(c, ends[:-1]), cap)]
        for cost in ([c, c.astype(np.int32)] if kind < 2 else [c]):
            col = km.capacitated_assignments(cost, cap)
            assert col.dtype == np.int64 and np.array_equal(col, np.concatenate(alone)), why


def test_negated_sum_is_minus_a_plus_b_in_int32_or_none_where_a_sum_does_not_fit():
    """km.negated_sum, the one-pass build of a stage's int32 costs from two counts: -(a + b)
    exactly; None (the caller sums in int64) where a sum reaches 2**31 or an input is negative;
    and _stage_cost gives the same costs either way, in int64 where they do not fit int32."""
    for rng, why in _fresh_cases(20):
        shape = tuple(int(v) for v in rng.integers(0, 40, size=int(rng.integers(1, 3))))
        a, b = (rng.integers(0, 2 ** int(rng.integers(1, 31)), size=shape, dtype=np.int32) for _ in range(2))
        got = km.negated_sum(a, b)
        want = -(a.astype(np.int64) + b)
        if want.size and want.min() < -(2 ** 31 - 1):
            assert got is None, why
        else:
            assert got.dtype == np.int32 and np.array_equal(got, want), why
        c = netmoe._stage_cost([a, b])
        assert np.array_equal(c, want) and c.dtype == (np.int32 if got is not None else np.int64), why
    top = np.full((2, 3), 2 ** 30, dtype=np.int32)
    assert np.array_equal(km.negated_sum(top, top - 1), np.full((2, 3), -(2 ** 31 - 1)))
    assert km.negated_sum(top, top) is None and km.negated_sum(-top, top) is None
    assert netmoe._stage_cost([top, top]).dtype == np.int64
    with pytest.raises(ValueError, match="one shape"):
        km.negated_sum(top, top[:1])
    with pytest.raises(ValueError, match="int32"):
        km.negated_sum(top, top.astype(np.int64))


def test_the_first_fill_on_threads_equals_one_thread(monkeypatch):
    """capacitated_assignment's first fill of the pairs, a column a thread (FILL_SPLIT, forced
    here on small problems), gives the placement of one thread: ties, spread and skewed integer
    costs (the warm start), int32 and int64, floats with forbidden entries, uneven capacities."""
    monkeypatch.setattr(km, "FILL_SPLIT", 0)
    for rng, why in _fresh_cases(40):
        n, k = int(rng.integers(1, 300)), int(rng.integers(1, 20))
        cap = rng.multinomial(n, rng.dirichlet(np.ones(k)))
        kind = rng.integers(4)
        c = (rng.integers(0, 3, size=(n, k)) if kind == 0 else rng.integers(-500, 0, size=(n, k)) if kind == 1
             else rng.integers(0, 50, size=(n, k)) + 40 * (np.arange(k) > 0) if kind == 2 else rng.normal(size=(n, k)))
        if kind == 3:
            c[rng.random((n, k)) < 0.2] = np.inf
            c[np.arange(n), rng.integers(0, k, n)] = rng.normal(size=n)   # every row one finite entry
        costs = [c, c.astype(np.int32)] if kind < 3 else [c]
        for cost in costs:
            try:
                one = km.capacitated_assignment(cost, cap)
            except ValueError:   # forbidden entries that make the capacities unreachable
                with pytest.raises(ValueError, match="infeasible"):
                    km.capacitated_assignment(cost, cap, threads=3)
                continue
            for threads in (2, 3):
                assert np.array_equal(km.capacitated_assignment(cost, cap, threads=threads), one), why
    with pytest.raises(ValueError, match="threads"):
        km.capacitated_assignment(np.zeros((2, 2)), [1, 1], threads=0)


@pytest.mark.parametrize("nodes", [2, 3, 7])
def test_stage_two_split_over_two_cores_equals_one_call(nodes, monkeypatch):
    """A large cluster's stage 2 runs its nodes in two halves on two threads (SPLIT_ENTRIES);
    forced here on small ones, odd node counts included, on ties and on spread costs."""
    monkeypatch.setattr(netmoe, "SPLIT_ENTRIES", 0)
    monkeypatch.setattr(netmoe.os, "cpu_count", lambda: 2)
    for rng, why in _fresh_cases(20):
        G, per = int(rng.integers(2, 9)), int(rng.integers(1, 6))
        M = nodes * G * per
        c = rng.integers(0, 3, size=(M, G)) if rng.integers(2) else rng.integers(-500, 0, size=(M, G))
        whole = km.capacitated_assignments(c, np.full((nodes, G), per, dtype=np.int64))
        assert np.array_equal(netmoe._solve_devices(c, nodes), whole), why


@pytest.mark.parametrize("call, message", [
    (lambda: km.linear_sum_assignment(np.zeros(3)), "2-D"),
    (lambda: km.linear_sum_assignment(np.zeros((2, 2, 2))), "2-D"),
    (lambda: km.linear_sum_assignment(np.array([[1.0, np.nan]])), "NaN"),
    (lambda: km.linear_sum_assignment(np.array([["a", "b"]])), "real numbers"),
    (lambda: km.linear_sum_assignment(np.array([[1j, 2]])), "real numbers"),
    (lambda: km.linear_sum_assignment(np.array([[-np.inf, 1.0]])), "-inf"),
    (lambda: km.linear_sum_assignment(np.array([[np.inf, 1.0]]), maximize=True), r"\+inf"),
    (lambda: km.linear_sum_assignment(np.array([[0, 2**62]])), "too wide"),
    (lambda: km.capacitated_assignment(np.zeros(4), [4]), "2-D"),
    (lambda: km.capacitated_assignment(np.array([[np.nan, 1.0], [1.0, 2.0]]), [1, 1]), "NaN"),
    (lambda: km.capacitated_assignment(np.array([["a"], ["b"]]), [2]), "real numbers"),
    (lambda: km.capacitated_assignment(np.array([[1.0, 2.0], [np.inf, np.inf]]), [1, 1]),
     "row 1 of cost has no finite entry"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), [[2, 2]]), "1-D"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), [2, 1, 1]), "one entry per cost column"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), [5, -1]), "non-negative"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), [2, 1]), "sum to 3 but cost has 4 rows"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), [2.5, 1.5]), "whole numbers"),
    (lambda: km.capacitated_assignment(np.zeros((4, 2)), ["2", "2"]), "whole numbers"),
    (lambda: km.capacitated_assignments(np.zeros((4, 2)), [2, 2]), "2-D with one row per block"),
    (lambda: km.capacitated_assignments(np.zeros((4, 2)), [[1, 1], [1, 2]]), "sum to 5 but cost has 4 rows"),
    (lambda: km.capacitated_assignments(np.zeros((4, 2)), [[3, -1], [1, 1]]), "non-negative"),
    (lambda: km.capacitated_assignments(np.array([[1.0, 2.0], [np.inf, np.inf]]), [[1, 0], [0, 1]]),
     "row 1 of cost has no finite entry"),
], ids=["lsap-1-D", "lsap-3-D", "lsap-nan", "lsap-strings", "lsap-complex", "lsap-minus-inf",
        "lsap-max-plus-inf", "lsap-too-wide-ints", "cap-1-D-cost", "cap-nan", "cap-strings",
        "cap-row-all-inf", "cap-2-D-capacity", "cap-wrong-length", "cap-negative", "cap-bad-sum",
        "cap-fractional", "cap-string-capacity", "caps-1-D-capacity", "caps-bad-sum", "caps-negative",
        "caps-row-all-inf"])
def test_bad_solver_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- placement: cost model (Eq. 1-4, 8) and Algorithm 1's two-stage Solve


def _balanced_assignments(n, groups):
    """Every way to put n items into `groups` labelled groups of n/groups each (brute force)."""
    per = n // groups
    def rec(i, left):
        if i == n:
            yield ()
            return
        for gi in range(groups):
            if left[gi]:
                left[gi] -= 1
                for rest in rec(i + 1, left):
                    yield (gi,) + rest
                left[gi] += 1
    yield from rec(0, [per] * groups)


def _assert_each_stage_is_optimal(dest, c, ci, topo):
    """Stage 1 (samples -> nodes, cost c) and stage 2 (each node's samples -> its devices, cost
    ci) reach the brute-force optimum over all balanced assignments."""
    I, N, G = len(dest), topo.nodes, topo.gpus_per_node
    node = dest // G
    best1 = min(sum(c[i, a[i]] for i in range(I)) for a in _balanced_assignments(I, N))
    assert c[np.arange(I), node].sum() == best1
    for n in range(N):
        m = np.flatnonzero(node == n)
        sub = ci[m][:, n * G:(n + 1) * G]
        best2 = min(sum(sub[i, a[i]] for i in range(len(m))) for a in _balanced_assignments(len(m), G))
        assert sub[np.arange(len(m)), dest[m] - n * G].sum() == best2


TOPOLOGIES = ["1x1", "1x4", "4x1", "2x2", "2x4", "4x2"]


@pytest.fixture
def rng():
    """A generator from a fresh seed, printed so that a failing test shows it (pytest prints a
    failure's captured output); NETMOE_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("NETMOE_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"rng seed {seed} (replay with NETMOE_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def _random_num(rng, I, E, skew=True):
    """Per-sample expert counts with some locality (a few favourite experts) or none."""
    if not skew:
        return rng.integers(0, 6, size=(I, E))
    fav = rng.dirichlet(np.full(E, 0.3), size=I)
    return np.stack([rng.multinomial(rng.integers(0, 40), f) for f in fav])


def test_count_tokens_matches_a_plain_loop(rng):
    route = rng.integers(0, 12, size=(5, 7, 3))
    num = netmoe.count_tokens(torch.as_tensor(route), 12)
    ref = np.zeros((5, 12), dtype=np.int64)
    for i, s, k in np.ndindex(route.shape):
        ref[i, route[i, s, k]] += 1
    assert num.dtype == torch.int64 and np.array_equal(num.numpy(), ref)
    with pytest.raises(ValueError):
        netmoe.count_tokens(torch.as_tensor(route), 11)


@pytest.mark.parametrize("spec", TOPOLOGIES)
def test_placement_costs_and_traffic_follow_their_definitions(spec, rng):
    topo = netmoe.Topology.parse(spec)
    J, G = topo.world, topo.gpus_per_node
    E = 2 * J
    num = _random_num(rng, 3 * J, E)
    ed = rng.permutation(np.arange(E) // 2)          # any balanced layout, not only blocks
    c, c_intra = netmoe.placement_costs(num, topo, ed)
    dev = rng.integers(0, J, size=len(num))
    vol = dict(local=0, intra=0, inter=0)
    for i in range(len(num)):
        for n in range(topo.nodes):
            assert c[i, n] == sum(num[i, e] for e in range(E) if ed[e] // G != n)
        for j in range(J):
            assert c_intra[i, j] == sum(num[i, e] for e in range(E) if ed[e] // G == j // G and ed[e] != j)
        for e in range(E):
            kind = "local" if ed[e] == dev[i] else "intra" if ed[e] // G == dev[i] // G else "inter"
            vol[kind] += num[i, e]
    assert netmoe.traffic(num, dev, topo, ed) == vol


def test_fig2_style_example_worked_by_hand():
    """I=4 samples, E=4 experts (one per device), K=1, S=2 tokens, 2 nodes of 2 devices.
    sample 0 -> experts 2, 3; sample 1 -> 0, 0; sample 2 -> 1, 1; sample 3 -> 2, 2.
    Static: 0 sits on node 0 (2 inter), 1 on device 1 (2 intra), 2 on node 1 (2 inter), 3 on
    device 3 (2 intra). Stage 1 puts {1, 2} on node 0 and {0, 3} on node 1 (inter cost 0);
    stage 2 puts 1 on device 0, 2 on device 1, 3 on device 2 and 0 on device 3 (expert 3 local,
    expert 2 one intra hop): 7 local, 1 intra, 0 inter."""
    topo = netmoe.Topology(2, 2)
    route = torch.tensor([[[2], [3]], [[0], [0]], [[1], [1]], [[2], [2]]])
    num = netmoe.count_tokens(route, 4)
    assert num.tolist() == [[0, 0, 1, 1], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]]
    c, c_intra = netmoe.placement_costs(num, topo)
    assert c.tolist() == [[2, 0], [0, 2], [0, 2], [2, 0]]
    assert c_intra.tolist() == [[0, 0, 1, 1], [0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 2]]
    dest = netmoe.solve_placement(num, topo)
    assert dest.tolist() == [3, 0, 1, 2]
    static = netmoe.static_placement(4, 4)
    assert netmoe.traffic(num, static, topo) == dict(local=0, intra=4, inter=4)
    assert netmoe.traffic(num, dest, topo) == dict(local=7, intra=1, inter=0)
    bpt = 4 * 768   # fp32 tokens of MoE-GPT-S
    assert netmoe.a2a_time(netmoe.traffic(num, static, topo), topo, bpt) == pytest.approx(4 * bpt / 100e9)
    assert netmoe.a2a_time(netmoe.traffic(num, dest, topo), topo, bpt) == pytest.approx(1 * bpt / 400e9)


@pytest.mark.parametrize("spec", TOPOLOGIES)
@pytest.mark.parametrize("lookahead", [False, True])
def test_placement_is_balanced_and_each_stage_is_exactly_optimal(spec, lookahead, rng):
    topo = netmoe.Topology.parse(spec)
    J = topo.world
    I = J * (8 // J if J <= 8 else 1) if J > 1 else 6
    for _ in range(3):
        num = _random_num(rng, I, 2 * J)
        nxt = _random_num(rng, I, 2 * J) if lookahead else None
        dest = netmoe.solve_placement(num, topo, num_next=nxt)
        assert dest.dtype == np.int64 and np.array_equal(np.bincount(dest, minlength=J), np.full(J, I // J))
        c, ci = netmoe.placement_costs(num, topo)
        if lookahead:
            cn, cin = netmoe.placement_costs(nxt, topo)
            c, ci = c + cn, ci + cin
        _assert_each_stage_is_optimal(dest, c, ci, topo)


@pytest.mark.parametrize("spec", TOPOLOGIES + ["4x8"])
def test_capacitated_and_expanded_km_reach_the_same_optimal_costs(spec, rng):
    topo = netmoe.Topology.parse(spec)
    I = topo.world * 4
    num, nxt = _random_num(rng, I, 2 * topo.world), _random_num(rng, I, 2 * topo.world)
    a = netmoe.solve_placement(num, topo, num_next=nxt)
    b = netmoe.solve_placement(num, topo, num_next=nxt, method="km")
    c, ci = (x + y for x, y in zip(netmoe.placement_costs(num, topo), netmoe.placement_costs(nxt, topo)))
    G = topo.gpus_per_node
    rows = np.arange(I)
    assert c[rows, a // G].sum() == c[rows, b // G].sum()
    if np.array_equal(a // G, b // G):   # same node split: stage 2 solves the same problems
        assert ci[rows, a].sum() == ci[rows, b].sum()


def test_placement_is_deterministic_for_identical_input(rng):
    topo = netmoe.Topology(4, 8)
    num = _random_num(rng, 256, 64, skew=False)   # small counts: many ties
    first = netmoe.solve_placement(num, topo, num_next=num[::-1].copy())
    for _ in range(3):
        assert np.array_equal(first, netmoe.solve_placement(num.copy(), topo, num_next=num[::-1].copy()))
    assert np.array_equal(first, netmoe.solve_placement(torch.as_tensor(num), topo, num_next=torch.as_tensor(num[::-1].copy())))


@pytest.mark.parametrize("spec", ["2x2", "2x8", "4x8", "1x8"])
def test_netmoe_is_never_worse_than_static_in_the_modelled_cost(spec, rng):
    topo = netmoe.Topology.parse(spec)
    I, E = topo.world * 4, topo.world * 2
    static = netmoe.static_placement(I, topo.world)
    for skew in (False, True):
        num = _random_num(rng, I, E, skew)
        dest = netmoe.solve_placement(num, topo)
        ours, base = netmoe.traffic(num, dest, topo), netmoe.traffic(num, static, topo)
        assert ours["inter"] <= base["inter"]
        assert netmoe.a2a_time(ours, topo, 3072) <= netmoe.a2a_time(base, topo, 3072)


def test_planted_locality_is_found(rng):
    """Each sample's tokens all go to the experts of one node, but static EP holds it elsewhere:
    NetMoE's gather removes every inter-node token."""
    topo = netmoe.Topology(4, 2)
    I, E = 32, 16
    home = rng.permutation(np.arange(I) % 4)
    num = np.zeros((I, E), dtype=np.int64)
    for i in range(I):
        num[i, home[i] * 4:(home[i] + 1) * 4] = rng.multinomial(50, np.full(4, 0.25))
    dest = netmoe.solve_placement(num, topo)
    assert netmoe.traffic(num, dest, topo)["inter"] == 0
    assert netmoe.traffic(num, netmoe.static_placement(I, 8), topo)["inter"] > 0


def test_pair_traffic_gives_the_split_sizes_behind_traffic(rng):
    for spec in ("2x2", "1x4", "4x1", "2x3"):
        topo = netmoe.Topology.parse(spec)
        J, I, E = topo.world, 3 * topo.world, 2 * topo.world
        num, sd = rng.integers(0, 9, size=(I, E)), rng.integers(0, J, size=I)
        ed = rng.permutation(np.repeat(np.arange(J), 2))
        T = bench.pair_traffic(num, sd, topo, ed)
        node = np.arange(J) // topo.gpus_per_node
        same, eye = node[:, None] == node[None], np.eye(J, dtype=bool)
        assert netmoe.traffic(num, sd, topo, ed) == {"local": T[eye].sum(), "intra": T[same & ~eye].sum(),
                                                     "inter": T[~same].sum()}
        assert np.array_equal(T.sum(1), np.bincount(sd, weights=num.sum(1), minlength=J))   # what j holds
        assert np.array_equal(T.sum(0), np.bincount(ed, weights=num.sum(0), minlength=J))   # what k's experts get


def _random_route(rng, I, S, K, E):
    """[I, S, K] distinct experts per token, each sample favouring a few (as a top-K gate does)."""
    fav = rng.dirichlet(np.full(E, 0.3), size=I) + 1e-3
    return np.stack([[rng.choice(E, K, replace=False, p=f / f.sum()) for _ in range(S)] for f in fav]).reshape(I, S, K)


def test_node_counts_match_a_plain_loop():
    rng = np.random.default_rng(21)
    for I, S, K, E, N in [(5, 7, 2, 12, 3), (4, 6, 1, 8, 2), (3, 5, 4, 8, 4), (2, 3, 3, 6, 1), (0, 4, 2, 8, 2),
                          (3, 0, 2, 8, 2)]:
        route = rng.integers(0, E, size=(I, S, K))
        expert_node = rng.integers(0, N, size=E)
        nc = netmoe.node_counts(torch.as_tensor(route), torch.as_tensor(expert_node), N)
        ref = np.zeros((I, N), dtype=np.int64)
        for i, s in np.ndindex(I, S):
            for n in set(expert_node[route[i, s]]):
                ref[i, n] += 1
        assert nc.dtype == torch.int64 and np.array_equal(nc.numpy(), ref), (I, S, K, E, N)
        assert np.array_equal(netmoe._node_counts(route, expert_node, N), ref), (I, S, K, E, N)   # the planner's
    z = lambda *shape: torch.zeros(*shape, dtype=torch.long)
    for bad in (lambda: netmoe.node_counts(z(2, 3, 2) + 1, z(1), 1),        # expert id past E
                lambda: netmoe.node_counts(z(2, 3, 2), z(4) + 2, 2),        # node id past N
                lambda: netmoe.node_counts(z(2, 6), z(4), 2),               # not [I, S, K]
                lambda: netmoe.node_counts(z(2, 3, 2), z(4), 0)):           # no nodes
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("spec", TOPOLOGIES + ["3x2"])
def test_node_exchange_costs_and_volumes_count_the_rows_each_hop_sends(spec):
    """Brute force over tokens: a sample on (n, g) sends one rail row per (token, node m != n
    holding any of its experts) to (m, g), then on every node m one NVLink row per (token, k)
    from (m, g) to the expert's device. The gather is the same rows reversed."""
    rng = np.random.default_rng(22)
    topo = netmoe.Topology.parse(spec)
    N, G, J = topo.nodes, topo.gpus_per_node, topo.world
    E = 2 * J
    for K in (1, 2, 3):
        route = _random_route(rng, 2 * J, 5, min(K, E), E)
        ed = rng.permutation(np.arange(E) // 2)
        num, nc = netmoe.count_tokens(route, E).numpy(), netmoe.node_counts(route, ed // G, N).numpy()
        routing = netmoe.Routing.of(num, topo, ed, "node", node_count=nc)
        assert np.array_equal(routing.layout["node_count"],
                              netmoe.Routing.from_routes(route, topo, E, ed, "node").layout["node_count"])
        c, c_intra = netmoe.placement_costs(routing, topo)
        sd = rng.integers(0, J, size=len(num))
        vol = dict(local=0, intra=0, inter=0)
        for i in range(len(num)):
            rail = lambda m, j: m * G + j % G   # the device of node m on the rail of device j
            for n in range(N):
                assert c[i, n] == sum(len(set(ed[route[i, s]] // G) - {n}) for s in range(route.shape[1]))
            for j in range(J):
                assert c_intra[i, j] == sum(ed[e] != rail(ed[e] // G, j) for e in route[i].reshape(-1))
            for s in range(route.shape[1]):
                vol["inter"] += len(set(ed[route[i, s]] // G) - {sd[i] // G})
                for e in route[i, s]:
                    vol["local" if ed[e] == rail(ed[e] // G, sd[i]) else "intra"] += 1
        assert netmoe.traffic(routing, sd, topo) == vol
        flat = netmoe.traffic(num, sd, topo, ed)
        # one rail row per (token, node) replaces every (token, expert) row to that node
        assert vol["inter"] <= flat["inter"] and (K > 1 or vol["inter"] == flat["inter"])
        if N == 1:   # no rails: the two exchanges are the same
            assert vol == flat
            assert all(np.array_equal(a, b) for a, b in zip((c, c_intra), netmoe.placement_costs(num, topo, ed)))


@pytest.mark.parametrize("spec", TOPOLOGIES)
@pytest.mark.parametrize("lookahead", [False, True])
def test_node_exchange_placement_is_balanced_and_each_stage_is_exactly_optimal(spec, lookahead):
    rng = np.random.default_rng(23)
    topo = netmoe.Topology.parse(spec)
    N, G, J = topo.nodes, topo.gpus_per_node, topo.world
    I, E = J * (8 // J if J <= 8 else 1) if J > 1 else 6, 2 * J
    for _ in range(3):
        ed, ed_next = (rng.permutation(np.arange(E) // 2) for _ in range(2))
        route, nxt = _random_route(rng, I, 6, 2, E), _random_route(rng, I, 6, 2, E)
        num, nc = netmoe.count_tokens(route, E).numpy(), netmoe.node_counts(route, ed // G, N).numpy()
        routing = netmoe.Routing.of(num, topo, ed, "node", node_count=nc)
        following = netmoe.Routing.of(netmoe.count_tokens(nxt, E).numpy(), topo, ed_next, "node",
                                      node_count=netmoe.node_counts(nxt, ed_next // G, N).numpy()) if lookahead else None
        dest = netmoe.solve_placement(routing, topo, num_next=following)
        assert dest.dtype == np.int64 and np.array_equal(np.bincount(dest, minlength=J), np.full(J, I // J))
        c, ci = netmoe.placement_costs(routing, topo)
        if lookahead:
            cn, cin = netmoe.placement_costs(following, topo)
            c, ci = c + cn, ci + cin
        _assert_each_stage_is_optimal(dest, c, ci, topo)


def test_eq1_time_of_the_node_exchange_adds_its_two_hops():
    topo = netmoe.Topology(2, 4, intra_lat=1e-6, inter_lat=5e-6)
    v = dict(local=7, intra=40, inter=10)
    t_intra, t_inter = 1e-6 + 40 * 64 / 400e9, 5e-6 + 10 * 64 / 100e9
    assert netmoe.a2a_time(v, topo, 64) == pytest.approx(max(t_intra, t_inter))
    assert netmoe.a2a_time(v, topo, 64, exchange="node") == pytest.approx(t_intra + t_inter)
    assert netmoe.a2a_time(dict(local=3, intra=0, inter=0), topo, 64, exchange="node") == 0.0


_ROUTE = torch.tensor([[[0, 2], [0, 1]], [[1, 2], [2, 3]], [[0, 3], [1, 3]], [[0, 1], [0, 1]]])   # I=4 S=2 K=2 E=4
_T = netmoe.Topology(2, 2)
_NUM, _NC = netmoe.count_tokens(_ROUTE, 4).numpy(), netmoe.node_counts(_ROUTE, torch.tensor([0, 0, 1, 1]), 2).numpy()


_RNODE = netmoe.Routing.of(_NUM, _T, exchange="node", node_count=_NC)


@pytest.mark.parametrize("call, message", [
    (lambda: netmoe.Routing.of(_NUM, _T, exchange="nodes"), "exchange must be"),
    (lambda: netmoe.Routing.of(_NUM, _T, exchange="node"), "needs node_count"),
    (lambda: netmoe.Routing.of(_NUM, _T, node_count=_NC), "only used by exchange='node'"),
    (lambda: netmoe.Routing.of(_NUM, _T, exchange="node", node_count=_NC[:, :1]), "must be"),
    (lambda: netmoe.Routing.of(_NUM, _T, exchange="node", node_count=-_NC), "negative"),
    (lambda: netmoe.Routing.of(_NUM, _T, exchange="node", node_count=_NC + 5), "does not fit"),
    (lambda: netmoe.Routing.of(_NUM, _T, [1, 2, 3, 0], exchange="node", node_count=_NC), "does not fit"),
    (lambda: netmoe.solve_placement(_RNODE, _T, num_next=_NUM), "num_next must be counted for the node exchange"),
    (lambda: netmoe.placement_costs(_RNODE, _T, expert_device=[1, 0, 1, 0]), "its own expert map"),
    (lambda: netmoe.traffic(_RNODE, [0, 1, 2, 3], netmoe.Topology(1, 4)), "a Routing on 2x2"),
    (lambda: netmoe.layer_stats(_RNODE, [0, 1, 2, 3], [0, 1, 2, 9], _T, 4), "dest"),
    (lambda: netmoe.a2a_time(dict(local=0, intra=1, inter=1), _T, 4, exchange="tree"), "exchange must be"),
    (lambda: netmoe.Routing.from_routes(_ROUTE + 4, _T, 4, exchange="node"), "outside"),
    (lambda: netmoe.replay([_RNODE, _RNODE], _T, 4, nexts=[_NUM]), "same exchange"),
    (lambda: netmoe.replay([_RNODE, _NUM], _T, 4), "counted for one exchange"),
], ids=["name", "missing", "unused", "shape", "negative", "too-many", "other-layout", "next-other-exchange",
        "other-map", "other-topology", "dest-range", "a2a-name", "routes-range", "replay-next", "replay-mixed"])
def test_bad_node_exchange_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _dense_solve(c, ci, topo):
    """Algorithm 1's Solve the plain way, the reference of the staged one: stage 1 on the dense
    [I, N] cost c, then each node's samples (ascending) on that node's columns of the dense
    [I, J] cost ci, one capacitated assignment per node."""
    I, N, G = len(c), topo.nodes, topo.gpus_per_node
    node = np.zeros(I, dtype=np.int64) if N == 1 else km.capacitated_assignment(c, np.full(N, I // N))
    dest = np.empty(I, dtype=np.int64)
    for n in range(N):
        m = np.flatnonzero(node == n)
        dest[m] = n * G + (0 if G == 1 else km.capacitated_assignment(ci[m, n * G:(n + 1) * G], np.full(G, len(m) // G)))
    return dest


def _random_routing(rng, topo, exchange, I, E, S=6, K=2):
    """A Routing of random routes under a random balanced expert layout; some samples route every
    token to one expert and some route nothing at all (counted as if empty), so ties abound."""
    route = _random_route(rng, I, S, min(K, E), E)
    route[rng.random(I) < 0.2] = route[0]
    r = netmoe.Routing.from_routes(route, topo, E, rng.permutation(np.arange(E) // (E // topo.world)), exchange)
    empty = rng.random(I) < 0.2
    num = np.where(empty[:, None], 0, r.num)
    layout = {k: np.where(empty[:, None], 0, v) for k, v in r.layout.items()}
    return netmoe.Routing.of(num, topo, r.expert_device, exchange, **layout)


@pytest.mark.parametrize("spec", TOPOLOGIES + ["3x2", "1x8", "8x1", "4x8"])
@pytest.mark.parametrize("exchange", ["expert", "node"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_the_solve_in_the_size_of_its_stages_equals_the_dense_solve(spec, exchange, lookahead, rng):
    """Stage 1 priced on [I, N], stage 2 on each node's [M, G] and every node solved in one call
    (what solve_placement does), against the plain dense solve on Eq. 8's exact costs: the same
    placement, ties broken the same way, and the stages as a node's ranks call them alone."""
    topo = netmoe.Topology.parse(spec)
    J, N, G = topo.world, topo.nodes, topo.gpus_per_node
    for _ in range(4):
        I, E = J * int(rng.integers(1, 5)), J * int(rng.integers(1, 4))
        routing = _random_routing(rng, topo, exchange, I, E)
        following = _random_routing(rng, topo, exchange, I, E) if lookahead else None
        c, ci = netmoe.placement_costs(routing, topo)
        if lookahead:
            cn, cin = netmoe.placement_costs(following, topo)
            c, ci = c + cn, ci + cin
        dest = netmoe.solve_placement(routing, topo, num_next=following)
        assert np.array_equal(dest, _dense_solve(c, ci, topo))
        # as the layer calls them: stage 1 on the summed [I, N] cost, then every node alone on
        # its own samples' [M, G] cost (exact or up to a constant per sample: the same placement)
        rs = [routing] + ([following] if lookahead else [])
        shifted = netmoe._node_costs(rs)
        assert shifted.dtype == np.int32 and np.array_equal(shifted - shifted[:, :1], c - c[:, :1])
        node = netmoe._solve_nodes(shifted, N)
        assert np.array_equal(node, netmoe._solve_nodes(c, N)) and np.array_equal(node, dest // G)
        for n in range(N):
            m = np.flatnonzero(node == n)
            local = netmoe._device_costs(rs, m, node[m])
            assert np.array_equal(local - local[:, :1], ci[m, n * G:(n + 1) * G] - ci[m, n * G:n * G + 1])
            assert np.array_equal(n * G + netmoe._solve_devices(local), dest[m])
            assert np.array_equal(netmoe._solve_devices(ci[m, n * G:(n + 1) * G]), dest[m] - n * G)


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_a_routing_of_its_reach_alone_solves_and_prices_as_the_routing_of_counts(exchange, rng):
    """Routing.of_reach holds what the solve and the cost model read, as a rank can: int32
    counts per node [I, N] and per device [I, N, G] (or [I, G], the node exchange's), no [I, E]."""
    topo = netmoe.Topology(3, 2)
    I, E = 12, 12
    routing, following = (_random_routing(rng, topo, exchange, I, E) for _ in range(2))
    held = [netmoe.Routing.of_reach(r.reach.node.astype(np.int32), r.reach.device.astype(np.int32), topo, exchange)
            for r in (routing, following)]
    assert held[0].num is None and held[0].reach.node.dtype == np.int32
    dest = netmoe.solve_placement(routing, topo, num_next=following)
    assert np.array_equal(netmoe.solve_placement(held[0], topo, num_next=held[1]), dest)
    sd = rng.integers(0, topo.world, size=I)
    assert netmoe.traffic(held[0], sd, topo) == netmoe.traffic(routing, sd, topo)
    assert all(np.array_equal(a, b) for a, b in zip(netmoe.placement_costs(held[0], topo),
                                                    netmoe.placement_costs(routing, topo)))
    if exchange == "node":   # the same counts on every node: [I, G] is enough
        rail = netmoe.Routing.of_reach(routing.reach.node, routing.reach.device[:, 0], topo, exchange)
        assert np.array_equal(netmoe.solve_placement(rail, topo), netmoe.solve_placement(routing, topo))
    order = rng.permutation(I)
    assert np.array_equal(netmoe.solve_placement(held[0].by(order), topo), netmoe.solve_placement(routing.by(order), topo))


def test_counts_too_large_for_int32_costs_are_solved_in_int64(rng):
    """Stage costs are int32 where every sum fits and int64 where one would not: the same
    placement as the dense solve either way."""
    topo = netmoe.Topology(2, 2)
    for scale in (1, 2 ** 29):
        num, nxt = (_random_num(rng, 16, 8) * scale for _ in range(2))
        rs = [netmoe.Routing.of(x, topo) for x in (num, nxt)]
        assert netmoe._node_costs(rs).dtype == (np.int32 if scale == 1 else np.int64)
        c, ci = (a + b for a, b in zip(netmoe.placement_costs(num, topo), netmoe.placement_costs(nxt, topo)))
        assert np.array_equal(netmoe.solve_placement(num, topo, num_next=nxt), _dense_solve(c, ci, topo))


@pytest.mark.parametrize("call, message", [
    (lambda: netmoe.Routing.of_reach(np.ones((4, 3)), np.ones((4, 2, 2)), _T), "node must be"),
    (lambda: netmoe.Routing.of_reach(np.ones((4, 2)), np.ones((4, 2, 3)), _T), "node must be"),
    (lambda: netmoe.Routing.of_reach(np.ones((4, 2)), np.ones((3, 2)), _T), "node must be"),
    (lambda: netmoe.Routing.of_reach(np.ones((4, 2)), np.ones((4, 2)), _T), "must hold integers"),
    (lambda: netmoe.Routing.of_reach(-np.ones((4, 2), int), np.ones((4, 2), int), _T), "negative"),
    (lambda: netmoe.Routing.of_reach(np.ones((4, 2), int), np.ones((4, 2), int), "2x2"), "netmoe.Topology"),
    (lambda: netmoe.Routing.of_reach(np.ones((4, 2), int), np.ones((4, 2), int), _T, "tree"), "exchange must be"),
], ids=["node-shape", "device-shape", "samples", "floats", "negative", "topology", "exchange"])
def test_bad_reach_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_expert_layout_is_balanced_and_recovers_hidden_expert_groups(rng):
    """Samples use the experts of one hidden group of 4, the groups scattered over the contiguous
    blocks: the learned layout puts each group on one node, so NetMoE keeps every token inside."""
    topo = netmoe.Topology(4, 2)
    E, I = 16, 64
    hidden = rng.permutation(E).reshape(4, 4)
    num = np.zeros((I, E), dtype=np.int64)
    for i in range(I):
        num[i, hidden[i % 4]] = rng.multinomial(40, np.full(4, 0.25))
    layout = netmoe.expert_layout(num, topo)
    assert np.array_equal(np.bincount(layout, minlength=8), np.full(8, 2))
    assert all(len(set(layout[g] // 2)) == 1 for g in hidden)
    fresh = np.roll(num, 1, axis=0)   # other samples, same structure
    inter = lambda ed: netmoe.traffic(fresh, netmoe.solve_placement(fresh, topo, expert_device=ed), topo, ed)["inter"]
    assert inter(layout) == 0 < inter(None)


def test_expert_layouts_of_consecutive_layers_put_the_groups_a_sample_uses_on_one_node(rng):
    """Two kinds of samples, each using one hidden group of experts in layer 0 and another in
    layer 1. A sample sits on one node for layer 0's gather and layer 1's scatter, so the layouts
    must put both of its groups on the same node: then, after the first scatter, no token leaves
    its node (the grouping alone is not enough; the numbering across layers decides this)."""
    topo = netmoe.Topology(2, 2)
    E, I = 8, 32
    groups = [rng.permutation(E).reshape(2, 4) for _ in range(2)]   # per layer, hidden groups

    def batch():
        kind = rng.permutation(np.arange(I) % 2)
        nums = [np.zeros((I, E), dtype=np.int64) for _ in range(2)]
        for l in range(2):
            for i in range(I):
                nums[l][i, groups[l][kind[i]]] = rng.multinomial(40, np.full(4, 0.25))
        return nums

    learned = netmoe.expert_layout(batch(), topo)
    for layout in learned:
        assert np.array_equal(np.bincount(layout, minlength=4), np.full(4, 2))
    nums = batch()   # other samples, same structure
    layers = [netmoe.Routing.of(n, topo, lay) for n, lay in zip(nums, learned)]
    st = netmoe.replay(layers, topo, 4, nexts=layers[1:])
    first_scatter = netmoe.traffic(nums[0], netmoe.static_placement(I, 4), topo, learned[0])["inter"]
    assert st.gather["inter"] == 0 and st.scatter["inter"] == first_scatter > 0


@pytest.mark.parametrize("spec, per_device, samples", [("1x4", 1, 12), ("4x1", 2, 12), ("1x1", 3, 5),
                                                        ("3x2", 2, 12), ("2x2", 2, 0)])
def test_expert_layout_is_balanced_on_any_topology_even_without_samples(spec, per_device, samples, rng):
    topo = netmoe.Topology.parse(spec)
    E = topo.world * per_device
    nums = [rng.integers(0, 9, size=(samples, E)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layouts = netmoe.expert_layout(nums, topo)
    for layout in layouts:
        assert np.array_equal(np.bincount(layout, minlength=topo.world), np.full(topo.world, per_device))


def _plain_partition(A, groups):
    """expert_layout's partition as plain numpy loops, the reference of km.grown_groups and
    km.best_swap: greedy growth from the strongest seed, then best-pair swaps while one gains."""
    E = len(A)
    size, group, free = E // groups, np.full(E, -1), np.ones(E, dtype=bool)
    for g in range(groups):
        members = [int(np.argmax(np.where(free, A[:, free].sum(1), -np.inf)))]
        free[members[0]] = False
        while len(members) < size:
            x = int(np.argmax(np.where(free, A[:, members].sum(1), -np.inf)))
            members.append(x)
            free[x] = False
        group[members] = g
    grown = group.copy()
    for _ in range(4 * E):
        S = A @ np.eye(groups)[group]
        own = S[np.arange(E), group]
        gain = S[:, group] + S[:, group].T - own[:, None] - own[None, :] - 2 * A
        gain[group[:, None] == group[None, :]] = 0
        a, b = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[a, b] <= 1e-12:
            break
        group[a], group[b] = group[b], group[a]
    return grown, group


def test_expert_layout_partition_is_its_plain_numpy_loops(rng):
    """km.grown_groups and km.best_swap in _partition give exactly the plain loops' groups: the
    same seeds, members and swaps in the same order, ties included (affinities of few samples,
    unused experts, integer-valued ones)."""
    for _ in range(150):
        E = int(rng.choice([1, 4, 8, 12, 32, 64, 96, 256]))
        groups = int(rng.choice([g for g in (1, 2, 3, 4, 8, 32) if E % g == 0]))
        kind = rng.integers(3)
        if kind == 0:   # as expert_layout builds it, from counts of few samples: many ties
            num = rng.integers(0, 4, size=(int(rng.integers(0, 40)), E)) * (rng.random((1, E)) < 0.7)
            p = num / np.maximum(num.sum(1, keepdims=True), 1)
            d = p - p.mean(0) if len(p) else p
            A = d.T @ d
        else:
            A = rng.integers(-3, 4, size=(E, E)).astype(float) if kind == 1 else rng.normal(size=(E, E))
        np.fill_diagonal(A, 0.0)
        grown, swapped = _plain_partition(A, groups)
        assert np.array_equal(km.grown_groups(A, groups), grown), (E, groups, kind)
        assert np.array_equal(netmoe._partition(A, groups), swapped), (E, groups, kind)
    with pytest.raises(ValueError, match="divisible into 3 groups"):
        km.grown_groups(np.zeros((4, 4)), 3)
    with pytest.raises(ValueError, match="for the n=2 items"):
        km.best_swap(np.zeros((3, 2)), [0, 1], np.zeros((2, 2)))


@pytest.mark.parametrize("call, message", [
    (lambda: netmoe.expert_layout([], netmoe.Topology(2, 2)), "at least one layer"),
    (lambda: netmoe.expert_layout([np.ones((4, 8), np.int64), np.ones((5, 8), np.int64)], netmoe.Topology(2, 2)),
     "same samples"),
    (lambda: netmoe.expert_layout([np.ones((4, 8), np.int64)] * 2, netmoe.Topology(2, 2), current=[None]),
     "one layout per layer"),
    (lambda: netmoe.expert_layout(np.ones((4, 6), np.int64), netmoe.Topology(2, 2)), "split evenly"),
])
def test_expert_layout_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_expert_layout_numbers_groups_to_move_as_few_experts_as_possible(rng):
    """The grouping is what matters; given the layout in use, a re-learned layout with the same
    groups under other node and device numbers moves nothing, and against any layout in use it
    keeps at least as many experts on their node as the plain numbering does."""
    topo = netmoe.Topology(4, 2)
    num = rng.integers(0, 30, size=(64, 16))
    plain = netmoe.expert_layout(num, topo)
    node_perm, dev_perm = rng.permutation(4), rng.permutation(2)
    renamed = node_perm[plain // 2] * 2 + dev_perm[plain % 2]   # same groups, other numbers
    assert np.array_equal(netmoe.expert_layout(num, topo, current=renamed), renamed)
    for _ in range(5):
        current = rng.permutation(np.repeat(np.arange(8), 2))
        kept = netmoe.expert_layout(num, topo, current=current)
        assert np.array_equal(np.bincount(kept, minlength=8), np.full(8, 2))
        same_groups = lambda a, b: np.array_equal(a[:, None] == a[None], b[:, None] == b[None])
        assert same_groups(kept // 2, plain // 2) and same_groups(kept, plain)
        assert (kept // 2 == current // 2).sum() >= (plain // 2 == current // 2).sum()


@pytest.mark.parametrize("call", [
    lambda: netmoe.solve_placement(np.zeros(8, dtype=np.int64), netmoe.Topology(2, 2)),
    lambda: netmoe.solve_placement(-np.ones((8, 8), dtype=np.int64), netmoe.Topology(2, 2)),
    lambda: netmoe.solve_placement(np.ones((8, 8)), netmoe.Topology(2, 2)),                 # floats
    lambda: netmoe.solve_placement(np.ones((6, 8), dtype=np.int64), netmoe.Topology(2, 2)),  # I % J
    lambda: netmoe.solve_placement(np.ones((8, 6), dtype=np.int64), netmoe.Topology(2, 2)),  # E % J
    lambda: netmoe.solve_placement(np.ones((0, 8), dtype=np.int64), netmoe.Topology(2, 2)),
    lambda: netmoe.solve_placement(np.ones((8, 8), dtype=np.int64), "2x2"),
    lambda: netmoe.solve_placement(np.ones((8, 8), dtype=np.int64), netmoe.Topology(2, 2),
                                   num_next=np.ones((4, 8), dtype=np.int64)),
    lambda: netmoe.solve_placement(np.ones((8, 8), dtype=np.int64), netmoe.Topology(2, 2),
                                   expert_device=np.zeros(8, dtype=np.int64)),            # unbalanced
    lambda: netmoe.solve_placement(np.ones((8, 8), dtype=np.int64), netmoe.Topology(2, 2), method="lp"),
    lambda: netmoe.traffic(np.ones((8, 8), dtype=np.int64), np.full(8, 4), netmoe.Topology(2, 2)),
    lambda: netmoe.Topology.parse("4by8"),
    lambda: netmoe.Topology(0, 8),
    lambda: netmoe.replay([np.ones((8, 8), dtype=np.int64)] * 2, netmoe.Topology(2, 2), 10,
                          nexts=[np.ones((8, 4), dtype=np.int64)]),
    lambda: netmoe.MoELayer(8, 8, 4, placement="oracle"),
], ids=["1-D", "negative", "float", "I%J", "E%J", "empty", "topo-str", "next-shape", "layout",
        "method", "device-range", "parse", "zero-nodes", "replay-next-shape", "layer-placement"])
def test_bad_placement_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---- layer: static EP == NetMoE EP == single-process model, outputs and every gradient

I_, S_, H_, F_ = 8, 6, 8, 12


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _make_params(E, K, empty_device, seed, world=4, layers=2, layouts=None, shared=0):
    """Full (all-expert) float64 parameters of a stack of MoE layers (layouts: per layer the
    expert -> device map, default contiguous; it says which experts the empty device holds;
    shared: shared experts)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    out = []
    for _ in range(layers):
        p = dict(ln_w=1 + 0.1 * rnd(H_), ln_b=0.1 * rnd(H_), wg=0.3 * rnd(E, H_), w1=0.3 * rnd(E, H_, F_),
                 b1=0.1 * rnd(E, F_), w2=0.3 * rnd(E, F_, H_), b2=0.1 * rnd(E, H_))
        if shared:
            p.update(sw1=0.3 * rnd(shared, H_, F_), sb1=0.1 * rnd(shared, F_), sw2=0.3 * rnd(shared, F_, H_),
                     sb2=0.1 * rnd(shared, H_))
        if empty_device is not None:
            # LN's bias shifts its output; experts of the empty device point against it, so their
            # logits sit ~30 below every other expert's and no token picks them. (Moderate sizes:
            # logits in the thousands would leave float32 gradients no digits to compare.)
            v = 2 * torch.ones(H_, dtype=torch.float64)
            p["ln_b"] = v
            ed = netmoe.default_expert_device(E, world) if layouts is None else layouts[len(out)]
            for e in range(E):
                p["wg"][e] = -v if ed[e] == empty_device else 0.2 * v + 0.3 * rnd(H_)
        out.append(p)
    return out


def _reference(x, params, K, routes=None, groups=1, group_top=1):
    """Brute force: every expert on every token, masked by the routing; aux on the whole batch.
    routes: per layer [I, S, K] expert choices to use instead of the top-K (the ones a
    lower-precision run made, so that values, not choices, are compared). groups, group_top:
    a token picks among the experts of its group_top groups (of consecutive expert ids) with the
    highest sum of their two largest probabilities. Shared experts: on every token."""
    auxes = []
    for li, p in enumerate(params):
        E = p["wg"].shape[0]
        h = F.layer_norm(x, (H_,), p["ln_w"], p["ln_b"])
        probs = (h @ p["wg"].T).softmax(-1)
        allowed = torch.ones_like(probs, dtype=torch.bool)
        if groups > 1:
            size = E // groups
            score = torch.stack([probs[..., m * size:(m + 1) * size].sort(-1, descending=True)[0][..., :2].sum(-1)
                                 for m in range(groups)], -1)
            best = score.sort(-1, descending=True)[1][..., :group_top]
            allowed = torch.zeros_like(allowed)
            for m in range(groups):
                allowed[..., m * size:(m + 1) * size] |= (best == m).any(-1, keepdim=True)
        route = probs.masked_fill(~allowed, -1).topk(K, -1)[1]
        if routes is not None:
            route = routes[li]
        top = probs.gather(-1, route)
        g = top / top.sum(-1, keepdim=True) if K > 1 else top   # Switch keeps p for K = 1
        y = x
        for j in range(len(p.get("sw1", []))):
            y = y + F.gelu(h @ p["sw1"][j] + p["sb1"][j]) @ p["sw2"][j] + p["sb2"][j]
        for e in range(E):
            ffn = F.gelu(h @ p["w1"][e] + p["b1"][e]) @ p["w2"][e] + p["b2"][e]
            y = y + (g * (route == e)).sum(-1, keepdim=True) * ffn
        f = torch.bincount(route.reshape(-1), minlength=E).double() / route.numel()
        auxes.append(E * (f * probs.mean((0, 1))).sum())
        x = y
    return x, sum(auxes)


def _load(layer, p):
    with torch.no_grad():
        layer.ln.weight.copy_(p["ln_w"]); layer.ln.bias.copy_(p["ln_b"]); layer.gate.weight.copy_(p["wg"])
        for name in ("w1", "b1", "w2", "b2"):
            getattr(layer, name).copy_(p[name][torch.as_tensor(layer.local_experts)])
        for name in ("sw1", "sb1", "sw2", "sb2") if layer.shared_experts else ():
            getattr(layer, name).copy_(p[name])


@dataclasses.dataclass(frozen=True)
class Case:
    """One case of the equality test: a placement, K, whether the last device is planted idle (no
    token picks its experts), the exchange, the expert layout (contiguous, or a random balanced
    map per layer), and the nodes the world is split into."""
    placement: str
    K: int
    empty: bool = False
    exchange: str = "expert"
    layout: str = "contiguous"
    nodes: int = 2
    chunks: int = 1   # the layer's rows in C chunks of positions (S_ = 6: C = 8 leaves chunks out)
    shared: int = 0   # shared experts
    groups: int = 1   # group-limited routing: experts in `groups` groups, a token's from its best group_top
    group_top: int = 1
    lookahead: bool = True
    staged: bool = False   # ranks gather their node's rows alone and share stage 2 (EVERY_DEVICE_BYTES = 0)


LAYER_CASES = [Case("static", 2), Case("netmoe", 2), Case("netmoe", 1), Case("netmoe", 4),
               Case("netmoe", 2, empty=True), Case("static", 2, empty=True)]
NODE_CASES = [Case("static", 2, exchange="node"), Case("netmoe", 2, exchange="node"),
              Case("netmoe", 2, exchange="node", layout="random"), Case("netmoe", 1, exchange="node", layout="random"),
              Case("netmoe", 4, exchange="node"), Case("netmoe", 2, True, "node", "random"),
              Case("static", 4, True, "node", "random"), Case("netmoe", 2, exchange="node", layout="random", nodes=4),
              Case("netmoe", 2, exchange="node", layout="random", nodes=1)]
# both exchanges and placements in C = 2, 3 and 8 (more chunks than positions) chunks, K = 1, 2
# and 4, with idle devices (every chunk empty there) and random layouts
CHUNK_CASES = [dataclasses.replace(c, chunks=C, staged=True) for C in (2, 3, 8) for c in
               (Case("netmoe", 2), Case("static", 2, empty=True), Case("netmoe", 1, empty=True), Case("netmoe", 4),
                Case("netmoe", 2, exchange="node", layout="random"), Case("static", 2, True, "node", "random"),
                Case("netmoe", 4, True, "node"), Case("netmoe", 1, exchange="node", layout="random", nodes=4))]
# DeepSeek-style options: shared experts and group-limited routing, both exchanges, chunked too;
# and NetMoE without the lookahead
MODERN_CASES = [Case("netmoe", 2, shared=1, groups=4, group_top=2), Case("static", 2, True, shared=2),
                Case("netmoe", 4, exchange="node", shared=1, groups=2, group_top=1),
                Case("netmoe", 2, True, "node", chunks=3, shared=1, groups=4, group_top=2),
                Case("static", 1, exchange="node", layout="random", chunks=2, groups=4, group_top=1),
                Case("netmoe", 2, chunks=2, lookahead=False)]
NODE_CASES_8 = [Case("netmoe", 2, exchange="node", layout="random"), Case("static", 1, True, "node"),
                Case("netmoe", 4, True, "node", "random"), Case("netmoe", 2, exchange="node", nodes=4),
                Case("netmoe", 2, exchange="node", layout="random", nodes=4, lookahead=False),
                Case("netmoe", 2, layout="random"), Case("netmoe", 4, True, nodes=4),
                Case("netmoe", 2, layout="random", lookahead=False)]
NODE_CASES_8 = [dataclasses.replace(c, staged=True) for c in NODE_CASES_8]


def _layer_worker(rank, world, init_file, cases, where, stream, errors_file):
    """One rank of the equality test, on the devices `where` names (start_rank's "cpu": gloo,
    "gpu": a GPU each over NCCL, "shared": ranks sharing the GPUs over gloo): float64 on the CPU,
    float32 on GPUs, or the residual stream in `stream` (bfloat16: float32 weights, bf16 rows;
    compared at the routes the run chose). Per case: the worst relative error against the
    single-process model, samples moved, the modelled volumes, how many layers left the planted
    device idle, the rows the exchanges' split sizes sent per tier, and the exchange class that
    ran. On GPUs also whether every rank's CUDA kernels equal their references on that rank's own
    routes."""
    dev = train_gpt.start_rank(rank, world, "file://" + init_file, where)
    dtype = getattr(torch, stream) if stream else torch.float32 if dev.type == "cuda" else torch.float64
    weights = torch.float32 if dtype == torch.bfloat16 else dtype
    B = I_ // world
    report, every = [], netmoe.EVERY_DEVICE_BYTES
    for ci, case in enumerate(cases):
        placement, K, exchange = case.placement, case.K, case.exchange
        netmoe.EVERY_DEVICE_BYTES = 0 if case.staged else every
        topo = netmoe.Topology(case.nodes, world // case.nodes)
        E = 8
        empty = world - 1 if case.empty else None
        layouts = None
        if case.layout == "random":   # a balanced map of its own per layer
            rng = np.random.default_rng(500 + ci)
            layouts = [rng.permutation(netmoe.default_expert_device(E, world)) for _ in range(2)]
        params = _make_params(E, K, empty, seed=1000 + ci, world=world, layouts=layouts, shared=case.shared)
        if weights != torch.float64:   # the reference sees exactly the numbers the layer holds
            params = [{k: v.to(weights).double() for k, v in p.items()} for p in params]
        g = torch.Generator().manual_seed(77 + ci)
        x = torch.randn(I_, S_, H_, generator=g, dtype=torch.float64).to(dtype).double()
        wout = torch.randn(I_, S_, H_, generator=g, dtype=torch.float64).to(dtype).double()

        def run(exchange):
            layers = [netmoe.MoELayer(H_, F_, E, K, placement, case.lookahead, topology=topo, debug=True, exchange=exchange,
                                      chunks=case.chunks,
                                      shared_experts=case.shared, route_groups=case.groups, group_top=case.group_top,
                                      expert_device=None if layouts is None else layouts[li]).to(dev, weights)
                      for li in range(len(params))]
            for L, p in zip(layers, params):
                _load(L, p)
                L.record = True   # its choices: the reference's, the kernels' input, the centralized solve's
            xl = x[rank * B:(rank + 1) * B].to(dev, dtype).requires_grad_()
            h, sid, aux = xl, torch.arange(rank * B, (rank + 1) * B, device=dev), 0
            for L, nxt in zip(layers, layers[1:] + [None]):
                h, sid, a = L(h, sid, next_layer=nxt)
                aux = aux + a
            ((h.to(weights) * wout.to(dev, weights)[sid]).sum() + 0.1 * aux / world).backward()
            return layers, xl, h, sid

        layers, xl, h, sid = run(exchange)

        def gather(t):
            t = t.to(dev).contiguous()
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            return torch.cat(parts).cpu().double() if t.is_floating_point() else torch.cat(parts).cpu()

        central = None
        if netmoe.PLACEMENTS[placement].solves:   # Algorithm 1 on the whole batch's routes, in one process
            central = True
            for li, (L, (route, pred)) in enumerate(zip(layers, train_gpt.global_routes(layers))):
                count = lambda r, layer: netmoe.Routing.from_routes(r, topo, E, layer.expert_device, L.exchange.priced.name)
                nxt = count(pred, layers[li + 1]) if case.lookahead and li + 1 < len(layers) else None
                by_id = netmoe.solve_placement(count(route, L), topo, num_next=nxt)
                ids = gather(L.last_routes[0]).numpy()
                central = central and bool(np.array_equal(by_id[ids], L.last_dest))
        routes = None
        if dtype == torch.bfloat16:   # the choices the run made, by sample id
            routes = []
            for L in layers:
                ids, route = gather(L.last_routes[0]), gather(L.last_routes[1])
                routes.append(route[torch.argsort(ids)])
        xr = x.clone().requires_grad_()
        ref_params = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in params]
        y_ref, aux_ref = _reference(xr, ref_params, K, routes, case.groups, case.group_top)
        ((y_ref * wout).sum() + 0.1 * aux_ref).backward()
        sids = gather(sid)
        y = torch.empty_like(y_ref)
        y[sids] = gather(h.detach())
        errs = {"y": _rel(y, y_ref.detach()), "x.grad": _rel(gather(xl.grad), xr.grad)}
        for li, (L, rp) in enumerate(zip(layers, ref_params)):
            shared = [(n, getattr(L, n)) for n in ("sw1", "sb1", "sw2", "sb2")] if L.shared_experts else []
            for name, ours in [("ln_w", L.ln.weight), ("ln_b", L.ln.bias), ("wg", L.gate.weight)] + shared:
                gr = ours.grad.clone()
                dist.all_reduce(gr)
                errs[f"{li}.{name}"] = _rel(gr.cpu().double(), rp[name].grad)
            full_ids = gather(torch.as_tensor(L.local_experts))
            for name in ("w1", "b1", "w2", "b2"):
                full = torch.empty_like(rp[name].grad)
                full[full_ids] = gather(getattr(L, name).grad)
                errs[f"{li}.{name}"] = _rel(full, rp[name].grad)
        stats = layers[0].pop_stats() + layers[1].pop_stats()
        # rows the empty device's experts received, over both layers (0 where a device is planted empty)
        idle = sum(int(gather(L.w1.grad.abs().sum().reshape(1))[empty].item() == 0) for L in layers) \
            if empty is not None else None
        tiers = ("local", "intra", "inter")
        sent = torch.tensor([sum(L.exchange.sent[ph][t] for L in layers) for ph in ("scatter", "gather") for t in tiers],
                            device=dev)
        dist.all_reduce(sent)
        sent = dict(zip(("scatter", "gather"), (dict(zip(tiers, sent[i:i + 3].tolist())) for i in (0, 3))))
        moved_bytes = torch.tensor([sum(L.exchange.sent_bytes[ph] for L in layers) for ph in ("scatter", "gather")],
                                   device=dev)
        dist.all_reduce(moved_bytes)   # bytes per row sent to other devices, from the rows' own sizes
        row_bytes = {ph: b / max(sent[ph]["intra"] + sent[ph]["inter"], 1)
                     for ph, b in zip(("scatter", "gather"), moved_bytes.tolist())}
        report.append(dict(worst=max(errs.items(), key=lambda kv: kv[1]), moved=stats.moved_device,
                           scatter=stats.scatter, gather=stats.gather, idle=idle, sent=sent,
                           ran=type(layers[0].exchange).__name__, errs=errs, row_bytes=row_bytes, central=central))
    kernels = None
    if dev.type == "cuda":   # the CUDA kernels on this rank's own routes, against their references
        ops, ref = netmoe.hot_path(dev), netmoe.REFERENCE_OPS
        ok = ops is not ref
        for L in layers:
            route, G = L.last_routes[1], L.topo.gpus_per_node
            src, dest = torch.randint(I_, (97,), device=dev), torch.randint(world, (I_,), device=dev)
            for op, args in (("count_tokens", (route, L.num_experts)),
                             ("node_counts", (route, torch.as_tensor(L.expert_device // G, device=dev), L.topo.nodes)),
                             ("dispatch_order", (route, torch.as_tensor(L.slot, device=dev))),
                             ("gather_order", (src, dest, I_))):
                ok = ok and torch.equal(getattr(ops, op)(*args), getattr(ref, op)(*args))
        flag = torch.tensor([int(ok)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        kernels = bool(flag.item())
    if rank == 0:
        with open(errors_file, "w") as f:
            json.dump(dict(cases=report, kernels=kernels), f)
    dist.destroy_process_group()


def _spawn(fn, world, *args):
    """Run fn(rank, world, init_file, *args, report_file) on `world` processes; rank 0's report."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "report.json")
        mp.spawn(fn, args=(world, os.path.join(d, "init"), *args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def layer_report():
    """Both exchanges on 4 gloo ranks (2x2; 4x1 and 1x4 where a case says): LAYER_CASES, then NODE_CASES."""
    return _spawn(_layer_worker, 4, LAYER_CASES + NODE_CASES, "cpu", None)["cases"]


@pytest.fixture(scope="module")
def layer_report_chunked():
    """CHUNK_CASES, then MODERN_CASES, on 4 gloo ranks: the pipelined exchanges, the DeepSeek-style options."""
    return _spawn(_layer_worker, 4, CHUNK_CASES + MODERN_CASES, "cpu", None)["cases"]


@pytest.fixture(scope="module")
def layer_report_8():
    """The node exchange on 8 gloo ranks as 2x4 (rails of 4 devices) and 4x2 (three remote nodes)."""
    return _spawn(_layer_worker, 8, NODE_CASES_8, "cpu", None)["cases"]


@pytest.fixture(scope="module")
def layer_report_bf16():
    """Every case of layer_report with a bfloat16 residual stream and bf16 rows on the wire."""
    return _spawn(_layer_worker, 4, LAYER_CASES + NODE_CASES, "cpu", "bfloat16")["cases"]


def test_bf16_layer_equals_the_float64_model_to_bf16_rounding(layer_report_bf16):
    """bf16 keeps 8 significant bits: a rounding is off by at most u = 2^-8 = 0.4% relative. A
    value meets about six in each direction (the stream, LN, the two products, GELU, the gate
    multiply-add, the gather's sum): so outputs and gradients within 6u = 2.5e-2 in norm (measured
    0.8-1.8e-2). The gate's weight gradient sums terms of both signs through the softmax's Jacobian
    p(1 - p), so its relative error is u times the cancellation (sum of |terms| / |sum|): within 16u
    = 6e-2 (measured up to 4.6e-2, with an expert group pushed 30 logits down). Compared at the
    expert choices the run made (bf16 logits can tip near ties), with the float32 weights the layer
    holds. Positions travel as int32 bits in the bf16 rows: a misplaced row would be an O(1)
    error; and the rows the split sizes sent per tier are the modelled ones."""
    for case, r in zip(LAYER_CASES + NODE_CASES, layer_report_bf16):
        for name, err in r["errs"].items():
            assert err <= (6e-2 if name.endswith(".wg") else 2.5e-2), f"bf16 {case}: {name} differs by {err:.2e}"
        assert r["sent"] == {"scatter": r["scatter"], "gather": r["gather"]}, case
        assert (r["moved"] > 0) == netmoe.PLACEMENTS[case.placement].moves_samples, case
        assert not case.empty or r["idle"] == 2, case
        # half of float32's bytes: 2H + 8 a scatter row (x, gate, int32 sample and position, 16-bit
        # expert and choice), 2H + 4 a gather row (int32 new slot and position); a node exchange's
        # rail rows carry K gates and K expert ids more (2H + 6K + 4), its NVLink rows back k (2H + 6)
        node = r["ran"] == "NodeExchange"   # on one node the node exchange runs as the expert one
        wire = getattr(netmoe, r["ran"]).wire_bytes(H_, torch.bfloat16, case.K)
        row_bytes = r["row_bytes"]
        if node:
            assert 2 * H_ + 8 <= row_bytes["scatter"] <= wire[0] == 2 * H_ + 6 * case.K + 4, case
            assert 2 * H_ + 4 <= row_bytes["gather"] <= wire[1] == 2 * H_ + 6, case
        else:
            assert row_bytes["scatter"] == wire[0] == 2 * H_ + 8 and row_bytes["gather"] == wire[1] == 2 * H_ + 4, case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_virtual_layer_on_gpu_equals_single_process_model_in_float32(case):
    placement, K, empty = case.placement, case.K, 3 if case.empty else None
    params = [{k: v.float().double() for k, v in p.items()} for p in _make_params(8, K, empty, seed=5)]
    x = torch.randn(I_, S_, H_, dtype=torch.float64).float().double()
    xr = x.clone().requires_grad_()
    ref_params = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in params]
    y_ref, aux_ref = _reference(xr, ref_params, K)
    wout = torch.randn(I_, S_, H_, dtype=torch.float64).float().double()
    ((y_ref * wout).sum() + 0.1 * aux_ref).backward()
    layers = [netmoe.MoELayer(H_, F_, 8, K, placement, topology=netmoe.Topology(2, 2), virtual_world=4).cuda()
              for _ in params]
    for L, p in zip(layers, params):
        _load(L, p)
    xg = x.float().cuda().requires_grad_()
    h, sid, aux = xg, torch.arange(I_, device="cuda"), 0
    for L, nxt in zip(layers, layers[1:] + [None]):
        h, sid, a = L(h, sid, next_layer=nxt)
        aux = aux + a
    ((h * wout.float().cuda()[sid]).sum() + 0.1 * aux).backward()
    errs = {"y": _rel(h.detach().cpu().double(), y_ref.detach()[sid.cpu()]),
            "x.grad": _rel(xg.grad.cpu().double(), xr.grad)}
    for li, (L, rp) in enumerate(zip(layers, ref_params)):
        for name, ours in (("ln_w", L.ln.weight), ("wg", L.gate.weight), ("w1", L.w1), ("b2", L.b2)):
            g = ours.grad.cpu().double()
            if name in ("w1", "b2"):
                g = g[np.argsort(L.local_experts)]
            errs[f"{li}.{name}"] = _rel(g, rp[name].grad)
    worst = max(errs.items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, f"{worst[0]} differs by {worst[1]:.2e}"


def _assert_float32_ep_equals_the_model(world, where, cases):
    """The equality worker in float32 on GPUs: every case within 1e-5 of the float64 model, the
    planted device idle, the rows sent the modelled ones, and every rank's kernels exact."""
    cases = [c for c in cases if world % c.nodes == 0]   # N must divide J
    out = _spawn(_layer_worker, world, cases, where, None)
    bad = [(c, *r["worst"], r["idle"]) for c, r in zip(cases, out["cases"])
           if r["worst"][1] > 1e-5 or (c.empty and r["idle"] != 2)
           or r["sent"] != {"scatter": r["scatter"], "gather": r["gather"]}]
    assert not bad, f"float32 on {world} ranks ({where}), worst relative error per failing case: {bad}"
    assert out["kernels"] is True, "a rank's CUDA kernels differ from their references on its own routes"
    assert all((r["moved"] > 0) == netmoe.PLACEMENTS[c.placement].moves_samples for c, r in zip(cases, out["cases"]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices (NCCL)")
def test_ep_layer_equals_single_process_model_on_gpus_with_nccl():
    world = 4 if torch.cuda.device_count() >= 4 else 2
    _assert_float32_ep_equals_the_model(world, "gpu", LAYER_CASES + NODE_CASES + CHUNK_CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the ranks share it)")
@pytest.mark.parametrize("world", [4, 8])
def test_ep_layer_on_ranks_sharing_one_gpu_equals_single_process_model(world):
    """Every expert-parallel path on CUDA tensors with real ranks, on any machine with a GPU: the
    ranks share it and talk through gloo. Both exchanges, both placements, K = 1, 2, 4, planted
    idle devices, random expert layouts; 2 and 4 nodes on 8 ranks."""
    _assert_float32_ep_equals_the_model(world, "shared", LAYER_CASES + (NODE_CASES + CHUNK_CASES if world == 4 else NODE_CASES_8))


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_ep_layer_equals_single_process_model_outputs_and_all_gradients(layer_report, case):
    r = layer_report[LAYER_CASES.index(case)]
    assert r["worst"][1] <= 1e-10, f"{case}: {r['worst'][0]} differs by {r['worst'][1]:.2e}"
    if case.empty:   # the planted device received no token in either layer
        assert r["idle"] == 2


def test_every_rank_reaches_the_placement_of_the_centralized_solve(layer_report, layer_report_chunked, layer_report_8):
    """Each rank gathers only what Algorithm 1's stages and its own hops need, solves stage 2 for
    its own node and shares its part: the placement every layer used equals solve_placement's on
    the whole batch's routes (and the lookahead's), on 2x2, 1x4, 4x1, 2x4 and 4x2, both exchanges,
    with and without lookahead, in chunks or not."""
    cases = LAYER_CASES + NODE_CASES + CHUNK_CASES + MODERN_CASES + NODE_CASES_8
    reports = layer_report + layer_report_chunked + layer_report_8
    solved = [(c, r["central"]) for c, r in zip(cases, reports) if netmoe.PLACEMENTS[c.placement].solves]
    assert len(solved) > 20 and all(ok for _, ok in solved), [c for c, ok in solved if not ok]


def test_netmoe_really_moves_samples_in_the_equality_test(layer_report):
    moved = {c: r["moved"] for c, r in zip(LAYER_CASES, layer_report)}
    assert moved[Case("static", 2)] == 0
    assert moved[Case("netmoe", 2)] > 0


def test_virtual_world_computes_the_placement_and_volumes_of_the_distributed_run(layer_report):
    """Same inputs in one process with virtual_world=4 give the same volumes as the 4-rank run."""
    case = LAYER_CASES[1]
    params = _make_params(8, case.K, None, seed=1001)
    g = torch.Generator().manual_seed(78)
    x = torch.randn(I_, S_, H_, generator=g, dtype=torch.float64)
    layers = [netmoe.MoELayer(H_, F_, 8, case.K, case.placement, topology=netmoe.Topology(2, 2), virtual_world=4).double()
              for _ in params]
    for L, p in zip(layers, params):
        _load(L, p)
    h, sid = x, torch.arange(I_)
    for L, nxt in zip(layers, layers[1:] + [None]):
        h, sid, _ = L(h, sid, next_layer=nxt)
    stats = layers[0].pop_stats() + layers[1].pop_stats()
    y_ref, _ = _reference(x, params, case.K)
    assert _rel(h.detach(), y_ref[sid]) <= 1e-12
    r = layer_report[1]
    assert (stats.moved_device, stats.scatter, stats.gather) == (r["moved"], r["scatter"], r["gather"])


@pytest.mark.parametrize("case", NODE_CASES, ids=str)
def test_node_exchange_equals_single_process_model_outputs_and_all_gradients(layer_report, case):
    r = layer_report[len(LAYER_CASES) + NODE_CASES.index(case)]
    assert r["worst"][1] <= 1e-10, f"node exchange {case}: {r['worst'][0]} differs by {r['worst'][1]:.2e}"
    if case.empty:
        assert r["idle"] == 2
    if case.placement == "netmoe" and case.nodes > 1:   # the solver moved samples: hop A forwarded rows
        assert r["moved"] > 0 and r["gather"]["inter"] > 0


def test_node_exchange_on_eight_ranks_equals_single_process_model(layer_report_8):
    for case, r in zip(NODE_CASES_8, layer_report_8):
        assert r["worst"][1] <= 1e-10, f"node exchange {case} on 8 ranks: {r['worst'][0]} differs by {r['worst'][1]:.2e}"
        assert not case.empty or r["idle"] == 2
        assert (r["moved"] > 0) == (case.placement == "netmoe")


@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
def test_the_pipelined_exchanges_equal_the_single_process_model_for_every_chunk_count(layer_report_chunked, case):
    """C chunks of positions travel one after another, overlapping each other and the experts:
    outputs and every gradient equal the float64 model, the idle device stays idle, and the rows
    the split sizes sent add up to the modelled volumes, whatever C."""
    r = layer_report_chunked[CHUNK_CASES.index(case)]
    assert r["worst"][1] <= 1e-10, f"{case}: {r['worst'][0]} differs by {r['worst'][1]:.2e}"
    assert not case.empty or r["idle"] == 2
    assert (r["moved"] > 0) == netmoe.PLACEMENTS[case.placement].moves_samples
    assert r["sent"] == {"scatter": r["scatter"], "gather": r["gather"]}


@pytest.mark.parametrize("case", MODERN_CASES, ids=str)
def test_shared_experts_and_group_limited_routing_keep_static_netmoe_and_the_model_equal(layer_report_chunked, case):
    """Shared experts (on each token's first row, where its residual rides) and group-limited
    routing (groups of expert ids, so the function is the same in every layout): outputs and every
    gradient equal the float64 model's, under both placements and exchanges, chunked or not."""
    r = layer_report_chunked[len(CHUNK_CASES) + MODERN_CASES.index(case)]
    assert r["worst"][1] <= 1e-10, f"{case}: {r['worst'][0]} differs by {r['worst'][1]:.2e}"
    assert not case.empty or r["idle"] == 2
    assert (r["moved"] > 0) == netmoe.PLACEMENTS[case.placement].moves_samples
    assert r["sent"] == {"scatter": r["scatter"], "gather": r["gather"]}


def test_exchanges_send_exactly_the_modelled_rows_per_tier(layer_report, layer_report_8):
    """The rows every All-to-All's split sizes sent, per tier (one exchange for the expert exchange,
    rail and NVLink hops for the node exchange), add up to the volumes the cost model counts."""
    for case, r in zip(LAYER_CASES + NODE_CASES + NODE_CASES_8, layer_report + layer_report_8):
        assert r["sent"] == {"scatter": r["scatter"], "gather": r["gather"]}, case
        assert r["scatter"]["local"] + r["scatter"]["intra"] > 0 and r["gather"]["local"] + r["gather"]["intra"] > 0


def test_each_exchange_runs_as_its_own_class_and_the_node_exchange_on_one_node_as_the_expert_one(layer_report):
    """On one node the node exchange has no rail hop: make_exchange runs the expert exchange
    there (which the float64 equality above then checks); on two or more, its own class."""
    ran = {(c.exchange, c.nodes > 1): r["ran"] for c, r in zip(LAYER_CASES + NODE_CASES, layer_report)}
    assert ran == {("expert", True): "ExpertExchange", ("node", True): "NodeExchange", ("node", False): "ExpertExchange"}


def test_replay_of_the_node_exchange_agrees_with_the_live_layers():
    """virtual_world layers with the node exchange and their own expert maps record their routes;
    replaying those routes (with the lookahead's predicted ones) gives the layers' counters, and
    each layer's placement is the solver's on node counts under its own and the next layer's map."""
    topo = netmoe.Topology(2, 2)
    rng = np.random.default_rng(11)
    layers = [netmoe.MoELayer(16, 32, 8, 2, topology=topo, virtual_world=4, exchange="node").double() for _ in range(3)]
    for layer in layers:
        layer.set_expert_device(rng.permutation(np.repeat(np.arange(4), 2)))
        layer.record = True
    gen = torch.Generator().manual_seed(11)
    for layer in layers:
        with torch.no_grad():
            layer.gate.weight.copy_(2 * torch.randn(8, 16, generator=gen, dtype=torch.float64))
    h, sid = torch.randn(8, 24, 16, dtype=torch.float64, generator=gen), torch.arange(8)
    live = netmoe.MoEStats()
    routes, preds = [], []
    wire = netmoe.NodeExchange.wire_bytes(16, torch.float64, 2)   # Eq. 1 prices the rows as sent
    for l, (layer, nxt) in enumerate(zip(layers, layers[1:] + [None])):
        h, new_sid, _ = layer(h, sid, next_layer=nxt)
        stats = layer.pop_stats()
        live += stats
        rec_sid, route, pred = layer.last_routes
        by_id = np.argsort(rec_sid.numpy())
        routes.append(route.numpy()[by_id])
        preds.append(pred.numpy()[by_id] if pred is not None else None)
        num = netmoe.count_tokens(route, 8).numpy()
        nc = netmoe.node_counts(route, layer.expert_device // 2, 2).numpy()
        following = None
        if nxt is not None:
            following = netmoe.Routing.from_routes(pred.numpy()[by_id], topo, 8, nxt.expert_device, "node")
        # the layer solves with rows in sample-id order, so ties break as in a replay: so does this
        dest = np.empty(8, dtype=np.int64)
        by_id_routing = netmoe.Routing.of(num[by_id], topo, layer.expert_device, "node", node_count=nc[by_id])
        dest[by_id] = netmoe.solve_placement(by_id_routing, topo, num_next=following)
        assert np.array_equal(layer.last_dest, dest), f"layer {l}"
        want = netmoe.layer_stats(netmoe.Routing.of(num, topo, layer.expert_device, "node", node_count=nc),
                                  netmoe.static_placement(8, 4), dest, topo, wire)
        assert (stats.scatter, stats.gather, stats.moved_device) == (want.scatter, want.gather, want.moved_device)
        assert stats.a2a_model_ms == pytest.approx(want.a2a_model_ms)
        sid = new_sid
    layouts = [L.expert_device for L in layers]
    replayed = netmoe.replay(netmoe.routings(routes, topo, 8, layouts, "node"), topo, wire,
                             netmoe.routings(preds[:-1], topo, 8, layouts[1:], "node"), placement="netmoe")
    assert (replayed.scatter, replayed.gather, replayed.moved_node, replayed.moved_device) == \
        (live.scatter, live.gather, live.moved_node, live.moved_device)
    assert replayed.a2a_model_ms == pytest.approx(live.a2a_model_ms)


def test_layer_rejects_an_unknown_exchange():
    with pytest.raises(ValueError, match="exchange must be 'expert' or 'node'"):
        netmoe.MoELayer(8, 16, 4, 2, topology=netmoe.Topology(2, 2), virtual_world=4, exchange="nodes")


def test_lookahead_reads_the_next_layers_own_expert_layout():
    """With re-layouts every layer has its own expert -> device map: the gather's placement must
    price the next layer's scatter with the next layer's map, not its own."""
    topo = netmoe.Topology(2, 2)
    rng = np.random.default_rng(5)
    torch.manual_seed(5)   # the gates' weights: a case that tells the two maps apart, whichever tests ran first
    a, b = (netmoe.MoELayer(16, 32, 8, 2, topology=topo, virtual_world=4).double() for _ in range(2))
    for layer in (a, b):
        layer.set_expert_device(rng.permutation(np.repeat(np.arange(4), 2)))
    a.record = True
    x = torch.randn(8, 32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a(x, torch.arange(8), next_layer=b)
    sid, route, pred = a.last_routes
    num, nxt = netmoe.count_tokens(route, 8).numpy(), netmoe.count_tokens(pred, 8).numpy()
    right = netmoe.solve_placement(num, topo, num_next=nxt, expert_device=a.expert_device,
                                   expert_device_next=b.expert_device)
    wrong = netmoe.solve_placement(num, topo, num_next=nxt, expert_device=a.expert_device,
                                   expert_device_next=a.expert_device)
    assert not np.array_equal(right, wrong)   # the case tells the two apart
    assert np.array_equal(a.last_dest, right)


def _experts_both_ways(device, dtype, autocast, monkeypatch, seed):
    """The layer's expert compute, grouped (torch._grouped_mm) and as the per-expert loop, on the
    same rows (uneven counts, an expert with none): outputs and every gradient."""
    g = torch.Generator().manual_seed(seed)
    layer = netmoe.MoELayer(32, 48, 8, 2, virtual_world=2).to(device, dtype)
    with torch.no_grad():
        for p in (layer.b1, layer.b2, layer.ln.bias):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    counts = [5, 0, 17, 3, 9, 1, 30, 7]
    expert = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))
    expert = expert[torch.randperm(len(expert), generator=g)].to(device)   # rows in any order
    x = torch.randn(len(expert), 32, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(len(expert), 32, generator=g, dtype=torch.float64).to(device)
    order = torch.argsort(expert, stable=True)
    out = {}
    for way in ("grouped", "loop"):
        monkeypatch.setenv("NETMOE_GROUPED_MM", "0" if way == "loop" else "1")
        xi = x.clone().requires_grad_()
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            f, bias, ends = layer.experts(netmoe.layer_norm(xi[order], layer.ln), counts)
            if bias is not None:   # the output bias the combine adds on that path
                f = f + bias.to(f.dtype)[expert[order]]
            y = torch.empty_like(f).index_copy(0, order, f)
        (y.double() * w).sum().backward()
        out[way] = [y.detach().double(), xi.grad.double()] + [p.grad.double() for p in layer.parameters()
                                                            if p.grad is not None]
        layer.zero_grad(set_to_none=True)
    return out


def test_grouped_expert_compute_equals_the_per_expert_loop_on_cpu(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    out = _experts_both_ways("cpu", torch.float32, False, monkeypatch, seed=3)
    for a, b in zip(out["grouped"], out["loop"]):
        assert _rel(a, b) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="torch._grouped_mm in bf16 needs a CUDA GPU of compute capability 9.0+")
def test_grouped_expert_compute_equals_the_per_expert_loop_in_bf16_on_gpu(monkeypatch):
    out = _experts_both_ways("cuda", torch.float32, True, monkeypatch, seed=4)
    for a, b in zip(out["grouped"], out["loop"]):   # both bf16 products: rounding apart, not more
        assert _rel(a, b) <= 2e-2

# -- the row ops: dispatch's permute, the combine, the experts' bias and GELU, with autograd

def _row_problem(gen, R, Q, Kc, C, E, covered, dtype=torch.float64, device="cpu", seq=1):
    """Random inputs of combine: rows [R, C]; index [Q, Kc] naming every row once (covered) or
    some rows once and the rest never, with -1 and out-of-range entries (combine's contract: no
    row is named twice); weight, bias of E experts over ends with empty experts; base,
    base_scale, and a permutation perm of the Q / seq output blocks."""
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype)
    if covered:
        assert R <= Q * Kc
        slots = torch.randperm(Q * Kc, generator=gen)[:R]
        index = torch.full((Q * Kc,), -1, dtype=torch.int64)
        index[slots] = torch.arange(R)
    else:   # some rows named once, the others not at all; -1 and R + 1 name no row
        named = torch.randperm(R, generator=gen)[:min(R, Q * Kc) * 2 // 3]
        index = torch.cat([named, torch.full((Q * Kc - len(named),), -1)])
        index[torch.rand(len(index), generator=gen) < 0.2 * (index < 0)] = R + 1
        index = index[torch.randperm(len(index), generator=gen)]
    counts = torch.randint(E, (R,), generator=gen).bincount(minlength=E)
    if E > 2:
        counts[1] += counts[0]   # an expert with no rows
        counts[0] = 0
    ends = counts.cumsum(0).to(torch.int32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(rows=rnd(R, C), index=index.view(Q, Kc).to(device), weight=rnd(Q, Kc).to(acc), bias=rnd(E, C),
                ends=ends.to(device), base=rnd(Q, C), base_scale=rnd(Q).to(acc),
                perm=torch.randperm(Q // seq, generator=gen).to(device), seq=seq)


def _plain_combine(rows, index, weight, bias, ends, base, base_scale, perm, seq):
    """combine by its definition, an output row at a time (autograd through plain torch ops)."""
    expert = np.searchsorted(ends.cpu().numpy(), np.arange(len(rows)), side="right")
    out = []
    for t in range(index.shape[0]):
        acc = torch.zeros(rows.shape[1], dtype=rows.dtype) if base is None else \
            base[t] * (1 if base_scale is None else base_scale[t])
        for j in range(index.shape[1]):
            r = int(index[t, j])
            if 0 <= r < len(rows):
                acc = acc + (1 if weight is None else weight[t, j]) * (rows[r] + (0 if bias is None else bias[expert[r]]))
        out.append(acc)
    out = torch.stack(out) if out else torch.zeros(0, rows.shape[1], dtype=rows.dtype)
    return out if perm is None else out.view(len(perm), seq, -1)[perm].reshape(out.shape)


ROW_CASES = [(R, Q, Kc, C, E, covered, seq) for R, Q, Kc, C, E, covered, seq in [
    (12, 6, 2, 5, 3, True, 1), (24, 8, 4, 3, 4, True, 2), (16, 2, 8, 4, 5, True, 1), (5, 5, 1, 7, 2, True, 5),
    (7, 6, 2, 3, 3, False, 3), (9, 4, 3, 2, 1, False, 1), (0, 4, 2, 3, 2, False, 2), (6, 3, 3, 4, 3, True, 3),
    (10, 40, 1, 2, 3, False, 8)]]


@pytest.mark.parametrize("R,Q,Kc,C,E,covered,seq", ROW_CASES)
@pytest.mark.parametrize("terms", ["all", "rows only", "weight and base"])
def test_combine_and_its_gradients_equal_the_definition(R, Q, Kc, C, E, covered, seq, terms):
    """combine_rows (the torch references on the CPU) against combine's definition, output and
    the gradients of rows, weight, bias and base, float64: K = 1, 2, 3, 4, 8 rows an output, every
    row named once (the exchanges') or some never, out-of-range entries, experts with no rows, no
    rows at all, permuted outputs."""
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    p = _row_problem(gen, R, Q, Kc, C, E, covered, seq=seq)
    if terms != "all":
        p.update(bias=None, base_scale=None, perm=None)
        if terms == "rows only":
            p.update(weight=None, base=None)
    leaves = {k: v.requires_grad_() for k, v in p.items() if k in ("rows", "weight", "bias", "base") and v is not None}
    w_out = torch.randn(Q, C, generator=gen, dtype=torch.float64)
    got = netmoe.combine_rows(**p, covered=covered)
    want = _plain_combine(**p)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"seed={seed}"
    grads = torch.autograd.grad((got * w_out).sum(), list(leaves.values()), allow_unused=True)
    ref = torch.autograd.grad((want * w_out).sum(), list(leaves.values()), allow_unused=True) \
        if want.requires_grad else [None] * len(leaves)   # no rows, no weights: nothing reaches the output
    for name, a, b in zip(leaves, grads, ref):
        b = torch.zeros_like(leaves[name]) if b is None else b
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"seed={seed}: {name}"


@pytest.mark.parametrize("T,K", [(6, 1), (5, 2), (4, 8), (0, 2)])
def test_permute_sums_each_rows_gradient_back_into_its_token(T, K):
    """Dispatch's permute: rows x[order // K] of a stable dispatch order; backward sums the K rows
    of each token (through inv, no atomics) as indexing's index_add would."""
    gen = torch.Generator().manual_seed(T * 10 + K)
    x = torch.randn(T, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(T * K, generator=gen)
    rows = netmoe.permute(x, order // K, netmoe._inverse(order).view(T, K))
    want = x[order // K]
    w = torch.randn(rows.shape, generator=gen, dtype=torch.float64)
    assert torch.equal(rows, want)
    g, = torch.autograd.grad((rows * w).sum(), x)
    g_ref, = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(g, g_ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7], [4], [0, 2, 0]])
def test_bias_gelu_and_segment_sums_equal_their_plain_torch(counts):
    """The first product's epilogue, GELU(pre + b1[expert]), one pass each way with the bias's
    gradient summed per expert in its backward; and segment_sum, the output bias's gradient."""
    gen = torch.Generator().manual_seed(sum(counts) * 7 + len(counts))
    R, E, C = sum(counts), len(counts), 6
    pre = torch.randn(R, C, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(E, C, generator=gen, dtype=torch.float64, requires_grad=True)
    ends = torch.tensor(np.cumsum(counts), dtype=torch.int32)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    w = torch.randn(R, C, generator=gen, dtype=torch.float64)
    got = netmoe._BiasGelu.apply(pre, bias, ends)
    want = F.gelu(pre + bias[expert])
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)
    g = torch.autograd.grad((got * w).sum(), (pre, bias))
    g_ref = torch.autograd.grad((want * w).sum(), (pre, bias))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    seg = netmoe.segment_sum(w, ends)
    assert torch.allclose(seg, torch.zeros(E, C, dtype=torch.float64).index_add(0, expert, w), rtol=1e-13, atol=1e-13)


def test_one_process_and_distributed_expert_sides_without_expert_biases_equal_the_model():
    """--no-expert-bias: the layer's experts hold no b1, b2; in one process (the fused combine) its
    output and gradients are the brute-force model's without biases."""
    torch.manual_seed(3)
    layer = netmoe.MoELayer(H_, F_, 8, 2, "netmoe", topology=netmoe.Topology(2, 2), virtual_world=4,
                            expert_bias=False).double()
    assert layer.b1 is None and layer.b2 is None and not any("b1" in n or "b2" in n for n, _ in layer.named_parameters())
    p = _make_params(8, 2, None, seed=11, layers=1)[0]
    p["b1"], p["b2"] = torch.zeros_like(p["b1"]), torch.zeros_like(p["b2"])
    with torch.no_grad():
        layer.ln.weight.copy_(p["ln_w"]); layer.ln.bias.copy_(p["ln_b"]); layer.gate.weight.copy_(p["wg"])
        layer.w1.copy_(p["w1"][torch.as_tensor(layer.local_experts)])
        layer.w2.copy_(p["w2"][torch.as_tensor(layer.local_experts)])
    x = torch.randn(I_, S_, H_, dtype=torch.float64, requires_grad=True)
    y, sid, aux = layer(x, torch.arange(I_))
    rp = {k: v.clone().requires_grad_() for k, v in p.items()}
    xr = x.detach().clone().requires_grad_()
    y_ref, _ = _reference(xr, [rp], 2)
    assert _rel(y.detach(), y_ref.detach()[sid]) <= 1e-12
    w = torch.randn(y.shape, dtype=torch.float64)
    (y * w).sum().backward()
    (y_ref[sid] * w).sum().backward()
    assert _rel(x.grad, xr.grad) <= 1e-12
    assert _rel(layer.w1.grad, rp["w1"].grad[torch.as_tensor(layer.local_experts)]) <= 1e-12


@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_the_lookahead_folds_the_next_layernorm_into_its_gate_and_predicts_the_same_routes(groups):
    """_predict prices the next layer's gate from this layer's LayerNorm statistics (no second
    LayerNorm): in float64 its routes are exactly the next layer's top-K of its own gate on x
    (group limits included), whatever the next LayerNorm's weight, bias and the stream's offset;
    on a bfloat16 stream it agrees with that float64 prediction of the same input about as well
    as the unfolded bfloat16 gate does."""
    M, T = groups
    torch.manual_seed(11)
    this, nxt = (netmoe.MoELayer(H_, F_, 16, 4, virtual_world=4, topology=netmoe.Topology(2, 2), route_groups=M,
                                 group_top=T).double() for _ in range(2))
    with torch.no_grad():
        for layer in (this, nxt):
            layer.ln.weight.uniform_(-1.5, 1.5)
            layer.ln.bias.normal_(0, 0.5)
    ops = netmoe.REFERENCE_OPS

    def want(x):
        logits = nxt.logits(x.double())
        if M > 1:
            logits = netmoe.group_limited(logits.softmax(-1), M, T)
        return ops.topk_ids(logits, 4)
    for offset in (0.0, 2.0):
        x = torch.randn(8, 16, H_, dtype=torch.float64) + offset
        h, mean, rstd = netmoe.layer_norm(x, this.ln, stats=True)
        assert torch.equal(h, netmoe.layer_norm(x, this.ln))
        assert torch.equal(netmoe.MoELayer._predict(x, nxt, mean, rstd), want(x))
    x = (torch.randn(32, 64, H_, dtype=torch.float64) + 0.5).to(torch.bfloat16)
    t16, n16 = this.to(torch.bfloat16), nxt.to(torch.bfloat16)
    _, mean, rstd = netmoe.layer_norm(x, t16.ln, stats=True)
    got = netmoe.MoELayer._predict(x, n16, mean, rstd)
    nxt.double()
    truth = want(x)
    n16 = nxt.to(torch.bfloat16)
    logits = n16.logits(x)
    unfolded = ops.topk_ids(netmoe.group_limited(logits.float().softmax(-1), M, T) if M > 1 else logits, 4)
    agree, agree_unfolded = (got == truth).double().mean(), (unfolded == truth).double().mean()
    assert agree >= 0.95 and agree >= agree_unfolded - 0.01, (agree, agree_unfolded)


class _RowsBack(torch.nn.Module):
    """An expert component that hands its rows back (f = h, no bias): what a benchmark swaps in."""

    def forward(self, h, counts):
        return h, None, None


@pytest.mark.parametrize("virtual", [1, 4])
def test_the_expert_component_is_swappable_and_the_layer_uses_it(virtual):
    """experts=: a module called as Experts is. One that hands each row back makes the layer
    x + LN(x) (each token's K gate weights sum to 1), in the samples' new order; the default is
    Experts of the layer's experts."""
    torch.manual_seed(7)
    layer = netmoe.MoELayer(H_, F_, 8, 2, topology=netmoe.Topology(2, 2) if virtual == 4 else None,
                            virtual_world=virtual, experts=_RowsBack()).double()
    assert isinstance(layer.experts, _RowsBack) and not any(n.startswith("experts.") for n, _ in layer.named_parameters())
    assert isinstance(netmoe.MoELayer(H_, F_, 8, 2, virtual_world=virtual,
                                      topology=layer.topo).experts, netmoe.Experts)
    x = torch.randn(I_, S_, H_, dtype=torch.float64)
    y, sid, _ = layer(x, torch.arange(I_))
    want = x + netmoe.layer_norm(x, layer.ln)
    assert _rel(y.detach(), want[sid]) <= 1e-13


@pytest.mark.parametrize("chunks", [1, 3, "auto"])
def test_a_layer_in_a_world_of_one_equals_the_same_layer_playing_one_device(chunks):
    """No process group and no virtual_world (a plain one-process script, train --nproc 1): the
    layer runs in one process as virtual_world=1 does, same outputs, sample order and gradients."""
    out = []
    for virtual in (None, 1):
        torch.manual_seed(5)
        layer = netmoe.MoELayer(H_, F_, 8, 2, virtual_world=virtual, chunks=chunks).double()
        x = torch.randn(I_, S_, H_, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
        for _ in range(2):   # auto: the second call runs in its choice
            y, sid, aux = layer(x, torch.arange(I_))
        (y.square().sum() + aux).backward()
        out.append((y.detach(), sid, x.grad, layer.w1.grad))
    (y0, sid0, *g0), (y1, sid1, *g1) = out
    assert torch.equal(sid0, sid1) and _rel(y0, y1) <= 1e-14
    assert all(_rel(a, b) <= 1e-14 for a, b in zip(g0, g1))


def _disagreement_worker(rank, world, init_file, out_file):
    """Ranks that disagree must fail together, with one clear message each, and never hang."""
    train_gpt.start_rank(rank, world, "file://" + init_file, "cpu")
    report = {}
    layer = netmoe.MoELayer(H_, F_, 4, 2, topology=netmoe.Topology(1, 2)).double()
    x = torch.randn(2 + rank, S_, H_, dtype=torch.float64)   # rank 1 holds one sample more
    try:
        layer(x, torch.arange(len(x)))
    except ValueError as e:
        report["batch"] = str(e)
    wrong = np.array([0, 1, 0, 1]) if rank else np.array([1, 0, 1, 0])   # a map each rank believes in
    try:
        layer.relayout(wrong)
    except RuntimeError as e:
        report["map"] = str(e)
    # every per-expert optimizer state tensor travels with its expert (AMSGrad's max too)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, amsgrad=True)
    y, _, aux = layer(torch.randn(2, S_, H_, dtype=torch.float64), torch.arange(2 * rank, 2 * rank + 2))
    (y.square().sum() + aux).backward()
    opt.step()
    try:
        layer.relayout(np.array([1, 0, 0, 1]))
    except RuntimeError as e:
        report["grads"] = str(e)
    opt.zero_grad(set_to_none=True)

    def by_expert():   # {expert id: every state row of it, on whichever rank holds it}
        mine = {int(e): [t[i].clone() for p in (layer.w1, layer.b1, layer.w2, layer.b2)
                         for t in [p.detach()] + [v for v in opt.state[p].values() if v.dim() > 0]]
                for i, e in enumerate(layer.local_experts)}
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        return {e: rows for part in parts for e, rows in part.items()}
    before = by_expert()
    report["moved"] = layer.relayout(np.array([1, 0, 0, 1]), opt)
    after = by_expert()
    report["same_rows"] = all(len(before[e]) == len(after[e]) == 16 and all(torch.equal(a, b) for a, b in zip(before[e], after[e]))
                              for e in range(4))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


_COLLECTIVES = ("all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier",
                "all_to_all", "all_to_all_single", "reduce_scatter", "gather", "scatter", "send", "recv")


def _collectives_worker(rank, world, init_file, exchange, chunks, configs, out_file):
    """Per config (E, B samples a rank, netmoe.EVERY_DEVICE_BYTES), two fresh layers: the collectives
    of a layer call after the first (which checks the ranks' batch sizes once), and the bytes each
    call received outside the exchange's rows (the routing metadata): every collective's output,
    less the rows' All-to-Alls (the only All-to-Alls started asynchronously)."""
    train_gpt.start_rank(rank, world, "file://" + init_file, "cpu")
    calls, received = [], []
    size = lambda t: sum(size(x) for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()
    for name in _COLLECTIVES:
        def counted(*a, _f=getattr(dist, name), _name=name, **kw):
            calls.append(_name)
            if (not kw.get("async_op") or _name == "all_reduce") and _name in ("all_gather", "all_to_all_single",
                                                                              "all_reduce"):
                received.append(size(a[0]))
            return _f(*a, **kw)
        setattr(dist, name, counted)
    report = []
    for experts, B, every_bytes in configs:
        netmoe.EVERY_DEVICE_BYTES = every_bytes
        layers = [netmoe.MoELayer(H_, F_, experts, 2, topology=netmoe.Topology(2, 2), exchange=exchange,
                                  chunks=chunks).double() for _ in range(2)]

        def step():
            h, sid = torch.randn(B, S_, H_, dtype=torch.float64, requires_grad=True), torch.arange(B * rank, B * rank + B)
            aux = 0
            for L, nxt in zip(layers, layers[1:] + [None]):
                h, sid, a = L(h, sid, next_layer=nxt)
                aux = aux + a
            (h.square().sum() + aux).backward()
        calls.clear()
        received.clear()
        step()
        first, got = len(calls), len(received)
        for L in layers:
            L.pop_stats()
        step()
        report.append(dict(first=calls[:first], later=calls[first:], received=sum(received[got:]),
                           counted=sum(L.pop_stats().meta_bytes for L in layers)))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(report, f)


@pytest.mark.parametrize("exchange, a2a_per_direction, chunks", [("expert", 1, 1), ("node", 2, 1), ("node", 2, 3)])
def test_a_layer_call_makes_no_collective_beyond_the_counts_and_the_all_to_alls(exchange, a2a_per_direction, chunks):
    """Without debug a layer's forward and backward talk only through the routing's metadata (an
    All-to-All of counts, an all-reduce of the tokens per expert; NetMoE's staged solve an
    all-gather of destinations and an All-to-All of split sizes, none where every rank holds every
    device's rows) and the exchange's All-to-Alls (scatter and gather, each hop forward and
    backward, once per chunk); the batch-size check runs on a layer's first call only. Where every
    rank holds every device's rows, what the metadata's collectives received is
    netmoe.metadata_bytes, and the layers' own counter (staged: the test below)."""
    topo, I = netmoe.Topology(2, 2), 8
    assert netmoe._gathers_every_device(I, topo, 2, chunks, exchange == "node", True)   # at these sizes
    reports = _spawn(_collectives_worker, 4, exchange, chunks, [(8, 2, 0), (8, 2, netmoe.EVERY_DEVICE_BYTES)])
    for staged, calls in zip((True, False), reports):
        per_layer = {"all_gather": int(staged), "all_to_all_single": 4 * a2a_per_direction * chunks + 1 + staged,
                     "all_reduce": 1}
        assert collections.Counter(calls["later"]) == collections.Counter({k: 2 * v for k, v in per_layer.items()})
        assert collections.Counter(calls["first"]) == collections.Counter(
            {k: 2 * v + 2 * (k == "all_gather") for k, v in per_layer.items()})
    model = sum(netmoe.metadata_bytes(I, 8, topo, exchange, chunks, lookahead=nxt) for nxt in (True, False))
    assert reports[1]["received"] == reports[1]["counted"] == model


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_the_routing_metadata_a_layer_call_receives_does_not_grow_with_the_experts(exchange, monkeypatch):
    """What a rank receives of the routing in a layer call where ranks gather their node's rows
    alone (as at scale), measured at every collective: the same at E/J = 2 and E/J = 16 for the
    same tokens (I/J = 4, as bench.py layer's) but for the [E] tokens per expert of the
    load-balance loss (at most 1.5x in all, where every rank's [I, E] counts grew 8x), and exactly
    netmoe.metadata_bytes, which the layer's own counter agrees with."""
    monkeypatch.setattr(netmoe, "EVERY_DEVICE_BYTES", 0)
    got = dict(zip((2, 16), _spawn(_collectives_worker, 4, exchange, 2, [(4 * e, 4, 0) for e in (2, 16)])))
    topo, I = netmoe.Topology(2, 2), 16
    for e, r in got.items():
        model = sum(netmoe.metadata_bytes(I, 4 * e, topo, exchange, chunks=2, lookahead=nxt) for nxt in (True, False))
        assert r["received"] == r["counted"] == model, (e, r, model)
    assert got[16]["received"] - got[2]["received"] == 2 * (64 - 8) * 8   # two layers' [E] int64
    assert got[16]["received"] <= 1.5 * got[2]["received"]
    assert netmoe.metadata_bytes(I, 64, topo, exchange, 2) < 2 * I * 64 * 8   # today: [I, E] int64, twice


def _schedule_worker(rank, world, init_file, exchange, chunks, serial, out_file):
    """The forward's events in the order they happened on this rank: every hop's All-to-All
    started and waited on, and every expert call, each tagged with its chunk. `serial` runs the
    chunks one after another (each to its end before the next starts), as a pipeline must not."""
    train_gpt.start_rank(rank, world, "file://" + init_file, "cpu")
    topo = netmoe.Topology(2, 2) if world == 4 else netmoe.Topology(1, world)
    layer = netmoe.MoELayer(H_, F_, 2 * world, 2, "static", topology=topo, exchange=exchange, chunks=chunks).double()
    events, chunk_of, now = [], {}, [None]
    if serial:
        one_by_one = netmoe.pipeline
        netmoe.pipeline = lambda steps: [one_by_one([s])[0] for s in steps]

    def tagged(method, orig):   # a chunk is known by its Routing; the steps it runs are tagged with it
        def steps(self, *a):
            c = chunk_of.setdefault(id(a[1].routing if method == "_gather" else a[3]), len(chunk_of))
            gen = orig(self, *a)
            while True:
                now[0] = (method[1:], c)
                try:
                    next(gen)
                except StopIteration as done:
                    return done.value
                yield
        return steps
    for method in ("_scatter", "_gather"):
        for cls in (netmoe.ExpertExchange, netmoe.NodeExchange):
            setattr(cls, method, tagged(method, vars(cls)[method]))
    experts = netmoe.ExpertExchange._experts

    def logged_experts(d, e):
        events.append(("experts", chunk_of[id(d.routing)]))
        return experts(d, e)
    netmoe.ExpertExchange._experts = staticmethod(logged_experts)
    start, wait = netmoe.Flight.__init__, netmoe.Flight.wait

    def logged_start(self, *a):
        events.append((now[0][0] + " start", now[0][1]))
        start(self, *a)

    def logged_wait(self):
        events.append((now[0][0] + " wait", now[0][1]))
        return wait(self)
    netmoe.Flight.__init__, netmoe.Flight.wait = logged_start, logged_wait
    with torch.no_grad():
        layer(torch.randn(2, S_, H_, dtype=torch.float64), torch.arange(2 * rank, 2 * rank + 2))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(events, f)
    dist.destroy_process_group()


def _overlap_faults(events, chunks):
    """What a pipeline must do that `events` (from _schedule_worker) did not, one line each: chunk
    c + 1's scatter starts before chunk c's experts run, and chunk c's gather is in flight (started,
    its last hop not yet waited on) while chunk c + 1's experts run."""
    at = lambda kind, c, pick=min: pick(i for i, e in enumerate(events) if e == [kind, c])
    faults = []
    for c in range(chunks - 1):
        if not at("scatter start", c + 1) < at("experts", c):
            faults.append(f"chunk {c + 1}'s scatter starts after chunk {c}'s experts")
        if not at("gather start", c) < at("experts", c + 1) < at("gather wait", c, max):
            faults.append(f"chunk {c}'s gather is not in flight while chunk {c + 1} computes")
    return faults


@pytest.mark.parametrize("exchange, world", [("expert", 2), ("node", 4)])
def test_the_pipeline_overlaps_each_chunks_hops_with_the_next_chunks_experts(exchange, world):
    """The schedule, as it ran: in forward, chunk c + 1's rows are on their way before chunk c's
    experts compute, and chunk c's rows travel back while chunk c + 1's experts compute. The same
    layer with its chunks run one after another has every result and collective the same (the
    equality and collective tests pass on it) and fails this."""
    chunks = 3
    events = _spawn(_schedule_worker, world, exchange, chunks, False)
    hops = 1 if exchange == "expert" else 2
    assert sorted(map(tuple, events)) == sorted([(f"{p} {e}", c) for c in range(chunks) for p in ("scatter", "gather")
                                                 for e in ("start", "wait") for _ in range(hops)]
                                                + [("experts", c) for c in range(chunks)])
    assert _overlap_faults(events, chunks) == []
    serial = _spawn(_schedule_worker, world, exchange, chunks, True)
    assert sorted(map(tuple, serial)) == sorted(map(tuple, events))
    assert len(_overlap_faults(serial, chunks)) == 2 * (chunks - 1)


def test_auto_chunks_pick_the_c_eq1_exposes_least_time_for():
    """best_chunks: without compute to hide behind, or on links that move no byte beside other
    work (overlap 0), chunks only add alphas (C = 1); with free
    messages and compute, the most chunks the positions allow; with messages dearer than the
    compute, one; and always a C no other choice beats under Eq. 1 as built."""
    rng = np.random.default_rng(0)
    topo = netmoe.Topology(2, 2)
    r = netmoe.Routing.of(rng.integers(0, 50, (8, 8)), topo)
    here = netmoe.static_placement(8, 4)
    dest = netmoe.solve_placement(r.num, topo)
    pick = lambda ms, S=1024, links=None: netmoe.best_chunks(r, here, dest, 1000.0, ms, S, links)
    assert pick(0.0) == 1 and pick(None) == 1
    assert pick(50.0) == max(netmoe.CHUNK_CHOICES) and pick(50.0, S=6) == 4 and pick(50.0, S=1) == 1
    assert pick(1.0, links=dataclasses.replace(topo, intra_lat=1.0, inter_lat=1.0)) == 1
    # links that cannot move bytes beside other work: every chunk only adds its alphas
    shared = dataclasses.replace(topo, intra_lat=1e-6, inter_lat=1e-6, overlap=0.0)
    assert pick(50.0, links=shared) == 1
    node = netmoe.Routing.from_routes(rng.integers(0, 8, (8, 16, 2)), topo, 8, exchange="node")
    assert netmoe.best_chunks(node, here, dest, 1000.0, 50.0, 1024, shared) == 1
    assert netmoe.best_chunks(node, here, dest, 1000.0, 0.0, 1024, dataclasses.replace(shared, overlap=1.0, intra_lat=0.0, inter_lat=0.0)) > 1
    for ms in (0.01, 0.1, 1.0):
        links = dataclasses.replace(topo, intra_lat=1e-4, inter_lat=2e-4, intra_bw=2e9, inter_bw=1e9)
        exposed = {C: (lambda s: s.a2a_model_ms - s.a2a_hidden_ms)(
            netmoe.layer_stats(r.num, here, dest, links, 1000.0, chunks=C, expert_ms=ms)) for C in netmoe.CHUNK_CHOICES}
        assert exposed[pick(ms, links=links)] == min(exposed.values())


def test_links_that_move_two_messages_at_once_make_two_chunks_pay_without_compute():
    """Topology.streams: a link that moves two messages at once as fast as one (gloo stages CUDA
    tensors through the host) sends C chunks in C / 2 rounds. Eq. 1 as built then prices the
    expert exchange in 2 chunks below 1 even with nothing to hide behind, and best_chunks takes
    2; on a link of one message at a time, chunks only add alphas and it takes 1."""
    alpha, bw, rows, per_row = 1e-4, 1e9, 10 ** 6, 100
    one = netmoe.Topology(2, 2, intra_bw=bw, inter_bw=bw, intra_lat=alpha, inter_lat=alpha)
    two = dataclasses.replace(one, streams=2.0)
    volume = dict(local=0, intra=rows, inter=rows)
    move = rows * per_row / bw
    assert netmoe.a2a_time(volume, one, per_row) == pytest.approx(alpha + move)
    assert netmoe.a2a_time(volume, one, per_row, chunks=2) == pytest.approx(2 * alpha + move)
    assert netmoe.a2a_time(volume, two, per_row, chunks=2) == pytest.approx(alpha + move / 2)
    assert netmoe.a2a_time(volume, two, per_row, chunks=4) == pytest.approx(2 * (alpha + move / 4))
    assert netmoe.a2a_time(volume, two, per_row, chunks=1) == pytest.approx(alpha + move)
    rng = np.random.default_rng(1)
    r = netmoe.Routing.of(rng.integers(0, 5000, (8, 8)), one)
    here = netmoe.static_placement(8, 4)
    assert netmoe.best_chunks(r, here, here, per_row, 0.0, 1024, one) == 1
    assert netmoe.best_chunks(r, here, here, per_row, 0.0, 1024, two) == 2
    with pytest.raises(ValueError, match="streams"):
        netmoe.Topology(2, 2, streams=0.5)


def test_the_chunk_trial_times_the_proposal_its_neighbours_and_one_chunk_then_keeps_the_fastest():
    """ChunkTrial: the candidates are one chunk, Eq. 1's proposal and its neighbours in
    CHUNK_CHOICES within the positions; each runs ROUNDS times in turn; the kept C is the one whose
    best call (forward, plus the backward added later) the slowest rank (reduce) found fastest,
    fewer chunks on a tie, and it stays."""
    R = netmoe.ChunkTrial.ROUNDS
    assert netmoe.ChunkTrial(1, 1024).candidates == [1, 2]
    assert netmoe.ChunkTrial(2, 1024).candidates == [1, 2, 4]
    assert netmoe.ChunkTrial(8, 1024).candidates == [1, 4, 8]
    assert netmoe.ChunkTrial(4, 6).candidates == [1, 2, 4]
    one = netmoe.ChunkTrial(1, 1)
    assert one.candidates == [1] and one.settled and one.next() == 1
    rng = np.random.default_rng(0)
    for proposed in (1, 2, 4, 8):
        for ties in (False, True):
            ms = {C: rng.choice([3.0, 5.0]) if ties else rng.uniform(1, 9) for C in netmoe.CHUNK_CHOICES}
            other = {C: rng.uniform(1, 9) for C in netmoe.CHUNK_CHOICES}   # another rank's
            trial = netmoe.ChunkTrial(proposed, 1024, reduce=lambda m: [max(a, other[C]) for a, C in
                                                                         zip(m, trial.candidates)])
            ran = []
            while not trial.settled:
                C = trial.next()
                if not trial.settled:
                    ran.append(C)
                    later = rng.uniform(0, 1) * (len(ran) > len(trial.candidates))
                    call = trial.timed(C, ms[C] / 3 + later)
                    call[1] += 2 * ms[C] / 3   # its backward
            assert ran == trial.candidates * R
            slowest = {C: max(ms[C], other[C]) for C in trial.candidates}
            want = min(trial.candidates, key=lambda C: (slowest[C], C))
            assert trial.chosen == want and trial.next() == want
            assert trial.record_of()["kept"] == want and trial.record_of()["call_ms"] == {
                str(C): pytest.approx(v) for C, v in slowest.items()}


def test_a_trial_call_counts_its_own_backward_once():
    """_time_backward adds the time from the gradient reaching a call's output to its reaching the
    input (here a backward that sleeps 50 ms) to that call's entry, once: x reused by a later call
    adds nothing more to it."""
    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.05)
            return 2 * g
    x = torch.randn(4, requires_grad=True)
    call = [2, 1.0]
    out = Slow.apply(x)
    netmoe._time_backward(out, x, call)
    out.sum().backward()
    assert 1.0 + 50 <= call[1] < 1.0 + 1000
    counted = call[1]
    Slow.apply(x).sum().backward()
    assert call[1] == counted
    with torch.no_grad():
        netmoe._time_backward(Slow.apply(x), x, call)   # nothing to time: no hook, no error
    assert call[1] == counted


def _auto_chunks_worker(rank, world, init_file, exchange, out_file):
    """Layers with chunks="auto" over 4 gloo ranks: the links each measured, the C of each call,
    and how far their outputs and input gradients fall from the same layers in one chunk."""
    train_gpt.start_rank(rank, world, "file://" + init_file, "cpu")
    topo = netmoe.Topology(2, 2)
    def make(chunks, links=None):   # the same weights every time
        torch.manual_seed(0)
        return [netmoe.MoELayer(H_, F_, 8, 2, topology=topo, exchange=exchange, chunks=chunks, links=links).double()
                for _ in range(2)]
    auto, one = make("auto"), make(1)
    free = make("auto", dataclasses.replace(topo, intra_lat=0.0, inter_lat=0.0))   # messages cost nothing
    used, worst = {"auto": [], "free": []}, 0.0
    for step in range(8):   # the probed layers' trial: their first call, then at most 3 candidates twice
        x = torch.randn(2, S_, H_, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))
        outs = {}
        for name, layers in (("auto", auto), ("free", free), ("one", one)):
            h, sid = x.clone().requires_grad_(), torch.arange(2 * rank, 2 * rank + 2)
            y, s = h, sid
            for L, nxt in zip(layers, layers[1:] + [None]):
                y, s, _ = L(y, s, next_layer=nxt)
            y.square().sum().backward()
            outs[name] = (y.detach(), s, h.grad)
            if name in used:
                used[name].append(sum(sum(L.pop_stats().chunks) for L in layers))
        for name in ("auto", "free"):
            assert torch.equal(outs[name][1], outs["one"][1])
            for a, b in zip(outs[name][::2], outs["one"][::2]):
                worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    report = dict(links=train_gpt.links_of(auto[0].links), free=train_gpt.links_of(free[0].links), used=used,
                  worst=worst, next=[L.chunk_trial.next() for L in auto] + [L.next_chunks for L in free],
                  trial_ms=[L.chunk_trial.ms for L in auto], free_trial=[L.chunk_trial for L in free])
    every = [None] * world
    dist.all_gather_object(every, report)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(every, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_auto_chunks_measure_the_links_once_and_every_rank_runs_the_same_chunks(exchange):
    """--chunks auto on 4 gloo ranks: the links are measured at the first call (every rank the
    same alphas and bandwidths, all positive) and shared by the layers; every rank runs every
    call in the same C (else the All-to-Alls would not match), the first in one chunk; with
    messages that cost nothing the layers then run in the most chunks S_ positions allow; the
    probed layers keep the C of their trial that the slowest rank timed fastest; and the results
    equal the same layers' in one chunk."""
    every = _spawn(_auto_chunks_worker, 4, exchange)
    agreed = [{k: v for k, v in r.items() if k not in ("worst", "trial_ms")} for r in every]
    assert all(r == agreed[0] for r in agreed[1:])   # links, chunks, next choices: one answer everywhere
    r = every[0]
    assert all(v > 0 for k, v in r["links"].items() if k != "overlap") and 0 <= r["links"]["overlap"] <= 1
    assert 1 <= r["links"]["streams"] <= 2
    assert r["free"]["intra_lat"] == r["free"]["inter_lat"] == 0
    assert r["used"]["auto"][0] == r["used"]["free"][0] == 2   # 2 layers, 1 chunk each
    assert r["used"]["free"][2:] == [2 * 4] * 6   # C = 4: the most of CHUNK_CHOICES within S_ = 6
    assert r["free_trial"] == [None, None]   # links given: Eq. 1 alone
    for layer, kept in enumerate(r["next"][:2]):   # the probed layers kept what the slowest rank timed fastest
        ms = [{int(C): v for C, v in e["trial_ms"][layer].items()} for e in every]
        assert all(len(v) == netmoe.ChunkTrial.ROUNDS for v in ms[0].values()) and 1 in ms[0]
        slowest = {C: max(min(m[C]) for m in ms) for C in ms[0]}
        assert kept == min(slowest, key=lambda C: (slowest[C], C))
    assert max(r["worst"] for r in every) <= 1e-10


def test_ranks_that_disagree_fail_together_with_a_clear_error():
    report = _spawn(_disagreement_worker, 2)
    assert report["batch"] == "every rank must hold the same number of samples; per rank: [2, 3]"
    assert "different expert maps" in report["map"]
    assert "clear the gradients" in report["grads"]
    assert report["moved"] == 2 and report["same_rows"]


# ---- training: train_gpt.py end to end (4 gloo processes, 2 virtual nodes x 2)


# -- numerics: static and NetMoE train the same model, the record says what ran


TINY = ["--preset", "tiny", "--steps", "6", "--skip-steps", "1", "--log-every", "100", "--eval-batches", "1",
        "--seq-len", "32", "--warmup-steps", "2", "--cpu"]


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    res = CliRunner().invoke(train_gpt.cli, args + ["--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compare_4proc(tmp_path_factory):
    return _run(["compare", *TINY, "--nproc", "4", "--topology", "2x2", "--debug"], tmp_path_factory.mktemp("cmp"), "cmp")


def test_compare_gives_identical_losses_and_netmoe_moves_fewer_inter_node_tokens(compare_4proc):
    static, ours = compare_4proc["runs"]["static"], compare_4proc["runs"]["netmoe"]
    assert len(static["loss"]) == len(ours["loss"]) == 6
    np.testing.assert_allclose(ours["loss"], static["loss"], rtol=1e-5)
    assert ours["val_loss"] == pytest.approx(static["val_loss"], rel=1e-5)
    inter = lambda r: sum(r["volume"]["gather"]["inter"])
    assert inter(ours) < inter(static)
    assert sum(ours["moved_frac"]["node"]) > 0 and sum(static["moved_frac"]["device"]) == 0
    assert static["loss"][-1] < static["loss"][0]


def test_deepseek_style_options_train_the_same_under_both_placements_and_reach_the_record(tmp_path):
    """Fine-grained and shared experts with group-limited routing, chunked node exchange: static
    EP and NetMoE train the same model (losses to float32 rounding), and the record says so."""
    args = ["compare", *TINY, "--steps", "3", "--nproc", "4", "--topology", "2x2", "--exchange", "node",
            "--expert-hidden", "32", "--shared-experts", "1", "--route-groups", "2", "--group-top", "1", "--chunks", "3"]
    res = _run(args, tmp_path, "modern")
    c = res["config"]
    assert (c["expert_hidden"], c["shared_experts"], c["route_groups"], c["group_top"], c["chunks"]) == (32, 1, 2, 1, 3)
    static, ours = res["runs"]["static"], res["runs"]["netmoe"]
    np.testing.assert_allclose(ours["loss"], static["loss"], rtol=1e-5)
    assert sum(ours["moved_frac"]["node"]) > 0
    head = train_gpt.summary_table(res, 1).splitlines()[0]   # the table names what changed the model and the exchange
    assert head.startswith("tiny: 2 layers, H=64, S=32, I=16, E=8, K=2, F=32, 1 shared expert, a token's K from 1 of "
                           "2 groups; J=4 on 2x2; node exchange in 3 chunks, float32 stream, lookahead; means"), head


def test_json_record_follows_the_documented_schema(compare_4proc):
    run = compare_4proc["runs"]["netmoe"]
    for key in ("loss", "iter_ms", "a2a_ms", "a2a_model_ms", "solver_ms", "solver_exposed_ms"):
        assert len(run[key]) == 6
    assert set(run["volume"]) == {"scatter", "gather"}
    assert all(set(run["volume"][p]) == {"local", "intra", "inter"} for p in run["volume"])
    assert set(run["moved_frac"]) == {"node", "device"}
    H = compare_4proc["config"]["hidden"]   # the CPU's default stream: float32 rows, with the gate weight,
    assert compare_4proc["config"]["dtype"] == "float32"   # an int32 sample and position and an expert and choice
    assert compare_4proc["config"]["wire_bytes_per_row"] == {"scatter": 4 * H + 12, "gather": 4 * H + 4}


def test_a_bf16_stream_trains_and_prices_the_bytes_it_sends(compare_4proc, tmp_path):
    """--dtype bfloat16 on the CPU: the stream and the rows are bf16 (weights float32), the loss
    follows the float32 run's to bf16 rounding, and Eq. 1 prices half the bytes."""
    r = _run(["compare", *TINY, "--virtual-world", "4", "--topology", "2x2", "--dtype", "bfloat16"], tmp_path, "bf16")
    H = r["config"]["hidden"]
    assert r["config"]["dtype"] == "bfloat16" and r["config"]["wire_bytes_per_row"] == {"scatter": 2 * H + 8,
                                                                                          "gather": 2 * H + 4}
    for p in ("static", "netmoe"):
        ours, f32 = r["runs"][p], compare_4proc["runs"][p]
        np.testing.assert_allclose(ours["loss"], f32["loss"], rtol=2e-2)
        # Eq. 1 per row crossing nodes (the slower tier here): bf16 rows weigh (2H + 6) / (4H + 8),
        # the mean of scatter's (2H + 8) / (4H + 12) and gather's (2H + 4) / (4H + 4)
        per_row = lambda run: np.array(run["a2a_model_ms"]) / np.add(run["volume"]["scatter"]["inter"],
                                                                      run["volume"]["gather"]["inter"])
        np.testing.assert_allclose(per_row(ours) / per_row(f32), (2 * H + 6) / (4 * H + 8), rtol=1e-3)


def test_distributed_training_equals_the_single_process_model(compare_4proc, tmp_path):
    """Same losses after several optimizer steps: dense grads averaged, expert grads scaled by 1/J,
    the clipping norm global -- any mistake there changes the updates."""
    single = _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2"], tmp_path, "single")
    np.testing.assert_allclose(single["runs"]["netmoe"]["loss"], compare_4proc["runs"]["netmoe"]["loss"], rtol=1e-5)
    assert single["runs"]["netmoe"]["volume"] == compare_4proc["runs"]["netmoe"]["volume"]


def test_weight_decay_is_chosen_by_role_not_shape():
    model = train_gpt.GPT(train_gpt.PRESETS["tiny"], 2, virtual_world=2)
    opt = train_gpt.make_optimizer(model, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].split(".")[-1] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)].split(".")[-1] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {"weight", "w1", "w2"} and plain == {"weight", "bias", "b1", "b2"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    for g in opt.param_groups:   # matrices decay; biases (the experts' stacked ones too) and norms do not
        assert all((p.dim() >= 2 and not names[id(p)].endswith(("b1", "b2"))) == (g["weight_decay"] > 0)
                   for p in g["params"])


def test_corpus_fingerprint_covers_content_not_only_lengths(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = "".join(chr(97 + i % 26) for i in range(5000))
    a.write_text(text)
    b.write_text(text[:2500] + text[2500:].upper())
    assert train_gpt.Corpus(str(a), 32).fingerprint != train_gpt.Corpus(str(b), 32).fingerprint
    assert train_gpt.Corpus(str(a), 32).fingerprint == train_gpt.Corpus(str(a), 32).fingerprint


def test_no_validation_batches_gives_a_record_without_a_validation_loss(tmp_path):
    r = _run(["train", *TINY, "--virtual-world", "4", "--eval-batches", "0"], tmp_path, "noval")
    assert r["runs"]["netmoe"]["val_loss"] is None and len(r["runs"]["netmoe"]["loss"]) == 6


@pytest.mark.skipif(os.environ.get("NETMOE_SLOW") != "1",
                    reason="slow (about a minute): the main job end to end; NETMOE_SLOW=1 runs it, as CI does")
def test_main_job_runs_with_no_arguments():
    res = subprocess.run([sys.executable, "train_gpt.py"], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.abspath(train_gpt.__file__)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "inter-node tokens / step" in res.stdout and "netmoe" in res.stdout


# -- checkpoints: resume exactly, never break one


def _first_half(args):
    """The same run cut short after 3 of its 6 steps, on the 6-step learning-rate schedule."""
    i = args.index("--steps")
    return args[:i] + ["--steps", "3", "--decay-steps", "6"] + args[i + 2:]


def test_resume_reproduces_the_uninterrupted_run(compare_4proc, tmp_path):
    """Past the learning-rate warm-up (2 steps), so the schedule's length matters too."""
    ck = str(tmp_path / "ck")
    args = ["train", *TINY, "--nproc", "4", "--topology", "2x2", "--ckpt", ck, "--ckpt-every", "2"]
    first = _run(_first_half(args), tmp_path, "first")
    assert len(first["runs"]["netmoe"]["loss"]) == 3
    resumed = _run(args + ["--resume"], tmp_path, "resumed")
    np.testing.assert_allclose(resumed["runs"]["netmoe"]["loss"], compare_4proc["runs"]["netmoe"]["loss"], rtol=1e-6)


def test_a_checkpoint_remembers_the_learning_rate_schedule(tmp_path):
    """A run saved on a 6-step schedule and resumed with --steps 8 continues on that schedule,
    as the uninterrupted 8-step run on it does; a --decay-steps that differs is refused."""
    ck = str(tmp_path / "ck")
    args = ["train", *TINY, "--virtual-world", "4", "--topology", "2x2", "--ckpt", ck]
    _run(_first_half(args), tmp_path, "first")
    res = CliRunner().invoke(train_gpt.cli, args + ["--steps", "8", "--decay-steps", "8", "--resume"])
    assert res.exit_code != 0 and "decay_steps: saved 6, now 8" in res.output, res.output
    assert "without --decay-steps" in res.output.strip().splitlines()[-1], res.output
    longer = _run(args + ["--steps", "8", "--resume"], tmp_path, "longer")["runs"]["netmoe"]["loss"]
    whole = _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2", "--steps", "8", "--decay-steps", "6"],
                 tmp_path, "whole")["runs"]["netmoe"]["loss"]
    np.testing.assert_allclose(longer, whole, rtol=1e-6)
    _run(args + ["--steps", "10", "--decay-steps", "6", "--resume"], tmp_path, "again")   # the same schedule, named


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_checkpoint_directory_is_refused_and_leaves_it_resumable(tmp_path):
    """A fresh run would prune the saved run's steps and point `latest` at its own: refused
    before anything starts, in one line naming --resume and another --ckpt. Pruning keeps the
    two newest steps, and the directory still resumes."""
    ck = tmp_path / "ck"
    args = ["train", *TINY, "--virtual-world", "4", "--ckpt", str(ck), "--ckpt-every", "1"]
    _run(args + ["--steps", "4"], tmp_path, "first")
    assert sorted(p.name for p in (ck / "netmoe").iterdir()) == ["latest", "step0000003", "step0000004"]
    before = _files(ck)
    for cmd in (["train", "--steps", "2"], ["compare", "--steps", "2"]):   # any of the job's placements
        res = CliRunner().invoke(train_gpt.cli, cmd + args[1:] + ["--json", str(tmp_path / "x.json")])
        assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1, res.output
        assert "netmoe at step 4" in res.output and "--resume" in res.output and "another --ckpt" in res.output
        assert "loss" not in res.output and not (tmp_path / "x.json").exists()
        assert _files(ck) == before
    resumed = _run(args + ["--steps", "6", "--resume"], tmp_path, "resumed")["runs"]["netmoe"]
    assert len(resumed["loss"]) == 6


def test_pruning_keeps_the_newest_checkpoints_by_step_number(tmp_path):
    for step in (5, 9_999_999, 10_000_000, 10_000_001):
        (tmp_path / f"step{step:07d}").mkdir()
    train_gpt.prune_checkpoints(str(tmp_path), str(tmp_path / "step10000001"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10000000", "step10000001"]
    train_gpt.prune_checkpoints(str(tmp_path), str(tmp_path / "step10000000"), keep=1)   # never the one `latest` names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10000000", "step10000001"]


def test_resume_with_nothing_to_resume_is_refused_and_a_missing_placement_starts_fresh(tmp_path):
    """--resume where none of the job's placements has a checkpoint: one line, nothing trained.
    Where one has and another has not (compare stopped during its static run), the other starts
    from step 0 and says so."""
    ck = tmp_path / "ck"
    base = [*TINY, "--virtual-world", "4", "--steps", "2", "--eval-batches", "0"]
    for args in (["train", *base, "--ckpt", str(tmp_path / "missing"), "--resume"],
                 ["train", "--placement", "static", *base, "--ckpt", str(ck), "--resume"]):
        if not ck.exists():
            _run(["train", *base, "--ckpt", str(ck)], tmp_path, "netmoe")
        res = CliRunner().invoke(train_gpt.cli, args)
        assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1, res.output
        assert "nothing to resume in" in res.output and "drop --resume" in res.output and "loss" not in res.output
    assert not (tmp_path / "missing").exists() and not (ck / "static").exists()
    res = CliRunner().invoke(train_gpt.cli, ["compare", *base, "--ckpt", str(ck), "--resume"])
    assert res.exit_code == 0, res.output
    assert f"[static] no checkpoint in {ck / 'static'}: this placement starts from step 0" in res.output
    assert f"[netmoe] resumed from {ck / 'netmoe'} at step 2" in res.output


def test_a_placement_without_a_checkpoint_starts_fresh_and_the_trace_survives_a_resume(tmp_path):
    """compare stopped during its static run has no netmoe checkpoint: --resume finishes static
    and starts netmoe from step 0. The routing trace recorded before the stop is kept."""
    ck, trace = str(tmp_path / "ck"), str(tmp_path / "t.npz")
    base = [*TINY, "--virtual-world", "4", "--topology", "2x2", "--ckpt", ck, "--trace", trace]
    whole = _run(["compare", *TINY, "--virtual-world", "4", "--topology", "2x2",
                  "--trace", str(tmp_path / "whole.npz")], tmp_path, "whole")
    _run(["train", "--placement", "static", *base], tmp_path, "static")
    res = _run(["compare", *base, "--resume"], tmp_path, "resumed")
    assert res["runs"]["static"]["loss"] == whole["runs"]["static"]["loss"]
    np.testing.assert_allclose(res["runs"]["netmoe"]["loss"], whole["runs"]["netmoe"]["loss"], rtol=1e-6)
    shutil.rmtree(ck)   # now a netmoe run cut short and resumed: its trace holds every step once
    _run(_first_half(["train", *base]), tmp_path, "first")
    _run(["train", *base, "--resume"], tmp_path, "second")
    got, want = np.load(trace), np.load(str(tmp_path / "whole.npz"))
    assert got["steps"].tolist() == want["steps"].tolist() == list(range(6))
    assert np.array_equal(got["route"], want["route"])


def test_a_rank_that_cannot_load_its_checkpoint_stops_every_rank(tmp_path):
    ck = tmp_path / "ck"
    args = ["train", *TINY, "--nproc", "4", "--topology", "2x2", "--ckpt", str(ck), "--steps", "2"]
    _run(args, tmp_path, "a")
    (ck / "netmoe" / "step0000002" / "rank2.pt").write_bytes(b"garbage")
    res = CliRunner().invoke(train_gpt.cli, args + ["--resume"])
    assert res.exit_code != 0 and "unreadable" in res.output and "on rank 2" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    ck = tmp_path / "ck"
    base = ["train", *TINY, "--virtual-world", "4", "--steps", "2", "--ckpt", str(ck)]
    _run(base, tmp_path, "a")
    res = CliRunner().invoke(train_gpt.cli, base + ["--resume", "--seed", "1"])
    assert res.exit_code != 0 and "another configuration" in res.output and "seed" in res.output
    (ck / "netmoe" / "step0000002" / "dense.pt").write_bytes(b"garbage")
    res = CliRunner().invoke(train_gpt.cli, base + ["--resume"])
    assert res.exit_code != 0 and "unreadable" in res.output, res.output


# -- re-layout: experts move only where it pays, and every rank moves them alike


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_expert_relayouts_during_training_change_nothing_but_the_layout(compare_4proc, tmp_path, exchange):
    """Experts (weights and optimizer state) move between the 4 ranks every 2 steps; the losses
    stay those of static EP. A run cut short after a move and resumed makes the same plans from
    the same recent batches (they are in the checkpoint, with the routes the node exchange's
    planner prices with): the same experts move, to the same layouts, with the same losses and
    the same modelled savings."""
    ck = str(tmp_path / "ck")
    args = ["train", *TINY, "--nproc", "4", "--topology", "2x2", "--relayout-every", "2", "--relayout-always",
            "--ckpt", ck, "--ckpt-every", "3", "--exchange", exchange]
    moved = _run(args, tmp_path, "moved")["runs"]["netmoe"]
    assert [r["step"] for r in moved["relayouts"]] == [2, 4]   # none after the last step: nothing left to serve
    assert all(r["experts_moved"] > 0 for r in moved["relayouts"])
    np.testing.assert_allclose(moved["loss"], compare_4proc["runs"]["static"]["loss"], rtol=1e-5)
    args = [a if a != ck else str(tmp_path / "ck2") for a in args]
    first = _run(_first_half(args), tmp_path, "first")["runs"]["netmoe"]   # stops after the move at step 2
    assert first["relayouts"][0]["experts_moved"] > 0
    resumed = _run(args + ["--resume"], tmp_path, "resumed")["runs"]["netmoe"]
    np.testing.assert_allclose(resumed["loss"], moved["loss"], rtol=1e-6)
    plans = lambda run: [(r["step"], r["experts_moved"], r["bytes"]) for r in run["relayouts"]]
    assert plans(resumed) == plans(moved)
    np.testing.assert_allclose([r["saving_ms_per_step"] for r in resumed["relayouts"]],
                               [r["saving_ms_per_step"] for r in moved["relayouts"]], rtol=1e-9)
    assert resumed["layouts"] == moved["layouts"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the ranks share it)")
@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_four_ranks_train_on_cuda_tensors_relay_out_and_resume(tmp_path, exchange):
    """The training loop with world 4 on CUDA tensors (ranks sharing one GPU over gloo, or a GPU
    each): experts and their optimizer state move between ranks every 2 steps, and a run cut
    short after a move resumes to the uninterrupted run's losses, plans and layouts."""
    args = ["train", *[a for a in TINY if a != "--cpu"], "--nproc", "4", "--topology", "2x2", "--dtype", "float32",
            "--exchange", exchange, "--relayout-every", "2", "--relayout-always", "--ckpt-every", "3"]
    whole = _run(args + ["--ckpt", str(tmp_path / "whole")], tmp_path, "whole")
    assert whole["config"]["device"] == "cuda" and whole["config"]["world"] == 4
    assert whole["config"]["ranks_on"] == ("gpu" if torch.cuda.device_count() >= 4 else "shared")
    args += ["--ckpt", str(tmp_path / "ck")]
    first = _run(_first_half(args), tmp_path, "first")["runs"]["netmoe"]
    assert first["relayouts"][0]["experts_moved"] > 0
    resumed = _run(args + ["--resume"], tmp_path, "resumed")["runs"]["netmoe"]
    whole = whole["runs"]["netmoe"]
    # CUDA's index_add adds in any order: float32 rounding apart, not more
    np.testing.assert_allclose(resumed["loss"], whole["loss"], rtol=1e-4)
    plans = lambda run: [(r["step"], r["experts_moved"], r["bytes"]) for r in run["relayouts"]]
    assert plans(resumed) == plans(whole) and all(r["experts_moved"] > 0 for r in whole["relayouts"])
    assert resumed["layouts"] == whole["layouts"]


def _plan_worker(rank, world, init_file, out_file):
    """Rank-dependent recent batches stand in for ranks whose float arithmetic disagrees: the
    layouts every rank applies must still be the one rank 0 planned."""
    train_gpt.start_rank(rank, world, "file://" + init_file, "cpu")
    mcfg = dataclasses.replace(train_gpt.PRESETS["tiny"], seq_len=8)
    topo = netmoe.Topology(2, 1)
    model = train_gpt.GPT(mcfg, world, topology=topo)
    rng = np.random.default_rng(100 + rank)
    planted = [[rng.integers(0, 20, size=(8, 4)) for _ in range(4)] for _ in model.moe]
    for m, window in zip(model.moe, planted):
        m.window = lambda window=window: window
    env = train_gpt.Env(rank, world, world, topo, torch.device("cpu"))
    cfg = train_gpt.TrainConfig(relayout_every=1, relayout_always=True)
    mine = netmoe.plan_relayout(planted, [m.expert_device for m in model.moe], topo,
                                4 * mcfg.hidden, 1.0, 1)["layouts"]
    train_gpt.relayout(model, train_gpt.make_optimizer(model, 1e-3), env, cfg, 0, dict(ms_per_byte=None), print)
    maps = [None] * world
    dist.all_gather_object(maps, ([m.expert_device.tolist() for m in model.moe], [l.tolist() for l in mine]))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(maps, f)
    dist.destroy_process_group()


def test_rank_zero_plans_each_relayout_so_ranks_cannot_disagree():
    (applied0, planned0), (applied1, planned1) = _spawn(_plan_worker, 2)
    assert planned0 != planned1   # the planted disagreement: each rank alone would move differently
    assert applied0 == applied1 == planned0


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_relayout_is_applied_only_when_the_modelled_saving_pays_for_the_move(tmp_path, exchange):
    """A plan moves experts only when its modelled saving per step, over the steps left in the run
    (the layout then serves to the end, or until a later plan replaces it), exceeds the move's
    cost. Re-planning every step here, a move of whole experts (about 0.4 MB each) is never paid
    back by a few thousand 268-byte rows a step: every plan is skipped, and the record says why.
    None is made after the last step, which leaves no step for a layout to serve."""
    r = _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2", "--relayout-every", "1",
              "--exchange", exchange], tmp_path, "gate")["runs"]["netmoe"]
    assert len(r["relayouts"]) == 5 and any(plan["bytes"] > 0 for plan in r["relayouts"])
    assert [plan["horizon_steps"] for plan in r["relayouts"]] == [5, 4, 3, 2, 1]
    for plan in r["relayouts"]:
        assert plan["applied"] == (plan["saving_ms_per_step"] * plan["horizon_steps"] > plan["cost_ms"])
        assert not plan["applied"] and plan["experts_moved"] == 0


def test_the_node_exchange_planner_prices_layouts_in_the_rows_the_node_exchange_sends(rng):
    """Under the node exchange a layout's worth is its (token, node) rows, which per-sample expert
    counts cannot give: plan_relayout prices it from routes, as the node exchange's replay does,
    and the planted structure makes that saving differ from the expert exchange's."""
    topo, E, L = netmoe.Topology(2, 2), 8, 2
    # samples use experts {0, 5} or {2, 7} (the contiguous layout splits each pair over the nodes)
    pairs = np.array([[0, 5], [2, 7]])
    routes = [[pairs[rng.integers(0, 2, size=8)][:, None, :].repeat(6, 1) for _ in range(3)] for _ in range(L)]
    recent = [[netmoe.count_tokens(r, E).numpy() for r in layer] for layer in routes]
    current = [netmoe.default_expert_device(E, 4)] * L
    wire = netmoe.NodeExchange.wire_bytes(16, torch.float32, 2)
    node = netmoe.plan_relayout(recent, current, topo, wire, 1.0, 10, "node", routes)
    expert = netmoe.plan_relayout(recent, current, topo, wire, 1.0, 10)
    assert node["saving_ms"] > 0 and node["saving_ms"] != pytest.approx(expert["saving_ms"])
    assert node["horizon"] == 10 and node["apply"] == (node["saving_ms"] * 10 > node["cost_ms"])
    # by hand: leave-one-out, each batch priced under the layout learned on the other two
    want = 0.0
    for k in range(3):
        trial = netmoe.expert_layout([np.concatenate([recent[l][j] for j in range(3) if j != k]) for l in range(L)],
                                     topo, current=current)
        price = lambda lay: netmoe.replay(netmoe.routings([routes[l][k] for l in range(L)], topo, E, lay, "node"),
                                          topo, wire, netmoe.routings([routes[l][k] for l in range(1, L)], topo, E,
                                                                      lay[1:], "node")).a2a_model_ms
        want += (price(current) - price(trial)) / 3
    assert node["saving_ms"] == pytest.approx(want)
    with pytest.raises(ValueError, match="prices layouts from routes"):
        netmoe.plan_relayout(recent, current, topo, wire, 1.0, 10, "node")


# -- ranks, Ctrl-C and failures: one line, exit 130, nothing left behind


def _one_rank_fails_worker(rank, world, init, out_path):
    if rank == 1:
        raise click.ClickException("rank 1 cannot go on")
    time.sleep(300)   # still running when rank 1 fails, so it has to be stopped


def test_a_failing_rank_reaches_the_user_as_exactly_one_line(capfd):
    """The ranks still running when one fails are stopped, without torch's "Terminating process
    N via signal SIGTERM" lines before the error (its logger writes to the stderr it found at
    import, so the test listens to the logger itself)."""
    spawn_log, records = logging.getLogger("torch.multiprocessing.spawn"), []
    level, listener = spawn_log.level, logging.Handler()
    listener.emit = records.append
    spawn_log.addHandler(listener)
    try:
        with pytest.raises(click.ClickException) as e:
            with train_gpt.one_line_errors():
                train_gpt.run_ranks(_one_rank_fails_worker, 2, ())
    finally:
        spawn_log.removeHandler(listener)
    assert e.value.message == "a rank failed: rank 1 cannot go on"
    assert records == [] and capfd.readouterr().err == "" and spawn_log.level == level


def _ranks_of(pid):
    """The spawned ranks of process pid (its children running multiprocessing's spawn_main)."""
    ranks = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
            ranks += [int(c) for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        except FileNotFoundError:   # a task or a child that just ended
            pass
    return ranks


def _ctrl_c(args, after=None, to="group"):
    """`python train_gpt.py *args` as a user runs it, and Ctrl-C once `after` appears in its
    output, or (after=None) as soon as its 2 ranks exist: SIGINT to its process group as a
    terminal sends it, or (to="launcher") to the launching process alone as `kill -INT` does.
    Returns (exit status, output, the ranks there were)."""
    p = subprocess.Popen([sys.executable, "train_gpt.py", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True, cwd=os.path.dirname(os.path.abspath(train_gpt.__file__)))
    try:
        out = ""
        while after is None and len(_ranks_of(p.pid)) < 2:
            assert p.poll() is None, p.communicate()[0]
            time.sleep(0.01)
        while after is not None and after not in out:
            line = p.stdout.readline()
            assert line, out   # the run ended first
            out += line
        ranks = _ranks_of(p.pid)
        (os.killpg if to == "group" else os.kill)(p.pid, signal.SIGINT)
        out += p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, out, ranks


CTRL_C_JOB = ["train", "--preset", "tiny", "--seq-len", "16", "--steps", "100000", "--nproc", "2", "--cpu",
              "--log-every", "1", "--eval-batches", "0"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the ranks through /proc")
@pytest.mark.parametrize("job, after, to", [
    (CTRL_C_JOB, None, "group"), (CTRL_C_JOB, None, "launcher"),   # 2 ranks, still importing
    (["train", "--preset", "s", "--n-layer", "1", "--seq-len", "32", "--virtual-world", "4", "--cpu"],
     "(virtual, one process)", "group")],   # one process, building its model (about a second)
    ids=["ranks starting, terminal", "ranks starting, kill the launcher", "model being built"])
def test_ctrl_c_during_start_up_stops_every_rank_and_exits_130(tmp_path, job, after, to):
    """Ctrl-C before training: every rank stops without training a step, nothing is saved, no
    process prints click's "Aborted!" or a traceback, and the exit status says interrupted."""
    ck = tmp_path / "ck"
    code, out, ranks = _ctrl_c([*job, "--ckpt", str(ck)], after, to)
    assert code == 130 and "interrupted (Ctrl-C)" in out, out
    assert "Aborted" not in out and "Traceback" not in out and "loss" not in out, out
    assert len(ranks) == (0 if after else 2) and not any(os.path.exists(f"/proc/{r}") for r in ranks)
    assert not ck.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the ranks through /proc")
def test_ctrl_c_while_training_saves_says_where_and_exits_130(tmp_path):
    """Ctrl-C during training: the ranks stop after the step, save, say where and how to go on,
    and the run exits 130 although it saved; --resume continues from the saved step."""
    ck, first = tmp_path / "ck", tmp_path / "first.json"
    code, out, _ = _ctrl_c([*CTRL_C_JOB, "--ckpt", str(ck), "--json", str(first)], after="step     1")
    assert code == 130 and "Aborted" not in out and "Traceback" not in out, out
    step = int(out.split("interrupted after step")[1].split(";")[0])
    assert f"interrupted after step {step}; checkpoint in {ck / 'netmoe'}, continue with --resume" in out
    assert (ck / "netmoe" / "latest").read_text() == f"step{step + 1:07d}"
    saved = json.loads(first.read_text())["runs"]["netmoe"]
    assert saved["interrupted"] and len(saved["loss"]) == step + 1
    job = [a if a != "100000" else str(step + 3) for a in CTRL_C_JOB]
    resumed = _run([*job, "--ckpt", str(ck), "--resume"], tmp_path, "resumed")["runs"]["netmoe"]
    assert resumed["loss"][:step + 1] == saved["loss"] and len(resumed["loss"]) == step + 3


def test_the_sigint_handler_is_ours_only_while_training_runs(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2"], tmp_path, "run")
    assert signal.getsignal(signal.SIGINT) is before


def test_fewer_gpus_than_ranks_share_them_with_a_notice_or_stop_under_torchrun(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train_gpt.rank_devices(False, 1) == "gpu"           # one rank, one GPU
    assert train_gpt.rank_devices(True, 4) == "cpu"            # asked for
    assert capsys.readouterr().err == ""
    assert train_gpt.rank_devices(False, 4) == "shared"        # four spawned ranks, one GPU: they share it over gloo
    notice = capsys.readouterr().err
    assert "share the GPU" in notice and "not for timing" in notice
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(train_gpt.RankError, match="pass --cpu"):
        train_gpt.rank_devices(False, 4)                       # torchrun placed them: refuse, in one line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert train_gpt.rank_devices(False, 4) == "cpu"           # no GPU at all


def test_a_stale_kernel_build_lock_falls_back_to_the_references_instead_of_waiting(tmp_path, monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = os.path.join(cpp_extension._get_build_directory("netmoe_kernels", False), "lock")
    open(lock, "w").close()
    with pytest.warns(UserWarning, match="build lock"):
        assert netmoe._load_kernels(timeout=0.2) is None


def _threads_worker(rank, world, init_file, cfg, out_file):
    """A training rank, then the names of the threads still alive in it."""
    train_gpt.worker(rank, world, "file://" + init_file, cfg, out_file + ".run")
    threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(threads, f)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
def test_training_ranks_leave_no_process_group_threads_behind():
    """When a rank's training returns, its process group is gone with its threads. Were they
    still alive, the interpreter's shutdown would destroy them, and a thread that wants the GIL
    then aborts the rank ("terminate called without an active exception"): now and then, since
    it is a race. (torch._dynamo, imported by torch.optim after the group was made, kept it alive.)"""
    cfg = train_gpt.TrainConfig(preset="tiny", steps=2, seq_len=32, nproc=2, topology=netmoe.Topology(2, 1), cpu=True,
                                eval_batches=1, log_every=100)
    threads = _spawn(_threads_worker, 2, cfg)
    assert not [t for t in threads if "gloo" in t], threads



def _in_repo(cmd, env=None, timeout=300):
    """A command run from the repository's folder as a user runs it there; its CompletedProcess."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=os.path.dirname(os.path.abspath(train_gpt.__file__)))


# the memory check refuses it on every rank alike, after the ranks made their process group
TOO_BIG = ["train", "--preset", "tiny", "--batch", "100000", "--steps", "1", "--cpu"]


@pytest.mark.parametrize("launch", ["spawned", "torchrun"])
def test_a_jobs_error_is_said_once_however_its_ranks_start(launch):
    """An error every rank raises alike reaches the user once: from the launcher, which spawned
    the ranks, or under torchrun from rank 0, the others leaving it to rank 0 (torchrun's own
    report of the failed ranks follows it)."""
    cmd = ([sys.executable, "train_gpt.py", *TOO_BIG, "--nproc", "2"] if launch == "spawned" else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_gpt.py", *TOO_BIG])
    res = _in_repo(cmd)
    out = res.stdout + res.stderr
    said = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert res.returncode == 1 and len(said) == 1 and "this run needs about" in said[0], out
    assert out.count("this run needs about") == 1, out


def test_under_torchrun_a_shared_error_is_said_by_local_rank_0_and_a_ranks_own_by_that_rank(monkeypatch):
    """Errors every rank raises alike (a bad option, a check made together) are said by each
    node's local rank 0 alone, with the same exit status on every rank; what torch raised on one
    rank (its own trouble, perhaps the root cause) is said by that rank, naming it."""
    monkeypatch.setattr(train_gpt, "QUIET_RANK_WAIT_S", 0)

    @click.group(cls=train_gpt.Cli)
    def cli():
        pass

    @cli.command()
    @click.option("--own", is_flag=True)
    def job(own):
        with train_gpt.one_line_errors():
            if own:
                raise RuntimeError("Connection closed by peer")
            raise click.ClickException("every rank refuses this")

    for rank, args, code, said in [("0", [], 1, "Error: every rank refuses this"), ("3", [], 1, ""),
                                   ("3", ["--bogus"], 2, ""), ("0", ["--bogus"], 2, "No such option '--bogus'"),
                                   ("3", ["--own"], 1, "Error: rank 3: RuntimeError: Connection closed by peer")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        res = CliRunner().invoke(cli, ["job", *args])
        assert res.exit_code == code and (said in res.output if said else res.output == ""), (rank, args, res.output)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_cluster.sh is a bash script")
def test_run_cluster_gives_up_on_a_master_it_cannot_reach_in_one_line_naming_it(tmp_path):
    """Before any torchrun (which would retry for minutes, printing C++ stack frames, deaf to
    Ctrl-C): MASTER_ADDR must resolve, name this host on node 0, and answer within WAIT seconds
    on the other nodes; else one line naming the host, and no result."""
    port = str(_free_port())
    for env, message in [
            (dict(NNODES="4", NODE_RANK="1", MASTER_ADDR="node0.invalid"), "MASTER_ADDR=node0.invalid does not resolve"),
            (dict(NNODES="4", NODE_RANK="0", MASTER_ADDR="node0.invalid"), "MASTER_ADDR=node0.invalid does not resolve"),
            (dict(NNODES="2", NODE_RANK="0", MASTER_ADDR="192.0.2.1"), "MASTER_ADDR=192.0.2.1 (192.0.2.1) is not this host"),
            (dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WAIT="1"),
             f"node 0 at MASTER_ADDR=127.0.0.1 port {port} did not answer within 1 s")]:
        res = _in_repo(["bash", "run_cluster.sh", "tiny"], dict(env, NPROC_PER_NODE="1", OUT=str(tmp_path)), timeout=120)
        assert res.returncode == 1 and res.stdout == "", (env, res.stdout, res.stderr)
        assert res.stderr.startswith("run_cluster.sh: ") and message in res.stderr, (env, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (env, res.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="run_cluster.sh is a bash script")
def test_ctrl_c_stops_run_cluster_while_torchrun_waits_for_the_other_nodes():
    """Node 0 of 2, the other never coming: torchrun waits in its rendezvous (WAIT=600 s here),
    where it takes no signal; Ctrl-C at the terminal still stops the script at once, with one
    line and status 130, and leaves no torchrun behind (its rendezvous port is closed again)."""
    port = _free_port()
    env = dict(os.environ, NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WAIT="600",
               NPROC_PER_NODE="1", CHECK_A2A="0")
    p = subprocess.Popen(["bash", "run_cluster.sh", "tiny", "--", "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True, cwd=os.path.dirname(os.path.abspath(train_gpt.__file__)))
    listening = lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0
    try:
        while not listening():   # torchrun's rendezvous is up: it waits for node 1
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)   # as a terminal sends Ctrl-C: to the script's process group
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "run_cluster.sh: interrupted", (out, err)
    assert not listening()


# -- command line: every bad input refused in one line, help that helps


BAD_LINES = [
    (["train", "--preset", "huge"], "'huge' is not one of"),
    (["train", "--nproc", "4", "--topology", "2x4"], "topology 2x4 has 8 devices"),
    (["train", "--topology", "2x2"], "pass --nproc 4 or --virtual-world 4"),
    (["train", "--virtual-world", "4", "--topology", "2x4"], "pass --virtual-world 8"),
    (["layer", "--nproc", "2", "--topology", "2x2"], "pass --nproc 4"),
    (["train", "--data", "/nonexistent/file.txt"], "does not exist"),
    (["train", "--virtual-world", "4", "--topology", "4x2"], "topology 4x2 has 8 devices"),
    (["train", "--resume"], "--resume needs --ckpt"),
    (["train", "--batch", "0"], "--batch"), (["train", "--top-k", "0"], "--top-k"),
    (["train", "--n-layer", "0"], "--n-layer"), (["train", "--seq-len", "0"], "--seq-len"),
    (["train", "--topology", "2x"], "not of the form"), (["train", "--topology", "0x4"], "positive integer"),
    (["train", "--nproc", "0"], "--nproc"), (["train", "--seed", "-1"], "--seed"),
    (["compare", "--log-every", "0"], "--log-every"), (["train", "--trace-every", "0"], "--trace-every"),
    (["train", "--ckpt-every", "0"], "--ckpt-every"), (["train", "--eval-batches", "-1"], "--eval-batches"),
    (["train", "--lr", "0"], "--lr"), (["train", "--lr", "nan"], "--lr"),
    (["train", "--top-k", "9", "--virtual-world", "4"], "exceeds the E=8 experts"),
    (["simulate", "--trace", __file__, "--topology", "2x2"], "not a routing trace"),
    (["simulate", "--trace", __file__, "--topology", "2x"], "not of the form"),
    (["summary", __file__], "is not a record summary reads"),
]


@pytest.mark.parametrize("args, message", BAD_LINES, ids=[" ".join(a) for a, _ in BAD_LINES])
def test_bad_command_lines_get_one_clear_error(args, message):
    res = CliRunner().invoke(bench.cli if args[0] in bench.cli.commands else train_gpt.cli, args)
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 4, res.output   # click's usage line, a hint, the error


def test_bad_files_get_one_clear_error_and_leave_no_output_behind(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 4097)
    not_trace = tmp_path / "x.npz"
    np.savez(not_trace, something=np.zeros(3))
    not_record = tmp_path / "r.json"
    not_record.write_text(json.dumps({"config": {}}))
    for cli, args, message in [
            (train_gpt.cli, ["train", *TINY, "--data", str(odd), "--json", str(tmp_path / "o.json")], "odd number of bytes"),
            (bench.cli, ["simulate", "--trace", str(not_trace), "--topology", "2x2",
                             "--json", str(tmp_path / "s.json")], "not a routing trace"),
            # a record given for a trace: no numpy advice to unpickle it
            (bench.cli, ["simulate", "--trace", str(not_record), "--topology", "2x2"],
             "r.json is not a routing trace .npz (train --trace writes one)"),
            (bench.cli, ["layouts", "--trace", str(not_record), "--topology", "2x2"],
             "r.json is not a routing trace .npz (train --trace writes one)"),
            (bench.cli, ["summary", str(not_record)], "is not a record summary reads"),
            (bench.cli, ["plot", str(not_record)],
             "nothing to plot" if importlib.util.find_spec("matplotlib") else "needs matplotlib")]:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
        assert "pickle" not in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.bin", "r.json", "x.npz"]



def test_a_data_file_is_checked_before_any_rank_starts(tmp_path, monkeypatch):
    """--data is read once as the job starts, before any rank: a nanoGPT-style uint16 .bin
    holding a token id past the vocabulary (a rank would meet it as an IndexError inside the
    embedding), 32-bit ids, a .npy array, a file too short to train on: each refused in one line
    that names what is wrong. A good .bin passes."""
    monkeypatch.setattr(train_gpt, "spawn_ranks", lambda *a: pytest.fail("the ranks started"))
    ids = np.random.default_rng(0).integers(0, 50257, 20000).astype(np.uint16)
    files = {"good.bin": ids, "past.bin": np.where(np.arange(len(ids)) == 12345, 60000, ids).astype(np.uint16),
             "wide.bin": ids.astype(np.int32), "short.bin": ids[:40]}
    for name, a in files.items():
        a.tofile(tmp_path / name)
    np.save(tmp_path / "array.npy", ids)
    os.rename(tmp_path / "array.npy", tmp_path / "array.bin")
    assert train_gpt.Corpus.file_problem(str(tmp_path / "good.bin")) is None
    for name, message in [("past.bin", "holds token id 60,000 (token 12,345 of 20,000), outside the vocabulary of "
                                       "50,304 ids"),
                          ("wide.bin", "looks like 32- or 64-bit token ids"), ("array.bin", "is a .npy array"),
                          ("short.bin", "no train document is longer than seq_len+1=65 tokens")]:
        res = CliRunner().invoke(train_gpt.cli, ["train", "--preset", "tiny", "--nproc", "2", "--cpu",
                                                 "--data", str(tmp_path / name)])
        assert res.exit_code == 1 and message in res.output, (name, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, (name, res.output)

def test_every_output_path_is_checked_before_any_work_and_its_folder_is_made(tmp_path):
    """A path that cannot be written (a folder given for a file, a file for a folder, a file in
    the way of the folder, a place nobody may write) is refused in one line when the command
    line is read, by every command that writes; nothing is left behind. A missing folder is made."""
    afile, trace, record = tmp_path / "afile", tmp_path / "t.npz", tmp_path / "run.json"
    for f in (afile, trace, record):
        f.write_text("x")
    (tmp_path / "run.png").mkdir()   # plot's output for run.json
    job = [*TINY, "--virtual-world", "4"]
    cases = [
        (train_gpt.cli, ["train", *job, "--json", "."], "is a folder"),
        (train_gpt.cli, ["compare", *job, "--json", str(afile / "x.json")], "is a file"),
        (train_gpt.cli, ["train", *job, "--ckpt", str(afile)], "is a file"),
        (train_gpt.cli, ["train", *job, "--trace", str(afile / "d" / "t.npz")], "is a file"),
        # /proc exists but takes no new files (ENOENT): the message must not read as a missing folder
        (train_gpt.cli, ["train", *job, "--json", "/proc/1/x.json"], "cannot create a file in /proc/1: "),
        (train_gpt.cli, ["train", *job, "--trace", "/proc/x.npz"], "filesystem takes no new files"),
        (train_gpt.cli, ["train", *job, "--ckpt", "/proc/ck"], "cannot create a file in /proc: "),
        (train_gpt.cli, ["train", *job, "--json", "/proc/new/x.json"], "cannot make a folder in /proc: "),
        (bench.cli, ["solver", "--json", "/proc/x.json"], "cannot create a file in /proc: "),
        (bench.cli, ["solver", "--json", str(tmp_path)], "is a folder"),
        (bench.cli, ["kernels", "--json", str(afile / "k.json")], "is a file"),
        (bench.cli, ["layer", "--virtual-world", "4", "--json", "."], "is a folder"),
        (bench.cli, ["a2a", "--nproc", "2", "--json", str(afile / "a.json")], "is a file"),
        (bench.cli, ["layouts", "--trace", str(trace), "--topology", "2x2", "--json", "."], "is a folder"),
        (bench.cli, ["simulate", "--trace", str(trace), "--topology", "2x2", "--json", str(afile / "s.json")],
         "is a file"),
        (bench.cli, ["plot", str(record)], "run.png is a folder"),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for cli, args, message in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)
        assert res.output.strip().splitlines()[-1].startswith("Error: Invalid value"), (args, res.output)
        assert "loss" not in res.output and "ms" not in res.output, (args, res.output)   # no work started
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and not list(tmp_path.glob("*.part"))
    out = tmp_path / "new"
    _run(["train", *job, "--steps", "2", "--trace", str(out / "traces" / "t.npz"), "--ckpt", str(out / "ck" / "ck")],
         out / "records", "run")   # _run's --json: new/records/run.json, its folder made too
    assert (out / "traces" / "t.npz").is_file() and (out / "ck" / "ck" / "netmoe" / "latest").is_file()


def _help_lines(cli, args):
    """What --help says of each option of command args[0], one line each: "--opt METAVAR help"."""
    cmd = cli.commands[args[0]]
    ctx = click.Context(cmd, info_name=args[0])
    return {p.opts[0]: " ".join(p.get_help_record(ctx)) for p in cmd.params
            if isinstance(p, click.Option) and not p.hidden}


def test_help_says_what_every_command_and_option_does_and_its_default():
    """The command list gives each command's whole one-line help; every option has help and
    shows its default; the same thing reads the same in every command."""
    for cli in (train_gpt.cli, bench.cli):
        listing = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
        for name, cmd in cli.commands.items():
            short = cmd.get_short_help_str()
            assert f"{name} {short}" in listing and not short.endswith("...") and short.endswith("."), (name, short)
            ctx = click.Context(cmd, info_name=name)
            for p in cmd.params:
                if not isinstance(p, click.Option) or p.hidden:
                    continue
                assert p.help, (name, p.opts)
                plain_flag = p.is_flag and not p.secondary_opts   # off unless given
                if p.default is not None and not plain_flag and not p.required:
                    assert "default:" in p.get_help_record(ctx)[1], (name, p.opts)
    train, simulate = _help_lines(train_gpt.cli, ["train"]), _help_lines(bench.cli, ["simulate"])
    for opt in ("--batch", "--seq-len", "--n-layer", "--top-k", "--experts-per-device"):
        assert "[default: (the preset's)" in train[opt], train[opt]
    assert "1xJ; under torchrun, its nodes x local ranks" in train["--topology"]
    for lines in (train, simulate, _help_lines(bench.cli, ["layer"]), _help_lines(bench.cli, ["a2a"])):
        assert lines["--topology"].split()[1] == "NxG"
    for lines in (train, simulate):
        assert "[default: 400e9" in lines["--intra-bw"] and "[default: 100e9" in lines["--inter-bw"]
    assert train["--trace"].split()[1] == simulate["--trace"].split()[1] == "FILE"
    for name in ("layer", "a2a"):   # untimed benchmark repeats are not train's learning-rate warm-up
        opts = _help_lines(bench.cli, [name])
        assert "--warmup-repeats" in opts and not [o for o in opts if o in ("--warmup", "--warmup-steps")]


def test_plot_names_the_install_the_readme_gives_and_the_test_extra_brings_matplotlib(tmp_path, monkeypatch):
    record = tmp_path / "r.json"
    record.write_text("{}")
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    res = CliRunner().invoke(bench.cli, ["plot", str(record)])
    assert res.exit_code == 1 and 'pip install -e ".[plot]"' in res.output, res.output
    readme = open(os.path.join(os.path.dirname(os.path.abspath(bench.__file__)), "README.md")).read()
    assert 'pip install -e ".[plot]"' in readme
    setup = open(os.path.join(os.path.dirname(os.path.abspath(bench.__file__)), "setup.py")).read()
    extras = ast.literal_eval(setup.split("extras_require=")[1].split("\n")[0].rstrip(","))   # CI installs .[test]
    assert "matplotlib" in extras["test"]


# -- benches, replays and reports


def test_trace_and_simulate_round_trip(tmp_path):
    trace = str(tmp_path / "t.npz")
    _run(["train", *TINY, "--virtual-world", "8", "--topology", "2x4", "--trace", trace, "--trace-every", "3"],
         tmp_path, "tr")
    t = np.load(trace)
    assert t["route"].shape == (2, 2, 32, 32, 2) and t["route_next_pred"].shape == t["route"].shape
    assert (t["route_next_pred"][:, -1] == -1).all() and (t["route_next_pred"][:, 0] >= 0).all()
    res = CliRunner().invoke(bench.cli, ["simulate", "--trace", trace, "--topology", "2x4", "--json",
                                             str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    whole = json.loads((tmp_path / "s.json").read_text())
    sim = whole["results"]
    # Eq. 1 prices the rows as the trace's run sent them: float32 rows of H = 64, the gate weight, an
    # int32 sample and position and an expert and choice (a float32 column too)
    assert whole["dtype"] == "float32" and whole["wire_bytes_per_row"] == {"scatter": 4 * 64 + 12, "gather": 4 * 64 + 4}
    assert whole["bytes_per_token"] == 4 * 64 + 12
    assert sim["netmoe + oracle next"]["inter"] <= sim["static"]["inter"]
    assert sim["static"]["moved_device"] == 0
    topo = netmoe.Topology(2, 4)   # static EP: scatter and gather both cross what traffic() says
    direct = [sum(2 * netmoe.traffic(netmoe.count_tokens(t["route"][s, l], 16), netmoe.static_placement(32, 8),
                                     topo)["inter"] for l in range(2)) for s in range(2)]
    assert sim["static"]["inter"] == np.mean(direct)
    assert [g["steps"] for g in sim["by_stage"]] == [[0, 0], [3, 3]]
    assert [g["static"]["inter"] for g in sim["by_stage"]] == direct
    res = CliRunner().invoke(bench.cli, ["simulate", "--trace", trace, "--topology", "2x4", "--layout",
                                             "--json", str(tmp_path / "l.json")])
    assert res.exit_code == 0, res.output
    sim = json.loads((tmp_path / "l.json").read_text())["results"]
    assert sim["static + layout"]["moved_device"] == 0 and "netmoe + lookahead + layout" in sim


@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_simulate_replays_exactly_what_the_live_layers_counted(tmp_path, exchange):
    """The same routing replayed (simulate) and trained (the layers' own counters), step by step:
    the same placements, so the same rows on every tier, for either exchange."""
    trace = str(tmp_path / "t.npz")
    live = _run(["train", *TINY, "--virtual-world", "8", "--topology", "2x4", "--exchange", exchange,
                 "--trace", trace, "--trace-every", "3"], tmp_path, "live")["runs"]["netmoe"]["volume"]
    out = tmp_path / "s.json"
    res = CliRunner().invoke(bench.cli, ["simulate", "--trace", trace, "--topology", "2x4", "--exchange", exchange,
                                             "--json", str(out)])
    assert res.exit_code == 0, res.output
    stages = json.loads(out.read_text())["results"]["by_stage"]
    assert [g["steps"] for g in stages] == [[0, 0], [3, 3]]
    for g in stages:
        step, sim = g["steps"][0], g["netmoe + lookahead"]
        assert sim["scatter_inter"] == live["scatter"]["inter"][step]
        assert sim["gather_inter"] == live["gather"]["inter"][step]
        assert sim["intra"] == live["scatter"]["intra"][step] + live["gather"]["intra"][step]

def test_plot_draws_the_solver_table_and_the_volumes_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    solver = tmp_path / "solver.json"
    solver.write_text(json.dumps([dict(topology="2x8", I=32, capacitated_ms=0.1, km_ms=0.2, paper_km_ms=0.08),
                                  dict(topology="2x8", I=64, capacitated_ms=0.1, km_ms=0.4, paper_km_ms=0.48)]))
    _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2"], tmp_path, "run")
    res = CliRunner().invoke(bench.cli, ["plot", str(solver), str(tmp_path / "run.json"), "--smooth", "2"])
    assert res.exit_code == 0, res.output
    for name in ("solver.png", "run.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text("{}")
    res = CliRunner().invoke(bench.cli, ["plot", str(tmp_path / "other.json")])
    assert res.exit_code != 0 and "nothing to plot" in res.output


def test_summary_reads_every_record_that_train_compare_and_the_benches_write(compare_4proc, tmp_path):
    """One table per kind of record: compare side by side, a single placement with its own
    numbers and no static-vs-NetMoE columns, and each benchmark's record; anything else is
    refused in one line naming what summary reads."""
    out, trace = lambda name: str(tmp_path / name), str(tmp_path / "t.npz")
    (tmp_path / "cmp.json").write_text(json.dumps(compare_4proc))
    one = _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2", "--trace", trace], tmp_path, "one")
    (tmp_path / "kernels.json").write_text(json.dumps([dict(kernel="count_tokens", shape="paper", n=8, torch_ms=0.137,
                                                            cuda_ms=0.0073, speedup=18.8)]))   # needs CUDA to make
    for args in (["solver", "--repeats", "1", "--max-expanded", "64", "--json", out("solver.json")],
                 ["layer", "--virtual-world", "4", "--topology", "2x2", "--hidden", "16", "--seq-len", "8", "--batch",
                  "2", "--warmup-repeats", "1", "--repeats", "2", "--json", out("layer.json")],
                 ["layouts", "--trace", trace, "--topology", "2x2", "--json", out("layouts.json")],
                 ["simulate", "--trace", trace, "--topology", "2x2", "--json", out("sim.json")]):
        res = CliRunner().invoke(bench.cli, args)
        assert res.exit_code == 0, res.output
    files = [out(f) for f in ("cmp.json", "one.json", "kernels.json", "solver.json", "layer.json", "layouts.json",
                              "sim.json")]
    res = CliRunner().invoke(bench.cli, ["summary", *files])
    assert res.exit_code == 0, res.output
    sections = {part.splitlines()[0].split(":")[0]: part for part in res.stdout.strip().split("\n\n")}
    assert set(sections) == {f"train_gpt.py {k}" for k in ("compare", "train")} | {
        f"bench.py {k}" for k in ("kernels", "solver", "layer", "layouts", "simulate")}, res.output
    assert "speedup" in sections["train_gpt.py compare"] and "cmp.json" in sections["train_gpt.py compare"]
    single = sections["train_gpt.py train"]
    assert "speedup" not in single and "static" not in single and "one.json" in single
    own = train_gpt.summarize(one["runs"]["netmoe"], 1)
    row = single.splitlines()[-1].split()
    assert row[:4] == ["one.json", "H=64", "L=2", "2x2"] and row[4] == "netmoe" and row[5] == str(own["measured"])
    assert row[6] == train_gpt.cell(own["iter_ms"]) and row[-2] == f"{own['final_loss']:.4f}"
    solver = json.loads((tmp_path / "solver.json").read_text())["rows"]
    assert len(sections["bench.py solver"].splitlines()) == 3 + len(solver)
    assert "18.8" in sections["bench.py kernels"] and "netmoe + lookahead" in sections["bench.py simulate"]
    assert "kept" in sections["bench.py layer"].split("experts only")[0]
    assert "node: + layout from the same batch" in sections["bench.py layouts"]
    (tmp_path / "other.json").write_text(json.dumps({"config": {}, "results": []}))
    for bad in ("other.json", "t.npz"):
        res = CliRunner().invoke(bench.cli, ["summary", out("cmp.json"), out(bad)])
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert f"{bad} is not a record summary reads" in res.output and "train / compare --json" in res.output
        assert "bench.py solver, kernels, layer, a2a, layouts and simulate" in res.output



def test_summary_and_plot_read_every_record_the_repository_ships(tmp_path):
    """`bench.py summary results/*.json` and `bench.py plot results/*.json`, as the README runs
    them: every shipped record is read (each file named in a table, or drawn or skipped by plot)."""
    results = os.path.join(os.path.dirname(os.path.abspath(bench.__file__)), "results")
    files = sorted(os.path.join(results, f) for f in os.listdir(results) if f.endswith(".json"))
    res = CliRunner().invoke(bench.cli, ["summary", *files])
    assert res.exit_code == 0, res.output
    assert not [f for f in files if os.path.basename(f) not in res.stdout], res.stdout
    if importlib.util.find_spec("matplotlib"):   # beside copies: plot writes a PNG beside each JSON
        copies = [shutil.copy(f, tmp_path) for f in files]
        res = CliRunner().invoke(bench.cli, ["plot", *copies])
        assert res.exit_code == 0, res.output
        skipped = res.output.split("skipped (")[1] if "skipped (" in res.output else ""
        for f in copies:
            drawn = os.path.exists(os.path.splitext(f)[0] + ".png")
            assert drawn != (os.path.basename(f) in skipped), (f, res.output)

def test_long_benchmarks_say_how_far_they_got_on_stderr_from_rank_0_only(tmp_path):
    """layer, solver, layouts and simulate report progress on stderr (the table stays alone on
    stdout): a first line at once and a last one at the end; with spawned ranks, rank 0 alone."""
    layer = ["layer", "--hidden", "16", "--seq-len", "8", "--batch", "2", "--warmup-repeats", "1", "--repeats", "2"]
    res = CliRunner().invoke(bench.cli, [*layer, "--virtual-world", "4", "--topology", "2x2"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == "timing round (1 untimed, then 2) 1/3", res.stderr
    assert res.stderr.splitlines()[-1] == "timing round (1 untimed, then 2) 3/3 done", res.stderr
    assert "timing round" not in res.stdout and "fwd+bwd ms" in res.stdout
    ranks = subprocess.run([sys.executable, "bench.py", *layer, "--nproc", "2", "--topology", "2x1", "--cpu"],
                           capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.abspath(bench.__file__)))
    assert ranks.returncode == 0, ranks.stderr
    assert ranks.stderr.count("timing round (1 untimed, then 2) 1/3\n") == 1, ranks.stderr
    assert ranks.stderr.count("3/3 done") == 1, ranks.stderr
    trace = str(tmp_path / "t.npz")
    _run(["train", *TINY, "--virtual-world", "4", "--topology", "2x2", "--trace", trace], tmp_path, "run")
    for args, label, n in ((["solver", "--repeats", "1", "--max-expanded", "0"], "solving case", 7),
                           (["layouts", "--trace", trace, "--topology", "2x2"], "scoring step", 5),
                           (["simulate", "--trace", trace, "--topology", "2x2"], "replaying step", 6)):
        res = CliRunner().invoke(bench.cli, args)
        assert res.exit_code == 0, res.output
        lines = res.stderr.splitlines()
        assert lines[0] == f"{label} 1/{n}" and lines[-1] == f"{label} {n}/{n} done", res.stderr



@pytest.mark.parametrize("where, J", [(["--virtual-world", "32", "--topology", "4x8"], 32),
                                      (["--nproc", "4", "--topology", "2x2", "--exchange", "node"], 4)],
                         ids=["32 virtual devices", "4 processes"])
def test_a_layer_bench_of_a_gpus_shapes_on_the_cpu_says_so_first_with_how_long_it_takes(monkeypatch, where, J):
    """The README's GPU layer lines run on a CPU say so in their first line, before any work,
    with the time FLOPs give: the experts' products of 5 variants (static, netmoe, kept, static
    in one chunk, the experts alone) in 35 rounds, over the rate this CPU was just measured at,
    times the rest of the layer. Tiny shapes say nothing (the progress test's first line)."""
    monkeypatch.setattr(train_gpt, "run_ranks", lambda *a: None)   # the estimate alone: the run would take hours
    res = CliRunner().invoke(bench.cli, ["layer", *where, "--cpu"])
    assert res.exit_code == 0, res.output
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"note: {4 * J} samples of S=1024 at H=768 on the CPU: about "), first
    amount, unit = first.split("about ")[1].split(" (")[0].split()
    rate = float(first.split(" (")[1].split(" GFLOP/s")[0]) * 1e9
    flops = 35 * 5 * 6 * (4 * J * 1024 * 2) * 2 * 768 * 4 * 768
    seconds = float(amount) * {"min": 60, "h": 3600}[unit]
    assert seconds == pytest.approx(flops / rate * bench.CPU_LAYER_OVERHEAD, rel=0.05, abs=60)

def test_bench_a2a_checks_every_exchange_and_fits_both_tiers(tmp_path):
    """Eq. 1's check on 4 gloo processes as 2 nodes x 2: every timed exchange must deliver each row
    from the rank its split sizes name (the worker raises otherwise), both tiers get a fit, and
    every case is priced by the fitted model."""
    out = tmp_path / "a2a.json"
    res = CliRunner().invoke(bench.cli, ["a2a", "--nproc", "4", "--topology", "2x2", "--hidden", "8",
                                             "--tokens", "64", "--batch", "2", "--sizes", "8,32", "--cases", "4",
                                             "--warmup-repeats", "1", "--repeats", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert set(r["fit"]) == {"intra", "inter"} and all(f["bw"] > 0 for f in r["fit"].values())
    if importlib.util.find_spec("matplotlib"):
        assert CliRunner().invoke(bench.cli, ["plot", str(out)]).exit_code == 0
        assert (tmp_path / "a2a.png").read_bytes()[:4] == b"\x89PNG"
    assert [c["kind"] for c in r["cases"]] == ["skewed", "netmoe gather"] * 2
    res = CliRunner().invoke(bench.cli, ["summary", str(out)])   # summary reads it too
    assert res.exit_code == 0 and res.output.startswith("bench.py a2a") and "a2a.json" in res.output, res.output
    for c in r["cases"]:
        assert c["measured_ms"] > 0 and c["model_ms"] > 0 and c["intra_bytes"] + c["inter_bytes"] <= 4 * 64 * 32
    res = CliRunner().invoke(bench.cli, ["a2a", "--nproc", "4", "--topology", "2x4"])
    assert res.exit_code != 0 and "does not have 4 devices" in res.output


def test_bench_solver_at_scale_gives_the_solve_and_the_metadata_of_each_topology(tmp_path):
    """solver --topology (repeatable): a row per topology, the solve from stage-sized counts and
    from [I, E] (the same placement, or it fails), and the metadata a rank receives per layer
    call: today's [I, E] int64 twice (node exchange: and [I, N]) against the stage-sized design."""
    out = str(tmp_path / "scale.json")
    res = CliRunner().invoke(bench.cli, ["solver", "--topology", "2x2", "--topology", "4x2", "--samples", "3",
                                         "--experts", "4", "--top-k", "2", "--json", out], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "gathered now" in res.stdout and "scaling case 2/2 done" in res.stderr
    record = json.loads(open(out).read())
    assert record["kind"] == "solver_scale" and len(record["rows"]) == 2
    assert "2x2" in CliRunner().invoke(bench.cli, ["summary", out]).stdout
    for r, (N, G) in zip(record["rows"], [(2, 2), (4, 2)]):
        I, E, J = 3 * N * G, 4 * N * G, N * G
        assert (r["topology"], r["I"], r["E"], r["K"]) == (f"{N}x{G}", I, E, 2) and r["solve_ms"] > 0
        assert r["today_expert"] == 2 * I * E * 8 and r["today_node"] == 2 * I * (E + N) * 8
        assert r["staged"] == netmoe.metadata_bytes(I, E, netmoe.Topology(N, G), "expert", 1, True)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_bench_command_runs_end_to_end_on_tiny_shapes(tmp_path, device, monkeypatch):
    """Each bench.py subcommand as a user runs it, on tiny shapes, on the CPU and on a GPU where
    there is one: a README command cannot break unnoticed. Each result is checked for what it
    must say, not only for having been written. The CPU case is a machine without CUDA, also
    where there is a GPU: its GPU-only command must refuse."""
    cpu = ["--cpu"] if device == "cpu" else []
    if device == "cpu":   # as this process sees it, and the ranks it spawns (told by rank_devices)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    bench_cli = lambda *args: CliRunner().invoke(bench.cli, [str(a) for a in args], catch_exceptions=False)
    out = lambda name: str(tmp_path / name)

    res = bench_cli("solver", "--repeats", 1, "--max-expanded", 128, *cpu, "--json", out("solver.json"))
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "solver.json").read_text())
    assert record["kind"] == "solver"
    solver = record["rows"]
    assert {r["I"] for r in solver} >= {32, 384, 1024, 8192} and all(r["same_optimum"] == "yes" for r in solver)
    assert all((r.get("compute_ms") or 0) > 0 for r in solver if r["topology"] == "2x8") == (device == "cuda")

    res = bench_cli("kernels", "--repeats", 2, "--json", out("kernels.json"))
    if device == "cpu":
        assert res.exit_code != 0 and "needs a CUDA device" in res.output
    else:
        assert res.exit_code == 0, res.output
        assert all(r["cuda_ms"] > 0 for r in json.loads((tmp_path / "kernels.json").read_text())["rows"])

    tiny = ["--hidden", 16, "--seq-len", 8, "--batch", 2, "--warmup-repeats", 1, "--repeats", 2]
    for where in (["--virtual-world", 4, "--topology", "2x2"], ["--nproc", 2, "--topology", "2x1", *cpu]):
        for exchange in netmoe.EXCHANGES:
            res = bench_cli("layer", *where, *tiny, "--exchange", exchange, "--json", out("layer.json"))
            assert res.exit_code == 0, res.output
            layer = json.loads((tmp_path / "layer.json").read_text())
            assert layer["kind"] == "layer"
            med = layer["median"]
            assert med["static"]["moved_device"] == med["kept"]["moved_device"] == 0
            assert all(m["ms"] > 0 for m in med.values())

    trace = out("t.npz")
    train = ["--preset", "tiny", "--steps", 4, "--seq-len", 16, "--eval-batches", 0, "--log-every", 100,
             "--virtual-world", 4, "--topology", "2x2", "--trace", trace, *cpu]
    res = CliRunner().invoke(train_gpt.cli, ["compare", *map(str, train), "--json", out("run.json")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = bench_cli("layouts", "--trace", trace, "--topology", "2x2", "--json", out("layouts.json"))
    assert res.exit_code == 0, res.output
    lay = json.loads((tmp_path / "layouts.json").read_text())["results"]
    assert {f"{ex}: static" for ex in netmoe.EXCHANGES} <= set(lay)
    res = bench_cli("simulate", "--trace", trace, "--topology", "2x2", "--layout", "--json", out("sim.json"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "sim.json").read_text())["results"]["static + layout"]["moved_device"] == 0
    res = bench_cli("summary", out("run.json"))
    assert res.exit_code == 0 and "run.json" in res.output, res.output
    if importlib.util.find_spec("matplotlib"):
        res = bench_cli("plot", out("solver.json"), out("run.json"), out("sim.json"))
        assert res.exit_code == 0, res.output
        assert all((tmp_path / f"{n}.png").exists() for n in ("solver", "run", "sim"))


# ---- what a new user meets: the README as written, the GPU box, messages that are true


def test_tables_show_only_what_was_measured_and_say_each_thing_once(tmp_path, capsys):
    """On the CPU: no row or column of dashes (MFU against a GPU's peak, the experts' time on a
    GPU, a measured All-to-All in one process), the modelled All-to-All named as Eq. 1 at the
    modelled links' bandwidths, "1 step" in the singular, each progress line once, and
    simulate --layout saying why it replays one step fewer than the trace holds."""
    trace = str(tmp_path / "t.npz")
    res = CliRunner().invoke(train_gpt.cli, ["compare", *TINY, "--virtual-world", "4", "--topology", "2x2", "--steps",
                                             "2", "--trace", trace], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    table = res.stdout[res.stdout.index("lookahead; means over"):].splitlines()
    assert table[0].startswith("lookahead; means over 1 step after 1"), table[0]
    rows = [line.split("  ") for line in table[3:] if not line.startswith("loss change")]
    assert rows and not [r for r in rows if all(c.strip() in ("", "-") for c in r[1:])], table
    assert "MFU" not in res.stdout and "All-to-All ms, Eq. 1 at 400 GB/s in a node, 100 between" in res.stdout
    assert "All-to-All ms (measured)" not in res.stdout   # one process: nothing travels
    # and how to read the loss change: against the spread between seeds, since only rounding differs
    assert table[-1].startswith("loss change: ") and "--seed" in table[-1], table
    res = CliRunner().invoke(bench.cli, ["solver", "--repeats", "1", "--max-expanded", "0", "--cpu"])
    assert res.exit_code == 0 and "GPU" not in res.stdout and "scatter ms (Eq.1)" in res.stdout, res.output
    res = CliRunner().invoke(bench.cli, ["simulate", "--trace", trace, "--topology", "2x2", "--layout"])
    assert res.exit_code == 0 and "2 steps (1 replayed: the first has no earlier step to learn a layout from)" \
        in res.stdout, res.output
    capsys.readouterr()
    assert list(bench.progress(range(3), "item", every_s=0)) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == ["item 1/3", "item 2/3", "item 3/3 done"]



def test_a_runs_means_are_of_the_steps_it_logged_and_its_rates_agree_with_them(compare_4proc):
    """The table's iteration ms is the mean of the logged (recorded) steps after the skipped
    ones, beside their median; tokens / s and TFLOP/s are those steps' work over their time, so
    rate x mean time is one step's work. (A mean of per-step rates weighs fast steps more: on a
    shared CPU, where a few steps take 10x the others, it disagreed with the mean time 2x.)"""
    c = compare_4proc["config"]
    for run in compare_4proc["runs"].values():
        skip = 1
        s = train_gpt.summarize(run, skip)
        logged = run["iter_ms"][skip:]
        assert s["iter_ms"] == pytest.approx(np.mean(logged)) and s["iter_ms_median"] == pytest.approx(np.median(logged))
        assert s["tokens_per_s"] * s["iter_ms"] / 1e3 == pytest.approx(c["batch"] * c["J"] * c["seq_len"])
        assert s["tflops"] * s["iter_ms"] * 1e9 == pytest.approx(run["flops_per_step"])
    slow = dict(compare_4proc["runs"]["static"], iter_ms=[1000.0, 100.0, 100.0, 100.0, 1000.0, 100.0],
                tokens_per_s=[1e3, 1e4, 1e4, 1e4, 1e3, 1e4], tflops=[1.0] * 6)
    s = train_gpt.summarize(slow, 1)   # one slow step in five
    assert (s["iter_ms"], s["iter_ms_median"], s["tokens_per_s"]) == pytest.approx((280, 100, 1000 / 0.28))
    table = train_gpt.summary_table(compare_4proc, 1)
    assert f"iteration ms, median " in table and train_gpt.cell(
        train_gpt.summarize(compare_4proc["runs"]["static"], 1)["iter_ms"]) in table.split("iteration ms")[1]


def test_a_runs_header_names_every_option_that_changes_the_model_or_the_exchange():
    """The first line of a run and of its table: the model (F, shared experts, group-limited
    routing included), the exchange with its chunks, the stream's dtype, the lookahead and the
    re-layouts; the modelled links are named with their bandwidths; figures keep 3 significant
    digits (whole numbers from 100), losses 4 decimals."""
    c = dict(dataclasses.asdict(train_gpt.PRESETS["tiny"]), expert_hidden=32, shared_experts=1, route_groups=2,
             group_top=1, J=4, topology="2x2", world=4, exchange="node", chunks=3, dtype="bfloat16", lookahead=False,
             relayout_every=20, intra_bw=200e9, inter_bw=25e9)
    assert train_gpt.describe(c, "tiny") == ("tiny: 2 layers, H=64, S=64, I=16, E=8, K=2, F=32, 1 shared expert, "
                                            "a token's K from 1 of 2 groups; J=4 on 2x2; node exchange in 3 chunks, "
                                            "bfloat16 stream, no lookahead, re-layout every 20 steps")
    assert train_gpt.links(c) == "200 GB/s in a node, 25 between"
    assert [train_gpt.cell(v) for v in (0.009607, 0.02148, 12.345, 3505.3, 2.0, 4100, None, float("nan"))] == \
        ["0.00961", "0.0215", "12.3", "3,505", "2", "4,100", "-", "-"]

def test_a_small_data_file_trains_without_validation_and_is_refused_with_it_naming_the_fix(tmp_path):
    """A 200-byte text holds no validation sample (its last 10% is shorter than seq_len + 1): with
    --eval-batches 0 none is needed and it trains; with validation the refusal names the ways out."""
    small = tmp_path / "small.txt"
    small.write_bytes(bytes(range(32, 232)))
    job = ["train", "--preset", "tiny", "--steps", "2", "--virtual-world", "2", "--cpu", "--data", str(small)]
    r = _run([*job, "--eval-batches", "0"], tmp_path, "small")["runs"]["netmoe"]
    assert len(r["loss"]) == 2 and r["val_loss"] is None
    res = CliRunner().invoke(train_gpt.cli, [*job, "--eval-batches", "1"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "no val document is longer than seq_len+1=65 tokens" in res.output, res.output
    assert all(fix in res.output for fix in ("--eval-batches 0", "longer file", "--seq-len")), res.output


def test_a_run_that_cannot_fit_in_memory_is_refused_in_one_line_before_its_model_is_built(monkeypatch):
    """With 2 GB free (a small laptop), 6 layers of MoE-GPT-S playing 32 devices in one process
    (about 1.8e9 parameters, and 128 samples of 1024 tokens) are refused in one line naming what
    to lower; the main job's 4 tiny ranks fit with room to spare."""
    monkeypatch.setattr(train_gpt, "available_memory", lambda device: (2e9, "host memory"))
    res = CliRunner().invoke(train_gpt.cli, ["train", "--preset", "s", "--n-layer", "6", "--virtual-world", "32",
                                             "--topology", "4x8", "--cpu", "--steps", "1", "--eval-batches", "0"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "needs about" in res.output and "2.0 GB of host memory are free" in res.output, res.output
    for lever in ("--n-layer", "--experts-per-device", "--batch", "--seq-len", "a smaller --preset",
                  "a smaller --virtual-world"):
        assert lever in res.output, (lever, res.output)
    s6 = train_gpt.memory_estimate(dataclasses.replace(train_gpt.PRESETS["s"], n_layer=6), 32, True, "cpu")
    assert s6["weights"] > 16 * 1.8e9 and s6["total"] > 50e9   # weights, gradients and AdamW state alone: 29 GB
    # the K rows of width H a token has in flight count: the fine-grained 6-layer run (E 256, K 8,
    # F H/2, a shared expert, 64 virtual devices, one sample each) peaked at 34.5 GB on an H200
    fine = dataclasses.replace(train_gpt.PRESETS["s"], n_layer=6, experts_per_device=4, top_k=8, expert_hidden=384,
                               shared_experts=1, batch=1)
    assert 34.5e9 <= train_gpt.memory_estimate(fine, 64, True, "cuda")["total"] <= 1.25 * 34.5e9
    main = train_gpt.TrainConfig(preset="tiny", nproc=4, topology=netmoe.Topology(2, 2), cpu=True)
    assert train_gpt.memory_problem(main, main.model(), 4, False, torch.device("cpu"), 4) is None
    assert train_gpt.memory_estimate(main.model(), 4, False, "cpu")["total"] * 4 < 2e9


# The suite's own process (pytest alone, or one xdist worker of several) takes its share of the
# cores, as every rank it starts does: ranks x threads never exceed the cores, whatever -n says.
torch.set_num_threads(train_gpt.rank_threads(1))



def test_waiting_openmp_threads_sleep_unless_the_user_says_otherwise():
    """Every process that imports train_gpt.py (or bench.py) has torch's OpenMP threads sleep while
    they wait, set before torch loads OpenMP; spinning, a one-process CPU step took 5-20x longer
    with another job on the host. OMP_WAIT_POLICY given by the user stands."""
    for given, seen in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_WAIT_POLICY": given} if given else {})
        for module in ("train_gpt", "bench"):
            res = subprocess.run([sys.executable, "-c", f"import os, {module}, torch; print(os.environ['OMP_WAIT_POLICY'])"],
                                 capture_output=True, text=True, env=env, timeout=120,
                                 cwd=os.path.dirname(os.path.abspath(train_gpt.__file__)))
            assert res.returncode == 0 and res.stdout.strip() == seen, (module, given, res.stdout, res.stderr)

def test_ranks_split_the_cores_among_themselves_and_the_xdist_workers(monkeypatch):
    """Every rank (training, benchmark, test worker) sets its torch threads through start_rank:
    the cores this process may use, split among the ranks on the host and the pytest-xdist
    workers beside it, so ranks x threads x workers never exceed them; at least one thread."""
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        for workers in (None, "1", "4", "6", "12", "32"):
            if workers is None:
                monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
            else:
                monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
            for ranks in (1, 2, 4, 8):
                threads = train_gpt.rank_threads(ranks)
                assert threads >= 1 and (threads == 1 or ranks * threads * int(workers or 1) <= 16), (workers, ranks)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        assert train_gpt.rank_threads(4) == 2 and train_gpt.rank_threads(1) == 8
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        train_gpt.start_rank(0, 1, None, "cpu")   # one process of a host's 4: its share, 16 / 4 / 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _readme():
    return open(os.path.join(os.path.dirname(os.path.abspath(train_gpt.__file__)), "README.md")).read()


def test_the_readmes_test_commands_need_only_what_the_test_extra_installs():
    """Every pytest line of the README runs with what `pip install -e ".[test]"` brings: a line
    with -n needs pytest-xdist there, and a small worker count (each worker's ranks share the
    GPU, and "auto" would start one per core)."""
    setup = open(os.path.join(os.path.dirname(os.path.abspath(train_gpt.__file__)), "setup.py")).read()
    extras = ast.literal_eval(setup.split("extras_require=")[1].split("\n")[0].rstrip(","))
    lines = [line for line in _readme().splitlines() if "python -m pytest" in line]
    assert lines and any(" -n " in line for line in lines), lines   # the GPU line runs in parallel
    for line in lines:
        if " -n " in line:
            assert "pytest-xdist" in extras["test"], line
            workers = line.split(" -n ")[1].split()[0]
            assert workers.isdigit() and 1 < int(workers) <= 4, line


def _readme_snippet():
    """The README's Python snippet, verbatim: the first python block under its MoELayer heading."""
    text = _readme()
    section = text[text.index("### A MoELayer in your own model"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_python_snippet_runs_as_written_and_computes_what_static_ep_does(monkeypatch, capsys):
    """Pasted into python, the README's snippet runs in one process and returns every sample, in
    NetMoE's new order, with gradients reaching every weight; run again with every layer static
    (same seed, so the same weights and input), each sample's output is the same."""
    code = _readme_snippet()
    assert "virtual_world=" in code and "import netmoe" in code

    def run(**force):
        torch.manual_seed(0)
        made = netmoe.MoELayer
        with monkeypatch.context() as m:
            m.setattr(netmoe, "MoELayer", lambda *a, **kw: made(*a, **{**kw, **force}))
            names = {}
            exec(compile(code, "README.md", "exec"), names)
        return names

    ours, static = run(), run(placement="static")
    x, y, sid = ours["x"], ours["y"], ours["sid"]
    assert y.shape == x.shape and sorted(sid.tolist()) == list(range(x.shape[0]))
    assert str(y.shape) in capsys.readouterr().out   # what it prints
    assert all(p.grad is not None for layer in ours["layers"] for p in layer.parameters())
    assert torch.equal(static["sid"], torch.arange(x.shape[0]))   # static EP sends every sample home
    torch.testing.assert_close(y[torch.argsort(sid)], static["y"], rtol=1e-5, atol=1e-6)


def test_presets_train_on_gpt2s_scaled_init_and_a_warm_up_that_covers_adams_start():
    """Every preset's recipe: the projections that add into the residual stream (attention's
    output, every expert's w2) start at GPT-2's 0.02 / sqrt(2 L), every other matrix at 0.02; the
    learning rate rises linearly over 40 AdamW steps (2 / (1 - beta2)) to GPT-3's rate for the
    width, 6e-4 for MoE-GPT-S; a rate or warm-up given on the command line wins."""
    cfg = dataclasses.replace(train_gpt.PRESETS["s"], n_layer=3, hidden=96, n_head=4, seq_len=64)
    model = train_gpt.GPT(cfg, 2)
    model.init_weights(0)
    for name, p in model.named_parameters():
        if name.split(".")[-1] in ("w1", "w2") or name.endswith("weight") and p.dim() >= 2:   # matrices
            want = 0.02 / np.sqrt(2 * 3) if name.endswith((".proj.weight", ".w2")) else 0.02
            assert float(p.detach().std()) == pytest.approx(want, rel=0.1), name
    s = train_gpt.TrainConfig(preset="s", steps=360)
    assert (s.lr, s.warmup_steps) == (6e-4, 40)
    rates = [train_gpt.lr_at(step, s) for step in range(360)]
    assert rates[:40] == sorted(rates[:40]) and rates[39] == pytest.approx(6e-4) and max(rates) <= 6e-4
    assert rates[0] <= 6e-4 / 40 * 1.0001
    widths = [train_gpt.PRESETS[p].hidden for p in train_gpt.PRESETS]
    peaks = [train_gpt.TrainConfig(preset=p).lr for p in train_gpt.PRESETS]
    assert all(a >= b for (_, a), (_, b) in zip(sorted(zip(widths, peaks))[:-1], sorted(zip(widths, peaks))[1:]))
    mine = train_gpt.TrainConfig(preset="s", lr=1e-4, warmup_steps=0)
    assert (mine.lr, mine.warmup_steps) == (1e-4, 0)


# ---- kernels: kernels.cu against its torch references (CUDA only)
# Every kernel must return exactly what its reference in netmoe.py returns (int64, bit for bit;
# the permutations are the *stable* argsort), on fresh random inputs each run (the seed is in
# every failure message). Outputs land in allocator blocks poisoned just before the call, so an
# element a kernel forgets to write cannot pass as a lucky zero.

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernels.cu needs a CUDA device")


@pytest.fixture(scope="module")
def kernels():
    ops = netmoe.hot_path("cuda")
    assert ops is not netmoe.REFERENCE_OPS, (
        "CUDA is present but kernels.cu did not build (see the warning above; "
        "NETMOE_NO_KERNELS=1 also disables it)")
    return ops


def _fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device="cuda").manual_seed(seed), seed


def _poison(*shapes):
    """Fill, then free, blocks of exactly the output sizes: the caching allocator hands these same
    blocks to the op's outputs, which therefore start as garbage rather than zeros."""
    blocks = [torch.full(s, -0x5A5A5A5A5A5A5A5, dtype=torch.int64, device="cuda") for s in shapes]
    del blocks


def _route(gen, shape, E, kind, dtype=torch.int64):
    """Expert ids: 'uniform', 'sparse' (only a third of the experts used: the rest receive nothing),
    or 'one' (every token to one expert: the longest runs of equal keys)."""
    if kind == "one":
        return torch.full(shape, int(torch.randint(E, (1,), generator=gen, device="cuda")), dtype=dtype, device="cuda")
    hi = max(1, E // 3) if kind == "sparse" else E
    ids = torch.randint(hi, shape, generator=gen, device="cuda")
    if kind == "sparse":   # spread the used experts over the id range, not just the low ids
        ids = torch.randperm(E, generator=gen, device="cuda")[ids]
    return ids.to(dtype)


@cuda_only
@pytest.mark.parametrize("I,S,K,E", [
    (1, 1, 1, 1), (1, 7, 2, 4), (4, 1024, 2, 64), (3, 4097, 8, 256),   # 4097*8: several blocks per sample
    (16, 333, 8, 256), (2, 5, 1, 300), (2, 64, 2, 20000),              # E=20000: global-atomics path
    (0, 5, 2, 8), (3, 0, 2, 8)])
def test_count_tokens_kernel_equals_reference(kernels, I, S, K, E):
    gen, seed = _fresh_generator()
    for dtype in (torch.int64, torch.int32):
        for kind in ("uniform", "sparse", "one"):
            route = _route(gen, (I, S, K), E, kind, dtype) if I * S else torch.zeros((I, S, K), dtype=dtype, device="cuda")
            _poison((I, E))
            got = kernels.count_tokens(route, E)
            # (the reference cannot reshape an empty [0, S, K] route: I = 0 is checked directly)
            want = netmoe.count_tokens(route, E) if I else torch.zeros((0, E), dtype=torch.int64, device="cuda")
            assert got.dtype == torch.int64 and got.shape == (I, E)
            assert torch.equal(got, want), f"seed={seed} {dtype} {kind}"


@cuda_only
@pytest.mark.parametrize("I,S,K,E,N", [
    (1, 1, 1, 1, 1), (1, 7, 2, 4, 2), (4, 1024, 2, 64, 4), (3, 4097, 8, 256, 16),   # 4097: several blocks per sample
    (16, 333, 8, 256, 32), (2, 5, 1, 300, 3), (5, 100, 4, 64, 1),
    (2, 64, 2, 20000, 20000),                                                        # N=20000: global-atomics path
    (0, 5, 2, 8, 2), (3, 0, 2, 8, 2)])
def test_node_counts_kernel_equals_reference(kernels, I, S, K, E, N):
    gen, seed = _fresh_generator()
    for dtype in (torch.int64, torch.int32):
        for kind in ("uniform", "sparse", "one"):
            route = _route(gen, (I, S, K), E, kind, dtype) if I * S else torch.zeros((I, S, K), dtype=dtype, device="cuda")
            for layout in ("any", "balanced"):   # any node map; and E/N experts a node, as a layer's is
                expert_node = torch.randint(N, (E,), generator=gen, device="cuda") if layout == "any" or E % N else \
                    torch.randperm(E, generator=gen, device="cuda") // (E // N)
                _poison((I, N))
                got = kernels.node_counts(route, expert_node, N)
                want = netmoe.node_counts(route, expert_node, N)
                assert got.dtype == torch.int64 and got.shape == (I, N)
                assert torch.equal(got, want), f"seed={seed} {dtype} {kind} {layout}"


@cuda_only
@pytest.mark.parametrize("B,S,K,E", [
    (1, 1, 1, 1), (1, 1, 2, 4), (2, 3, 1, 8), (4, 1024, 2, 64), (3, 1000, 8, 256),
    (16, 4096, 8, 256), (5, 777, 2, 8192), (2, 300, 2, 9000),    # many keys: few warps per block
    (2, 300, 2, 25000),                                          # past the shared-memory budget: torch sorts
    (0, 16, 2, 8)])
def test_dispatch_order_is_the_stable_argsort(kernels, B, S, K, E):
    gen, seed = _fresh_generator()
    for dtype in (torch.int64, torch.int32):
        for kind in ("uniform", "sparse", "one"):
            route = _route(gen, (B, S, K), E, kind, dtype) if B else torch.zeros((0, S, K), dtype=dtype, device="cuda")
            slot = torch.randperm(E, generator=gen, device="cuda")
            if kind == "one":
                slot = slot.int()   # slot may be int32 too
            _poison((B * S * K,))
            got = kernels.dispatch_order(route, slot)
            want = netmoe.dispatch_order(route, slot)
            assert got.dtype == torch.int64
            assert torch.equal(got, want), f"seed={seed} {dtype} {kind}"


@cuda_only
@pytest.mark.parametrize("I,J,n", [
    (1, 1, 1), (4, 4, 0), (4, 2, 100), (128, 32, 65536), (512, 32, 524288), (37, 5, 1001),
    (3000, 8, 40000), (9000, 16, 30000),    # many samples: few warps per block
    (25000, 16, 20000)])                    # past the shared-memory budget: torch sorts
def test_gather_order_is_the_stable_argsort(kernels, I, J, n):
    gen, seed = _fresh_generator()
    for layout in ("random", "grouped"):
        dest = torch.randint(J, (I,), generator=gen, device="cuda")
        if J > 2:
            dest[dest == J - 1] = 0          # a device that receives nothing
        src = torch.randint(I, (n,), generator=gen, device="cuda")
        if layout == "grouped":              # the expert side's layout: long runs of one sample
            src = src.sort().values
        _poison((n,))
        got = kernels.gather_order(src, dest, I)
        want = netmoe.gather_order(src, dest, I)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), f"seed={seed} {layout}"
        assert torch.equal(kernels.gather_order(src.int(), dest, I), want), f"seed={seed} int32 src"


@cuda_only
def test_sorts_return_permutations_even_for_out_of_range_ids(kernels):
    # ids are not range-checked on the device (a check would cost a sync): a bad id must still
    # never be written out of bounds, and the result must stay a permutation
    route = torch.tensor([[[3, -1], [99, 0]]], device="cuda")
    order = kernels.dispatch_order(route, torch.arange(4, device="cuda"))
    assert torch.equal(order.sort().values, torch.arange(4, device="cuda"))
    order = kernels.gather_order(torch.tensor([5, 0, -2, 1], device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"), 2)
    assert torch.equal(order.sort().values, torch.arange(4, device="cuda"))
    assert kernels.count_tokens(route, 4).sum() == 2   # out-of-range ids count nowhere
    # ... nor do experts on out-of-range nodes: only token 1's expert 0 (node 0) counts
    assert kernels.node_counts(route, torch.tensor([0, 1, 5, -1], device="cuda"), 2).tolist() == [[1, 0]]


@cuda_only
def test_kernels_reject_inputs_they_cannot_handle(kernels):
    # In a child process: raising from the extension once crashed the interpreter (see the note
    # in kernels.cu); that must fail this test, not end the whole test session.
    import subprocess
    import sys
    code = """if True:
        import torch, netmoe
        k = netmoe.hot_path("cuda")
        z = lambda *s, dev="cuda": torch.zeros(*s, dtype=torch.long, device=dev)
        cases = [("CUDA", lambda: k.count_tokens(z(2, 3, 2, dev="cpu"), 4)),
                 ("[I, S, K]", lambda: k.count_tokens(z(2, 6), 4)),
                 ("int64 or int32", lambda: k.dispatch_order(z(2, 3, 2).float(), z(4))),
                 ("num_samples", lambda: k.gather_order(z(3), z(4), 5)),
                 ("expert_node", lambda: k.node_counts(z(2, 3, 2), z(4).int(), 2)),
                 ("[I, S, K]", lambda: k.node_counts(z(6, 2), z(4), 2))]
        for expected, call in cases:
            try:
                call()
            except RuntimeError as e:
                assert expected in str(e), (expected, str(e))
            else:
                raise AssertionError("no error; expected one mentioning " + expected)
        print("ok")
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.abspath(netmoe.__file__)))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), \
        f"exit code {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"


@cuda_only
@pytest.mark.parametrize("placement", ["netmoe", "static"])
@pytest.mark.parametrize("exchange", ["expert", "node"])
def test_virtual_moe_layer_same_outputs_and_gradients_with_and_without_kernels(kernels, monkeypatch, placement,
                                                                             exchange):
    gen, seed = _fresh_generator()
    torch.manual_seed(seed)
    layer = netmoe.MoELayer(32, 64, num_experts=8, top_k=2, placement=placement,
                            topology=netmoe.Topology(2, 2), virtual_world=4, exchange=exchange).cuda()
    x = torch.randn(8, 37, 32, device="cuda", generator=gen)
    w = torch.randn(8, 37, 32, device="cuda", generator=gen)
    sid = torch.arange(8, device="cuda")
    calls = []

    class Counted:   # the kernels, counting calls: the first run must really go through them
        def __getattr__(self, name):
            calls.append(name)
            return getattr(kernels, name)

    def run(ops):
        monkeypatch.setattr(netmoe, "hot_path", lambda device: ops)
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        y, new_sid, aux = layer(xg, sid)
        ((y * w[: y.shape[0]]).sum() + aux).backward()
        return [y, new_sid, aux, xg.grad] + [p.grad for p in layer.parameters()]

    fast = run(Counted())
    assert {"count_tokens", "dispatch_order"} | ({"node_counts"} if exchange == "node" else set()) <= set(calls)
    slow = run(netmoe.REFERENCE_OPS)
    assert torch.equal(fast[1], slow[1]), f"seed={seed}: different sample placement"
    for a, b in zip(fast, slow):   # index_add's float atomics may reorder sums: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")


def _poison_rows(*shapes_dtypes):
    """_poison for float outputs: blocks of exactly their bytes, filled with NaN, then freed, so an
    element a row kernel forgets to write reads back as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=d, device="cuda") for s, d in shapes_dtypes]
    del blocks


ROW_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _assert_rows_close(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    assert not got.isnan().any(), f"{what}: unwritten (NaN) elements"
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    assert err <= ROW_TOL[dtype], f"{what}: relative error {err:.2e}"


def _wide(t, gen):
    """t as a view of rows with 3 more columns: a row stride that is not the width (the exchanges
    read rows of x beside their int32 columns)."""
    extra = torch.randn(t.shape[0], 3, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
    return torch.cat([t, extra], 1)[:, :t.shape[1]]


@cuda_only
@pytest.mark.parametrize("R,Q,Kc,C,E,covered,seq", ROW_CASES + [
    (262144, 131072, 2, 768, 64, True, 1024),    # MoE-GPT-S in one process: two rows a token
    (65536, 8192, 8, 384, 256, True, 1024),      # fine-grained: eight rows a token
    (3000, 1000, 40, 24, 1, False, 1)])          # more than 32 rows an output (no bias there)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_combine_kernels_equal_their_references(kernels, R, Q, Kc, C, E, covered, seq, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    p = _row_problem(gen, R, Q, Kc, C, E, covered, dtype, "cuda", seq)
    if Kc > 32:
        p["bias"] = None
    ref = netmoe.REFERENCE_OPS
    for layout in ("packed", "strided"):
        if layout == "strided":
            p["rows"], p["base"] = _wide(p["rows"], gen), _wide(p["base"], gen)
        args = [p[k] for k in ("rows", "index", "weight", "bias", "ends", "base", "base_scale", "perm", "seq")]
        _poison_rows(((Q, C), dtype))
        _assert_rows_close(kernels.combine(*args), ref.combine(*args), dtype, f"seed={seed} {layout} combine")
        plain = [p["rows"], p["index"]] + [None] * 6 + [1]   # rows only: the permute's backward and the gathers'
        _assert_rows_close(kernels.combine(*plain), ref.combine(*plain), dtype, f"seed={seed} {layout} combine of rows")
        grad = torch.randn(Q, C, generator=gen, dtype=torch.float64).to("cuda", dtype)
        bwd = [grad] + args[:5] + args[6:] + [True, True, covered]
        _poison_rows(((R, C), dtype), ((Q, Kc), torch.float64 if dtype == torch.float64 else torch.float32), ((Q, C), dtype))
        for name, a, b in zip(("grad_rows", "grad_weight", "grad_base"), kernels.combine_backward(*bwd),
                              ref.combine_backward(*bwd)):
            _assert_rows_close(a, b.to(a.dtype), dtype if name != "grad_weight" else a.dtype,
                               f"seed={seed} {layout} {name}")


@cuda_only
@pytest.mark.parametrize("T,R,C", [(1, 1, 1), (7, 13, 5), (4096, 8192, 768), (1000, 0, 8), (333, 2664, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_permute_rows_kernel_copies_the_rows_exactly(kernels, T, R, C, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=gen, dtype=torch.float64).to("cuda", dtype)
    src = torch.randint(T, (R,), generator=gen).cuda()
    for rows in (x, _wide(x, gen)):
        _poison_rows(((R, C), dtype))
        assert torch.equal(kernels.permute_rows(rows, src), rows[src]), f"seed={seed}"


@cuda_only
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 700], [4], [0, 2, 0], [512] * 64, [100, 0, 3000, 64, 1]])
@pytest.mark.parametrize("C", [6, 384, 3072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_bias_gelu_and_segment_sum_kernels_equal_their_references(kernels, counts, C, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    R, E = sum(counts), len(counts)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to("cuda", dtype)
    pre, bias, grad = rnd(R, C), rnd(E, C), rnd(R, C)
    ends = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
    ref = netmoe.REFERENCE_OPS
    _poison_rows(((R, C), dtype))
    _assert_rows_close(kernels.bias_gelu(pre, bias, ends), ref.bias_gelu(pre, bias, ends), dtype, f"seed={seed} fwd")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _poison_rows(((R, C), dtype), ((E, C), acc))
    (g_pre, g_bias), (r_pre, r_bias) = kernels.bias_gelu_backward(grad, pre, bias, ends), \
        ref.bias_gelu_backward(grad, pre, bias, ends)
    _assert_rows_close(g_pre, r_pre, dtype, f"seed={seed} grad_pre")
    _assert_rows_close(g_bias, r_bias, acc if dtype != torch.bfloat16 else dtype, f"seed={seed} grad_bias")
    for x in (grad, _wide(grad, gen)):
        _assert_rows_close(kernels.segment_sum(x, ends), ref.segment_sum(x, ends),
                           acc if dtype != torch.bfloat16 else dtype, f"seed={seed} segment_sum")


@cuda_only
@pytest.mark.parametrize("exchange", ["expert", "node"])
@pytest.mark.parametrize("bias", [True, False])
def test_virtual_moe_layer_under_bf16_autocast_same_with_and_without_kernels(kernels, monkeypatch, exchange, bias):
    """The fused one-process path in bf16 (the grouped products, bias_gelu, permute, combine) with
    the kernels and with their references: outputs and every gradient within bf16 rounding."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm in bf16 needs compute capability 9.0+")
    gen, seed = _fresh_generator()
    torch.manual_seed(seed)
    layer = netmoe.MoELayer(64, 96, num_experts=16, top_k=4, placement="netmoe", topology=netmoe.Topology(2, 4),
                            virtual_world=8, exchange=exchange, shared_experts=1, expert_bias=bias).cuda()
    nxt = netmoe.MoELayer(64, 96, num_experts=16, top_k=4, topology=netmoe.Topology(2, 4), virtual_world=8).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, device="cuda", generator=gen))
    x = torch.randn(16, 45, 64, device="cuda", generator=gen).bfloat16()
    w = torch.randn(16, 45, 64, device="cuda", generator=gen)
    sid = torch.arange(16, device="cuda")

    def run(ops):
        monkeypatch.setattr(netmoe, "hot_path", lambda device: ops)
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y, new_sid, aux = layer(xg, sid, next_layer=nxt)
        ((y.float() * w[: y.shape[0]]).sum() + aux).backward()
        return [y, xg.grad] + [p.grad for p in layer.parameters()], new_sid

    fast, sid_fast = run(kernels)
    slow, sid_slow = run(netmoe.REFERENCE_OPS)
    assert torch.equal(sid_fast, sid_slow), f"seed={seed}: different sample placement"
    for a, b in zip(fast, slow):
        _assert_rows_close(a.float().reshape(1, -1), b.float().reshape(1, -1), torch.bfloat16, f"seed={seed}")


@cuda_only
@pytest.mark.parametrize("T,E,K", [(1, 1, 1), (5, 7, 3), (131072, 64, 2), (65536, 256, 8), (300, 2048, 16),
                                   (40, 100, 33), (9, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_topk_ids_kernel_is_the_stable_descending_sort_cut_at_k(kernels, T, E, K, dtype):
    """The gate's choice, exactly: ties (bf16 scores have many; rows of one repeated value) go to
    the lower id, as a stable descending sort orders them; K > 32 takes torch's sort."""
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=gen, dtype=torch.float64)
    scores[: T // 4] = scores[: T // 4].round()                 # many exact ties
    scores[T // 4: T // 3] = 0.5                                # whole rows of one value
    scores = scores.to("cuda", dtype)
    _poison((T, K))
    got = kernels.topk_ids(scores.view(T, 1, E) if T % 2 else scores, K)
    assert got.dtype == torch.int64
    assert torch.equal(got.reshape(T, K), netmoe.topk_ids(scores, K)), f"seed={seed}"
    # the lookahead's affine scores, rstd (s - mean u) + c, computed as the kernel reads them
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    affine = [torch.rand(T, generator=gen, dtype=torch.float64) + 0.5, torch.randn(T, generator=gen, dtype=torch.float64),
              torch.randn(E, generator=gen, dtype=torch.float64), torch.randn(E, generator=gen, dtype=torch.float64)]
    affine[3][: E // 3] = 0.25   # equal offsets: ties where the scores tie
    affine = [t.to("cuda", acc) for t in affine]
    got = kernels.topk_ids(scores, K, affine)
    assert torch.equal(got, netmoe.topk_ids(scores, K, affine)), f"seed={seed}: affine"
