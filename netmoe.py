"""netmoe: NetMoE (Liu et al., ICLR 2025) -- MoE training that re-places *samples*, not experts.

Expert parallelism sends every token to the devices of its top-K experts (scatter) and back
(gather). NetMoE lets the gather deliver each sample to a *new* device: the one whose node holds
most of that sample's experts, chosen by an exact two-stage assignment (Algorithm 1). The move
rides on the gather that happens anyway, every device keeps I/J samples, and the maths of
training is unchanged. This file, in data-flow order:

  1. topology and cost model    Topology, count_tokens (Eq. 2), node_counts, Routing (one
                                layer's routing as its exchange counts it; its reach, what
                                the cost model reads), placement_costs (Eq. 8), traffic
                                (Eq. 3-4), a2a_time (Eq. 1, chunked as built)
  2. the solver                 solve_placement (Algorithm 1's Solve, each stage in its own
                                size: _solve_nodes, _solve_devices, on km's exact solvers),
                                placements (PLACEMENTS by name), expert layouts, replays of
                                recorded routing, re-layout plans
  3. All-to-All                 Flight: an All-to-All started and waited on, forward and
                                backward; pipeline: chunks advanced in turn, hops in flight;
                                measure_links and best_chunks: how many chunks (--chunks auto)
  4. exchanges                  Exchange (in one process), ExpertExchange, NodeExchange: what a
                                scatter sends and how its gather returns it (EXCHANGES by name)
  5. the layer                  MoELayer (gate, Routings, solve, exchange.run, experts with
                                inlined residual, shared experts, group-limited routing)

It starts no processes and writes no files: the scripts (train_gpt.py, bench.py) make the
process group and hand it to the layers.

Notation follows the paper: I samples in the global batch, J devices = N nodes x G GPUs,
E experts, K experts per token, S tokens per sample, H hidden size, B = I / J samples per device.
"""
import collections
import dataclasses
import functools
import hashlib
import os
import time
import types
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import km

# ---------------------------------------------------------------------------------------------
# 1. Topology and cost model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
    """N nodes of G devices; device j sits on node j // G. Bandwidths in bytes/s (paper Table 2)."""
    nodes: int
    gpus_per_node: int
    intra_bw: float = 400e9   # NVLink inside a node
    inter_bw: float = 100e9   # InfiniBand between nodes
    intra_lat: float = 0.0    # alpha terms of Eq. 1, seconds
    inter_lat: float = 0.0
    overlap: float = 1.0      # the share of a transfer that can run beside other work (a cluster's
                              # NICs and copy engines: all; ranks sharing a few cores: little)
    streams: float = 1.0      # how many messages a link moves at once as fast as one (>= 1): one
                              # message fills NVLink or a NIC; gloo stages CUDA tensors through the
                              # host, and two messages in flight overlap one's copies with the other's

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Topology.{name} must be a positive integer, got {v!r}")
        if self.intra_bw <= 0 or self.inter_bw <= 0:
            raise ValueError("Topology bandwidths must be positive (bytes per second)")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"Topology.overlap is a share in [0, 1], got {self.overlap!r}")
        if not self.streams >= 1:
            raise ValueError(f"Topology.streams counts messages a link moves at once, at least 1, got {self.streams!r}")

    @classmethod
    def parse(cls, spec, **kw):
        """'4x8' -> 4 nodes of 8 devices."""
        try:
            n, g = (int(p) for p in str(spec).lower().split("x"))
        except ValueError:
            raise ValueError(f"topology {spec!r} is not of the form NODESxGPUS, e.g. '4x8'") from None
        return cls(n, g, **kw)

    @property
    def world(self):
        return self.nodes * self.gpus_per_node

    def node_of(self, device):
        return device // self.gpus_per_node

    def __str__(self):
        return f"{self.nodes}x{self.gpus_per_node}"


def _as_int_array(a, name, ndim):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers (token counts / ids), got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def count_tokens(route, num_experts):
    """Eq. 2: num[i, e] = number of (token, k) pairs of sample i routed to expert e.

    route: [I, S, K] expert ids (torch or numpy). Returns an int64 torch tensor [I, E] on route's
    device. This is the reference the CUDA kernel is tested against."""
    route = torch.as_tensor(route)
    if route.dim() != 3 or route.dtype.is_floating_point:
        raise ValueError(f"route must be an integer tensor [I, S, K], got {tuple(route.shape)} {route.dtype}")
    if route.numel() and (route.min() < 0 or route.max() >= num_experts):
        raise ValueError(f"route holds expert ids outside [0, {num_experts})")
    flat = route.reshape(route.shape[0], route.shape[1] * route.shape[2]).long()   # -1 fails for I = 0
    num = torch.zeros(route.shape[0], num_experts, dtype=torch.int64, device=route.device)
    return num.scatter_add_(1, flat, torch.ones_like(flat))


def node_counts(route, expert_node, nodes):
    """nc[i, n] = tokens of sample i with at least one of their K experts on node n (expert e on
    node expert_node[e]): the rows the node exchange sends to node n, one per (token, node).

    route: [I, S, K] expert ids; expert_node: [E] node ids. Returns an int64 torch tensor [I, N]
    on route's device. The reference of the CUDA kernel of the same name."""
    route = torch.as_tensor(route)
    expert_node = torch.as_tensor(expert_node, device=route.device)
    if route.dim() != 3 or route.dtype.is_floating_point:
        raise ValueError(f"route must be an integer tensor [I, S, K], got {tuple(route.shape)} {route.dtype}")
    if expert_node.dim() != 1 or expert_node.dtype.is_floating_point:
        raise ValueError(f"expert_node must be an integer tensor [E], got {tuple(expert_node.shape)} "
                         f"{expert_node.dtype}")
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    if route.numel() and (route.min() < 0 or route.max() >= len(expert_node)):
        raise ValueError(f"route holds expert ids outside [0, {len(expert_node)})")
    if expert_node.numel() and (expert_node.min() < 0 or expert_node.max() >= nodes):
        raise ValueError(f"expert_node holds node ids outside [0, {nodes})")
    hit = torch.zeros(route.shape[:2] + (nodes,), dtype=torch.bool, device=route.device)
    return hit.scatter_(2, expert_node.long()[route.long()], True).sum(1)


def _count_tokens(route, num_experts):
    """count_tokens of numpy routes, without its checks: [I, S, K] -> [I, E] (replays, the planner)."""
    I = route.shape[0]
    flat = (np.arange(I)[:, None] * num_experts + route.reshape(I, -1)).ravel()
    return np.bincount(flat, minlength=I * num_experts).reshape(I, num_experts)


def _node_counts(route, expert_node, nodes):
    """node_counts of numpy routes, without its checks: [I, S, K] -> [I, N] (the planner's, on the
    host): each token's K nodes sorted, a node counted where it first appears."""
    at = np.sort(expert_node[route], axis=2)
    first = np.ones(at.shape, dtype=bool)
    first[..., 1:] = at[..., 1:] != at[..., :-1]
    I = route.shape[0]
    slot = np.arange(I)[:, None, None] * nodes + at          # (sample, node) of each choice
    return np.bincount(slot[first], minlength=I * nodes).reshape(I, nodes)


# the same counts of routes on the host, in numpy (Routing.from_routes)
HOST_OPS = types.SimpleNamespace(count_tokens=_count_tokens, node_counts=_node_counts)


def dispatch_order(route, slot):
    """Scatter layout: the stable permutation of the B*S*K (token, k) pairs of route [B, S, K] that
    groups them by slot[expert] (device-major expert position). Stability keeps (b, s, k) order
    inside a group, which is what lets the receiver name every row from num alone."""
    return torch.argsort(slot[route.reshape(-1)], stable=True)


def gather_order(src, dest, num_samples):
    """Gather layout: the stable permutation of expert-side rows (row i from sample slot src[i])
    that orders them by (dest[src], src): grouped by destination device, then sample."""
    return torch.argsort(dest[src] * num_samples + src, stable=True)


def permute_rows(x, src):
    """Dispatch's copy: out[r] = x[src[r]], rows of x [T, C], src [R] in range (the kernel, which
    checks nothing on the device, writes a zero row for an id out of range)."""
    return x.index_select(0, src)


def topk_ids(scores, k, affine=None):
    """The ids of the k largest scores of each row [..., E], best first, ties to the lower id: a
    stable descending sort cut at k (the gate's choice; its kernel never picks a NaN). affine =
    (rstd, mean, u, c): of rstd (scores - mean u) + c instead, rstd and mean [...] a value a row,
    u and c [E], in scores' accumulation type (_acc), each step rounded on its own (the
    lookahead's folded LayerNorm and gate, MoELayer._predict; its kernel makes no pass of its own)."""
    scores = scores if affine is None else _affine(scores, affine)
    return scores.sort(dim=-1, descending=True, stable=True)[1][..., :k]


def _affine(scores, affine):
    """rstd (scores - mean u) + c of affine = (rstd, mean, u, c), in scores' accumulation type."""
    acc = _acc(scores.dtype)
    rstd, mean, u, c = (t.to(acc) for t in affine)
    return rstd[..., None] * (scores.to(acc) - mean[..., None] * u) + c


def _acc(dtype):
    """The dtype the row kernels accumulate in: float64 for float64 rows, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expert_of(ends, rows):
    """[rows] the expert of each row, rows of expert e being [ends[e - 1], ends[e])."""
    at = torch.arange(rows, device=ends.device)
    return torch.searchsorted(ends.long(), at, right=True).clamp_(max=max(len(ends) - 1, 0))


def _choices(rows, index, weight):
    """index with its out-of-range entries (-1: no row) at 0, and each entry's weight (0 there)."""
    valid = (index >= 0) & (index < rows.shape[0])
    acc = _acc(rows.dtype)
    w = valid.to(acc) if weight is None else weight.to(acc) * valid
    return torch.where(valid, index, 0), w, valid


def _token_order(t, perm, seq):
    """Rows of t [Q, C] in output order, perm [Q / seq] (output row q holds token
    perm[q // seq] * seq + q % seq), back in token order."""
    if perm is None:
        return t
    return t.view(len(perm), seq, -1)[torch.argsort(perm)].reshape(t.shape)


def combine(rows, index, weight=None, bias=None, ends=None, base=None, base_scale=None, perm=None, seq=1):
    """Combine, the gather's sum: for token t of index [Q, k] (its rows, -1 for none; no row is
    named twice: the backward writes each row's gradient once),
    out_t = base_scale[t] * base[t] + sum_j weight[t, j] * (rows[index[t, j]] + bias[e]), e the
    expert of that row (rows grouped by expert, ends [E] their ends); then the output in the
    order perm gives (row q holds token perm[q // seq] * seq + q % seq). Accumulated in float32
    (float64 rows: float64), returned in the rows' dtype. Every term is optional. Its kernel sums
    each output row's k rows in one warp: no atomics, every token's rows being known."""
    Q, C = index.shape[0], rows.shape[1]
    acc = _acc(rows.dtype)
    idx, w, _ = _choices(rows, index, weight)
    if rows.shape[0]:
        r = rows.to(acc)[idx]                                   # [Q, k, C]
        if bias is not None:
            r = r + bias.to(acc)[_expert_of(ends, rows.shape[0])[idx]]
        out = (w[..., None] * r).sum(1)
    else:
        out = torch.zeros(Q, C, dtype=acc, device=rows.device)
    if base is not None:
        out = out + base.to(acc) * (1 if base_scale is None else base_scale.to(acc)[:, None])
    if perm is not None:
        out = out.view(len(perm), seq, C)[perm].reshape(Q, C)
    return out.to(rows.dtype)


def combine_backward(grad, rows, index, weight, bias, ends, base_scale, perm, seq, need_base, need_weight, covered):
    """combine's backward for grad [Q, C] of its output: (grad_rows [R, C], grad_weight [Q, k]
    or None, grad_base [Q, C] or None). grad_weight sums its products each rounded to the rows'
    dtype, as autograd rounds those of a bf16 `weight * rows` (a product of bf16 values is exact
    in float32: the rounding is the one the torch ops this replaces make). covered: every row is
    named by exactly one entry of index (the kernel then writes grad_rows without zeroing it)."""
    acc, R = _acc(rows.dtype), rows.shape[0]
    g = _token_order(grad.to(acc), perm, seq)
    idx, w, valid = _choices(rows, index, weight)
    grad_rows = torch.zeros(R, rows.shape[1], dtype=acc, device=rows.device)
    grad_rows.index_put_((idx[valid],), (w[..., None] * g[:, None])[valid], accumulate=True)
    grad_weight = grad_base = None
    if need_weight:
        r = rows.to(acc)[idx] if R else torch.zeros(idx.shape + (rows.shape[1],), dtype=acc, device=rows.device)
        if bias is not None and R:
            r = r + bias.to(acc)[_expert_of(ends, R)[idx]]
        grad_weight = (r * g[:, None]).to(rows.dtype).to(acc).sum(-1) * valid
    if need_base:
        grad_base = (g if base_scale is None else g * base_scale.to(acc)[:, None]).to(rows.dtype)
    return grad_rows.to(rows.dtype), grad_weight, grad_base


def bias_gelu(pre, bias, ends):
    """The first product's epilogue: GELU(pre + bias[e]) of each row of pre [R, F], e its
    expert (ends [E]); in float32 (float64 rows: float64), returned in pre's dtype."""
    z = pre.to(_acc(pre.dtype)) + bias.to(_acc(pre.dtype))[_expert_of(ends, pre.shape[0])]
    return F.gelu(z).to(pre.dtype)


def bias_gelu_backward(grad, pre, bias, ends):
    """bias_gelu's backward: (grad_pre [R, F] in pre's dtype, grad_bias [E, F] in the
    accumulation dtype), grad_bias summing each expert's rows of grad_pre before its rounding."""
    acc = _acc(pre.dtype)
    expert = _expert_of(ends, pre.shape[0])
    z = pre.to(acc) + bias.to(acc)[expert]
    g = grad.to(acc) * (0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) / (2 * np.pi) ** 0.5)
    return g.to(pre.dtype), torch.zeros(len(ends), pre.shape[1], dtype=acc, device=pre.device).index_add_(0, expert, g)


def segment_sum(x, ends):
    """[E, C]: the sum of each expert's rows of x [R, C] (ends [E]), in the accumulation dtype:
    an output bias's gradient."""
    return torch.zeros(len(ends), x.shape[1], dtype=_acc(x.dtype), device=x.device).index_add_(
        0, _expert_of(ends, x.shape[0]), x.to(_acc(x.dtype)))


# kernels.cu's ops in plain torch, under the kernels' names: what each kernel is tested against
REFERENCE_OPS = types.SimpleNamespace(count_tokens=count_tokens, node_counts=node_counts,
                                      dispatch_order=dispatch_order, gather_order=gather_order,
                                      permute_rows=permute_rows, combine=combine, combine_backward=combine_backward,
                                      bias_gelu=bias_gelu, bias_gelu_backward=bias_gelu_backward,
                                      segment_sum=segment_sum, topk_ids=topk_ids)
_KERNELS = None


def hot_path(device):
    """REFERENCE_OPS' ops for tensors on `device`: the kernels of kernels.cu on CUDA (built on
    first use), else the torch references above. Same results (the row ops' to float rounding)."""
    global _KERNELS
    if torch.device(device).type != "cuda" or os.environ.get("NETMOE_NO_KERNELS") == "1":
        return REFERENCE_OPS
    if _KERNELS is None:
        _KERNELS = _load_kernels() or REFERENCE_OPS
    return _KERNELS


