"""Several CPU hosts as one JAX job: the distributed runtime, gloo's address, lost peers.

JAX's CPU collectives go through gloo, which listens on one address per
process and advertises it to the others. Left alone, JAX lets gloo take the
address the host name resolves to; on hosts whose /etc/hosts maps the name to
127.0.0.1 or 127.0.1.1 (Debian's default) that is loopback, and peers on other
hosts cannot connect (PyTorch users know this as GLOO_SOCKET_IFNAME). So each
process picks the local address that routes to the coordinator (or the
address / interface it is given), hands it to gloo, and checks that every peer
can open a TCP connection to it before anything is compiled.

JAX exposes neither the distributed client nor the collectives choice
publicly; the few internals used here are reached in `_runtime()` and
`_gloo_factory()` only, each guarded so that a JAX upgrade that moves them
gives a clear error (or, on the failure path, still exits).
"""

import atexit
import dataclasses
import fcntl
import ipaddress
import os
import socket
import struct
import sys
import threading
import time

import jax

INTERFACE_ENV = "GLOO_SOCKET_IFNAME"  # PyTorch's name for the same choice
_KEY = "largebatch/collectives"


class ClusterError(RuntimeError):
    """The processes cannot form a job (one line, for `error:`)."""


@dataclasses.dataclass(frozen=True)
class Collectives:
    """Where this process's gloo listens: `address`, found by `how`; `interface` if named."""

    address: str
    how: str
    interface: str | None = None


def cluster_detected(environ=os.environ) -> bool:
    """True under Open MPI's mpirun or SLURM's srun with more than one task."""
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1


def split_host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"coordinator address {address!r} is not HOST:PORT.")
    return host.strip("[]"), int(port)


def route_address(host: str, port: int) -> str:
    """The local address this machine sends from to reach host:port (a UDP connect: no packet leaves)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return probe.getsockname()[0]
    except OSError as e:
        raise ClusterError(f"no route from this host to the coordinator {host}:{port} ({e}).") from None


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (SIOCGIFADDR)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        known = ", ".join(n for _, n in socket.if_nameindex())
        raise ClusterError(f"no network interface {name!r} on this host (it has: {known}).") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            request = struct.pack("256s", name.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
        except OSError:
            raise ClusterError(f"network interface {name!r} has no IPv4 address.") from None


def choose_collectives(
    coordinator_address: str, address: str | None = None, interface: str | None = None, environ=os.environ
) -> Collectives:
    """The address gloo should use: `address`, else `interface` (or $GLOO_SOCKET_IFNAME)'s,
    else the one that routes to the coordinator."""
    if address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ClusterError(f"--collectives_address={address!r} is not an IP address.") from None
        return Collectives(address, "--collectives_address")
    interface = interface or environ.get(INTERFACE_ENV)
    if interface:
        how = "--collectives_interface" if interface != environ.get(INTERFACE_ENV) else f"${INTERFACE_ENV}"
        return Collectives(interface_address(interface), f"interface {interface} ({how})", interface)
    host, port = split_host_port(coordinator_address)
    return Collectives(route_address(host, port), f"routes to the coordinator {coordinator_address}")


def _runtime():
    """JAX's distributed-runtime state (client, coordinator address), or None if this JAX hides it."""
    try:
        from jax._src import distributed  # not exposed publicly (jax 0.10.2)

        return distributed.global_state
    except (ImportError, AttributeError):
        return None


def _gloo_factory(collectives: Collectives):
    """A CPU-backend factory that gives gloo `collectives`' address."""
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        make_gloo, make_client = _jax.make_gloo_tcp_collectives, xla_bridge.make_cpu_client
    except (ImportError, AttributeError) as e:
        raise ClusterError(
            f"JAX {jax.__version__} does not let largebatch choose gloo's address ({e}); "
            "requirements.txt pins the version this was written for."
        ) from None
    where = {"interface": collectives.interface} if collectives.interface else {"hostname": collectives.address}

    def factory():
        gloo = make_gloo(distributed_client=_runtime().client, **where)
        return make_client(collectives=gloo)

    return factory


