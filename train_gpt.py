"""MoE-GPT training with NetMoE sample placement: every FFN is a netmoe.MoELayer.

  python train_gpt.py                     # the main job: tiny MoE-GPT on the bundled corpus, 4 CPU
                                          # processes as 2 virtual nodes x 2, static vs NetMoE
  python train_gpt.py train --preset tiny --nproc 4 --topology 2x2 --steps 100 --ckpt ck
  python train_gpt.py train --preset s --n-layer 6 --virtual-world 32 --topology 4x8 --trace s.npz  # 1 GPU
  python bench.py simulate --trace s.npz --topology 4x8 --layout          # replay the trace
  torchrun --nproc_per_node 8 train_gpt.py compare --preset s --json s.json              # one node
  torchrun --nnodes 4 --nproc_per_node 8 --node_rank $R --master_addr $A --master_port 29500 \\
      train_gpt.py compare --preset s --steps 70 --skip-steps 20                         # 4 x 8

Under torchrun the topology is WORLD_SIZE / LOCAL_WORLD_SIZE nodes of LOCAL_WORLD_SIZE devices;
--topology NxG declares virtual nodes instead. run_cluster.sh wraps the paper's experiment;
bench.py holds the benchmarks, plots and replays (it imports this file; this file never imports it).
"""
import contextlib
import dataclasses
import errno
import functools
import glob
import importlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import zlib
from multiprocessing import resource_tracker

# Torch's OpenMP threads wait for each other by spinning: on a host whose cores another job
# shares, a one-process CPU run then took 5-20x longer a step (10-24 s steps among 2 s ones), and
# the spinning takes the cores from the other jobs. Waiting threads sleep instead; set before
# torch loads OpenMP, in every process that imports this file (OMP_WAIT_POLICY=ACTIVE spins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import netmoe

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    hidden: int                 # H
    seq_len: int = 1024         # S (paper Table 3)
    batch: int = 4              # I/J samples per device (paper Table 3)
    experts_per_device: int = 2  # E/J (paper: E = 2J)
    top_k: int = 2              # K (paper)
    vocab: int = 256            # byte-level tokens; a nanoGPT .bin sets 50304
    aux_coef: float = 0.01      # Switch load-balance loss weight
    expert_hidden: int = None   # F, the experts' FFN width: 4H as GPT-2's FFN; fine-grained experts (DeepSeek) less
    shared_experts: int = 0     # experts every token passes through (DeepSeek-V3: 1)
    route_groups: int = 1       # group-limited routing: M groups of experts (DeepSeek-V3: 8, its nodes) ...
    group_top: int = 1          # ... of which a token's K experts come from its best T (DeepSeek-V3: 4)
    expert_bias: bool = True    # the experts' FFN biases b1, b2 (GPT-2's FFN has them; DeepSeek's and torchtitan's not)

    @property
    def ffn(self):
        return self.expert_hidden or 4 * self.hidden


# The paper gives only H (Table 3). Depth and heads follow GPT-2 / GPT-3 at that width, cut where a
# rank's parameters + AdamW state (16 bytes/param, fp32) at E/J = 2 would not fit one 40 GB GPU.
PRESETS = {
    "tiny": GPTConfig(n_layer=2, n_head=2, hidden=64, seq_len=64),   # CPU: well under a second a step
    "s": GPTConfig(n_layer=12, n_head=12, hidden=768),     # MoE-GPT-S, GPT-2 small: ~0.15B/rank, 2.4 GB
    "m": GPTConfig(n_layer=24, n_head=16, hidden=1024),    # MoE-GPT-M, GPT-2 medium: ~0.5B/rank, 8 GB
    "l": GPTConfig(n_layer=36, n_head=20, hidden=1280),    # MoE-GPT-L, GPT-2 large: ~1.2B/rank, 19 GB
    "xl": GPTConfig(n_layer=24, n_head=25, hidden=1600),   # MoE-GPT-XL: GPT-2 XL's 48 layers would be 39 GB
    "xxl": GPTConfig(n_layer=4, n_head=32, hidden=4096),   # MoE-GPT-XXL, GPT-3 6.7B width: 0.34B/layer/rank
}
# Each preset's training recipe: (peak learning rate, warm-up steps). The rates are GPT-3's at these
# widths (Brown et al. 2020, Table 2.1: 6e-4 at H = 768 down to 1.2e-4 at 4096). The warm-up is
# linear over 2 / (1 - beta2) = 40 AdamW steps (beta2 = 0.95), the span its second-moment estimate
# needs to settle (Ma & Yarats 2021); 10 steps to 1e-3 made MoE-GPT-S's bf16 loss jump at steps 2
# and 9 on an H200. A run shorter than its warm-up never reaches the peak. The tiny CPU model keeps 10.
RECIPES = {"tiny": (1e-3, 10), "s": (6e-4, 40), "m": (3e-4, 40), "l": (2.5e-4, 40), "xl": (2e-4, 40),
           "xxl": (1.2e-4, 40)}


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x):
        B, S, H = x.shape
        q, k, v = (t.view(B, S, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(H, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    """x + Attn(LN(x)), then the MoE layer, which holds its own LN and adds the residual on the
    expert side; samples may change rank inside it."""

    def __init__(self, cfg, E, **moe):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.moe = netmoe.MoELayer(cfg.hidden, cfg.ffn, E, cfg.top_k, shared_experts=cfg.shared_experts,
                                   route_groups=cfg.route_groups, group_top=cfg.group_top,
                                   expert_bias=cfg.expert_bias, **moe)

    def forward(self, x, sid, next_block=None):
        x = x + self.attn(netmoe.layer_norm(x, self.ln))
        return self.moe(x, sid, next_layer=next_block.moe if next_block is not None else None)   # for the lookahead


class GPT(nn.Module):
    """Pre-LN GPT of Blocks. Samples may change rank inside every MoE layer: the model returns the
    ids of the samples whose logits it returns."""

    def __init__(self, cfg, J, dtype=torch.float32, **moe):
        super().__init__()
        self.dtype = dtype   # of the residual stream (and the rows the MoE layers send); weights stay float32
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, cfg.experts_per_device * J, **moe) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.moe = [b.moe for b in self.blocks]   # the MoE layers, in order (registered through the blocks)

    def forward(self, idx, sid):
        x = (self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))).to(self.dtype)
        aux = 0.0
        for block, nxt in zip(self.blocks, list(self.blocks[1:]) + [None]):
            x, sid, a = block(x, sid, nxt)
            aux = aux + a
        return netmoe.layer_norm(x, self.ln_f) @ self.wte.weight.T.to(x.dtype), sid, aux

    def init_weights(self, seed):
        """Independent of how experts are spread: every parameter (each expert separately, by its
        global id) is drawn from a generator keyed by its name, so any world size builds the same
        model."""
        for name, p in self.named_parameters():
            key = zlib.crc32(name.encode())
            with torch.no_grad():
                if getattr(p, "expert", False):   # blocks.<layer>.moe.<w>: each local expert by its global id
                    for i, e in enumerate(self.blocks[int(name.split(".")[1])].moe.local_experts):
                        g = torch.Generator().manual_seed(seed * 1_000_003 + key * 1009 + int(e))
                        p[i].copy_(_init_like(p[i], name, g, self.cfg.n_layer))
                else:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + key)
                    p.copy_(_init_like(p, name, g, self.cfg.n_layer))

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight a token passes through (2 per multiply-add,
        backward twice the forward): attention's four H x H projections, the gate, its K experts'
        and the shared experts' two H x F matrices, the LM head; plus attention's scores and
        weighted sum, 12 L H S (PaLM's count, the causal mask ignored)."""
        c, E = self.cfg, self.moe[0].num_experts
        per_layer = 4 * c.hidden ** 2 + c.hidden * E + (c.top_k + c.shared_experts) * 2 * c.hidden * c.ffn
        return 6 * (c.n_layer * per_layer + c.vocab * c.hidden) + 12 * c.n_layer * c.hidden * c.seq_len


def _init_like(p, name, g, n_layer):
    """GPT-2's init: matrices N(0, 0.02), biases 0, LayerNorm weights 1; the projections that add
    into the residual stream (attention's output, the experts' w2) N(0, 0.02 / sqrt(2 L)), so the
    stream's variance does not grow with depth (2 L residual adds, as GPT-2 counts them)."""
    if name.endswith("bias") or name.split(".")[-1] in ("b1", "b2", "sb1", "sb2"):
        return torch.zeros_like(p)
    if p.dim() == 1:   # LayerNorm weight
        return torch.ones_like(p)
    residual_out = name.endswith((".proj.weight", ".w2", ".sw2"))
    return torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.02 / math.sqrt(2 * n_layer) if residual_out else 0.02)