def _load_kernels(timeout=None):
    """Build (or reuse) kernels.cu; None, after one warning, where that cannot be done. torch
    waits forever on a build lock left by an interrupted build, so a lock held longer than
    `timeout` seconds (NETMOE_BUILD_LOCK_TIMEOUT, default 300; a build takes about a minute)
    counts as stale."""
    from torch.utils import cpp_extension
    name = "netmoe_kernels"
    timeout = float(os.environ.get("NETMOE_BUILD_LOCK_TIMEOUT", 300)) if timeout is None else timeout
    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
        deadline = time.monotonic() + timeout
        while os.path.exists(lock):
            if time.monotonic() > deadline:
                warnings.warn(f"netmoe: the kernels.cu build lock {lock} has been held for over {timeout:g} s "
                              f"(an interrupted build? delete it to rebuild); using torch references")
                return None
            time.sleep(0.2)
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
        return cpp_extension.load(name, [src], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:   # no nvcc, no kernels.cu, a failed build: fall back, say so once
        warnings.warn(f"netmoe: CUDA kernels unavailable ({type(e).__name__}: {e}); using torch references")
        return None


def default_expert_device(num_experts, world):
    """Contiguous blocks: expert e lives on device e // (E / J)."""
    return np.arange(num_experts) // (num_experts // world)


def _check_expert_device(expert_device, num_experts, world):
    if num_experts % world:
        raise ValueError(f"E={num_experts} experts cannot be split evenly over J={world} devices; "
                         f"use a multiple of {world} experts")
    if expert_device is None:
        return default_expert_device(num_experts, world)
    ed = _as_int_array(expert_device, "expert_device", 1)
    if ed.shape[0] != num_experts or ed.min() < 0 or ed.max() >= world \
            or np.any(np.bincount(ed, minlength=world) != num_experts // world):
        raise ValueError(f"expert_device must map each of E={num_experts} experts to a device in "
                         f"[0, {world}), E/J={num_experts // world} experts per device")
    return ed


def _device_tokens(num, topo, expert_device):
    """[I, J] tokens of each sample per device, [I, N] per node, [I] in all."""
    I, E = num.shape
    if not np.array_equal(expert_device, default_expert_device(E, topo.world)):
        num = num[:, np.argsort(expert_device, kind="stable")]   # group columns by device
    # strided slices, not reshape(...).sum(-1): numpy reduces a short last axis ~10x slower
    r, G = E // topo.world, topo.gpus_per_node
    per_dev = sum(num[:, i::r] for i in range(r))
    per_node = sum(per_dev[:, g::G] for g in range(G))
    return per_dev, per_node, per_node.sum(1)


def _check_num(num, topo, name="num"):
    if not isinstance(topo, Topology):
        raise ValueError(f"topo must be a netmoe.Topology, got {type(topo).__name__}")
    num = _as_int_array(num, name, 2)
    if num.size and num.min() < 0:
        raise ValueError(f"{name} holds negative token counts")
    return num


def exchange_class(exchange):
    """The exchange registered under this name in EXCHANGES (section 4): what it sends, and how
    the cost model counts it (one place for every exchange's name, here and in the scripts)."""
    try:
        return EXCHANGES[exchange]
    except (KeyError, TypeError):
        raise ValueError(f"exchange must be {' or '.join(map(repr, EXCHANGES))}, got {exchange!r}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Routing:
    """One layer's routing of the whole global batch as its exchange counts it (DeepEP's dispatch
    layout): rows in slot order (rank-major, or by sample id in replays), under the expert map
    expert_device on topo. Every split size of every All-to-All, and every cost Algorithm 1
    prices, follows from it and a placement. A layer holds one for itself and one for the
    lookahead's predicted next layer (under that layer's map) alike. Build one with
    Routing.of(counts) or Routing.from_routes(routes); the exchange says what it needs (layout).
    The solve and the cost model read only its reach, in the size of Algorithm 1's stages:
    Routing.of_reach holds that alone, as a rank can (no num, no expert map)."""
    num: np.ndarray            # [I, E] (token, k) pairs of sample i routed to expert e (Eq. 2)
    topo: Topology
    expert_device: np.ndarray  # [E] device of expert e
    exchange: type             # the exchange class whose rows these are (EXCHANGES)
    layout: dict = dataclasses.field(default_factory=dict)   # what else its exchange counts of the
                               # routes (the exchange's `layout` beyond num): {} for the expert exchange

    @classmethod
    def of(cls, num, topo, expert_device=None, exchange="expert", *, name="num", **layout):
        """A checked Routing from counts, and whatever else the exchange counts of the same routes
        under the same expert map (its `layout` beyond num, by name: the node exchange's
        node_count), which it checks (check_layout)."""
        num = _check_num(num, topo, name)
        ed = _check_expert_device(expert_device, num.shape[1], topo.world)
        ex = exchange_class(exchange)
        for key in layout:
            if key not in ex.layout_names:
                users = [c.name for c in EXCHANGES.values() if key in c.layout_names]
                raise ValueError(f"{key} is " + (f"only used by exchange={users[0]!r}" if users else
                                                 "not a count any exchange uses") + f", not by {ex.name!r}")
        return cls(num, topo, ed, ex, ex.check_layout(num, topo, ed, layout))

    @classmethod
    def counted(cls, counts, topo, expert_device, exchange):
        """The Routing of an exchange's `layout` output (num and the rest), unchecked."""
        return cls(counts["num"], topo, expert_device, exchange, {k: v for k, v in counts.items() if k != "num"})

    @classmethod
    def of_reach(cls, node, device, topo, exchange="expert"):
        """A checked Routing that holds only its reach (see there): node [I, N] and device
        [I, N, G] integer counts, or [I, G] where they do not depend on the node (the node
        exchange's). What the solve and the cost model read, without [I, E] counts."""
        ex = exchange_class(exchange)
        if not isinstance(topo, Topology):
            raise ValueError(f"topo must be a netmoe.Topology, got {type(topo).__name__}")
        node, device = np.asarray(node), np.asarray(device)   # any integer type: int32 is what the solve reads
        N, G = topo.nodes, topo.gpus_per_node
        if node.ndim != 2 or device.ndim not in (2, 3) or node.shape[1] != N or device.shape[0] != len(node) \
                or device.shape[-1] != G or (device.ndim == 3 and device.shape[1] != N):
            raise ValueError(f"node must be [I, N={N}] and device [I, N={N}, G={G}] (or [I, G]) for the same "
                             f"I samples, got {node.shape} and {device.shape}")
        for name, a in (("node", node), ("device", device)):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} must hold integers (token counts), got dtype {a.dtype}")
            if a.size and a.min() < 0:
                raise ValueError(f"{name} holds negative token counts")
        if device.ndim == 2:
            device = np.broadcast_to(device[:, None], (len(device), N, G))
        r = cls(None, topo, None, ex)
        r.__dict__["reach"] = Reach(node, device)   # the cached property's value, given
        return r

    @classmethod
    def from_routes(cls, route, topo, num_experts, expert_device=None, exchange="expert"):
        """The Routing of routes [I, S, K] (numpy or torch; counted on the host), with whatever
        counts the exchange needs (its `layout`)."""
        route = _as_int_array(route, "route", 3)
        if route.size and (route.min() < 0 or route.max() >= num_experts):
            raise ValueError(f"route holds expert ids outside [0, {num_experts})")
        ed = _check_expert_device(expert_device, num_experts, topo.world)
        ex = exchange_class(exchange)
        return cls.counted(ex.layout(route, ed, topo, num_experts, HOST_OPS), topo, ed, ex)

    @functools.cached_property
    def tokens(self):
        """_device_tokens: [I, J] per device, [I, N] per node, [I] in all."""
        return _device_tokens(self.num, self.topo, self.expert_device)

    @functools.cached_property
    def reach(self):
        """Reach(node [I, N], device [I, N, G]): the rows sample i sends to node n's devices, and
        of them those that stay on device (n, g) if the sample sits there (the exchange's reach).
        If it sits on (n, g), node.sum(1) - node[n] rows cross nodes (Eq. 8's c) and
        device[n].sum() - device[n, g] cross devices inside n (c_intra): every cost of
        Algorithm 1 and every volume of Eq. 3-4, in the size of its stages."""
        return self.exchange.reach(self.tokens, self.topo, **self.layout)

    @property
    def samples(self):
        """I, the samples of the global batch."""
        return len(self.reach.node) if self.num is None else len(self.num)

    @functools.cached_property
    def slot(self):
        """[E] device-major position of expert e: the order rows travel in."""
        slot = np.empty(len(self.expert_device), dtype=np.int64)
        slot[np.lexsort((np.arange(len(self.expert_device)), self.expert_device))] = np.arange(len(self.expert_device))
        return slot

    def by(self, order):
        """The same routing with its samples in `order` (rows permuted)."""
        if self.num is None:
            node, device = self.reach
            device = device[:, 0] if device.strides[1] == 0 else device   # the same on every node: [I, G]
            return Routing.of_reach(node[order], device[order], self.topo, self.exchange.name)
        return dataclasses.replace(self, num=self.num[order], layout={k: v[order] for k, v in self.layout.items()})


def routings(routes, topo, num_experts, layouts=None, exchange="expert"):
    """Routing.from_routes of every layer: routes[l] [I, S, K] under layouts[l] (default contiguous)."""
    layouts = [None] * len(routes) if layouts is None else layouts
    return [Routing.from_routes(r, topo, num_experts, lay, exchange) for r, lay in zip(routes, layouts)]


def _routing(num, topo, expert_device=None, name="num"):
    """num as a Routing: a Routing as it is (on the same topology), or [I, E] counts for the
    expert exchange (the cost model's public functions take either)."""
    if not isinstance(num, Routing):
        return Routing.of(num, topo, expert_device, name=name)
    if not isinstance(topo, Topology) or (num.topo.nodes, num.topo.gpus_per_node) != (topo.nodes, topo.gpus_per_node):
        raise ValueError(f"{name} is a Routing on {num.topo}, not on {topo}")
    if expert_device is not None and num.expert_device is not None \
            and not np.array_equal(np.asarray(expert_device), num.expert_device):
        raise ValueError(f"{name} is a Routing under its own expert map: build it with that expert_device")
    return num


# Algorithm 1's and Eq. 3-4's view of a Routing (Routing.reach)
Reach = collections.namedtuple("Reach", "node device")


def _expert_reach(tokens, topo):
    """Routing.reach of the expert exchange, one row per (token, expert) straight to the
    expert's device: node [I, N] the tokens with experts on node n, device [I, N, G] those with
    experts on device (n, g)."""
    per_dev, per_node, _ = tokens
    return Reach(per_node, per_dev.reshape(len(per_dev), topo.nodes, topo.gpus_per_node))


def _node_reach(tokens, topo, node_count):
    """Routing.reach of the node exchange (node_count [I, N]): one rail row per (token,
    node) it needs, then from (m, g) on every node m one NVLink row per (token, k) to the
    expert's device; a sample on rail g keeps on device only the rows of experts on (m, g), for
    every m: device [I, N, G] is the same for every node (a view)."""
    per_dev, G = tokens[0], topo.gpus_per_node
    rail = sum(per_dev[:, m * G:(m + 1) * G] for m in range(topo.nodes))
    return Reach(node_count, np.broadcast_to(rail[:, None], (len(rail), topo.nodes, G)))


def placement_costs(num, topo, expert_device=None):
    """Eq. 8. c[i, n]: rows of sample i that cross nodes if it sits on node n; c_intra[i, j]: rows
    that cross devices inside a node if it sits on device j. num: [I, E] counts (the expert
    exchange: tokens whose experts are NOT on node n, and on Node(j) but not on j), or a Routing
    of any exchange (the node exchange: one row per (token, node other than n) it needs, and the
    rows the NVLink hops move on every node, see _node_reach). Dense, for reading: the solve
    itself prices each stage in its own size (_node_costs, _device_costs)."""
    node, device = _routing(num, topo, expert_device).reach
    I = len(node)
    return node.sum(1)[:, None] - node, (device.sum(2)[:, :, None] - device).reshape(I, topo.world)


def _check_sample_device(sd, I, topo, name="sample_device"):
    sd = _as_int_array(sd, name, 1)
    if sd.shape[0] != I or (sd.size and (sd.min() < 0 or sd.max() >= topo.world)):
        raise ValueError(f"{name} must give each of I={I} samples a device in [0, {topo.world})")
    return sd


def traffic(num, sample_device, topo, expert_device=None):
    """Eq. 3-4: rows that stay on their device / cross devices inside a node / cross nodes, when
    sample i sits on sample_device[i]. Scatter and gather move the same rows. num: counts or a
    Routing; for the node exchange inter counts its rail rows, intra and local its NVLink rows
    (forwarding included)."""
    r = _routing(num, topo, expert_device)
    return _traffic(r.reach, _check_sample_device(sample_device, r.samples, topo), topo)


def _traffic(reach, sample_device, topo):
    (node, device), rows = reach, np.arange(len(sample_device))
    n, g = np.divmod(sample_device, topo.gpus_per_node)
    here = device[rows, n]                                   # [I, G]: what stays on each device of its node
    local = here[rows, g]
    return {"local": int(local.sum()), "intra": int((here.sum(1) - local).sum()),
            "inter": int((node.sum(1) - node[rows, n]).sum())}


def _hops(volume, topo, bytes_per_token, cls, chunks):
    """The hops one All-to-All of exchange class cls runs, as [(the link it holds, seconds of one
    chunk)]: Eq. 1's t_x = alpha_x + s_x / v_x per tier, with a chunk's share of the bytes and an
    alpha for each chunk's message (nothing to send costs nothing)."""
    def term(tokens, lat, bw):
        return lat + tokens * bytes_per_token / chunks / bw if tokens else 0.0
    intra = term(volume["intra"], topo.intra_lat, topo.intra_bw)
    inter = term(volume["inter"], topo.inter_lat, topo.inter_bw)
    if cls.hops_in_sequence:   # a rail hop and an NVLink hop, each on its own communicator
        return [("inter", inter), ("intra", intra)]
    return [("all", max(intra, inter))]   # one All-to-All over both tiers: the slower takes the time


def _pipelined(stages, chunks, overlap=1.0, streams=1.0):
    """Seconds for `chunks` equal chunks to flow through stages in order, stages [(resource,
    seconds of one chunk)]: one chunk's way through every stage (fill and drain) plus what the
    busiest resource adds for the other chunks, where the resources run side by side (overlap 1);
    where they cannot (overlap 0), every chunk's every stage in turn. Between the two, in that
    proportion. "compute" works on one chunk at a time; a link on p = min(C, streams) at once, as
    fast as on one, so its C chunks take C / p rounds."""
    par = {r: 1.0 if r == "compute" else min(chunks, streams) for r, _ in stages}
    load = {}
    for resource, t in stages:
        load[resource] = load.get(resource, 0.0) + t
    side_by_side = sum(t for _, t in stages) + max(((chunks / par[r] - 1) * t for r, t in load.items()), default=0.0)
    return overlap * side_by_side + (1 - overlap) * chunks * sum(t / par[r] for r, t in load.items())


def a2a_time(volume, topo, bytes_per_token, exchange="expert", chunks=1):
    """Eq. 1 of one All-to-All as the exchange runs it in `chunks` chunks, t_x = alpha_x + s_x / v_x
    per tier and chunk (s_x the cluster-wide bytes of tier x). The expert exchange is one
    All-to-All over both tiers on one communicator: C x max(t_intra, t_inter) of a chunk, the
    paper's max for C = 1 (chunking it only adds latency; it pays by overlapping the experts'
    compute). The node exchange's rail and NVLink hops hold communicators of their own, so chunk
    c's NVLink hop runs while chunk c + 1's rail hop is in flight: t_inter + t_intra for C = 1,
    towards max(t_inter, t_intra) as C grows, plus C alphas per tier."""
    return _pipelined(_hops(volume, topo, bytes_per_token, exchange_class(exchange), chunks), chunks, topo.overlap,
                      topo.streams)


# ---------------------------------------------------------------------------------------------
# 2. The solver: Algorithm 1's Solve
# ---------------------------------------------------------------------------------------------


def _assign(cost, groups, method):
    """Assign len(cost) items to `groups` columns, an equal share each, minimum summed cost."""
    n = cost.shape[0]
    if groups == 1:
        return np.zeros(n, dtype=np.int64)
    if method == "capacitated":   # a large problem's first fill on two cores (km.FILL_SPLIT)
        return km.capacitated_assignment(cost, np.full(groups, n // groups, dtype=np.int64),
                                         threads=min(2, os.cpu_count() or 1))
    # The paper's formulation: copy each column n/groups times into an n x n matrix, run KM
    # (ours, or scipy's as a benchmark baseline).
    if method == "scipy":
        from scipy.optimize import linear_sum_assignment
    else:
        linear_sum_assignment = km.linear_sum_assignment
    _, col = linear_sum_assignment(np.repeat(cost, n // groups, axis=1))
    return col // (n // groups)


def solve_placement(num, topo, num_next=None, expert_device=None, method="capacitated", expert_device_next=None):
    """Algorithm 1's Solve: the device each sample goes to in this layer's gather.

    Stage 1 puts I/N samples on every node, minimising the summed inter-node cost c (Eq. 8) of this
    gather plus, with lookahead, the next layer's predicted scatter. Stage 2 spreads each node's
    samples over its G devices, I/J each, minimising the summed intra-node cost c_intra. Both are
    exact (capacitated assignment; `method="km"` solves the paper's expanded I x I matrices,
    `method="scipy"` the same with scipy, for benchmarks). num and num_next: [I, E] counts (the
    expert exchange, under expert_device and expert_device_next), or Routings of one exchange,
    each under its own layer's expert map (the node exchange's needs routes: Routing.from_routes).
    Integer input and fixed tie-breaking make every rank compute the same dest."""
    r = _routing(num, topo, expert_device)
    I, J = r.samples, topo.world
    if I == 0 or I % J:
        raise ValueError(f"I={I} samples cannot be split over J={J} devices; "
                         f"use a global batch divisible by {J}")
    if method not in ("capacitated", "km", "scipy"):
        raise ValueError(f"method must be 'capacitated', 'km' or 'scipy', got {method!r}")
    nxt = None
    if num_next is not None:
        nxt = _routing(num_next, topo, r.expert_device if expert_device_next is None and not isinstance(num_next, Routing)
                       else expert_device_next, "num_next")
        if nxt.samples != I or (nxt.num is not None and r.num is not None and nxt.num.shape != r.num.shape):
            shape = lambda q: q.reach.node.shape if q.num is None else q.num.shape
            raise ValueError(f"num_next has shape {shape(nxt)}, num has {shape(r)}")
        if nxt.exchange is not r.exchange:
            raise ValueError(f"num_next must be counted for the {r.exchange.name} exchange as num is "
                             f"(a Routing of the next layer's routes, Routing.from_routes)")
    return _solve(r, nxt, method)


def _solve(routing, routing_next=None, method="capacitated"):
    """solve_placement without the checks, for callers that built valid Routings themselves: each
    stage priced in its own size from the Routings' reach, [I, N] for stage 1 and [I, G] (a node's
    own devices) for stage 2, never [I, J] or [I, E]."""
    routings = [routing] + ([routing_next] if routing_next is not None else [])
    topo = routing.topo
    node = _solve_nodes(_node_costs(routings), topo.nodes, method)
    # each node's samples together, ascending (node ids as int16: numpy sorts them by radix)
    order = np.argsort(node.astype(np.int16) if topo.nodes < 2 ** 15 else node, kind="stable")
    dest = np.empty(len(node), dtype=np.int64)
    dest[order] = node[order] * topo.gpus_per_node + _solve_devices(_device_costs(routings, order, node[order]),
                                                                    topo.nodes, method)
    return dest


def _solve_nodes(c, nodes, method="capacitated"):
    """Algorithm 1's stage 1: each sample's node, I/N samples a node, minimum summed c [I, N]
    (_node_costs: this gather's c plus, with lookahead, the next layer's scatter's)."""
    return _assign(c, nodes, method)


def _solve_devices(c_intra, nodes=1, method="capacitated"):
    """Algorithm 1's stage 2: each sample's device on its node. c_intra [M, G]: the costs of
    `nodes` nodes' samples on their node's G devices (_device_costs), in equal blocks of
    consecutive rows, one a node (a node's ranks pass their own node's alone); M / (nodes G)
    samples a device, minimum summed cost in every block. Returns the device's index on its node."""
    M, G = c_intra.shape
    if G == 1:
        return np.zeros(M, dtype=np.int64)
    if method == "capacitated":   # every node in one call, the GIL released throughout
        cap = np.full((nodes, G), M // (nodes * G), dtype=np.int64)
        if nodes < 2 or c_intra.size < SPLIT_ENTRIES or (os.cpu_count() or 1) < 2:
            return km.capacitated_assignments(c_intra, cap)
        # a large cluster's nodes in two halves, one a core: the blocks are independent
        half, rows = nodes // 2, M // nodes * (nodes // 2)
        other = _HALVES.submit(km.capacitated_assignments, c_intra[rows:], cap[half:])
        return np.concatenate([km.capacitated_assignments(c_intra[:rows], cap[:half]), other.result()])
    return np.concatenate([_assign(block, G, method) for block in np.split(c_intra, nodes)])


# Stage 2's nodes go to two cores where their costs hold at least this many entries (about 1 ms
# of solving; 128x8 at I = 16384 has 131072).
SPLIT_ENTRIES = 1 << 16
_HALVES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmoe-stage2")


def _stage_cost(parts):
    """-(sum of parts), int32 where it fits (what km reads fastest), else int64: a stage's cost up
    to a constant per sample. Every sample takes one place in a stage, so adding a constant to
    all of its costs moves no assignment: Eq. 8's c is the rows a sample sends less those that
    stay (on its node, on its device), and only the rows that stay need pricing."""
    if len(parts) == 2 and all(p.dtype == np.int32 for p in parts):   # the rank's counts: one pass in km
        c = km.negated_sum(*parts)
        if c is not None:
            return c
    big = sum(int(p.max()) for p in parts if p.size)
    dtype = np.int32 if big < 2 ** 31 else np.int64   # int64: no sum of counts overflows it
    c = np.negative(parts[0], dtype=dtype, casting="unsafe")
    for p in parts[1:]:
        np.subtract(c, p, out=c, casting="unsafe")
    return c


def _node_costs(routings):
    """Stage 1's cost [I, N]: Eq. 8's c of every routing summed (this gather's and the
    lookahead's next scatter's: the objective reads only the sum), up to a constant per sample:
    minus the rows each sample sends to node n."""
    return _stage_cost([r.reach.node for r in routings])


def _device_costs(routings, order, node):
    """Stage 2's cost [I, G]: Eq. 8's c_intra of every routing summed, for sample order[q] on the
    G devices of its node node[q] (row q), up to a constant per sample: minus the rows that stay
    on each device."""
    return _stage_cost([_on_own_node(r.reach.device, order, node) for r in routings])


def _on_own_node(device, order, node):
    """device[order, node] of a reach's device [I, N, G]: [I, G] (one take of rows, ~10x faster
    than numpy's fancy indexing of two axes; a view the same on every node takes no indexing by node)."""
    if device.strides[1] == 0:
        return np.take(device[:, 0], order, axis=0)
    return np.take(device.reshape(-1, device.shape[2]), order * device.shape[1] + node, axis=0)


def static_placement(I, J):
    """The baseline (FastMoE-style EP): sample slot p stays on device p // (I/J)."""
    return np.arange(I) // (I // J)


class Placement:
    """Where a layer's gather delivers each sample: dest [I], a device per sample (rows as the
    Routing's), from this layer's Routing and the lookahead's of the next layer. A class each,
    chosen once by name (PLACEMENTS), as exchanges are. The base class is static EP."""
    name = "static"
    solves = False          # runs Algorithm 1's Solve, overlapped with the scatter and the experts
    moves_samples = False   # its gathers may put samples elsewhere, so expert layouts change its volumes

    def __init__(self, lookahead=True):
        self.lookahead = lookahead and self.solves   # whether it prices the next layer's scatter

    def dest(self, routing, routing_next, here):
        """here[i]: the device sample i sits on now. Static EP (FastMoE-style): every sample goes
        back where it came from."""
        return here


class NetMoE(Placement):
    """The paper's: Algorithm 1's two exact stages, on this gather plus, with lookahead, the next
    layer's predicted scatter."""
    name = "netmoe"
    solves = moves_samples = True

    def dest(self, routing, routing_next, here):
        return _solve(routing, routing_next if self.lookahead else None)


class KeptInPlace(NetMoE):
    """All of NetMoE's work (counts, lookahead, solve), then every sample stays where it is: what
    NetMoE's bookkeeping costs beside static EP (benchmarks), with static EP's volumes."""
    name = "kept"
    moves_samples = False

    def dest(self, routing, routing_next, here):
        super().dest(routing, routing_next, here)
        return here


# every placement by the name the layer, the replays and the command lines know it by
PLACEMENTS = {cls.name: cls for cls in (Placement, NetMoE, KeptInPlace)}


def placement_class(placement):
    """The placement registered under this name in PLACEMENTS."""
    try:
        return PLACEMENTS[placement]
    except (KeyError, TypeError):
        raise ValueError(f"placement must be {' or '.join(map(repr, PLACEMENTS))}, got {placement!r}") from None


def _partition(A, groups):
    """Split the rows of affinity matrix A into `groups` equal groups with large within-group
    affinity: greedy growth from the strongest seed (km.grown_groups), then best-pair swaps
    while any swap gains."""
    E, group = len(A), km.grown_groups(A, groups)
    # Swap the pair of the greatest gain, S[a, g_b] + S[b, g_a] - S[a, g_a] - S[b, g_b] - 2 A[a, b],
    # while one gains (km.best_swap: one pass, no E x E temporaries). cost: 2 A, +inf on pairs in
    # one group (no swap), updated where a swap moves.
    twice = 2 * A
    cost = np.where(group[:, None] == group[None, :], np.inf, twice)
    for _ in range(4 * E):   # each swap strictly gains, so this ends; the bound only caps the time
        S = A @ np.eye(groups)[group]                     # S[x, g]: affinity of x to group g
        gain, a, b = km.best_swap(S, group, cost)
        if gain <= 1e-12:
            break
        group[a], group[b] = group[b], group[a]
        for x in (a, b):   # A need not be exactly symmetric: its row and its column
            cost[x] = np.where(group == group[x], np.inf, twice[x])
            cost[:, x] = np.where(group == group[x], np.inf, twice[:, x])
    return group


def expert_layout(nums, topo, current=None):
    """Balanced expert -> device maps (E/J experts a device), one per MoE layer, that put experts
    used by the same samples on the same node, then the same device: what NetMoE's two stages
    can exploit. nums: per layer, [M, E] per-sample expert counts of recent batches, the same M
    samples in the same row order in every layer (a single [M, E] array: one layer).
    current: the layouts in use (one per layer, or one array for one layer).

    Grouping: experts a, b attract by sum_i d_i[a] d_i[b], d_i = p_i - mean(p), p_i sample i's
    routing distribution: how much more than on average the samples that use a also use b.
    Centred, because uncentred the popular experts attract each other whether or not the same
    samples use them.
    Numbering: which group goes to which node matters across layers: a sample sits on one node
    for layer l's gather and layer l + 1's scatter, so layer l + 1's groups are numbered after the
    layer-l groups its samples use (max correlation, an assignment problem); likewise devices
    inside a node. The first layer's scatter leaves from where the data loader put the samples,
    which no numbering favours, so its groups are numbered to move the fewest experts from
    `current`."""
    single = not isinstance(nums, (list, tuple))
    nums = [_check_num(n, topo) for n in ([nums] if single else nums)]
    if not nums:
        raise ValueError("nums must hold the counts of at least one layer")
    if single and current is not None:
        current = [current]
    E, J, G = nums[0].shape[1], topo.world, topo.gpus_per_node
    if any(n.shape != nums[0].shape for n in nums):
        raise ValueError("nums must give every layer the same samples and experts")
    current = [_check_expert_device(c, E, J) for c in ([None] * len(nums) if current is None else list(current))]
    if len(current) != len(nums):
        raise ValueError(f"current must give one layout per layer ({len(nums)}), got {len(current)}")
    out = []
    for l, num in enumerate(nums):
        p = num / np.maximum(num.sum(1, keepdims=True), 1)
        d = p - p.mean(0) if len(p) else p   # no samples: no affinity, any balanced split
        A = d.T @ d
        np.fill_diagonal(A, 0.0)
        if l == 0:
            number = lambda group, k, prev: _match(group, prev(current[0]), k)
        else:
            prev_p = nums[l - 1] / np.maximum(nums[l - 1].sum(1, keepdims=True), 1)
            number = lambda group, k, prev: _align(group, d, prev_p, prev(out[-1]), k)
        node = number(_partition(A, topo.nodes), topo.nodes, topo.node_of)
        device = np.empty(E, dtype=np.int64)
        for n in range(topo.nodes):
            members = np.flatnonzero(node == n)
            sub = np.full(E, -1)
            sub[members] = _partition(A[np.ix_(members, members)], G)
            device[members] = n * G + number(sub, G, lambda ed: np.where(ed // G == n, ed - n * G, -1))[members]
        out.append(device)
    return out[0] if single else out


def _match(group, old, k):
    """Renumber groups 0..k-1 so that as many items as possible keep their old number (old
    outside 0..k-1 counts for nothing; so do items with group -1)."""
    inside = (old >= 0) & (old < k) & (group >= 0)
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (group[inside], old[inside]), 1)
    rows, cols = km.linear_sum_assignment(overlap, maximize=True)
    return np.where(group >= 0, cols[np.maximum(group, 0)], -1)


def _align(group, d, prev_p, prev_of, k):
    """Renumber groups 0..k-1 (items with group -1 aside) after the previous layer's: group g
    gets number m where the samples' extra use of g (d, centred) best correlates with their
    share of the previous layer's experts numbered m (prev_of[e] in 0..k-1, -1 elsewhere)."""
    if not len(d):   # no samples: nothing to align with
        return group
    mine = np.stack([d[:, group == g].sum(1) for g in range(k)], 1)
    theirs = np.stack([prev_p[:, prev_of == m].sum(1) for m in range(k)], 1)
    theirs = theirs - theirs.mean(0)
    rows, cols = km.linear_sum_assignment(mine.T @ theirs, maximize=True)
    return np.where(group >= 0, cols[np.maximum(group, 0)], -1)


def replay(layers, topo, bytes_per_token, nexts=None, placement="netmoe", chunks=1, expert_ms=None):
    """MoEStats of one batch through consecutive MoE layers: layers[l] is layer l's Routing (or
    [I, E] counts: the expert exchange, contiguous experts), rows by sample id; samples start
    where the data loader put them and follow each layer's gather. nexts[l]: what layer l's gather
    prices the next layer's scatter with (the predicted or true routing of layer l + 1, under its
    map; the last layer's is not read); None: no lookahead. routings() builds them from routes.
    chunks and expert_ms price the exchanges as layer_stats does; chunks="auto" prices each layer
    in the C best_chunks finds for it (its routing and placement beside expert_ms)."""
    policy = placement_class(placement)(lookahead=nexts is not None)
    layers = [_routing(r, topo, name="layers") for r in layers]
    L = len(layers)
    if not L or any(r.num.shape != layers[0].num.shape or r.exchange is not layers[0].exchange for r in layers):
        raise ValueError("layers must give every layer the same samples and experts, counted for one exchange")
    if nexts is not None:
        if len(nexts) not in (L, L - 1):
            raise ValueError(f"nexts must hold one routing per layer ({L}), or one fewer, got {len(nexts)}")
        nexts = [_routing(r, topo, name="nexts") for r in nexts[:L - 1]]
        if any(r.num.shape != layers[0].num.shape or r.exchange is not layers[0].exchange for r in nexts):
            raise ValueError(f"nexts must be [I, E] counts like layers, {layers[0].num.shape}, for the same exchange")
    cur, acc = static_placement(len(layers[0].num), topo.world), MoEStats()
    for l, r in enumerate(layers):
        dest = policy.dest(r, nexts[l] if nexts is not None and l + 1 < L else None, cur)
        C = best_chunks(r, cur, dest, bytes_per_token, expert_ms, max(CHUNK_CHOICES)) if chunks == "auto" else chunks
        acc += dataclasses.replace(_layer_stats(r, cur, dest, bytes_per_token, C, expert_ms), chunks={C: 1})
        cur = dest
    return acc


def plan_relayout(recent, current, topo, bytes_per_token, ms_per_expert, horizon, exchange="expert", routes=None,
                  chunks=1):
    """New expert layouts from each layer's recent batches (recent[layer][batch]: [M, E] counts,
    rows by sample id) and whether they pay: the modelled All-to-All saving per step times the
    `horizon` steps the new layouts will serve (a layout stays until a later plan replaces it, so
    to the end of the run), against moving the experts that change device at ms_per_expert each.
    The saving is priced for the exchange that runs. The node exchange's rows depend on the layout
    through each token's set of nodes, which counts cannot tell: it needs routes[layer][batch],
    [M, S, K] expert choices of the same batches. The saving is scored on batches a trial layout
    was not learned from (leave one out): a layout always fits the batches it was learned on
    better than the next ones; each batch's true next-layer routing stands in for the lookahead's
    prediction. chunks: the exchange's, as replay prices it."""
    cls = exchange_class(exchange)
    if cls.needs_routes and (routes is None or [len(r) for r in routes] != [len(r) for r in recent]):
        raise ValueError(f"exchange={exchange!r} prices layouts from routes: pass routes[layer][batch] for the "
                         f"batches recent counts")
    n, L, E = len(recent[0]), len(recent), recent[0][0].shape[1]
    stack = lambda ks: [np.concatenate([batches[k] for k in ks]) for batches in recent]
    layouts = expert_layout(stack(range(n)), topo, current=current)
    current = [_check_expert_device(ed, E, topo.world) for ed in current]
    saving_ms = 0.0
    for k in range(n):
        trial = expert_layout(stack([j for j in range(n) if j != k] or [k]), topo, current=current)

        def cost(lay):   # the next layer's true routing stands in for the lookahead's
            rs = [Routing.from_routes(routes[l][k], topo, E, lay[l], exchange) if cls.needs_routes
                  else Routing(recent[l][k], topo, lay[l], cls) for l in range(L)]
            return replay(rs, topo, bytes_per_token, rs[1:], chunks=chunks).a2a_model_ms
        saving_ms += (cost(current) - cost(trial)) / n
    moving = sum(int((new != cur).sum()) for cur, new in zip(current, layouts))
    cost_ms = moving * ms_per_expert
    return dict(layouts=layouts, moving=moving, saving_ms=saving_ms, cost_ms=cost_ms, horizon=horizon,
                apply=saving_ms * horizon > cost_ms)


# ---------------------------------------------------------------------------------------------
# 3. All-to-All with uneven splits; backward is the reverse exchange
# ---------------------------------------------------------------------------------------------


class _Timer:
    """Sums the time the layer waited for its All-to-Alls, forward and backward: on CPU the wall
    clock spent blocked in wait() (what the pipeline did not hide); on GPU, CUDA events from each
    one's start to the stream's wait for it (overlapped compute included: an upper bound)."""

    def __init__(self):
        self.events, self.seconds = [], 0.0

    def start(self, x):
        if x.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return None

    def wait(self, work, started):
        t = time.perf_counter()
        work.wait()
        if started is None:
            self.seconds += time.perf_counter() - t
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((started, end))

    def pop_ms(self):
        if self.events:
            torch.cuda.synchronize()
        ms = self.seconds * 1e3 + sum(s.elapsed_time(e) for s, e in self.events)
        self.events, self.seconds = [], 0.0
        return ms


def _start_all_to_all(x, send, recv, group):
    """all_to_all_single of rows x[sum(send)] -> [sum(recv)], started: (the receive buffer, the work)."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    return out, dist.all_to_all_single(out, x.contiguous(), recv, send, group=group, async_op=True)


def _all_to_all(x, send, recv, group):
    out, work = _start_all_to_all(x, send, recv, group)
    work.wait()
    return out


class Flight:
    """One hop's All-to-All in flight, Megatron's communication phase and DeepEP's event in one:
    Flight(rows, send, recv, group, timer) starts sending send[j] rows to rank j (recv[j] arrive
    from rank j); wait() gives the rows received. Both ends are autograd functions: in backward,
    wait()'s end starts the reverse exchange of the gradient and the start's end waits for it, so
    backward overlaps the same way forward does. On CUDA, NCCL runs it on its own stream and
    wait() orders the caller's stream after it: no host sync."""

    def __init__(self, rows, send, recv, group, timer):
        self.send, self.recv, self.group, self.timer = send, recv, group, timer
        self.back = None
        self.sent = _Sent.apply(rows, self)

    def wait(self):
        # the flight lets go of every tensor and work it held once they are done with, so no
        # reference cycle through the autograd graph keeps the process group alive
        sent, self.sent = self.sent, None
        return _Arrived.apply(sent, self)


class _Sent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, flight):
        flight.started = flight.timer.start(rows)
        out, flight.work = _start_all_to_all(rows, flight.send, flight.recv, flight.group)
        ctx.flight = flight
        return out

    @staticmethod
    def backward(ctx, _):
        f = ctx.flight   # _Arrived's backward, the only consumer of this one's output, ran first
        (out, work, started), f.back = f.back, None
        f.timer.wait(work, started)
        return out, None


class _Arrived(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, flight):
        flight.timer.wait(flight.work, flight.started)
        flight.work = None
        ctx.flight = flight
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        f.back = (*_start_all_to_all(grad, f.recv, f.send, f.group), f.timer.start(grad))
        return grad, None


def _finish(steps):
    """Runs one chunk's steps to the end: its result."""
    return pipeline([steps])[0]


def pipeline(chunks):
    """Runs every chunk's steps (generators that yield right after starting a hop and return
    their result) in turn, one step each, until all are done: while one chunk waits on a hop or
    computes, the hops the others started are in flight. Every rank starts the same hops in the
    same order, which collectives need. Returns the chunks' results."""
    results, live = [None] * len(chunks), dict(enumerate(chunks))
    while live:
        for c in list(live):
            try:
                next(live[c])
            except StopIteration as done:
                results[c] = done.value
                del live[c]
    return results


CHUNK_CHOICES = (1, 2, 4, 8)   # what --chunks auto picks from
_LINKS = {}


def _measured_links(topo, group, device):
    """measure_links, once per process's ranks, topology and device type: every layer of a model
    shares it. (Keyed by ranks, not the group: a group held here would outlive its destruction,
    and its threads the process.)"""
    key = (tuple(dist.get_process_group_ranks(group or dist.group.WORLD)), str(topo), torch.device(device).type)
    if key not in _LINKS:
        _LINKS[key] = measure_links(topo, group, device)
    return _LINKS[key]


class _Stopwatch:
    """Times the calls made through it, fn(*args) as _Stopwatch()(fn, *args); pop_ms() gives their
    time since the last pop: on a GPU, CUDA events read once done (a layer reads its last call's)."""

    def __init__(self):
        self.spans, self.seconds = [], 0.0

    def __call__(self, fn, x, *args):
        if not x.is_cuda:
            t = time.perf_counter()
            out = fn(x, *args)
            self.seconds += time.perf_counter() - t
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x, *args)
        end.record()
        self.spans.append((start, end))
        return out

    def pop_ms(self):
        for _, end in self.spans:
            end.synchronize()
        ms = self.seconds * 1e3 + sum(s.elapsed_time(e) for s, e in self.spans)
        self.spans, self.seconds = [], 0.0
        return ms


def measure_links(topo, group=None, device="cpu", sizes=(256, 4 << 20), repeats=5):
    """Eq. 1's alpha and bandwidth of each tier as they are on `group` (a short probe, a collective
    every rank calls): each rank sends n bytes to every peer of the tier in one All-to-All (intra:
    the devices of its node; inter: its rail peers, the same local index on other nodes), for n in
    `sizes`, the median of `repeats` after a warm call. alpha is the small one's time, the
    bandwidth the cluster-wide bytes the large one adds over the time it adds, as Eq. 1 counts
    them. The slowest rank's times count (all-reduced), so every rank gets the same Topology. A
    tier without peers (one node: no rail) keeps topo's values, and a bandwidth the large message
    could not tell from alpha (no slower than the small one: noise) keeps topo's bandwidth.
    overlap: how much of the large transfer ran hidden beside matrix products of about its length
    (started, products, waited; against each alone), the least of any rank's: near 1 where the
    links move bytes on their own (NCCL, NICs), near 0 where transfer and compute share the
    cores (gloo on a few CPU cores). streams: how much faster the same large transfer went as two
    messages at once (two half-size All-to-Alls started together), between 1 and 2, the least of
    any rank's: 1 where one message fills the link (NCCL), more where a backend moves two messages'
    steps side by side (gloo with CUDA tensors, each through the host). Probed on CUDA tensors
    only: CPU tensors have no staging to overlap, and on a few shared cores two gloo messages can
    time faster than one while chunks still cost the step more (the main job: C = 2 was 19% slower)."""
    J, rank, G = topo.world, dist.get_rank(group), topo.gpus_per_node
    ranks = np.arange(J)
    same = topo.node_of(ranks) == topo.node_of(rank)
    peers = dict(intra=same & (ranks != rank), inter=~same & (ranks % G == rank % G))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(fn, reps=repeats):   # the median of reps after a warm call, seconds
        ts = []
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts[1:]))
    times, probe = [], None
    for tier in ("intra", "inter"):
        for n in sizes:
            split = np.where(peers[tier], n, 0).tolist()
            x = torch.randint(0, 256, (sum(split),), dtype=torch.uint8, device=device)
            times.append(timed(lambda: _all_to_all(x, split, split, group)))
            if peers[tier].any() and probe is None and n == sizes[-1]:
                probe = x, split, times[-1]
    x, split, alone = probe if probe is not None else (None, None, 0.0)
    a = torch.randn(256, 256, device=device)
    each = timed(lambda: [a @ a for _ in range(8)], 2) / 8
    k = int(min(max(alone / max(each, 1e-9), 1), 10000))
    products = lambda: [a @ a for _ in range(k)]

    def beside():
        _, work = _start_all_to_all(x, split, split, group)
        products()
        work.wait()
    def two():   # the same bytes as two messages in flight at once
        half = [v // 2 for v in split]
        m = sum(half)
        works = [_start_all_to_all(x[i * m:(i + 1) * m], half, half, group)[1] for i in (0, 1)]
        for work in works:
            work.wait()
    compute = timed(products)
    hidden = (alone + compute - timed(beside)) / max(min(alone, compute), 1e-9) if probe is not None else 1.0
    through_host = torch.device(device).type == "cuda"   # gloo stages CUDA tensors through the host
    streams = alone / max(timed(two), 1e-9) if probe is not None and through_host else 1.0
    t = torch.tensor(times + [-min(max(hidden, 0.0), 1.0), -min(max(streams, 1.0), 2.0)], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    links = dict(overlap=-float(t[-2]), streams=-float(t[-1]))
    for tier, (small, big) in zip(("intra", "inter"), t[:-2].view(2, 2).tolist()):
        if peers[tier].any():
            links[f"{tier}_lat"] = small
            if big > small:
                links[f"{tier}_bw"] = J * int(peers[tier].sum()) * (sizes[1] - sizes[0]) / (big - small)
    return dataclasses.replace(topo, **links)


def best_chunks(routing, cur, dest, bytes_per_token, expert_ms, positions, links=None):
    """The C of CHUNK_CHOICES (at most `positions`, the tokens a sample has) in which Eq. 1 as
    built on `links` (default: the routing's topology) leaves the least All-to-All time exposed
    beside expert_ms of the experts' compute (forward and backward), for a layer routed as
    `routing` whose samples go from cur to dest: the smallest C of equals. Without compute to hide
    behind, the expert exchange's chunks only add alphas (C = 1); the node exchange's overlap its
    rail hop with its NVLink hop."""
    topo = routing.topo
    return _fewest_exposed(_traffic(routing.reach, cur, topo), _traffic(routing.reach, dest, topo), routing.exchange,
                           topo, cur, dest, bytes_per_token, expert_ms, positions, links)


def _fewest_exposed(scatter, gather, exchange, topo, cur, dest, bytes_per_token, expert_ms, positions, links=None):
    """best_chunks of a layer whose scatter and gather move these volumes."""
    exposed = {}
    for C in CHUNK_CHOICES:
        if C <= positions:
            s = _priced(scatter, gather, exchange, topo, cur, dest, bytes_per_token, C, expert_ms, links)
            exposed[C] = s.a2a_model_ms - s.a2a_hidden_ms
    return min(exposed, key=lambda C: (exposed[C], C))


class ChunkTrial:
    """chunks="auto" where ranks probed their links: Eq. 1 on those links proposes a C from the
    layer's first call; the next calls then run in turn in one chunk, in that C and in its
    neighbours in CHUNK_CHOICES (at most `positions`), ROUNDS times each, timing their forward and
    their backward; the C whose best call was fastest on the slowest rank (ties: fewer chunks) is
    kept for good. Eq. 1 prices a chunk as alpha + bytes / bandwidth on links that move bytes on
    their own; gloo staging CUDA tensors through the host, two hops on their own communicators and
    ranks sharing cores move bytes otherwise, so the clock decides between the model's choice and
    its neighbours. `reduce` takes each candidate's ms on this rank and gives the slowest rank's
    (an all-reduce: every rank calls next() at the same call)."""
    ROUNDS = 2

    def __init__(self, proposed, positions, reduce=lambda ms: ms):
        i = CHUNK_CHOICES.index(proposed)
        near = {1, *CHUNK_CHOICES[max(i - 1, 0):i + 2]}
        self.proposed, self.reduce = proposed, reduce
        self.candidates = sorted(C for C in near if C <= max(positions, 1))
        self.calls = []   # [C, ms] of each timed call; its backward's ms are added once it has run
        self.chosen = None if len(self.candidates) > 1 else self.candidates[0]
        self.slowest = {}   # each candidate's best call on the slowest rank, once decided

    @property
    def settled(self):
        return self.chosen is not None

    @property
    def ms(self):
        return {C: [ms for c, ms in self.calls if c == C] for C in self.candidates}

    def next(self):
        """The C the next call runs in: the candidates in turn, then the one kept (decided at the
        call after the last timed one, once that one's backward has run)."""
        if self.chosen is None:
            if len(self.calls) < self.ROUNDS * len(self.candidates):
                return self.candidates[len(self.calls) % len(self.candidates)]
            self.slowest = dict(zip(self.candidates, self.reduce([min(v) for v in self.ms.values()])))
            self.chosen = min(self.candidates, key=lambda C: (self.slowest[C], C))
        return self.chosen

    def timed(self, chunks, ms):
        """A call in `chunks` chunks took ms: its entry, for its backward to add to."""
        self.calls.append([chunks, ms])
        return self.calls[-1]

    def record_of(self):
        """What a run's record keeps of it: Eq. 1's proposal, the C kept and the times behind it."""
        return dict(proposed=self.proposed, candidates=self.candidates, kept=self.chosen,
                    call_ms={str(C): ms for C, ms in self.slowest.items()})


def _time_backward(out, x, call):
    """Adds to call[1] the ms from the gradient reaching out to its reaching x: the layer's own
    backward, where out and x need gradients (else its forward alone counts)."""
    if not (out.requires_grad and x.requires_grad):
        return
    began, hooks = [], []

    def end(g):   # x may be reused: its hook goes once it has counted this call's backward
        if began:
            call[1] += (_synced(g) - began[0]) * 1e3
            for h in hooks:
                h.remove()
    hooks += [out.register_hook(lambda g: began.append(_synced(g))), x.register_hook(end)]


# ---------------------------------------------------------------------------------------------
# 4. Exchanges: how a layer's (token, expert) rows reach the experts and come back
# ---------------------------------------------------------------------------------------------


def _to(a, device):
    """A host array on `device`; on CUDA copied from pinned memory without waiting (a copy from
    pageable memory first waits for every kernel queued before it, idling the GPU after)."""
    t = torch.as_tensor(a)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def _inverse(order, rows=None):
    """inv[order[i]] = i, and -1 where order names no entry (rows: the entries, default len(order))."""
    n = len(order) if rows is None else rows
    inv = torch.full((n,), -1, dtype=torch.int64, device=order.device) if n != len(order) else torch.empty_like(order)
    return inv.index_put_((order,), torch.arange(len(order), device=order.device))


class _Permute(torch.autograd.Function):
    """Dispatch: rows[r] = x[src[r]]; inv [T, k] names the rows each row of x went to (-1: none),
    so backward sums them back into x's row by row (combine), with no atomics."""

    @staticmethod
    def forward(ctx, x, src, inv):
        ctx.ops = hot_path(x.device)
        ctx.save_for_backward(inv)
        return ctx.ops.permute_rows(x, src)

    @staticmethod
    def backward(ctx, grad):
        inv, = ctx.saved_tensors
        return ctx.ops.combine(grad, inv, None, None, None, None, None, None, 1), None, None


def permute(x, src, inv):
    """rows x[src] of x [T, C], the gradient summed back through inv (see _Permute)."""
    return _Permute.apply(x, src, inv)


class _Combine(torch.autograd.Function):
    """netmoe.combine with its gradients (rows, weight, bias, base); see combine."""

    @staticmethod
    def forward(ctx, rows, weight, bias, base, index, ends, base_scale, perm, seq, covered):
        ctx.ops, ctx.seq, ctx.covered, ctx.has_base = hot_path(rows.device), seq, covered, base is not None
        ctx.save_for_backward(rows, weight, bias, index, ends, base_scale, perm)
        return ctx.ops.combine(rows, index, weight, bias, ends, base, base_scale, perm, seq)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, bias, index, ends, base_scale, perm = ctx.saved_tensors
        need_weight, need_base = weight is not None and ctx.needs_input_grad[1], ctx.has_base and ctx.needs_input_grad[3]
        g_rows, g_weight, g_base = ctx.ops.combine_backward(grad, rows, index, weight, bias, ends, base_scale, perm,
                                                            ctx.seq, need_base, need_weight, ctx.covered)
        g_bias = ctx.ops.segment_sum(g_rows, ends).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] \
            else None
        return (g_rows, g_weight if need_weight else None, g_bias, g_base if need_base else None) + (None,) * 6


def combine_rows(rows, index, weight=None, bias=None, ends=None, base=None, base_scale=None, perm=None, seq=1,
                 covered=False):
    """combine (the kernel on CUDA) with autograd through rows, weight, bias and base. weight and
    base_scale are taken in the accumulation dtype, bias and base in the rows'. The kernel reads
    rows and base with any row stride, weight and base_scale packed (a gate weight received beside
    its row is a strided column)."""
    acc = _acc(rows.dtype)
    cast = lambda t, dtype: None if t is None else t.to(dtype)
    packed = lambda t: None if t is None else t.to(acc).contiguous()
    return _Combine.apply(rows, packed(weight), cast(bias, rows.dtype), cast(base, rows.dtype), index, ends,
                          packed(base_scale), perm, seq, covered)


class _BiasGelu(torch.autograd.Function):
    """bias_gelu with its gradients: one pass each way, the bias's gradient summed in backward's."""

    @staticmethod
    def forward(ctx, pre, bias, ends):
        ctx.ops = hot_path(pre.device)
        ctx.save_for_backward(pre, bias, ends)
        return ctx.ops.bias_gelu(pre, bias, ends)

    @staticmethod
    def backward(ctx, grad):
        pre, bias, ends = ctx.saved_tensors
        g_pre, g_bias = ctx.ops.bias_gelu_backward(grad, pre, bias, ends)
        return g_pre, g_bias.to(bias.dtype), None


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """What a scatter returns and its gather takes back: the rows on the experts' side, and what
    it takes to send each one back."""
    rows: torch.Tensor         # [R, H] rows of x
    gate: torch.Tensor         # [R] the gate weight of each row's (token, expert)
    expert: torch.Tensor       # [R] the local expert of each row
    counts: torch.Tensor       # rows per local expert, on the rows' device
    src: torch.Tensor          # [R] the sample slot each row's token came from
    pos: torch.Tensor          # [R] s * K + k: the row's token position s and choice k
    shape: tuple               # (B, S, H) of the scattered x
    top_k: int
    routing: "Held"
    sent: list                 # per hop, the rows this rank sent each rank: where a sample stays,
                               # what comes back to it (the hops in reverse)


@dataclasses.dataclass(eq=False)
class Held:
    """What one rank holds of a layer's routing where ranks run it: of every sample of the global
    batch only what this rank's hops need, O(I G + J) integers, never [I, E] (the layer gathers
    them, see MoELayer._held). col [I]: the rows of each sample that this device's experts take;
    block [I, G]: those that each device of this rank's node takes (col is one of its columns);
    nc [I]: the tokens of each sample that this node needs (the node exchange's node_count
    column; zeros for the expert exchange); sends [J]: the rows of this rank's own samples for
    each device, and need [N]: their tokens each node needs. chunks: ((a, b), Held) of the
    positions [a, b), as Routing's."""
    topo: Topology
    expert_device: np.ndarray
    slot: np.ndarray
    rank: int
    block: np.ndarray
    sends: np.ndarray
    nc: np.ndarray = None
    need: np.ndarray = None
    chunks: tuple = ()

    @property
    def col(self):
        return self.block[:, self.rank % self.topo.gpus_per_node]


def _new_slots(dest):
    """[I] each sample's slot on its new device: its rank among the samples dest sends there."""
    order = np.argsort(dest, kind="stable")
    slots = np.empty(len(dest), dtype=np.int64)
    slots[order] = np.arange(len(dest)) - np.searchsorted(dest[order], dest[order])
    return slots


@dataclasses.dataclass(frozen=True)
class LocalRouting:
    """What the exchange in one process needs of a layer's Routing: the experts' slots (the expert
    map's order) and each expert's rows in slot order, a tensor on the rows' device (no host sync)."""
    slot: np.ndarray
    counts: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ExpertSide:
    """What an exchange is handed of a layer's experts: norm (its LayerNorm, rows -> rows), ffn
    (its Experts: rows of LN(x) grouped by expert -> (f, bias, ends)), shared (rows of LN(x) ->
    the shared experts' summed FFN; None without them), and h = LN(x) of the layer's own rows as
    its gate computed it (in one process the rows of h travel, not those of x)."""
    norm: object
    ffn: object
    shared: object = None
    h: torch.Tensor = None


def _with_ints(rows, *ints, short=None):
    """rows [R, C] with int32 columns appended, their bits held in rows' dtype (one int32 in two
    bfloat16 columns, or one float32; float64 rows hold them in pairs), and a `short` column of
    values in [0, 2^16) after them (one bfloat16 column; widened to an int32 in wider rows):
    sample slots, token positions and expert ids travel exactly in rows of any dtype, in the same
    All-to-All as the rows."""
    wide = short is not None and rows.element_size() > 2
    ints = torch.stack([i.to(torch.int32) for i in ints + ((short,) if wide else ())], 1)
    if rows.element_size() > 4 and ints.shape[1] % 2:
        ints = F.pad(ints, (0, 1))
    parts = [rows, ints.view(rows.dtype)]
    if short is not None and not wide:
        parts.append(short.to(torch.int32).to(torch.int16)[:, None].view(rows.dtype))   # its low 16 bits
    return torch.cat(parts, 1)


def _ints(cols, n):
    """The n int32 columns _with_ints appended, from the columns after the rows: [R, n] int64."""
    width = -(-4 * n // cols.element_size())   # the columns that hold them
    return cols[:, :width].clone(memory_format=torch.contiguous_format).view(torch.int32)[:, :n].long()   # fresh strides


def _short(cols, n):
    """The `short` column _with_ints appended after n int32 columns (cols: the columns after the
    rows): [R] int64 in [0, 2^16)."""
    if cols.element_size() > 2:
        return _ints(cols, n + 1)[:, n]
    return cols[:, 2 * n:2 * n + 1].clone().view(torch.int16)[:, 0].long() & 0xFFFF


def _meta_bytes(n, dtype, short=False):
    """Bytes of n int32 columns (and a short one) appended by _with_ints to rows of dtype."""
    if short and dtype.itemsize == 2:
        return 4 * n + 2
    per = max(dtype.itemsize, 4)
    return -(-4 * (n + short) // per) * per


class Exchange:
    """In one process, all E experts here (virtual_world, or a world of one): the scatter is a
    reordering of the (token, k) rows by expert, the gather adds each token's K rows into its
    sample's new slot, device-major, as J devices would. The base of the expert-parallel
    exchanges, and their interface, torchtitan's and Megatron's dispatchers' shape:
    run(x, g, route, routing, experts, solve) -> (out [B, S, H], keep, dest) takes a layer's rows
    to the experts, has `experts` compute them, and brings them back to the placement that
    solve.result() gives, keep[q] the old slot of the sample now in slot q. It is built of
    scatter(x, g, route, routing) -> Dispatch and gather(y, dispatch, dest) -> (out, keep); how
    an exchange's hops overlap with each other and with the experts is its own business, not the
    layer's. Plain objects, not modules: they hold no weights. `priced` is the exchange whose rows
    the cost model counts and whose Routing the layer builds: its own class, or in one process
    the exchange it stands for."""

    def __init__(self, topo, rank=0, group=None, debug=False, priced=None):
        self.topo, self.J, self.rank, self.group, self.debug = topo, topo.world, rank, group, debug
        self.priced = priced or type(self)
        self.timer = _Timer()
        # debug: rows this rank's forward All-to-Alls sent per tier, read from their split sizes,
        # and the bytes they sent to other devices
        self.sent = {phase: dict(local=0, intra=0, inter=0) for phase in ("scatter", "gather")}
        self.sent_bytes = dict(scatter=0, gather=0)

    def run(self, x, g, route, routing, experts, solve):
        """In one process nothing travels, so the layer runs in one piece, fused: one permute puts
        the (token, k) rows of LN(x) (the gate's, `experts.h`) in expert order, the experts compute,
        and one combine sums each token's K rows times their gate weights, adds the output bias,
        the residual and the shared experts, and writes the token into its sample's new slot."""
        (B, S, H), K = x.shape, route.shape[-1]
        T, dev = B * S, x.device
        order = hot_path(dev).dispatch_order(route, _to(routing.slot, dev))
        inv = _inverse(order).view(T, K)
        h = experts.h.reshape(T, H)
        f, bias, ends = experts.ffn(permute(h, order // K, inv), routing.counts)
        base = x.reshape(T, H) if experts.shared is None else x.reshape(T, H) + experts.shared(h)
        dest = solve.result()
        keep = np.argsort(dest, kind="stable")   # new slot q holds old slot keep[q]
        perm = None if np.array_equal(keep, np.arange(B)) else _to(keep, dev)
        out = combine_rows(f.to(x.dtype), inv, g.reshape(T, K), bias, ends, base, perm=perm, seq=S, covered=True)
        return out.view(B, S, H), keep, dest

    def local_experts(self, routing):
        """The experts this rank holds, in slot order (all E in one process)."""
        return np.argsort(routing.slot, kind="stable")


class ExpertExchange(Exchange):
    """The paper's exchange, one rank per device: each (token, expert) row goes straight to the
    expert's device and back. Each row names its sample, position and expert (int32 p*S + s and
    a 16-bit e*K + k beside x and the gate weight), so a receiver needs only how many rows come
    from each rank, never every rank's counts; on the way back, its new slot and position."""
    name = "expert"
    needs_routes = False        # num counts its rows
    layout_names = ()           # what its layout counts beyond num
    hops_in_sequence = False    # one All-to-All: Eq. 1 takes the slower tier
    reach = staticmethod(_expert_reach)

    @staticmethod
    def own_reach(counts, per_dev):
        """Routing.reach of a rank's own samples, from its layout's counts and rows per device
        [B, N, G], on their device: (node [B, N], device [B, N, G])."""
        return per_dev.sum(2), per_dev

    @staticmethod
    def layout(route, expert_device, topo, num_experts, ops):
        """What this exchange's Routing holds, from routes [I, S, K] (DeepEP's get_dispatch_layout),
        with ops' counts (the kernels, their torch references, or HOST_OPS): num."""
        return dict(num=ops.count_tokens(route, num_experts))

    @staticmethod
    def check_layout(num, topo, expert_device, layout):
        """Routing.of's check of the counts beyond num (layout_names) given with num: the checked dict."""
        return {}

    def run(self, x, g, route, held, experts, solve):
        """The layer's rows in chunks (held.chunks: positions [a, b) of every sample and what this
        rank holds of their routing), pipelined (Tutel's and Megatron's overlap): chunk c + 1's
        scatter is in flight while chunk c's experts compute, chunk c's gather while chunk c + 1
        computes, and in backward the same; every chunk's gather waits for the placement (and the
        rows each rank sends back, solve.recv). One chunk: as plain EP."""
        def chunk(c, a, b, h):
            d = yield from self._scatter(x[:, a:b], g[:, a:b], route[:, a:b], h)
            y = self._experts(d, experts)
            out, keep = yield from self._gather(y, d, solve.result(), solve.recv(c))
            return out, keep
        done = pipeline([chunk(c, a, b, h) for c, ((a, b), h) in enumerate(held.chunks)])
        return torch.cat([out for out, _ in done], 1), done[0][1], solve.result()

    def scatter(self, x, g, route, held):
        """(token, k) rows to their experts' devices, in one piece: a Dispatch."""
        return _finish(self._scatter(x, g, route, held))

    def gather(self, y, d, dest, recv=None):
        """Each row back to dest[its sample], in one piece: (out [B, S, H], keep)."""
        return _finish(self._gather(y, d, dest, recv))

    def local_experts(self, routing):
        per = len(routing.slot) // self.J
        return super().local_experts(routing)[self.rank * per:(self.rank + 1) * per]

    @staticmethod
    def _experts(d, experts):
        """What the experts send back for the rows of Dispatch d, in their arrival order: rows put in
        expert order (one permute), LN, the experts' FFN, then one combine that applies the gate
        weight and the output bias and inlines the residual in exactly one of a token's K rows
        (App. A.1): x + g * FFN(LN(x)) there, g * FFN(LN(x)) in the others. The shared experts ride
        with the residual: computed on each token's first row, they need no byte more on the wire and
        land wherever the sample goes (computed where the token sits, their output would have to
        follow it to its new device); finding those rows is a host sync on a GPU."""
        dev, acc = d.rows.device, _acc(d.rows.dtype)
        order = hot_path(dev).dispatch_order(d.expert.view(1, -1, 1), torch.arange(len(d.counts), device=dev))
        inv = _inverse(order)[:, None]
        f, bias, ends = experts.ffn(experts.norm(permute(d.rows, order, inv)), d.counts)
        first = d.pos % d.top_k == 0
        y = combine_rows(f.to(d.rows.dtype), inv, d.gate[:, None], bias, ends, d.rows, first.to(acc), covered=True)
        if experts.shared is not None:
            at = first.nonzero()[:, 0]
            y = y.index_add(0, at, experts.shared(experts.norm(d.rows[at])).to(y.dtype))
        return y

    @staticmethod
    def wire_bytes(hidden, dtype, top_k):
        """Bytes of one row on the wire: (scatter: x, its gate weight, p*S+s and e*K+k; gather: y, its
        new slot's q*S*K + s*K + k)."""
        return (hidden * dtype.itemsize + dtype.itemsize + _meta_bytes(1, dtype, short=True),
                hidden * dtype.itemsize + _meta_bytes(1, dtype))

    def _scatter(self, x, g, route, held):
        (B, S, H), K = x.shape, route.shape[-1]
        J, r, dev = self.J, self.rank, x.device
        slot = _to(held.slot, dev)
        order = hot_path(dev).dispatch_order(route, slot)
        t = order // K
        rows = permute(x.reshape(-1, H), t, _inverse(order).view(-1, K))
        # each row names its sample and position (p * S + s) and its expert there (e * K + k)
        local = slot[route.reshape(-1)[order]] % (len(held.slot) // J)
        payload = _with_ints(torch.cat([rows, g.reshape(-1, 1)[order].to(x.dtype)], 1), r * B * S + t,
                             short=local * K + order % K)
        flight = self._send("scatter", payload, held.sends, held.col.reshape(J, B).sum(1))
        yield
        return self._arrived(flight.wait(), x.shape, K, held, [held.sends])

    def _arrived(self, recv, shape, K, held, sent):
        """The Dispatch of rows that reached the experts, as _scatter's payload names them."""
        H, S = shape[2], shape[1]
        v, short = _ints(recv[:, H + 1:], 1)[:, 0], _short(recv[:, H + 1:], 1)
        expert = short // K
        counts = torch.zeros(len(held.slot) // self.J, dtype=torch.int64, device=recv.device).index_add_(
            0, expert, torch.ones_like(expert))   # no host sync, unlike bincount on a GPU
        return Dispatch(recv[:, :H], recv[:, H], expert, counts, v // S, (v % S) * K + short % K, shape, K, held, sent)

    def _gather(self, y, d, dest, recv=None):
        """Rows to dest[sample], ordered by (dest, sample); each names its new slot and position.
        recv: the rows each rank sends here, per hop (None: every sample stays, so the scatter's
        rows come back)."""
        (B, S, H), J, r, I, K = d.shape, self.J, self.rank, len(dest), d.top_k
        dev = y.device
        gorder = hot_path(dev).gather_order(d.src, _to(dest, dev), I)
        key = _to(_new_slots(dest), dev)[d.src] * (S * K) + d.pos
        flight = self._send("gather", _with_ints(y, key)[gorder], self._gather_sends(dest, d.routing)[0],
                            (d.sent if recv is None else recv)[0])
        yield
        back = flight.wait()
        # every (token, k) of the samples kept here arrives once: row s * K + k of its new slot
        index = _inverse(_ints(back[:, H:], 1)[:, 0], B * S * K)
        out = combine_rows(back[:, :H], index.view(B * S, K), covered=True)
        return out.view(B, S, H), np.flatnonzero(dest == r)

    def _gather_sends(self, dest, held):
        """Per hop, the rows this rank's gather sends each rank when samples go to dest."""
        return [np.bincount(dest, weights=held.col, minlength=self.J).astype(np.int64)]

    def _send(self, phase, rows, send, recv, tier=None):
        """A Flight of rows, started: send[j] of them to rank j, recv[j] from rank j, on the
        communicator of `tier` (intra or inter; None: the layer's group, both tiers). In debug
        mode also counts the rows this rank sends per tier, from the split sizes alone."""
        send, recv = [int(v) for v in send], [int(v) for v in recv]
        if self.debug:
            node = self.topo.node_of(np.arange(self.J)) == self.topo.node_of(self.rank)
            sent = np.asarray(send, dtype=np.int64)
            tiers = self.sent[phase]
            tiers["local"] += int(sent[self.rank])
            tiers["intra"] += int(sent[node].sum() - sent[self.rank])
            tiers["inter"] += int(sent[~node].sum())
            self.sent_bytes[phase] += (sum(send) - send[self.rank]) * rows.shape[1] * rows.element_size()
        return Flight(rows, send, recv, self.group if tier is None else subgroup(self.group, tier), self.timer)


class NodeExchange(ExpertExchange):
    """Node-deduplicated, in two hops each way (DeepEP's and tutel's hierarchical exchange): a
    token goes once to each remote node holding any of its experts, to its rail peer there (the
    device with the same local index), which forwards one row per (token, expert) over NVLink;
    the gather sums a token's rows inside each node at the rail peer of its destination and sends
    one partial sum per (token, node) across. Samples sit in slot order, so sample p is on rail
    (p // B) % G. This rank is device gl of node n. Rows name their samples, positions and
    experts, as the expert exchange's do."""
    name = "node"
    needs_routes = True         # one rail row per (token, node): node_counts of the routes, not num, say how many
    layout_names = ("node_count",)
    hops_in_sequence = True     # rail hop, then NVLink hop: Eq. 1 adds their times
    reach = staticmethod(_node_reach)

    @staticmethod
    def own_reach(counts, per_dev):
        return counts["node_count"], per_dev.sum(1, keepdim=True).expand_as(per_dev)

    @staticmethod
    def layout(route, expert_device, topo, num_experts, ops):
        """num, and the node counts node_count of the same routes under expert_device."""
        node = expert_device // topo.gpus_per_node
        node = _to(node, route.device) if torch.is_tensor(route) else node
        return dict(num=ops.count_tokens(route, num_experts), node_count=ops.node_counts(route, node, topo.nodes))

    @staticmethod
    def check_layout(num, topo, expert_device, layout):
        if layout.get("node_count") is None:
            raise ValueError(f"exchange={NodeExchange.name!r} needs node_count [I, N]: netmoe.node_counts(route, "
                             f"expert_device // G, N), or build the Routing with Routing.from_routes")
        nc = _check_num(layout["node_count"], topo, "node_count")
        if nc.shape != (num.shape[0], topo.nodes):
            raise ValueError(f"node_count must be [I={num.shape[0]}, N={topo.nodes}], got {nc.shape}")
        per_node = _device_tokens(num, topo, expert_device)[1]
        if np.any(nc > per_node) or np.any((nc > 0) != (per_node > 0)):
            raise ValueError("node_count does not fit the counts: a token counts on node n only if one of its "
                             "experts is there (compute it with the same expert layout)")
        return dict(node_count=nc)

    @staticmethod
    def wire_bytes(hidden, dtype, top_k):
        """Bytes of one row on the wire, the heavier hop of each: (scatter: the rail row, x with
        its K gate weights, p*S+s and its K expert ids; gather: hop A's, y, p*S+s and k)."""
        return (hidden * dtype.itemsize + top_k * dtype.itemsize + _meta_bytes(1 + top_k, dtype),
                hidden * dtype.itemsize + _meta_bytes(1, dtype, short=True))

    def __init__(self, topo, rank=0, group=None, debug=False, priced=None):
        super().__init__(topo, rank, group, debug, priced)
        for tier in ("inter", "intra"):   # made now, as every rank builds its layers
            subgroup(group, tier)

    def _scatter(self, x, g, route, held):
        (B, S, H), K = x.shape, route.shape[-1]
        J, r, G, N = self.J, self.rank, self.topo.gpus_per_node, self.topo.nodes
        I, ops, dev, ranks = len(held.block), hot_path(x.device), x.device, np.arange(J)
        n, gl = divmod(r, G)
        # Hop 1, rail (between nodes): one row per (token, other node holding any of its experts) to
        # (m, gl) there, ordered by (m, b, s). The row names its sample and position (p * S + s, as
        # int32 bits) and carries its K gate weights and K expert ids. Tokens whose experts are all
        # on node n skip this hop.
        own = _with_ints(torch.cat([x.reshape(-1, H), g.reshape(-1, K).to(x.dtype)], 1),
                         torch.arange(r * B * S, (r + 1) * B * S, device=dev), *route.reshape(-1, K).unbind(1))
        hit = torch.zeros(B, S, N, dtype=torch.bool, device=dev)
        hit.scatter_(2, _to(held.expert_device // G, dev)[route], True)
        hit[..., n] = False
        rail = (ranks % G == gl) & (ranks // G != n)
        send = np.where(rail, held.need[ranks // G], 0)
        recv = np.where(rail, held.nc.reshape(J, B).sum(1), 0)
        mbs = torch.nonzero_static(hit.permute(2, 0, 1), size=int(send.sum()))   # (m, b, s), sorted; no sync
        token = mbs[:, 1] * S + mbs[:, 2]
        rows = permute(own, token, _inverse(token * N + mbs[:, 0], B * S * N).view(B * S, N))
        flight = self._send("scatter", rows, send, recv, "inter")
        yield
        got = flight.wait().split(recv.tolist())
        # every token this rank holds now: its own and those its rail peers sent
        held_rows = torch.cat(got[:r] + (own,) + got[r + 1:])
        meta = _ints(held_rows[:, H + K:], 1 + K)                # p * S + s, then the K expert ids
        # Hop 2, NVLink (inside node n): one row per held (token, k) whose expert is on node n, to
        # the expert's device, ordered by (expert slot, token, k): a stable sort by the expert's slot
        # on this node, experts elsewhere last (cut off). The rows of rail gl's samples (wherever
        # they sit: their tokens reach node n on rail gl) for device (n, g) are block[:, g].
        per = len(held.slot) // J
        key = np.where(held.expert_device // G == n, held.slot - n * G * per, G * per)
        on_rail = (np.arange(I) // B) % G                       # rail of each sample's device
        mates = held.block[on_rail == gl]
        order = ops.dispatch_order(meta[None, :, 1:], _to(key, dev))[:int(mates.sum())]
        t = order // K
        rows = permute(held_rows[:, :H], t, _inverse(order, len(held_rows) * K).view(-1, K))
        local = _to(held.slot % per, dev)[meta[:, 1:].reshape(-1)[order]]
        payload = _with_ints(torch.cat([rows, held_rows[:, H:H + K].reshape(-1, 1)[order]], 1), meta[t, 0],
                             short=local * K + order % K)
        node = ranks // G == n
        hop = np.where(node, np.pad(mates.sum(0), (n * G, J - (n + 1) * G)), 0)
        flight = self._send("scatter", payload, hop, np.where(node, np.bincount(on_rail, weights=held.col,
                                                                                minlength=G)[ranks % G], 0), "intra")
        yield
        return self._arrived(flight.wait(), x.shape, K, held, [send, hop])

    def _gather(self, y, d, dest, recv=None):
        (B, S, H), J, r, K, I, G = d.shape, self.J, self.rank, d.top_k, len(dest), self.topo.gpus_per_node
        m, gl = divmod(r, G)
        dev, ranks = y.device, np.arange(J)
        send_a, send_b = self._gather_sends(dest, d.routing)
        recv_a, recv_b = d.sent[::-1] if recv is None else recv   # a sample that stays: hop A undoes hop 2
        # Hop A, NVLink (inside node m): each row of sample p to (m, dest[p] % G), ordered by
        # (device, sample); it names its sample and position (p * S + s, and k).
        via = m * G + dest % G
        gorder = hot_path(dev).gather_order(d.src, _to(via, dev), I)
        flight = self._send("gather", _with_ints(y, d.src * S + d.pos // K, short=d.pos % K)[gorder], send_a, recv_a,
                            "intra")
        yield
        got = flight.wait()
        v, k = _ints(got[:, H:], 1)[:, 0], _short(got[:, H:], 1)
        # Rows of samples that stay on node m land in the output; the others add up per token into
        # one partial sum, at key B*S + q*S + s (q numbers them by (dest, sample)), then compacted to
        # the nc[p] tokens of p with an expert here (exactly the tokens that have rows here).
        mine = np.flatnonzero(dest % G == gl)                     # samples whose rows come here
        keep = np.flatnonzero(dest == r)                          # new slots
        away = mine[dest[mine] != r]
        away = away[np.argsort(dest[away], kind="stable")]
        base = np.zeros(I, dtype=np.int64)
        base[keep], base[away] = np.arange(len(keep)) * S, B * S + np.arange(len(away)) * S
        key = _to(base, dev)[v // S] + v % S
        is_away = key >= B * S
        n_away, n_part = len(away) * S, int(d.routing.nc[away].sum())
        away_key = torch.where(is_away, key - B * S, n_away)     # the kept rows to a spare entry
        present = torch.zeros(n_away + 1, dtype=torch.bool, device=dev).index_fill_(0, away_key, True)[:n_away]
        compact = present.cumsum(0) - 1
        row = torch.where(is_away, B * S + compact[away_key.clamp(max=max(n_away - 1, 0))], key)
        # each (token, k) comes once: row's entry k of its K (sum each one's K rows, no atomics)
        index = _inverse(row * K + k, (B * S + n_part) * K)
        summed = combine_rows(got[:, :H], index.view(-1, K), covered=True)
        # Hop B, rail (between nodes): one partial sum per (token, node) to (dest node, gl), ordered
        # by (dest, sample, s), naming its new slot and position (q * S + s).
        at = torch.nonzero_static(present, size=n_part)[:, 0]
        slot = _to(_new_slots(dest)[away], dev)[at // S] * S + at % S
        rail = (ranks % G == gl) & (ranks // G != m)
        flight = self._send("gather", _with_ints(summed[B * S:], slot), send_b, recv_b, "inter")
        yield
        back = flight.wait()
        # one partial sum per (token, source node): entry `source` of the token's
        n_src, arrived = int(rail.sum()), recv_b[rail]
        source = torch.arange(n_src, device=dev).repeat_interleave(_to(arrived, dev), output_size=int(arrived.sum()))
        index = _inverse(_ints(back[:, H:], 1)[:, 0] * n_src + source, B * S * n_src)
        out = combine_rows(back[:, :H], index.view(B * S, n_src), base=summed[:B * S], covered=True)
        return out.view(B, S, H), keep

    def _gather_sends(self, dest, held):
        G = self.topo.gpus_per_node
        m, gl = divmod(held.rank, G)
        away = (dest % G == gl) & (dest != held.rank)
        return [np.bincount(m * G + dest % G, weights=held.col, minlength=self.J).astype(np.int64),
                np.bincount(dest[away], weights=held.nc[away], minlength=self.J).astype(np.int64)]


_SUBGROUPS = weakref.WeakKeyDictionary()


def subgroup(group, name):
    """A communicator of its own over the ranks of `group` (None: the world): the node exchange's
    rail ("inter") and NVLink ("intra") hops, so that NCCL runs one chunk's NVLink hop while
    another's rail hop is in flight, and the spread solve's ("solve", gloo: its collectives run on
    the host beside the exchange's, in the solver's thread on CPU, without a GPU stream's order).
    Made once, by every rank in the same order (new_group is a collective call); held weakly by
    its group, so destroying the process group frees them and their threads."""
    group = group or dist.group.WORLD
    made = _SUBGROUPS.setdefault(group, {})
    if name not in made:
        made[name] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo" if name == "solve" else None)
    return made[name]


# every exchange by the name the layer, the cost model and the command lines know it by
EXCHANGES = {cls.name: cls for cls in (ExpertExchange, NodeExchange)}


def make_exchange(name, topo, virtual=False, rank=0, group=None, debug=False):
    """The exchange a layer runs, chosen here and only here. In one process (virtual_world, or a
    world of one) all experts are local: the exchange is a reordering, priced as the one named.
    On one node the node exchange has no rail hop: it sends the expert exchange's rows, so that
    one runs (and both give identical results)."""
    cls = exchange_class(name)
    if cls.needs_routes and topo.nodes == 1:
        cls = ExpertExchange
    if virtual or topo.world == 1:
        return Exchange(topo, priced=cls)
    return cls(topo, rank, group, debug)


# ---------------------------------------------------------------------------------------------
# 5. The MoE layer
# ---------------------------------------------------------------------------------------------

_SOLVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmoe-solver")
RELAYOUT_WINDOW = 4   # batches a re-layout plan learns from: enough to see co-activation, recent enough to follow drift
FWD_BWD_MS = 2e3      # seconds of one All-to-All -> ms of it forward and its reverse in backward


@dataclasses.dataclass
class MoEStats:
    """Counters of one or more MoE-layer calls (sum with +). Volumes are rows sent, cluster-wide:
    routed tokens for the expert exchange; for the node exchange inter counts its rail rows, one
    per (token, node), and intra and local its NVLink rows, one per (token, expert)."""
    scatter: dict = dataclasses.field(default_factory=lambda: dict(local=0, intra=0, inter=0))
    gather: dict = dataclasses.field(default_factory=lambda: dict(local=0, intra=0, inter=0))
    samples: int = 0          # samples that passed through the gathers
    moved_node: int = 0       # of which the gather put on another node
    moved_device: int = 0     # ... on another device
    solver_ms: float = 0.0    # time the solver worked
    solver_exposed_ms: float = 0.0  # time the gather waited for it
    a2a_ms: float = 0.0       # measured All-to-All time, forward and backward
    a2a_model_ms: float = 0.0  # Eq. 1 for the same four exchanges as built (rows as sent: wire_bytes; chunks)
    a2a_hidden_ms: float = 0.0  # of which the chunked pipeline hides behind the experts' compute (given its time)
    chunks: dict = dataclasses.field(default_factory=dict)   # layer calls run in C chunks, by C
    meta_bytes: int = 0       # routing metadata this rank received (metadata_bytes), over the calls

    @property
    def mean_chunks(self):
        """The chunks a layer call ran in, on average over the calls counted (0 for none)."""
        return sum(C * n for C, n in self.chunks.items()) / max(sum(self.chunks.values()), 1)

    def __add__(self, other):
        out = MoEStats()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(out, f.name, {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}} if isinstance(a, dict) else a + b)
        return out


def layer_stats(num, cur, dest, topo, bytes_per_token, expert_device=None, chunks=1, expert_ms=None):
    """MoEStats of one MoE layer whose scatter leaves from sample placement `cur` and whose
    gather delivers to `dest`: Eq. 3-4 volumes, the Eq. 1 time of its four exchanges (forward
    and backward) as built in `chunks` chunks, and the samples moved. What the layer records, for
    replays and planning. num: counts or a Routing (any exchange); bytes_per_token: bytes of a row
    on the wire, or (scatter's, gather's) as the exchange's wire_bytes gives them. expert_ms: the
    layer's expert compute, forward and backward (backward twice forward), for what the pipeline
    hides behind it (a2a_hidden_ms)."""
    r = _routing(num, topo, expert_device)
    cur = _check_sample_device(cur, r.samples, topo, "cur")
    dest = _check_sample_device(dest, r.samples, topo, "dest")
    return _layer_stats(r, cur, dest, bytes_per_token, chunks, expert_ms)


def _layer_stats(routing, cur, dest, bytes_per_token, chunks=1, expert_ms=None, links=None):
    return _priced(_traffic(routing.reach, cur, routing.topo), _traffic(routing.reach, dest, routing.topo),
                   routing.exchange, routing.topo, cur, dest, bytes_per_token, chunks, expert_ms, links)


def _priced(scatter, gather, exchange, topo, cur, dest, bytes_per_token, chunks=1, expert_ms=None, links=None):
    """MoEStats of a layer whose scatter and gather move these volumes (_traffic's), as
    layer_stats gives them."""
    per_row = [float(b) for b in np.broadcast_to(bytes_per_token, 2)]   # python floats: records stay plain
    links = links or topo
    hops = [_hops(v, links, b, exchange, chunks) for v, b in zip((scatter, gather), per_row)]
    alone = [_pipelined(h, chunks, links.overlap, links.streams) for h in hops]
    hidden = 0.0
    if expert_ms:   # forward: scatter, experts, gather; backward the same reversed, twice the compute
        for share in (1 / 3, 2 / 3):
            compute = expert_ms * share / 1e3
            together = _pipelined(hops[0] + [("compute", compute / chunks)] + hops[1], chunks, links.overlap,
                                  links.streams)
            hidden += (sum(alone) + compute - together) * 1e3
    return MoEStats(scatter, gather, samples=len(dest),
                    moved_node=int((topo.node_of(dest) != topo.node_of(cur)).sum()),
                    moved_device=int((dest != cur).sum()),
                    a2a_model_ms=FWD_BWD_MS * sum(alone), a2a_hidden_ms=hidden)


def _synced(x):
    """perf_counter once the device of x has run all it was given."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


class _Solve:
    """One layer's placement, overlapped with the scatter and the experts where it solves
    (Algorithm 1). work() gives (dest, recv): a device per sample slot, and per chunk the rows each
    rank's gather sends here (None: the scatter's, reversed). On CPU the scatter and the experts
    run in the caller's thread, so the solver gets its own (km releases the GIL, and so do the
    collectives of a solve spread over ranks). On GPU they are queued kernels: solving inline in
    result(), once they are queued, overlaps them without the two threads trading the GIL.
    seconds and exposed then say how long it solved and how long the caller waited for it."""

    def __init__(self, work, solves, inline):
        self.work, self.solves, self.inline = work, solves, inline or not solves
        self.dest, self.recvs, self.seconds, self.exposed = None, None, 0.0, 0.0
        self.future = None if self.inline else _SOLVER.submit(_timed, work)

    def result(self):
        if self.dest is not None:
            return self.dest
        if not self.solves:
            self.dest, self.recvs = self.work()
        elif self.inline:
            queued = torch.cuda.Event()
            queued.record()
            (self.dest, self.recvs), self.seconds = _timed(self.work)
            # an upper bound: all of it counts as exposed if the GPU ran dry before it finished
            self.exposed = self.seconds if queued.query() else 0.0
        else:
            t = time.perf_counter()
            (self.dest, self.recvs), self.seconds = self.future.result()
            self.exposed = time.perf_counter() - t
        return self.dest

    def recv(self, chunk):
        """The rows each rank's gather of this chunk sends here, per hop (None: the scatter's)."""
        self.result()
        return None if self.recvs is None else self.recvs[chunk]


@dataclasses.dataclass(eq=False)
class _Gathered:
    """What MoELayer._held gathers of a layer call's routing, on the host: what this rank holds
    for its hops (held, with its chunks), every slot's sample id [I], per routing (this layer's,
    the lookahead's) the tokens each sample sends each node [I, N] and the rows it sends each
    device of this rank's node [I, G] (of every node, [I, J], where `every`), the scatter's volumes,
    and this rank's own (sample ids [B], counts [B, E]). every: None, or where a rank gathers every
    device's rows (_gathers_every_device), per chunk the rows for each device [I, C, J] and the
    node exchange's tokens each node needs [I, C, N]. The solve adds the gather's volumes (None:
    the scatter's, samples stay)."""
    held: Held
    sid: np.ndarray
    node: list
    device: list
    scatter: dict
    own: tuple
    every: tuple = None
    gather: dict = None
    meta_bytes: int = 0   # what this rank received of it (MoEStats.meta_bytes)


# Where the placement solves, each rank of a small cluster gathers every sample's rows for every
# device ([I, J] per routing and chunk) when that is at most this many bytes: it then solves both
# of Algorithm 1's stages alone and knows every rank's gather, so the solve needs no collective of
# its own. Two rounds of a collective cost 1-10 ms on gloo between CPU processes, about what a
# MiB takes there; past it, each rank gathers its node's [I, G] alone and the solve shares its
# stage 2 (O(I (N + C G)) a rank: what a 1024-GPU cluster can afford).
EVERY_DEVICE_BYTES = 1 << 20


def _gathers_every_device(I, topo, routings, chunks, needs_routes, solves):
    """Whether a layer call's ranks gather every device's rows of every sample (EVERY_DEVICE_BYTES)."""
    return bool(solves) and I * (topo.world * (routings + chunks) + topo.nodes * chunks * needs_routes) * 4 \
        <= EVERY_DEVICE_BYTES


def metadata_bytes(I, E, topo, exchange="expert", chunks=1, lookahead=True, placement="netmoe"):
    """The routing metadata one rank receives in a layer call where ranks run it (MoELayer._held
    and _place): from the All-to-All, int32 [I, 4 + L N] that every rank receives (sample id,
    expert time, the L = 1 or 2 routings' tokens per node, what each sample keeps where it sits)
    and int32 [I, L G + C G] of its own node's devices (the node exchange: + C); the int64 [E]
    tokens per expert all-reduced for the load-balance loss; where the placement solves, the int64
    destinations shared (I + 2 J), and where it moves samples, the int64 [J, C, hops] gather split
    sizes. O(I (N + C G) + J + E): no [I, E]. Where a small cluster's ranks gather every device's
    rows (EVERY_DEVICE_BYTES), [I, L J + C J] (+ C N) in place of their node's, and no destinations
    or split sizes."""
    N, G, J = topo.nodes, topo.gpus_per_node, topo.world
    cls, p = exchange_class(exchange), placement_class(placement)
    if cls.needs_routes and N == 1:
        cls = ExpertExchange
    L = 2 if lookahead and p.solves else 1
    hops = 2 if cls.hops_in_sequence else 1
    every = _gathers_every_device(I, topo, L, chunks, cls.needs_routes, p.solves)
    W, Wn = (J, N) if every else (G, 1)   # device and node columns a rank receives of each sample, as _held
    solve = 0 if every else (I + 2 * J) * 8 * p.solves + J * chunks * hops * 8 * p.moves_samples
    return I * (4 + L * N) * 4 + I * (L * W + chunks * W + chunks * Wn * cls.needs_routes) * 4 + E * 8 + solve


def _same_everywhere(array, group):
    """True on every rank if every rank holds the same integer array (a hash is all-gathered)."""
    h = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(array, dtype=np.int64).tobytes(),
                                       digest_size=7).digest(), "little")
    hashes = [None] * dist.get_world_size(group)
    dist.all_gather_object(hashes, h, group=group)
    return len(set(hashes)) == 1


def _chunk_bounds(S, chunks):
    """[(a, b)]: positions [a, b) of each of `chunks` near-equal chunks of S (fewer, where S < chunks)."""
    edges = np.linspace(0, S, chunks + 1).round().astype(int)
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a] or [(0, S)]


def _check_routing_options(num_experts, top_k, chunks, shared_experts, route_groups, group_top):
    if chunks != "auto" and (isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1):
        raise ValueError(f"chunks must be a positive integer or 'auto', got {chunks!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must lie in [1, E={num_experts}]")
    if route_groups < 1 or num_experts % route_groups or not 1 <= group_top <= route_groups:
        raise ValueError(f"route_groups={route_groups} must divide E={num_experts} and group_top={group_top} "
                         f"lie in [1, {route_groups}]")
    if top_k > group_top * (num_experts // route_groups):
        raise ValueError(f"top_k={top_k} experts cannot come from group_top={group_top} groups of "
                         f"{num_experts // route_groups}")
    if shared_experts < 0:
        raise ValueError(f"shared_experts must be 0 or more, got {shared_experts}")


class MoELayer(nn.Module):
    """Expert-parallel MoE block with NetMoE's sample placement: forward(x, sid) -> (y, sid', aux).

    x [B, S, H] is the residual stream of the B samples this rank holds (global ids sid [B]);
    y = x + MoE(LN(x)) for the B samples it holds afterwards (ids sid'), aux the Switch
    load-balance loss. Each rank holds E/J experts. placement names where the gather delivers
    samples (PLACEMENTS): "netmoe", Algorithm 1 (lookahead: also pricing the next layer's
    predicted scatter); "static", plain EP, the same code with every sample returned to where it
    came from; "kept", NetMoE's work and then static's placement (benchmarks). virtual_world=J
    runs in one process with all E experts, computing placements and volumes exactly as J
    devices would (the reference model).
    exchange names how rows travel (EXCHANGES): "expert", one row per (token, expert) straight to
    the expert's device and back; "node", one row per (token, remote node) to the rail peer there,
    which forwards it over NVLink, and back the same way with a token's rows summed inside each node.
    The layer is handed its process group (default: the default group); it starts none.
    experts: its expert component (default: Experts of this rank's E/J experts), any module called
    as Experts is, e.g. one that computes nothing, to time the exchange alone.
    """

    def __init__(self, hidden, ffn_hidden, num_experts, top_k=2, placement="netmoe", lookahead=True,
                 topology=None, group=None, virtual_world=None, expert_device=None, debug=False,
                 exchange="expert", chunks=1, shared_experts=0, route_groups=1, group_top=1, expert_bias=True,
                 links=None, experts=None):
        super().__init__()
        _check_routing_options(num_experts, top_k, chunks, shared_experts, route_groups, group_top)
        self.route_groups, self.group_top = route_groups, group_top
        # chunks="auto": each call runs in the C that Eq. 1, on `links` (a Topology with each tier's
        # alpha and bandwidth; None: measured on the group at the first call, in one process the
        # topology's), found best for the layer's previous call (its routing, placement and the
        # busiest rank's expert time); the first call runs in one chunk. Where ranks probed the
        # links, that first proposal is then checked by the clock (ChunkTrial) and kept
        self.chunks, self.links = chunks, links
        self.next_chunks = 1 if chunks == "auto" else int(chunks)
        self._clock = _Stopwatch()   # the experts' time, for chunks="auto"
        self._expert_ms = 0.0        # the busiest rank's, in the last call's experts
        self.chunk_trial = None      # where ranks probed their links: the clock's say (ChunkTrial)
        self._probed = False
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if virtual_world is not None and world != 1:
            raise ValueError(f"virtual_world runs in one process, but the process group has {world} ranks")
        self.virtual = virtual_world is not None
        self.J = virtual_world if self.virtual else world
        self.rank = 0 if self.virtual or world == 1 else dist.get_rank(group)
        self.topo = Topology(1, self.J) if topology is None else topology
        if self.topo.world != self.J:
            raise ValueError(f"topology {self.topo} has {self.topo.world} devices but the layer runs on "
                             f"J={self.J} ({'virtual_world' if self.virtual else 'world size'})")
        self.exchange = make_exchange(exchange, self.topo, self.virtual, self.rank, group, debug)
        # ranks run it: each holds its share of the routing, and the solve talks on a group of its own
        self.spread = not self.virtual and self.J > 1
        if self.spread:
            subgroup(group, "solve")
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.placement = placement_class(placement)(lookahead)
        self.group, self.debug = group, debug
        self.set_expert_device(_check_expert_device(expert_device, num_experts, self.J))
        n_local = len(self.local_experts)
        self.ln = nn.LayerNorm(hidden)
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        # the expert component: a module called as Experts is, (rows, counts) -> (f, bias, ends),
        # for this rank's n_local experts (a benchmark passes one that computes nothing)
        self.experts = Experts(n_local, hidden, ffn_hidden, expert_bias) if experts is None else experts
        # shared experts (DeepSeek's): every token passes through them, with weights replicated on
        # every rank as the dense ones are; none when shared_experts = 0
        self.shared_experts = n = shared_experts
        if n:
            self.sw1 = nn.Parameter(torch.randn(n, hidden, ffn_hidden) * 0.02)
            self.sb1 = nn.Parameter(torch.zeros(n, ffn_hidden))
            self.sw2 = nn.Parameter(torch.randn(n, ffn_hidden, hidden) * 0.02)
            self.sb2 = nn.Parameter(torch.zeros(n, hidden))
        self.record = False   # keep (sid, route, predicted next route) of the last call, for traces
        self.last_routes = None
        self.last_dest = None   # the placement the last call's gather used (device per sample slot)
        self._stats = MoEStats()
        self._checked_batch = None   # the batch size every rank was last seen to hold
        # the counts of the last batches, for expert_layout: (sample ids, [rows, E]) of this rank's
        # samples (every sample in one process); window() gathers them
        self.recent = collections.deque(maxlen=RELAYOUT_WINDOW)

    # the local experts' weights, [n_local, ...] (None: no expert biases)
    w1 = property(lambda self: self.experts.w1)
    b1 = property(lambda self: self.experts.b1)
    w2 = property(lambda self: self.experts.w2)
    b2 = property(lambda self: self.experts.b2)

    def set_expert_device(self, expert_device):
        """Expert e lives on device expert_device[e]; rows are ordered by `slot` = device-major position."""
        self.expert_device = np.asarray(expert_device, dtype=np.int64)
        order = np.lexsort((np.arange(self.num_experts), self.expert_device))
        self.slot = np.empty(self.num_experts, dtype=np.int64)
        self.slot[order] = np.arange(self.num_experts)
        per = self.num_experts // self.J
        self.local_experts = order if self.virtual else order[self.rank * per:(self.rank + 1) * per]

    def relayout(self, expert_device, optimizer=None):
        """Move the experts to a new balanced layout. Weights and every per-expert optimizer state
        tensor travel with them in one All-to-All (a local permutation in one process); parameters
        keep their identity, so the optimizer carries on. Every rank must pass the same map
        (checked). Call it between optimizer steps, with the gradients cleared. Returns the number
        of experts that changed device."""
        new = _check_expert_device(expert_device, self.num_experts, self.J)
        distributed = not self.virtual and self.J > 1
        if distributed and not _same_everywhere(new, self.group):
            raise RuntimeError("ranks passed different expert maps to relayout; compute the map on one rank "
                               "and broadcast it, or weights would move to the wrong places")
        params = [p for p in (self.w1, self.b1, self.w2, self.b2) if p is not None]
        if any(p.grad is not None for p in params):
            raise RuntimeError("relayout moves experts between optimizer steps: clear the gradients first "
                               "(optimizer.zero_grad(set_to_none=True))")
        per = self.num_experts // self.J
        old_order = np.lexsort((np.arange(self.num_experts), self.expert_device))
        old_local, changed = self.local_experts, int((new != self.expert_device).sum())
        state = optimizer.state if optimizer is not None else {}
        # every state tensor with one row per local expert (AdamW's moments, amsgrad's max, ...)
        tensors = params + [v for p in params for v in state.get(p, {}).values()
                            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(old_local)]
        flat = torch.cat([t.detach().reshape(len(old_local), -1) for t in tensors], 1)
        row_of = np.empty(self.num_experts, dtype=np.int64)
        row_of[old_local] = np.arange(len(old_local))          # expert id -> its row in flat
        self.set_expert_device(new)
        index = lambda a: torch.as_tensor(a, device=flat.device)
        if not distributed:
            rows = flat[index(row_of[self.local_experts])]
        else:
            # send my experts ordered by their new slot; receive, from each rank in turn, its
            # experts that now live here, in the same order
            by_slot = lambda experts: experts[np.argsort(self.slot[experts], kind="stable")]
            mine = by_slot(old_local)
            incoming = [by_slot(q) for q in old_order.reshape(self.J, per)]
            incoming = [q[new[q] == self.rank] for q in incoming]
            got = _all_to_all(flat[index(row_of[mine])], np.bincount(new[mine], minlength=self.J).tolist(),
                              [len(q) for q in incoming], self.group)
            rows = torch.empty_like(flat)
            rows[index(self.slot[np.concatenate(incoming)] - self.rank * per)] = got
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t[0].numel()
                t.copy_(rows[:, offset:offset + n].reshape(t.shape))
                offset += n
        return changed

    def window(self):
        """The re-layout planner's recent batches: [I, E] counts of every sample, rows by sample id,
        one array a batch. Where ranks run the layer, a collective (each holds its own samples')."""
        out = []
        for sids, num in self.recent:
            if self.spread:
                both = torch.from_numpy(np.column_stack([sids, num]))
                parts = [torch.empty_like(both) for _ in range(self.J)]
                dist.all_gather(parts, both, group=subgroup(self.group, "solve"))
                both = torch.cat(parts).numpy()
                sids, num = both[:, 0], both[:, 1:]
            out.append(num[np.argsort(sids, kind="stable")])
        return out

    def restore_window(self, batches):
        """Refill the window from window()'s arrays (a checkpoint's): each rank keeps an equal share."""
        for num in batches:
            num = np.asarray(num)
            share = slice(self.rank * len(num) // self.J, (self.rank + 1) * len(num) // self.J) if self.spread \
                else slice(None)
            self.recent.append((np.arange(len(num))[share], num[share]))

    def logits(self, x, h=None):
        """The gate's logits [B, S, E] on h = LN(x) (computed here unless given)."""
        h = layer_norm(x, self.ln) if h is None else h
        return F.linear(h, self.gate.weight.to(h.dtype))

    def route(self, x, h=None):
        """Gate: softmax over E, top-K, weights renormalised over the K. Returns (probs, g, route).
        K = 1 keeps the raw probability (Switch): renormalised it would be 1, and the gate would
        learn from the load-balance loss alone. h: LN(x), where the caller has it."""
        logits = self.logits(x, h)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        with torch.no_grad():   # the choice (a kernel on CUDA); its weights, from the full softmax, carry the gradient
            route = hot_path(x.device).topk_ids(group_limited(probs, self.route_groups, self.group_top), self.top_k)
        top = probs.gather(-1, route)
        return probs, top / top.sum(-1, keepdim=True) if self.top_k > 1 else top, route

    def pop_stats(self):
        """Counters since the last call; reading the All-to-All time waits for the GPU."""
        stats, self._stats = self._stats, MoEStats()
        stats.a2a_ms = self.exchange.timer.pop_ms()
        return stats

    def forward(self, x, sid, next_layer=None):
        """next_layer: the MoELayer that follows, for the lookahead (its gate on this input
        predicts its scatter, which the placement then prices with its expert map)."""
        B, S, H = self._check_input(x, sid)
        sid = torch.as_tensor(sid, device=x.device).long().reshape(-1)
        # 1. Gate; and the lookahead (paper Sec. 3.3): the next layer's gate on this input
        h, mean, rstd = layer_norm(x, self.ln, stats=True)
        probs, g, route = self.route(x, h)
        lookahead = self.placement.lookahead and next_layer is not None
        pred = self._predict(x, next_layer, mean, rstd) if next_layer is not None and (lookahead or self.record) else None
        if self.record:
            self.last_routes = (sid, route, pred)
        # 2. The routing's counts, this layer's and the predicted next one's (Eq. 2, and what else
        #    the exchange needs). Where ranks run the layer, each gathers of every sample only what
        #    Algorithm 1's stages and its own hops need (_held). In one process, the Routing of the
        #    whole batch: on a GPU nothing travels and the data path needs no count on the host, so
        #    its copy to the host only starts here and is read once the layer's GPU work is queued:
        #    NetMoE's bookkeeping then costs the GPU no idle time
        auto = self.chunks == "auto"
        if auto and self.links is None:
            self.links = self.topo if self.virtual or self.J == 1 else _measured_links(self.topo, self.group, x.device)
            self._probed = not self.virtual and self.J > 1
        trial = self.chunk_trial if auto and torch.is_grad_enabled() else None
        if trial is not None:
            self.next_chunks = trial.next()
        C, timed = self.next_chunks, trial is not None and not trial.settled
        if timed:
            started = _synced(x)
        I, J = B * (1 if self.virtual else self.J), self.J
        here = static_placement(I, J)
        # 3. The placement's solve starts, overlapping 4-5
        if self.spread:   # ranks: each gathers only what Algorithm 1's stages and its own hops need
            m, tokens = self._held(route, pred if lookahead else None, next_layer, sid, C)
            solve = _Solve(lambda: self._place(m, here), self.placement.solves, inline=x.is_cuda)
        else:
            routings, tokens = self._routings(route, pred if lookahead else None, next_layer, sid,
                                              defer=self.virtual and x.is_cuda)
            solve = _Solve(lambda: (self._solve(routings, here), None), self.placement.solves, inline=x.is_cuda)
        aux = self.num_experts * (tokens.to(probs.dtype) / (I * S * self.top_k) * probs.mean((0, 1))).sum()
        # 4. Scatter: (token, k) rows to their experts' devices; 5. the experts; 6. join the solve;
        # 7. gather: each row to dest[its sample], the receiver summing a token's K rows
        side = ExpertSide(functools.partial(layer_norm, ln=self.ln),
                          functools.partial(self._clock, self.experts) if auto else self.experts,
                          self.shared if self.shared_experts else None, h)
        # in one process, what the fused path reads: the experts' slots and rows per expert
        held = m.held if self.spread else LocalRouting(self.slot, tokens[_to(self.local_experts, x.device)])
        out, keep, dest = self.exchange.run(x, g, route, held, side, solve)
        per_row = self.exchange.priced.wire_bytes(H, x.dtype, self.top_k)
        # priced as the exchange runs on the cluster, in chunks (also where one process plays it)
        C = len(_chunk_bounds(S, C))
        if self.spread:
            sid_all, own, volumes = m.sid, m.own, (m.scatter, m.gather or m.scatter)
        else:
            routing, _, sid_all = routings()
            own, volumes = (sid_all, routing.num), (_traffic(routing.reach, here, self.topo),
                                                    _traffic(routing.reach, dest, self.topo))
        stats = _priced(*volumes, self.exchange.priced, self.topo, here, dest, per_row, C)
        if torch.is_grad_enabled():   # the planner's window: the counts of this rank's samples, by id
            order = np.argsort(own[0], kind="stable")
            self.recent.append((own[0][order], own[1][order]))
        self._stats.solver_ms += solve.seconds * 1e3
        self._stats.solver_exposed_ms += solve.exposed * 1e3
        self._check_same_dest(dest)
        self.last_dest = dest
        self._stats += dataclasses.replace(stats, chunks={C: 1}, meta_bytes=m.meta_bytes if self.spread else 0)
        if timed:
            _time_backward(out, x, trial.timed(self.next_chunks, (_synced(x) - started) * 1e3))
        if auto and self.chunk_trial is None:   # forward measured, backward twice its compute
            self.next_chunks = _fewest_exposed(*volumes, self.exchange.priced, self.topo, here, dest, per_row,
                                               3 * self._expert_ms, S, self.links)
            if self._probed:
                self.chunk_trial = ChunkTrial(self.next_chunks, S, self._slowest)
        return out, _to(sid_all[keep], x.device), aux

    def _slowest(self, ms):
        """Each of these ms as the slowest rank's."""
        t = torch.tensor(ms, dtype=torch.float64, device=self.ln.weight.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def _solve(self, routings, here):
        """The placement's dest from whole Routings (one process), rows by sample id: ties then
        break the same way wherever the samples sit, so a replay of the same routing
        (netmoe.replay) finds the same placements."""
        routing, routing_next, sid_all = routings()
        if not self.placement.solves:   # nothing to tie-break: placed in slot order as it is
            return self.placement.dest(routing, routing_next, here)
        order = np.argsort(sid_all, kind="stable")
        by_id = self.placement.dest(routing.by(order), None if routing_next is None else routing_next.by(order),
                                    here[order])
        dest = np.empty_like(by_id)
        dest[order] = by_id
        return dest

    def shared(self, h):
        """The shared experts' summed FFN of rows h [R, H] of LN(x)."""
        weights = [p.to(h.dtype).unbind(0) for p in (self.sw1, self.sb1, self.sw2, self.sb2)]
        return sum(_ffn(h, *w) for w in zip(*weights))

    @staticmethod
    @torch.no_grad()
    def _predict(x, next_layer, mean, rstd):
        """The lookahead's routes: the next layer's top-K on this input (its groups' limit
        included). Its LayerNorm and gate fold into one product over x with this layer's
        LayerNorm statistics (mean, rstd [..., 1]), so no second LayerNorm passes over the stream:
        LN'(x) W'^T = rstd (x - mean) U + c = rstd x U - rstd mean u + c, with U = (W' diag g')^T,
        u its column sums and c = W' b' (g', b' the next LayerNorm's weight and bias). The top-K
        kernel applies rstd, mean, u and c as it reads the product: nothing more passes over it."""
        ln, w = next_layer.ln, next_layer.gate.weight
        acc = _acc(x.dtype)
        U = (w * ln.weight).to(x.dtype)   # [E, H], rounded as the product reads it
        with torch.autocast(x.device.type, enabled=False):
            xu = F.linear(x, U)           # [..., E]
        affine = (rstd[..., 0], mean[..., 0], U.to(acc).sum(1), w.to(acc) @ ln.bias.to(acc))
        if next_layer.route_groups > 1:   # the groups' limit reads every probability
            probs = _affine(xu, affine).float().softmax(-1)
            return hot_path(x.device).topk_ids(group_limited(probs, next_layer.route_groups, next_layer.group_top),
                                               next_layer.top_k)
        return hot_path(x.device).topk_ids(xu, next_layer.top_k, affine)

    def _check_input(self, x, sid):
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"x must be [B, S, {self.hidden}], got {tuple(x.shape)}")
        if x.dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"the residual stream must be bfloat16, float32 or float64, got {x.dtype}")
        if torch.as_tensor(sid).numel() != x.shape[0]:
            raise ValueError(f"sid must give one id per sample: {torch.as_tensor(sid).numel()} ids for "
                             f"{x.shape[0]} samples")
        if not self.virtual and self.J > 1 and (self.debug or self._checked_batch != x.shape[0]):
            # every rank must hold the same B: the all-gather of the counts and the All-to-All
            # splits assume it, and NCCL would hang or read garbage rather than fail. Checked on a
            # layer's first call, where its batch size changes and, under debug, on every call: a
            # rank whose B changes while the others' stays meets their counts' all-gather with
            # this one, which gloo refuses (sizes differ); under NCCL, --debug checks every call
            sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(self.J)]
            dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=self.group)
            sizes = torch.cat(sizes).tolist()
            if len(set(sizes)) > 1:
                raise ValueError(f"every rank must hold the same number of samples; per rank: {sizes}")
            self._checked_batch = x.shape[0]
        return x.shape

    def _routings(self, route, pred, next_layer, sid, defer=False):
        """In one process (virtual_world, or a world of one): the Routing of this layer and of the
        lookahead's predicted next one (or None), under each layer's expert map and with what the
        exchange needs (its layout), for every sample of the global batch in slot order; and the
        samples' ids: (a function that returns those three, the tokens per expert [E] on route's
        device). Nothing travels, so the layer runs in one piece. The one host sync the layer
        needs; with defer (on a GPU), the copy to the host is started and the function waits for
        it. The expert time of the last call rides along (chunks="auto" prices a device's share)."""
        ops, priced = hot_path(route.device), self.exchange.priced
        layers = [(route, self)] + ([(pred, next_layer)] if pred is not None else [])
        parts = [priced.layout(r, layer.expert_device, self.topo, self.num_experts, ops) for r, layer in layers]
        flat = [t for p in parts for t in p.values()]
        spent = torch.full_like(sid[:, None], round(self._clock.pop_ms() * 1e3))   # microseconds
        meta = torch.cat(flat + [spent, sid[:, None]], 1)
        if defer:
            host = torch.empty(meta.shape, dtype=meta.dtype, pin_memory=True).copy_(meta, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = meta.cpu(), None
        if len(host) % self.J:
            raise ValueError(f"I={len(host)} samples cannot be split over J={self.J} devices; "
                             f"use a global batch divisible by {self.J}")

        @functools.cache
        def build():
            if copied is not None:
                copied.synchronize()
            meta = host.numpy()
            cols = iter(np.split(meta, np.cumsum([t.shape[1] for t in flat]), axis=1))
            out = [Routing.counted({name: next(cols) for name in p}, self.topo, layer.expert_device, priced)
                   for p, (_, layer) in zip(parts, layers)]
            self._expert_ms = meta[:, -2].max(initial=0) / 1e3 / self.J
            return out[0], out[1] if pred is not None else None, meta[:, -1]
        return build, parts[0]["num"].sum(0)

    def _held(self, route, pred, next_layer, sid, chunks):
        """Where ranks run the layer: what this rank gathers of the routing, this layer's in chunks
        of positions and the lookahead's predicted next one (or None) under each layer's expert
        map, O(I (N + (C + 2) G)) integers a rank and never [I, E]. Every rank receives every
        sample's tokens per node ([I, N], what stage 1 prices) and what it keeps where it sits,
        and its rows for the devices of this rank's node ([I, G] of this node: what stage 2 prices
        there, what the hops' split sizes read; per chunk, and the node exchange's tokens per
        node too): one All-to-All, beside the all-reduce of the tokens per expert, and the layer's
        one host sync. Returns (_Gathered, the tokens per expert [E] on route's device,
        all-reduced: the load-balance loss's)."""
        ops, ex, topo = hot_path(route.device), self.exchange.priced, self.topo
        J, N, G, B, S, dev = self.J, topo.nodes, topo.gpus_per_node, len(sid), route.shape[1], route.device
        I, r = B * J, self.rank
        if I * S >= 2 ** 31 or self.num_experts // J * self.top_k > 2 ** 16:
            raise ValueError(f"rows name their sample and expert in 32 and 16 bits: I*S = {I * S} must be below "
                             f"2^31 and (E/J)*K = {self.num_experts // J * self.top_k} at most 2^16")
        to_node = torch.arange(J, device=dev) // G   # each rank's node
        L, C = 1 + (pred is not None), len(_chunk_bounds(S, chunks))
        every = _gathers_every_device(I, topo, L, C, ex.needs_routes, self.placement.solves)
        W, Wn = (J, N) if every else (G, 1)   # device and node columns a receiver gets of each sample

        def per_receiver(t):   # [B, N, X]: to each rank, its node's [B, X] (or all of it, [B, N X])
            return t.reshape(B, 1, -1).expand(B, J, -1) if every else t[:, to_node]

        def counted(route, layer):   # the layout's counts and [B, N, G] rows per device, of this rank's samples
            c = ex.layout(route, layer.expert_device, topo, layer.num_experts, ops)
            per_dev = torch.zeros(B, J, dtype=torch.int64, device=dev).index_add_(
                1, _to(layer.expert_device, dev), c["num"].long())
            return {k: v.long() for k, v in c.items()}, per_dev.view(B, N, G)
        parts = [counted(route[:, a:b], self) for a, b in _chunk_bounds(S, chunks)]
        whole = ({k: sum(c[k] for c, _ in parts) for k in parts[0][0]}, sum(d for _, d in parts))
        reaches = [ex.own_reach(*whole)] + ([ex.own_reach(*counted(pred, next_layer))] if pred is not None else [])
        (node, device), (n, gl) = reaches[0], divmod(r, G)
        spent = torch.full_like(sid[:, None], round(self._clock.pop_ms() * 1e3))   # microseconds
        mine = torch.cat([sid[:, None], spent, *[q[0] for q in reaches],
                          device[:, n, gl, None], device[:, n].sum(1, keepdim=True)], 1).int()   # [B, Q]
        # to each rank, this rank's samples' columns above (what every rank gathers) and their rows
        # for each device of that rank's node (or of every node): one All-to-All, [J, B, Q + P]
        blocks = [per_receiver(q[1]) for q in reaches] + [per_receiver(d) for _, d in parts]
        if ex.needs_routes:
            blocks += [per_receiver(c["node_count"][:, :, None]) for c, _ in parts]
        sent = torch.cat([mine[None].expand(J, -1, -1), torch.cat(blocks, 2).transpose(0, 1).int()], 2).contiguous()
        got = torch.empty_like(sent)   # counts of a sample: < 2^31
        tokens = whole[0]["num"].sum(0)
        summed = dist.all_reduce(tokens, group=self.group, async_op=True)
        dist.all_to_all_single(got, sent, group=self.group)
        summed.wait()
        received = got.numel() * got.element_size() + tokens.numel() * tokens.element_size()
        # this rank's own, per chunk: rows for each device and tokens each node needs; its counts
        own = [torch.cat([d.reshape(B, J).sum(0), c["node_count"].sum(0) if ex.needs_routes else d.new_zeros(N)])
               for c, d in parts]
        gathered = [got, torch.stack(own), whole[0]["num"]]
        host = torch.cat([t.reshape(-1).long() for t in gathered]).cpu().numpy()   # the one host sync
        rows, own, num = np.split(host, np.cumsum([t.numel() for t in gathered[:-1]]))
        rows, own = rows.reshape(I, -1), own.reshape(-1, J + N)
        Q = mine.shape[1]
        cols, rows = rows[:, :Q], rows[:, Q:]
        self._expert_ms = cols[:, 1].max(initial=0) / 1e3   # the busiest rank's
        nodes = [cols[:, 2 + k * N:2 + (k + 1) * N] for k in range(L)]
        stay, keeps = cols[:, 2 + L * N], cols[:, 3 + L * N]
        block = rows[:, L * W:(L + C) * W].reshape(I, C, W)
        nc = rows[:, (L + C) * W:].reshape(I, C, Wn) if ex.needs_routes else np.zeros((I, C, Wn), dtype=np.int64)
        ours = (block[:, :, n * G:(n + 1) * G], nc[:, :, n]) if every else (block, nc[:, :, 0])   # this node's
        held = lambda k, chunks=(): Held(topo, self.expert_device, self.slot, r, ours[0][:, k].sum(1), own[k, :J].sum(0),
                                         ours[1][:, k].sum(1), own[k, J:].sum(0), chunks)
        scatter = {"local": int(stay.sum()), "intra": int((keeps - stay).sum()),
                   "inter": int((nodes[0].sum(1) - nodes[0][np.arange(I), np.arange(I) // B // G]).sum())}
        m = _Gathered(held(slice(None), tuple((ab, held([k])) for k, ab in enumerate(_chunk_bounds(S, chunks)))),
                      cols[:, 0], nodes, [rows[:, k * W:(k + 1) * W] for k in range(L)], scatter,
                      (cols[r * B:(r + 1) * B, 0], num.reshape(B, -1)), every=(block, nc) if every else None,
                      meta_bytes=received)
        return m, tokens

    def _place(self, m, here):
        """Algorithm 1 where ranks run the layer (_held's metadata m): stage 1 on every rank (each
        holds [I, N]); stage 2 for this rank's node (it holds the node's [I, G]); each rank shares
        I/J of its node's destinations, with what their gather keeps on each device (one
        all-gather on the solve's group); then the gather's split sizes (one All-to-All of [J]
        per chunk and hop). Where a rank holds every device's rows (m.every), it solves stage 2
        for every node and counts what every rank's gather sends it: no collective. Rows by sample
        id, as the one-process solve's: the same placement. Returns (dest, the rows each rank's
        gather sends here per chunk and hop, or None)."""
        if not self.placement.solves:
            return here, None
        topo, J, r, I = self.topo, self.J, self.rank, len(m.sid)
        N, G = topo.nodes, topo.gpus_per_node
        n, gl = divmod(r, G)
        order = np.argsort(m.sid, kind="stable")
        node = _solve_nodes(_stage_cost([c[order] for c in m.node]), N)
        on = [order[node == k] for k in range(N)]   # each node's samples' slots, by sample id
        solved = range(N) if m.every is not None else [n]   # the nodes whose stage 2 this rank solves
        own = lambda d, k: d[on[k], k * G:(k + 1) * G] if m.every is not None else d[on[k]]   # [I/N, G]
        device = _solve_devices(_stage_cost([np.concatenate([own(d, k) for k in solved]) for d in m.device]),
                                len(solved))
        if m.every is not None:
            dest = np.empty(I, dtype=np.int64)
            dest[np.concatenate(on)] = np.repeat(np.arange(N) * G, I // N) + device
            rows = m.device[0].reshape(I, N, G)[np.arange(I), dest // G]   # on its new node's devices
            local = rows[np.arange(I), dest % G].sum()
            intra = rows.sum() - local
        else:
            share = slice(gl * I // J, (gl + 1) * I // J)
            q, g = on[n][share], device[share]
            kept = m.device[0][q, g]
            mine = torch.from_numpy(np.concatenate([n * G + g, [kept.sum(), (m.device[0][q].sum(1) - kept).sum()]]))
            out = [torch.empty_like(mine) for _ in range(J)]
            dist.all_gather(out, mine, group=subgroup(self.group, "solve"))
            out = torch.stack(out).numpy()
            m.meta_bytes += out.nbytes
            dest = np.empty(I, dtype=np.int64)
            for k in range(N):
                dest[on[k]] = out[k * G:(k + 1) * G, :-2].reshape(-1)
            local, intra = out[:, -2:].sum(0)
        m.gather = {"local": int(local), "intra": int(intra),
                    "inter": int((m.node[0].sum(1) - m.node[0][np.arange(I), dest // G]).sum())}
        if not self.placement.moves_samples:
            m.gather = None
            return here, None
        if m.every is not None:   # every rank's gather, from its Held of each chunk: what it sends here
            block, nc = m.every
            held = lambda c, d: Held(topo, self.expert_device, self.slot, d, block[:, c, d // G * G:(d // G + 1) * G],
                                     None, nc[:, c, d // G])
            recv = np.array([[self.exchange._gather_sends(dest, held(c, d)) for d in range(J)]
                             for c in range(block.shape[1])])[..., r]   # [C, J, hops]
        else:
            sends = np.stack([np.stack(self.exchange._gather_sends(dest, h)) for _, h in m.held.chunks])   # [C, hops, J]
            sends = torch.from_numpy(np.ascontiguousarray(sends.transpose(2, 0, 1)))   # [J, C, hops]
            recv = torch.empty_like(sends)
            dist.all_to_all_single(recv, sends, group=subgroup(self.group, "solve"))
            m.meta_bytes += recv.numel() * recv.element_size()
            recv = recv.numpy().transpose(1, 0, 2)
        return dest, [list(c.T) for c in recv]   # per chunk, per hop: [J] from each rank

    def _check_same_dest(self, dest):
        """Debug: every rank must have solved to the identical placement, or the exchange is garbage."""
        if self.debug and not self.virtual and self.J > 1 and not _same_everywhere(dest, self.group):
            raise RuntimeError("ranks computed different placements; the solver must be deterministic "
                               "and every rank must see the same num")


def group_limited(probs, groups, top):
    """Group-limited routing (DeepSeek-V3's, Megatron's moe_router_group_topk): experts in `groups`
    groups of consecutive ids; a token may only pick from its `top` best groups, a group scoring
    the sum of its two highest affinities; the others' probabilities are pushed below any. The
    groups are of expert ids, not of devices, so the model computes the same function in every
    expert layout; a token's experts then sit on at most `top` nodes while each group sits on one
    node (the contiguous layout with as many groups as nodes), which re-layouts may undo."""
    if groups == 1:
        return probs
    grouped = probs.unflatten(-1, (groups, -1))
    score = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(top, dim=-1)[1], True)
    return grouped.masked_fill(~keep[..., None], -1.0).flatten(-2)


def _ffn(h, w1, b1, w2, b2):
    """One expert's FFN of rows h: GELU(h w1 + b1) w2 + b2 (no biases where they are None)."""
    mid = F.gelu(h @ w1 if b1 is None else torch.addmm(b1, h, w1))
    return mid @ w2 if b2 is None else torch.addmm(b2, mid, w2)


def ffn_loop(h, weights, counts):
    """Each expert's FFN on its counts[e] rows of h (grouped by expert), weights (w1, b1, w2, b2)
    stacked over experts (b1, b2 may be None): the plain reference, and the path on CPU."""
    # unbind, not w1[e]: indexing a stacked parameter makes autograd add a zero gradient of the
    # whole stack for every expert, O(E x weights) per call
    w1, b1, w2, b2 = ([None] * len(counts) if p is None else p.to(h.dtype).unbind(0) for p in weights)
    return torch.cat([_ffn(chunk, w1[e], b1[e], w2[e], b2[e]) for e, chunk in enumerate(h.split(counts))])


def ffn_grouped(h, weights, ends):
    """ffn_loop without its output bias (the caller's combine adds it) as one grouped matrix product
    per weight (torch._grouped_mm), bf16; ends [E] int32 the rows' ends per expert. The first
    product's bias and GELU are one pass each way (bias_gelu), with no [rows, E] one-hot product."""
    w1, b1, w2 = weights
    dtype = torch.bfloat16 if h.is_cuda or torch.is_autocast_enabled("cpu") else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        pre = torch._grouped_mm(h.to(dtype), w1.to(dtype), offs=ends)
        mid = F.gelu(pre) if b1 is None else _BiasGelu.apply(pre, b1.to(dtype), ends)
        return torch._grouped_mm(mid, w2.to(dtype), offs=ends)


class Experts(nn.Module):
    """The experts' FFNs, FFN_e(h) = GELU(h w1_e + b1_e) w2_e + b2_e, of a rank's n experts (no
    biases with bias=False): the MoE layer's expert component, which a benchmark may swap for any
    module called the same way. forward(h, counts) takes rows h [R, H] of LN(x) grouped by expert,
    counts[e] rows of expert e (a list, or a tensor on h's device), and returns (f, bias, ends):
    f = FFN(h), less its output bias where
    the caller is to add it (the grouped product's path, which fuses b2 into the combine: bias
    [n, H] and ends [n] int32 the rows' ends per expert; else both None)."""

    def __init__(self, n, hidden, ffn_hidden, bias=True):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, hidden, ffn_hidden) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(n, ffn_hidden)) if bias else None
        self.w2 = nn.Parameter(torch.randn(n, ffn_hidden, hidden) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(n, hidden)) if bias else None
        for p in self.parameters():
            p.expert = True   # not averaged over ranks: each rank owns its experts

    def forward(self, h, counts):
        if _grouped_mm_ok(h):   # counts on the device (one process) need no host sync here
            ends = counts.cumsum(0).to(torch.int32) if torch.is_tensor(counts) else \
                _to(np.cumsum(counts).astype(np.int32), h.device)
            return ffn_grouped(h, (self.w1, self.b1, self.w2), ends), self.b2, ends
        counts = counts.tolist() if torch.is_tensor(counts) else counts
        return ffn_loop(h, (self.w1, self.b1, self.w2, self.b2), counts), None, None


def layer_norm(x, ln, stats=False):
    """ln(x) in x's dtype. Under autocast torch computes LayerNorm into a float32 copy of its
    input; here a bfloat16 stream stays bfloat16 (the kernel still accumulates in float32).
    stats: (ln(x), mean, rstd), each token's mean and 1/std as the kernel computed them [..., 1]."""
    with torch.autocast(x.device.type, enabled=False):
        args = (x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)
        return torch.native_layer_norm(*args) if stats else F.layer_norm(*args)


def _grouped_mm_ok(h):
    """Whether the experts use torch._grouped_mm: on CUDA Hopper or newer under bf16 autocast
    (one product per weight instead of one per expert). On CPU the per-expert loop is as fast
    (torch's CPU grouped product loops over the groups itself). NETMOE_GROUPED_MM=0 or 1 overrides."""
    force = os.environ.get("NETMOE_GROUPED_MM")
    if not hasattr(torch, "_grouped_mm") or force == "0":
        return False
    if force == "1":
        return h.dtype in (torch.float32, torch.bfloat16) or h.is_cuda
    return h.is_cuda and torch.is_autocast_enabled("cuda") and torch.cuda.get_device_capability(h.device)[0] >= 9
