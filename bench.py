"""netmoe benchmarks, plots and reports: the paper's tables measured on this machine.

  python bench.py solver                      # Algorithm 1's Solve (paper Table 4), CPU
  python bench.py solver --scale              # the solve and its metadata at 4x8 .. 128x8
  python bench.py kernels                     # kernels.cu against the torch code it replaces (CUDA)
  python bench.py layer --virtual-world 32 --topology 4x8   # one MoE-GPT-S layer on one GPU
  python bench.py layer --nproc 2             # the same over 2 GPUs (or CPU processes), static vs NetMoE
  python bench.py a2a --nproc 4 --topology 2x2   # Eq. 1 against timed All-to-Alls
  python bench.py layouts --trace s.npz --topology 4x8 --from-step 240   # how far expert layouts go
  python bench.py simulate --trace s.npz --topology 4x8 --layout   # replay Algorithm 1 on a trace
  python bench.py summary a.json b.json       # one table over train / compare / bench records
  python bench.py plot results/*.json         # a PNG beside each JSON (needs matplotlib)

Every timing is a median over repeats after warm-up, with CUDA events on a GPU. Ratios are
measured side by side in one run. Under torchrun, layer and a2a run on torchrun's ranks.
This file imports train_gpt.py (its option types, rank start and result table), never the reverse.
"""
import dataclasses
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: see train_gpt.py

import click
import numpy as np
import torch
import torch.distributed as dist

import netmoe
import train_gpt
from train_gpt import COUNT, DTYPE, JSON_OUT, NONNEG, POSITIVE, TOPOLOGY, one_line_errors, table


def _write_json(path, obj, kind):
    """A record with its kind: a dict's fields beside "kind", a list's rows under "rows"."""
    if path:
        obj = {"kind": kind, **obj} if isinstance(obj, dict) else {"kind": kind, "rows": obj}
        train_gpt.atomic_write(path, lambda f: json.dump(obj, f, indent=1), "w")


def record_kind(res):
    """(kind, body) of a record: the kind it names (a list record's body is its rows), or, in a
    record written before records named their kind, the kind its fields tell."""
    if isinstance(res, dict) and "kind" in res:
        return res["kind"], res.get("rows", res)
    if isinstance(res, list) and res and isinstance(res[0], dict):
        return ("solver" if "capacitated_ms" in res[0] else "kernels" if "cuda_ms" in res[0] else None), res
    if not isinstance(res, dict):
        return None, res
    if "runs" in res:
        return ("compare" if tuple(res["runs"]) == train_gpt.COMPARED else "train"), res
    for kind, fields in (("layer", {"median", "per_rank"}), ("a2a", {"fit", "cases"}), ("layouts", {"from_step"}),
                         ("simulate", {"exchange"})):
        if fields <= set(res):
            return kind, res
    return None, res


def progress(items, label, show=True, every_s=2.0):
    """items, one by one, saying on stderr how far it got: at the first, then at most once every
    `every_s` seconds, and at the end; a long benchmark is never silent for long and a short
    one not noisy. show: on rank 0 only, so the ranks do not repeat each other."""
    items, last = list(items), None
    for i, item in enumerate(items):
        # the last item's line would come just before its "done" line: only the first is always said
        if show and (last is None or time.perf_counter() - last >= every_s and i + 1 < len(items)):
            click.echo(f"{label} {i + 1}/{len(items)}", err=True)
            last = time.perf_counter()
        yield item
    if show:
        click.echo(f"{label} {len(items)}/{len(items)} done", err=True)


@click.group(cls=train_gpt.Cli)
def cli():
    """Benchmarks, replays and reports: solver (CPU; the window on GPU), kernels (CUDA), layer and
    a2a (GPUs or CPU processes), layouts and simulate (replays of a routing trace), summary, plot."""


# ---------------------------------------------------------------------------------------------
# Replays of routing traces (simulate) and summaries of runs (summary)
# ---------------------------------------------------------------------------------------------


def load_trace(path):
    """A routing trace (train --trace's .npz) as a dict of arrays, or a one-line refusal."""
    not_trace = f"{path} is not a routing trace .npz (train --trace writes one)"
    try:
        f = np.load(path, allow_pickle=False)
        t = dict(f) if isinstance(f, np.lib.npyio.NpzFile) else None
    except Exception:   # numpy's own words would advise allow_pickle for any file that is not numpy's
        raise click.ClickException(not_trace) from None
    if t is None:
        raise click.ClickException(f"{not_trace}: it holds one array, not a trace's")
    missing = [k for k in ("route", "route_next_pred", "num_experts") if k not in t]
    if missing:
        raise click.ClickException(f"{not_trace}: it lacks {', '.join(missing)}")
    if t["route"].ndim != 5 or t["route_next_pred"].shape != t["route"].shape:
        raise click.ClickException(f"{not_trace}: route must be [steps, layers, I, S, K] and "
                                   f"route_next_pred of its shape")
    return t


def _wire_bytes(trace, exchange, dtype):
    """(scatter, gather) bytes of a row as the exchange sends it at this dtype, for a trace's model."""
    return netmoe.exchange_class(exchange).wire_bytes(int(trace.get("hidden", 768)), getattr(torch, dtype),
                                                      trace["route"].shape[-1])


def _change(new, base):
    return f"{(new / base - 1) * 100:+.1f}%" if base else "-"


def _show_bytes(bpt):
    return "/".join(map(str, np.atleast_1d(bpt))) + (" (scatter/gather)" if np.ndim(bpt) else "")


def replay_trace(trace, topo, bytes_per_token, layout=False, exchange="expert", chunks=1, expert_ms=None, each=iter):
    """MoEStats of every recorded step of a routing trace (train --trace) under each variant:
    ({name: [stats of step s, ...]}, first replayed step). Samples start where the data loader
    put them and follow each variant's gathers. With layout, steps 1.. are replayed with each
    layer's experts regrouped by expert_layout learned on the (up to 4) recorded steps before
    (other batches), beside the contiguous layout on the same steps: what re-layout does live
    from its last 4 batches; step 0 has no step before it to learn from, so it is not replayed.
    exchange: what the All-to-Alls send (and the solver prices); chunks and expert_ms: how they
    are priced (netmoe.layer_stats). each(steps) iterates over the replayed steps (a caller's
    progress report)."""
    route, pred = trace["route"].astype(np.int64), trace["route_next_pred"].astype(np.int64)
    E = int(trace["num_experts"])
    steps, L, I = route.shape[:3]
    if I % topo.world or E % topo.world:
        raise ValueError(f"the trace has I={I} samples and E={E} experts: both must split evenly over "
                         f"topology {topo} ({topo.world} devices)")
    if layout and steps < 2:
        raise ValueError("a layout is learned on earlier recorded steps: the trace needs at least 2")
    first = 1 if layout else 0
    nums = [[netmoe.count_tokens(route[s, l], E).numpy() for l in range(L)] for s in range(steps)]
    learned = lambda s: netmoe.expert_layout([np.concatenate([nums[t][l] for t in range(max(0, s - netmoe.RELAYOUT_WINDOW), s)])
                                              for l in range(L)], topo)
    # name: (learned layout?, placement, the lookahead's routes of layer l + 1: none, predicted
    # from layer l's input, or the true ones)
    variants = {"static": (False, "static", None), "netmoe, no lookahead": (False, "netmoe", None),
                "netmoe + lookahead": (False, "netmoe", "pred"), "netmoe + oracle next": (False, "netmoe", "oracle")}
    if layout:
        variants.update({"static + layout": (True, "static", None),
                         "netmoe + lookahead + layout": (True, "netmoe", "pred")})
    out = {name: [] for name in variants}
    for s in each(range(first, steps)):
        for lay in sorted({lay for lay, _, _ in variants.values()}):
            layouts = learned(s) if lay else None
            layers = netmoe.routings(route[s], topo, E, layouts, exchange)
            nexts = dict(oracle=layers[1:], pred=netmoe.routings(pred[s, :-1], topo, E, layouts and layouts[1:], exchange))
            for name, (l, placement, kind) in variants.items():
                if l == lay:
                    out[name].append(netmoe.replay(layers, topo, bytes_per_token, nexts.get(kind), placement, chunks,
                                                   expert_ms))
    return out, first


def pair_traffic(num, sample_device, topo, expert_device=None):
    """[J, J] tokens device j sends device k in the scatter when sample i sits on sample_device[i]
    (the gather sends the transpose): the split sizes of one All-to-All of the expert exchange.
    Its same-node, other-device entries sum to traffic()'s intra, its other-node entries to its inter."""
    per_dev = netmoe.Routing.of(num, topo, expert_device).tokens[0]   # [I, J]
    sd = np.asarray(sample_device)
    if sd.shape != (len(per_dev),) or not np.issubdtype(sd.dtype, np.integer) or sd.min() < 0 or sd.max() >= topo.world:
        raise ValueError(f"sample_device must give each of I={len(per_dev)} samples a device in [0, {topo.world})")
    out = np.zeros((topo.world, topo.world), dtype=np.int64)
    np.add.at(out, sd, per_dev)
    return out