def make_optimizer(model, lr, betas=(0.9, 0.95)):
    """AdamW; weight decay on matrices (projections, embeddings, gate, expert w1/w2), none on
    biases (expert b1/b2 included) and norms: by role, not by shape. On a GPU the fused kernel:
    one pass over parameters and state instead of one per operation."""
    decay = lambda n, p: n.split(".")[-1] in ("w1", "w2", "sw1", "sw2") or (n.endswith("weight") and p.dim() >= 2)
    groups = [dict(params=[p for n, p in model.named_parameters() if decay(n, p) == d], weight_decay=w)
              for d, w in ((True, 0.1), (False, 0.0))]
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def memory_estimate(cfg, J, virtual, device_type):
    """Rough bytes one rank needs (within about 25% of the peaks measured, CPU and H200), known
    before the model is built: {"weights": ..., "activations": ..., "total": ...}.

    P parameters on the rank (dense ones with n shared experts, and its E/J experts of width F: all
    E with virtual_world), T = B S tokens of its B samples (I with virtual_world), L layers, heads,
    vocabulary V:
      weights      P * 24 bytes on the CPU (float32 weights, gradients, AdamW's two moments, and
                   the foreach optimizer's temporaries), P * 18 on CUDA (fused AdamW, no
                   temporaries; bf16 copies of the expert weights for the grouped products);
      activations  L T (6H + (K + n) F + K H) * 4 bytes (attention's, the K expert rows' and the
                   n shared experts' saved tensors, and the K rows of width H every token has in
                   flight: its rows of LN(x) the first product keeps and the experts' outputs the
                   combine keeps; a bf16 stream saves little, as autocast keeps float32
                   copies), + 12 T V (logits,
                   their float32 copy and gradient), + on the CPU L B n S^2 * 4 (its attention
                   keeps the S x S weights; CUDA's fused attention does not), + 0.4 GB of runtime."""
    H, L, E, K, S = cfg.hidden, cfg.n_layer, cfg.experts_per_device * J, cfg.top_k, cfg.seq_len
    B = cfg.batch * (J if virtual else 1)
    experts = E if virtual else cfg.experts_per_device
    dense = (cfg.vocab + S) * H + L * (4 * H * H + 4 * H + 4 * H + H * E) + 2 * H
    F_, n = cfg.ffn, cfg.shared_experts
    P = dense + L * (experts * (2 * H * F_ + (F_ + H) * cfg.expert_bias) + n * (2 * H * F_ + F_ + H))
    cpu = device_type == "cpu"
    weights = P * (24 if cpu else 18)
    T = B * S
    activations = L * T * (6 * H + (K + n) * F_ + K * H) * 4 + 12 * T * cfg.vocab + \
        (L * B * cfg.n_head * S * S * 4 if cpu else 0)
    return dict(weights=weights, activations=activations, total=weights + activations + 0.4e9)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


class TopologyType(click.ParamType):
    name = "NxG"

    def get_metavar(self, param, ctx=None):   # click would print the name upper-cased: NXG
        return self.name

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, netmoe.Topology) else netmoe.Topology.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class ChunksType(click.ParamType):
    name = "C|auto"

    def get_metavar(self, param, ctx=None):
        return self.name

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        try:
            C = int(value)
        except ValueError:
            C = 0
        if C < 1:
            self.fail(f"{value!r} is neither a positive number of chunks nor 'auto'", param, ctx)
        return C


class PositiveType(click.FloatRange):
    def __init__(self):
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):   # nan passes every range check
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def output_problem(path, directory=False, suffix=".json"):
    """Why `path` cannot be written, or None; its folder (a directory's parent) is made first.
    A run must not train for hours and then fail to save, so outputs are checked up front."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file; give a folder (it is made if missing)"
    if not directory and (os.path.isdir(path) or path.endswith(("/", os.sep))):
        return f"{path} is a folder; give a file in it, e.g. {os.path.join(path, 'out' + suffix)}"
    folder = path if directory and os.path.isdir(path) else os.path.dirname(path) or "."
    above = folder
    while above and not os.path.exists(above):
        above = os.path.dirname(above)
    if above and not os.path.isdir(above):
        return f"{above} is a file, so {path} cannot be written; give another path"
    def refused(e, what):   # /proc and the like exist but refuse new entries with ENOENT: "no such folder"
        exists = e.errno == errno.ENOENT and os.path.isdir(os.path.dirname(e.filename or "") or ".")
        return f" (the folder exists, but its filesystem takes no new {what})" if exists else ""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        where = os.path.dirname(e.filename or folder) or "."
        return f"cannot make a folder in {where}: {e.strerror or e}{refused(e, 'folders')}; give another path"
    try:   # the call a save makes: a new file in that folder (atomic_write's .part)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".netmoe-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"cannot create a file in {folder}: {e.strerror or e}{refused(e, 'files')}; give another path"
    return None


class OutputPath(click.ParamType):
    """A file (or folder) the command writes, checked when the command line is read: its folder
    is made if missing, and a path that cannot be written is refused in one line."""

    def __init__(self, directory=False, suffix=".json"):
        self.directory, self.suffix = directory, suffix
        self.name = "dir" if directory else "file"

    def convert(self, value, param, ctx):
        problem = output_problem(value, self.directory, self.suffix)
        if problem:
            self.fail(problem, param, ctx)
        return value


TOPOLOGY, POSITIVE, CHUNKS = TopologyType(), PositiveType(), ChunksType()
JSON_OUT, TRACE_OUT, CKPT_DIR = OutputPath(), OutputPath(suffix=".npz"), OutputPath(directory=True)
DTYPE = click.Choice(["float32", "bfloat16"])
DEFAULT_CHUNKS = "auto"   # chunks of each layer's exchange: Eq. 1's best on the links measured at start-up,
                          # checked by timing the layer's first calls
COMPARED = (netmoe.Placement.name, netmoe.NetMoE.name)   # compare's runs: static EP, then NetMoE
COUNT, NONNEG = click.IntRange(min=1), click.IntRange(min=0)


def _opt(default, type=None, help=None, flag=None, hidden=False, shown=None):
    """A TrainConfig field that is also a command-line option (job_options builds them); shown:
    what --help gives as the default where it is not a plain value (None means "the preset's")."""
    return dataclasses.field(default=default,
                             metadata=dict(type=type, help=help, flag=flag, hidden=hidden, shown=shown))


PRESET_S = "the preset's"


@dataclasses.dataclass
class TrainConfig:
    """What a training job is told; every field but `placements` is a command-line option."""
    preset: str = _opt("tiny", click.Choice(list(PRESETS)), "model size")
    steps: int = _opt(30, NONNEG, "optimizer steps in all (a resumed run counts the saved ones)")
    skip_steps: int = _opt(5, NONNEG, "start-up steps left out of the means")
    nproc: int = _opt(1, COUNT, "local processes to spawn (under torchrun, its world)")
    topology: netmoe.Topology = _opt(None, TOPOLOGY, "N virtual nodes of G devices, e.g. 2x2",
                                     shown="1xJ; under torchrun, its nodes x local ranks")
    virtual_world: int = _opt(None, COUNT, "one process playing J devices (the reference model)")
    data: str = _opt(None, click.Path(dir_okay=False), "text file or nanoGPT uint16 .bin", shown="the bundled corpus")
    batch: int = _opt(None, COUNT, "samples per device, I/J", shown=PRESET_S)
    seq_len: int = _opt(None, COUNT, "tokens per sample, S", shown=PRESET_S)
    n_layer: int = _opt(None, COUNT, "transformer blocks, each with an MoE layer", shown=PRESET_S)
    experts_per_device: int = _opt(None, COUNT, "experts per device, E/J", shown=PRESET_S)
    top_k: int = _opt(None, COUNT, "experts per token, K", shown=PRESET_S)
    expert_hidden: int = _opt(None, COUNT, "the experts' FFN width, F (fine-grained experts: below 4H)", shown="4H")
    shared_experts: int = _opt(None, NONNEG, "experts every token passes through, never exchanged", shown=PRESET_S)
    route_groups: int = _opt(None, COUNT, "group-limited routing: experts in M groups of consecutive ids", shown=PRESET_S)
    group_top: int = _opt(None, COUNT, "... a token's K experts from its T best groups (by their two highest "
                          "affinities)", shown=PRESET_S)
    expert_bias: bool = _opt(True, None, "the experts' FFN biases (GPT-2's FFN has them; torchtitan's and DeepSeek's not)",
                             "--expert-bias/--no-expert-bias")
    exchange: str = _opt("expert", click.Choice(list(netmoe.EXCHANGES)),
                         "expert: a row per (token, expert), as the paper; node: a row per (token, node), then NVLink")
    chunks: object = _opt(DEFAULT_CHUNKS, CHUNKS, "pipeline each layer's exchange in C chunks of positions, hops and "
                          "experts overlapped; auto: the C Eq. 1 finds best on the links measured at start-up, then "
                          "each layer times its first calls in 1 chunk, that C and its neighbours and keeps the "
                          "fastest (in one process, Eq. 1 on the modelled links, each call)")
    lookahead: bool = _opt(True, None, "price the next layer's predicted scatter", "--lookahead/--no-lookahead")
    lr: float = _opt(None, POSITIVE, "peak learning rate (AdamW)", shown=PRESET_S)
    warmup_steps: int = _opt(None, NONNEG, "learning-rate warm-up, linear from 0", shown=PRESET_S)
    min_lr: float = _opt(0.1, click.FloatRange(0, 1), "the cosine schedule's floor, a fraction of the peak rate")
    beta1: float = _opt(0.9, click.FloatRange(0, 1, max_open=True), "AdamW's first-moment decay")
    beta2: float = _opt(0.95, click.FloatRange(0, 1, max_open=True), "AdamW's second-moment decay (GPT-3's)")
    clip: float = _opt(1.0, POSITIVE, "clip the global gradient norm to this")
    # the cosine's length is part of a checkpoint's identity: a run cut short resumes on its schedule
    decay_steps: int = _opt(None, COUNT, "length of the cosine learning-rate schedule",
                            shown="--steps; with --resume, the saved schedule's")
    seed: int = _opt(0, NONNEG, "of the weights and the batches")
    eval_batches: int = _opt(2, NONNEG, "validation batches (0: none)")
    log_every: int = _opt(10, COUNT, "a line every N steps")
    json: str = _opt(None, JSON_OUT, "write the per-step record here")
    trace: str = _opt(None, TRACE_OUT, "record routing to this .npz (for simulate)")
    trace_every: int = _opt(1, COUNT, "record the routing of every N-th step")
    ckpt: str = _opt(None, CKPT_DIR, "checkpoint directory (a folder per placement inside)")
    ckpt_every: int = _opt(100, COUNT, "save every N steps (and after the last, and on Ctrl-C)")
    resume: bool = _opt(False, None, "continue from the newest checkpoint in --ckpt", "--resume")
    relayout_every: int = _opt(0, NONNEG, "every T steps regroup experts by co-activation where it pays (0: never)")
    relayout_always: bool = _opt(False, None, "tests: apply every re-layout plan", "--relayout-always", hidden=True)
    alpha: float = _opt(None, click.FloatRange(min=0), "seconds an All-to-All's message costs in either tier, Eq. 1's "
                        "alpha; given, --chunks auto prices on --alpha, --intra-bw and --inter-bw instead of measuring",
                        shown="measured on the ranks' links at start-up; 0 in one process")
    intra_bw: float = _opt(400e9, POSITIVE, "bytes/s inside a node, for Eq. 1 (paper Table 2)")
    inter_bw: float = _opt(100e9, POSITIVE, "bytes/s between nodes, for Eq. 1")
    dtype: str = _opt(None, DTYPE, "the residual stream and the rows every All-to-All sends; weights and AdamW "
                      "state stay float32", shown="bfloat16 on GPUs, float32 on the CPU")
    cpu: bool = _opt(False, None, "stay on the CPU even where CUDA is present", "--cpu")
    grad_sync: str = _opt("backward", click.Choice(["backward", "after"]),
                          "the dense gradients' all-reduce: bucketed inside backward, or one after it (to compare)")
    debug: bool = _opt(False, None, "cross-check placements and expert maps across ranks", "--debug")
    placements: tuple = ("netmoe",)   # trained one after the other, same seed and batches
    ranks_on: str = None   # "cpu", "gpu" or "shared" (rank_devices), decided at launch

    def __post_init__(self):   # the preset's recipe where no rate or warm-up is given (RECIPES)
        lr, warmup = RECIPES[self.preset]
        self.lr = lr if self.lr is None else self.lr
        self.warmup_steps = warmup if self.warmup_steps is None else self.warmup_steps

    def model(self):
        """The GPTConfig: the preset with the overrides given."""
        over = {k: getattr(self, k) for k in ("batch", "seq_len", "n_layer", "experts_per_device", "top_k",
                                              "expert_hidden", "shared_experts", "route_groups", "group_top",
                                              "expert_bias")}
        return dataclasses.replace(PRESETS[self.preset], **{k: v for k, v in over.items() if v is not None})

    def stream_dtype_name(self):
        """The residual stream's dtype: --dtype, else bfloat16 on GPUs and float32 on the CPU."""
        return self.dtype or ("float32" if self.cpu or self.ranks_on == "cpu" else "bfloat16")

    def stream_dtype(self):
        return getattr(torch, self.stream_dtype_name())

    def wire_bytes(self):
        """Bytes of a row on the wire, (scatter, gather), for this job's exchange and dtype."""
        m = self.model()
        return netmoe.exchange_class(self.exchange).wire_bytes(m.hidden, self.stream_dtype(), m.top_k)

    def identity(self, placement, J, vocab):
        """What a checkpoint must match to be resumed."""
        return dict(config=dataclasses.asdict(dataclasses.replace(self.model(), vocab=vocab)), J=J,
                    topology=str(self.topology), placement=placement, seed=self.seed, data=self.data,
                    lr=self.lr, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps or self.steps,
                    min_lr=self.min_lr)


