"""The emulated multi-node cluster (`benchmarks.emulated_cluster`) and what its kernel
byte counters say about gloo's collectives and MiCS's hierarchical all-gather.

Every test needs root, network namespaces, veth, a bridge and the ``tbf`` qdisc; without
them it is skipped (``EmulationUnavailable``). 2 nodes x 2 ranks throughout.

The wire model the expectations use (gloo on CPU, verified by the first test): gloo's
all-reduce, all-gather and (all-reduce-emulated) reduce-scatter run a ring over the
group's ranks in group order. Over ``g`` ranks every rank sends ``(g-1)/g`` of the
all-gather output ``B`` (``2(g-1)/g`` of the all-reduce / reduce-scatter buffer) to the
next rank. With node-contiguous ranks a ring over a group spanning ``m > 1`` nodes
crosses ``m`` node boundaries, so the nodes' veths send ``m (g-1)/g B`` in all (twice
that for all-reduce and reduce-scatter); hops inside a node use the loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import emulated_cluster as emu
from benchmarks.mics_step_bytes import summarize
from tests.launch import REPO, SCRIPTS

NODES, RANKS_PER_NODE = 2, 2
#: Fast enough that the shaped link is not the bottleneck on a 2-core machine; the
#: byte counts do not depend on it.
BANDWIDTH = "1gbit"
#: The counters count Ethernet frames; the tests compare their TCP payload (frames minus
#: 66 B of headers each, `LinkCounters.tx_payload_bytes`) with the expected bytes: within
#: 5% + 8 KiB. Measured on an idle machine: +0.03% to +0.06% (gloo's message headers and the
#: barriers that bracket every window, < 1 KB per node); under full CPU load once +1.6%
#: (TCP retransmissions count as payload too). The ring models compared here differ by 25%
#: or more, so 5% still tells them apart.
PAYLOAD_TOLERANCE = 0.05
SLACK_BYTES = 8 * 1024
#: Kernel counters vs the accounting's logical bytes through the wire model.
ACCOUNTING_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def available() -> None:
    try:
        emu.check_available()
    except emu.EmulationUnavailable as err:
        pytest.skip(f"emulated cluster unavailable: {err}")


@pytest.fixture
def prefix() -> str:
    """A namespace prefix of this test's own, so that other runs cannot confuse the
    cleanup checks."""
    return f"lmemut{os.getpid()}"


def _env() -> dict[str, str]:
    return {
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_on_cluster(script: str, tmp_path: Path, *args: str, timeout: float = 240) -> dict:
    """Run ``tests/scripts/<script>`` on the emulated 2 x 2 cluster; rank 0's report."""
    out, logs = tmp_path / "report.json", tmp_path / "logs"
    with emu.EmulatedCluster(NODES, RANKS_PER_NODE, BANDWIDTH) as cluster:
        result = cluster.run(
            [sys.executable, str(SCRIPTS / script), "--out", str(out), *args],
            env=_env(),
            cwd=tmp_path,
            timeout=timeout,
            log_dir=logs,
        )
    if result.returncode != 0:
        text = "\n".join(
            f"--- {f.name} ---\n{f.read_text(errors='replace')[-4000:]}"
            for f in sorted(logs.glob("rank*.log"))
        )
        pytest.fail(f"{script} failed: {result.as_dict()}\n{text}")
    return json.loads(out.read_text())


def within(measured: float, expected: float, rel: float, slack: float = 0.0) -> bool:
    return abs(measured - expected) <= rel * expected + slack