def start(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout: int,
    collectives_address: str | None = None,
    collectives_interface: str | None = None,
) -> Collectives:
    """Starts the distributed runtime with gloo on a reachable address; checks every pair of processes.

    With coordinator_address None, JAX detects the cluster (mpirun, srun).
    Call before anything touches a JAX device.

    Returns:
      Where this process's collectives listen.
    Raises:
      ClusterError: an unusable address or interface, or a peer that cannot reach another.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The runtime's own reaction to a lost peer is to abort every process
    # (SIGABRT, no message of ours); in recoverable mode it only records the
    # loss, and `watch_peers` ends this process with an `error:` line instead.
    jax.config.update("jax_enable_recoverability", True)
    explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(
        **(explicit if coordinator_address else {}),
        heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=heartbeat_timeout * 5,
    )
    runtime = _runtime()
    if runtime is None or runtime.client is None:
        raise ClusterError(f"JAX {jax.__version__} hides its distributed client; cannot set gloo's address.")
    collectives = choose_collectives(runtime.coordinator_address, collectives_address, collectives_interface)
    check_reachable(runtime.client, runtime.process_id, runtime.num_processes, collectives.address, heartbeat_timeout)
    from jax.extend.backend import register_backend_factory

    register_backend_factory("cpu", _gloo_factory(collectives), priority=0, fail_quietly=False)
    watch_peers(runtime.client, runtime.num_processes, runtime.process_id, heartbeat_timeout)
    return collectives


def check_reachable(client, process_id: int, num_processes: int, address: str, timeout: float):
    """Every process opens a TCP connection to every other's collectives address.

    Each listens on `address` (port chosen by the system), publishes it in the
    coordination service, connects to all the others and publishes what
    failed; then all read all results, so that every process raises the same
    error, naming the peer and the address tried.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        try:
            listener.bind((address, 0))
        except OSError as e:
            raise ClusterError(f"cannot listen on {address} for collectives ({e}).") from None
        listener.listen(num_processes)
        threading.Thread(target=_accept_all, args=(listener,), daemon=True).start()
        client.key_value_set(f"{_KEY}/{process_id}", f"[{address}]:{listener.getsockname()[1]}")
        wait_ms = int(timeout * 1000)
        failures = []
        for peer in range(num_processes):
            host, port = split_host_port(client.blocking_key_value_get(f"{_KEY}/{peer}", wait_ms))
            try:
                socket.create_connection((host, port), timeout=min(timeout, 10)).close()
            except OSError as e:
                failures.append(f"process {process_id} cannot reach process {peer} at {host}:{port} ({e})")
        client.key_value_set(f"{_KEY}/result/{process_id}", "; ".join(failures))
        results = [client.blocking_key_value_get(f"{_KEY}/result/{p}", wait_ms) for p in range(num_processes)]
        client.wait_at_barrier(f"{_KEY}/checked", wait_ms)
    problems = [r for r in results if r]
    if problems:
        raise ClusterError(
            "; ".join(problems) + ". Give each process an address its peers can reach: "
            "--collectives_interface=IFACE (or $GLOO_SOCKET_IFNAME) or --collectives_address=IP."
        )


def _accept_all(listener: socket.socket):
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:  # closed
            return
        connection.close()


class _Watch:
    stop = threading.Event()
    leaving = threading.Lock()  # one way out: the first path to leave prints, the other waits
    last_answer = time.monotonic()