# ---------------------------------------------------------------------------------------------
# Data: real text that ships with every Python, byte-level; or --data FILE
# ---------------------------------------------------------------------------------------------


class Corpus:
    """Documents as byte buffers; a sample is a window of S+1 tokens inside one document.
    Batches are a pure function of (seed, split, step), so every rank can build the whole global
    batch and read targets for whatever samples it holds at the end."""

    def __init__(self, path, seq_len, eval_batches=1):
        if path is None:
            root = sysconfig.get_paths()["stdlib"]
            files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                           if not any(s in f for s in ("site-packages", os.sep + "test", "idle_test")))
            files += [f for f in [os.path.join(root, "LICENSE.txt")] if os.path.exists(f)]
            docs = {os.path.relpath(f, root): np.fromfile(f, dtype=np.uint8) for f in files}
            # 1 file in 20 (by name) is held out, so validation text is unseen code and prose
            split = {"val": [d for n, d in docs.items() if zlib.crc32(n.encode()) % 20 == 0],
                     "train": [d for n, d in docs.items() if zlib.crc32(n.encode()) % 20 != 0]}
            self.vocab, self.name = 256, f"python {sys.version.split()[0]} stdlib ({len(docs)} files)"
        else:
            self.vocab = self.vocab_of(path)
            data = np.memmap(path, dtype=np.uint16, mode="r") if path.endswith(".bin") else np.fromfile(path, np.uint8)
            cut = int(len(data) * 0.9)
            split = {"train": [data[:cut]], "val": [data[cut:]]}
            self.name = os.path.basename(path)
        self.seq_len, self.docs, self.starts = seq_len, {}, {}
        if not eval_batches:   # no validation: a text too short to hold out a val sample still trains
            split["val"] = []
        for name, docs in split.items():
            docs = [d for d in docs if len(d) > seq_len + 1]
            if not docs and (name == "train" or eval_batches):
                fix = "lower --seq-len or give more text" if name == "train" else \
                    "pass --eval-batches 0 (no validation), give a longer file or lower --seq-len"
                raise click.ClickException(f"no {name} document is longer than seq_len+1={seq_len + 1} tokens "
                                           f"({self.name}{', the last 10%' if path and name == 'val' else ''}): {fix}")
            self.docs[name] = docs
            self.starts[name] = np.cumsum([0] + [len(d) - seq_len - 1 for d in docs])

    @functools.cached_property
    def fingerprint(self):
        """What ranks compare: the same text, or targets would not match inputs (every byte,
        about a second per GB)."""
        crc = 0
        for d in self.docs["train"] + self.docs["val"]:
            crc = zlib.crc32(d, crc)
        return crc

    @staticmethod
    def vocab_of(path):
        return 50304 if path and path.endswith(".bin") else 256

    @staticmethod
    def file_problem(path):
        """Why the tokens of --data FILE cannot feed the model, or None. A text file is bytes (any
        will do); a .bin must be nanoGPT's: raw uint16 token ids, each below the vocabulary (a rank
        would meet a larger id as an IndexError inside the embedding). Reads the file once."""
        if not path.endswith(".bin"):
            return None
        size, vocab, fix = os.path.getsize(path), Corpus.vocab_of(path), "np.asarray(ids, np.uint16).tofile(FILE)"
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                return f"{path} is a .npy array, not a raw token file: write the ids as nanoGPT does, {fix}"
        if size % 2:
            return f"{path} has an odd number of bytes: not a uint16 token file (a text file must not end in .bin)"
        ids = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)
        head = ids[:1 << 20]
        if len(head) > 1 and head[0::2].any() and not head[1::2].any():
            return (f"{path} looks like 32- or 64-bit token ids (every second uint16 of its first "
                    f"{len(head):,} is 0); a .bin holds uint16 ids: {fix}")
        block = 1 << 26   # tokens a pass reads: a few hundred MB at most in memory
        for start in range(0, len(ids), block):
            part = ids[start:start + block]
            if int(part.max()) >= vocab:
                at = start + int(np.argmax(part >= vocab))
                return (f"{path} holds token id {int(ids[at]):,} (token {at:,} of {len(ids):,}), outside the "
                        f"vocabulary of {vocab:,} ids: a .bin holds GPT-2 token ids, as nanoGPT's prepare.py "
                        f"writes them")
        return None

    def batch(self, split, step, I, seed):
        rng = np.random.default_rng([seed, step, split == "val"])
        starts = self.starts[split]
        u = rng.integers(0, starts[-1], size=I)
        doc = np.searchsorted(starts, u, side="right") - 1
        rows = [self.docs[split][d][o:o + self.seq_len + 1] for d, o in zip(doc, u - starts[doc])]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Ranks: one process per device (torchrun's, spawned, or this one) and their collectives
# ---------------------------------------------------------------------------------------------


class RankError(RuntimeError):
    """Ranks could not start as asked, or one of them failed: one line for the user."""


def rank_devices(cpu, local_ranks):
    """Where this host's ranks run: "cpu" (asked for, or no GPU: gloo), "gpu" (a GPU each: NCCL)
    or "shared" (fewer GPUs than spawned ranks: they share the GPUs and talk through gloo, which
    stages CUDA tensors through the host; right for seeing every exchange run on CUDA tensors,
    wrong for timing). torchrun's ranks stop with a one-line error instead (another node may have
    the GPUs, and all ranks must pick one backend)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cpu or gpus == 0:
        return "cpu"
    if local_ranks <= gpus:
        return "gpu"
    if "LOCAL_RANK" in os.environ:
        raise RankError(f"{local_ranks} ranks per node but {gpus} GPU(s) here; pass --cpu to run on the CPU")
    print(f"note: {gpus} GPU(s) for {local_ranks} processes: they share the GPU(s) and talk through gloo, which "
          f"copies through the host (for seeing the exchanges run, not for timing; --cpu runs on the CPU)",
          file=sys.stderr)
    return "shared"


def rank_threads(ranks):
    """Torch threads for each of `ranks` processes that share this process's cores: the cores it
    may run on (its affinity, as taskset or a container set it) split among the ranks and among
    the pytest-xdist workers beside it (PYTEST_XDIST_WORKER_COUNT), at least 1. More threads
    than cores oversubscribe them, and ranks spinning in each other's way slow down many times."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // ranks // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))


def start_rank(rank, world, init, where):
    """This process as rank `rank` of `world` on the devices rank_devices chose ("cpu", "gpu" or
    "shared"): its device (local rank r on GPU r, or r modulo the GPUs when shared) and, with more
    than one rank, the process group (NCCL with a GPU each, else gloo). Returns the device."""
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cpu") if where == "cpu" else torch.device("cuda", local % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(rank_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # torch._dynamo (torch.optim imports it) holds on to the default process group when first
    # imported after init_process_group: the group then outlives destroy_process_group, its gloo
    # threads live on into interpreter shutdown, and now and then a rank aborts at exit
    # ("terminate called without an active exception"). Imported before, it holds nothing.
    importlib.import_module("torch._dynamo")
    if world > 1:
        nccl = where == "gpu"
        dist.init_process_group("nccl" if nccl else "gloo", init_method=init, rank=rank, world_size=world,
                                **({"device_id": device} if nccl else {}))
    return device


def run_ranks(worker, nproc, args):
    """worker(rank, world, init, *args, out_path) on every rank: this process as one torchrun
    rank (RANK is set), nproc spawned processes, or this process alone (nproc == 1). Returns the
    JSON rank 0 wrote to out_path; None on the other torchrun ranks. A failing spawned rank
    becomes a RankError of one line. Ctrl-C that stopped the ranks before rank 0 wrote its
    result raises KeyboardInterrupt here; during training it stops and saves (stop_on_sigint)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if "RANK" in os.environ:
            worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", *args, out)
            if int(os.environ["RANK"]) != 0:
                return None
        elif nproc == 1:
            worker(0, 1, None, *args, out)
        else:
            spawn_ranks(worker, nproc, (nproc, "file://" + os.path.join(tmp, "init"), *args, out))
            if not os.path.exists(out):
                raise KeyboardInterrupt   # every rank exited cleanly, so Ctrl-C stopped rank 0 first
        with open(out) as f:
            return json.load(f)


def spawn_ranks(worker, nproc, args):
    """worker(rank, *args) in nproc new processes, joined. Ctrl-C must work at any moment: this
    process passes it on to every rank (`kill -INT` reaches this one alone); a rank ends on it at
    once, wherever it waits, until training turns it into stop-and-save (stop_on_sigint). While a
    rank imports, SIGINT is blocked there (the mask survives exec), so it neither dies inside an
    import with a traceback nor loses the signal: it takes it when it unblocks (_rank_main)."""
    ranks, interrupted = [], []

    def interrupt(*_):
        interrupted.append(True)
        for p in ranks:
            with contextlib.suppress(ProcessLookupError, ValueError):
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)

    # its "Terminating process N via signal SIGTERM" warnings would come before our one-line error
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    old_level, old_handler = spawn_log.level, signal.signal(signal.SIGINT, interrupt)
    spawn_log.setLevel(logging.ERROR)
    try:
        resource_tracker.ensure_running()   # started later, it would unblock SIGINT here in passing
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        try:
            context = mp.start_processes(_rank_main, (worker, *args), nprocs=nproc, join=False)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        ranks.extend(context.processes)
        if interrupted:
            interrupt()
        while not context.join(timeout=1.0):   # wakes up for a Ctrl-C another thread took
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if interrupted:   # a rank that Ctrl-C ended, or one whose peer it ended
            raise KeyboardInterrupt from None
        if isinstance(e, mp.ProcessExitedException):
            raise RankError(f"rank {e.error_index} died ({e}); no result was written") from None
        last = [l for l in str(e).strip().splitlines() if l.strip()][-1]
        if last.startswith("click.exceptions."):   # a message meant for the user as it is
            last = last.split(": ", 1)[-1]
        raise RankError(f"a rank failed: {last}") from None
    finally:
        signal.signal(signal.SIGINT, old_handler)
        spawn_log.setLevel(old_level)


def _rank_main(rank, worker, *args):
    """A spawned rank: from here until training, Ctrl-C (held while it started) ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    worker(rank, *args)


@dataclasses.dataclass
class Env:
    """This rank's place in the job; its collectives are no-ops in one process."""
    rank: int
    world: int        # processes
    J: int            # expert-parallel devices (= world, or virtual_world in one process)
    topo: netmoe.Topology
    device: torch.device

    @property
    def virtual(self):
        return self.world == 1 and self.J > 1

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather(self, value):
        """Every rank's value (any picklable object), in rank order."""
        out = [value] * self.world
        if self.world > 1:
            dist.all_gather_object(out, value)
        return out


@contextlib.contextmanager
def stop_on_sigint():
    """While training runs, Ctrl-C asks every rank to stop at the end of the step (the ranks agree
    through the step's all-reduce) and to save; afterwards the old handler is back."""
    _STOP[0] = False
    old = signal.signal(signal.SIGINT, lambda *_: _STOP.__setitem__(0, True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


_STOP = [False]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _is_expert(p):
    return getattr(p, "expert", False)


class GradientSync:
    """Dense gradients averaged over ranks while backward still runs, as DDP does: the dense
    parameters in buckets of about `bucket_mb` MB, in the reverse of their order in the model
    (about the order backward finishes them); a bucket's all-reduce starts as soon as its last
    gradient is accumulated and every bucket before it has started (every rank starts them in
    the same order). Expert gradients stay out of it: each rank owns its experts, whose
    gradients arrive summed over every rank's loss through the All-to-Alls' backward.
    finish() waits for the buckets and divides every gradient by the world size: the loss is the
    global mean. A parameter backward gave no gradient gets zeros."""

    def __init__(self, model, env, bucket_mb=25, during_backward=True):
        self.model, self.env = model, env
        self.buckets, self.bucket_of, size = [[]], {}, 0
        for p in reversed([p for p in model.parameters() if not _is_expert(p)]):
            if size >= bucket_mb * 2 ** 20:
                self.buckets.append([])
                size = 0
            self.bucket_of[p] = len(self.buckets) - 1
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        if not during_backward:   # one bucket, started once backward is done: for comparison
            self.buckets, self.bucket_of = [list(self.bucket_of)], dict.fromkeys(self.bucket_of, 0)
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.bucket_of] \
            if env.world > 1 and during_backward else []
        self._reset()

    def _reset(self):
        self.done, self.started = [0] * len(self.buckets), []

    def _ready(self, p):
        self.done[self.bucket_of[p]] += 1
        while len(self.started) < len(self.buckets) and self.done[len(self.started)] == len(self.buckets[len(self.started)]):
            self._start(len(self.started))

    def _start(self, b):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[b]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.started.append((flat, dist.all_reduce(flat, async_op=True)))

    def finish(self):
        """Seconds this waited for the all-reduces (the host's view: on gloo, what backward did
        not hide; NaN in one process)."""
        t = time.perf_counter()
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.env.world > 1:
            while len(self.started) < len(self.buckets):   # buckets with a parameter backward never reached
                self._start(len(self.started))
            for (flat, work), bucket in zip(self.started, self.buckets):
                work.wait()
                grads = [p.grad for p in bucket]
                torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
            torch._foreach_div_([p.grad for p in self.model.parameters()], self.env.world)
        self._reset()
        return time.perf_counter() - t if self.env.world > 1 else float("nan")   # in one process nothing waits


def clip_gradients(model, env, max_norm):
    """Clip to a global norm over the dense grads (equal on all ranks) and every rank's own
    experts, without a host sync: the norm (a tensor) is read with the step's other numbers."""
    grads = {e: [p.grad for p in model.parameters() if _is_expert(p) == e] for e in (False, True)}
    square = lambda gs: torch.stack(torch._foreach_norm(gs)).double().square().sum()
    norm = (square(grads[False]) + env.all_reduce(square(grads[True]))).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads[False] + grads[True], scale.to(grads[False][0].dtype))
    return norm


# ---------------------------------------------------------------------------------------------
# Checkpoints: DIR/stepNNNNNNN/{dense.pt, rankR.pt}; DIR/latest names the newest complete one.
# Every rank reads dense.pt on resume: several nodes need DIR on a shared filesystem.
# ---------------------------------------------------------------------------------------------


def atomic_write(path, write, mode="wb"):
    """write(f) to path.part, flushed to disk, then renamed over path: never half a file."""
    with open(path + ".part", mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)



def save_checkpoint(root, step, model, opt, env, identity, state):
    final, tmp = os.path.join(root, f"step{step:07d}"), os.path.join(root, f".step{step:07d}.tmp")
    os.makedirs(tmp, exist_ok=True)   # on every rank: nodes without a shared filesystem too
    mine = dict(experts={n: p.detach().cpu() for n, p in model.named_parameters() if _is_expert(p)},
                opt=opt.state_dict())
    atomic_write(os.path.join(tmp, f"rank{env.rank}.pt"), lambda f: torch.save(mine, f))
    if env.rank == 0:
        dense = {n: p.detach().cpu() for n, p in model.named_parameters() if not _is_expert(p)}
        atomic_write(os.path.join(tmp, "dense.pt"),
                      lambda f: torch.save(dict(dense=dense, step=step, identity=identity, **state), f))
    env.barrier()
    if env.rank == 0:   # the directory appears complete or not at all; then `latest` moves to it
        if os.path.exists(final):
            os.rename(final, tmp + ".old")
        os.rename(tmp, final)
        atomic_write(os.path.join(root, "latest"), lambda f: f.write(os.path.basename(final)), "w")
        prune_checkpoints(root, final)
    env.barrier()


def prune_checkpoints(root, latest, keep=2):
    """Delete all but the newest `keep` step directories, newest by step number (by name,
    step10000000 would sort before step9999999), never `latest`, and leftovers of replaced ones."""
    steps = sorted((int(m.group(1)), path) for path in glob.glob(os.path.join(root, "step*"))
                   if (m := re.fullmatch(r"step(\d+)", os.path.basename(path))))
    for old in [path for _, path in steps[:-keep] if path != latest] + glob.glob(os.path.join(root, ".*.old")):
        shutil.rmtree(old, ignore_errors=True)


def saved_steps(ckpt, placements):
    """{placement: step of its newest checkpoint in ckpt (None if `latest` is unreadable)} for
    each placement that has one."""
    found = {}
    for placement in placements:
        latest = os.path.join(ckpt, placement, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                m = re.fullmatch(r"step(\d+)", f.read().strip())
            found[placement] = int(m.group(1)) if m else None
    return found


def load_checkpoint(root, identity, env, saved_schedule=False):
    """(dense.pt, rankR.pt) of the newest checkpoint, or None where there is none yet. If any
    rank cannot use its part, every rank raises that rank's error (rather than the others
    waiting on the process group's timeout). saved_schedule: any decay_steps will do (a resume
    without --decay-steps continues on the saved schedule)."""
    got, error = None, None
    try:
        if os.path.exists(os.path.join(root, "latest")):
            with open(os.path.join(root, "latest")) as f:
                where = os.path.join(root, f.read().strip())
            got = [torch.load(os.path.join(where, name), weights_only=True) for name in ("dense.pt", f"rank{env.rank}.pt")]
            saved = got[0]["identity"]
            diff = {k: (saved.get(k), v) for k, v in identity.items()
                    if saved.get(k) != v and not (k == "decay_steps" and saved_schedule)}
            if diff:
                error = (f"checkpoint in {root} was written by another configuration: " + ", ".join(
                    f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()) +
                    "; resume with the saved values" + (" (without --decay-steps, the saved schedule is taken)"
                                                        if "decay_steps" in diff else "") +
                    ", or start over with another --ckpt")
    except FileNotFoundError as e:
        error = f"checkpoint in {root} is incomplete ({e.filename} missing)"
    except Exception as e:   # torch's first sentence; the rest of it advises unsafe loading
        error = (f"checkpoint in {root} is unreadable (corrupt or truncated?): "
                 f"{re.split(r'(?<=[.:]) ', str(e).strip().splitlines()[0])[0].rstrip('.:')}")
    if error and not error.startswith(f"checkpoint in {root} was written"):
        error += (f"; to resume from an older step kept there, write its folder's name into {root}/latest, "
                  f"or start over with another --ckpt")
    failed = [(r, e) for r, e in enumerate(env.gather(error)) if e]
    if failed:
        raise click.ClickException(failed[0][1] + (f" (on rank {failed[0][0]})" if env.world > 1 else ""))
    return got


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def global_routes(layers):
    """Each layer's routes in its last call, for the whole global batch, rows by sample id:
    [(route [I, S, K], the lookahead's predicted next-layer route or -1), ...] as numpy. A
    collective: every rank calls it (the layers must have had record = True)."""
    out = []
    for m in layers:
        sid, route, pred = m.last_routes
        pred = torch.full_like(route, -1) if pred is None else pred
        both = torch.cat([sid[:, None, None].expand(-1, route.shape[1], 1), route, pred], 2)
        if not m.virtual and m.J > 1:
            parts = [torch.empty_like(both) for _ in range(m.J)]
            dist.all_gather(parts, both, group=m.group)
            both = torch.cat(parts)
        both = both.cpu()
        both = both[torch.argsort(both[:, 0, 0])]
        out.append((both[..., 1:1 + m.top_k].numpy(), both[..., 1 + m.top_k:].numpy()))
    return out


class Trace:
    """A routing trace, what replay_trace reads: an .npz with route and route_next_pred int16
    [steps, layers, I, S, K], num_experts, and the recorded step numbers. save() rewrites the
    whole file atomically; a trace reopened with keep_before=step keeps its steps before `step`
    (a resumed run continues it)."""

    def __init__(self, path, keep_before=0):
        self.path, self.steps, self.routes = path, [], []
        if keep_before and os.path.exists(path):
            old = np.load(path)
            keep = old["steps"] < keep_before
            self.steps = old["steps"][keep].tolist()
            self.routes = [list(zip(r, p)) for r, p in zip(old["route"][keep], old["route_next_pred"][keep])]

    def add(self, step, routes):
        self.steps.append(step)
        self.routes.append(routes)

    def save(self, **meta):
        arrays = dict(route=np.array([[r for r, _ in t] for t in self.routes], dtype=np.int16),
                      route_next_pred=np.array([[p for _, p in t] for t in self.routes], dtype=np.int16),
                      steps=np.array(self.steps, dtype=np.int64), **meta)
        atomic_write(self.path, lambda f: np.savez_compressed(f, **arrays))



def lr_at(step, cfg):
    warm, total = cfg.warmup_steps, cfg.decay_steps or cfg.steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def forward_loss(model, tokens, env):
    """Every rank holds the global batch's tokens [I, S+1], feeds its slots, and takes targets for
    the samples it holds after the last MoE layer: labels never travel."""
    B = tokens.shape[0] // env.world
    sid = torch.arange(env.rank * B, (env.rank + 1) * B, device=env.device)
    # bf16 products on a GPU whatever the stream's dtype; on the CPU only with a bf16 stream
    with torch.autocast(env.device.type, torch.bfloat16, enabled=env.device.type == "cuda" or model.dtype == torch.bfloat16):
        logits, sid, aux = model(tokens[sid, :-1], sid)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[sid, 1:].reshape(-1))
    return ce, aux


def train(env, mcfg, cfg, placement, corpus, echo):
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg, env.J, cfg.stream_dtype(), placement=placement, lookahead=cfg.lookahead, topology=env.topo,
                exchange=cfg.exchange, chunks=cfg.chunks, links=env.topo if cfg.alpha is not None else None,
                virtual_world=env.J if env.virtual else None, debug=cfg.debug).to(env.device)
    model.init_weights(cfg.seed)
    opt = make_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2))
    sync = GradientSync(model, env, during_backward=cfg.grad_sync == "backward")   # the dense gradients' all-reduce
    ckpt = cfg.ckpt and os.path.join(cfg.ckpt, placement)
    identity = cfg.identity(placement, env.J, corpus.vocab)
    # the re-layout planner's state (rank 0's counts): the measured move rate and, for an exchange
    # whose rows depend on the layout through each token's nodes, the routes of the last batches
    record, start, planner = new_record(), 0, dict(ms_per_byte=None, routes=[[] for _ in model.moe])
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    saved = load_checkpoint(ckpt, identity, env, cfg.decay_steps is None) if ckpt and cfg.resume else None
    if saved:   # a placement with no checkpoint yet (compare stopped before it) starts fresh
        dense, mine = saved
        cfg = dataclasses.replace(cfg, decay_steps=dense["identity"]["decay_steps"])   # the saved schedule
        identity = cfg.identity(placement, env.J, corpus.vocab)
        for m, layout, recent in zip(model.moe, dense["layouts"], dense["recent"]):
            m.set_expert_device(np.asarray(layout))   # the experts were saved in this order
            m.restore_window(r.numpy() for r in recent)
        model.load_state_dict({**dense["dense"], **mine["experts"]})
        opt.load_state_dict(mine["opt"])
        record, start, planner = dense["record"], dense["step"], {**planner, **dense["planner"]}
        echo(f"[{placement}] resumed from {ckpt} at step {start}")
    elif ckpt and cfg.resume:
        echo(f"[{placement}] no checkpoint in {ckpt}: this placement starts from step 0")
    tracing = cfg.trace and placement == cfg.placements[-1]   # routing is the same in every placement
    trace = Trace(cfg.trace, keep_before=start) if tracing and env.rank == 0 else None
    meta = dict(num_experts=mcfg.experts_per_device * env.J, hidden=mcfg.hidden, batch=mcfg.batch, J=env.J,
                dtype=cfg.stream_dtype_name())
    window = model.moe[0].recent.maxlen   # batches a re-layout plan learns from
    by_node = netmoe.exchange_class(cfg.exchange).needs_routes
    # only a placement that moves samples gains from a layout: static EP sends every sample home
    relayouts = cfg.relayout_every if netmoe.placement_class(placement).moves_samples else 0
    flops = record["flops_per_step"] = model.flops_per_token() * mcfg.batch * env.J * mcfg.seq_len
    # Ctrl-C while the model was built is still start-up: every rank stops before a step is trained
    if env.all_reduce(torch.tensor(float(_STOP[0]), dtype=torch.float64, device=env.device)).item():
        raise KeyboardInterrupt
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        tokens = corpus.batch("train", step, mcfg.batch * env.J, cfg.seed).to(env.device)
        traced = tracing and step % cfg.trace_every == 0
        # the planner's routes: the batches its next plan learns from, gathered on those steps only
        planned = by_node and relayouts and relayouts - 1 - step % relayouts < window
        for m in model.moe:
            m.record = bool(traced or planned)
        ce, aux = forward_loss(model, tokens, env)
        if traced or planned:
            routes = global_routes(model.moe)
            if trace and traced:
                trace.add(step, routes)
            if planned and env.rank == 0:
                for kept, (route, _) in zip(planner["routes"], routes):
                    kept[:] = kept[-(window - 1):] + [torch.from_numpy(route.astype(np.int16))]
        (ce + mcfg.aux_coef * aux).backward()
        sync_s = sync.finish()
        norm = clip_gradients(model, env, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if relayouts and (step + 1) % relayouts == 0 and step + 1 < cfg.steps:   # no step left to serve after the last
            record["relayouts"].append(relayout(model, opt, env, cfg, step, planner, echo))
        stats = sum((m.pop_stats() for m in model.moe), netmoe.MoEStats())
        if env.device.type == "cuda":   # the step's time includes its GPU work
            torch.cuda.synchronize()
        iter_ms = (time.perf_counter() - t0) * 1e3
        # the step's one host read of device numbers; the all-reduce also shares Ctrl-C
        shared = torch.stack([ce.detach().double(), norm, *(torch.tensor(v, dtype=torch.float64, device=env.device) for v in (
            stats.a2a_ms, stats.solver_ms, stats.solver_exposed_ms, sync_s * 1e3, iter_ms, float(_STOP[0])))])
        loss, norm, a2a_ms, solver_ms, exposed_ms, sync_ms, iter_ms, stop = (env.all_reduce(shared) / env.world).tolist()
        append_step(record, stats, loss=loss, grad_norm=norm, a2a_ms=a2a_ms, solver_ms=solver_ms, grad_sync_ms=sync_ms,
                    solver_exposed_ms=exposed_ms, iter_ms=iter_ms, tokens_per_s=tokens.shape[0] * mcfg.seq_len / iter_ms * 1e3,
                    tflops=flops / iter_ms / 1e9)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            echo(f"[{placement}] step {step:5d}  loss {loss:.4f}  {iter_ms:8.1f} ms  "
                 f"inter {stats.gather['inter'] + stats.scatter['inter']:>9d}  "
                 f"moved/node {stats.moved_node / max(stats.samples, 1):.2f}")
        if ckpt and (stop or step + 1 == cfg.steps or (step + 1) % cfg.ckpt_every == 0):
            state = dict(record=record, planner=planner, layouts=[m.expert_device.tolist() for m in model.moe],
                         recent=[[torch.from_numpy(r) for r in m.window()] for m in model.moe])
            save_checkpoint(ckpt, step + 1, model, opt, env, identity, state)
            if trace:
                trace.save(**meta)
        if stop:
            echo(f"[{placement}] interrupted after step {step}" +
                 (f"; checkpoint in {ckpt}, continue with --resume" if ckpt else ""))
            record["interrupted"] = True
            break
    if env.device.type == "cuda":   # training's peak, the largest over ranks
        peak = torch.tensor(float(torch.cuda.max_memory_allocated(env.device)), device=env.device)
        record["peak_mem_gb"] = float(env.all_reduce(peak, dist.ReduceOp.MAX)) / 1e9
    record["val_loss"] = evaluate(model, corpus, env, mcfg, cfg) if cfg.eval_batches else None
    record["layouts"] = [m.expert_device.tolist() for m in model.moe]
    if model.moe[0].links is not None:   # what --chunks auto priced on
        record["links"] = links_of(model.moe[0].links)
    if model.moe[0].chunk_trial is not None:   # and what its clock kept, per layer
        record["chunk_trials"] = [m.chunk_trial.record_of() for m in model.moe]
    if trace:
        trace.save(**meta)
    return record


MOVED_BYTES_PER_PARAM = 3 * 4   # a moving expert carries each float32 weight and AdamW's two moments


def relayout(model, opt, env, cfg, step, planner, echo):
    """Regroup each layer's experts by co-activation in its recent batches (netmoe.expert_layout)
    if the modelled All-to-All saving, priced for the exchange that runs, over the steps left in
    the run (the new layout serves until a later plan replaces it) beats the cost of moving the
    weights and optimizer state (at the inter-node bandwidth until a move between ranks has been
    timed). Rank 0 plans and every rank applies its plan: ranks never decide apart."""
    per_expert = MOVED_BYTES_PER_PARAM * sum(p[0].numel() for p in model.moe[0].experts.parameters())
    rate = planner["ms_per_byte"] or 1e3 / env.topo.inter_bw
    plan, windows = None, [m.window() for m in model.moe]   # a collective: each rank holds its samples'
    if env.rank == 0:
        routes, exchange = None, cfg.exchange
        if netmoe.exchange_class(exchange).needs_routes:
            routes = [[r.numpy().astype(np.int64) for r in kept] for kept in planner["routes"]]
            if not routes[0]:   # resumed from a checkpoint that kept no routes: price as the expert exchange once
                routes, exchange = None, netmoe.ExpertExchange.name
        # the counts of the batches whose routes were kept (all of them, but after resuming an older checkpoint)
        recent = [w[len(w) - len(routes[0]):] if routes else w for w in windows]
        plan = netmoe.plan_relayout(recent, [m.expert_device for m in model.moe], env.topo, cfg.wire_bytes(),
                                    per_expert * rate, cfg.steps - step - 1, exchange, routes, cfg.chunks)
    plan = env.gather(plan)[0]   # rank 0's plan, on every rank
    t = time.perf_counter()
    if plan["apply"] or cfg.relayout_always:
        for m, new in zip(model.moe, plan["layouts"]):
            m.relayout(new, opt)
        env.barrier()
        if plan["moving"] and env.world > 1:   # in one process a move is a local copy: keep the network model
            took = env.all_reduce(torch.tensor([time.perf_counter() - t], device=env.device), dist.ReduceOp.MAX)
            planner["ms_per_byte"] = float(took) * 1e3 / (plan["moving"] * per_expert)
    applied = bool(plan["apply"] or cfg.relayout_always)
    echo(f"re-layout after step {step}: {'applied' if applied else 'skipped'}; {plan['moving']} experts "
         f"({plan['moving'] * per_expert / 1e6:.1f} MB) would move; modelled saving {plan['saving_ms']:.3g} ms/step "
         f"x {plan['horizon']} steps left = {plan['saving_ms'] * plan['horizon']:.4g} ms against a "
         f"{plan['cost_ms']:.4g} ms move")
    return dict(step=step + 1, applied=applied, experts_moved=plan["moving"] if applied else 0,
                bytes=plan["moving"] * per_expert, saving_ms_per_step=plan["saving_ms"], horizon_steps=plan["horizon"],
                cost_ms=plan["cost_ms"],
                measured_ms=(time.perf_counter() - t) * 1e3,
                payback_steps=plan["cost_ms"] / plan["saving_ms"] if plan["saving_ms"] > 0 else None)


@torch.no_grad()
def evaluate(model, corpus, env, mcfg, cfg):
    I = mcfg.batch * env.J
    losses = [forward_loss(model, corpus.batch("val", i, I, cfg.seed).to(env.device), env)[0]
              for i in range(cfg.eval_batches)]
    for m in model.moe:
        m.pop_stats()
        m.last_routes = None
    return float(env.all_reduce(torch.stack(losses).mean().double())) / env.world


def new_record():
    vol = lambda: {k: [] for k in ("local", "intra", "inter")}
    return dict(loss=[], grad_norm=[], iter_ms=[], tokens_per_s=[], tflops=[], volume=dict(scatter=vol(), gather=vol()),
                a2a_ms=[], a2a_model_ms=[], solver_ms=[], solver_exposed_ms=[], grad_sync_ms=[],
                moved_frac=dict(node=[], device=[]),
                val_loss=None, relayouts=[])


def append_step(record, stats, **values):
    for k, v in values.items():
        record.setdefault(k, []).append(v)   # setdefault: a record resumed from before a field existed
    record["a2a_model_ms"].append(stats.a2a_model_ms)
    record.setdefault("chunks", []).append(stats.mean_chunks)
    for phase in ("scatter", "gather"):
        for k in ("local", "intra", "inter"):
            record["volume"][phase][k].append(getattr(stats, phase)[k])
    record["moved_frac"]["node"].append(stats.moved_node / max(stats.samples, 1))
    record["moved_frac"]["device"].append(stats.moved_device / max(stats.samples, 1))


# ---------------------------------------------------------------------------------------------
# Results: the table after training (bench.py's summary reuses it)
# ---------------------------------------------------------------------------------------------

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}   # dense, datasheets


