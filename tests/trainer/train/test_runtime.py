"""The device/precision/FSDP choice, checked without a GPU."""

from __future__ import annotations

import pytest

from kubetune_trainer.config import Distributed
from kubetune_trainer.errors import UserError
from kubetune_trainer.train.model import mark_fsdp_blocks
from kubetune_trainer.train.runtime import runtime_for
from kubetune_trainer.train.trainer import device_batch_size


def test_cpu_runs_fp32_with_sdpa_and_block_masks():
    runtime = runtime_for(Distributed(procs_per_node=2), device_batch_size=4, flash_attention=True)
    assert (runtime.device, runtime.precision, runtime.attn_implementation) == ("cpu", "fp32", "sdpa")
    assert runtime.microbatch_size == 4 and runtime.parallelism is None and runtime.block_mask


def test_gpu_uses_bf16_and_flash_attention_varlen_when_installed():
    runtime = runtime_for(Distributed(gpus_per_node=8), device_batch_size=2, flash_attention=True)
    assert (runtime.device, runtime.precision) == ("gpu", "amp_bf16")
    assert runtime.attn_implementation == "flash_attention_2" and not runtime.block_mask
    assert runtime.microbatch_size == "auto" and not runtime.fsdp


def test_gpu_without_flash_attention_uses_flex_attention_without_dense_masks():
    runtime = runtime_for(Distributed(gpus_per_node=1), device_batch_size=2, flash_attention=False)
    assert runtime.attn_implementation == "flex_attention" and not runtime.block_mask


def test_fsdp_shards_fully_with_sharded_checkpoints():
    runtime = runtime_for(Distributed(nodes=2, gpus_per_node=8, fsdp=True), device_batch_size=1,
                          flash_attention=True)
    fsdp = runtime.parallelism["fsdp"]
    assert runtime.fsdp and fsdp["sharding_strategy"] == "FULL_SHARD"
    assert fsdp["state_dict_type"] == "sharded" and fsdp["mixed_precision"] == "PURE"
    assert fsdp["sync_module_states"]


def test_fsdp_wraps_transformer_blocks(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mark_fsdp_blocks(model)
    wrapped = {type(m).__name__ for m in model.modules() if model.fsdp_wrap_fn(m)}
    assert wrapped == {"LlamaDecoderLayer"}
    assert model.activation_checkpointing_fn(model.model.layers[0])


def test_global_batch_must_split_evenly_across_processes():
    assert device_batch_size(16, 4) == 4
    with pytest.raises(UserError, match="globalBatchSize 6") as error:
        device_batch_size(6, 4)
    assert error.value.reason == "InvalidBatchSize"


def test_a_gpu_run_on_a_pod_without_cuda_is_refused_unless_the_cluster_allows_cpu():
    from kubetune_trainer.errors import NoCUDADevice

    gpus = Distributed(gpus_per_node=2)
    with pytest.raises(NoCUDADevice, match="2 GPU.*no CUDA device.*KUBETUNE_CPU_FALLBACK=1") as error:
        runtime_for(gpus, device_batch_size=2, flash_attention=False, cuda=False)
    assert not error.value.permanent   # another attempt may land on a working node
    runtime = runtime_for(gpus, device_batch_size=2, flash_attention=False, cuda=False, cpu_fallback=True)
    assert (runtime.device, runtime.precision, runtime.attn_implementation) == ("cpu", "fp32", "sdpa")
    assert runtime_for(gpus, device_batch_size=2, flash_attention=False, cuda=True,
                       cpu_fallback=True).device == "gpu"   # a real GPU always wins
