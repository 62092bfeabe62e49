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


def test_measured_terms_from_the_allreduce_fit(tmp_path):
    # The bench's JSON for 2 hosts: alpha 1 ms, beta 0.5 GB/s. 1,024 nodes, 10^6 parameters:
    # 2*1023 hops of 1 ms, plus 2*1023/1024 of 4 MB at 0.5 GB/s.
    path = tmp_path / "allreduce.json"
    path.write_text('{"hosts": {"2": {"fit": {"alpha_s": 1e-3, "beta_bytes_per_s": 5e8}}}}')
    terms = scaling_model.measured_terms(path)
    assert terms == (1e-3, 5e8)
    assert scaling_model.allreduce_seconds(1024, 1_000_000, *terms) == pytest.approx(
        2.046 + 2 * 1023 / 1024 * 4e6 / 5e8
    )
    rows = scaling_model.predictions({"alexnet_bn": 10.0, "resnet50": 4.0}, 200e9, 2e-6, 12.5e9, terms)
    first = rows[0]  # AlexNet-BN, 1,024 Skylake nodes
    want = scaling_model.allreduce_seconds(1024, 62_379_720, *terms)
    assert first["allreduce_measured_ms"] == pytest.approx(1e3 * want, abs=0.05)
    assert "| predicted, measured terms |" in scaling_model.markdown(rows).splitlines()[0]
