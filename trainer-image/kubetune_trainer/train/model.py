"""The model Composer trains: a Hugging Face causal LM with its tokenizer, so every checkpoint
carries the HF config and tokenizer that the `convert` step needs.

Also loads `customWeightsPath`: a Composer checkpoint file, a `latest-*` pointer (a real symlink
or Composer's `.symlink` text file), or a folder of sharded `.distcp` files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel

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


def resolve_checkpoint(path: str) -> Path:
    """Follow a `latest-*` pointer to the checkpoint file or sharded folder it names."""
    pointer = Path(path.removeprefix("file://"))
    if not pointer.exists():
        raise UserError(f"customWeightsPath {path} does not exist", "CustomWeightsMissing")
    if pointer.is_file() and not pointer.is_symlink() and pointer.suffix == ".symlink":
        # Composer's object-store pointer: a text file holding the target's path
        pointer = pointer.parent / pointer.read_text().strip()
    return pointer.resolve()


def read_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Composer checkpoint; a sharded folder is gathered into one state
    dict with torch.distributed.checkpoint's format utilities (no process group needed)."""
    if checkpoint.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as temp:
            full = Path(temp) / "full.pt"
            dcp_to_torch_save(checkpoint, full)
            document: Any = torch.load(full, map_location="cpu", weights_only=False)
    else:
        document = torch.load(checkpoint, map_location="cpu", weights_only=False)
    try:
        return document["state"]["model"]
    except (KeyError, TypeError):
        raise UserError(f"customWeightsPath {checkpoint} is not a Composer checkpoint (no state.model)",
                        "CustomWeightsInvalid") from None


def load_custom_weights(model: HuggingFaceModel, path: str, model_name: str) -> None:
    state = read_model_state(resolve_checkpoint(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches
        raise UserError(f"customWeightsPath {path} does not match the architecture of model {model_name!r}: "
                        f"{first_line(error)}", "CustomWeightsMismatch") from error
