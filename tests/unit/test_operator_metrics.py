"""The operator's per-run metrics: runs by phase kept in step as runs move and go."""

import uuid

from kubetune import metrics
from kubetune.k8s.handlers import ALL_PHASES


def sample(metric: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(metric, labels)


def test_runs_by_phase_follow_each_run_s_moves_and_a_phase_with_none_has_no_series():
    namespace = f"ns-{uuid.uuid4().hex[:6]}"
    for name in ("a", "b", "c"):
        metrics.record_phase(namespace, name, "Pending", ALL_PHASES)
    metrics.record_phase(namespace, "a", "Training", ALL_PHASES)
    metrics.record_phase(namespace, "a", "Training", ALL_PHASES)  # a tick that changed nothing
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Pending") == 2
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Training") == 1
    assert sample("kubetune_trainingrun_phase_info", namespace=namespace, name="a", phase="Training") == 1
    assert sample("kubetune_trainingrun_phase_info", namespace=namespace, name="a", phase="Pending") == 0

    metrics.record_phase(namespace, "a", "Succeeded", ALL_PHASES)
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Training") is None
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Succeeded") == 1

    metrics.forget_run(namespace, "a", ALL_PHASES)
    metrics.forget_run(namespace, "b", ALL_PHASES)
    metrics.forget_run(namespace, "never-seen", ALL_PHASES)
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Succeeded") is None
    assert sample("kubetune_trainingruns", namespace=namespace, phase="Pending") == 1
    assert sample("kubetune_trainingrun_phase_info", namespace=namespace, name="a", phase="Succeeded") is None


def test_the_same_run_name_in_two_namespaces_counts_in_each():
    first, second = (f"ns-{uuid.uuid4().hex[:6]}" for _ in range(2))
    metrics.record_phase(first, "same", "Training", ALL_PHASES)
    metrics.record_phase(second, "same", "Failed", ALL_PHASES)
    assert sample("kubetune_trainingruns", namespace=first, phase="Training") == 1
    assert sample("kubetune_trainingruns", namespace=second, phase="Failed") == 1
    assert sample("kubetune_trainingruns", namespace=first, phase="Failed") is None