def summarize(run, skip, device_name=""):
    """Means over the steps after the first `skip` (the paper reports means over 50 iterations).
    Rates are the measured steps' work over their time, so tokens / s times the mean iteration
    time is a step's tokens (a mean of per-step rates would weigh the fast steps more)."""
    n = len(run["loss"])
    first = min(skip, max(n - 1, 0))
    m = lambda xs: float(np.mean(xs[first:])) if xs else float("nan")
    ms = np.asarray(run["iter_ms"][first:], dtype=float)
    rate = lambda xs: float(np.dot(xs[first:], ms) / ms.sum()) if len(xs) == n and n else float("nan")
    vol = {p: {k: m(run["volume"][p][k]) for k in ("local", "intra", "inter")} for p in ("scatter", "gather")}
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    tflops = rate(run.get("tflops", []))
    moves = run.get("relayouts", [])
    return dict(steps=n, measured=n - first, final_loss=run["loss"][-1] if n else float("nan"),
                val_loss=run["val_loss"], iter_ms=m(run["iter_ms"]),
                iter_ms_median=float(np.median(ms)) if n else float("nan"), tokens_per_s=rate(run.get("tokens_per_s", [])),
                tflops=tflops, mfu=tflops * 1e12 / peak if peak else float("nan"),
                a2a_ms=m(run["a2a_ms"]), a2a_model_ms=m(run["a2a_model_ms"]),
                solver_ms=m(run["solver_ms"]), solver_exposed_ms=m(run["solver_exposed_ms"]),
                grad_sync_ms=m(run.get("grad_sync_ms", [])), chunks=m(run.get("chunks", [])),
                inter=vol["scatter"]["inter"] + vol["gather"]["inter"], gather_inter=vol["gather"]["inter"],
                intra=vol["scatter"]["intra"] + vol["gather"]["intra"],
                moved_node=m(run["moved_frac"]["node"]), moved_device=m(run["moved_frac"]["device"]),
                peak_mem_gb=run.get("peak_mem_gb"), relayouts_applied=sum(r["applied"] for r in moves),
                # the moves' modelled time (the measured move rate once one was timed) against the run's steps
                move_share=sum(r["cost_ms"] for r in moves if r["applied"]) / max(sum(run["iter_ms"]), 1e-9))


