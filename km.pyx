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

Integer input is solved in exact int64 arithmetic; anything else in float64 (+inf marks a
forbidden pair). Ties are broken by fixed rules (lowest index first), never by chance, so equal
input gives equal output on every machine.
"""
import numpy as np
from libc.math cimport INFINITY
from libcpp.pair cimport pair
from libcpp.vector cimport vector

ctypedef fused num_t:
    long long
    double

# The std heap algorithms do not throw for these element types; declared here without
# `except +` so that they can be called from `noexcept nogil` code.
cdef extern from "<algorithm>" namespace "std" nogil:
    void push_heap[It](It first, It last) noexcept
    void push_heap[It, Cmp](It first, It last, Cmp comp) noexcept
    void pop_heap[It](It first, It last) noexcept
    void pop_heap[It, Cmp](It first, It last, Cmp comp) noexcept
    void sort_heap[It](It first, It last) noexcept
    void make_heap[It](It first, It last) noexcept
    void sort[It](It first, It last) noexcept

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


def _as_cost(cost, maximize=False):
    """cost as a C-contiguous int64 (integer input) or float64 matrix, negated for maximize."""
    a = np.asarray(cost)
    if a.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got {a.ndim}-D input of shape {a.shape}")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.size == 0:
            return np.zeros(a.shape, dtype=np.int64)
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

# Moves between columns. For each ordered pair (a, b) the candidates for moving an item from a
# to b are ordered by (cost, item), cost = c[x, b] - c[x, a], lowest item first on ties:
#   buf    the `room` best of the items in a when the pair was (re)filled, sorted ascending;
#          `head` skips the ones found to have left a since,
#   extra  a min-heap of items that entered a after that and beat `bound`,
#   bound  with `more` set (items were left out of buf), no item in a that is in neither
#          is better than bound.
# So the cheapest move is the better of the two fronts, and a pair is refilled (with twice the
# room) only when both run dry while `more` is set. A fill is one pass over the column with about
# one compare per item, and pops are O(1): much cheaper than heaps over every item.
cdef enum:
    ROOM = 4   # first size of buf: the fastest of 1..16 measured for n = 384..8192, k = 2..64

ctypedef pair[num_t, Py_ssize_t] move_t   # (cost of the move, item)
ctypedef move_t* move_p

cdef extern from "<functional>" namespace "std" nogil:
    cdef cppclass greater[T]:
        greater() noexcept


cdef inline void _offer(move_t* buf, Py_ssize_t* size, Py_ssize_t room,
                        num_t cost, Py_ssize_t x, char* more) noexcept nogil:
    """Keep the `room` best (cost, x) offered in buf, a max-heap with the worst kept on top."""
    cdef Py_ssize_t s = size[0]
    if s < room:   # not full yet: collect, heapify once it is
        buf[s].first, buf[s].second = cost, x
        size[0] = s + 1
        if s + 1 == room:
            make_heap(buf, buf + room)
        return
    more[0] = 1
    if cost < buf[0].first or (cost == buf[0].first and x < buf[0].second):
        pop_heap(buf, buf + s)
        buf[s - 1].first, buf[s - 1].second = cost, x
        push_heap(buf, buf + s)


cdef void _fill(const num_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld, const long long* col,
                Py_ssize_t a, Py_ssize_t b0, Py_ssize_t b1, move_p* buf, Py_ssize_t* head,
                Py_ssize_t* size, Py_ssize_t* room, char* more, move_t* bound) noexcept nogil:
    """Fill the buffers of pairs (a, b0), ..., (a, b1 - 1) from the items now in column a.
    The per-pair arrays are passed offset to row a, so they are indexed by b."""
    cdef Py_ssize_t x, b
    cdef const num_t* cx
    cdef num_t inf = _inf(<num_t>0)
    for b in range(b0, b1):
        head[b] = size[b] = more[b] = 0
    for x in range(n):
        if col[x] == a:
            cx = c + x * ld
            for b in range(b0, b1):
                if b != a and cx[b] < inf:
                    _offer(buf[b], &size[b], room[b], cx[b] - cx[a], x, &more[b])
    for b in range(b0, b1):
        if size[b] == room[b]:
            sort_heap(buf[b], buf[b] + size[b])
        else:
            sort(buf[b], buf[b] + size[b])
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


cdef long long _start(const num_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
                      const long long* cap, const num_t* pi, long long* col,
                      long long* count) noexcept nogil:
    """Every item in its cheapest column under potentials pi, which satisfies the invariant of
    _capacitated for any pi. Ties go to the first tied column with room left, so equal costs do
    not pile up in one column. Returns the surplus: how many items must still move."""
    cdef Py_ssize_t x, j, b
    cdef long long surplus = 0
    cdef num_t r, best
    cdef const num_t* cx
    for j in range(k):
        count[j] = 0
    for x in range(n):
        cx = c + x * ld
        b = 0
        best = cx[0] - pi[0]
        for j in range(1, k):
            r = cx[j] - pi[j]
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


cdef void _warm_start(const num_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
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


cdef int _capacitated(const num_t* c, Py_ssize_t n, Py_ssize_t k, Py_ssize_t ld,
                      const long long* cap, long long* col, num_t* pi) noexcept nogil:
    """Min-cost flow of items (rows c[x * ld : x * ld + k]) into columns by successive shortest
    paths between the columns. pi: column potentials, in (any start) and out.

    Invariant: every item x in column a has c[x, a] - pi[a] <= c[x, b] - pi[b] for all b, i.e.
    every residual edge a -> b has reduced cost >= 0. Returns -1 if forbidden (+inf) entries
    make the capacities unreachable."""
    cdef Py_ssize_t j, a, b, x, t, ab, es
    cdef num_t inf = _inf(<num_t>0), cand, D, low
    cdef long long surplus
    cdef move_t move
    cdef vector[long long] count_
    count_.resize(k, 0)
    cdef long long* count = count_.data()

    surplus = _start(c, n, k, ld, cap, pi, col, count)
    if surplus * surplus > n * k * WARM_STRIDE and n >= 2 * WARM_STRIDE * k:
        _warm_start(c, n, k, ld, cap, pi)
        surplus = _start(c, n, k, ld, cap, pi, col, count)

    # per pair (a * k + b): see the comment above _offer
    cdef vector[vector[move_t]] arena_, grown_, extra_
    cdef vector[move_p] buf_
    cdef vector[move_t] bound_
    cdef vector[Py_ssize_t] head_, size_, room_
    cdef vector[char] more_, built_
    arena_.resize(k); grown_.resize(k * k); extra_.resize(k * k); buf_.resize(k * k)
    bound_.resize(k * k); head_.resize(k * k, 0); size_.resize(k * k, 0)
    room_.resize(k * k, ROOM); more_.resize(k * k, 0); built_.resize(k, 0)
    cdef vector[move_t]* extra = extra_.data()
    cdef move_p* buf = buf_.data()
    cdef move_t* bound = bound_.data()
    cdef Py_ssize_t* head = head_.data()
    cdef Py_ssize_t* size = size_.data()
    cdef Py_ssize_t* room = room_.data()
    cdef char* more = more_.data()
    cdef char* built = built_.data()   # a column's buffers are filled when it is first scanned
    # Dijkstra over the columns
    cdef vector[num_t] d_
    cdef vector[Py_ssize_t] pred_col_, pred_item_
    cdef vector[char] done_
    d_.resize(k, 0); pred_col_.resize(k, -1); pred_item_.resize(k, -1); done_.resize(k, 0)
    cdef num_t* d = d_.data()
    cdef Py_ssize_t* pred_col = pred_col_.data()
    cdef Py_ssize_t* pred_item = pred_item_.data()
    cdef char* done = done_.data()

    while surplus > 0:
        # Dijkstra from all over-full columns at once to the nearest column with room.
        for j in range(k):
            done[j] = 0
            pred_col[j] = -1
            d[j] = 0 if count[j] > cap[j] else inf
        while True:
            # Settle the closest column; on ties one with room (it ends the search), then the
            # lowest index. Dense selection: k is small.
            a = -1
            for j in range(k):
                if not done[j] and d[j] < inf and (
                        a < 0 or d[j] < d[a]
                        or (d[j] == d[a] and count[j] < cap[j] and count[a] >= cap[a])):
                    a = j
            if a < 0:
                return -1
            done[a] = 1
            if count[a] < cap[a]:
                break
            if not built[a]:
                built[a] = 1
                arena_[a].resize(k * ROOM)
                for b in range(k):
                    buf[a * k + b] = arena_[a].data() + b * ROOM
                _fill(c, n, k, ld, col, a, 0, k, buf + a * k, head + a * k, size + a * k,
                      room + a * k, more + a * k, bound + a * k)
            for b in range(k):
                if done[b]:
                    continue
                ab = a * k + b
                while True:   # the cheapest move a -> b: drop items that left a, refill if dry
                    while head[ab] < size[ab] and col[buf[ab][head[ab]].second] != a:
                        head[ab] += 1
                    es = _drop_left(extra[ab], col, a)
                    if head[ab] < size[ab] or es or not more[ab]:
                        break
                    room[ab] *= 2
                    grown_[ab].resize(room[ab])
                    buf[ab] = grown_[ab].data()
                    _fill(c, n, k, ld, col, a, b, b + 1, buf + a * k, head + a * k,
                          size + a * k, room + a * k, more + a * k, bound + a * k)
                if head[ab] < size[ab] and (es == 0 or buf[ab][head[ab]] < extra[ab][0]):
                    move = buf[ab][head[ab]]
                elif es:
                    move = extra[ab][0]
                else:
                    continue
                cand = d[a] + move.first + pi[a] - pi[b]
                if cand < d[b]:
                    d[b] = cand
                    pred_col[b] = a
                    pred_item[b] = move.second
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
        count[a] += 1
        b = a
        while pred_col[b] >= 0:
            t = pred_col[b]
            x = pred_item[b]
            col[x] = b
            if built[b]:
                for j in range(k):
                    if j == b or c[x * ld + j] >= inf:
                        continue
                    ab = b * k + j
                    move.first, move.second = c[x * ld + j] - c[x * ld + b], x
                    if more[ab] and not move < bound[ab]:
                        continue   # no better than items left out: a refill will find it
                    es = extra[ab].size()
                    extra[ab].push_back(move)
                    push_heap(extra[ab].data(), extra[ab].data() + es + 1, greater[move_t]())
            b = t
        count[b] -= 1
        surplus -= 1
    return 0


def capacitated_assignment(cost, capacity):
    """Assign n items to k columns, column j taking exactly capacity[j] items, minimum total cost.

    cost: [n, k] matrix; +inf forbids a pair, but every row needs a finite entry.
    capacity: [k] non-negative integers summing to n.
    Returns col, int64 [n]: item i goes to column col[i] and sum(cost[i, col[i]]) is minimal.
    Exact (integer input stays in int64); ties go to the lowest index, so it is deterministic."""
    a = _as_cost(cost)
    n, k = a.shape
    cap = np.asarray(capacity)
    if cap.ndim != 1 or cap.shape[0] != k:
        raise ValueError(f"capacity must be 1-D with one entry per cost column ({k}), "
                         f"got shape {cap.shape}")
    if not (cap.dtype == np.bool_ or np.issubdtype(cap.dtype, np.integer)):
        whole = np.issubdtype(cap.dtype, np.floating) and np.all(np.isfinite(cap) & (cap % 1 == 0))
        if not whole:
            raise ValueError(f"capacity must hold whole numbers, got {cap.tolist()}")
    if (cap < 0).any():
        raise ValueError(f"capacity must be non-negative, got {cap.tolist()}")
    cap = cap.astype(np.int64)
    if int(cap.sum()) != n:
        raise ValueError(f"capacities sum to {int(cap.sum())} but cost has {n} rows (items); "
                         f"every item needs exactly one place")
    if a.dtype == np.float64 and n and not np.isfinite(a).all():
        stuck = np.flatnonzero(np.isinf(a).all(axis=1))
        if len(stuck):
            raise ValueError(f"row {int(stuck[0])} of cost has no finite entry: that item "
                             f"cannot go anywhere")
    col = np.zeros(n, dtype=np.int64)
    if n == 0:
        return col
    pi = np.zeros(k, dtype=a.dtype)   # column potentials, the dual solution
    cdef long long[::1] out = col, capv = np.ascontiguousarray(cap)
    cdef long long[:, ::1] ci
    cdef long long[::1] pii
    cdef double[:, ::1] cf
    cdef double[::1] pif
    cdef Py_ssize_t nn = n, kk = k
    cdef int status
    if a.dtype == np.int64:
        ci, pii = a, pi
        with nogil:
            status = _capacitated(&ci[0, 0], nn, kk, kk, &capv[0], &out[0], &pii[0])
    else:
        cf, pif = a, pi
        with nogil:
            status = _capacitated(&cf[0, 0], nn, kk, kk, &capv[0], &out[0], &pif[0])
    if status < 0:
        raise ValueError("cost matrix is infeasible: no assignment meets the capacities without "
                         "a forbidden (infinite) entry")
    return col