# ----------------------------------------------------------- gloo on the kernel counters
def test_kernel_counters_see_inter_node_traffic_only(available: None, tmp_path: Path) -> None:
    """One collective per window, each node's veth and loopback counters around it.

    Expected per node's veth tx with ``S`` bytes (a ring of 4 ranks crosses each node's
    uplink once; node-internal groups never touch it):
    all-reduce over the world ``2*3/4 S = 1.5 S``; all-reduce inside a node's group ~0
    (its ``2 S`` go over the loopback); all-gather over the world (output ``S``)
    ``3/4 S``; all-gather over the two cross-node pairs ``{0,2}``, ``{1,3}`` (output
    ``S`` each) ``2 ranks x 1/2 S = S``; reduce-scatter over the world (input ``S``)
    ``1.5 S``: gloo emulates it with an all-reduce, twice a ring reduce-scatter's
    ``3/4 S``. Tolerance: TCP payload within 5% of expected + 8 KiB.
    """
    report = run_on_cluster("cluster_collectives.py", tmp_path, "--numel", str(1 << 20))
    size = report["bytes"]
    res = report["results"]
    expected_tx = {
        "all_reduce_world": 1.5 * size,
        "all_reduce_node_group": 0.0,
        "all_gather_world": 0.75 * size,
        "all_gather_node_group": 0.0,
        "all_gather_cross_node_group": 1.0 * size,
        "reduce_scatter_world": 1.5 * size,
    }
    for name, expected in expected_tx.items():
        for node, counters in enumerate(res[name]):
            link = counters["link"]
            for direction in ("tx_payload_bytes", "rx_payload_bytes"):
                assert within(link[direction], expected, PAYLOAD_TOLERANCE, SLACK_BYTES), (
                    f"{name}, node {node}: {direction} {link[direction]} B, expected "
                    f"{expected:.0f} B (+-{PAYLOAD_TOLERANCE:.1%} + {SLACK_BYTES} B)"
                )
            # the frames' headers: 66 B per frame, at most ~4.6% (1500-byte frames), on top
            # of the payload tolerance
            assert link["tx_bytes"] <= 1.10 * expected + SLACK_BYTES
    # the node-internal collectives went over the loopback instead: 2 ranks x S (all-
    # reduce), 2 ranks x S/2 (all-gather)
    for node in range(NODES):
        assert res["all_reduce_node_group"][node]["loopback"]["tx_bytes"] >= 2 * size
        assert res["all_gather_node_group"][node]["loopback"]["tx_bytes"] >= size
    # the empty window: only the barriers
    assert all(c["link"]["tx_bytes"] < 2 * SLACK_BYTES for c in res["empty"])


# ------------------------------------------------------------------ MiCS: flat vs hier
def test_hierarchical_all_gather_cuts_inter_node_bytes(available: None, tmp_path: Path) -> None:
    """Partition 4 over 2 nodes x 2 ranks: kernel-counted inter-node bytes of one
    training step's parameter all-gathers, ``hierarchical=False`` vs ``True``.

    Isolation (`benchmarks.mics_step_bytes.summarize`): the forward window holds exactly
    the forward's all-gathers; the backward's all-gathers are
    backward(reshard_after_forward=True) minus backward(reshard_after_forward=False)
    (same reduce-scatters, no re-gathers). Theory: a flat ring sends ``3/4`` of each
    gathered buffer out of each node, the hierarchical all-gather ``(p-k)/p = 1/2``: one
    third less. The accounting's inter-node all-gather bytes through the ring wire model
    (flat: groups of 4 over 2 nodes; hierarchical: inter-node groups of 2 over 2 nodes)
    agree with the counters within 15% (measured: within 0.1%).
    """
    report = run_on_cluster("cluster_mics_step.py", tmp_path)
    if not report["has_hierarchical"]:
        pytest.skip("MiCSConfig has no `hierarchical` yet")
    for mode in ("flat", "hier"):
        # the forward windows hold no reduce-scatter, the keeping backward no all-gather
        res = report["results"]
        assert all(s["reduce_scatter_count"] == 0 for s in res[f"{mode}-rafw1"]["forward"]["stats"])
        assert all(s["all_gather_count"] == 0 for s in res[f"{mode}-rafw0"]["backward"]["stats"])
    summary = summarize(report)
    for mode, numbers in summary.items():
        for what in ("all_gather_forward", "all_gather_step"):
            kernel, expected = numbers[f"{what}_kernel"], numbers[f"{what}_accounting"]
            assert within(kernel, expected, ACCOUNTING_TOLERANCE), (
                f"{mode} {what}: kernel {kernel} B vs accounting {expected:.0f} B"
            )
        # gloo's reduce-scatter is an all-reduce: twice a ring reduce-scatter's bytes
        kernel, ring = numbers["reduce_scatter_kernel"], numbers["reduce_scatter_ring_accounting"]
        assert within(kernel, 2 * ring, ACCOUNTING_TOLERANCE), (mode, kernel, ring)
    flat, hier = (
        summary["flat"]["all_gather_step_kernel"],
        summary["hier"]["all_gather_step_kernel"],
    )
    drop = 1 - hier / flat
    assert drop >= 0.25, (
        f"hierarchical all-gathers send {hier} B between nodes per step vs {flat} B flat: "
        f"{drop:.1%} less, expected ~33%"
    )