def cell(c):
    """A table cell: a measured number to the digits it means (3 significant, whole above 100:
    3,505 ms, 0.0961 TFLOP/s, 0.45 of the samples), an integer whole, a string as it is."""
    if c is None or isinstance(c, float) and math.isnan(c):
        return "-"
    if isinstance(c, float):
        return f"{c:,.0f}" if abs(c) >= 100 else f"{c:.3g}"
    return c if isinstance(c, str) else f"{c:,}"


def table(header, rows):
    cells = [header] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def describe(c, preset=None):
    """A job in one line from its record's config: the model and every option that changes it or
    the exchange (a record written before an option existed ran without it)."""
    J, F, chunks = c["J"], c.get("expert_hidden") or 4 * c["hidden"], c.get("chunks", 1)
    model = [f"{c['n_layer']} layers", f"H={c['hidden']}", f"S={c['seq_len']}", f"I={c['batch'] * J}",
             f"E={c['experts_per_device'] * J}", f"K={c['top_k']}", f"F={F}"]
    if c.get("shared_experts"):
        model.append(f"{c['shared_experts']} shared expert{'s' * (c['shared_experts'] > 1)}")
    if c.get("route_groups", 1) > 1:
        model.append(f"a token's K from {c['group_top']} of {c['route_groups']} groups")
    job = [f"{c.get('exchange', 'expert')} exchange in " +
           (("the chunks Eq. 1 finds best (auto)" if c.get("world") == 1 else "the chunks Eq. 1 proposes and the clock "
             "keeps (auto)") if chunks == "auto" else f"{chunks} chunk{'s' * (chunks != 1)}"),
           f"{c.get('dtype', 'float32')} stream", "lookahead" if c.get("lookahead", True) else "no lookahead"]
    if c.get("relayout_every"):
        job.append(f"re-layout every {c['relayout_every']} steps")
    return (f"{preset + ': ' if preset else ''}{', '.join(model)}; J={J} on {c['topology']}"
            f"{' (virtual, one process)' if c.get('world') == 1 and J > 1 else ''}; {', '.join(job)}")