def replay_means(stats, layers, bytes_per_token, compute_ms=None):
    """Per-step means of a list of per-step MoEStats; iter_ms adds a compute time when given,
    less what the pipeline hides of the All-to-Alls behind the experts' part of it.
    bytes_per_token: of a row on the wire, or (scatter's, gather's)."""
    acc, n = sum(stats, netmoe.MoEStats()), len(stats)
    inter = acc.scatter["inter"] + acc.gather["inter"]
    scatter_bytes, gather_bytes = bytes_per_token if np.ndim(bytes_per_token) else (bytes_per_token,) * 2
    return dict(inter=inter / n, intra=(acc.scatter["intra"] + acc.gather["intra"]) / n,
                scatter_inter=acc.scatter["inter"] / n, gather_inter=acc.gather["inter"] / n,
                a2a_ms=acc.a2a_model_ms / n, hidden_ms=acc.a2a_hidden_ms / n,
                moved_node=acc.moved_node / acc.samples,
                moved_device=acc.moved_device / acc.samples,
                iter_ms=compute_ms + (acc.a2a_model_ms - acc.a2a_hidden_ms) / n if compute_ms is not None else None,
                mb_per_a2a=(acc.scatter["inter"] * scatter_bytes + acc.gather["inter"] * gather_bytes) / n / 1e6
                / (2 * layers))


def expert_share(hidden, seq_len, num_experts, top_k, layers, vocab=256):
    """The experts' share of a step's compute: their FLOPs (K rows a token, two H x 4H products)
    over the whole MoE-GPT's (as GPT.flops_per_token counts them)."""
    per_layer = 4 * hidden ** 2 + hidden * num_experts + top_k * 8 * hidden ** 2 + 2 * hidden * seq_len
    return layers * top_k * 8 * hidden ** 2 / (layers * per_layer + vocab * hidden)


@cli.command(short_help="Replay Algorithm 1 on a routing trace: volumes and Eq. 1 times per placement.")
@click.option("--trace", required=True, type=click.Path(exists=True, dir_okay=False),
              help="a routing trace (train --trace writes one)")
@click.option("--topology", required=True, type=TOPOLOGY, help="N nodes of G devices to replay on, e.g. 4x8")
@click.option("--intra-bw", type=POSITIVE, default=train_gpt.shown_value(400e9), show_default=True,
              help="bytes/s inside a node, for Eq. 1 (paper Table 2)")
@click.option("--inter-bw", type=POSITIVE, default=train_gpt.shown_value(100e9), show_default=True,
              help="bytes/s between nodes, for Eq. 1")
@click.option("--dtype", type=DTYPE, default=None, show_default="the trace's; float32 if it does not say",
              help="rows on the wire")
@click.option("--bytes-per-token", type=COUNT, default=None, show_default="what the exchange sends at --dtype",
              help="bytes of a row on the wire")
@click.option("--compute-ms", type=click.FloatRange(min=0), default=None, show_default="none: no iteration time",
              help="per-iteration compute, for an estimate of the iteration time")
@click.option("--layout", is_flag=True, help="also regroup experts by co-activation learned on earlier steps")
@click.option("--exchange", type=click.Choice(list(netmoe.EXCHANGES)), default="expert", show_default=True,
              help="what the All-to-Alls send: a row per (token, expert), or per (token, node)")
@click.option("--chunks", type=train_gpt.CHUNKS, default=train_gpt.DEFAULT_CHUNKS, show_default=True,
              help="the exchange pipelined in C chunks, as train --chunks runs it")
