"""tools/scaling_model.py: the ring all-reduce and step-time arithmetic against hand counts."""

import pytest

from tools import scaling_model


def test_ring_allreduce_cost_by_hand():
    # 4 nodes, 1e6 float32 gradients, 1 us latency, 1 GB/s: 2*3 hops of latency, 2*3/4 of 4 MB each way.
    assert scaling_model.allreduce_seconds(4, 1_000_000, 1e-6, 1e9) == pytest.approx(6e-6 + 1.5 * 4e-3)
    assert scaling_model.allreduce_seconds(1, 1_000_000, 1e-6, 1e9) == 0.0


def test_train_minutes_by_hand():
    # One node at 100 img/s, 1 epoch of ImageNet: 1,281,167 / 100 s, no communication.
    assert scaling_model.train_minutes(1, 100.0, 10, 1, 1024, 1e-6, 1e9) == pytest.approx(1_281_167 / 100 / 60)
    # 8 nodes, batch 1024: 128 images per node per step at 100 img/s, plus the all-reduce of 10 parameters.
    steps = 1_281_167 / 1024
    step = 128 / 100 + 2 * 7 * 1e-6 + 2 * 7 / 8 * 40 / 1e9
    assert scaling_model.train_minutes(8, 100.0, 10, 1, 1024, 1e-6, 1e9) == pytest.approx(steps * step / 60)


def test_flop_scaled_node_rate():
    # A Skylake node (48 cores x 2.1 GHz x 64 FLOP/cycle = 6.45 TFLOP/s) against a 200 GFLOP/s machine at 4 img/s.
    assert scaling_model.node_rate("resnet50", "skylake", {"resnet50": 4.0}, 200e9) == pytest.approx(
        4.0 * 48 * 2.1e9 * 64 / 200e9
    )
