"""MoE-GPT training with NetMoE sample placement (every FFN is a netmoe.MoELayer).

  python train_gpt.py                     # the main job: tiny MoE-GPT on the bundled corpus, 4 CPU
                                          # processes as 2 virtual nodes x 2, static vs NetMoE
  python train_gpt.py train --preset tiny --nproc 4 --topology 2x2 --steps 100 --ckpt ck
  python train_gpt.py train --preset s --virtual-world 32 --topology 4x8 --trace s.npz   # one GPU
  python train_gpt.py simulate --trace s.npz --topology 4x8
  python train_gpt.py bench solver
  torchrun --nproc_per_node 8 train_gpt.py compare --preset s --json s.json              # one node
  torchrun --nnodes 4 --nproc_per_node 8 --node_rank $R --master_addr $A --master_port 29500 \\
      train_gpt.py compare --preset s --steps 70 --warmup 20                             # 4 x 8

Under torchrun the topology is WORLD_SIZE / LOCAL_WORLD_SIZE nodes of LOCAL_WORLD_SIZE devices;
--topology NxG declares virtual nodes instead. `run_cluster.sh` wraps the paper's experiment.
"""
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import zlib

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


class GPT(nn.Module):
    """Pre-LN GPT; block = x + Attn(LN(x)), then the MoE layer (which holds its own LN and adds
    the residual on the expert side). Samples may change rank inside every MoE layer: the model
    returns the ids of the samples whose logits it returns."""

    def __init__(self, cfg, J, **moe):
        super().__init__()
        E = cfg.experts_per_device * J
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.ln1 = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(cfg.n_layer))
        self.attn = nn.ModuleList(Attention(cfg) for _ in range(cfg.n_layer))
        self.moe = nn.ModuleList(netmoe.MoELayer(cfg.hidden, 4 * cfg.hidden, E, cfg.top_k, **moe)
                                 for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden)

    def forward(self, idx, sid):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        aux = 0.0
        for i, (ln, attn, moe) in enumerate(zip(self.ln1, self.attn, self.moe)):
            x = x + attn(ln(x))
            x, sid, a = moe(x.float(), sid, next_layer=self.moe[i + 1] if i + 1 < len(self.moe) else None)
            aux = aux + a
        return self.ln_f(x) @ self.wte.weight.T, sid, aux

    def init_weights(self, seed):
        """Independent of how experts are spread: every parameter (each expert separately) is drawn
        from a generator keyed by its name, so any world size builds the same model."""
        for name, p in self.named_parameters():
            key = zlib.crc32(name.encode())
            with torch.no_grad():
                if getattr(p, "expert", False):
                    experts = self.moe[int(name.split(".")[1])].local_experts
                    for i, e in enumerate(experts):
                        g = torch.Generator().manual_seed(seed * 1_000_003 + key * 1009 + int(e))
                        p[i].copy_(_init_like(p[i], name, g))
                else:
                    p.copy_(_init_like(p, name, torch.Generator().manual_seed(seed * 1_000_003 + key)))


def _init_like(p, name, g):
    if name.endswith("bias") or name.split(".")[-1] in ("b1", "b2"):
        return torch.zeros_like(p)
    if p.dim() == 1:   # LayerNorm weight
        return torch.ones_like(p)
    return torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02


# ---------------------------------------------------------------------------------------------
# Data: real text that ships with every Python, byte-level; or --data FILE
# ---------------------------------------------------------------------------------------------


class Corpus:
    """Documents as one byte buffer with offsets; a sample is a window of S+1 tokens inside one
    document. Batches are a pure function of (seed, split, step), so every rank can build the
    whole global batch and read targets for whatever samples it holds at the end."""

    def __init__(self, path, seq_len):
        self.seq_len = seq_len
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
            if not os.path.exists(path):
                raise click.ClickException(f"data file {path} does not exist")
            self.vocab = self.vocab_of(path)
            data = np.memmap(path, dtype=np.uint16, mode="r") if path.endswith(".bin") else np.fromfile(path, np.uint8)
            cut = int(len(data) * 0.9)
            split = {"train": [data[:cut]], "val": [data[cut:]]}
            self.name = os.path.basename(path)
        self.docs, self.starts = {}, {}
        for name, docs in split.items():
            docs = [d for d in docs if len(d) > seq_len + 1]
            if not docs:
                raise click.ClickException(f"no {name} document is longer than seq_len+1={seq_len + 1} tokens")
            self.docs[name] = docs
            self.starts[name] = np.cumsum([0] + [len(d) - seq_len - 1 for d in docs])
        self.fingerprint = zlib.crc32(np.asarray([len(d) for d in self.docs["train"]]).tobytes())

    @staticmethod
    def vocab_of(path):
        return 50304 if path and path.endswith(".bin") else 256

    def batch(self, split, step, I, seed):
        rng = np.random.default_rng([seed, step, split == "val"])
        starts = self.starts[split]
        u = rng.integers(0, starts[-1], size=I)
        doc = np.searchsorted(starts, u, side="right") - 1
        rows = [self.docs[split][d][o:o + self.seq_len + 1] for d, o in zip(doc, u - starts[doc])]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Distributed plumbing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    rank: int
    world: int        # processes
    J: int            # expert-parallel devices (= world, or virtual_world in one process)
    topo: netmoe.Topology
    device: torch.device

    @property
    def virtual(self):
        return self.world == 1 and self.J > 1


def _all_reduce(t, env):
    if env.world > 1:
        dist.all_reduce(t)
    return t


def sync_gradients(model, env):
    """Dense grads: mean over ranks. Expert grads arrive summed over every rank's loss through the
    All-to-All's backward, so they are divided by the same J: the loss is the global mean."""
    dense = [p for p in model.parameters() if not getattr(p, "expert", False)]
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if env.world > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        dist.all_reduce(flat)
        for p, g in zip(dense, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in dense])):
            p.grad.copy_(g / env.world)
        for p in model.parameters():
            if getattr(p, "expert", False):
                p.grad.div_(env.world)


def clip_gradients(model, env, max_norm):
    """Global norm over dense grads (equal on all ranks) and every rank's own experts."""
    dense = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if not getattr(p, "expert", False))
    expert = torch.tensor([sum(float(p.grad.float().pow(2).sum()) for p in model.parameters()
                               if getattr(p, "expert", False))], dtype=torch.float64, device=env.device)
    norm = math.sqrt(dense + float(_all_reduce(expert, env)))
    if norm > max_norm:
        for p in model.parameters():
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


# ---------------------------------------------------------------------------------------------
# Checkpoints: DIR/stepNNNNNNN/{dense.pt, rankR.pt}, DIR/latest names the newest complete one
# ---------------------------------------------------------------------------------------------


def _atomic_save(obj, path):
    torch.save(obj, path + ".part")
    os.replace(path + ".part", path)


def _barrier(env):
    if env.world > 1:
        dist.barrier()


def ckpt_identity(cfg, env, opts):
    return dict(config=dataclasses.asdict(cfg), J=env.J, topology=str(env.topo), world=env.world,
                placement=opts["placement"], seed=opts["seed"], data=opts["data"])