def links_of(topo):
    """A Topology's links as a record holds them: each tier's alpha (s) and bandwidth (bytes/s)."""
    return {k: getattr(topo, k) for k in ("intra_lat", "intra_bw", "inter_lat", "inter_bw", "overlap", "streams")}


def show_links(links):
    """Links in one phrase: 'in a node 0.21 ms + 3.1 GB/s, between nodes ...' (two messages at once
    only where they went faster than one: the probe times them on CUDA tensors alone)."""
    streams = links.get("streams", 1.0)
    return ", ".join(f"{where} {links[t + '_lat'] * 1e3:.3g} ms + {links[t + '_bw'] / 1e9:.3g} GB/s"
                     for t, where in (("intra", "in a node"), ("inter", "between nodes"))) + \
        f"; {links.get('overlap', 1.0):.0%} of a transfer hidden beside compute" + \
        (f"; two messages at once {streams:.2g}x as fast as one" if streams > 1 else "")


def show_trial(trial):
    """A ChunkTrial's record in one phrase."""
    if trial["kept"] is None:
        return (f"Eq. 1 proposed C={trial['proposed']}; the run ended before its trial of C in "
                f"{trial['candidates']} did ({netmoe.ChunkTrial.ROUNDS} calls each)")
    ms = ", ".join(f"C={C} {v:.3g} ms" for C, v in trial["call_ms"].items())
    return (f"Eq. 1 proposed C={trial['proposed']}, the clock kept C={trial['kept']} (the layer's best forward + "
            f"backward, slowest rank: {ms})")