@click.option("--stages", type=COUNT, default=6, show_default=True, help="rows of the by-stage-of-training table")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def simulate(trace, topology, intra_bw, inter_bw, dtype, bytes_per_token, compute_ms, layout, exchange, chunks, stages,
             json_path):
    """Replay Algorithm 1 on a recorded routing trace: volumes and Eq. 1 times per placement."""
    t = load_trace(trace)
    steps, L, I, S, K = t["route"].shape
    topo = dataclasses.replace(topology, intra_bw=intra_bw, inter_bw=inter_bw)
    dtype = dtype or str(t.get("dtype", "float32"))
    bpt = bytes_per_token or _wire_bytes(t, exchange, dtype)
    # the experts' part of the compute, per layer: what the chunked pipeline can hide the All-to-Alls behind
    expert_ms = None if compute_ms is None else compute_ms * expert_share(
        int(t.get("hidden", 768)), S, int(t["num_experts"]), K, L) / L
    try:
        per_step, first = replay_trace(t, topo, bpt, layout, exchange, chunks, expert_ms,
                                       each=lambda steps: progress(steps, "replaying step"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    res = {name: replay_means(st, L, bpt, compute_ms) for name, st in per_step.items()}
    base = res["static"]
    # with --layout every placement is scored on the steps after the first, which has no earlier step to learn from
    skipped = f" ({steps - first} replayed: the first has no earlier step to learn a layout from)" if first else ""
    click.echo(f"trace {trace}: {steps} steps{skipped} x {L} layers, I={I}, S={S}, K={K}, E={int(t['num_experts'])}; "
               f"on {topo}, {exchange} exchange in {chunks} chunk(s), {dtype} rows of {_show_bytes(bpt)} bytes; "
               f"volumes are rows per iteration (forward); times as built (Eq. 1 per chunk and hop)" +
               (f"; iter = compute + A2A - what the pipeline hides behind the experts' {expert_ms * L:.3g} ms of it"
                if compute_ms is not None else ""))
    times, keys = ["A2A ms (Eq.1)"], ["a2a_ms"]
    if compute_ms is not None:
        times, keys = times + ["hidden ms", "iter ms"], keys + ["hidden_ms", "iter_ms"]
    click.echo(table(["placement", "inter", "vs static", "gather inter", "intra", "vs static", "inter MB/A2A",
                      "moved node", "moved dev"] + times,
                     [[name, r["inter"], _change(r["inter"], base["inter"]), r["gather_inter"], r["intra"],
                       _change(r["intra"], base["intra"]), r["mb_per_a2a"], r["moved_node"], r["moved_device"]] +
                      [r[k] for k in keys] for name, r in res.items()]))
    n = steps - first
    if n > 1:   # does locality change as training goes on? consecutive recorded steps in `stages` groups
        recorded = [int(x) for x in t["steps"]] if "steps" in t else list(range(steps))
        bounds = np.linspace(0, n, min(stages, n) + 1).round().astype(int)
        res["by_stage"] = [dict(steps=[recorded[first + a], recorded[first + b - 1]],
                                **{name: replay_means(st[a:b], L, bpt) for name, st in per_step.items()})
                           for a, b in zip(bounds[:-1], bounds[1:])]
        click.echo("by stage of training (inter-node tokens per step; change vs static):")
        base_name, *others = per_step   # the first variant, static EP, is the baseline
        click.echo(table(["training steps", base_name] + others,
                         [[f"{g['steps'][0]}-{g['steps'][1]}", g[base_name]["inter"]] +
                          [_change(g[n]["inter"], g[base_name]["inter"]) for n in others]
                          for g in res["by_stage"]]))
    _write_json(json_path, kind="simulate", obj=dict(trace=os.path.basename(trace), topology=str(topology), exchange=exchange, chunks=chunks,
                                dtype=dtype, bytes_per_token=int(np.max(bpt)),   # the heavier row, a number
                                wire_bytes_per_row=dict(zip(("scatter", "gather"), np.broadcast_to(bpt, 2).tolist())),
                                results=res))


def _run_rows(name, res, skip):
    """train / compare: static vs NetMoE side by side, or a single placement's own numbers."""
    c = res["config"]
    skip = c.get("skip_steps", 0) if skip is None else skip
    runs = {p: train_gpt.summarize(r, skip, c.get("device_name", "")) for p, r in res["runs"].items()}
    model = f"H={c['hidden']} L={c['n_layer']}"
    if tuple(runs) == train_gpt.COMPARED:
        s, n = (runs[p] for p in train_gpt.COMPARED)
        return [[name, model, c["topology"], s["measured"], s["iter_ms"], n["iter_ms"],
                 f"{s['iter_ms'] / n['iter_ms']:.2f}x", s["a2a_ms"], n["a2a_ms"], _change(n["inter"], s["inter"]),
                 _change(n["intra"], s["intra"]), n["solver_exposed_ms"], f"{abs(n['final_loss'] - s['final_loss']):.1e}"]]
    return [[name, model, c["topology"], p, r["measured"], r["iter_ms"], r["tokens_per_s"], r["a2a_ms"],
             r["a2a_model_ms"], r["inter"], r["intra"], r["solver_exposed_ms"], *map(_loss, (r["final_loss"], r["val_loss"]))]
            for p, r in runs.items()]


def _loss(v):
    return None if v is None else f"{v:.4f}"   # the digits a loss change between runs is read in


def _a2a_rows(name, res, skip):
    err = [abs(c["model_ms"] / c["measured_ms"] - 1) * 100 for c in res["cases"]]
    fit = lambda tier, k: res["fit"].get(tier, {}).get(k)
    gbs = lambda tier: fit(tier, "bw") / 1e9 if fit(tier, "bw") not in (None, float("inf")) else None
    return [[name, res["options"]["topology"], fit("intra", "alpha_ms"), gbs("intra"), fit("inter", "alpha_ms"),
             gbs("inter"), len(err), f"{np.median(err):.1f}%", f"{np.percentile(err, 90):.1f}%"]]


def _layouts_rows(name, res, skip):
    base = lambda key: res["results"]["expert: half batch: static" if "half batch" in key else "expert: static"]
    return [[name, res["topology"], key, r["inter"], _change(r["inter"], base(key)["inter"]), r["a2a_ms"]]
            for key, r in res["results"].items()]


def _simulate_rows(name, res, skip):
    placements = {k: r for k, r in res["results"].items() if k != "by_stage"}
    return [[name, res["topology"], res["exchange"], p, r["inter"], _change(r["inter"], placements["static"]["inter"]),
             r["intra"], r["a2a_ms"]] for p, r in placements.items()]


SCALE_COLUMNS = ["topology", "I", "E", "K", "solve ms", "(CPU ms)", "from [I, E] ms", "[I, E]: expert", "[I, E]: node",
                 "gathered now", "[I, E] / now"]


ROWS = {   # kind: the rows summary shows of one record of it (its name, its body, --skip-steps)
    "compare": _run_rows, "train": _run_rows,
    "solver": lambda name, res, skip: [[name, r["topology"], r["I"], r["capacitated_ms"], r.get("km_ms"),
                                        r.get("scipy_ms"), r["same_optimum"]] for r in res],
    "solver_scale": lambda name, res, skip: _scale_rows(name, res),
    "kernels": lambda name, res, skip: [[name, r["kernel"], r["shape"], r["torch_ms"], r["cuda_ms"], r["speedup"]]
                                        for r in res],
    # a layer record from before --exchange ran the expert exchange
    "layer": lambda name, res, skip: [[name, f"H={res['options']['hidden']} S={res['options']['seq_len']} on "
                                       f"{res['options']['topology']}", res["options"].get("exchange", "expert"), v, m["ms"],
                                       _change(m["ms"], res["median"]["static"]["ms"]), m["a2a_ms"], m["exposed_ms"]]
                                      for v, m in res["median"].items()],
    "a2a": _a2a_rows, "layouts": _layouts_rows, "simulate": _simulate_rows,
}


SUMMARIES = {   # kind: (what the table shows, its columns)
    "compare": ("train_gpt.py compare: static vs NetMoE, means after the start-up steps",
                ["run", "model", "topology", "steps", "static iter ms", "netmoe iter ms", "speedup", "static A2A ms",
                 "netmoe A2A ms", "inter tokens", "intra tokens", "solver exposed ms", "|loss diff|"]),
    "train": ("train_gpt.py train: one placement, means after the start-up steps",
              ["run", "model", "topology", "placement", "steps", "iter ms", "tokens / s", "A2A ms", "A2A ms (Eq. 1)",
               "inter tokens", "intra tokens", "solver exposed ms", "final loss", "val loss"]),
    "solver": ("bench.py solver: median ms of the two-stage Solve",
               ["run", "topology", "I", "capacitated ms", "KM ms", "scipy ms", "same optimum"]),
    "solver_scale": ("bench.py solver --scale: the solve with lookahead and the routing metadata per rank per layer",
                     ["run"] + SCALE_COLUMNS),
    "kernels": ("bench.py kernels: kernels.cu against the torch code it replaces",
                ["run", "kernel", "shape", "torch ms", "CUDA ms", "speedup"]),
    "layer": ("bench.py layer: one MoE layer, forward + backward, median ms",
              ["run", "layer", "exchange", "variant", "fwd+bwd ms", "vs static", "A2A ms", "solver exposed ms"]),
    "a2a": ("bench.py a2a: Eq. 1 fitted per tier, and its error on the timed All-to-Alls",
            ["run", "topology", "intra alpha ms", "intra GB/s", "inter alpha ms", "inter GB/s", "matrices",
             "median |error|", "p90 |error|"]),
    "layouts": ("bench.py layouts: inter-node rows per step against static EP with the expert exchange",
                ["run", "topology", "exchange: placement", "inter", "vs static expert", "A2A ms (Eq. 1)"]),
    "simulate": ("bench.py simulate: replayed rows per iteration",
                 ["run", "topology", "exchange", "placement", "inter", "vs static", "intra", "A2A ms (Eq. 1)"]),
}


@cli.command(short_help="One table per kind of record over train, compare and bench JSON files.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--skip-steps", type=NONNEG, default=None, show_default="what each run used",
              help="start-up steps left out of a run's means")
def summary(files, skip_steps):
    """One table per kind of record: train and compare --json (static vs NetMoE side by side, or
    one placement's own numbers), and the --json of bench.py solver, kernels, layer, a2a, layouts
    and simulate (a short summary of each)."""
    tables = {}
    for path in files:
        try:
            with open(path) as f:
                res = json.load(f)
            kind, body = record_kind(res)
            rows = ROWS[kind](os.path.basename(path), body, skip_steps) if kind in ROWS else None
            why = "" if kind in ROWS else "its fields match none of them"
        except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            raise click.ClickException(f"{path} is not a record summary reads ({why}); it reads train / compare "
                                       f"--json and the --json of bench.py solver, kernels, layer, a2a, layouts "
                                       f"and simulate")
        tables.setdefault(kind, []).extend(rows)
    click.echo("\n\n".join(f"{SUMMARIES[k][0]}\n{table(SUMMARIES[k][1], rows)}" for k, rows in tables.items()))


def routed_num(rng, I, E, S=1024, K=2, concentration=0.3):
    """Per-sample expert counts with some data locality: each sample prefers a few experts."""
    prefs = rng.dirichlet(np.full(E, concentration), size=I)
    return np.stack([rng.multinomial(S * K, p) for p in prefs])


def bench_solver(repeats, max_expanded, echo, gpu=True):
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
    for spec, I in progress(cases, "solving case"):
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
        window = solver_window(I // topo.world, topo, gpu and torch.cuda.is_available()) if spec == "2x8" else {}
        r = dict(topology=spec, I=I, I_per_J=I // topo.world, **{f"{m}_ms": times.get(m) for m in methods},
                 paper_km_ms=paper.get(I) if spec == "2x8" else None, **window,
                 paper_window_ms=paper_window.get(I) if spec == "2x8" else None, same_optimum=same)
        results.append(r)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        rows.append([spec, I, I // topo.world] + [fmt(times.get(m)) for m in methods] +
                    [fmt(times[m] / times["capacitated"]) if m in times else "-" for m in methods[1:]] +
                    [fmt(r["paper_km_ms"]), fmt(window.get("compute_ms")), fmt(window.get("scatter_model_ms")),
                     fmt(r["paper_window_ms"]), same])
    header = (["topology", "I", "I/J"] + [f"{m} ms" for m in methods] + [f"{m}/capacitated" for m in methods[1:]]
              + ["paper KM ms", "experts ms (GPU)", "scatter ms (Eq.1)", "paper scatter+compute ms", "same optimum"])
    if not any(r.get("compute_ms") for r in results):   # no GPU timed the experts: no column of dashes
        gpu = header.index("experts ms (GPU)")
        header, rows = header[:gpu] + header[gpu + 1:], [r[:gpu] + r[gpu + 1:] for r in rows]
    echo(table(header, rows))
    return results


SCALE_TOPOLOGIES = ("4x8", "16x8", "32x8", "128x8")


def metadata_bytes(I, E, topo, lookahead=True):
    """Routing metadata one rank receives per layer call: what the layer gathered before it was
    built in the size of Algorithm 1's stages, every rank's [I/J, E] int64 counts (and, for the
    node exchange, its [I/J, N] node counts) for this layer and the lookahead's, so that every
    rank held [I, E] twice; and what it gathers now, the expert exchange in one chunk
    (netmoe.metadata_bytes, which a test measures at every collective)."""
    N, layers = topo.nodes, 2 if lookahead else 1
    return dict(today_expert=layers * I * E * 8, today_node=layers * I * (E + N) * 8,
                staged=netmoe.metadata_bytes(I, E, topo, "expert", 1, lookahead))


def bench_scale(topologies, samples, experts, top_k, echo, S=1024, repeats=3):
    """The solve at cluster scale (issue 37's target: I = 16384 on 128x8, E = 2048, K = 8 with
    lookahead in at most 20 ms), per topology: solve_placement with lookahead from the
    stage-sized counts a rank holds (Routing.of_reach: int32 [I, N] per node, [I, N, G] per
    device; the layer counts them from its routes on the GPU), and the same from [I, E] int64
    counts (Routing.of, the per-device sums included), each the min of `repeats` after a warm
    call; and the routing metadata per rank per layer, [I, E] counts and what the layer gathers now."""
    rng = np.random.default_rng(0)
    rows = []
    for topo in progress(topologies, "scaling case"):
        J = topo.world
        I, E = samples * J, experts * J
        num, nxt = (routed_num(rng, I, E, S=S, K=top_k) for _ in range(2))

        def held(counts):
            node, device = netmoe.Routing.of(counts, topo).reach
            return netmoe.Routing.of_reach(node.astype(np.int32), device.astype(np.int32), topo)

        def best_ms(solve):   # wall clock, and this thread's CPU time (what a busy machine leaves out)
            dest, wall, cpu = solve(), [], []
            for _ in range(repeats):
                t, c = time.perf_counter(), time.thread_time()
                solve()
                wall.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
            return dest, min(wall) * 1e3, min(cpu) * 1e3
        a, b = held(num), held(nxt)
        dest, held_ms, held_cpu = best_ms(lambda: netmoe.solve_placement(a, topo, num_next=b))
        again, counts_ms, _ = best_ms(lambda: netmoe.solve_placement(num, topo, num_next=nxt))
        if not np.array_equal(dest, again):
            raise RuntimeError(f"{topo}: the solve from stage-sized counts differs from the one from [I, E]")
        rows.append(dict(topology=str(topo), I=I, E=E, K=top_k, solve_ms=held_ms, solve_cpu_ms=held_cpu,
                         solve_from_counts_ms=counts_ms, **metadata_bytes(I, E, topo)))
    echo(table(SCALE_COLUMNS, _scale_rows(None, rows)))
    return rows


def _scale_rows(name, rows):
    """bench.py solver --scale's table rows (led by the record's name where summary shows them)."""
    return [([name] if name else []) +
            [r["topology"], r["I"], r["E"], r["K"], r["solve_ms"], r["solve_cpu_ms"], r["solve_from_counts_ms"],
             _bytes(r["today_expert"]), _bytes(r["today_node"]), _bytes(r["staged"]),
             f"{r['today_expert'] / r['staged']:,.0f}x"] for r in rows]


def _bytes(n):
    return next(f"{n / 2 ** (10 * p):,.4g} {unit}" for p, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB"), (0, "B"))
                if n >= 2 ** (10 * p) or not p)


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
    x, counts = torch.randn(n, hidden, device=dev), [n // 2, n - n // 2]   # rows grouped by expert
    ts = []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for i in range(reps + 5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            layer.experts(x, counts)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                ts.append(start.elapsed_time(end))
    return dict(out, compute_ms=float(np.median(ts)))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------



@cli.command(short_help="A PNG beside each result JSON (needs matplotlib).")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False),
                callback=lambda ctx, param, files: _pngs_writable(files))
@click.option("--smooth", default=10, show_default=True, help="moving average over this many steps")
def plot(files, smooth):
    """PNG beside each result JSON: solver time vs I (bench solver), measured vs modelled
    All-to-All (bench a2a), inter-node tokens per step over training (train / compare), or per
    placement and stage of training (simulate). Needs matplotlib (pip install -e ".[plot]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException('plot needs matplotlib: pip install -e ".[plot]"') from None
    skipped = []
    for path in files:
        try:
            with open(path) as f:
                res = json.load(f)
        except ValueError as e:
            raise click.ClickException(f"{path} is not JSON: {e}") from None
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        kind, res = record_kind(res)
        if kind == "solver":
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
        elif kind == "a2a":
            for kind in sorted({c["kind"] for c in res["cases"]}):
                pts = [(c["model_ms"], c["measured_ms"]) for c in res["cases"] if c["kind"] == kind]
                ax.plot(*zip(*pts), "o", ms=3, label=kind)
            top = max(max(c["model_ms"], c["measured_ms"]) for c in res["cases"])
            ax.plot([0, top], [0, top], "k:", lw=0.8, label="model = measured")
            ax.set(xlabel="Eq. 1 with fitted alpha and bandwidth, ms", ylabel="measured All-to-All, ms",
                   title=f"Cost model check, {res['options']['nproc']} ranks as "
                         f"{res['options']['topology'] or '1x%d' % res['options']['nproc']}")
        elif kind == "simulate" and "by_stage" in res["results"]:
            stages = res["results"]["by_stage"]
            x = [sum(g["steps"]) / 2 for g in stages]
            for name in res["results"]:
                if name != "by_stage":
                    ax.plot(x, [g[name]["inter"] for g in stages], "-o", ms=3, label=name)
            ax.set(xlabel="training step (middle of each stage)", ylabel="inter-node tokens / step",
                   title=f"{res['topology']}: inter-node routed tokens, replayed")
        elif kind in ("train", "compare"):
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
        if ax.get_legend_handles_labels()[0]:   # a run shorter than --smooth draws no line
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



def _pngs_writable(files):
    """plot writes a PNG beside each JSON: each is checked before any is drawn."""
    for path in files:
        problem = train_gpt.output_problem(os.path.splitext(path)[0] + ".png", suffix=".png")
        if problem:
            raise click.BadParameter(problem, param_hint="FILES")
    return files


def _run_bench(worker, o, virtual_world=None, on_the_cpu=None):
    """worker(rank, world, init, o, out_path) on o["nproc"] ranks (spawned, or torchrun's, whose
    world and nodes x local ranks then give --nproc and the default topology), or on this one
    process playing virtual_world devices; rank 0's JSON, None on the other torchrun ranks.
    on_the_cpu(o): called first (on rank 0) where the ranks run on the CPU, the options checked."""
    if virtual_world and (o["nproc"] != 1 or "RANK" in os.environ):
        raise click.UsageError("--virtual-world runs in one process; drop --nproc / torchrun")
    if "RANK" in os.environ:
        o["nproc"] = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", o["nproc"]))
        o["topology"] = o["topology"] or netmoe.Topology(o["nproc"] // local, local)
    devices = virtual_world or o["nproc"]
    o["topology"] = o["topology"] or netmoe.Topology(1, devices)
    if o["topology"].world != devices:
        flag = "--virtual-world" if virtual_world else "--nproc"
        fix = (f"start {o['topology'].world} processes with torchrun" if "RANK" in os.environ else
               f"pass {flag} {o['topology'].world}")
        raise click.UsageError(f"topology {o['topology']} does not have {devices} devices ({flag}): {fix}, "
                               f"or give a topology of {devices} device{'s' * (devices > 1)}")
    with one_line_errors():
        o["ranks_on"] = train_gpt.rank_devices(o["cpu"], int(os.environ.get("LOCAL_WORLD_SIZE", o["nproc"])))
        if on_the_cpu and o["ranks_on"] == "cpu" and os.environ.get("RANK", "0") == "0":
            on_the_cpu(o)
        return train_gpt.run_ranks(worker, o["nproc"], (o,))


@cli.command("solver", short_help="Algorithm 1's Solve against KM and scipy (paper Table 4), or at cluster scale.")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True,
              help="solves timed per case (a tenth for the large I x I baselines)")
@click.option("--max-expanded", type=click.IntRange(min=0), default=1024, show_default=True,
              help="largest I for the I x I baselines")
@click.option("--cpu", is_flag=True, help="no GPU window (the experts' time the solver hides in), even where CUDA is present")
@click.option("--scale", is_flag=True, help=f"the solve at cluster scale instead: ms and routing metadata on "
                                            f"{', '.join(SCALE_TOPOLOGIES)} (or --topology)")
@click.option("--topology", "topologies", type=TOPOLOGY, multiple=True, show_default=", ".join(SCALE_TOPOLOGIES),
              help="at scale on this topology (repeatable; implies --scale)")
@click.option("--samples", type=COUNT, default=16, show_default=True, help="at scale: samples per device, I / J")
@click.option("--experts", type=COUNT, default=2, show_default=True, help="at scale: experts per device, E / J")
@click.option("--top-k", type=COUNT, default=8, show_default=True, help="at scale: experts per token, K")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def solver_cmd(repeats, max_expanded, cpu, scale, topologies, samples, experts, top_k, json_path):
    """Algorithm 1's Solve: capacitated vs KM on the paper's expanded matrices vs scipy (paper Table 4).
    With --scale or --topology: the solve with lookahead at cluster scale and the routing metadata a
    rank receives per layer call, every rank's [I, E] counts against what the layer gathers now."""
    if scale or topologies:
        click.echo(f"solve_placement with lookahead on routed counts with locality (S=1024, K={top_k}), min of 3\n"
                   f"after a warm call: from the stage-sized counts a rank holds (int32 [I, N] and [I, N, G], which\n"
                   f"the layer counts on the GPU), and from [I, E] int64 counts. Routing metadata per rank per\n"
                   f"layer call: gathering every rank's counts took [I, E] int64 twice (and [I, N] twice for the\n"
                   f"node exchange); the layer now gathers each sample's tokens per node and rows per device of\n"
                   f"the rank's node, the tokens per expert, the I destinations and [J] split sizes\n"
                   f"(netmoe.metadata_bytes, the expert exchange in one chunk)")
        scale_rows = bench_scale(topologies or [netmoe.Topology.parse(t) for t in SCALE_TOPOLOGIES], samples,
                                 experts, top_k, click.echo)
        _write_json(json_path, scale_rows, "solver_scale")
        return
    click.echo("two-stage Solve with lookahead, routed counts with locality (S=1024, K=2, E=2J); median ms")
    _write_json(json_path, bench_solver(repeats, max_expanded, click.echo, gpu=not cpu), "solver")


@cli.command("kernels", short_help="kernels.cu against the torch code it replaces (CUDA).")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="timed runs per kernel")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def kernels_cmd(repeats, json_path):
    """kernels.cu vs the torch code it replaces (paper's per-GPU shape and a large one)."""
    if not torch.cuda.is_available():
        raise click.ClickException("bench kernels needs a CUDA device")
    _write_json(json_path, bench_kernels(click.echo, reps=repeats), "kernels")


def bench_kernels(echo=print, reps=50, sets=4):
    """Time each op of kernels.cu against the torch code it replaces, on an NVIDIA GPU.

    Shapes: (a) the paper's per-GPU layer, B=4 samples of S=1024 tokens, K=2, E=64 on J=32
    devices (4x8); (b) a large one, B=16, S=4096, K=8, E=256 (4x8). GPU ops are timed with CUDA
    events, median of `reps` runs after warm-up, inputs rotated over `sets` fresh sets, and L2
    wiped (a 256 MB write) before each run so no run reads the last one's data from cache; the
    wipe also keeps the GPU busy while the host queues the op, so launch latency on the host is
    not counted.
    The floor: a 1 GiB device-to-device copy (bytes read + written over its time); each op's
    achieved rate is the bytes it must move (inputs read once, outputs written once) over its time.
    Returns one dict per row."""
    ops = netmoe.hot_path("cuda")
    if ops is netmoe.REFERENCE_OPS:
        raise RuntimeError("kernels.cu did not build: nothing to benchmark")
    ref = netmoe.REFERENCE_OPS
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
        cases = {name: [] for name in ("count_tokens", "dispatch_order", "gather_order")}
        for _ in range(sets):
            route_all = torch.randint(E, (I, S, K), device=dev)   # the whole global batch's routing
            route = route_all[:B].contiguous()                    # this rank's samples
            num = ops.count_tokens(route_all, E)
            slot = torch.randperm(E, device=dev)
            # rank 0's expert side, laid out as ExpertExchange.scatter receives it: (source, expert, b)
            cnt = num[:, :El].reshape(J, B, El).permute(0, 2, 1).reshape(-1)
            src = torch.arange(I, device=dev).reshape(J, 1, B).expand(J, El, B).reshape(-1).repeat_interleave(cnt)
            dest = torch.randperm(I, device=dev) // B
            cases["count_tokens"].append((route, E))
            cases["dispatch_order"].append((route, slot))
            cases["gather_order"].append((src, dest, I))
        n_route, n_src = route.numel(), src.numel()
        moved = {   # bytes each op must read + write
            "count_tokens": n_route * 8 + B * E * 8,
            "dispatch_order": n_route * 8 + E * 8 + n_route * 8,
            "gather_order": n_src * 8 + I * 8 + n_src * 8,
        }
        timings = {
            "count_tokens": (gpu_ms(ref.count_tokens, cases["count_tokens"]),
                             gpu_ms(ops.count_tokens, cases["count_tokens"])),
            "dispatch_order": (gpu_ms(ref.dispatch_order, cases["dispatch_order"]),
                               gpu_ms(ops.dispatch_order, cases["dispatch_order"])),
            "gather_order": (gpu_ms(ref.gather_order, cases["gather_order"]),
                             gpu_ms(ops.gather_order, cases["gather_order"])),
        }
        for name, (t_ref, t_cuda) in timings.items():
            gbs = moved[name] / t_cuda / 1e6
            rows.append(dict(kernel=name, shape=shape, n=n_src if name == "gather_order" else n_route,
                             torch_ms=t_ref, cuda_ms=t_cuda, speedup=t_ref / t_cuda, bytes=moved[name],
                             gb_s=gbs, copy_frac=gbs / copy_bw, copy_gb_s=copy_bw, timing="cuda events"))

    rows += _bench_row_kernels(ops, gpu_ms, copy_bw)
    echo(f"{'kernel':<27} | {'shape':<34} | {'torch ms':>9} | {'cuda ms':>8} | {'speedup':>7} | "
         f"{'GB/s':>7} | {'% of copy bw':>12}")
    for r in rows:
        echo(f"{r['kernel']:<27} | {r['shape']:<34} | {r['torch_ms']:>9.4f} | {r['cuda_ms']:>8.4f} | "
             f"{r['speedup']:>6.1f}x | {r['gb_s']:>7.0f} | {100 * r['copy_frac']:>11.1f}%")
    return rows


def _bench_row_kernels(ops, gpu_ms, copy_bw):
    """The row kernels, forward and backward, against the torch code they replace in the layer, on
    the one-process shapes of MoE-GPT-S (I = 128 samples of 1024 tokens, E 64, K 2, F 4H) and the
    fine-grained one (I = 64, E 256, K 8, F H/2), bf16:
      dispatch   x[order // K] and its autograd backward (an accumulating index_put), against
                 permute_rows and the combine of each token's K rows back;
      combine    where(first, rows, 0) + g * f, then index_add into the tokens' new slots, and
                 autograd's backward, against combine (gate weights, output bias, residual,
                 placement) and combine_backward;
      bias+GELU  GELU(h w1 + one_hot @ b1)'s bias and GELU (the [rows, E] one-hot product) with
                 autograd, against bias_gelu and bias_gelu_backward (the bias's gradient in its pass);
      topk       torch.topk of the gate's [T, E] probabilities, against topk_ids."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    out = []
    for label, T, E, K, H, F_ in (("S", 131072, 64, 2, 768, 3072), ("fine", 65536, 256, 8, 768, 384)):
        R, shape = T * K, f"{label} T={T} E={E} K={K} F={F_}"
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s, dtype=bf: torch.randn(*s, device=dev, generator=g).to(dtype)
        x, grad_rows, grad_tok = rnd(T, H), rnd(R, H), rnd(T, H)
        order = torch.argsort(torch.randint(E, (R,), device=dev, generator=g), stable=True)
        inv = netmoe._inverse(order).view(T, K)
        src_rows = order // K
        counts = torch.full((E,), R // E, device=dev)
        ends = counts.cumsum(0).int()
        expert = torch.repeat_interleave(torch.arange(E, device=dev), counts)
        gate, b2, f, pre, b1 = rnd(T, K, dtype=torch.float32), rnd(E, H), rnd(R, H), rnd(R, F_), rnd(E, F_)
        keep = torch.randperm(T // 1024, device=dev, generator=g)
        grad_mid = rnd(R, F_)
        first = (order % K == 0)[:, None]
        slot = (keep.argsort() * 1024)[order // K // 1024] + order // K % 1024   # each row's token's new slot

        def torch_dispatch():
            xx = x.detach().requires_grad_()
            xx[src_rows].backward(grad_rows)

        def torch_combine():
            ff, gg = f.detach().requires_grad_(), gate.detach().requires_grad_()
            rows = x[src_rows]
            y = torch.addcmul(torch.where(first, rows, 0), gg.reshape(-1)[order].to(bf)[:, None], ff + b2[expert])
            y.new_zeros(T, H).index_add(0, slot, y).backward(grad_tok)

        def torch_bias_gelu():
            pp, bb = pre.detach().requires_grad_(), b1.detach().requires_grad_()
            torch.nn.functional.gelu(pp + torch.nn.functional.one_hot(expert, E).to(bf) @ bb).backward(grad_mid)

        cases = {
            "dispatch fwd+bwd": (torch_dispatch, lambda: (ops.permute_rows(x, src_rows), ops.combine(grad_rows, inv)),
                                 2 * (3 * R * H + T * H)),
            "combine fwd+bwd": (torch_combine, lambda: (
                ops.combine(f, inv, gate, b2, ends, x, None, keep, 1024),
                ops.combine_backward(grad_tok, f, inv, gate, b2, ends, None, keep, 1024, True, True, True)),
                2 * (3 * R * H + 4 * T * H)),
            "bias+GELU fwd+bwd": (torch_bias_gelu, lambda: (ops.bias_gelu(pre, b1, ends),
                                                           ops.bias_gelu_backward(grad_mid, pre, b1, ends)), 5 * R * F_ * 2),
            "topk": (lambda: probs.topk(K, -1), lambda: ops.topk_ids(probs, K), T * E * 4),
        }
        probs = torch.rand(T, E, device=dev, generator=g)
        for name, (slow, fast, nbytes) in cases.items():
            t_ref, t_cuda = gpu_ms(slow, [()]), gpu_ms(fast, [()])
            gbs = nbytes / t_cuda / 1e6
            out.append(dict(kernel=name, shape=shape, n=R, torch_ms=t_ref, cuda_ms=t_cuda, speedup=t_ref / t_cuda,
                            bytes=nbytes, gb_s=gbs, copy_frac=gbs / copy_bw, copy_gb_s=copy_bw, timing="cuda events"))
    return out


def _a2a_bench_worker(rank, world, init, o, out_path):
    """Eq. 1 against timed All-to-Alls: profile each tier, then time traffic matrices and predict."""
    device = train_gpt.start_rank(rank, world, init, o["ranks_on"])
    cuda = device.type == "cuda"
    topo = o["topology"]
    H, J, dtype = o["hidden"], world, getattr(torch, o["dtype"])
    node = np.arange(J) // topo.gpus_per_node
    same, eye = node[:, None] == node[None], np.eye(J, dtype=bool)
    tiers = {"intra": same & ~eye, "inter": ~same}

    def timed(T):   # T[j, k]: tokens j sends k; median over repeats of the slowest rank
        send, recv = [int(v) for v in T[rank]], [int(v) for v in T[:, rank]]
        x = torch.full((sum(send), H), float(rank), device=device, dtype=dtype)
        y = torch.empty(sum(recv), H, device=device, dtype=dtype)
        ts = []
        for it in range(o["warmup_repeats"] + o["repeats"]):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            dist.all_to_all_single(y, x, recv, send)
            if cuda:
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        src = torch.repeat_interleave(torch.arange(J, device=device), torch.tensor(recv, device=device))
        if not torch.equal(y[:, 0], src.to(dtype)):   # each row came from the rank the split sizes say
            raise RuntimeError("All-to-All delivered rows from the wrong ranks")
        ts = torch.tensor(ts[o["warmup_repeats"]:], dtype=torch.float64, device=device)
        dist.all_reduce(ts, op=dist.ReduceOp.MAX)
        return float(ts.median())

    bpt = H * dtype.itemsize
    volume = lambda T: {t: int(T[m].sum()) for t, m in tiers.items()}
    fit = {}
    for tier, mask in tiers.items():   # Eq. 1 per tier: t = alpha + bytes / v, least squares over sizes
        if not mask.any():
            continue
        pts = [(int(mask.sum()) * n * bpt, timed(mask * n)) for n in progress(o["sizes"], f"profiling {tier} size",
                                                                               rank == 0)]
        slope, alpha = np.polyfit(*zip(*pts), 1)
        fit[tier] = dict(alpha_ms=max(float(alpha), 0.0), bw=1e3 / slope if slope > 0 else float("inf"), points=pts)
    model = netmoe.Topology(topo.nodes, topo.gpus_per_node,
                            **{f"{t}_{k}": v for t in ("intra", "inter") if t in fit
                               for k, v in (("bw", fit[t]["bw"]), ("lat", fit[t]["alpha_ms"] / 1e3))})
    rng = np.random.default_rng(o["seed"])   # the same matrices on every rank
    cases = []
    for c in progress(range(o["cases"]), "timing traffic matrix", rank == 0):
        if c % 2 == 0:   # skewed: each device's rows spread by a Dirichlet draw
            T = np.stack([rng.multinomial(o["tokens"], rng.dirichlet(np.full(J, 0.3))) for _ in range(J)])
            kind = "skewed"
        else:   # what NetMoE's gather sends, on counts with locality
            num = routed_num(rng, o["batch"] * J, 2 * J, S=o["tokens"] // (2 * o["batch"]))
            T = pair_traffic(num, netmoe.solve_placement(num, topo), topo).T
            kind = "netmoe gather"
        v = volume(T)
        cases.append(dict(kind=kind, intra_bytes=v["intra"] * bpt, inter_bytes=v["inter"] * bpt,
                          measured_ms=timed(T), model_ms=1e3 * netmoe.a2a_time(v, model, bpt)))
    probe = train_gpt.links_of(netmoe.measure_links(topo, None, device))   # what --chunks auto prices on
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(fit=fit, cases=cases, probe=probe), f)
    dist.destroy_process_group()


@cli.command("a2a", short_help="The cost model (Eq. 1) against timed All-to-Alls.")
@click.option("--nproc", type=click.IntRange(min=2), default=4, show_default=True, help="GPUs (or CPU processes) to spawn")
@click.option("--topology", type=TOPOLOGY, default=None, help="N virtual nodes of G devices",
              show_default="1xNPROC; under torchrun, its nodes x local ranks")
@click.option("--hidden", type=click.IntRange(min=1), default=768, show_default=True, help="row width (MoE-GPT-S: 768)")
@click.option("--dtype", type=DTYPE, default="bfloat16", show_default=True, help="row dtype")
@click.option("--tokens", type=click.IntRange(min=1), default=8192, show_default=True, help="rows each device sends in a test case")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="I/J for the NetMoE cases")
@click.option("--sizes", default="64,256,1024,4096,16384", show_default=True, help="rows per pair when profiling")
@click.option("--cases", type=click.IntRange(min=1), default=40, show_default=True,
              help="traffic matrices to time, skewed and NetMoE's in turn")
@click.option("--warmup-repeats", type=click.IntRange(min=0), default=3, show_default=True,
              help="untimed repeats first (allocator, caches, clocks)")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="timed All-to-Alls per matrix (the median counts)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="of the traffic matrices")
@click.option("--cpu", is_flag=True, help="CPU processes (gloo) even where there are GPUs")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def bench_a2a_cmd(json_path, **o):
    """Does Eq. 1 predict real All-to-Alls? Profiles alpha and bandwidth per tier (as the paper
    does), then times skewed and NetMoE-produced traffic matrices against the fitted model."""
    try:
        o["sizes"] = [int(v) for v in o["sizes"].split(",")]
    except ValueError:
        raise click.BadParameter(f"{o['sizes']!r} is not a comma-separated list of integers", param_hint="--sizes")
    if len(o["sizes"]) < 2 or min(o["sizes"]) < 1:
        raise click.BadParameter("give at least two positive sizes to fit a line through", param_hint="--sizes")
    res = _run_bench(_a2a_bench_worker, o)
    if res is None:   # a torchrun rank other than 0
        return
    for tier, f in res["fit"].items():
        click.echo(f"{tier}: alpha {f['alpha_ms']:.4f} ms, bandwidth " +
                   (f"{f['bw'] / 1e9:.1f} GB/s (cluster-wide bytes)" if np.isfinite(f["bw"]) else
                    "unresolved: the time did not grow with size over --sizes (try larger sizes)"))
    click.echo(f"the links probe --chunks auto prices on (two sizes, rail peers between nodes): "
               f"{train_gpt.show_links(res['probe'])}")
    err = np.array([c["model_ms"] / c["measured_ms"] - 1 for c in res["cases"]])
    rows = []
    for kind in sorted({c["kind"] for c in res["cases"]}):
        e = np.array([abs(x) for x, c in zip(err, res["cases"]) if c["kind"] == kind])
        rows.append([kind, len(e), f"{np.median(e) * 100:.1f}%", f"{np.percentile(e, 90) * 100:.1f}%",
                     f"{e.max() * 100:.1f}%"])
    click.echo(f"Eq. 1 against measured, {len(err)} traffic matrices, {o['nproc']} ranks as "
               f"{o['topology']}; |model / measured - 1|:")
    click.echo(table(["matrices", "n", "median", "p90", "max"], rows))
    res["options"] = dict(o, topology=str(o["topology"]))
    _write_json(json_path, res, "a2a")


class NoExperts(torch.nn.Module):
    """An Experts stand-in that computes nothing (f = its rows): the layer's exchange and gate alone."""

    def forward(self, h, counts):
        return h, None, None


def _layer_bench_worker(rank, world, init, o, out_path):
    """Forward + backward of one MoE layer per variant, interleaved so drift hits all alike (each
    round starting one variant later); on
    one process with virtual_world=J, all J devices' work on one device."""
    device = train_gpt.start_rank(rank, world, init, o["ranks_on"])
    cuda = device.type == "cuda"
    topo, J, H, S, K = o["topology"], o["topology"].world, o["hidden"], o["seq_len"], o["top_k"]
    E, B = o["experts_per_device"] * J, o["batch"] * (J if world == 1 else 1)
    Fh = o["expert_hidden"] or 4 * H
    virtual = dict(virtual_world=J) if world == 1 else {}
    model = dict(shared_experts=o["shared_experts"], route_groups=o["route_groups"], group_top=o["group_top"],
                 expert_bias=o["expert_bias"])
    C, base_c = o["chunks"], o["baseline_chunks"]

    def make(placement, chunks, exchange_only=False):
        torch.manual_seed(0)
        # exchange_only: the experts' FFN left out, the exchange and the gate alone
        return netmoe.MoELayer(H, Fh, E, K, placement, topology=topo, exchange=o["exchange"], chunks=chunks,
                               experts=NoExperts() if exchange_only else None, **model, **virtual).to(device)
    # static, netmoe, and kept (all of NetMoE's work, then no move) at --chunks; static EP and the
    # exchange alone at --baseline-chunks too: what the pipeline hides
    layers = {name: make(name, C) for name in netmoe.PLACEMENTS}
    layers["exchange only"] = make("static", C, exchange_only=True)
    if base_c != C:
        layers[f"static, C={base_c}"] = make("static", base_c)
        layers[f"exchange only, C={base_c}"] = make("static", base_c, exchange_only=True)
    torch.manual_seed(1)
    nxt = netmoe.MoELayer(H, Fh, E, K, topology=topo, **model, **virtual).to(device)   # for the lookahead
    g = torch.Generator().manual_seed(rank)
    dtype = getattr(torch, o["dtype"] or ("bfloat16" if cuda else "float32"))
    x = torch.randn(B, S, H, generator=g).to(device, dtype).requires_grad_()
    sid = torch.arange(rank * B, (rank + 1) * B, device=device)
    # the experts' matrix products alone, on the same rows spread evenly over the local experts
    n_local = len(layers["static"].local_experts)
    rows = torch.randn(B * S * K, H, generator=g).to(device, dtype).requires_grad_()
    expert = torch.arange(B * S * K, device=device) * n_local // (B * S * K)
    counts = torch.bincount(expert, minlength=n_local).tolist()
    runs = {**{n: (lambda l=l: l(x, sid, next_layer=nxt)) for n, l in layers.items()},
            "experts only": lambda: (layers["static"].experts(rows, counts)[0], None, 0.0)}
    times = {n: [] for n in runs}
    names = list(runs)

    def call(name):
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            y, _, aux = runs[name]()
        (y.float().square().mean() + aux).backward()
    trials = lambda: [l.chunk_trial for l in layers.values() if l.chunk_trial is not None]
    for it in progress(range(o["warmup_repeats"] + o["repeats"]),
                       f"timing round ({o['warmup_repeats']} untimed, then {o['repeats']})", rank == 0):
        if it == o["warmup_repeats"]:
            # --chunks auto on ranks: each layer times its first calls in a few C (netmoe.ChunkTrial);
            # more untimed rounds until every layer has kept one, so the timed rounds run in it
            while not all(t.settled for t in trials()):
                for name in names:
                    call(name)
            for layer in layers.values():
                layer.pop_stats()
        # each timed round starts one variant later: no variant always runs after the same one
        shift = max(it - o["warmup_repeats"], 0) % len(names)
        for name in names[shift:] + names[:shift]:
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            call(name)
            if cuda:
                torch.cuda.synchronize()
            if it >= o["warmup_repeats"]:
                times[name].append((time.perf_counter() - t) * 1e3)
    # expert FLOPs of forward + backward: 6 per weight per row, two H x F matrices, K rows a token
    flops = 6 * B * S * K * 2 * H * Fh
    out = {}
    for name in runs:
        st = layers[name].pop_stats() if name in layers else netmoe.MoEStats()
        ms = float(np.median(times[name]))
        out[name] = dict(ms=ms, tflops=flops / ms / 1e9, a2a_ms=st.a2a_ms / o["repeats"],
                         solver_ms=st.solver_ms / o["repeats"], exposed_ms=st.solver_exposed_ms / o["repeats"],
                         gather_inter=st.gather["inter"] / o["repeats"], gather_intra=st.gather["intra"] / o["repeats"],
                         moved_device=st.moved_device / max(st.samples, 1),
                         chunks=st.mean_chunks)
        if name in layers and layers[name].chunk_trial is not None:
            out[name]["chunk_trial"] = layers[name].chunk_trial.record_of()
    per_rank = [out] * world
    if world > 1:
        dist.all_gather_object(per_rank, out)
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(per_rank, f)


# A CPU timing round over its variants' expert products alone: the gate, LayerNorm, GELU, row
# gathers, the exchange and the variants without experts add this much (measured 1.4-1.5x on 2
# cores: bench.py layer --nproc 4 --topology 2x2 --exchange node --hidden 256 --seq-len 512).
CPU_LAYER_OVERHEAD = 1.5


def cpu_layer_estimate(o, J):
    """(seconds, FLOP/s): how long `bench.py layer` with options o takes on this host's CPU at
    least. The experts' products of every variant in every round, for all J devices' rows
    (spawned ranks share the host's cores), over the rate a float32 product of the layer's width
    (at least 512, where the BLAS runs at its rate) reaches here, timed now in about 0.2 s, times
    CPU_LAYER_OVERHEAD. Small layers take longer than their FLOPs say: they never reach a minute."""
    H, rows = o["hidden"], o["batch"] * J * o["seq_len"] * o["top_k"]
    variants = len(netmoe.PLACEMENTS) + 1 + (o["baseline_chunks"] != o["chunks"])   # + experts alone, + static at C'
    flops = (o["warmup_repeats"] + o["repeats"]) * variants * 6 * rows * 2 * H * 4 * H   # two H x 4H, fwd + bwd
    w = max(H, 512)
    a, b = torch.randn(1024, w), torch.randn(w, 4 * w)
    times = []
    for _ in range(4):   # the first call starts the thread pool: the best of the others
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    rate = 2 * 1024 * w * 4 * w / min(times[1:])
    return flops / rate * CPU_LAYER_OVERHEAD, rate


@cli.command("layer", short_help="One MoE layer forward + backward: static vs NetMoE.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs (or CPU processes) to spawn")
@click.option("--virtual-world", type=click.IntRange(min=1), default=None,
              help="one process doing all J devices' work (needs --nproc 1)")
@click.option("--topology", type=TOPOLOGY, default=None, help="N virtual nodes of G devices",
              show_default="1xJ; under torchrun, its nodes x local ranks")
@click.option("--hidden", type=click.IntRange(min=1), default=768, show_default=True, help="H (MoE-GPT-S: 768)")
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True, help="tokens per sample, S")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="samples per device, I/J")
@click.option("--experts-per-device", type=click.IntRange(min=1), default=2, show_default=True,
              help="experts per device, E/J")
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True, help="experts per token, K")
@click.option("--exchange", type=click.Choice(list(netmoe.EXCHANGES)), default="expert", show_default=True,
              help="what the All-to-Alls send: a row per (token, expert), or per (token, node)")