def save_checkpoint(root, step, model, opt, env, identity, record):
    final = os.path.join(root, f"step{step:07d}")
    tmp = os.path.join(root, f".step{step:07d}.tmp")
    if env.rank == 0:
        os.makedirs(tmp, exist_ok=True)
    _barrier(env)
    experts = {n: p.detach().cpu() for n, p in model.named_parameters() if getattr(p, "expert", False)}
    _atomic_save(dict(experts=experts, opt=opt.state_dict()), os.path.join(tmp, f"rank{env.rank}.pt"))
    if env.rank == 0:
        dense = {n: p.detach().cpu() for n, p in model.named_parameters() if not getattr(p, "expert", False)}
        _atomic_save(dict(dense=dense, step=step, identity=identity, record=record,
                          layouts=[m.expert_device.tolist() for m in model.moe]), os.path.join(tmp, "dense.pt"))
    _barrier(env)
    if env.rank == 0:   # the directory appears complete or not at all; then `latest` moves to it
        if os.path.exists(final):
            os.rename(final, tmp + ".old")
        os.rename(tmp, final)
        with open(os.path.join(root, "latest.part"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.part"), os.path.join(root, "latest"))
        for old in sorted(glob.glob(os.path.join(root, "step*")))[:-2] + glob.glob(os.path.join(root, ".*.old")):
            shutil.rmtree(old, ignore_errors=True)
    _barrier(env)


def read_checkpoint(root, identity, rank=None):
    """dense.pt (and rankR.pt) of the newest checkpoint; a click error for anything unusable."""
    try:
        with open(os.path.join(root, "latest")) as f:
            where = os.path.join(root, f.read().strip())
        dense = torch.load(os.path.join(where, "dense.pt"), weights_only=False)
        mine = None if rank is None else torch.load(os.path.join(where, f"rank{rank}.pt"), weights_only=False)
    except FileNotFoundError as e:
        raise click.ClickException(f"no complete checkpoint in {root} ({e.filename} missing)") from None
    except Exception as e:
        raise click.ClickException(f"checkpoint in {root} is unreadable (corrupt or truncated?): {e}") from None
    diff = {k: (dense["identity"].get(k), v) for k, v in identity.items() if dense["identity"].get(k) != v}
    if diff:
        raise click.ClickException(f"checkpoint in {root} was written by another configuration: " +
                                   ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    return dense, mine


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

_STOP = [False]


def _on_sigint(*_):
    _STOP[0] = True   # acted on at the end of the step, by every rank together


def new_record():
    vol = lambda: {k: [] for k in ("local", "intra", "inter")}
    return dict(loss=[], iter_ms=[], volume=dict(scatter=vol(), gather=vol()), a2a_ms=[], a2a_model_ms=[],
                solver_ms=[], solver_exposed_ms=[], moved_frac=dict(node=[], device=[]), val_loss=None, relayouts=[])


def lr_at(step, opts):
    warm, total, lr = opts["warmup_steps"], max(opts["steps"], 1), opts["lr"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def forward_loss(model, corpus, split, step, env, cfg, seed):
    """Every rank builds the global batch, feeds its slots, and takes targets for the samples it
    holds after the last MoE layer: labels never travel."""
    I = cfg.batch * env.J
    tokens = corpus.batch(split, step, I, seed)
    B = I // env.world
    sid = torch.arange(env.rank * B, (env.rank + 1) * B)
    with torch.autocast("cuda", torch.bfloat16, enabled=env.device.type == "cuda"):
        logits, sid, aux = model(tokens[sid, :-1].to(env.device), sid.to(env.device))
        target = tokens[sid.cpu(), 1:].to(env.device)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
    return ce, aux


def train(env, cfg, opts, placement, corpus, echo):
    torch.manual_seed(opts["seed"])
    moe = dict(placement=placement, lookahead=opts["lookahead"], topology=env.topo,
               virtual_world=env.J if env.virtual else None, debug=opts["debug"])
    model = GPT(cfg, env.J, **moe).to(env.device)
    model.init_weights(opts["seed"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                            lr=opts["lr"], betas=(0.9, 0.95))
    ckpt = opts["ckpt"] and os.path.join(opts["ckpt"], placement)
    identity = ckpt_identity(cfg, env, dict(opts, placement=placement))
    record, start = new_record(), 0
    if ckpt and opts["resume"]:
        dense, mine = read_checkpoint(ckpt, identity, env.rank)
        for m, layout in zip(model.moe, dense["layouts"]):   # the experts were saved in this order
            m.set_expert_device(np.asarray(layout))
        model.load_state_dict({**dense["dense"], **mine["experts"]})
        opt.load_state_dict(mine["opt"])
        record, start = dense["record"], dense["step"]
        echo(f"[{placement}] resumed from {ckpt} at step {start}")
    tracing = opts["trace"] and placement == opts["placements"][-1]   # routing is the same in both
    for m in model.moe:
        m.record = bool(tracing)
    traces, traced_steps = [], []
    for step in range(start, opts["steps"]):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, opts)
        ce, aux = forward_loss(model, corpus, "train", step, env, cfg, opts["seed"])
        if tracing and step % opts["trace_every"] == 0:
            traces.append(collect_routes(model, env, cfg))
            traced_steps.append(step)
        (ce + cfg.aux_coef * aux).backward()
        sync_gradients(model, env)
        clip_gradients(model, env, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # static EP sends every sample home, so no layout changes its volumes: only NetMoE re-lays out
        if opts["relayout_every"] and placement == "netmoe" and (step + 1) % opts["relayout_every"] == 0:
            record["relayouts"].append(relayout(model, opt, env, cfg, opts, step, echo))
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        iter_ms = (time.perf_counter() - t0) * 1e3
        stats = sum((m.pop_stats() for m in model.moe), netmoe.MoEStats())
        shared = torch.tensor([ce.item(), stats.a2a_ms, stats.solver_ms, stats.solver_exposed_ms, iter_ms,
                               float(_STOP[0])], dtype=torch.float64, device=env.device)
        shared = (_all_reduce(shared, env) / env.world).tolist()
        append_step(record, shared, stats)
        if env.rank == 0 and (step % opts["log_every"] == 0 or step == opts["steps"] - 1):
            echo(f"[{placement}] step {step:5d}  loss {shared[0]:.4f}  {shared[4]:8.1f} ms  "
                 f"inter {stats.gather['inter'] + stats.scatter['inter']:>9d}  "
                 f"moved/node {stats.moved_node / max(stats.samples, 1):.2f}")
        last = step + 1 == opts["steps"]
        if ckpt and (shared[5] > 0 or last or (step + 1) % opts["ckpt_every"] == 0):
            save_checkpoint(ckpt, step + 1, model, opt, env, identity, record)
        if shared[5] > 0:
            if env.rank == 0:
                echo(f"[{placement}] interrupted after step {step}" +
                     (f"; checkpoint in {ckpt}, continue with --resume" if ckpt else ""))
            record["interrupted"] = True
            break
    record["val_loss"] = evaluate(model, corpus, env, cfg, opts)
    if traces and env.rank == 0:
        save_trace(opts["trace"], traces, traced_steps, cfg, env)
    return record


def relayout(model, opt, env, cfg, opts, step, echo):
    """Regroup each layer's experts by co-activation in its recent batches (netmoe.expert_layout)
    if the modelled All-to-All saving over the next T steps beats the cost of moving the weights
    and AdamW moments (modelled at the inter-node bandwidth until a move has been measured). The
    saving is estimated on batches the trial layout was not learned from (leave one out), since a
    layout always fits the batches it was learned on better than the next ones."""
    T, bpt, topo = opts["relayout_every"], 4 * cfg.hidden, env.topo
    recent = [list(m.recent) for m in model.moe]   # [layer][batch], rows by sample id
    current = [m.expert_device for m in model.moe]
    B = len(recent[0])
    stack = lambda ks: [np.concatenate([batches[k] for k in ks]) for batches in recent]
    plans = netmoe.expert_layout(stack(range(B)), topo, current=current)
    saving_ms = 0.0
    for k in range(B):   # modelled time per step (fwd + bwd), old layouts minus new, each batch
        # scored with layouts learned without it (unseen batches); its true next-layer routing
        # stands in for the lookahead's prediction
        trial = netmoe.expert_layout(stack([j for j in range(B) if j != k] or [k]), topo, current=current)
        batch = [batches[k] for batches in recent]
        saving_ms += (netmoe.replay(batch, topo, bpt, current, batch[1:]).a2a_model_ms -
                      netmoe.replay(batch, topo, bpt, trial, batch[1:]).a2a_model_ms)
    saving_ms /= B
    per_expert = 3 * 4 * sum(p[0].numel() for p in (model.moe[0].w1, model.moe[0].b1, model.moe[0].w2, model.moe[0].b2))
    moving = sum(int((new != m.expert_device).sum()) for m, new in zip(model.moe, plans))
    rate = _RELAYOUT_MS_PER_BYTE[0] or 1e3 / env.topo.inter_bw
    cost_ms = moving * per_expert * rate
    apply = opts["relayout_force"] or saving_ms * T > cost_ms
    t = time.perf_counter()
    if apply:
        for m, new in zip(model.moe, plans):
            m.relayout(new, opt)
        _barrier(env)
        if moving and env.world > 1:   # in one process a move is a local copy: keep the network model
            _RELAYOUT_MS_PER_BYTE[0] = (time.perf_counter() - t) * 1e3 / (moving * per_expert)
    out = dict(step=step + 1, applied=apply, experts_moved=moving if apply else 0, bytes=moving * per_expert,
               saving_ms_per_step=saving_ms, cost_ms=cost_ms, measured_ms=(time.perf_counter() - t) * 1e3,
               payback_steps=cost_ms / saving_ms if saving_ms > 0 else None)
    echo(f"re-layout after step {step}: {'applied' if apply else 'skipped'}; {moving} experts "
         f"({moving * per_expert / 1e6:.1f} MB) would move, modelled saving {saving_ms:.3g} ms/step vs cost "
         f"{cost_ms:.3g} ms")
    return out


_RELAYOUT_MS_PER_BYTE = [None]   # measured on the last re-layout that moved anything


def append_step(record, shared, stats):
    record["loss"].append(shared[0])
    record["a2a_ms"].append(shared[1])
    record["solver_ms"].append(shared[2])
    record["solver_exposed_ms"].append(shared[3])
    record["iter_ms"].append(shared[4])
    record["a2a_model_ms"].append(stats.a2a_model_ms)
    for phase in ("scatter", "gather"):
        for k in ("local", "intra", "inter"):
            record["volume"][phase][k].append(getattr(stats, phase)[k])
    record["moved_frac"]["node"].append(stats.moved_node / max(stats.samples, 1))
    record["moved_frac"]["device"].append(stats.moved_device / max(stats.samples, 1))


@torch.no_grad()
def evaluate(model, corpus, env, cfg, opts):
    losses = [forward_loss(model, corpus, "val", i, env, cfg, opts["seed"])[0] for i in range(opts["eval_batches"])]
    for m in model.moe:
        m.pop_stats()
        m.last_routes = None
    return float(_all_reduce(torch.stack(losses).mean().double(), env)) / env.world


def collect_routes(model, env, cfg):
    """Routes of every layer for the whole global batch, indexed by sample id."""
    out = []
    for m in model.moe:
        sid, route, pred = m.last_routes
        pred = torch.full_like(route, -1) if pred is None else pred
        both = torch.cat([sid[:, None, None].expand(-1, route.shape[1], 1), route, pred], 2)
        if env.world > 1:
            parts = [torch.empty_like(both) for _ in range(env.world)]
            dist.all_gather(parts, both)
            both = torch.cat(parts)
        both = both.cpu()
        both = both[torch.argsort(both[:, 0, 0])]
        out.append((both[..., 1:1 + cfg.top_k].numpy(), both[..., 1 + cfg.top_k:].numpy()))
    return out


def save_trace(path, traces, steps, cfg, env):
    route = np.array([[r for r, _ in t] for t in traces], dtype=np.int16)
    pred = np.array([[p for _, p in t] for t in traces], dtype=np.int16)
    np.savez_compressed(path, route=route, route_next_pred=pred, num_experts=cfg.experts_per_device * env.J,
                        hidden=cfg.hidden, batch=cfg.batch, J=env.J, steps=np.array(steps))


# ---------------------------------------------------------------------------------------------
# Launch: torchrun, --nproc spawned processes, or one process
# ---------------------------------------------------------------------------------------------


def resolve(opts):
    """Validate everything that can be checked before any process starts; returns (cfg, J, topo)."""
    if opts["preset"] not in PRESETS:
        raise click.BadParameter(f"unknown preset {opts['preset']!r}; choose from {', '.join(PRESETS)}",
                                 param_hint="--preset")
    cfg = dataclasses.replace(PRESETS[opts["preset"]], **{k: opts[k] for k in ("batch", "seq_len", "n_layer")
                                                           if opts.get(k)})
    if opts.get("experts_per_device"):
        cfg.experts_per_device = opts["experts_per_device"]
    if opts.get("top_k"):
        cfg.top_k = opts["top_k"]
    if "WORLD_SIZE" in os.environ:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        default = netmoe.Topology(world // local, local)
    else:
        world = opts["nproc"]
        default = netmoe.Topology(1, opts["virtual_world"] or world)
    if opts["virtual_world"] and world > 1:
        raise click.UsageError("--virtual-world runs in one process; drop --nproc / torchrun")
    J = opts["virtual_world"] or world
    topo = netmoe.Topology.parse(opts["topology"]) if opts["topology"] else default
    if topo.world != J:
        raise click.UsageError(f"topology {topo} has {topo.world} devices but the job has J={J} "
                               f"({'--virtual-world' if opts['virtual_world'] else 'processes'})")
    if cfg.top_k > cfg.experts_per_device * J:
        raise click.UsageError(f"top-k {cfg.top_k} exceeds the E={cfg.experts_per_device * J} experts")
    if opts.get("relayout_every", 0) < 0 or opts["steps"] < 0:
        raise click.UsageError("--steps and --relayout-every must not be negative")
    if opts["data"] and not os.path.exists(opts["data"]):
        raise click.UsageError(f"data file {opts['data']} does not exist")
    topo = dataclasses.replace(topo, intra_bw=opts["intra_bw"], inter_bw=opts["inter_bw"])
    return cfg, J, topo


def worker(rank, world, init, opts, out_path):
    """One rank: trains each requested placement in turn; rank 0 writes the records."""
    signal.signal(signal.SIGINT, _on_sigint)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and not opts["cpu"]
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world,
                                **({"device_id": device} if cuda else {}))
    cfg, J, topo = resolve(opts)
    env = Env(rank, world, J, topo, device)
    corpus = Corpus(opts["data"], cfg.seq_len)
    cfg.vocab = corpus.vocab
    if world > 1:   # every rank must read the same text, or targets would not match inputs
        prints = [None] * world
        dist.all_gather_object(prints, corpus.fingerprint)
        if len(set(prints)) > 1:
            raise RuntimeError("ranks see different corpora (different Python installs?); pass --data FILE")
    echo = click.echo if rank == 0 else (lambda *a, **k: None)
    echo(f"{opts['preset']}: {cfg.n_layer} layers, H={cfg.hidden}, S={cfg.seq_len}, I={cfg.batch * J}, "
         f"E={cfg.experts_per_device * J}, K={cfg.top_k}, J={J} on {topo}"
         f"{' (virtual, one process)' if env.virtual else ''}, {device.type}, data: {corpus.name}")
    runs = {}
    for placement in opts["placements"]:
        runs[placement] = train(env, cfg, opts, placement, corpus, echo)
        if runs[placement].get("interrupted"):
            break
    if rank == 0:
        result = dict(config=dict(dataclasses.asdict(cfg), J=J, topology=str(topo), world=world,
                                  device=device.type, data=corpus.name, steps=opts["steps"],
                                  warmup=opts["warmup"], lookahead=opts["lookahead"]), runs=runs)
        with open(out_path, "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


def launch(opts):
    cfg, J, topo = resolve(opts)
    if opts["resume"] and not opts["ckpt"]:
        raise click.UsageError("--resume needs --ckpt DIR")
    if opts["resume"]:   # fail here, in one line, rather than in every rank
        for p in opts["placements"]:
            identity = ckpt_identity(dataclasses.replace(cfg, vocab=Corpus.vocab_of(opts["data"])),
                                     Env(0, 1 if opts["virtual_world"] else J, J, topo, None), dict(opts, placement=p))
            read_checkpoint(os.path.join(opts["ckpt"], p), identity)
    result = run_ranks(worker, opts["nproc"], opts, solo=True, ranks_handle_sigint=True)
    if result is None:   # a torchrun rank other than 0
        return None
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(result, f, indent=1)
    click.echo(summary_table(result, opts["warmup"]))
    return result


def run_ranks(worker, nproc, opts, solo=False, ranks_handle_sigint=False):
    """worker(rank, world, init, opts, out_path) on every rank: this process as one torchrun rank,
    nproc spawned processes, or (solo and nproc == 1) this process alone, with no process group.
    Returns the JSON rank 0 wrote to out_path; None on the other torchrun ranks. With
    ranks_handle_sigint, Ctrl-C goes to the spawned ranks only (they save and stop)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if "RANK" in os.environ:
            worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", opts, out)
            if int(os.environ["RANK"]) != 0:
                return None
        elif solo and nproc == 1:
            worker(0, 1, None, opts, out)
        else:
            if ranks_handle_sigint:
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                mp.spawn(worker, args=(nproc, "file://" + os.path.join(tmp, "init"), opts, out),
                         nprocs=nproc, join=True)
            except mp.ProcessRaisedException as e:
                lines = [l for l in str(e).strip().splitlines() if l.strip()]
                raise click.ClickException(f"a rank failed: {lines[-1]}") from None
            finally:
                if ranks_handle_sigint:
                    signal.signal(signal.SIGINT, old)
        with open(out) as f:
            return json.load(f)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(run, warmup):
    """Means over the steps after warm-up (the paper reports means over 50 iterations)."""
    n = len(run["loss"])
    w = min(warmup, max(n - 1, 0))
    m = lambda xs: _mean(xs[w:])
    vol = {p: {k: m(run["volume"][p][k]) for k in ("local", "intra", "inter")} for p in ("scatter", "gather")}
    return dict(steps=n, measured=n - w, final_loss=run["loss"][-1] if n else float("nan"), val_loss=run["val_loss"],
                iter_ms=m(run["iter_ms"]), a2a_ms=m(run["a2a_ms"]), a2a_model_ms=m(run["a2a_model_ms"]),
                solver_ms=m(run["solver_ms"]), solver_exposed_ms=m(run["solver_exposed_ms"]),
                inter=vol["scatter"]["inter"] + vol["gather"]["inter"],
                intra=vol["scatter"]["intra"] + vol["gather"]["intra"],
                gather_inter=vol["gather"]["inter"], moved_node=m(run["moved_frac"]["node"]),
                moved_device=m(run["moved_frac"]["device"]))


def table(header, rows):
    cells = [header] + [[c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float) else f"{c:,}"
                         for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def summary_table(result, warmup):
    runs = {p: summarize(r, warmup) for p, r in result["runs"].items()}
    names = list(runs)
    rows = [
        ("final train loss", "final_loss"), ("validation loss", "val_loss"), ("iteration ms", "iter_ms"),
        ("All-to-All ms (measured)", "a2a_ms"), ("All-to-All ms (Eq. 1 model)", "a2a_model_ms"),
        ("inter-node tokens / step", "inter"), ("  of which gather", "gather_inter"),
        ("intra-node tokens / step", "intra"), ("samples moved across nodes", "moved_node"),
        ("samples moved across devices", "moved_device"), ("solver ms / step", "solver_ms"),
        ("solver exposed ms / step", "solver_exposed_ms")]
    body = [[label] + [runs[n][key] for n in names] for label, key in rows]
    if names == ["static", "netmoe"]:
        for r in body:
            a, b = r[1], r[2]
            r.append(f"{(b - a) / a * 100:+.1f}%" if isinstance(a, float) and a and r[0] not in
                     ("final train loss", "validation loss") else
                     f"{abs(b - a):.1e}" if r[0] in ("final train loss", "validation loss") else "")
        names = names + ["change"]
    c = result["config"]
    head = (f"{c['n_layer']} layers, H={c['hidden']}, I={c['batch'] * c['J']}, E={c['experts_per_device'] * c['J']},"
            f" K={c['top_k']} on {c['topology']}; means over {runs[names[0]]['measured']} steps after "
            f"{runs[names[0]]['steps'] - runs[names[0]]['measured']} warm-up")
    return head + "\n" + table(["", *names], body)


# ---------------------------------------------------------------------------------------------
# Simulate: replay Algorithm 1 on a recorded trace
# ---------------------------------------------------------------------------------------------


def simulate_trace(trace, topo, bytes_per_token, layout=False):
    """MoEStats of every recorded step under each placement: {name: [stats of step s, ...]}, for
    steps `first`.. (returned too). Samples start where the data loader put them (static) and
    then follow each variant's gathers. With layout, steps 1.. are replayed with each layer's
    experts regrouped by netmoe.expert_layout learned on the (up to 4) recorded steps before
    (other batches), beside the contiguous layout on the same steps: what --relayout-every does
    live from its last 4 batches."""
    route, pred = trace["route"].astype(np.int64), trace["route_next_pred"].astype(np.int64)
    E = int(trace["num_experts"])
    steps, L, I = route.shape[:3]
    if I % topo.world or E % topo.world:
        raise click.UsageError(f"the trace has I={I} samples and E={E} experts: neither may be split over "
                               f"topology {topo} ({topo.world} devices)")
    nums = [[netmoe.count_tokens(route[s, l], E).numpy() for l in range(L)] for s in range(steps)]
    preds = [[netmoe.count_tokens(pred[s, l], E).numpy() for l in range(L - 1)] for s in range(steps)]
    first, learned = 0, [None] * steps
    if layout:
        if steps < 2:
            raise click.UsageError("--layout learns on earlier recorded steps: the trace needs at least 2")
        first = 1
        for s in range(1, steps):   # from up to 4 recorded steps before
            learned[s] = netmoe.expert_layout([np.concatenate([nums[t][l] for t in range(max(0, s - 4), s)])
                                               for l in range(L)], topo)
    variants = {"static": (False, "static", None), "netmoe, no lookahead": (False, "netmoe", None),
                "netmoe + lookahead": (False, "netmoe", "pred"), "netmoe + oracle next": (False, "netmoe", "oracle")}
    if layout:
        variants.update({"static + layout": (True, "static", None),
                         "netmoe + lookahead + layout": (True, "netmoe", "pred")})
    nexts = lambda s, kind: nums[s][1:] if kind == "oracle" else preds[s] if kind == "pred" else None
    return {name: [netmoe.replay(nums[s], topo, bytes_per_token, learned[s] if lay else None, nexts(s, kind), placement)
                   for s in range(first, steps)]
            for name, (lay, placement, kind) in variants.items()}, first


def sim_summary(stats, L, bytes_per_token, compute_ms=None):
    """Per-step means of a list of per-step MoEStats."""
    acc, n = sum(stats, netmoe.MoEStats()), len(stats)
    inter = acc.scatter["inter"] + acc.gather["inter"]
    return dict(inter=inter / n, intra=(acc.scatter["intra"] + acc.gather["intra"]) / n,
                scatter_inter=acc.scatter["inter"] / n, gather_inter=acc.gather["inter"] / n,
                a2a_ms=acc.a2a_model_ms / n, moved_node=acc.moved_node / acc.samples,
                moved_device=acc.moved_device / acc.samples,
                iter_ms=compute_ms + acc.a2a_model_ms / n if compute_ms is not None else None,
                mb_per_a2a=inter / n * bytes_per_token / 1e6 / (2 * L))


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def routed_num(rng, I, E, S=1024, K=2, concentration=0.3):
    """Per-sample expert counts with some data locality: each sample prefers a few experts."""
    prefs = rng.dirichlet(np.full(E, concentration), size=I)
    return np.stack([rng.multinomial(S * K, p) for p in prefs])


def bench_solver(repeats, max_expanded, echo):
    rng = np.random.default_rng(0)
    try:
        import scipy  # noqa: F401  (baseline only)
        methods = ["capacitated", "km", "scipy"]
    except ImportError:
        methods = ["capacitated", "km"]
    cases = [("2x8", 16 * b) for b in (2, 4, 8, 16, 24)] + [("4x8", 1024), ("16x8", 8192)]
    rows, results = [], []
    paper = {32: 0.08, 64: 0.48, 128: 1.48, 256: 10.82, 384: 31.09}   # Table 4, KM ms (J = 16)
    paper_window = {32: 3.69, 64: 7.13, 128: 13.50, 256: 27.31, 384: 41.65}   # Table 4, scatter + compute
    for spec, I in cases:
        topo = netmoe.Topology.parse(spec)
        E = 2 * topo.world
        num, nxt = routed_num(rng, I, E), routed_num(rng, I, E)
        c = (netmoe.placement_costs(num, topo)[0] + netmoe.placement_costs(nxt, topo)[0])
        times, costs = {}, {}
        for m in methods:
            if m != "capacitated" and I > max_expanded:
                continue
            ts = []
            for _ in range(repeats if m == "capacitated" or I <= 512 else max(3, repeats // 10)):
                t = time.perf_counter()
                dest = netmoe.solve_placement(num, topo, num_next=nxt, method=m)
                ts.append(time.perf_counter() - t)
            times[m] = float(np.median(ts)) * 1e3
            costs[m] = int(c[np.arange(I), topo.node_of(dest)].sum())
        same = "yes" if len(set(costs.values())) == 1 else f"NO {costs}"
        window = solver_window(I // topo.world, topo, torch.cuda.is_available()) if spec == "2x8" else {}
        r = dict(topology=spec, I=I, I_per_J=I // topo.world, **{f"{m}_ms": times.get(m) for m in methods},
                 paper_km_ms=paper.get(I) if spec == "2x8" else None, **window,
                 paper_window_ms=paper_window.get(I) if spec == "2x8" else None, same_optimum=same)
        results.append(r)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        rows.append([spec, I, I // topo.world] + [fmt(times.get(m)) for m in methods] +
                    [fmt(times[m] / times["capacitated"]) if m in times else "-" for m in methods[1:]] +
                    [fmt(r["paper_km_ms"]), fmt(window.get("compute_ms")), fmt(window.get("scatter_model_ms")),
                     fmt(r["paper_window_ms"]), same])
    echo(table(["topology", "I", "I/J"] + [f"{m} ms" for m in methods] + [f"{m}/capacitated" for m in methods[1:]]
               + ["paper KM ms", "experts ms (GPU)", "scatter ms (Eq.1)", "paper scatter+compute ms",
                  "same optimum"], rows))
    return results


def solver_window(b, topo, measure, hidden=768, S=1024, K=2, reps=30):
    """The window the solver hides in (Table 4's last column) at I/J = b for MoE-GPT-S on this GPU:
    one device's expert compute, measured (E/J = 2 experts, b * S * K rows split evenly, forward,
    bf16 autocast, CUDA events, median), and the scatter, modelled by Eq. 1 with the topology's
    bandwidths for routing without locality (each device sends (G - 1) / J of its rows to its own
    node and (J - G) / J to others). One GPU cannot time a 16-GPU scatter. Without a GPU
    (measure=False) only the scatter."""
    J, G = topo.world, topo.gpus_per_node
    rows = b * J * S * K   # cluster-wide routed tokens
    out = dict(scatter_model_ms=1e3 * netmoe.a2a_time(dict(intra=rows * (G - 1) // J, inter=rows * (J - G) // J),
                                                      topo, 4 * hidden))
    if not measure:
        return out
    dev = torch.device("cuda")
    layer = netmoe.MoELayer(hidden, 4 * hidden, 2, K).to(dev)
    n = b * S * K
    x, g = torch.randn(n, hidden, device=dev), torch.rand(n, device=dev)
    k0, local = (torch.arange(n, device=dev) % K == 0).float(), torch.arange(n, device=dev) % 2
    ts = []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for i in range(reps + 5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer._experts(x, g, k0, local, [n // 2, n - n // 2])
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                ts.append(start.elapsed_time(end))
    return dict(out, compute_ms=float(np.median(ts)))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def job_options(f):
    opts = [
        click.option("--preset", default="tiny", show_default=True, help=f"one of {', '.join(PRESETS)}"),
        click.option("--steps", default=30, show_default=True),
        click.option("--warmup", default=5, show_default=True, help="steps left out of the means"),
        click.option("--nproc", default=1, show_default=True, help="local processes to spawn (no torchrun)"),
        click.option("--topology", default=None, help="NxG virtual nodes, e.g. 2x2 (default: from torchrun)"),
        click.option("--virtual-world", type=int, default=None, help="one process playing J devices"),
        click.option("--data", default=None, help="text file or nanoGPT uint16 .bin (default: bundled corpus)"),
        click.option("--batch", type=int, default=None, help="samples per device, I/J"),
        click.option("--seq-len", type=int, default=None),
        click.option("--n-layer", type=int, default=None),
        click.option("--experts-per-device", type=int, default=None, help="E/J"),
        click.option("--top-k", type=int, default=None),
        click.option("--lookahead/--no-lookahead", default=True, show_default=True),
        click.option("--lr", default=1e-3, show_default=True),
        click.option("--warmup-steps", default=10, show_default=True, help="learning-rate warm-up"),
        click.option("--seed", default=0, show_default=True),
        click.option("--eval-batches", default=2, show_default=True),
        click.option("--log-every", default=10, show_default=True),
        click.option("--json", "json_path", default=None, help="write the per-step record here"),
        click.option("--trace", default=None, help="record routing to this .npz (for simulate)"),
        click.option("--trace-every", default=1, show_default=True),
        click.option("--ckpt", default=None, help="checkpoint directory"),
        click.option("--ckpt-every", default=100, show_default=True),
        click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --ckpt"),
        click.option("--relayout-every", default=0, show_default=True,
                     help="every T steps regroup experts by co-activation when it pays (NetMoE runs; 0: never)"),
        click.option("--relayout-force", is_flag=True, help="apply every re-layout, paying or not (tests)"),
        click.option("--intra-bw", default=400e9, show_default=True, help="bytes/s, for Eq. 1"),
        click.option("--inter-bw", default=100e9, show_default=True, help="bytes/s, for Eq. 1"),
        click.option("--cpu", is_flag=True, help="stay on the CPU even where CUDA is present"),
        click.option("--debug/--no-debug", default=False, help="cross-check placements across ranks"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _opts(kw, placements):
    kw["json"] = kw.pop("json_path")
    kw["placements"] = placements
    return kw


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx):
    """NetMoE: MoE-GPT training with dynamic sample placement. No subcommand runs the main job."""
    if ctx.invoked_subcommand is None:
        click.echo("main job: tiny MoE-GPT, bundled corpus, 4 CPU processes as 2 nodes x 2, static vs NetMoE")
        ctx.invoke(compare, nproc=4, topology="2x2", cpu=True, steps=100, log_every=25)


@cli.command("train")
@click.option("--placement", type=click.Choice(["netmoe", "static"]), default="netmoe", show_default=True)
@job_options
def train_cmd(placement, **kw):
    """Train one placement."""
    launch(_opts(kw, [placement]))


@cli.command()
@job_options
def compare(**kw):
    """Static EP, then NetMoE: same seed, same data, one table side by side."""
    kw = {**{p.name: p.default for p in compare.params}, **kw}
    launch(_opts(kw, ["static", "netmoe"]))


@cli.command()
@click.option("--trace", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--topology", required=True, help="NxG, e.g. 4x8")
@click.option("--intra-bw", default=400e9, show_default=True)
@click.option("--inter-bw", default=100e9, show_default=True)
@click.option("--bytes-per-token", type=int, default=None, help="default: 4 * H from the trace (fp32)")
@click.option("--compute-ms", type=float, default=None, help="per-iteration compute time, for an estimate")
@click.option("--layout", is_flag=True, help="also regroup experts by co-activation learned on earlier steps")
@click.option("--stages", type=click.IntRange(min=1), default=6, show_default=True, help="rows of the by-stage-of-training table")
@click.option("--json", "json_path", default=None)
def simulate(trace, topology, intra_bw, inter_bw, bytes_per_token, compute_ms, layout, stages, json_path):
    """Replay Algorithm 1 on a recorded routing trace: volumes and Eq. 1 times per placement."""
    try:
        t = dict(np.load(trace))
    except Exception as e:
        raise click.ClickException(f"{trace} is not a routing trace: {e}") from None
    topo = netmoe.Topology.parse(topology, intra_bw=intra_bw, inter_bw=inter_bw)
    bpt = bytes_per_token or 4 * int(t.get("hidden", 768))
    per_step, first = simulate_trace(t, topo, bpt, layout)
    steps, L, I, S, K = t["route"].shape
    res = {name: sim_summary(st, L, bpt, compute_ms) for name, st in per_step.items()}
    base = res["static"]
    rows = [[name, r["inter"], f"{(r['inter'] / base['inter'] - 1) * 100:+.1f}%" if base["inter"] else "-",
             r["gather_inter"], r["intra"], f"{(r['intra'] / base['intra'] - 1) * 100:+.1f}%" if base["intra"] else "-",
             r["mb_per_a2a"], r["moved_node"], r["moved_device"], r["a2a_ms"]]
            + ([r["iter_ms"]] if compute_ms is not None else []) for name, r in res.items()]
    click.echo(f"trace {trace}: {steps} steps x {L} layers, I={I}, S={S}, K={K}, E={int(t['num_experts'])}; "
               f"on {topo}, {bpt} bytes/token; volumes are routed tokens per iteration (forward)")
    click.echo(table(["placement", "inter", "vs static", "gather inter", "intra", "vs static", "inter MB/A2A",
                      "moved node", "moved dev", "A2A ms (Eq.1)"] + (["iter ms"] if compute_ms is not None else []),
                     rows))
    n = steps - first
    if n > 1:   # does locality change as training goes on? consecutive recorded steps in `stages` groups
        recorded = [int(x) for x in t["steps"]] if "steps" in t else list(range(steps))
        bounds = np.linspace(0, n, min(stages, n) + 1).round().astype(int)
        res["by_stage"] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            r = {name: sim_summary(st[a:b], L, bpt) for name, st in per_step.items()}
            res["by_stage"].append(dict(steps=[recorded[first + a], recorded[first + b - 1]], **r))
        click.echo("by stage of training (inter-node tokens per step; change vs static):")
        click.echo(table(["training steps", "static"] + [n for n in res if n not in ("static", "by_stage")],
                         [[f"{g['steps'][0]}-{g['steps'][1]}", g["static"]["inter"]] +
                          [f"{(g[n]['inter'] / g['static']['inter'] - 1) * 100:+.1f}%" for n in per_step if n != "static"]
                          for g in res["by_stage"]]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(trace=os.path.basename(trace), topology=topology, bytes_per_token=bpt, results=res), f,
                      indent=1)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--warmup", type=int, default=None, help="default: the warm-up each run used")
def summary(files, warmup):
    """One table over `compare --json` files: static vs NetMoE per run."""
    rows = []
    for path in files:
        with open(path) as f:
            res = json.load(f)
        c, runs = res["config"], res["runs"]
        if set(runs) != {"static", "netmoe"}:
            raise click.ClickException(f"{path} does not hold a static and a netmoe run (use compare --json)")
        s, n = (summarize(runs[p], c["warmup"] if warmup is None else warmup) for p in ("static", "netmoe"))
        rows.append([os.path.basename(path), f"H={c['hidden']} L={c['n_layer']}", c["topology"], s["measured"],
                     s["iter_ms"], n["iter_ms"], f"{s['iter_ms'] / n['iter_ms']:.3f}x", s["a2a_ms"], n["a2a_ms"],
                     f"{(n['inter'] / s['inter'] - 1) * 100:+.1f}%" if s["inter"] else "-",
                     f"{(n['intra'] / s['intra'] - 1) * 100:+.1f}%" if s["intra"] else "-",
                     n["solver_exposed_ms"], f"{abs(n['final_loss'] - s['final_loss']):.1e}"])
    click.echo(table(["run", "model", "topology", "steps", "static iter ms", "netmoe iter ms", "speedup",
                      "static A2A ms", "netmoe A2A ms", "inter tokens", "intra tokens", "solver exposed ms",
                      "|loss diff|"], rows))


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--smooth", default=10, show_default=True, help="moving average over this many steps")
def plot(files, smooth):
    """PNG beside each result JSON: solver time vs I (bench solver), measured vs modelled
    All-to-All (bench a2a), inter-node tokens per step over training (train / compare), or per
    placement and stage of training (simulate). Needs matplotlib (pip install matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("plot needs matplotlib: pip install matplotlib") from None
    skipped = []
    for path in files:
        try:
            with open(path) as f:
                res = json.load(f)
        except ValueError as e:
            raise click.ClickException(f"{path} is not JSON: {e}") from None
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        if isinstance(res, list) and res and "capacitated_ms" in res[0]:
            rows = [dict(r, window_ms=r["compute_ms"] + r["scatter_model_ms"] if r.get("compute_ms") else None)
                    for r in res if r["topology"] == "2x8"]
            I = [r["I"] for r in rows]
            for key, label in (("capacitated_ms", "ours (capacitated)"), ("km_ms", "our KM, I x I"),
                               ("scipy_ms", "scipy, I x I"), ("paper_km_ms", "paper's KM"),
                               ("window_ms", "window: experts (this GPU) + scatter (Eq. 1)"),
                               ("paper_window_ms", "paper's window: scatter + compute")):
                pts = [(i, r[key]) for i, r in zip(I, rows) if r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), "--" if "window" in label else "-o", label=label, ms=3)
            ax.set(xscale="log", yscale="log", xlabel="I (samples, J = 16 as 2x8)", ylabel="ms",
                   title="Solve time (Table 4)")
        elif isinstance(res, dict) and "cases" in res and "fit" in res:
            for kind in sorted({c["kind"] for c in res["cases"]}):
                pts = [(c["model_ms"], c["measured_ms"]) for c in res["cases"] if c["kind"] == kind]
                ax.plot(*zip(*pts), "o", ms=3, label=kind)
            top = max(max(c["model_ms"], c["measured_ms"]) for c in res["cases"])
            ax.plot([0, top], [0, top], "k:", lw=0.8, label="model = measured")
            ax.set(xlabel="Eq. 1 with fitted alpha and bandwidth, ms", ylabel="measured All-to-All, ms",
                   title=f"Cost model check, {res['options']['nproc']} ranks as "
                         f"{res['options']['topology'] or '1x%d' % res['options']['nproc']}")
        elif isinstance(res, dict) and "by_stage" in res.get("results", {}):
            stages = res["results"]["by_stage"]
            x = [sum(g["steps"]) / 2 for g in stages]
            for name in res["results"]:
                if name != "by_stage":
                    ax.plot(x, [g[name]["inter"] for g in stages], "-o", ms=3, label=name)
            ax.set(xlabel="training step (middle of each stage)", ylabel="inter-node tokens / step",
                   title=f"{res['topology']}: inter-node routed tokens, replayed")
        elif isinstance(res, dict) and "runs" in res:
            k = max(1, smooth)
            for name, r in res["runs"].items():
                v = np.add(r["volume"]["scatter"]["inter"], r["volume"]["gather"]["inter"]).astype(float)
                if len(v) >= k:
                    ax.plot(np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, "valid"), label=name)
                for rl in r.get("relayouts", []):
                    if rl.get("applied"):
                        ax.axvline(rl["step"], color="grey", lw=0.6, ls=":")
            ax.set(xlabel="step", ylabel="inter-node tokens / step",
                   title=f"{res['config']['topology']}: inter-node routed tokens ({k}-step mean)")
        else:
            plt.close(fig)
            skipped.append(path)
            continue
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = os.path.splitext(path)[0] + ".png"
        fig.savefig(out)
        plt.close(fig)
        click.echo(f"wrote {out}")
    if skipped:
        click.echo(f"skipped (not a bench solver / a2a, train / compare or simulate JSON): {', '.join(skipped)}")
        if len(skipped) == len(files):
            raise click.ClickException("nothing to plot")


@cli.group()
def bench():
    """Benchmarks: solver (CPU; the window on GPU), layer and a2a (several GPUs or CPU processes), kernels (CUDA)."""


@bench.command("solver")
@click.option("--repeats", default=50, show_default=True)
@click.option("--max-expanded", default=1024, show_default=True, help="largest I for the I x I baselines")
@click.option("--json", "json_path", default=None)
def bench_solver_cmd(repeats, max_expanded, json_path):
    """Algorithm 1's Solve: capacitated vs KM on the paper's expanded matrices vs scipy (paper Table 4)."""
    click.echo("two-stage Solve with lookahead, routed counts with locality (S=1024, K=2, E=2J); median ms")
    res = bench_solver(repeats, max_expanded, click.echo)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


def bench_kernels(echo=print, reps=50, sets=4):
    """Time each op of kernels.cu against the torch code it replaces, on an NVIDIA GPU.

    Shapes: (a) the paper's per-GPU layer, B=4 samples of S=1024 tokens, K=2, E=64 on J=32
    devices (4x8); (b) a large one, B=16, S=4096, K=8, E=256 (4x8). GPU ops are timed with CUDA
    events, median of `reps` runs after warm-up, inputs rotated over `sets` fresh sets, and L2
    wiped (a 256 MB write) before each run so no run reads the last one's data from cache; the
    wipe also keeps the GPU busy while the host queues the op, so launch latency on the host is
    not counted. placement_costs' reference is numpy on the CPU, so both sides of that row are
    wall-clock times including the copy to the host that the solver needs anyway.
    The floor: a 1 GiB device-to-device copy (bytes read + written over its time); each op's
    achieved rate is the bytes it must move (inputs read once, outputs written once) over its time.
    Returns one dict per row."""
    ops = netmoe.hot_path("cuda")
    if ops is netmoe._REFERENCE:
        raise RuntimeError("kernels.cu did not build: nothing to benchmark")
    ref = netmoe._REFERENCE
    dev = torch.device("cuda")
    wipe = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def gpu_ms(fn, inputs):
        for args in inputs * 2:   # warm-up: module load, allocator, clocks
            fn(*args)
        torch.cuda.synchronize()
        events = []
        for r in range(reps):
            wipe.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[r % len(inputs)])
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return float(np.median([s.elapsed_time(e) for s, e in events]))

    def wall_ms(fn, inputs):
        for args in inputs * 2:
            fn(*args)
        times = []
        for r in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn(*inputs[r % len(inputs)])
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    copy_ms = gpu_ms(lambda: dst.copy_(big), [()])
    copy_bw = 2 * big.numel() / copy_ms / 1e6   # GB/s
    del big, dst
    tiny = torch.zeros(1, device=dev)
    launch_ms = gpu_ms(lambda: tiny.add_(1), [()])
    echo(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy_bw:.0f} GB/s, "
         f"one tiny kernel {launch_ms * 1e3:.1f} us")

    rows = []
    for label, B, S, K, E, topo in (("paper", 4, 1024, 2, 64, "4x8"), ("large", 16, 4096, 8, 256, "4x8")):
        topo = netmoe.Topology.parse(topo)
        J, I = topo.world, B * topo.world
        shape = f"{label} B={B} S={S} K={K} E={E} J={J}"
        El = E // J
        cases = {name: [] for name in ("count_tokens", "placement_costs", "dispatch_order", "gather_order")}
        for _ in range(sets):
            route_all = torch.randint(E, (I, S, K), device=dev)   # the whole global batch's routing
            route = route_all[:B].contiguous()                    # this rank's samples
            num = ops.count_tokens(route_all, E)
            ed = torch.as_tensor(netmoe.default_expert_device(E, J), device=dev)
            slot = torch.randperm(E, device=dev)
            # rank 0's expert side, laid out as MoELayer._forward_ep receives it: (source, expert, b)
            cnt = num[:, :El].reshape(J, B, El).permute(0, 2, 1).reshape(-1)
            src = torch.arange(I, device=dev).reshape(J, 1, B).expand(J, El, B).reshape(-1).repeat_interleave(cnt)
            dest = torch.randperm(I, device=dev) // B
            cases["count_tokens"].append((route, E))
            cases["placement_costs"].append((num, ed))
            cases["dispatch_order"].append((route, slot))
            cases["gather_order"].append((src, dest, I))
        n_route, n_src = route.numel(), src.numel()
        moved = {   # bytes each op must read + write
            "count_tokens": n_route * 8 + B * E * 8,
            "placement_costs": I * E * 8 + E * 8 + I * (topo.nodes + J) * 8,
            "dispatch_order": n_route * 8 + E * 8 + n_route * 8,
            "gather_order": n_src * 8 + I * 8 + n_src * 8,
        }
        timings = {
            "count_tokens": (gpu_ms(ref.count_tokens, cases["count_tokens"]),
                             gpu_ms(ops.count_tokens, cases["count_tokens"])),
            "placement_costs": (
                wall_ms(lambda num, ed: ref.placement_costs(num, topo, ed.cpu()), cases["placement_costs"]),
                wall_ms(lambda num, ed: [t.cpu() for t in ops.placement_costs(num, ed, topo.nodes, topo.gpus_per_node)],
                        cases["placement_costs"])),
            "dispatch_order": (gpu_ms(ref.dispatch_order, cases["dispatch_order"]),
                               gpu_ms(ops.dispatch_order, cases["dispatch_order"])),
            "gather_order": (gpu_ms(ref.gather_order, cases["gather_order"]),
                             gpu_ms(ops.gather_order, cases["gather_order"])),
        }
        for name, (t_ref, t_cuda) in timings.items():
            gbs = moved[name] / t_cuda / 1e6
            rows.append(dict(kernel=name, shape=shape, n=n_src if name == "gather_order" else n_route,
                             torch_ms=t_ref, cuda_ms=t_cuda, speedup=t_ref / t_cuda, bytes=moved[name],
                             gb_s=gbs, copy_frac=gbs / copy_bw, copy_gb_s=copy_bw,
                             timing="wall, incl. copy to host" if name == "placement_costs" else "cuda events"))
        if label == "large":
            pc = cases["placement_costs"][0]
            rows.append(dict(kernel="placement_costs (gpu only)", shape=shape, n=I * E,
                             torch_ms=float("nan"),
                             cuda_ms=gpu_ms(lambda num, ed: ops.placement_costs(num, ed, topo.nodes, topo.gpus_per_node), [pc]),
                             speedup=float("nan"), bytes=moved["placement_costs"], copy_gb_s=copy_bw,
                             timing="cuda events"))
            rows[-1]["gb_s"] = rows[-1]["bytes"] / rows[-1]["cuda_ms"] / 1e6
            rows[-1]["copy_frac"] = rows[-1]["gb_s"] / copy_bw

    echo(f"{'kernel':<27} | {'shape':<34} | {'torch ms':>9} | {'cuda ms':>8} | {'speedup':>7} | "
         f"{'GB/s':>7} | {'% of copy bw':>12}")
    for r in rows:
        echo(f"{r['kernel']:<27} | {r['shape']:<34} | {r['torch_ms']:>9.4f} | {r['cuda_ms']:>8.4f} | "
             f"{r['speedup']:>6.1f}x | {r['gb_s']:>7.0f} | {100 * r['copy_frac']:>11.1f}%")
    return rows


def _bench_init(rank, world, init):
    """One GPU per rank with NCCL where there are GPUs, else a CPU process with gloo."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    return cuda, device


def _spawn_bench(worker, o):
    """Run worker(rank, world, init, o, out_path) on o["nproc"] spawned processes, or on this
    process as one rank of torchrun (then --nproc is the world size and the topology defaults to
    nodes x local ranks). Rank 0's JSON; None on the other torchrun ranks."""
    if "RANK" in os.environ:
        o["nproc"] = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", o["nproc"]))
        o["topology"] = o["topology"] or f"{o['nproc'] // local}x{local}"
    if o["topology"] and netmoe.Topology.parse(o["topology"]).world != o["nproc"]:
        raise click.UsageError(f"topology {o['topology']} does not have {o['nproc']} devices (--nproc)")
    return run_ranks(worker, o["nproc"], o)


def _a2a_bench_worker(rank, world, init, o, out_path):
    """Eq. 1 against timed All-to-Alls: profile each tier, then time traffic matrices and predict."""
    cuda, device = _bench_init(rank, world, init)
    topo = netmoe.Topology.parse(o["topology"] or f"1x{world}")
    H, J = o["hidden"], world
    node = np.arange(J) // topo.gpus_per_node
    same, eye = node[:, None] == node[None], np.eye(J, dtype=bool)
    tiers = {"intra": same & ~eye, "inter": ~same}

    def timed(T):   # T[j, k]: tokens j sends k; median over repeats of the slowest rank
        send, recv = [int(v) for v in T[rank]], [int(v) for v in T[:, rank]]
        x = torch.full((sum(send), H), float(rank), device=device)
        y = torch.empty(sum(recv), H, device=device)
        ts = []
        for it in range(o["warmup"] + o["repeats"]):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            dist.all_to_all_single(y, x, recv, send)
            if cuda:
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        src = torch.repeat_interleave(torch.arange(J, device=device), torch.tensor(recv, device=device))
        if not torch.equal(y[:, 0], src.float()):   # each row came from the rank the split sizes say
            raise RuntimeError("All-to-All delivered rows from the wrong ranks")
        ts = torch.tensor(ts[o["warmup"]:], dtype=torch.float64, device=device)
        dist.all_reduce(ts, op=dist.ReduceOp.MAX)
        return float(ts.median())

    bpt = 4 * H
    volume = lambda T: {t: int(T[m].sum()) for t, m in tiers.items()}
    fit = {}
    for tier, mask in tiers.items():   # Eq. 1 per tier: t = alpha + bytes / v, least squares over sizes
        if not mask.any():
            continue
        pts = [(int(mask.sum()) * n * bpt, timed(mask * n)) for n in o["sizes"]]
        slope, alpha = np.polyfit(*zip(*pts), 1)
        fit[tier] = dict(alpha_ms=max(float(alpha), 0.0), bw=1e3 / slope if slope > 0 else float("inf"), points=pts)
    model = netmoe.Topology(topo.nodes, topo.gpus_per_node,
                            **{f"{t}_{k}": v for t in ("intra", "inter") if t in fit
                               for k, v in (("bw", fit[t]["bw"]), ("lat", fit[t]["alpha_ms"] / 1e3))})
    rng = np.random.default_rng(o["seed"])   # the same matrices on every rank
    cases = []
    for c in range(o["cases"]):
        if c % 2 == 0:   # skewed: each device's rows spread by a Dirichlet draw
            T = np.stack([rng.multinomial(o["tokens"], rng.dirichlet(np.full(J, 0.3))) for _ in range(J)])
            kind = "skewed"
        else:   # what NetMoE's gather sends, on counts with locality
            num = routed_num(rng, o["batch"] * J, 2 * J, S=o["tokens"] // (2 * o["batch"]))
            T = netmoe.pair_traffic(num, netmoe.solve_placement(num, topo), topo).T
            kind = "netmoe gather"
        v = volume(T)
        cases.append(dict(kind=kind, intra_bytes=v["intra"] * bpt, inter_bytes=v["inter"] * bpt,
                          measured_ms=timed(T), model_ms=1e3 * netmoe.a2a_time(v, model, bpt)))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(fit=fit, cases=cases), f)
    dist.destroy_process_group()


@bench.command("a2a", short_help="the cost model (Eq. 1) against timed All-to-Alls")
@click.option("--nproc", default=4, show_default=True, help="GPUs (or CPU processes) to spawn")
@click.option("--topology", default=None, help="NxG virtual nodes; default 1xNPROC")
@click.option("--hidden", default=768, show_default=True, help="row width: fp32 rows of MoE-GPT-S")
@click.option("--tokens", default=8192, show_default=True, help="rows each device sends in a test case")
@click.option("--batch", default=4, show_default=True, help="I/J for the NetMoE cases")
@click.option("--sizes", default="64,256,1024,4096,16384", show_default=True, help="rows per pair when profiling")
@click.option("--cases", default=40, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--repeats", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None)
def bench_a2a_cmd(json_path, **o):
    """Does Eq. 1 predict real All-to-Alls? Profiles alpha and bandwidth per tier (as the paper
    does), then times skewed and NetMoE-produced traffic matrices against the fitted model."""
    try:
        o["sizes"] = [int(v) for v in o["sizes"].split(",")]
    except ValueError:
        raise click.BadParameter(f"{o['sizes']!r} is not a comma-separated list of integers", param_hint="--sizes")
    if len(o["sizes"]) < 2 or min(o["sizes"]) < 1:
        raise click.BadParameter("give at least two positive sizes to fit a line through", param_hint="--sizes")
    res = _spawn_bench(_a2a_bench_worker, o)
    if res is None:   # a torchrun rank other than 0
        return
    for tier, f in res["fit"].items():
        click.echo(f"{tier}: alpha {f['alpha_ms']:.4f} ms, bandwidth " +
                   (f"{f['bw'] / 1e9:.1f} GB/s (cluster-wide bytes)" if np.isfinite(f["bw"]) else
                    "unresolved: the time did not grow with size over --sizes (try larger sizes)"))
    err = np.array([c["model_ms"] / c["measured_ms"] - 1 for c in res["cases"]])
    rows = []
    for kind in sorted({c["kind"] for c in res["cases"]}):
        e = np.array([abs(x) for x, c in zip(err, res["cases"]) if c["kind"] == kind])
        rows.append([kind, len(e), f"{np.median(e) * 100:.1f}%", f"{np.percentile(e, 90) * 100:.1f}%",
                     f"{e.max() * 100:.1f}%"])
    click.echo(f"Eq. 1 against measured, {len(err)} traffic matrices, {o['nproc']} ranks as "
               f"{o['topology'] or '1x%d' % o['nproc']}; |model / measured - 1|:")
    click.echo(table(["matrices", "n", "median", "p90", "max"], rows))
    res["options"] = o
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


def _layer_bench_worker(rank, world, init, o, out_path):
    cuda, device = _bench_init(rank, world, init)
    topo = netmoe.Topology.parse(o["topology"] or f"1x{world}")
    H, S, B = o["hidden"], o["seq_len"], o["batch"]
    E = 2 * world
    layers = {}
    for name in ("static", "netmoe (no move, no lookahead)", "netmoe (no move)", "netmoe"):
        torch.manual_seed(0)
        a = netmoe.MoELayer(H, 4 * H, E, 2, "static" if name == "static" else "netmoe", topology=topo,
                            lookahead="lookahead" not in name).to(device)
        b = netmoe.MoELayer(H, 4 * H, E, 2, "netmoe", topology=topo).to(device)   # the next layer, for lookahead
        a.next = b
        if "no move" in name:   # pay for everything NetMoE does, then keep samples in place
            a.placement_override = lambda dest, I=B * world: netmoe.static_placement(I, world)
        layers[name] = a
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(B, S, H, generator=g).to(device).requires_grad_()
    sid = torch.arange(rank * B, (rank + 1) * B, device=device)
    times = {n: [] for n in layers}
    for it in range(o["warmup"] + o["repeats"]):
        for name, layer in layers.items():   # interleaved, so drift hits every variant alike
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                y, _, aux = layer(x, sid)
            (y.float().square().mean() + aux).backward()
            if cuda:
                torch.cuda.synchronize()
            if it >= o["warmup"]:
                times[name].append((time.perf_counter() - t) * 1e3)
            else:
                layer.pop_stats()
    rows = {}
    for name, layer in layers.items():
        st = layer.pop_stats()
        rows[name] = dict(ms=float(np.median(times[name])), a2a_ms=st.a2a_ms / o["repeats"],
                          solver_ms=st.solver_ms / o["repeats"], exposed_ms=st.solver_exposed_ms / o["repeats"],
                          gather_inter=st.gather["inter"] / o["repeats"], gather_intra=st.gather["intra"] / o["repeats"],
                          moved_device=st.moved_device / max(st.samples, 1))
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(all_rows, f)
    dist.destroy_process_group()


@bench.command("layer")
@click.option("--nproc", default=2, show_default=True, help="GPUs (or CPU processes) to spawn")
@click.option("--topology", default=None, help="NxG; default 1xNPROC")
@click.option("--hidden", default=768, show_default=True, help="MoE-GPT-S: 768")
@click.option("--seq-len", default=1024, show_default=True)
@click.option("--batch", default=4, show_default=True, help="I/J")
@click.option("--warmup", default=5, show_default=True)
@click.option("--repeats", default=30, show_default=True)
@click.option("--json", "json_path", default=None)
def bench_layer_cmd(json_path, **o):
    """One MoE layer forward+backward: static vs NetMoE vs NetMoE that keeps samples in place."""
    per_rank = _spawn_bench(_layer_bench_worker, o)
    if per_rank is None:
        return
    names = list(per_rank[0])
    med = {n: {k: float(np.median([r[n][k] for r in per_rank])) for k in per_rank[0][n]} for n in names}
    base = med["static"]["ms"]
    click.echo(f"MoE layer fwd+bwd, H={o['hidden']}, S={o['seq_len']}, I/J={o['batch']}, E/J=2, K=2, "
               f"{o['nproc']} ranks as {o['topology'] or '1x%d' % o['nproc']}; median of {o['repeats']} (ranks' median)")
    click.echo(table(["placement", "fwd+bwd ms", "vs static", "A2A ms", "solver ms", "solver exposed ms",
                      "gather inter", "gather intra", "moved dev"],
                     [[n, m["ms"], f"{(m['ms'] / base - 1) * 100:+.1f}%", m["a2a_ms"], m["solver_ms"],
                       m["exposed_ms"], m["gather_inter"], m["gather_intra"], m["moved_device"]]
                      for n, m in med.items()]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(options=o, per_rank=per_rank, median=med), f, indent=1)


@bench.command("kernels")
@click.option("--repeats", default=50, show_default=True)
@click.option("--json", "json_path", default=None)
def bench_kernels_cmd(repeats, json_path):
    """kernels.cu vs the torch code it replaces (paper's per-GPU shape and a large one)."""
    if not torch.cuda.is_available():
        raise click.ClickException("bench kernels needs a CUDA device")
    rows = bench_kernels(click.echo, reps=repeats)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli()
