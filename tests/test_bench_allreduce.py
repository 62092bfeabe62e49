"""bench/bench_allreduce.py: the ring fit against synthetic times, and one real run over namespace hosts."""

import pytest

from bench import bench_allreduce
from tools import netns


@pytest.mark.parametrize("num_hosts", [2, 4])
def test_fit_recovers_the_ring_terms(num_hosts):
    alpha, beta = 150e-6, 2e9
    seconds = {n: bench_allreduce.ring_seconds(num_hosts, n, alpha, beta) for n in bench_allreduce.SWEEP}
    got = bench_allreduce.fit(seconds, num_hosts)
    assert got["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert got["beta_bytes_per_s"] == pytest.approx(beta, rel=1e-6)
    assert got["max_rel_error"] < 1e-9


@pytest.mark.slow
def test_allreduce_across_two_namespace_hosts_sums_right():
    assert netns.available() is None, netns.available()
    # The workers assert the sum of every size against the hand count 1 + 2.
    seconds = bench_allreduce.measure(2, repeats=1)
    assert set(seconds) == set(bench_allreduce.SWEEP) | set(bench_allreduce.GRADIENTS.values())
    assert all(t > 0 for t in seconds.values())
