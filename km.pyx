# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
# distutils: language = c++
"""Exact assignment solvers for NetMoE, in Cython with the GIL released during the solve.

linear_sum_assignment(cost, maximize=False) -> (row_ind, col_ind)
    scipy.optimize.linear_sum_assignment's contract; the paper's Kuhn-Munkres (KM). One shortest
    augmenting path per row (Dijkstra on reduced costs with row and column potentials), as in
    Jonker-Volgenant and Crouse's rectangular variant. O(n^2 m).

capacitated_assignment(cost[n, k], capacity[k]) -> col[n]
    Each of n items to one of k columns, column j taking exactly capacity[j] items, minimum summed
    cost: what each stage of NetMoE's placement solves. The paper copies every column capacity[j]
    times into an n x n KM matrix; here it is a min-cost flow whose only nodes are the k columns:
    moving item x from column a to b costs cost[x, b] - cost[x, a], and per pair (a, b) the
    cheapest such moves are kept in order. Start with every item in its cheapest column, then move
    the surplus one item at a time from over-full columns along shortest paths (Dijkstra over the
    k columns, column potentials) to columns with room. About O(n k + surplus k^2); the surplus
    is typically O(sqrt(n k)), and a warm start keeps it there when costs are skewed.

    threads=T fills every pair's first moves a column per thread (OpenMP) on a large problem.

negated_sum(a, b) -> -(a + b) in int32 in one pass, or None where it does not fit: a stage's costs.

capacitated_assignments(cost[n, k], capacity[m, k]) -> col[n]
    m capacitated assignments of consecutive blocks of rows in one call (NetMoE's stage 2, a
    block per node), each the same as capacitated_assignment on its block alone.

grown_groups(A[n, n], groups) -> group[n]; best_swap(S[n, k], group[n], cost[n, n]) -> (gain, a, b)
    The inner loops of netmoe's expert layouts: a balanced partition grown greedily, then the
    best pair swap between groups, each exactly as its numpy loop computes it.

Integer input is solved in exact int64 arithmetic (int32 costs are read as they are, without a
copy); anything else in float64 (+inf marks a forbidden pair). Ties are broken by fixed rules
(lowest index first), never by chance, so equal input gives equal output on every machine.
"""
import numpy as np
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY
from libcpp.pair cimport pair
from libcpp.vector cimport vector

ctypedef fused num_t:
    long long
    double

# The std heap algorithms do not throw for these element types; declared here without
# `except +` so that they can be called from `noexcept nogil` code.
cdef extern from "<algorithm>" namespace "std" nogil:
    void push_heap[It, Cmp](It first, It last, Cmp comp) noexcept
    void pop_heap[It, Cmp](It first, It last, Cmp comp) noexcept

# "Unreached" for integer distances: only ever compared, and far above any reachable value
# (see _INT_HEADROOM), so finite sums never come near it.
cdef long long INT_INF = 1LL << 62
# Every potential and distance either solver forms stays within a few times the largest |entry|
# and the entries' span, so keeping both below 2**62 / (_INT_HEADROOM * (size + 2)) leaves a wide
# margin against int64 overflow.
_INT_HEADROOM = 16


cdef inline num_t _inf(num_t x) noexcept nogil:
    if num_t is double:
        return INFINITY
    else:
        return INT_INF


def _as_cost(cost, maximize=False, narrow=False):
    """cost as a C-contiguous int64 (integer input) or float64 matrix, negated for maximize;
    narrow: int32 input that needs no shift stays int32 (the capacitated solver reads it so)."""
    a = np.asarray(cost)
    if a.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got {a.ndim}-D input of shape {a.shape}")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.size == 0:
            return np.zeros(a.shape, dtype=np.int64)
        if narrow and a.dtype == np.int32 and max(a.shape) < 1 << 25:   # always within the limit below
            return np.ascontiguousarray(a)
        lo, hi = int(a.min()), int(a.max())
        limit = (1 << 62) // (_INT_HEADROOM * (max(a.shape) + 2))
        if hi - lo >= limit:
            raise ValueError(f"integer cost entries span {hi - lo}, too wide for exact int64 "
                             f"arithmetic at shape {a.shape}; scale them down or pass floats")
        if max(hi, -lo) < limit:   # small already: no shift, no copy for int64 input
            a = np.asarray(a, dtype=np.int64)
            return np.ascontiguousarray(-a if maximize else a)
        # Shift by a constant: every solution has the same number of pairs, so the optimum
        # does not move. uint64 is shifted before the cast, as it may not fit int64.
        if a.dtype == np.uint64:
            a = (np.uint64(hi) - a) if maximize else (a - np.uint64(lo))
            return np.ascontiguousarray(a, dtype=np.int64)
        a = a.astype(np.int64)
        return np.ascontiguousarray(hi - a if maximize else a - lo)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"cost must hold real numbers, got dtype {a.dtype}")
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        if np.isnan(a).any():
            raise ValueError("cost contains NaN; use +inf to forbid a pair")
        # scipy's rule: +inf forbids a pair when minimising, -inf when maximising
        if (np.isposinf(a) if maximize else np.isneginf(a)).any():
            raise ValueError(f"cost contains {'+' if maximize else '-'}inf, which cannot be "
                             f"{'maximised' if maximize else 'minimised'}; use "
                             f"{'-' if maximize else '+'}inf to forbid a pair")
    return np.ascontiguousarray(-a if maximize else a)


# ---------------------------------------------------------------------------------------------
# linear_sum_assignment
# ---------------------------------------------------------------------------------------------