def links(c):
    """Eq. 1's links as a record's config names them (the defaults, paper Table 2, before it did)."""
    return (f"{c.get('intra_bw', TrainConfig.intra_bw) / 1e9:g} GB/s in a node, "
            f"{c.get('inter_bw', TrainConfig.inter_bw) / 1e9:g} between")


LOSS_ROWS = ("final train loss", "validation loss")


def summary_table(result, skip):
    c = result["config"]
    runs = {p: summarize(r, skip, c.get("device_name", "")) for p, r in result["runs"].items()}
    names = list(runs)
    rows = [("final train loss", "final_loss"), ("validation loss", "val_loss"), ("iteration ms", "iter_ms"),
            ("iteration ms, median", "iter_ms_median"),
            ("tokens / s", "tokens_per_s"), ("model TFLOP/s", "tflops"), ("MFU (bf16 peak)", "mfu"),
            ("All-to-All ms (measured)", "a2a_ms"), ("chunks a layer call ran in, mean", "chunks"),
            (f"All-to-All ms, Eq. 1 at {links(c)}", "a2a_model_ms"),   # the modelled cluster's, not this machine's
            ("inter-node tokens / step", "inter"), ("  of which gather", "gather_inter"),
            ("intra-node tokens / step", "intra"), ("samples moved across nodes", "moved_node"),
            ("samples moved across devices", "moved_device"), ("solver ms / step", "solver_ms"),
            ("solver exposed ms / step", "solver_exposed_ms"),
            ("dense all-reduce, waited ms / step", "grad_sync_ms"), ("re-layouts applied", "relayouts_applied"),
            ("expert moves, share of run time", "move_share"), ("peak GPU memory GB", "peak_mem_gb")]
    # rows no run has anything for (memory and MFU on the CPU, re-layouts where none was planned) are left out
    planned = any(r.get("relayouts") for r in result["runs"].values())
    known = lambda v: v is not None and not (isinstance(v, float) and math.isnan(v))
    rows = [(label, key) for label, key in rows if any(known(runs[n][key]) for n in names)
            and (planned or key not in ("relayouts_applied", "move_share"))
            and not (key == "a2a_ms" and c.get("world") == 1)]   # in one process nothing travels
    # losses to 4 decimals: the digits a loss change between runs is read in
    shown = lambda label, v: f"{v:.4f}" if label in LOSS_ROWS and known(v) else v
    body = [[label] + [shown(label, runs[n][key]) for n in names] for label, key in rows]
    foot = ""
    if tuple(names) == COMPARED:
        for r, (label, key) in zip(body, rows):
            a, b = (runs[n][key] for n in names)
            r.append(f"{abs(b - a):.1e}" if label in LOSS_ROWS and known(a) and known(b) else
                     f"{(b - a) / a * 100:+.1f}%" if label not in LOSS_ROWS and isinstance(a, float) and a
                     and math.isfinite(a) else "")
        names = names + ["change"]
        foot = ("\nloss change: both placements compute the same function, so it is rounding that training "
                "amplifies (more in bf16); weigh it against the spread between seeds (--seed) of one placement, not 0")
    measured = runs[names[0]]["measured"]
    head = (f"{describe(c, c.get('preset'))}; means over {measured} step{'s' * (measured != 1)} after "
            f"{runs[names[0]]['steps'] - measured}")
    probed = next((r["links"] for r in result["runs"].values() if r.get("links")), None)
    if probed and c.get("chunks") == "auto":
        how = "given" if c.get("alpha") is not None else "modelled, one process" if c.get("world") == 1 else "measured"
        head += f"\nthe links --chunks auto priced on ({how}): {show_links(probed)}"
    for name, r in result["runs"].items():
        for layer, trial in enumerate(r.get("chunk_trials") or []):
            head += f"\n[{name}] layer {layer}: {show_trial(trial)}"
    return head + "\n" + table(["", *names], body) + foot


@contextlib.contextmanager
def one_line_errors():
    """Errors reach the user as one line: a failing rank's, and what torch or numpy raise on bad
    input in this process (NETMOE_TRACEBACK=1 shows the traceback)."""
    try:
        yield
    except RankError as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("NETMOE_TRACEBACK") == "1":
            raise
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
        raise OwnError(f"{rank}{type(e).__name__}: {str(e).strip().splitlines()[0]} "
                       f"(NETMOE_TRACEBACK=1 shows where)") from None


class OwnError(click.ClickException):
    """An error this torchrun rank met on its own (what torch or numpy raised), which it says
    itself; every other error of a job is one that its ranks raise alike, from the same input
    or from a check they made together, and a node's local rank 0 alone says it (Cli)."""


# ---------------------------------------------------------------------------------------------
# Launch: torchrun, --nproc spawned processes, or one process
# ---------------------------------------------------------------------------------------------


