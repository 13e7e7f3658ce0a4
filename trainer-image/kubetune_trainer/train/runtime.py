"""Where and how the model runs: device, precision, attention kernel, FSDP.

A pure function of the run's `Distributed` settings (plus whether flash-attention is installed,
whether CUDA is, and whether the cluster allows a CPU fallback for stand-in GPUs), so the GPU
path is checked by unit tests on machines without a GPU.

Attention must keep the samples packed into one row apart. On a GPU that takes no dense mask:
flash-attention 2 (when installed; PyPI ships only its source) finds the samples from
`position_ids`, and otherwise FlexAttention (torch) runs with a block-sparse document mask that
`transformers` derives from the same `position_ids`. On a CPU (tests, small runs) it is SDPA
with the collator's block-diagonal mask: torch 2.7 compiles FlexAttention on a CPU for inference
only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import Distributed
from ..contract import ENV_CPU_FALLBACK
from ..errors import NoCUDADevice

FSDP_SETTINGS = {
    "sharding_strategy": "FULL_SHARD",
    "mixed_precision": "PURE",  # bf16 params, grads and reductions, as llm-foundry trains
    "state_dict_type": "sharded",  # each rank writes its shard (.distcp): no full gather on save
    "activation_checkpointing": True,
    "limit_all_gathers": True,
    "use_orig_params": True,
    "sync_module_states": True,  # ranks other than 0 start from empty (meta) weights
}


@dataclass(frozen=True)
class Runtime:
    device: str  # Composer device: "cpu" (gloo) or "gpu" (NCCL)
    precision: str  # Composer precision
    attn_implementation: str  # Hugging Face attention kernel
    microbatch_size: int | str  # per device; "auto" lets Composer shrink it on CUDA OOM
    parallelism: dict[str, Any] | None = field(default=None)

    @property
    def fsdp(self) -> bool:
        return self.parallelism is not None

    @property
    def block_mask(self) -> bool:
        """Whether the collator must build dense block-diagonal masks (only SDPA needs them)."""
        return self.attn_implementation == "sdpa"


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_fallback_allowed() -> bool:
    return os.environ.get(ENV_CPU_FALLBACK) == "1"


def runtime_for(distributed: Distributed, device_batch_size: int, flash_attention: bool,
                cuda: bool = True, cpu_fallback: bool = False) -> Runtime:
    """How to train: on CPU when the run asks for no GPUs (or its GPUs are a stand-in with no
    CUDA device and the cluster says so); a GPU run on a pod without CUDA is refused, not slowed
    down a thousandfold without a word."""
    if distributed.gpus_per_node == 0 or (not cuda and cpu_fallback):
        return Runtime(device="cpu", precision="fp32", attn_implementation="sdpa",
                       microbatch_size=device_batch_size)
    if not cuda:
        raise NoCUDADevice(
            f"the run asks for {distributed.gpus_per_node} GPU(s) per node, but this pod sees no "
            "CUDA device: check the node's NVIDIA driver and device plugin, or set "
            f"{ENV_CPU_FALLBACK}=1 on the operator where GPUs are a stand-in resource")
    return Runtime(
        device="gpu",
        precision="amp_bf16",
        attn_implementation="flash_attention_2" if flash_attention else "flex_attention",
        microbatch_size="auto",
        parallelism={"fsdp": dict(FSDP_SETTINGS)} if distributed.fsdp else None,
    )
