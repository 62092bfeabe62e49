"""cluster.py: the collectives address, the JAX internals it relies on, the exit on a peer failure."""

import socket
import subprocess
import sys

import pytest

import cluster
from tools import launch


def test_explicit_address_wins_and_must_be_an_ip():
    got = cluster.choose_collectives("10.0.0.1:1234", address="192.0.2.7", environ={"GLOO_SOCKET_IFNAME": "lo"})
    assert (got.address, got.how, got.interface) == ("192.0.2.7", "--collectives_address", None)
    with pytest.raises(cluster.ClusterError, match="'node7' is not an IP address"):
        cluster.choose_collectives("10.0.0.1:1234", address="node7")


def test_interface_from_flag_or_environment():
    got = cluster.choose_collectives("10.0.0.1:1234", interface="lo", environ={})
    assert (got.address, got.interface, got.how) == ("127.0.0.1", "lo", "interface lo (--collectives_interface)")
    got = cluster.choose_collectives("10.0.0.1:1234", environ={"GLOO_SOCKET_IFNAME": "lo"})
    assert (got.address, got.how) == ("127.0.0.1", "interface lo ($GLOO_SOCKET_IFNAME)")
    names = [name for _, name in socket.if_nameindex()]
    with pytest.raises(cluster.ClusterError, match=r"no network interface 'ib7' on this host \(it has: .*lo"):
        cluster.choose_collectives("10.0.0.1:1234", interface="ib7", environ={})
    assert "ib7" not in names


def test_default_is_the_address_that_routes_to_the_coordinator():
    got = cluster.choose_collectives(f"127.0.0.1:{launch.free_port()}", environ={})
    assert got.address == "127.0.0.1" and got.how.startswith("routes to the coordinator 127.0.0.1:")
    with pytest.raises(cluster.ClusterError, match="is not HOST:PORT"):
        cluster.choose_collectives("node0", environ={})


def test_the_jax_internals_cluster_uses_are_there():
    """Pins what cluster.py reaches into (jax 0.10.2): a JAX upgrade that moves
    them fails here first, not on a cluster."""
    from jax._src import distributed
    from jax._src.lib import _jax

    state = distributed.global_state
    assert all(hasattr(state, name) for name in ("client", "coordinator_address", "process_id", "num_processes"))
    signature = _jax.make_gloo_tcp_collectives.__doc__.splitlines()[0]
    assert "hostname: str | None = None" in signature and "interface: str | None = None" in signature
    assert callable(cluster._gloo_factory(cluster.Collectives("127.0.0.1", "test")))
    assert cluster._runtime() is distributed.global_state


def test_peer_failure_exit_happens_even_if_jax_hides_its_client():
    """leave_after_peer_failure must end the process (os._exit) whatever breaks
    inside it: were it to raise, the survivor of a lost peer would hang in the
    distributed shutdown barrier."""
    script = (
        "import sys, jax, jax._src\n"
        "del jax._src.distributed\n"
        "sys.modules['jax._src.distributed'] = None  # import now fails, as after a JAX upgrade that moves it\n"
        "import cluster\n"
        "assert cluster._runtime() is None\n"
        "cluster.leave_after_peer_failure(RuntimeError('Gloo all-reduce failed'), heartbeat_timeout=1)\n"
        "print('returned')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=cluster.__file__.rsplit("/", 1)[0],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "returned" not in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: process 0 of 1 stops: RuntimeError. "
        "Restart all processes with the same --workdir to resume from the last checkpoint."
    )
