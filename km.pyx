# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""Exact assignment solvers for NetMoE, in Cython with the GIL released.

linear_sum_assignment(cost, maximize=False)
    scipy.optimize.linear_sum_assignment's contract: the paper's Kuhn-Munkres (KM). Shortest
    augmenting paths with dual potentials (Jonker-Volgenant / Crouse), one row at a time.

capacitated_assignment(cost[n, k], capacity[k])
    Each item to one of k columns, column j taking exactly capacity[j] items, minimum total cost.
    This is what each NetMoE stage is. The paper copies every column capacity[j] times into an
    n x n matrix (O(n^3)); here items are inserted one at a time along shortest paths in the
    residual graph *between the k columns*: moving an item from column a to b costs
    c[x, b] - c[x, a], and the cheapest such item per (a, b) sits on top of a heap. Dijkstra with
    column potentials over k nodes: O(n k^2 + moves k log n).

Integer input is solved in int64 arithmetic (exact); anything else in float64. Ties are broken
by the lowest index, so equal input gives equal output on every machine.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport INFINITY
from libcpp.vector cimport vector
from libcpp.queue cimport priority_queue
from libcpp.pair cimport pair

cnp.import_array()

ctypedef fused num_t:
    long long
    double

cdef long long INT_INF = 1LL << 62


cdef inline num_t _inf(num_t x) noexcept nogil:
    if num_t is double:
        return INFINITY
    else:
        return INT_INF


def _as_cost(cost, what="cost"):
    """Validated C-contiguous int64 or float64 2-D array."""
    a = np.asarray(cost)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got {a.ndim}-D input of shape {a.shape}")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = np.ascontiguousarray(a, dtype=np.int64)
        if a.size:
            big = max(abs(int(a.max())), abs(int(a.min())))
            if big and big * 4 * (max(a.shape) + 1) >= (1 << 62):
                raise ValueError(f"integer {what} entries up to {big} could overflow exact int64 "
                                 f"arithmetic at this size; scale them down or pass floats")
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must hold numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{what} contains NaN")
    if np.isneginf(a).any():
        raise ValueError(f"{what} contains -inf")
    return a


# ---------------------------------------------------------------------------------------------
# linear_sum_assignment
# ---------------------------------------------------------------------------------------------

cdef Py_ssize_t _augment(num_t[:, ::1] c, num_t* u, num_t* v, Py_ssize_t* path, Py_ssize_t* row4col,
                         num_t* spc, Py_ssize_t i, char* SR, char* SC, Py_ssize_t* remaining,
                         num_t* min_out) noexcept nogil:
    """Shortest augmenting path from free row i (Dijkstra on reduced costs); returns the sink column."""
    cdef Py_ssize_t nr = c.shape[0], nc = c.shape[1], it, j, index, sink = -1, num_remaining = nc
    cdef num_t min_val = 0, lowest, r, inf = _inf(min_val)
    for it in range(nc):
        remaining[it] = nc - it - 1   # scanned back to front: among equal costs the lowest j wins
        SC[it] = 0
        spc[it] = inf
    for it in range(nr):
        SR[it] = 0
    while sink == -1:
        index = -1
        lowest = inf
        SR[i] = 1
        for it in range(num_remaining):
            j = remaining[it]
            if c[i, j] >= inf:
                r = inf
            else:
                r = min_val + c[i, j] - u[i] - v[j]
            if r < spc[j]:
                path[j] = i
                spc[j] = r
            # among equal distances prefer a free column: it ends the search
            if spc[j] < lowest or (spc[j] == lowest and row4col[j] == -1):
                lowest = spc[j]
                index = it
        min_val = lowest
        if min_val >= inf:
            return -1
        j = remaining[index]
        if row4col[j] == -1:
            sink = j
        else:
            i = row4col[j]
        SC[j] = 1
        num_remaining -= 1
        remaining[index] = remaining[num_remaining]
    min_out[0] = min_val
    return sink