@click.option("--expert-hidden", type=click.IntRange(min=1), default=None, show_default="4H",
              help="the experts' FFN width, F (fine-grained experts: below 4H)")
@click.option("--shared-experts", type=click.IntRange(min=0), default=0, show_default=True,
              help="experts every token passes through")
@click.option("--route-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="group-limited routing: experts in M groups of consecutive ids")
@click.option("--group-top", type=click.IntRange(min=1), default=1, show_default=True,
              help="... a token's K experts from its T best groups")
@click.option("--expert-bias/--no-expert-bias", default=True, show_default=True, help="the experts' FFN biases")
@click.option("--dtype", type=DTYPE, default=None, show_default="bfloat16 on GPUs, float32 on the CPU",
              help="the residual stream and the rows sent")
@click.option("--warmup-repeats", type=click.IntRange(min=0), default=5, show_default=True,
              help="untimed repeats first (allocator, caches, clocks)")
@click.option("--repeats", type=click.IntRange(min=1), default=30, show_default=True,
              help="timed rounds of every variant (the median counts)")
@click.option("--chunks", type=train_gpt.CHUNKS, default=train_gpt.DEFAULT_CHUNKS, show_default=True,
              help="the exchange pipelined in C chunks, as train --chunks runs it")
@click.option("--baseline-chunks", type=COUNT, default=1, show_default=True,
              help="static EP and the exchange alone also in this many chunks: what the pipeline hides")
@click.option("--cpu", is_flag=True, help="CPU processes (gloo) even where there are GPUs")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def layer_cmd(json_path, virtual_world, **o):
    """One MoE layer forward + backward: static vs NetMoE vs NetMoE that keeps samples in place,
    and the experts' matrix products alone; bf16 autocast on a GPU."""
    def on_the_cpu(o):   # a GPU's shapes: said before the first timing round, not after 15 silent minutes
        J = o["topology"].world
        seconds, rate = cpu_layer_estimate(o, J)
        if seconds > 60:
            span = f"{seconds / 3600:.1f} h" if seconds > 5400 else f"{seconds / 60:.0f} min"
            click.echo(f"note: {o['batch'] * J} samples of S={o['seq_len']} at H={o['hidden']} on the CPU: about "
                       f"{span} ({rate / 1e9:.3g} GFLOP/s measured here for the experts' products, "
                       f"x {CPU_LAYER_OVERHEAD} for the rest of the layer); lower --hidden, --seq-len, --batch or "
                       f"--repeats for less", err=True)
    per_rank = _run_bench(_layer_bench_worker, o, virtual_world, on_the_cpu)
    if per_rank is None:
        return
    med = {n: {k: float(np.median([r[n][k] for r in per_rank])) for k, v in per_rank[0][n].items()
               if not isinstance(v, dict)} for n in per_rank[0]}
    base = med["static"]["ms"]
    J = o["topology"].world
    model = ("" if o["expert_bias"] else ", no expert biases") + \
        (f", {o['shared_experts']} shared" if o["shared_experts"] else "") + \
        (f", top {o['group_top']} of {o['route_groups']} groups" if o["route_groups"] > 1 else "")
    click.echo(f"MoE layer fwd+bwd, H={o['hidden']}, S={o['seq_len']}, I={o['batch'] * J}, "
               f"E={o['experts_per_device'] * J}, K={o['top_k']}, F={o['expert_hidden'] or 4 * o['hidden']}{model}"
               f" on {o['topology']}, {o['exchange']} exchange"
               f"{' (virtual, one process)' if virtual_world else ''}; median of {o['repeats']} (ranks' median); "
               f"TFLOP/s counts the experts' matrix products only; {o['chunks']} chunk(s) unless named; kept: all of "
               f"NetMoE's work, then every sample kept in place; exchange only: the layer without its experts' FFN")
    click.echo(table(["variant", "fwd+bwd ms", "vs static", "expert TFLOP/s", "A2A ms", "chunks", "solver ms",
                      "solver exposed ms", "gather inter", "gather intra", "moved dev"],
                     [[n, m["ms"], _change(m["ms"], base), m["tflops"], m["a2a_ms"], m["chunks"],
                       m["solver_ms"], m["exposed_ms"], m["gather_inter"], m["gather_intra"], m["moved_device"]]
                      for n, m in med.items()]))
    for n, m in per_rank[0].items():   # the same on every rank
        if "chunk_trial" in m:
            click.echo(f"{n}: {train_gpt.show_trial(m['chunk_trial'])}")
    other = f"static, C={o['baseline_chunks']}"
    if other in med:   # what the pipeline hid, against what it could: min(communication, compute)
        hid = med[other]["ms"] - base
        could = min(med[f"exchange only, C={o['baseline_chunks']}"]["ms"], med["experts only"]["ms"])
        click.echo(f"the pipeline in {o['chunks']} chunks hid {hid:.3g} ms against {o['baseline_chunks']} chunk(s), "
                   f"of min(exchange alone, experts alone) = {could:.3g} ms: {hid / could * 100:.0f}%")
    _write_json(json_path, kind="layer", obj=dict(options=dict(o, topology=str(o["topology"]), virtual_world=virtual_world),
                                per_rank=per_rank, median=med))



@cli.command("layouts", short_help="How far a shared expert layout goes on a trace, per exchange.")
@click.option("--trace", required=True, type=click.Path(exists=True, dir_okay=False),
              help="a routing trace (train --trace writes one)")
@click.option("--topology", required=True, type=TOPOLOGY, help="N nodes of G devices to replay on, e.g. 4x8")
@click.option("--from-step", type=NONNEG, default=0, show_default=True, help="replay recorded steps from here on")
@click.option("--chunks", type=train_gpt.CHUNKS, default=train_gpt.DEFAULT_CHUNKS, show_default=True,
              help="the exchange pipelined in C chunks, as train --chunks runs it")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help="write the results here")
