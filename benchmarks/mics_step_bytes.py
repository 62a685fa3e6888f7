"""Inter-node bytes of one MiCS training step on the emulated cluster, flat vs
hierarchical, counted by the kernel and by lightning-mics' `CommStats`.

    python -m benchmarks.mics_step_bytes --bandwidth 200mbit [--n-embd 256] [--json-out F]

Runs ``tests/scripts/cluster_mics_step.py`` on 2 nodes x 2 ranks (partition 4 = the
world: one replica, so no all-reduce) and prints, per mode, the parameter all-gathers'
and the gradient reduce-scatters' inter-node bytes (sum of the nodes' veth tx) next to
what the accounting predicts through gloo's ring (see :func:`ring_wire_factor`), and
the windows' wall times. Needs root (exit 77 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.emulated_cluster import SKIP_EXIT_CODE, EmulatedCluster, EmulationUnavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "cluster_mics_step.py"


def ring_wire_factor(group_size: int, nodes_spanned: int) -> float:
    """Bytes a gloo ring all-gather puts on the inter-node links (all nodes together)
    per logical byte that `CommStats` records summed over the group's ranks.

    Each of the ``g`` ranks records the output ``B``; the ring sends ``(g-1)/g B`` over
    each of its ``g`` hops, ``m`` of which cross nodes when the group's ranks are
    node-contiguous and span ``m > 1`` nodes. gloo's all-reduce and its all-reduce-based
    reduce-scatter send twice as much (per byte of their buffer).
    """
    if nodes_spanned < 2:
        return 0.0
    return nodes_spanned * (group_size - 1) / group_size**2


def _tx(window: dict[str, Any], key: str = "tx_payload_bytes") -> int:
    """The nodes' veth tx over a window: TCP payload (default) or frames (``tx_bytes``)."""
    return sum(node["link"][key] for node in window["nodes"])


def _loopback(window: dict[str, Any]) -> int:
    return sum(node["loopback"]["tx_bytes"] for node in window["nodes"])


def _stat(window: dict[str, Any], key: str) -> int:
    return sum(snap[key] for snap in window["stats"])


def summarize(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per mode (``flat``/``hier``): kernel and accounting-predicted inter-node bytes.

    ``*_kernel`` is the TCP payload the nodes' veths sent (frames minus headers, see
    `LinkCounters.tx_payload_bytes`); ``*_kernel_frames`` the frames with headers.

    - ``all_gather_forward``: the forward window (only all-gathers in it);
    - ``all_gather_step``: forward + backward re-gathers, the latter being
      backward(reshard_after_forward=True) - backward(reshard_after_forward=False);
    - ``reduce_scatter``: backward(reshard_after_forward=False) (only reduce-scatters),
      predicted for a ring reduce-scatter; gloo's all-reduce emulation sends twice that.
    """
    p, k = report["world_size"], report["ranks_per_node"]
    nodes = p // k
    factors = {"flat": ring_wire_factor(p, nodes), "hier": ring_wire_factor(nodes, nodes)}
    out = {}
    for mode, factor in factors.items():
        if f"{mode}-rafw1" not in report["results"]:
            continue
        resharding = report["results"][f"{mode}-rafw1"]
        keeping = report["results"][f"{mode}-rafw0"]
        fwd, bwd, rs = resharding["forward"], resharding["backward"], keeping["backward"]
        logical_fwd = _stat(fwd, "all_gather_inter_node_bytes")
        logical_bwd = _stat(bwd, "all_gather_inter_node_bytes")
        out[mode] = {
            "all_gather_forward_kernel": _tx(fwd),
            "all_gather_forward_accounting": logical_fwd * factor,
            "all_gather_step_kernel": _tx(fwd) + _tx(bwd) - _tx(rs),
            "all_gather_step_kernel_frames": sum(_tx(w, "tx_bytes") for w in (fwd, bwd))
            - _tx(rs, "tx_bytes"),
            "all_gather_step_accounting": (logical_fwd + logical_bwd) * factor,
            "reduce_scatter_kernel": _tx(rs),
            "reduce_scatter_ring_accounting": _stat(rs, "reduce_scatter_inter_node_bytes") * factor,
            "all_gather_forward_loopback": _loopback(fwd),
            "forward_s": fwd["seconds"],
            "backward_s": bwd["seconds"],
            "backward_reduce_scatter_only_s": rs["seconds"],
        }
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'inter-node MB (all nodes)':<34}" + "".join(f"{m:>12}" for m in summary)]
    keys = next(iter(summary.values())).keys()
    for key in keys:
        scale = 1 if key.endswith("_s") else 1e-6
        lines.append(f"{key:<34}" + "".join(f"{v[key] * scale:>12.3f}" for v in summary.values()))
    if {"flat", "hier"} <= summary.keys():
        drop = 1 - (
            summary["hier"]["all_gather_step_kernel"] / summary["flat"]["all_gather_step_kernel"]
        )
        lines.append(f"hierarchical all-gathers: {drop:.1%} fewer inter-node bytes per step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mics_step_bytes")
    p.add_argument("--bandwidth", default="200mbit")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--json-out", default=None)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    env = {
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
        cmd += ["--n-embd", str(args.n_embd), "--n-layer", str(args.n_layer)]
        try:
            with EmulatedCluster(2, 2, args.bandwidth) as cluster:
                result = cluster.run(cmd, env=env, cwd=tmp, timeout=args.timeout)
        except EmulationUnavailable as err:
            print(f"mics_step_bytes: SKIPPED: {err}", file=sys.stderr)
            return SKIP_EXIT_CODE
        if result.returncode != 0:
            print(f"mics_step_bytes: the run failed: {result.as_dict()}", file=sys.stderr)
            return result.returncode
        report = json.loads(out.read_text())
    summary = summarize(report)
    print(f"2 nodes x 2 ranks, partition 4, {args.bandwidth}, model {report['model']}")
    print(format_table(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"report": report, "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
