"""DDP vs ZeRO-3 (FSDP) vs HSDP vs MiCS on the emulated multi-node cluster.

    python -m benchmarks.strategies --nodes 2 --ranks-per-node 2 --bandwidth 200mbit \\
        --model gpt_tiny [--bandwidths 50mbit,200mbit,1gbit,10gbit] [--repeats 3] \\
        [--steps 3] [--accumulation 1,4] [--out benchmarks/results/]

Runs the same model, micro-batch and global batch under every strategy on ``--nodes``
emulated nodes x ``--ranks-per-node`` ranks (`benchmarks.emulated_cluster`: network
namespaces joined by veth links shaped with ``tc tbf``; gloo on CPU):

- ``ddp``: ``DistributedDataParallel`` (``no_sync`` on all but the last micro-step);
- ``fsdp``: ZeRO-3, i.e. plain FSDP2 ``fully_shard`` per transformer block + the root on
  a 1-D mesh of the whole world (torch's defaults; reduce-scatter every micro-step);
- ``hsdp``: `lightning_mics.apply_mics` with ``partition_size = ranks_per_node``, flat
  collectives and ``accumulation=every_micro_step`` (torch HSDP's collectives: shard
  inside a node, all-reduce across nodes on every micro-step);
- ``mics`` with ``partition_size = ranks_per_node`` (``two_hop``: one cross-node
  all-reduce per optimizer step);
- ``mics`` with a partition spanning nodes (``--span-partitions``, default two nodes),
  ``hierarchical`` off and on;

each with every ``--accumulation`` (micro-steps per optimizer step). All runs of one
bandwidth execute in one launch of ``benchmarks.strategy_worker`` per rank, interleaved
(every repeat runs every strategy's ``--steps`` steps in turn), so they share the
machine's load and compare as ratios. Each bandwidth is its own launch on a fresh
cluster.

Per run it reports the step times (all repeats), their median and spread, tokens/s, the
inter-node bytes per optimizer step counted by the kernel (veth counters), by
`CommStats` (logical bytes, and converted to wire bytes) and by the analytic model
(`benchmarks.analytic`), and each rank's model-state bytes (parameters, gradients,
optimizer state: the local shards). Writes ``strategies_<N>x<K>.json`` (schema:
``benchmarks/README.md``) to ``--out``, then regenerates ``strategies.md`` and
``strategies.png`` there from every ``strategies_*.json`` in it (``--report-only`` does
just that). Needs root (exit 77 otherwise, with the reason).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import analytic
from benchmarks.emulated_cluster import (
    SKIP_EXIT_CODE,
    EmulatedCluster,
    EmulationUnavailable,
    rate_bytes_per_s,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
SCHEMA = "lightning-mics/strategy-benchmark"
SCHEMA_VERSION = 1
MB = 1e6

#: Keys of every run record (``runs[i]`` of a results file); ``benchmarks/README.md``
#: documents each. Later schema versions may add keys, never remove or rename these.
RUN_KEYS = (
    "strategy", "label", "implementation", "nodes", "ranks_per_node", "world_size",
    "partition_size", "replication_size", "hierarchical", "async_unshard_prefetch",
    "accumulation", "accumulation_mode", "bandwidth", "bandwidth_bytes_per_s", "model",
    "model_config", "num_params", "micro_batch", "global_batch", "seq_len",
    "tokens_per_step", "steps_per_repeat", "repeats", "step_times_s", "median_step_time_s",
    "spread", "repeat_medians_s", "tokens_per_s", "inter_node_bytes_per_step",
    "inter_node_breakdown_per_step", "collectives_per_step",
    "intra_node_loopback_bytes_per_step", "memory_per_rank_bytes",
    "memory_per_rank_bytes_max", "memory_per_rank_bytes_analytic", "load_average",
)  # fmt: skip
#: Keys of a results file.
DOC_KEYS = (
    "schema", "schema_version", "created", "command", "machine", "load_average", "cluster",
    "model", "model_config", "micro_batch", "seq_len", "steps_per_repeat", "repeats",
    "accumulations", "bandwidths", "launches", "runs",
)  # fmt: skip

#: ``gpt_tiny`` as ``conf/model/gpt_tiny.yaml`` defines it with the default (byte-level
#: text) data, used when the Hydra configs are absent.
FALLBACK_MODELS: dict[str, dict[str, Any]] = {
    "gpt_tiny": dict(
        vocab_size=260, block_size=128, n_layer=4, n_head=4, n_embd=128, bias=True, tie_weights=True
    ),
}
GPT_FIELDS = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "tie_weights",
)

IMPLEMENTATION = {
    "ddp": "torch DistributedDataParallel (default buckets; all-reduce via a recording comm "
    "hook = default_hooks.allreduce_hook); no_sync() on all but the last micro-step",
    "fsdp": "ZeRO-3: plain FSDP2 fully_shard per block + root on a 1-D mesh of the whole "
    "world (torch defaults), sum-only reductions (gloo), recorded with "
    "lightning_mics.accounting.install_comm_stats (same collectives as FSDP's)",
    "hsdp": "lightning_mics.apply_mics(partition_size=ranks_per_node, hierarchical=False) + "
    "micro_step(mode=every_micro_step): HSDP's collectives on a 2-D (replicate, shard) mesh",
    "mics": "lightning_mics.apply_mics(partition_size, hierarchical) + micro_step(mode=two_hop)",
}
OVERLAP_IMPLEMENTATION = (
    "; plus MiCSConfig(forward_prefetch=True): FSDP2 async unshard with explicit forward "
    "prefetch of the next block (hier: inter-node stage async, intra-node stage in wait())"
)


# ----------------------------------------------------------------------- the model
def load_model_config(name: str, conf_dir: Path = REPO / "conf") -> dict[str, Any]:
    """The `recipes.gpt.GPTConfig` fields of ``conf/model/<name>.yaml`` (an
    ``${data.vocab_size}`` interpolation resolves to the default data's vocabulary),
    else :data:`FALLBACK_MODELS`."""
    path = conf_dir / "model" / f"{name}.yaml"
    if not path.exists():
        if name not in FALLBACK_MODELS:
            raise SystemExit(f"no model config {path} and no built-in {name!r}")
        return dict(FALLBACK_MODELS[name])
    import yaml

    raw = yaml.safe_load(path.read_text())
    if raw.get("arch", "gpt") != "gpt":
        raise SystemExit(f"{name}: only GPT models are supported here (arch={raw.get('arch')})")
    vocab = raw.get("vocab_size")
    if isinstance(vocab, str) and vocab.startswith("${data."):
        key = vocab[len("${data.") : -1]
        data = "text"
        train = conf_dir / "train.yaml"
        if train.exists():
            for entry in yaml.safe_load(train.read_text()).get("defaults", []):
                if isinstance(entry, dict) and "data" in entry:
                    data = entry["data"]
        raw["vocab_size"] = yaml.safe_load((conf_dir / "data" / f"{data}.yaml").read_text())[key]
    return {k: raw[k] for k in GPT_FIELDS if k in raw}


def model_units(model: dict[str, Any]) -> list[analytic.Unit]:
    return analytic.gpt_units(
        model["vocab_size"],
        model["block_size"],
        model["n_layer"],
        model["n_embd"],
        bias=model.get("bias", True),
        tie_weights=model.get("tie_weights", False),
    )


# ----------------------------------------------------------------------- the runs
def plan_runs(
    nodes: int,
    ranks_per_node: int,
    accumulations: Sequence[int],
    span_partitions: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    overlap: bool = False,
) -> list[dict[str, Any]]:
    """The runs of one cluster shape, in interleaving order. ``span_partitions``:
    partition sizes spanning nodes for the ``mics`` flat/hierarchical pair (default:
    two nodes' worth of ranks). ``overlap`` adds, per spanning partition, the flat and
    hierarchical layouts with ``MiCSConfig(forward_prefetch=True)`` (asynchronous
    unshard, one block ahead)."""
    k, world = ranks_per_node, nodes * ranks_per_node
    if span_partitions is None:
        span_partitions = [2 * k] if nodes >= 2 and k >= 2 else []
    layouts: list[dict[str, Any]] = [
        dict(strategy="ddp", layout="ddp", partition_size=1, hierarchical=False),
        dict(strategy="fsdp", layout="fsdp", partition_size=world, hierarchical=False),
        dict(strategy="hsdp", layout="mics", partition_size=k, hierarchical=False),
        dict(strategy="mics", layout="mics", partition_size=k, hierarchical=False),
    ]
    for p in span_partitions:
        if p <= k or p > world or world % p or p % k:
            raise SystemExit(f"--span-partitions {p}: needs a multiple of {k} dividing {world}")
        for overlapped in (False, True) if overlap else (False,):
            for hier in (False, True):
                layouts.append(
                    dict(strategy="mics", layout="mics", partition_size=p, hierarchical=hier)
                    | ({"overlap": True} if overlapped else {})
                )
    runs = []
    for acc in accumulations:
        for lay in layouts:
            if strategies and lay["strategy"] not in strategies:
                continue
            mode = {"hsdp": "every_micro_step", "fsdp": "every_micro_step"}.get(
                lay["strategy"], "two_hop"
            )
            run = {**lay, "ranks_per_node": k, "accumulation": int(acc), "mode": mode}
            runs.append({**run, "label": run_label(run)})
    return runs


def run_label(run: dict[str, Any]) -> str:
    s, p = run["strategy"], run["partition_size"]
    if s in ("ddp",):
        return "ddp"
    if s == "fsdp":
        return f"fsdp (ZeRO-3, p={p})"
    if s == "hsdp":
        return f"hsdp p={p}"
    if run["partition_size"] <= run["ranks_per_node"]:
        return f"mics p={p}"
    label = f"mics p={p} " + ("hier" if run["hierarchical"] else "flat")
    return label + (" +async" if run.get("overlap") else "")


# --------------------------------------------------------------------- statistics
def time_stats(times: Sequence[float]) -> dict[str, float]:
    """Median and spread of step times: ``rel_iqr`` = interquartile range / median."""
    ts = sorted(times)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    med = statistics.median(ts)
    return {
        "median_s": med,
        "min_s": ts[0],
        "max_s": ts[-1],
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "rel_iqr": (q3 - q1) / med if med else 0.0,
        "rel_range": (ts[-1] - ts[0]) / med if med else 0.0,
    }


def _group_for(kind: str, run: dict[str, Any], layout: analytic.Layout) -> list[int]:
    """A representative group of the collectives of ``kind`` that cross nodes."""
    if run["strategy"] == "ddp":
        return list(range(layout.world_size))
    if kind == "all_reduce":
        return layout.replication_groups()[0]
    if layout.hierarchical:
        return layout.inter_node_groups()[0]
    return layout.partition_groups()[0]


def summarize_run(
    raw: dict[str, Any],
    *,
    nodes: int,
    ranks_per_node: int,
    bandwidth: str,
    model_name: str,
    model: dict[str, Any],
    micro_batch: int,
    seq_len: int,
) -> dict[str, Any]:
    """One run's record (the schema in ``benchmarks/README.md``) from the worker's raw
    report of it."""
    k, world = ranks_per_node, nodes * ranks_per_node
    acc, p = int(raw["accumulation"]), int(raw["partition_size"])
    windows = raw["windows"]
    steps = len(windows[0]["times"])
    times = [w["times"] for w in sorted(windows, key=lambda w: w["repeat"])]
    flat_times = [t for ts in times for t in ts]
    tstats = time_stats(flat_times)
    global_batch = micro_batch * world * acc
    units = model_units(model)
    layout = analytic.Layout(nodes, k, p if raw["strategy"] != "ddp" else 1, raw["hierarchical"])

    # kernel: sum of the nodes' veth tx over each window, per optimizer step
    def per_step(key: str) -> list[float]:
        return [sum(n["link"][key] for n in w["nodes"]) / steps for w in windows]

    kernel_payload = per_step("tx_payload_bytes")
    kernel_frames = per_step("tx_bytes")
    loopback = [sum(n["loopback"]["tx_bytes"] for n in w["nodes"]) / steps for w in windows]
    # CommStats: logical bytes summed over ranks, per optimizer step (mean of windows)
    keys = windows[0]["stats"][0].keys()
    logical = {
        key: statistics.fmean(sum(s[key] for s in w["stats"]) / steps for w in windows)
        for key in keys
    }
    wire = {
        kind: logical[f"{kind}_inter_node_bytes"]
        * analytic.wire_factor(kind, _group_for(kind, raw, layout), k)
        for kind in ("all_gather", "reduce_scatter", "all_reduce")
    }
    if raw["strategy"] == "ddp":
        expected = analytic.ddp_step_bytes(units, nodes, k)
        expected_ring = expected
    else:
        expected = analytic.fsdp_step_bytes(units, layout, acc, raw["mode"], "gloo")
        expected_ring = analytic.fsdp_step_bytes(units, layout, acc, raw["mode"], "nccl")
    memory = raw["memory_per_rank"]
    mem_keys = ("params", "grads", "optimizer_state", "total")
    shards = 1 if raw["strategy"] == "ddp" else p
    return {
        "strategy": raw["strategy"],
        "label": raw["label"],
        "implementation": IMPLEMENTATION[raw["strategy"]]
        + (OVERLAP_IMPLEMENTATION if raw.get("overlap") else ""),
        "nodes": nodes,
        "ranks_per_node": k,
        "world_size": world,
        "partition_size": shards,
        "replication_size": world // shards,
        "hierarchical": bool(raw["hierarchical"]),
        "async_unshard_prefetch": bool(raw.get("overlap", False)),
        "accumulation": acc,
        "accumulation_mode": raw["mode"] if raw["strategy"] != "ddp" else "no_sync",
        "bandwidth": bandwidth,
        "bandwidth_bytes_per_s": rate_bytes_per_s(bandwidth),
        "model": model_name,
        "model_config": model,
        "num_params": sum(u.numel for u in units),
        "micro_batch": micro_batch,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "tokens_per_step": global_batch * seq_len,
        "steps_per_repeat": steps,
        "repeats": len(windows),
        "step_times_s": times,
        "median_step_time_s": tstats["median_s"],
        "spread": {key: v for key, v in tstats.items() if key != "median_s"},
        "repeat_medians_s": [statistics.median(ts) for ts in times],
        "tokens_per_s": global_batch * seq_len / tstats["median_s"],
        "inter_node_bytes_per_step": {
            "kernel": statistics.fmean(kernel_payload),
            "kernel_frames": statistics.fmean(kernel_frames),
            "kernel_per_repeat": kernel_payload,
            "commstats_logical": logical["inter_node_bytes"],
            "commstats_wire": sum(wire.values()),
            "analytic": expected.total,
            "analytic_ring_reduce_scatter": expected_ring.total,
        },
        "inter_node_breakdown_per_step": {
            "commstats_logical": {
                kind: logical[f"{kind}_inter_node_bytes"]
                for kind in ("all_gather", "reduce_scatter", "all_reduce")
            },
            "commstats_wire": wire,
            "analytic": {k2: v for k2, v in expected.as_dict().items() if k2 != "total"},
        },
        "collectives_per_step": {
            kind: logical[f"{kind}_count"] / world
            for kind in ("all_gather", "reduce_scatter", "all_reduce")
        },
        "intra_node_loopback_bytes_per_step": statistics.fmean(loopback),
        "memory_per_rank_bytes": {key: memory[0][key] for key in mem_keys},
        "memory_per_rank_bytes_max": {key: max(m[key] for m in memory) for key in mem_keys},
        "memory_per_rank_bytes_analytic": analytic.model_state_bytes(units, shards),
    }


# --------------------------------------------------------------------------- running
def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 15.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below ``threshold`` (at most
    ``max_wait_s``); return what was seen."""
    start = time.monotonic()
    first = os.getloadavg()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait_s:
        time.sleep(poll_s)
    return {
        "threshold": threshold,
        "at_invocation": list(first),
        "waited_s": round(time.monotonic() - start, 1),
        "at_start": list(os.getloadavg()),
        "quiet": os.getloadavg()[0] < threshold,
    }


def run_bandwidth(
    nodes: int,
    ranks_per_node: int,
    bandwidth: str,
    spec: dict[str, Any],
    timeout: float,
    log_dir: Path,
) -> dict[str, Any]:
    """One launch of the worker on a fresh emulated cluster; its raw report."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "report.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "benchmarks.strategy_worker", "--spec", str(spec_path)]
        cmd += ["--out", str(out)]
        env = {
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": str(spec.get("threads", 1)),
            "PYTHONUNBUFFERED": "1",
        }
        load_before = os.getloadavg()
        with EmulatedCluster(nodes, ranks_per_node, bandwidth) as cluster:
            result = cluster.run(cmd, env=env, cwd=REPO, timeout=timeout, log_dir=log_dir)
        if result.returncode != 0:
            tails = "\n".join(
                f"--- {f.name} ---\n{f.read_text(errors='replace')[-3000:]}"
                for f in sorted(log_dir.glob("rank*.log"))
            )
            raise RuntimeError(f"worker failed at {bandwidth} (exit {result.returncode}):\n{tails}")
        report = json.loads(out.read_text())
    report["elapsed_s"] = result.elapsed_s
    report["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    report["inter_node_payload_bytes_total"] = result.inter_node_payload_bytes
    return report


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model_config(args.model)
    seq_len = args.seq_len or model["block_size"]
    if seq_len > model["block_size"]:
        raise SystemExit(f"--seq-len {seq_len} exceeds the model's block_size")
    runs = plan_runs(
        args.nodes,
        args.ranks_per_node,
        args.accumulation,
        args.span_partitions,
        args.strategies,
        overlap=args.overlap,
    )
    spec = {
        "model": model,
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": 1,
        "runs": runs,
    }
    load = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_max > 0 else {
        "threshold": None, "at_start": list(os.getloadavg()), "waited_s": 0.0
    }  # fmt: skip
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records, launches = [], []
    log_root = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="strategies-"))
    for bandwidth in args.bandwidths:
        print(f"[strategies] {args.nodes}x{args.ranks_per_node} at {bandwidth}: "
              f"{len(runs)} runs x {args.repeats} repeats x {args.steps} steps", flush=True)  # fmt: skip
        raw = run_bandwidth(
            args.nodes, args.ranks_per_node, bandwidth, spec, args.timeout,
            log_root / f"{args.nodes}x{args.ranks_per_node}-{bandwidth}",
        )  # fmt: skip
        launches.append(
            {
                "bandwidth": bandwidth,
                "elapsed_s": raw["elapsed_s"],
                "setup_s": raw["setup_s"],
                "load_average": raw["load_average"],
            }
        )
        for run in raw["runs"]:
            rec = summarize_run(
                run,
                nodes=args.nodes,
                ranks_per_node=args.ranks_per_node,
                bandwidth=bandwidth,
                model_name=args.model,
                model=model,
                micro_batch=args.micro_batch,
                seq_len=seq_len,
            )
            rec["load_average"] = raw["load_average"]
            records.append(rec)
            print(
                f"  {rec['label']:<22} acc={rec['accumulation']} "
                f"{rec['median_step_time_s']:.3f} s (IQR {rec['spread']['rel_iqr']:.0%}) "
                f"inter-node {rec['inter_node_bytes_per_step']['kernel'] / MB:.2f} MB/step "
                f"(analytic {rec['inter_node_bytes_per_step']['analytic'] / MB:.2f})",
                flush=True,
            )
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": started,
        "command": "python -m benchmarks.strategies " + " ".join(map(shlex.quote, args.argv)),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": _torch_version(),
            "backend": "gloo (CPU)",
        },
        "load_average": {**load, "launches": [lch["load_average"] for lch in launches]},
        "cluster": {
            "nodes": args.nodes,
            "ranks_per_node": args.ranks_per_node,
            "emulation": "benchmarks.emulated_cluster: one network namespace per node, veth "
            "uplinks shaped with tc tbf (egress), intra-node traffic on loopback",
        },
        "model": args.model,
        "model_config": model,
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "accumulations": list(args.accumulation),
        "bandwidths": list(args.bandwidths),
        "launches": launches,
        "runs": records,
    }


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return "?"


# --------------------------------------------------------------------------- reports
def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every ``strategies_*.json`` in ``out_dir`` (smallest cluster first)."""
    docs = []
    for path in sorted(out_dir.glob("strategies_*.json")):
        doc = json.loads(path.read_text())
        if doc.get("schema") == SCHEMA:
            docs.append(doc)
    return sorted(docs, key=lambda d: d["cluster"]["nodes"] * d["cluster"]["ranks_per_node"])


def _fmt_bw(bw: str) -> str:
    return bw.replace("mbit", " Mbit/s").replace("gbit", " Gbit/s")


def _bw_key(bw: str) -> float:
    return rate_bytes_per_s(bw)


def markdown_report(docs: Sequence[dict[str, Any]]) -> str:
    """The tables of ``strategies.md``."""
    out = ["# Strategy benchmark on the emulated cluster", ""]
    out.append(
        "Generated by `python -m benchmarks.strategies` (see `benchmarks/README.md` for the "
        "schema and the analysis). Times: median optimizer-step wall time over all repeats, "
        "spread = interquartile range / median. Inter-node MB: per optimizer step, all "
        "nodes' uplinks together, TCP payload; kernel = veth byte counters, CommStats = "
        "lightning-mics' logical bytes through the gloo ring wire model, analytic = "
        "`benchmarks.analytic` from the parameter shapes. Model state: one rank's local "
        "parameters + gradients + AdamW state (MB) and its fraction of DDP's."
    )
    for doc in docs:
        c = doc["cluster"]
        load = doc["load_average"]
        out += [
            "",
            f"## {c['nodes']} nodes x {c['ranks_per_node']} ranks "
            f"({doc['model']}, {doc['model_config']['n_layer']} layers x "
            f"{doc['model_config']['n_embd']}, {doc['runs'][0]['num_params'] / 1e6:.2f} M "
            f"parameters)",
            "",
            f"Command: `{doc['command']}` ({doc['created']}). "
            f"Micro-batch {doc['micro_batch']} x seq {doc['seq_len']} per rank; "
            f"{doc['repeats']} repeats x {doc['steps_per_repeat']} steps per run. "
            f"1-min load average at start {load['at_start'][0]:.2f} "
            f"(waited {load['waited_s']:.0f} s for < {load.get('threshold')}); during the launches "
            + ", ".join(
                f"{lch['bandwidth']}: {lch['load_average']['before'][0]:.1f}->"
                f"{lch['load_average']['after'][0]:.1f}"
                for lch in doc["launches"]
            )
            + f" on {doc['machine']['cpus']} CPUs.",
        ]
        for bw in sorted({r["bandwidth"] for r in doc["runs"]}, key=_bw_key):
            runs = [r for r in doc["runs"] if r["bandwidth"] == bw]
            out += ["", f"### {_fmt_bw(bw)}", ""]
            out += [
                "| strategy | acc | global batch | step (s) | spread | tokens/s | vs fsdp "
                "| inter-node MB/step kernel | CommStats | analytic | model state MB/rank "
                "(P+G+O) | vs ddp |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for acc in sorted({r["accumulation"] for r in runs}):
                group = [r for r in runs if r["accumulation"] == acc]
                base = next((r for r in group if r["strategy"] == "fsdp"), None)
                ddp = next((r for r in group if r["strategy"] == "ddp"), None)
                for r in group:
                    b, m = r["inter_node_bytes_per_step"], r["memory_per_rank_bytes"]
                    speed = (
                        f"{base['median_step_time_s'] / r['median_step_time_s']:.2f}x"
                        if base
                        else "-"
                    )
                    frac = (
                        f"{m['total'] / ddp['memory_per_rank_bytes']['total']:.2f}" if ddp else "-"
                    )
                    out.append(
                        f"| {r['label']} | {acc} | {r['global_batch']} "
                        f"| {r['median_step_time_s']:.3f} | {r['spread']['rel_iqr']:.0%} "
                        f"| {r['tokens_per_s']:.0f} | {speed} "
                        f"| {b['kernel'] / MB:.2f} | {b['commstats_wire'] / MB:.2f} "
                        f"| {b['analytic'] / MB:.2f} "
                        f"| {m['total'] / MB:.2f} ({m['params'] / MB:.2f}+{m['grads'] / MB:.2f}"
                        f"+{m['optimizer_state'] / MB:.2f}) | {frac} |"
                    )
        bws = sorted({r["bandwidth"] for r in doc["runs"]}, key=_bw_key)
        if len(bws) > 1:
            out += ["", "### Step time (s) against inter-node bandwidth", ""]
            out.append("| strategy | acc | " + " | ".join(_fmt_bw(b) for b in bws) + " |")
            out.append("|---|---:|" + "---:|" * len(bws))
            seen: list[tuple[str, int]] = []
            for r in doc["runs"]:
                key = (r["label"], r["accumulation"])
                if key in seen:
                    continue
                seen.append(key)
                cells = []
                for bw in bws:
                    match = [
                        x for x in doc["runs"]
                        if (x["label"], x["accumulation"], x["bandwidth"]) == (*key, bw)
                    ]  # fmt: skip
                    cells.append(f"{match[0]['median_step_time_s']:.3f}" if match else "-")
                out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_report(docs: Sequence[dict[str, Any]], path: Path, slow: str | None = None) -> None:
    """``strategies.png``: per cluster shape, step time and inter-node bytes per strategy
    at the slowest (communication-bound) bandwidth, and step time against bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    cols = max(1, len(docs))
    n_acc = max(len({r["accumulation"] for r in doc["runs"]}) for doc in docs)
    rows_n = 2 + n_acc
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 5 * rows_n), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette = plt.get_cmap("tab10").colors
    for j, doc in enumerate(docs):
        c = doc["cluster"]
        shape = f"{c['nodes']} nodes x {c['ranks_per_node']} ranks"
        bws = sorted({r["bandwidth"] for r in doc["runs"]}, key=_bw_key)
        bw = slow if slow in bws else next((b for b in bws if b == "200mbit"), bws[0])
        accs = sorted({r["accumulation"] for r in doc["runs"]})
        labels: list[str] = []
        for r in doc["runs"]:
            if r["label"] not in labels:
                labels.append(r["label"])
        width = 0.8 / max(1, len(accs))
        ax_t, ax_b = axes[0][j], axes[1][j]
        for a, acc in enumerate(accs):
            rows = {
                r["label"]: r
                for r in doc["runs"]
                if r["bandwidth"] == bw and r["accumulation"] == acc
            }
            xs = [i + (a - (len(accs) - 1) / 2) * width for i in range(len(labels))]
            med = [rows[lb]["median_step_time_s"] if lb in rows else 0 for lb in labels]
            err = [
                [
                    rows[lb]["median_step_time_s"] - rows[lb]["spread"]["q1_s"] if lb in rows else 0
                    for lb in labels
                ],
                [
                    rows[lb]["spread"]["q3_s"] - rows[lb]["median_step_time_s"] if lb in rows else 0
                    for lb in labels
                ],
            ]
            ax_t.bar(xs, med, width, yerr=err, capsize=3, label=f"accumulation {acc}",
                     color=colors[a % len(colors)])  # fmt: skip
            kern = [
                rows[lb]["inter_node_bytes_per_step"]["kernel"] / MB if lb in rows else 0
                for lb in labels
            ]
            ana = [
                rows[lb]["inter_node_bytes_per_step"]["analytic"] / MB if lb in rows else 0
                for lb in labels
            ]
            ax_b.bar(
                xs, kern, width, label=f"kernel, accumulation {acc}", color=colors[a % len(colors)]
            )
            ax_b.scatter(xs, ana, marker="_", s=300, color="black", zorder=3,
                         label="analytic" if a == 0 else None)  # fmt: skip
        for ax, title, unit in (
            (ax_t, f"optimizer-step time at {_fmt_bw(bw)}", "seconds (median, IQR bars)"),
            (ax_b, f"inter-node bytes per optimizer step ({_fmt_bw(bw)})", "MB, all uplinks"),
        ):
            ax.set_title(f"{shape}: {title}")
            ax.set_ylabel(unit)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right")
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        for a, acc in enumerate(accs):
            ax_s = axes[2 + a][j]
            for i, lb in enumerate(labels):
                pts = sorted(
                    (r["bandwidth_bytes_per_s"] * 8 / 1e6, r["median_step_time_s"])
                    for r in doc["runs"]
                    if r["label"] == lb and r["accumulation"] == acc
                )
                if len(pts) < 2:
                    continue
                ax_s.plot(
                    [p[0] for p in pts], [p[1] for p in pts],
                    marker="o", linestyle="--" if "+async" in lb else "-",
                    color=palette[i % len(palette)], label=lb,
                )  # fmt: skip
            ax_s.set_xscale("log")
            ax_s.set_yscale("log")
            ticks = [_bw_key(b) * 8 / 1e6 for b in bws]
            ax_s.xaxis.set_minor_locator(NullLocator())
            ax_s.set_xticks(ticks, [_fmt_bw(b) for b in bws])
            ax_s.xaxis.set_minor_formatter(NullFormatter())
            ax_s.yaxis.set_major_formatter(ScalarFormatter())
            ax_s.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax_s.yaxis.set_minor_formatter(ScalarFormatter())
            ax_s.tick_params(axis="y", which="minor", labelsize=8)
            ax_s.set_xlabel("inter-node bandwidth per node uplink (Mbit/s, tc tbf)")
            ax_s.set_ylabel("optimizer-step time (s, median)")
            ax_s.set_title(f"{shape}: step time against bandwidth, accumulation {acc}")
            ax_s.grid(alpha=0.3, which="both")
            if ax_s.lines:
                ax_s.legend(fontsize=8)
            else:
                ax_s.text(0.5, 0.5, "one bandwidth only", ha="center", transform=ax_s.transAxes)
        for a in range(len(accs), n_acc):
            axes[2 + a][j].set_visible(False)
    fig.suptitle(
        "lightning-mics strategy benchmark\n(gloo on CPU, emulated nodes; "
        "same model and global batch per accumulation)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(out_dir: Path) -> tuple[Path, Path | None]:
    """``strategies.md`` and ``strategies.png`` from every results file in ``out_dir``
    (no PNG, with a warning, when matplotlib is missing: ``pip install -e .[dev]``)."""
    docs = load_results(out_dir)
    if not docs:
        raise SystemExit(f"no strategies_*.json in {out_dir}")
    md, png = out_dir / "strategies.md", out_dir / "strategies.png"
    md.write_text(markdown_report(docs))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[strategies] matplotlib is not installed: no figure", file=sys.stderr)
        return md, None
    plot_report(docs, png)
    return md, png


# ------------------------------------------------------------------------------- CLI
def _csv(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.strategies", description=__doc__.split("\n")[0]
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--bandwidth", default="200mbit", help="tc rate of every node's uplink")
    p.add_argument("--bandwidths", type=_csv(str), default=None,
                   help="several rates, one launch each (overrides --bandwidth)")  # fmt: skip
    p.add_argument("--model", default="gpt_tiny", help="conf/model/<name>.yaml (GPT)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (0: block_size)")
    p.add_argument("--accumulation", type=_csv(int), default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run per repeat")
    p.add_argument("--span-partitions", type=_csv(int), default=None,
                   help="partition sizes spanning nodes for mics flat/hier (default 2 nodes)")  # fmt: skip
    p.add_argument("--strategies", type=_csv(str), default=None,
                   help="subset of ddp,fsdp,hsdp,mics")  # fmt: skip
    p.add_argument("--overlap", action="store_true",
                   help="also run the spanning partitions with forward_prefetch=True "
                   "(async unshard, one block ahead)")  # fmt: skip
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default=None, help="results file suffix (default <N>x<K>)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per launch")
    p.add_argument("--log-dir", default=None, help="keep each rank's log here")
    p.add_argument("--wait-load", type=float, default=2.5,
                   help="wait for a 1-minute load average below this before starting")  # fmt: skip
    p.add_argument("--wait-max", type=float, default=0,
                   help="at most this many seconds (0: do not wait)")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="only regenerate strategies.md/.png from the JSON files in --out")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = argv
    args.bandwidths = args.bandwidths or [args.bandwidth]
    for bw in args.bandwidths:
        rate_bytes_per_s(bw)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        try:
            doc = run_benchmark(args)
        except EmulationUnavailable as err:
            print(f"strategies: SKIPPED: {err}", file=sys.stderr)
            return SKIP_EXIT_CODE
        tag = args.tag or f"{args.nodes}x{args.ranks_per_node}"
        path = out_dir / f"strategies_{tag}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"[strategies] wrote {path}")
    md, png = write_reports(out_dir)
    print(f"[strategies] wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DOC_KEYS",
    "RUN_KEYS",
    "load_model_config",
    "main",
    "markdown_report",
    "plan_runs",
    "plot_report",
    "summarize_run",
    "time_stats",
    "write_reports",
]
