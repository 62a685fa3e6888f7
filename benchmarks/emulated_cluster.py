"""An emulated multi-node cluster on one machine: network namespaces as nodes.

``N`` nodes of ``K`` ranks each. Every node is a network namespace with one veth link
to a bridge in a dedicated *switch* namespace; the node's end of the link is shaped
with ``tc ... tbf`` to a chosen bandwidth (egress, i.e. what the node sends). Nothing
is created in, or routed to, the root namespace: the addresses (``10.77.0.0/24`` by
default) exist only inside the namespaces of one run, and each run has its own switch.

Every rank runs the given command inside its node's namespace with the usual
``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR`` = node 0's address,
``MASTER_PORT``), ``LIGHTNING_MICS_NODE_ID`` = the node index (so lightning-mics sees
``N`` nodes) and ``GLOO_SOCKET_IFNAME`` = the node's veth, so gloo binds to the veth
address. Pairs of ranks on the same node then talk to a local address, which the
kernel routes over the namespace's loopback: only inter-node traffic crosses the veth,
and its ``/proc/net/dev`` counters are exactly the inter-node bytes (Ethernet frames:
payload plus TCP/IP/Ethernet headers, and the TCP acknowledgements).

Command line (prints a JSON report; exit status: the command's, 77 when the emulation
is unavailable, 124 on timeout, 130/143 when interrupted)::

    python -m benchmarks.emulated_cluster --nodes 2 --ranks-per-node 2 \
        --bandwidth 200mbit -- python train.py --flag

Python::

    from benchmarks.emulated_cluster import EmulatedCluster, EmulationUnavailable

    with EmulatedCluster(nodes=2, ranks_per_node=2, bandwidth="1gbit") as cluster:
        result = cluster.run([sys.executable, "script.py"], timeout=120)
    result.inter_node_bytes  # bytes sent over all inter-node links during the run

Inside a rank, :func:`link_counters` reads the node's own veth counters, e.g. around
one collective (the ranks of a node share them: synchronise before reading).

Needs root (namespaces, veth, tc) and the ``tbf`` qdisc; :func:`check_available`
probes both and raises :class:`EmulationUnavailable` otherwise. Namespaces are named
``<prefix>-<pid>-<n>-<role>`` and removed on exit, on error and on SIGINT/SIGTERM/
SIGHUP; namespaces left by a SIGKILLed run (its pid is gone) are removed, with the
ranks still running in them, when the next run starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Exit status of the command line when the emulation cannot run here (as automake's
#: "skipped"): distinct from any failure of the command.
SKIP_EXIT_CODE = 77
TIMEOUT_EXIT_CODE = 124
#: Namespace-name prefix of every run of this tool.
DEFAULT_PREFIX = "lmemu"
DEFAULT_SUBNET = "10.77.0"
DEFAULT_MASTER_PORT = 29500
NODE_ID_ENV = "LIGHTNING_MICS_NODE_ID"  # = lightning_mics.topology.NODE_ID_ENV
#: Name of every node's veth inside its namespace (names are per namespace).
LINK_NAME = "emu0"
#: `ip netns exec NAME` bind-mounts the files of ``/etc/netns/NAME/`` over ``/etc/``: each
#: node gets a hosts file naming every node (``emu-node<i>``), so that name lookups of the
#: cluster's addresses never try DNS (c10d looks up its sockets' peers, as IPv4-mapped IPv6
#: addresses: without those entries it logs "The hostname of the client socket cannot be
#: retrieved").
NETNS_ETC = Path("/etc/netns")

#: Header bytes of one TCP/IPv4 frame on the veth: Ethernet 14 + IPv4 20 + TCP 20 +
#: the timestamp option 12 (Linux's default).
FRAME_OVERHEAD = 66

_seq = itertools.count()


class EmulationUnavailable(RuntimeError):
    """The emulated cluster cannot run on this machine (not root, no ``ip``/``tc``, no
    network namespaces, veth, bridge or ``tbf``). Tests turn it into a skip."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGHUP) arrived while the cluster was up."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# ------------------------------------------------------------------------ counters