def resolve(cfg):
    """Check what can be checked before any process starts; returns (GPTConfig, J, topology)."""
    mcfg = cfg.model()
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        default = netmoe.Topology(world // int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                  int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    else:
        world = cfg.nproc
        default = netmoe.Topology(1, cfg.virtual_world or world)
    if cfg.virtual_world and world > 1:
        raise click.UsageError("--virtual-world runs in one process; drop --nproc / torchrun")
    J = cfg.virtual_world or world
    topo = cfg.topology or default
    if topo.world != J:
        fix = (f"pass --virtual-world {topo.world}" if cfg.virtual_world else
               f"start {topo.world} processes with torchrun" if "WORLD_SIZE" in os.environ else
               f"pass --nproc {topo.world} or --virtual-world {topo.world}")
        raise click.UsageError(f"topology {topo} has {topo.world} devices but the job has J={J} "
                               f"({'--virtual-world' if cfg.virtual_world else 'processes'}): {fix}, "
                               f"or give a topology of {J} device{'s' * (J > 1)}")
    if mcfg.top_k > mcfg.experts_per_device * J:
        raise click.UsageError(f"top-k {mcfg.top_k} exceeds the E={mcfg.experts_per_device * J} experts: "
                               f"lower --top-k or raise --experts-per-device")
    if cfg.data and not os.path.exists(cfg.data):
        raise click.UsageError(f"data file {cfg.data} does not exist: give a text file or a nanoGPT .bin, "
                               f"or leave --data out for the bundled corpus")
    if cfg.resume and not cfg.ckpt:
        raise click.UsageError("--resume needs --ckpt DIR")
    saved = saved_steps(cfg.ckpt, cfg.placements) if cfg.ckpt else {}
    if saved and not cfg.resume:   # a fresh run would prune and re-point the saved run's checkpoints
        held = ", ".join(f"{p} at step {s}" if s is not None else p for p, s in saved.items())
        raise click.ClickException(f"{cfg.ckpt} holds a checkpoint ({held}): continue it with --resume, "
                                   f"or start over with another --ckpt (or after deleting {cfg.ckpt})")
    if cfg.resume and not saved:
        raise click.ClickException(f"nothing to resume in {cfg.ckpt}: no checkpoint of "
                                   f"{' or '.join(cfg.placements)} there; drop --resume to start fresh")
    if (cfg.decay_steps or cfg.steps) < cfg.warmup_steps and cfg.decay_steps:
        raise click.UsageError("--decay-steps must not be shorter than --warmup-steps")
    alpha = cfg.alpha or 0.0
    return mcfg, J, dataclasses.replace(topo, intra_bw=cfg.intra_bw, inter_bw=cfg.inter_bw, intra_lat=alpha, inter_lat=alpha)


def available_memory(device):
    """(bytes free for this rank's device, its name): the GPU's free memory, or the host's
    (MemAvailable, else all of its memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device.index} memory"
    try:
        with open("/proc/meminfo") as f:
            free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free, "host memory"


def memory_problem(cfg, mcfg, J, virtual, device, sharing):
    """Why this run cannot fit where this rank runs (memory_estimate for `sharing` ranks on one
    device: the host's processes, or the ranks sharing a GPU), or None: a run that cannot fit is
    refused before it builds its model, rather than ended by the kernel's OOM killer mid-step."""
    need = memory_estimate(mcfg, J, virtual, device.type)
    free, where = available_memory(device)
    if need["total"] * sharing <= free:
        return None
    gb = lambda b: f"{b * sharing / 1e9:.1f} GB"
    smaller = [f"a smaller {o}" for o, show in (("--preset", cfg.preset != "tiny"), ("--virtual-world", virtual)) if show]
    return (f"this run needs about {gb(need['total'])}{f' for its {sharing} ranks' if sharing > 1 else ''} but "
            f"{free / 1e9:.1f} GB of {where} are free: weights and AdamW state {gb(need['weights'])} (lower "
            f"--n-layer or --experts-per-device), activations {gb(need['activations'])} (lower --batch or --seq-len)"
            + (f"; or {' or '.join(smaller)}" if smaller else ""))


def worker(rank, world, init, cfg, out_path):
    """One rank: trains each requested placement in turn; rank 0 writes the records."""
    mcfg, J, topo = resolve(cfg)
    device = start_rank(rank, world, init, cfg.ranks_on or ("cpu" if cfg.cpu else "gpu"))
    try:
        env = Env(rank, world, J, topo, device)
        corpus = Corpus(cfg.data, mcfg.seq_len, cfg.eval_batches)
        mcfg.vocab = corpus.vocab
        if len(set(env.gather(corpus.fingerprint))) > 1:
            raise click.ClickException("ranks read different text (different Python installs?); pass --data FILE")
        # the ranks that share this rank's memory: the host's processes, or those sharing its GPU
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        sharing = local if device.type == "cpu" else -(-local // torch.cuda.device_count())
        failed = [p for p in env.gather(memory_problem(cfg, mcfg, J, env.virtual, device, sharing)) if p]
        if failed:   # every rank stops, with the first one's reason
            raise click.ClickException(failed[0])
        config = dict(dataclasses.asdict(mcfg), preset=cfg.preset, J=J, topology=str(topo), world=world,
                      device=device.type, ranks_on=cfg.ranks_on or ("cpu" if cfg.cpu else "gpu"),
                      device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      data=corpus.name, steps=cfg.steps, skip_steps=cfg.skip_steps, lookahead=cfg.lookahead,
                      lr=cfg.lr, warmup_steps=cfg.warmup_steps, exchange=cfg.exchange, chunks=cfg.chunks,
                      alpha=cfg.alpha, relayout_every=cfg.relayout_every, grad_sync=cfg.grad_sync, intra_bw=topo.intra_bw,
                      inter_bw=topo.inter_bw, dtype=cfg.stream_dtype_name(),
                      wire_bytes_per_row=dict(zip(("scatter", "gather"), cfg.wire_bytes())))
        echo = click.echo if rank == 0 else (lambda *a, **k: None)
        echo(f"{describe(config, cfg.preset)}; {device.type}, data: {corpus.name}")
        runs = {}
        with stop_on_sigint():
            for placement in cfg.placements:
                runs[placement] = train(env, mcfg, cfg, placement, corpus, echo)
                if runs[placement].get("interrupted"):
                    break
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(dict(kind="compare" if tuple(runs) == COMPARED else "train", config=config, runs=runs), f)
    finally:
        if world > 1:   # gloo's threads must be gone before the interpreter is
            dist.destroy_process_group()


def launch(cfg):
    mcfg, J, topo = resolve(cfg)
    if cfg.data:   # read once here, before any rank starts: its tokens, and enough of them to train on
        problem = Corpus.file_problem(cfg.data)
        if problem:
            raise click.ClickException(problem)
        Corpus(cfg.data, mcfg.seq_len, cfg.eval_batches)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc))
    with one_line_errors():
        cfg = dataclasses.replace(cfg, ranks_on=rank_devices(cfg.cpu, local), topology=topo)
        result = run_ranks(worker, cfg.nproc, (cfg,))
    if result is None:   # a torchrun rank other than 0
        return None
    if cfg.json:
        atomic_write(cfg.json, lambda f: json.dump(result, f, indent=1), "w")
    click.echo(summary_table(result, cfg.skip_steps))
    if any(run.get("interrupted") for run in result["runs"].values()):
        raise click.exceptions.Exit(INTERRUPTED)   # saved or not, a script must not take it for a finished run
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def job_options(f):
    """The options of train and compare: TrainConfig's fields."""
    for fld in reversed(dataclasses.fields(TrainConfig)):
        if fld.metadata:
            m = fld.metadata
            decl = [m["flag"]] if m["flag"] else ["--" + fld.name.replace("_", "-")]
            kind = dict(is_flag=True) if m["flag"] and "/" not in m["flag"] else dict(type=m["type"])
            f = click.option(*decl, fld.name, default=shown_value(fld.default),
                             show_default=m["shown"] or fld.default is not None, help=m["help"], hidden=m["hidden"],
                             **kind)(f)
    return f


def shown_value(value):
    """A default as --help should show it: bandwidths as 400e9, not 400000000000.0 (the option
    type reads either back to the same float)."""
    if isinstance(value, float) and value >= 1e4:
        e = 3 * int(math.log10(value) // 3)
        return f"{value / 10 ** e:g}e{e}"
    return value


INTERRUPTED = 130   # the shell's exit status for Ctrl-C
QUIET_RANK_WAIT_S = 5   # a torchrun rank that leaves a job's error to rank 0 waits this long before it exits


class Cli(click.Group):
    """Commands that exit 130 on Ctrl-C with one line, where click would print "Aborted!" and
    exit 1: a script can tell an interrupted run from a failed or a finished one. Under torchrun
    a job's error is said once on each node, by its local rank 0."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C): every rank stopped", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        except click.ClickException as e:
            if isinstance(e, OwnError) or int(os.environ.get("LOCAL_RANK", 0)) == 0:
                raise
            # under torchrun every rank raised it alike: the node's local rank 0 says it, once.
            # torchrun ends the other ranks as soon as one exits: this one gives rank 0 the time.
            time.sleep(QUIET_RANK_WAIT_S)
            raise click.exceptions.Exit(e.exit_code) from None


@click.group(cls=Cli, invoke_without_command=True)
@click.pass_context
def cli(ctx):
    """NetMoE: MoE-GPT training with dynamic sample placement. No subcommand runs the main job."""
    if ctx.invoked_subcommand is None:
        click.echo("main job: tiny MoE-GPT, bundled corpus, 4 CPU processes as 2 nodes x 2, static vs NetMoE")
        ctx.invoke(compare, nproc=4, topology=netmoe.Topology(2, 2), cpu=True, steps=100, log_every=25)


@cli.command("train", short_help="Train one placement (NetMoE or static EP).")
@click.option("--placement", type=click.Choice(list(netmoe.PLACEMENTS)), default="netmoe", show_default=True,
              help="NetMoE's sample placement, static expert parallelism, or kept (NetMoE's work, samples kept in place)")
@job_options
def train_cmd(placement, **kw):
    """Train one placement."""
    launch(TrainConfig(placements=(placement,), **kw))


@cli.command(short_help="Static EP, then NetMoE: same seed, same data, one table side by side.")
@job_options
def compare(**kw):
    """Static EP, then NetMoE: same seed, same data, one table side by side."""
    kw = {**{p.name: p.default for p in compare.params}, **kw}
    launch(TrainConfig(placements=COMPARED, **kw))

if __name__ == "__main__":
    cli()