def watch_peers(client, num_processes: int, process_id: int, heartbeat_timeout: float, every: float = 0.5):
    """Daemon threads that end this process with an `error:` line when a peer is lost.

    One asks the coordination service which processes are alive: the call
    returns when every live process has asked, or a silent one has been
    declared dead (after the heartbeat timeout). The other pings the service
    with a cheap look-up: no answer for half the heartbeat timeout means this
    host is cut off (or process 0 is gone), and it leaves before the
    runtime's own abort.
    """
    ids = list(range(num_processes))
    where = (process_id, num_processes)

    def poll_live():
        while not _Watch.stop.wait(every):
            try:
                lost = sorted(set(ids) - set(client.get_live_nodes(ids)))
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is unreachable
                if not _Watch.stop.is_set():
                    _leave(*where, f"lost the coordinator, process 0 ({' '.join(str(e).split())})")
                return
            if lost and not _Watch.stop.is_set():
                _leave(
                    *where, f"lost process(es) {', '.join(map(str, lost))} (the coordination service reports them gone)"
                )

    def ping():
        while not _Watch.stop.wait(every):
            try:
                client.key_value_try_get(f"{_KEY}/ping")
            except Exception:  # noqa: BLE001 - NOT_FOUND is the answer; a dead service raises too, late
                pass
            _Watch.last_answer = time.monotonic()

    def deadline():
        patience = heartbeat_timeout / 2
        while not _Watch.stop.wait(every):
            if time.monotonic() - _Watch.last_answer > patience:
                _leave(
                    *where, f"lost the coordinator, process 0 (no answer in {patience:.0f} s: is this host cut off?)"
                )

    _Watch.last_answer = time.monotonic()
    for target in (poll_live, ping, deadline):
        threading.Thread(target=target, daemon=True, name=f"largebatch-{target.__name__}").start()
    atexit.register(_Watch.stop.set)  # before jax's own shutdown (atexit runs last-registered first)


def leave_together(timeout: float):
    """Ends the job's use of the runtime, at the end of training or on an error
    every process meets alike (a bad config).

    In recoverable mode nothing holds process 0, which hosts the coordination
    service, until the others have disconnected, and a process whose service
    is gone aborts. So: all stop watching their peers (two barriers), the
    others disconnect, and process 0 waits until it is the only one left. A
    process that does not come within `timeout` seconds is left behind.
    """
    runtime = _runtime()
    client = getattr(runtime, "client", None)
    for barrier in ("leaving", "stopped"):
        if client is not None:
            try:
                client.wait_at_barrier(f"{_KEY}/{barrier}", int(timeout * 1000))
            except Exception:  # noqa: BLE001 - a peer did not come: leave anyway
                client = None
        _Watch.stop.set()
    if client is None:
        return
    if runtime.process_id != 0:
        jax.distributed.shutdown()
        return
    ids = list(range(runtime.num_processes))
    deadline = time.monotonic() + timeout
    # get_live_nodes returns once every live process has asked, or has gone.
    while time.monotonic() < deadline and set(client.get_live_nodes(ids)) != {0}:
        time.sleep(0.1)


def _leave(process_id: int, num_processes: int, why: str):
    _Watch.leaving.acquire()
    print(
        f"error: process {process_id} of {num_processes} stops: {why}. "
        "Restart all processes with the same --workdir to resume from the last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
    if process_id == 0:
        time.sleep(2)  # the others hear of the loss too; let them say so before the service goes
    os._exit(1)


def lost_processes(timeout: float) -> list[int]:
    """Asks the coordination service which processes are gone (waits at most `timeout` s).

    A dead process is noticed when its connection drops or, at the latest,
    after the heartbeat timeout. If the service itself is unreachable, process
    0 (which hosts it) is the one lost; if this JAX hides its client, none is named.
    """
    runtime = _runtime()
    client = getattr(runtime, "client", None)
    ids = list(range(jax.process_count()))
    deadline = time.time() + timeout
    while client is not None and time.time() < deadline:
        try:
            live = client.get_live_nodes(ids)
        except Exception:  # noqa: BLE001 - the coordinator is unreachable
            return [0]
        lost = sorted(set(ids) - set(live))
        if lost:
            return lost
        time.sleep(0.25)
    return []


def leave_after_peer_failure(error: Exception, heartbeat_timeout: float):
    """Exits non-zero at once, the last line naming the lost processes, without
    the shutdown barrier (which would wait for the dead peer's heartbeat timeout).

    Whatever goes wrong in here (a JAX that hides its client included), the
    process still exits."""
    _Watch.leaving.acquire()
    try:
        where = f"process {jax.process_index()} of {jax.process_count()}"
        print(f"{where}: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        lost = lost_processes(timeout=heartbeat_timeout)
        cause = f"lost process(es) {', '.join(map(str, lost))}" if lost else type(error).__name__
        print(
            f"error: {where} stops: {cause}. "
            "Restart all processes with the same --workdir to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
    finally:
        os._exit(1)