@dataclasses.dataclass(frozen=True)
class LinkCounters:
    """Byte and packet counters of one interface (``/proc/net/dev``)."""

    rx_bytes: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(
            *(getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def __add__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    @property
    def tx_payload_bytes(self) -> int:
        """TCP payload sent, estimated: every frame minus its Ethernet + IPv4 + TCP (with
        timestamps) headers, :data:`FRAME_OVERHEAD` bytes. Exact for TCP traffic however
        the kernel batched it (a GSO frame counts once, with one set of headers), up to
        TCP options beyond timestamps (SACK blocks) and non-TCP frames (ARP)."""
        return self.tx_bytes - FRAME_OVERHEAD * self.tx_packets

    @property
    def rx_payload_bytes(self) -> int:
        """TCP payload received, estimated as for :attr:`tx_payload_bytes`."""
        return self.rx_bytes - FRAME_OVERHEAD * self.rx_packets

    def as_dict(self) -> dict[str, int]:
        return {
            **dataclasses.asdict(self),
            "tx_payload_bytes": self.tx_payload_bytes,
            "rx_payload_bytes": self.rx_payload_bytes,
        }


def parse_net_dev(text: str) -> dict[str, LinkCounters]:
    """``/proc/net/dev`` -> ``{interface: LinkCounters}``."""
    out = {}
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) < 10:
            continue
        out[name.strip()] = LinkCounters(
            rx_bytes=int(values[0]),
            rx_packets=int(values[1]),
            tx_bytes=int(values[8]),
            tx_packets=int(values[9]),
        )
    return out


def link_counters(ifname: str | None = None) -> LinkCounters:
    """Counters of ``ifname`` (default ``$GLOO_SOCKET_IFNAME``, the node's veth) in the
    calling process's network namespace; call it from a rank of the emulated cluster."""
    ifname = ifname or os.environ.get("GLOO_SOCKET_IFNAME") or LINK_NAME
    counters = parse_net_dev(Path("/proc/net/dev").read_text())
    if ifname not in counters:
        raise RuntimeError(f"No interface {ifname!r} here; interfaces: {sorted(counters)}")
    return counters[ifname]


# ----------------------------------------------------------------------- helpers
_RATE_UNITS = {
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "tbit": 1e12 / 8,
    "bps": 1,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
    "tbps": 1e12,
}


def rate_bytes_per_s(rate: str) -> float:
    """A ``tc`` rate (``"200mbit"``, ``"1gbit"``, ``"50mbps"``, ``"800000bit"``) in bytes/s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", rate)
    unit = (m.group(2).lower() or "bit") if m else ""
    if not m or unit not in _RATE_UNITS:
        raise ValueError(f"Bad rate {rate!r}: use a number and one of {sorted(_RATE_UNITS)}.")
    return float(m.group(1)) * _RATE_UNITS[unit]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return _ip("netns", "exec", ns, *cmd, check=check)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a SIGKILLed run stays one
    until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of the network namespaces that start with ``prefix-``."""
    proc = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{prefix}-")]


def namespace_pids(ns: str) -> list[int]:
    """Pids of the processes running in network namespace ``ns``."""
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces of earlier runs that died without cleaning up (SIGKILL): their
    owner pid (in the name) is gone. Ranks that the dead run left behind in them (they
    would wait in a collective until gloo's timeout) are killed first. Returns the
    removed names."""
    removed = []
    for ns in list_namespaces(prefix):
        m = re.match(rf"{re.escape(prefix)}-(\d+)-", ns)
        if not m or _pid_alive(int(m.group(1))):
            continue
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    return removed


def check_available(prefix: str = DEFAULT_PREFIX) -> None:
    """Raise :class:`EmulationUnavailable` unless namespaces, veth, bridge and ``tbf``
    work here. Probes in a namespace of its own, removed afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise EmulationUnavailable("the emulated cluster needs root (network namespaces, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"`{tool}` (iproute2) is not installed")
    ns = f"{prefix}-{os.getpid()}-{next(_seq)}-probe"
    steps = [
        ("network namespaces", f"ip netns add {ns}"),
        ("veth", f"ip -n {ns} link add name probe0 type veth peer name probe1"),
        ("bridge", f"ip -n {ns} link add name probebr type bridge"),
        (
            "the tbf qdisc",
            f"tc -n {ns} qdisc add dev probe0 root tbf rate 1mbit burst 32kb latency 50ms",
        ),
    ]
    try:
        for what, line in steps:
            cmd = line.split()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulationUnavailable(
                    f"{what} unavailable: `{' '.join(cmd)}` failed: {proc.stderr.strip()}"
                )
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """In the main thread, turn SIGTERM and SIGHUP into :class:`Interrupted` (SIGINT
    already raises KeyboardInterrupt) so that ``finally`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------ result
@dataclasses.dataclass
class RunResult:
    """What one :meth:`EmulatedCluster.run` did."""

    returncode: int
    rank_returncodes: list[int | None]
    elapsed_s: float
    #: Per node: the veth's counter deltas over the run.
    links: list[LinkCounters]
    #: Per node: the loopback's counter deltas (intra-node traffic and more).
    loopbacks: list[LinkCounters]
    timed_out: bool = False

    @property
    def inter_node_bytes(self) -> int:
        """Bytes sent over all inter-node links (sum of the nodes' veth tx; frames with
        their headers)."""
        return sum(link.tx_bytes for link in self.links)

    @property
    def inter_node_payload_bytes(self) -> int:
        """TCP payload sent over all inter-node links (see `LinkCounters`)."""
        return sum(link.tx_payload_bytes for link in self.links)

    def as_dict(self, cluster: EmulatedCluster | None = None) -> dict[str, Any]:
        nodes = []
        for i, (link, lo) in enumerate(zip(self.links, self.loopbacks, strict=True)):
            node: dict[str, Any] = {"node": i, **link.as_dict(), "loopback": lo.as_dict()}
            if cluster is not None:
                node.update(
                    namespace=cluster.namespaces[i],
                    ifname=LINK_NAME,
                    address=cluster.addresses[i],
                )
            nodes.append(node)
        out: dict[str, Any] = {}
        if cluster is not None:
            out.update(
                nodes=cluster.nodes,
                ranks_per_node=cluster.ranks_per_node,
                bandwidth=cluster.bandwidth,
            )
        out.update(
            returncode=self.returncode,
            rank_returncodes=self.rank_returncodes,
            timed_out=self.timed_out,
            elapsed_s=round(self.elapsed_s, 3),
            inter_node_tx_bytes=self.inter_node_bytes,
            inter_node_rx_bytes=sum(link.rx_bytes for link in self.links),
            inter_node_tx_payload_bytes=self.inter_node_payload_bytes,
            links=nodes,
        )
        return out


# ----------------------------------------------------------------------- cluster
class EmulatedCluster:
    """``nodes`` network namespaces of ``ranks_per_node`` ranks, joined through a switch
    namespace by veth links shaped to ``bandwidth`` (a ``tc`` rate).

    A context manager: ``__enter__`` checks availability (:class:`EmulationUnavailable`),
    removes stale namespaces of this prefix and builds the cluster; ``__exit__`` kills
    whatever still runs in its namespaces and removes them. Call :meth:`run` (any
    number of times) inside.
    """

    def __init__(
        self,
        nodes: int,
        ranks_per_node: int,
        bandwidth: str = "200mbit",
        *,
        burst: str | None = None,
        latency: str = "50ms",
        mtu: int = 1500,
        master_port: int = DEFAULT_MASTER_PORT,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if nodes < 1 or ranks_per_node < 1:
            raise ValueError(
                f"need nodes >= 1 and ranks_per_node >= 1, got {nodes}, {ranks_per_node}"
            )
        if nodes > 250:
            raise ValueError("at most 250 nodes (one /24)")
        self.nodes = nodes
        self.ranks_per_node = ranks_per_node
        self.bandwidth = bandwidth
        rate = rate_bytes_per_s(bandwidth)
        # NOTE: tbf needs a bucket of at least rate/HZ (and >= one MTU) to reach its rate;
        # 4 ms of traffic is above rate/HZ for HZ >= 250.
        self.burst = burst or f"{max(32 * 1024, int(rate * 0.004))}b"
        self.latency = latency
        self.mtu = mtu
        self.master_port = master_port
        self.prefix = prefix
        tag = f"{prefix}-{os.getpid()}-{next(_seq)}"
        self.switch = f"{tag}-sw"
        self.namespaces = [f"{tag}-n{i}" for i in range(nodes)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(nodes)]
        self._created: list[str] = []
        self._signals: contextlib.ExitStack | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> EmulatedCluster:
        check_available(self.prefix)
        cleanup_stale(self.prefix)
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(_signals_raise())
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        # NOTE: no IPv6 (router solicitations, MLD reports would add noise to the
        # counters); loopback up for intra-node traffic.
        _in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{addr} emu-node{i}\n::ffff:{addr} emu-node{i}\n"
            for i, addr in enumerate(self.addresses)
        )
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            self._add_ns(ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            port = f"port{i}"
            # (the pair is created in the node namespace, its peer moved to the switch)
            _ip(
                "-n", ns, "link", "add", "name", LINK_NAME, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", port, "mtu", str(self.mtu), "netns", self.switch,
            )  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", LINK_NAME)
            _ip("-n", ns, "link", "set", LINK_NAME, "up")
            tc = [
                "tc", "-n", ns, "qdisc", "add", "dev", LINK_NAME, "root", "tbf",
                "rate", self.bandwidth, "burst", self.burst, "latency", self.latency,
            ]  # fmt: skip
            proc = subprocess.run(tc, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`{' '.join(tc)}` failed: {proc.stderr.strip()}")

    def close(self) -> None:
        """Kill what still runs in the namespaces and remove them (idempotent)."""
        # NOTE: signals are held off while tearing down, so a second ^C cannot leave
        # half the namespaces behind.
        try:
            with _deferred_signals():
                for ns in reversed(self._created):
                    for pid in namespace_pids(ns):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                for ns in reversed(self._created):
                    for _ in range(50):
                        if _ip("netns", "del", ns, check=False).returncode == 0:
                            break
                        if ns not in list_namespaces(self.prefix):
                            break
                        time.sleep(0.1)
                    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
                with contextlib.suppress(OSError):  # only if no other run uses it
                    NETNS_ETC.rmdir()
                self._created.clear()
        finally:
            # (after the deferred block: a signal that arrived during the cleanup is
            # re-delivered to the raising handlers, then the originals come back)
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    # ------------------------------------------------------------------ runs
    def counters(self) -> tuple[list[LinkCounters], list[LinkCounters]]:
        """Every node's (veth, loopback) counters now."""
        links, loops = [], []
        for ns in self.namespaces:
            devs = parse_net_dev(_in_ns(ns, "cat", "/proc/net/dev").stdout)
            links.append(devs[LINK_NAME])
            loops.append(devs["lo"])
        return links, loops

    def rank_env(self, rank: int) -> dict[str, str]:
        node, local = divmod(rank, self.ranks_per_node)
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
            "NODE_RANK": str(node),
            "GROUP_RANK": str(node),
            "MASTER_ADDR": self.addresses[0],
            "MASTER_PORT": str(self.master_port),
            NODE_ID_ENV: str(node),
            "GLOO_SOCKET_IFNAME": LINK_NAME,
        }

    def run(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        timeout: float | None = None,
        log_dir: str | os.PathLike | None = None,
        grace_s: float = 5.0,
    ) -> RunResult:
        """Run ``cmd`` on every rank and wait for all of them.

        If a rank fails, the others are terminated (SIGTERM, SIGKILL after ``grace_s``):
        they would otherwise wait forever in a collective. Same after ``timeout``.
        ``log_dir``: each rank's stdout+stderr goes to ``rank<r>.log`` there (default:
        this process's stdout/stderr). Returns the status and the counter deltas.
        """
        if not self._created:
            raise RuntimeError("use the cluster inside `with EmulatedCluster(...) as cluster:`")
        base = {**os.environ, **(env or {})}
        before = self.counters()
        start = time.monotonic()
        procs: list[subprocess.Popen] = []
        logs = []
        timed_out = False
        first_failure = 0
        try:
            for rank in range(self.world_size):
                node = rank // self.ranks_per_node
                out = None
                if log_dir is not None:
                    Path(log_dir).mkdir(parents=True, exist_ok=True)
                    out = open(Path(log_dir) / f"rank{rank}.log", "wb")  # noqa: SIM115
                    logs.append(out)
                procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", self.namespaces[node], *cmd],
                        env={**base, **self.rank_env(rank)},
                        cwd=cwd,
                        stdout=out,
                        stderr=subprocess.STDOUT if out else None,
                        start_new_session=True,  # a process group per rank, for killing
                    )
                )
            deadline = None if timeout is None else start + timeout
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed:
                    first_failure = failed[0]
                    break
                if all(c is not None for c in codes):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            _stop(procs, grace_s)
            for f in logs:
                f.close()
        elapsed = time.monotonic() - start
        after = self.counters()
        codes = [p.returncode for p in procs]
        # the status of the rank that failed first (not of those stopped after it; a
        # negative one is a signal: 128+n)
        rc = TIMEOUT_EXIT_CODE if timed_out else first_failure
        if rc < 0:
            rc = 128 - rc
        return RunResult(
            returncode=rc,
            rank_returncodes=codes,
            elapsed_s=elapsed,
            links=[a - b for a, b in zip(after[0], before[0], strict=True)],
            loopbacks=[a - b for a, b in zip(after[1], before[1], strict=True)],
            timed_out=timed_out,
        )


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the process group of every rank still running, SIGKILL after ``grace_s``."""
    with _deferred_signals():
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # ranks' children that left the group (rare) die with the namespaces' cleanup


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (main thread only), then
    re-deliver the first one that arrived."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, frame: Any) -> None:
        pending.append(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, remember) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            os.kill(os.getpid(), pending[0])


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.emulated_cluster",
        description="Run a command on N emulated nodes x K ranks (network namespaces "
        "joined by tbf-shaped veth links) and report the inter-node bytes as JSON.",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ranks-per-node", type=int, required=True)
    p.add_argument("--bandwidth", default="200mbit", help="tc rate of every node's uplink")
    p.add_argument("--burst", default=None, help="tbf burst (default: 4 ms of traffic)")
    p.add_argument("--latency", default="50ms", help="tbf latency (queue bound)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds (0: none)")
    p.add_argument("--log-dir", default=None, help="write each rank's output to rank<r>.log")
    p.add_argument("--json-out", default=None, help="also write the report to this file")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command given (put it after --)")
    try:
        with EmulatedCluster(
            args.nodes,
            args.ranks_per_node,
            args.bandwidth,
            burst=args.burst,
            latency=args.latency,
            mtu=args.mtu,
            master_port=args.master_port,
            prefix=args.prefix,
        ) as cluster:
            result = cluster.run(cmd, timeout=args.timeout or None, log_dir=args.log_dir)
            report = result.as_dict(cluster)
    except EmulationUnavailable as err:
        print(f"emulated_cluster: SKIPPED: {err}", file=sys.stderr)
        return SKIP_EXIT_CODE
    except KeyboardInterrupt:
        print("emulated_cluster: interrupted (SIGINT); namespaces removed", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as err:
        print(f"emulated_cluster: {err}; namespaces removed", file=sys.stderr)
        return 128 + err.signum
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    return report["returncode"]


if __name__ == "__main__":
    sys.exit(main())