cdef int _lsap(num_t[:, ::1] c, Py_ssize_t[::1] col4row) noexcept nogil:
    cdef Py_ssize_t nr = c.shape[0], nc = c.shape[1], cur, i, j, sink, tmp
    cdef vector[num_t] u_, v_, spc_
    cdef vector[Py_ssize_t] path_, row4col_, remaining_
    cdef vector[char] SR_, SC_
    cdef num_t min_val = 0
    u_.resize(nr, 0); v_.resize(nc, 0); spc_.resize(nc, 0)
    path_.resize(nc, -1); row4col_.resize(nc, -1); remaining_.resize(nc, 0)
    SR_.resize(nr, 0); SC_.resize(nc, 0)
    cdef num_t* u = u_.data()
    cdef num_t* v = v_.data()
    cdef num_t* spc = spc_.data()
    for i in range(nr):
        col4row[i] = -1
    for cur in range(nr):
        sink = _augment(c, u, v, path_.data(), row4col_.data(), spc, cur, SR_.data(), SC_.data(),
                        remaining_.data(), &min_val)
        if sink < 0:
            return -1
        u[cur] += min_val   # dual update keeps every reduced cost non-negative
        for i in range(nr):
            if SR_[i] and i != cur:
                u[i] += min_val - spc[col4row[i]]
        for j in range(nc):
            if SC_[j]:
                v[j] -= min_val - spc[j]
        j = sink
        while True:       # flip the path
            i = path_[j]
            row4col_[j] = i
            tmp = col4row[i]
            col4row[i] = j
            j = tmp
            if i == cur:
                break
    return 0


def linear_sum_assignment(cost, maximize=False):
    """Minimum-cost matching of rows to columns, scipy's contract (rectangular either way).

    Returns (row_ind, col_ind), int64 arrays of length min(n, m), row_ind ascending."""
    a = _as_cost(cost)
    if maximize:   # as scipy: negate, so +inf becomes invalid and -inf forbidden
        a = _as_cost(-a.astype(np.float64) if a.dtype != np.int64 else -a)
    transpose = a.shape[1] < a.shape[0]
    if transpose:
        a = np.ascontiguousarray(a.T)
    nr = a.shape[0]
    col4row = np.empty(nr, dtype=np.intp)
    if nr == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cdef Py_ssize_t[::1] out = col4row
    cdef long long[:, ::1] ci
    cdef double[:, ::1] cf
    cdef int status
    if a.dtype == np.int64:
        ci = a
        with nogil:
            status = _lsap(ci, out)
    else:
        cf = a
        with nogil:
            status = _lsap(cf, out)
    if status < 0:
        raise ValueError("cost matrix is infeasible: no complete assignment avoids the +inf entries")
    rows = np.arange(nr, dtype=np.int64)
    cols = col4row.astype(np.int64)
    if transpose:
        order = np.argsort(cols, kind="stable")
        return cols[order], rows[order]
    return rows, cols


# ---------------------------------------------------------------------------------------------
# capacitated_assignment
# ---------------------------------------------------------------------------------------------

