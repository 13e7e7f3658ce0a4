"""MFU: FLOPs per token of a real model, the GPU peak table, and the gauge the operator reads."""

from __future__ import annotations

import pytest

from kubetune.api import Progress
from kubetune.reconcile.observe import parse_metrics
from kubetune_trainer.train.flops import flops_per_token, matmul_parameters, peak_flops
from kubetune_trainer.train.progress import ProgressMetrics, Snapshot, model_flops_utilisation


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("Tesla T4", None), (None, None)])
def test_peak_by_gpu_name_and_none_where_unknown(name, peak):
    assert peak_flops(name) == peak


def test_flops_per_token_counts_matmul_weights_and_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config, total = model.config, sum(p.numel() for p in model.parameters())
    embeddings = config.vocab_size * config.hidden_size  # a lookup, not a matmul (untied head)
    assert matmul_parameters(model) == total - embeddings
    expected = 6 * (total - embeddings) + 12 * config.num_hidden_layers * config.hidden_size * 32
    assert flops_per_token(model, 32) == expected
    model.lm_head.weight = model.model.embed_tokens.weight
    assert matmul_parameters(model) == sum(p.numel() for p in model.parameters())  # tied: counted once


def test_mfu_is_achieved_over_peak_and_absent_without_a_peak():
    assert model_flops_utilisation(2000.0, flops_per_token=1e9, peak_flops=4e12) == 0.5
    assert model_flops_utilisation(2000.0, flops_per_token=1e9, peak_flops=None) is None


def test_the_operator_reads_the_mfu_gauge_and_none_as_absent():
    from prometheus_client import generate_latest

    metrics = ProgressMetrics()
    metrics.update(Snapshot(percent=50.0, batches_done=5, batches_total=10, mfu=0.41).report())
    assert parse_metrics(generate_latest(metrics.registry).decode())["mfu"] == 0.41
    metrics.update(Snapshot(percent=50.0).report())
    report = parse_metrics(generate_latest(metrics.registry).decode())
    assert Progress.model_validate(report).mfu is None  # the gauge's NaN: no MFU in the status
