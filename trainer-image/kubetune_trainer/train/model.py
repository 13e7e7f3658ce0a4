"""The model Composer trains: a Hugging Face causal LM with its tokenizer, so every checkpoint
carries the HF config and tokenizer that the `convert` step needs.

Also loads `customWeightsPath`: a Composer checkpoint file, a `latest-*` pointer (a real symlink
or Composer's `.symlink` text file), or a folder of sharded `.distcp` files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel

from .. import checkpoints
from ..cli import first_line
from ..errors import UserError
from .runtime import Runtime


def load_hf(model_name: str, runtime: Runtime, *, empty: bool = False):
    """Tokenizer and causal LM from a hub id or folder; `empty` builds the architecture on the
    meta device without reading weights (FSDP ranks that receive rank 0's weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        if empty:
            with torch.device("meta"):
                config = AutoConfig.from_pretrained(model_name)
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation=runtime.attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_name, attn_implementation=runtime.attn_implementation, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise UserError(f"model {model_name!r} could not be loaded: {first_line(error)}",
                        "ModelLoadFailed") from error
    # Training keeps no KV cache; without one `transformers` also finds the packed samples from
    # `position_ids` (FlexAttention's document mask). `convert` turns it back on for inference.
    model.config.use_cache = False
    return tokenizer, model


def mark_fsdp_blocks(model) -> None:
    """Tell Composer's FSDP to wrap (and activation-checkpoint) each transformer block, named
    by the model's own `_no_split_modules`, instead of the whole model as one unit."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])

    def is_block(module: torch.nn.Module) -> bool:
        return type(module).__name__ in blocks

    model.fsdp_wrap_fn = is_block
    model.activation_checkpointing_fn = is_block


def composer_model(model_name: str, runtime: Runtime, *, empty: bool = False) -> HuggingFaceModel:
    tokenizer, model = load_hf(model_name, runtime, empty=empty)
    if runtime.fsdp:
        mark_fsdp_blocks(model)
    return HuggingFaceModel(model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                            eval_metrics=[LanguageCrossEntropy(), LanguagePerplexity()])


def load_custom_weights(model: HuggingFaceModel, path: str, model_name: str) -> None:
    checkpoint = checkpoints.follow(Path(path.removeprefix("file://")))
    if not checkpoint.exists():
        raise UserError(f"customWeightsPath {path} does not exist", "CustomWeightsMissing")
    try:
        state = checkpoints.model_weights(checkpoint)
    except UserError as error:
        raise UserError(f"customWeightsPath {path}: {error.message}", "CustomWeightsInvalid") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches
        raise UserError(f"customWeightsPath {path} does not match the architecture of model {model_name!r}: "
                        f"{first_line(error)}", "CustomWeightsMismatch") from error