def layouts_cmd(trace, topology, from_step, chunks, json_path):
    """How far a shared expert layout can go on a trace, per exchange: NetMoE with lookahead under
    layouts learned (a) on the 4 recorded steps before (as simulate --layout and live re-layout),
    (b) on one half of the same batch, scored on the other half, (c) on the very batch it is
    scored on (a bound for one layout per layer). Inter-node rows against static EP with the
    flat (expert) exchange, and the Eq. 1 All-to-All time as built in `chunks` chunks."""
    t = load_trace(trace)
    route, pred, E = t["route"].astype(np.int64), t["route_next_pred"].astype(np.int64), int(t["num_experts"])
    steps, L, I = route.shape[:3]
    dtype = str(t.get("dtype", "float32"))
    recorded = t["steps"] if "steps" in t else np.arange(steps)
    late = [s for s in range(steps) if recorded[s] >= from_step and s >= 1]
    if not late:
        raise click.UsageError(f"no recorded step from {from_step} on, after the first: the trace holds steps "
                               f"{recorded[0]}-{recorded[-1]}; lower --from-step")
    num = lambda r: netmoe.count_tokens(r, E).numpy()
    learn = lambda rows: netmoe.expert_layout([np.concatenate([num(route[s, l][r]) for s, r in rows])
                                               for l in range(L)], topology)

    def score(s, layouts, exchange, placement="netmoe", rows=slice(None)):
        layers = netmoe.routings([route[s, l][rows] for l in range(L)], topology, E, layouts, exchange)
        nexts = netmoe.routings([pred[s, l][rows] for l in range(L - 1)], topology, E, layouts and layouts[1:], exchange)
        return netmoe.replay(layers, topology, _wire_bytes(t, exchange, dtype), nexts, placement, chunks)

    half, other, full = slice(0, I // 2), slice(I // 2, I), slice(None)
    acc = {}
    for s in progress(late, "scoring step"):
        before = learn([(q, full) for q in range(max(0, s - netmoe.RELAYOUT_WINDOW), s)])
        for exchange in netmoe.EXCHANGES:
            for name, st in [("static", score(s, None, exchange, "static")), ("netmoe + lookahead", score(s, None, exchange)),
                             ("+ layout from the 4 steps before", score(s, before, exchange)),
                             ("+ layout from the same batch", score(s, learn([(s, full)]), exchange)),
                             ("half batch: static", score(s, None, exchange, "static", other)),
                             ("half batch: + layout from the other half", score(s, learn([(s, half)]), exchange, "netmoe", other))]:
                acc.setdefault((exchange, name), []).append(st)
    res = {f"{ex}: {name}": replay_means(st, L, _wire_bytes(t, ex, dtype)) for (ex, name), st in acc.items()}
    click.echo(f"{trace}: recorded steps {recorded[late[0]]}-{recorded[late[-1]]} ({len(late)}), {topology}; rows per "
               f"step; change against static EP with the expert exchange (on the same samples)")
    rows = []
    for key, r in res.items():
        base = res["expert: half batch: static" if "half batch" in key else "expert: static"]
        rows.append([key, r["inter"], _change(r["inter"], base["inter"]), r["intra"], r["a2a_ms"]])
    click.echo(table(["exchange: placement", "inter", "vs static expert", "intra", f"A2A ms (Eq.1, {chunks} chunks)"], rows))
    _write_json(json_path, kind="layouts", obj=dict(trace=os.path.basename(trace), topology=str(topology), from_step=from_step, chunks=chunks,
                                results=res))

if __name__ == "__main__":
    cli()