cdef int _capacitated(num_t[:, ::1] c, long long[::1] cap, long long[::1] col) noexcept nogil:
    cdef Py_ssize_t n = c.shape[0], k = c.shape[1], i, j, a, b, x, t
    cdef num_t inf = _inf(c[0, 0]), base, key, cand, D
    # heaps[a * k + b]: items x in column a keyed by the cost of moving them to b
    cdef vector[priority_queue[pair[num_t, Py_ssize_t]]] heaps
    cdef vector[num_t] pi, d          # node k is the sink: columns with room lead to it
    cdef vector[Py_ssize_t] pred_col, pred_item
    cdef vector[long long] count
    cdef vector[char] done
    heaps.resize(k * k)
    pi.resize(k + 1, 0); d.resize(k + 1, 0); pred_col.resize(k + 1, -1); pred_item.resize(k, -1)
    count.resize(k, 0); done.resize(k + 1, 0)
    for i in range(n):
        # reduced costs of the new item's own edges, shifted to be >= 0
        base = inf
        for j in range(k):
            if c[i, j] < inf and c[i, j] - pi[j] < base:
                base = c[i, j] - pi[j]
        for j in range(k):
            d[j] = inf if c[i, j] >= inf else c[i, j] - pi[j] - base
            pred_col[j] = -1
            pred_item[j] = i
            done[j] = 0
        d[k] = inf
        done[k] = 0
        # Dijkstra over the k columns and the sink (dense: k is small); stops at the sink
        while True:
            a = -1
            for j in range(k + 1):
                if not done[j] and d[j] < inf and (a < 0 or d[j] < d[a]):
                    a = j
            if a < 0:
                return -1              # no column with room is reachable
            if a == k:
                break
            done[a] = 1
            if count[a] < cap[a] and d[a] + pi[a] - pi[k] < d[k]:
                d[k] = d[a] + pi[a] - pi[k]
                pred_col[k] = a
            for b in range(k):
                if done[b]:
                    continue
                while not heaps[a * k + b].empty() and col[-1 - heaps[a * k + b].top().second] != a:
                    heaps[a * k + b].pop()     # lazy deletion: that item has left column a
                if heaps[a * k + b].empty():
                    continue
                key = -heaps[a * k + b].top().first
                cand = d[a] + key + pi[a] - pi[b]
                if cand < d[b]:
                    d[b] = cand
                    pred_col[b] = a
                    pred_item[b] = -1 - heaps[a * k + b].top().second
        # potentials: pi += min(d, D) keeps every reduced cost >= 0 after the augmentation
        D = d[k]
        for j in range(k + 1):
            pi[j] += d[j] if d[j] < D else D
        t = pred_col[k]
        count[t] += 1
        # walk the path back: each item on it moves one column forward, the new item enters
        b = t
        while True:
            x = pred_item[b]
            a = pred_col[b]
            col[x] = b
            for j in range(k):
                if j != b and c[x, j] < inf:
                    # max-heap of (-key, -1-x): the smallest key, then the lowest item, on top
                    heaps[b * k + j].push(pair[num_t, Py_ssize_t](-(c[x, j] - c[x, b]), -1 - x))
            if a < 0:
                break
            b = a
    return 0


def capacitated_assignment(cost, capacity):
    """col[n]: item i goes to column col[i]; column j receives exactly capacity[j] items; the summed
    cost[i, col[i]] is minimal. Exact; integer input stays in int64."""
    a = _as_cost(cost)
    n, k = a.shape
    cap = np.asarray(capacity)
    if cap.ndim != 1 or cap.shape[0] != k:
        raise ValueError(f"capacity must be 1-D with one entry per column ({k}), got shape {cap.shape}")
    if not (cap.dtype == np.bool_ or np.issubdtype(cap.dtype, np.integer)):
        if not np.all(np.asarray(cap, dtype=np.float64) == np.round(np.asarray(cap, dtype=np.float64))):
            raise ValueError("capacity must hold whole numbers")
    cap = np.ascontiguousarray(cap, dtype=np.int64)
    if (cap < 0).any():
        raise ValueError(f"capacity must be non-negative, got {cap.tolist()}")
    if int(cap.sum()) != n:
        raise ValueError(f"capacities sum to {int(cap.sum())} but there are {n} items; they must match")
    if n and a.dtype == np.float64 and (~np.isfinite(a)).all(axis=1).any():
        bad = int(np.flatnonzero((~np.isfinite(a)).all(axis=1))[0])
        raise ValueError(f"row {bad} of cost has no finite entry: that item cannot go anywhere")
    col = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return col
    cdef long long[::1] out = col, capv = cap
    cdef long long[:, ::1] ci
    cdef double[:, ::1] cf
    cdef int status
    if a.dtype == np.int64:
        ci = a
        with nogil:
            status = _capacitated(ci, capv, out)
    else:
        cf = a
        with nogil:
            status = _capacitated(cf, capv, out)
    if status < 0:
        raise ValueError("no assignment respects the capacities while avoiding the +inf entries")
    return col