# -------------------------------------------------------------------- the command line
def _cli(prefix: str, *cmd: str, python: str = sys.executable) -> list[str]:
    return [
        python, "-m", "benchmarks.emulated_cluster", "--nodes", str(NODES),
        "--ranks-per-node", str(RANKS_PER_NODE), "--bandwidth", "100mbit",
        "--prefix", prefix, "--timeout", "60", "--", *cmd,
    ]  # fmt: skip


def test_cli_reports_json_and_sets_rank_environment(
    available: None, prefix: str, tmp_path: Path
) -> None:
    code = (
        "import os, json, pathlib; "
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', "
        "'MASTER_PORT', 'LIGHTNING_MICS_NODE_ID', 'GLOO_SOCKET_IFNAME'); "
        "env = {k: os.environ[k] for k in keys}; "
        f"pathlib.Path(r'{tmp_path}', 'rank' + env['RANK']).write_text(json.dumps(env))"
    )
    proc = subprocess.run(
        _cli(prefix, sys.executable, "-c", code),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["returncode"] == 0 and report["rank_returncodes"] == [0] * 4
    assert [link["address"] for link in report["links"]] == ["10.77.0.1", "10.77.0.2"]
    for rank in range(4):
        env = json.loads((tmp_path / f"rank{rank}").read_text())
        assert env == {
            "RANK": str(rank),
            "WORLD_SIZE": "4",
            "LOCAL_RANK": str(rank % 2),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.77.0.1",
            "MASTER_PORT": str(emu.DEFAULT_MASTER_PORT),
            "LIGHTNING_MICS_NODE_ID": str(rank // 2),
            "GLOO_SOCKET_IFNAME": emu.LINK_NAME,
        }
    assert emu.list_namespaces(prefix) == []


def test_failing_rank_stops_the_others_and_cleans_up(available: None, prefix: str) -> None:
    """Rank 1 fails while the others would wait for a minute: the tool stops them,
    exits with rank 1's status and leaves no namespace behind."""
    start = time.monotonic()
    proc = subprocess.run(
        _cli(prefix, "sh", "-c", 'if [ "$RANK" = 1 ]; then exit 3; fi; sleep 60'),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - start < 30
    assert json.loads(proc.stdout)["rank_returncodes"][1] == 3
    assert emu.list_namespaces(prefix) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_cleans_up(available: None, prefix: str, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        _cli(prefix, "sleep", "60"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # wait until the cluster is up and the ranks run (the sleeps are in the nodes)
        while not any(
            ns.endswith("-n1") and emu.namespace_pids(ns) for ns in emu.list_namespaces(prefix)
        ):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cluster never came up"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "namespaces removed" in err
    assert emu.list_namespaces(prefix) == []


def test_stale_namespaces_of_dead_runs_are_removed(available: None, prefix: str) -> None:
    """A namespace named after a dead pid (a SIGKILLed run), with an orphaned "rank"
    still running in it, is removed, and the orphan killed, by the next run."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{prefix}-{dead.pid}-0-n0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        deadline = time.monotonic() + 30
        while not emu.namespace_pids(stale):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc = subprocess.run(
            _cli(prefix, "true"), cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert emu.list_namespaces(prefix) == []
        assert orphan.wait(timeout=10) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_skips_without_root(tmp_path: Path) -> None:
    """As an unprivileged user the command line exits 77 (skipped) with a message; the
    tool needs only the standard library, so any python3 readable by nobody will do."""
    setpriv = shutil.which("setpriv")
    python = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
    if os.geteuid() != 0 or setpriv is None or python is None:
        pytest.skip("needs root, setpriv and a system python3 to drop privileges")
    proc = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
         *_cli("lmemunobody", "true", python=python)],
        cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if "Permission denied" in proc.stderr or "No module named" in proc.stderr:
        pytest.skip(f"the repository is not readable by nobody: {proc.stderr.strip()}")
    assert proc.returncode == emu.SKIP_EXIT_CODE, proc.stderr
    assert "SKIPPED" in proc.stderr and "root" in proc.stderr