cdef int _lsap(num_t[:, ::1] c, Py_ssize_t* col4row) noexcept nogil:
    """Min-cost matching of every row (rows <= columns). Returns -1 if +inf entries block it.

    Invariant: reduced costs c[i, j] - u[i] - v[j] >= 0, and 0 on every matched pair."""
    cdef Py_ssize_t nr = c.shape[0], nc = c.shape[1]
    cdef Py_ssize_t cur, i, j, t, best, jb, ntodo, nrows, ncols, sink
    cdef num_t inf = _inf(<num_t>0), delta, h, r, lowest
    cdef vector[num_t] u_, v_, dist_
    cdef vector[Py_ssize_t] pred_, row4col_, todo_, rows_, cols_
    u_.resize(nr, 0); v_.resize(nc, 0); dist_.resize(nc, 0)
    pred_.resize(nc, 0); row4col_.resize(nc, -1); todo_.resize(nc, 0)
    rows_.resize(nr, 0); cols_.resize(nc, 0)
    cdef num_t* u = u_.data()
    cdef num_t* v = v_.data()
    cdef num_t* dist = dist_.data()
    cdef Py_ssize_t* pred = pred_.data()     # row from which each column was last reached
    cdef Py_ssize_t* row4col = row4col_.data()
    cdef Py_ssize_t* todo = todo_.data()     # columns not yet settled, in no particular order
    cdef Py_ssize_t* rows = rows_.data()     # rows in this search's tree
    cdef Py_ssize_t* cols = cols_.data()     # columns settled in this search
    for i in range(nr):
        col4row[i] = -1
    for cur in range(nr):
        for j in range(nc):
            dist[j] = inf
            todo[j] = j
        ntodo, nrows, ncols = nc, 0, 0
        i, delta, sink = cur, 0, -1
        while sink < 0:
            rows[nrows] = i
            nrows += 1
            h = delta - u[i]
            best, jb, lowest = -1, -1, inf
            for t in range(ntodo):
                j = todo[t]
                r = h + c[i, j] - v[j]   # +inf entries stay +inf: never a path
                if r < dist[j]:
                    dist[j] = r
                    pred[j] = i
                r = dist[j]
                # Ties: a free column first (it ends the search), then the lowest index, so
                # the result does not depend on the order of `todo`.
                if r < lowest or (r == lowest and jb >= 0 and (
                        (row4col[j] < 0) > (row4col[jb] < 0)
                        or ((row4col[j] < 0) == (row4col[jb] < 0) and j < jb))):
                    lowest, best, jb = r, t, j
            if best < 0 or lowest >= inf:
                return -1
            delta = lowest
            ntodo -= 1
            todo[best] = todo[ntodo]
            cols[ncols] = jb
            ncols += 1
            if row4col[jb] < 0:
                sink = jb
            else:
                i = row4col[jb]
        # Shift the potentials by the settled distances: reduced costs stay >= 0 everywhere and
        # become 0 along the path, which is then flipped.
        u[cur] += delta
        for t in range(1, nrows):
            i = rows[t]
            u[i] += delta - dist[col4row[i]]
        for t in range(ncols):
            j = cols[t]
            v[j] -= delta - dist[j]
        j = sink
        while True:
            i = pred[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    return 0


def linear_sum_assignment(cost, maximize=False):
    """Minimum-cost matching of rows to columns, scipy.optimize.linear_sum_assignment's contract.

    cost: a 2-D matrix of any shape; +inf forbids a pair (-inf with maximize=True).
    Returns (row_ind, col_ind), int64 arrays of length min(n, m), row_ind ascending, such that
    cost[row_ind, col_ind].sum() is minimal (maximal with maximize=True).
    Raises ValueError("cost matrix is infeasible ...") if forbidden pairs leave no full matching."""
    a = _as_cost(cost, maximize)
    transposed = a.shape[0] > a.shape[1]
    if transposed:   # the solver matches every row, so rows must be the shorter side
        a = np.ascontiguousarray(a.T)
    nr = a.shape[0]
    col4row = np.empty(nr, dtype=np.intp)
    if nr == 0 or a.shape[1] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cdef Py_ssize_t[::1] out = col4row
    cdef long long[:, ::1] ci
    cdef double[:, ::1] cf
    cdef int status
    if a.dtype == np.int64:
        ci = a
        with nogil:
            status = _lsap(ci, &out[0])
    else:
        cf = a
        with nogil:
            status = _lsap(cf, &out[0])
    if status < 0:
        raise ValueError("cost matrix is infeasible: every complete matching uses a forbidden "
                         "(infinite) entry")
    rows = np.arange(nr, dtype=np.int64)
    cols = col4row.astype(np.int64)
    if transposed:
        order = np.argsort(cols, kind="stable")
        return cols[order], rows[order]
    return rows, cols


# ---------------------------------------------------------------------------------------------
# capacitated_assignment
# ---------------------------------------------------------------------------------------------

# Costs are read in their own type and summed in num_t: int32 input (what netmoe's stages build)
# is read as it is, half the memory traffic of int64 and no copy, every sum in int64.
ctypedef fused cost_t:
    int
    long long
    double

# Moves between columns. For each ordered pair (a, b) the candidates for moving an item from a
# to b are ordered by (cost, item), cost = c[x, b] - c[x, a], lowest item first on ties:
#   buf    the `room` best of the items in a when the pair was (re)filled, sorted ascending;
#          `head` skips the ones found to have left a since,
#   extra  a min-heap of items that entered a after that and beat `bound`,
#   bound  with `more` set (items were left out of buf), no item in a that is in neither
#          is better than bound.
# So the cheapest move is the better of the two fronts, and a pair is refilled (with twice the
# room) only when both run dry while `more` is set. Every pair's cheapest move is kept in front
# (its cost and item), brought up to date where items move, so that Dijkstra reads one entry a
# pair: NONE, no item of a can move to b; STALE, a refill is due, done when Dijkstra needs it.
# Every pair is filled once, a column at a time, before the first search (one compare per item
# and pair, its rows read in order); each column keeps its items in ascending order (members),
# so a refill reads that column's items alone.
cdef enum:
    ROOM = 2       # first size of buf (_fill_two): the fastest of 1, 2, 4, 8 on stage 1 at 128 nodes
    PREFETCH = 4   # rows fetched ahead while filling
    NONE = -1
    STALE = -2

ctypedef pair[num_t, Py_ssize_t] move_t   # (cost of the move, item)
ctypedef vector[Py_ssize_t] items_t

cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil

cdef extern from "<functional>" namespace "std" nogil:
    cdef cppclass greater[T]:
        greater() noexcept


cdef inline void _offer(move_t* buf, Py_ssize_t* size, Py_ssize_t room,
                        num_t cost, Py_ssize_t x, num_t* thr) noexcept nogil:
    """Keep the `room` best (cost, x) offered in buf, sorted ascending. Items are offered in
    ascending order, so (cost, x) goes behind every kept move of equal cost, and once buf is
    full only a cost below the worst kept, thr, gets in (the caller checks)."""
    cdef Py_ssize_t s = size[0], i
    if s == room:
        s -= 1   # the worst kept drops out
    else:
        size[0] = s + 1
    i = s
    while i > 0 and cost < buf[i - 1].first:
        buf[i] = buf[i - 1]
        i -= 1
    buf[i].first, buf[i].second = cost, x
    if size[0] == room:
        thr[0] = buf[room - 1].first


cdef void _fill(const cost_t* c, Py_ssize_t k, Py_ssize_t ld, const items_t& items, Py_ssize_t a,
                move_t** buf, Py_ssize_t* size, Py_ssize_t* room, char* more, move_t* bound,
                num_t* fcost, Py_ssize_t* fitem, Py_ssize_t b0, Py_ssize_t b1,
                num_t* thr, long long* offers) noexcept nogil:
    """Fill pairs (a, b0), ..., (a, b1 - 1) from the items of column a, and set their cheapest
    moves. The per-pair arrays are passed offset to row a, so they are indexed by b; thr and
    offers are k entries of scratch."""
    cdef Py_ssize_t i, m = items.size(), x, b, ahead
    cdef const cost_t* cx
    cdef num_t inf = _inf(<num_t>0), ca, v
    for b in range(b0, b1):
        size[b] = 0
        thr[b] = inf   # an infinite cost (a forbidden pair) never gets in
        offers[b] = 0
    if b0 <= a < b1:
        thr[a] = -inf
    for i in range(m):
        if i + PREFETCH < m:
            ahead = items[i + PREFETCH] * ld + b0
            for b in range(0, (b1 - b0) * <Py_ssize_t>sizeof(cost_t), 64):
                __builtin_prefetch(<const char*>(c + ahead) + b)
        x = items[i]
        cx = c + x * ld
        ca = <num_t>cx[a]
        for b in range(b0, b1):
            v = <num_t>cx[b] - ca
            if num_t is double:
                offers[b] += v < inf
            if v < thr[b]:
                _offer(buf[b], &size[b], room[b], v, x, &thr[b])
    for b in range(b0, b1):
        more[b] = 0
        fcost[b], fitem[b] = _nomove(<num_t>0), NONE
        if b == a:
            continue
        if num_t is double:
            more[b] = offers[b] > room[b]
        else:
            more[b] = m > room[b]
        if size[b]:
            bound[b] = buf[b][size[b] - 1]
            fcost[b], fitem[b] = buf[b][0].first, buf[b][0].second


cdef void _fill_two(const cost_t* c, Py_ssize_t k, Py_ssize_t ld, const items_t& items,
                    Py_ssize_t a, move_t** buf, Py_ssize_t* size, char* more, move_t* bound,
                    num_t* fcost, Py_ssize_t* fitem, num_t* low, num_t* next, Py_ssize_t* one,
                    Py_ssize_t* two, long long* offers) noexcept nogil:
    """_fill of every pair (a, b) at its first size, ROOM = 2: the best two moves kept in place
    (costs low, next and items one, two: k entries of scratch each), no buffer to keep sorted."""
    cdef Py_ssize_t i, m = items.size(), x, b, ahead, line
    cdef const cost_t* cx
    cdef num_t inf = _inf(<num_t>0), ca, v
    for b in range(k):
        low[b] = next[b] = inf   # an infinite cost (a forbidden pair) never gets in
        one[b] = two[b] = -1
        offers[b] = 0
    next[a] = -inf
    for i in range(m):
        if i + PREFETCH < m:
            ahead = items[i + PREFETCH] * ld
            for line in range(0, k * <Py_ssize_t>sizeof(cost_t), 64):
                __builtin_prefetch(<const char*>(c + ahead) + line)
        x = items[i]
        cx = c + x * ld
        ca = <num_t>cx[a]
        for b in range(k):
            v = <num_t>cx[b] - ca
            if num_t is double:
                offers[b] += v < inf
            if v < next[b]:   # items come in ascending order: an equal cost stays behind
                if v < low[b]:
                    next[b], two[b] = low[b], one[b]
                    low[b], one[b] = v, x
                else:
                    next[b], two[b] = v, x
    for b in range(k):
        more[b] = 0
        size[b] = 0
        fcost[b], fitem[b] = _nomove(<num_t>0), NONE
        if b == a:
            continue
        if one[b] >= 0:
            buf[b][0].first, buf[b][0].second = low[b], one[b]
            size[b] = 1
            fcost[b], fitem[b] = low[b], one[b]
        if two[b] >= 0:
            buf[b][1].first, buf[b][1].second = next[b], two[b]
            size[b] = 2
        if num_t is double:
            more[b] = offers[b] > 2
        else:
            more[b] = m > 2
        if size[b]:
            bound[b] = buf[b][size[b] - 1]


cdef inline Py_ssize_t _drop_left(vector[move_t]& h, const long long* col,
                                  Py_ssize_t a) noexcept nogil:
    """Pop the min-heap's front while its item has left column a; returns the new size."""
    cdef Py_ssize_t s = h.size()
    while s and col[h[0].second] != a:
        pop_heap(h.data(), h.data() + s, greater[move_t]())
        s -= 1
    h.resize(s)
    return s


cdef void _front(const cost_t* c, Py_ssize_t k, Py_ssize_t ld, const long long* col,
                 const items_t& items, Py_ssize_t a, Py_ssize_t b, bint refill, move_t** buf,
                 Py_ssize_t* head, Py_ssize_t* size, Py_ssize_t* room, char* more, move_t* bound,
                 vector[move_t]* extra, vector[move_t]* grown, num_t* fcost, Py_ssize_t* fitem,
                 num_t* thr, long long* offers) noexcept nogil:
    """Bring pair (a, b)'s cheapest move up to date: drop the items that left a, refill the pair
    if both fronts ran dry while `more` is set (or, without `refill`, leave it STALE)."""
    cdef Py_ssize_t ab = a * k + b, es
    cdef move_t move
    while True:
        while head[ab] < size[ab] and col[buf[ab][head[ab]].second] != a:
            head[ab] += 1
        es = _drop_left(extra[ab], col, a)
        if head[ab] < size[ab] or es or not more[ab]:
            break
        if not refill:
            fcost[ab], fitem[ab] = _stale(<num_t>0), STALE
            return
        room[ab] *= 2
        grown[ab].resize(room[ab])
        buf[ab] = grown[ab].data()
        head[ab] = 0
        _fill(c, k, ld, items, a, buf + a * k, size + a * k, room + a * k, more + a * k,
              bound + a * k, fcost + a * k, fitem + a * k, b, b + 1, thr, offers)
    if head[ab] < size[ab] and (es == 0 or buf[ab][head[ab]] < extra[ab][0]):
        move = buf[ab][head[ab]]
    elif es:
        move = extra[ab][0]
    else:
        fcost[ab], fitem[ab] = _nomove(<num_t>0), NONE
        return
    fcost[ab], fitem[ab] = move.first, move.second


cdef inline void _join(items_t& items, Py_ssize_t x) noexcept nogil:
    """Insert x into the ascending items."""
    cdef Py_ssize_t i = items.size()
    items.push_back(x)
    while i > 0 and items[i - 1] > x:
        items[i] = items[i - 1]
        i -= 1
    items[i] = x


cdef inline void _leave(items_t& items, Py_ssize_t x) noexcept nogil:
    """Remove x from the ascending items (which hold it)."""
    cdef Py_ssize_t lo = 0, hi = items.size() - 1, mid
    while lo < hi:   # binary search for x
        mid = (lo + hi) // 2
        if items[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    for mid in range(lo, <Py_ssize_t>items.size() - 1):
        items[mid] = items[mid + 1]
    items.pop_back()


cdef long long _start(const cost_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
                      const long long* cap, const num_t* pi, long long* col,
                      long long* count) noexcept nogil:
    """Every item in its cheapest column under potentials pi, which satisfies the invariant of
    _capacitated for any pi. Ties go to the first tied column with room left, so equal costs do
    not pile up in one column. Returns the surplus: how many items must still move."""
    cdef Py_ssize_t x, j, b
    cdef long long surplus = 0
    cdef num_t r, best
    cdef cost_t low
    cdef const cost_t* cx
    cdef bint flat = True   # pi = 0: the row's least entry, in its own type (a loop that vectorises)
    for j in range(k):
        count[j] = 0
        flat = flat and pi[j] == 0
    for x in range(n):
        cx = c + x * ld
        if flat:
            low = cx[0]
            for j in range(1, k):
                low = cx[j] if cx[j] < low else low
            b = -1
            for j in range(k):   # the first column at the least cost with room, else the first at it
                if cx[j] == low:
                    if b < 0 or count[j] < cap[j]:
                        b = j
                    if count[j] < cap[j]:
                        break
        else:
            b = 0
            best = <num_t>cx[0] - pi[0]
            for j in range(1, k):
                r = <num_t>cx[j] - pi[j]
                if r < best or (r == best and count[b] >= cap[b] and count[j] < cap[j]):
                    b, best = j, r
        col[x] = b
        count[b] += 1
    for j in range(k):
        if count[j] > cap[j]:
            surplus += count[j] - cap[j]
    return surplus


# Warm start: the potentials that solve the problem on every WARM_STRIDE-th item (capacities
# scaled) put the cheapest-column start within about sqrt(n k WARM_STRIDE) moves of balance
# (sampling noise). Used when the plain start is further off than that, as with skewed costs
# (most items preferring one column), so that these cost little more than random ones.
cdef enum:
    WARM_STRIDE = 8


cdef void _warm_start(const cost_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
                      const long long* cap, num_t* pi) noexcept nogil:
    """Set pi to the potentials of the problem on items 0, WARM_STRIDE, 2 WARM_STRIDE, ..."""
    cdef Py_ssize_t m = (n + WARM_STRIDE - 1) // WARM_STRIDE, j, b
    cdef long long left = m, r
    cdef vector[long long] sub_cap, sub_col
    sub_cap.resize(k, 0)
    sub_col.resize(m, 0)
    # capacities scaled to sum to m: floors, then one more for the largest remainders
    for j in range(k):
        sub_cap[j] = cap[j] * m // n
        left -= sub_cap[j]
    while left > 0:
        b = -1
        for j in range(k):
            r = cap[j] * m % n
            if sub_cap[j] == cap[j] * m // n and r and (b < 0 or r > cap[b] * m % n):
                b = j
        sub_cap[b] += 1
        left -= 1
    if _capacitated(c, m, k, ld * WARM_STRIDE, sub_cap.data(), sub_col.data(), pi) < 0:
        for j in range(k):   # the sample alone is infeasible (+inf entries): no warm start
            pi[j] = 0


cdef inline num_t _nomove(num_t x) noexcept nogil:
    """The cost of a NONE pair: above any path (and any potential), so never a way."""
    if num_t is double:
        return INFINITY
    else:
        return INT_INF + (INT_INF >> 1)


cdef inline num_t _stale(num_t x) noexcept nogil:
    """The cost of a STALE pair: below any path, so that Dijkstra stops at it to refill it."""
    if num_t is double:
        return -INFINITY
    else:
        return -INT_INF


cdef inline Py_ssize_t _closest(const num_t* dk, const char* full, Py_ssize_t k) noexcept nogil:
    """The column of least dk, on ties one with room (full 0), then the lowest; -1 if none is
    reached (dk infinite)."""
    cdef Py_ssize_t j, a = -1
    cdef num_t low = _inf(<num_t>0)
    cdef char f = -1   # no tie with low while it is infinite
    for j in range(k):
        if dk[j] < low or (dk[j] == low and full[j] < f):
            a, low, f = j, dk[j], full[j]
    return a if low < _inf(<num_t>0) else -1


cdef Py_ssize_t _relax(Py_ssize_t a, Py_ssize_t k, const num_t* fcost, const Py_ssize_t* fitem,
                       const num_t* pi, num_t* d, num_t* dk, const char* full, const char* done,
                       Py_ssize_t* pred_col, Py_ssize_t* pred_item) noexcept nogil:
    """Dijkstra's step from the column a just settled (fcost and fitem: a's row of pairs, none
    STALE towards a column not settled yet): each b's distance through a's cheapest move to it.
    Returns the closest column not settled yet, as _closest picks, or -1 if none is reached.
    A settled b is never improved (reduced costs are >= 0), so done[b] only keeps out the
    sentinel cost of a STALE pair towards it."""
    cdef Py_ssize_t b, nx = -1
    cdef num_t base = d[a] + pi[a], cand, lo = _inf(<num_t>0), dkb
    cdef char lf = -1, f   # no tie with lo while it is infinite
    cdef bint better, closer
    for b in range(k):
        if num_t is double:   # summed in the order it always was: the same rounding
            cand = d[a] + fcost[b] + pi[a] - pi[b]
        else:
            cand = base + fcost[b] - pi[b]
        better = (cand < d[b]) & (done[b] == 0)
        d[b] = cand if better else d[b]
        dkb = cand if better else dk[b]
        dk[b] = dkb
        pred_col[b] = a if better else pred_col[b]
        pred_item[b] = fitem[b] if better else pred_item[b]
        f = full[b]
        closer = (dkb < lo) | ((dkb == lo) & (f < lf))
        nx = b if closer else nx
        lo = dkb if closer else lo
        lf = f if closer else lf
    return nx if lo < _inf(<num_t>0) else -1


# The first fill of every pair runs a column per thread on `threads` threads (OpenMP) where the
# problem holds at least this many entries: each column's pairs are its own, so any split gives
# the same pairs. About 4 ms of one core at 16384 x 128.
FILL_SPLIT = 1 << 16


cdef int _capacitated(const cost_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
                      const long long* cap, long long* col, num_t* pi, int threads=1) noexcept nogil:
    """Min-cost flow of items (rows c[x * ld : x * ld + k]) into columns by successive shortest
    paths between the columns. pi: column potentials, in (any start) and out. threads: how many
    fill the pairs.

    Invariant: every item x in column a has c[x, a] - pi[a] <= c[x, b] - pi[b] for all b, i.e.
    every residual edge a -> b has reduced cost >= 0. Returns -1 if forbidden (+inf) entries
    make the capacities unreachable."""
    cdef Py_ssize_t j, a, b, x, t, ab, es, w
    cdef int nt = threads if threads > 1 else 1
    cdef num_t inf = _inf(<num_t>0), D, low
    cdef long long surplus
    cdef move_t move
    cdef vector[long long] count_
    count_.resize(k, 0)
    cdef long long* count = count_.data()

    surplus = _start(c, n, k, ld, cap, pi, col, count)
    if surplus * surplus > n * k * WARM_STRIDE and n >= 2 * WARM_STRIDE * k:
        _warm_start(c, n, k, ld, cap, pi)
        surplus = _start(c, n, k, ld, cap, pi, col, count)
    if surplus == 0:
        return 0

    # per pair (a * k + b): see the comment above _offer
    cdef vector[move_t] arena_
    cdef vector[vector[move_t]] grown_, extra_
    cdef vector[move_t*] buf_
    cdef vector[move_t] bound_
    cdef vector[num_t] fcost_, thr_
    cdef vector[Py_ssize_t] head_, size_, room_, fitem_
    cdef vector[long long] offers_
    cdef vector[char] more_
    cdef vector[items_t] members   # each column's items, ascending
    arena_.resize(k * k * ROOM); grown_.resize(k * k); extra_.resize(k * k); buf_.resize(k * k)
    bound_.resize(k * k); head_.resize(k * k, 0); size_.resize(k * k, 0)
    room_.resize(k * k, ROOM); more_.resize(k * k, 0)
    fcost_.resize(k * k, 0); fitem_.resize(k * k, NONE); thr_.resize(2 * k * nt, 0); offers_.resize(k * nt, 0)
    members.resize(k)
    cdef vector[Py_ssize_t] stale_   # each column's STALE pairs
    stale_.resize(k, 0)
    cdef Py_ssize_t* stale = stale_.data()
    cdef vector[move_t]* extra = extra_.data()
    cdef vector[move_t]* grown = grown_.data()
    cdef move_t** buf = buf_.data()
    cdef move_t* bound = bound_.data()
    cdef Py_ssize_t* head = head_.data()
    cdef Py_ssize_t* size = size_.data()
    cdef Py_ssize_t* room = room_.data()
    cdef char* more = more_.data()
    cdef num_t* fcost = fcost_.data()
    cdef Py_ssize_t* fitem = fitem_.data()
    cdef num_t* thr = thr_.data()
    cdef long long* offers = offers_.data()
    cdef vector[Py_ssize_t] scratch_
    scratch_.resize(2 * k * nt, 0)
    cdef Py_ssize_t* scratch = scratch_.data()
    for a in range(k):
        members[a].reserve(count[a] + k)
        for b in range(k):
            buf[a * k + b] = arena_.data() + (a * k + b) * ROOM
    for x in range(n):
        members[col[x]].push_back(x)
    if nt > 1:   # scratch a thread: thr, scratch 2 k entries each, offers k
        for a in prange(k, num_threads=nt, schedule="static"):
            w = threadid()
            _fill_two(c, k, ld, members[a], a, buf + a * k, size + a * k, more + a * k, bound + a * k,
                      fcost + a * k, fitem + a * k, thr + 2 * k * w, thr + 2 * k * w + k,
                      scratch + 2 * k * w, scratch + 2 * k * w + k, offers + k * w)
    else:
        for a in range(k):
            _fill_two(c, k, ld, members[a], a, buf + a * k, size + a * k, more + a * k, bound + a * k,
                      fcost + a * k, fitem + a * k, thr, thr + k, scratch, scratch + k, offers)
    # Dijkstra over the columns
    cdef vector[num_t] d_, dk_
    cdef vector[Py_ssize_t] pred_col_, pred_item_
    cdef vector[char] done_, full_
    d_.resize(k, 0); dk_.resize(k, 0); pred_col_.resize(k, -1); pred_item_.resize(k, -1)
    done_.resize(k, 0); full_.resize(k, 0)
    cdef num_t* d = d_.data()
    cdef num_t* dk = dk_.data()
    cdef char* full = full_.data()
    cdef Py_ssize_t* pred_col = pred_col_.data()
    cdef Py_ssize_t* pred_item = pred_item_.data()
    cdef char* done = done_.data()

    while surplus > 0:
        # Dijkstra from all over-full columns at once to the nearest column with room. Settled
        # next: the closest column (dk: d of the columns not settled yet); on ties one with
        # room (it ends the search), then the lowest index.
        for j in range(k):
            done[j] = 0
            pred_col[j] = -1
            full[j] = count[j] >= cap[j]
            d[j] = dk[j] = 0 if count[j] > cap[j] else inf
        a = _closest(dk, full, k)
        while True:
            if a < 0:
                return -1
            done[a] = 1
            dk[a] = inf
            if not full[a]:
                break
            # Refill the STALE pairs a -> b that Dijkstra can still use, then relax every pair
            # a -> b and find the next column to settle on the way.
            for b in range(k if stale[a] else 0):
                if fitem[a * k + b] == STALE and not done[b]:
                    _front(c, k, ld, col, members[a], a, b, True, buf, head, size, room, more, bound,
                           extra, grown, fcost, fitem, thr, offers)
                    stale[a] -= 1
            a = _relax(a, k, fcost + a * k, fitem + a * k, pi, d, dk, full, done, pred_col, pred_item)
        # New potentials pi + min(d, D) keep every reduced cost >= 0 and make the path's 0, so its
        # reverse edges are usable next time. Subtracting the minimum keeps the values small.
        D = d[a]
        for j in range(k):
            pi[j] += d[j] if d[j] < D else D
        low = pi[0]
        for j in range(1, k):
            if pi[j] < low:
                low = pi[j]
        for j in range(k):
            pi[j] -= low
        # Augment: each edge's item moves one column forward, one unit of surplus is used up.
        # The pairs whose cheapest move an item was move on; those of its new column may get it.
        count[a] += 1
        b = a
        while pred_col[b] >= 0:
            t = pred_col[b]
            x = pred_item[b]
            col[x] = b
            _leave(members[t], x)
            _join(members[b], x)
            for j in range(k):
                if fitem[t * k + j] == x:
                    _front(c, k, ld, col, members[t], t, j, False, buf, head, size, room, more,
                           bound, extra, grown, fcost, fitem, thr, offers)
                    stale[t] += fitem[t * k + j] == STALE
            for j in range(k):
                if j == b or c[x * ld + j] >= inf:
                    continue
                ab = b * k + j
                move.first, move.second = <num_t>c[x * ld + j] - <num_t>c[x * ld + b], x
                if more[ab] and not move < bound[ab]:
                    continue   # no better than items left out: a refill will find it
                es = extra[ab].size()
                extra[ab].push_back(move)
                push_heap(extra[ab].data(), extra[ab].data() + es + 1, greater[move_t]())
                if fitem[ab] != STALE and (move.first < fcost[ab] or (move.first == fcost[ab] and x < fitem[ab])):
                    fcost[ab], fitem[ab] = move.first, x   # NONE's cost is above any move
            b = t
        count[b] -= 1
        surplus -= 1
    return 0


def _capacities(cap, k):
    """capacity as int64 after the checks both entry points make (rows of one entry per column)."""
    if not (cap.dtype == np.bool_ or np.issubdtype(cap.dtype, np.integer)):
        whole = np.issubdtype(cap.dtype, np.floating) and np.all(np.isfinite(cap) & (cap % 1 == 0))
        if not whole:
            raise ValueError(f"capacity must hold whole numbers, got {cap.tolist()}")
    if (cap < 0).any():
        raise ValueError(f"capacity must be non-negative, got {cap.tolist()}")
    return np.ascontiguousarray(cap, dtype=np.int64)


def capacitated_assignment(cost, capacity, threads=1):
    """Assign n items to k columns, column j taking exactly capacity[j] items, minimum total cost.

    cost: [n, k] matrix; +inf forbids a pair, but every row needs a finite entry.
    capacity: [k] non-negative integers summing to n.
    Returns col, int64 [n]: item i goes to column col[i] and sum(cost[i, col[i]]) is minimal.
    Exact (integer input stays in int64 arithmetic); ties go to the lowest index, so it is
    deterministic. threads: how many threads may fill the pairs of a large problem (FILL_SPLIT
    entries or more), with the same result."""
    a = _as_cost(cost, narrow=True)
    n, k = a.shape
    cap = np.asarray(capacity)
    if cap.ndim != 1 or cap.shape[0] != k:
        raise ValueError(f"capacity must be 1-D with one entry per cost column ({k}), "
                         f"got shape {cap.shape}")
    cap = _capacities(cap, k)
    if int(cap.sum()) != n:
        raise ValueError(f"capacities sum to {int(cap.sum())} but cost has {n} rows (items); "
                         f"every item needs exactly one place")
    return _blocks(a, cap[None], threads)


def capacitated_assignments(cost, capacity):
    """Many capacitated assignments in one call, the GIL released through all of them: cost
    [n, k] is m blocks of consecutive rows, block i the capacity[i].sum() rows after the blocks
    before it, each solved on its own with column j taking capacity[i, j] of its rows.
    capacity: [m, k]. Returns col, int64 [n], each block's part what capacitated_assignment
    gives for that block alone (NetMoE's stage 2: one block per node)."""
    a = _as_cost(cost, narrow=True)
    n, k = a.shape
    cap = np.asarray(capacity)
    if cap.ndim != 2 or cap.shape[1] != k:
        raise ValueError(f"capacity must be 2-D with one row per block and one entry per cost column "
                         f"({k}), got shape {cap.shape}")
    cap = _capacities(cap, k)
    if int(cap.sum()) != n:
        raise ValueError(f"the blocks' capacities sum to {int(cap.sum())} but cost has {n} rows (items); "
                         f"every item needs exactly one place")
    return _blocks(a, cap)


def _blocks(a, cap, threads=1):
    """col [n] of the checked cost a [n, k] in blocks of rows, capacities cap [m, k]."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    n, k = a.shape
    if a.dtype == np.float64 and n and not np.isfinite(a).all():
        stuck = np.flatnonzero(np.isinf(a).all(axis=1))
        if len(stuck):
            raise ValueError(f"row {int(stuck[0])} of cost has no finite entry: that item "
                             f"cannot go anywhere")
    col = np.zeros(n, dtype=np.int64)
    if n == 0:
        return col
    pi = np.zeros(k, dtype=np.float64 if a.dtype == np.float64 else np.int64)   # column potentials
    cdef long long[::1] out = col, capv = cap.reshape(-1)
    cdef int[:, ::1] c32
    cdef long long[:, ::1] c64
    cdef long long[::1] pii
    cdef double[:, ::1] cf
    cdef double[::1] pif
    cdef Py_ssize_t kk = k, m = cap.shape[0], i, j, start = 0, rows
    cdef int status = 0, kind = 2 if a.dtype == np.float64 else 1 if a.dtype == np.int64 else 0
    cdef int nt = threads if n * k >= FILL_SPLIT else 1
    if kind == 2:
        cf, pif = a, pi
    else:
        pii = pi
        if kind == 0:
            c32 = a
        else:
            c64 = a
    with nogil:
        for i in range(m):
            rows = 0
            for j in range(kk):
                rows += capv[i * kk + j]
            if rows and kind == 2:
                for j in range(kk):
                    pif[j] = 0
                status = _capacitated(&cf[start, 0], rows, kk, kk, &capv[i * kk], &out[start], &pif[0], nt)
            elif rows:
                for j in range(kk):
                    pii[j] = 0
                if kind == 0:
                    status = _capacitated(&c32[start, 0], rows, kk, kk, &capv[i * kk], &out[start], &pii[0], nt)
                else:
                    status = _capacitated(&c64[start, 0], rows, kk, kk, &capv[i * kk], &out[start], &pii[0], nt)
            if status < 0:
                break
            start += rows
    if status < 0:
        raise ValueError("cost matrix is infeasible: no assignment meets the capacities without "
                         "a forbidden (infinite) entry")
    return col


def negated_sum(a, b):
    """-(a + b) of two int32 arrays of the same shape, C-contiguous, in one pass: int32 where
    every a + b lies in [0, 2**31) (non-negative counts that fit), else None (the caller sums in
    int64). What a stage's costs are built from: one read of each, one write."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != np.int32 or b.dtype != np.int32:
        raise ValueError(f"negated_sum needs two int32 arrays of one shape, got {a.dtype} {a.shape} and "
                         f"{b.dtype} {b.shape}")
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    out = np.empty(a.shape, dtype=np.int32)
    cdef Py_ssize_t i, n = a.size
    if n == 0:
        return out
    cdef const int[::1] x = a.reshape(-1), y = b.reshape(-1)
    cdef int[::1] o = out.reshape(-1)
    cdef const unsigned int* xp = <const unsigned int*>&x[0]
    cdef const unsigned int* yp = <const unsigned int*>&y[0]
    cdef int* op = &o[0]
    cdef unsigned int s, seen = 0
    with nogil:
        for i in range(n):   # unsigned: no overflow to undefine; a sum's top bit marks one too wide
            s = xp[i] + yp[i]
            seen |= s | xp[i] | yp[i]
            op[i] = <int>(0u - s)
    return None if seen >> 31 else out


# ---------------------------------------------------------------------------------------------
# grown_groups and best_swap: the inner loops of netmoe's expert layouts (a balanced partition)
# ---------------------------------------------------------------------------------------------

def grown_groups(A, groups):
    """Split the n rows of affinity matrix A [n, n] into `groups` groups of n / groups by greedy
    growth: each group starts from the free item of the largest summed affinity to the free
    items, then takes the free item of the largest summed affinity to its members, one at a
    time; ties to the lowest index. Returns group [n]. Each sum is taken left to right, in
    index order over the free items and in the order members joined, as numpy sums the columns
    that A[:, cols].sum(1) gathers, so this is the plain numpy loop's result, without its calls."""
    cdef double[:, ::1] a = np.ascontiguousarray(A, dtype=np.float64)
    cdef Py_ssize_t n = a.shape[0], k = groups, size, g, m, x, j, best
    if a.shape[1] != n or k < 1 or n % k:
        raise ValueError(f"A must be square with rows divisible into {groups} groups, got {a.shape}")
    size = n // k
    group = np.full(n, -1, dtype=np.int64)
    cdef long long[::1] grp = group
    cdef double[::1] score = np.zeros(max(n, 1))   # each free item's affinity to the members so far
    cdef double v, top
    with nogil:
        for g in range(k):
            for m in range(size):
                best, top = -1, -INFINITY
                for x in range(n):
                    if grp[x] >= 0:
                        continue
                    if m == 0:   # to every free item, in index order
                        v = 0.0
                        for j in range(n):
                            if grp[j] < 0:
                                v = v + a[x, j]
                        score[x] = 0.0
                    else:
                        v = score[x]
                    if best < 0 or v > top:
                        best, top = x, v
                grp[best] = g
                for x in range(n):
                    score[x] = score[x] + a[x, best]
    return group


def best_swap(S, group, cost):
    """The best swap of two items between groups: (gain, a, b), the first (a, b) in row-major
    order of the greatest gain[a, b] = S[a, g_b] + S[b, g_a] - S[a, g_a] - S[b, g_b] - cost[a, b],
    g = group. S: [n, k] float64 affinities of each item to each group; cost: [n, n] float64,
    +inf where a swap is no swap (a and b in one group). Each gain is summed in that order, left
    to right, so it is the value numpy's elementwise operations give: one pass, no [n, n]
    temporaries. (-inf, 0, 0) when no pair may swap."""
    cdef double[:, ::1] s = np.ascontiguousarray(S, dtype=np.float64)
    cdef double[:, ::1] c = np.ascontiguousarray(cost, dtype=np.float64)
    cdef long long[::1] g = np.ascontiguousarray(group, dtype=np.int64)
    cdef Py_ssize_t n = g.shape[0], x, y, a = 0, b = 0
    cdef double best = -INFINITY, v, sx_own
    if s.shape[0] != n or c.shape[0] != n or c.shape[1] != n:
        raise ValueError(f"S must be [n, k] and cost [n, n] for the n={n} items of group")
    if n and (np.min(group) < 0 or np.max(group) >= s.shape[1]):
        raise ValueError(f"group must name groups in [0, {s.shape[1]})")
    with nogil:
        for x in range(n):
            sx_own = s[x, g[x]]
            for y in range(n):
                v = s[x, g[y]] + s[y, g[x]]
                v = v - sx_own
                v = v - s[y, g[y]]
                v = v - c[x, y]
                if v > best:
                    best, a, b = v, x, y
    return best, a, b
