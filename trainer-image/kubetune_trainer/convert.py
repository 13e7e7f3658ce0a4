"""`convert`: the final Composer checkpoint -> a Hugging Face folder that `transformers` loads as is.

The folder holds config.json, generation_config.json, model.safetensors (sharded with an index for
large models) and the tokenizer files with their chat template. Composer's own
`write_huggingface_pretrained_from_composer_checkpoint` is not used: it writes pickled
`pytorch_model.bin` and needs peft. Here the weights are assigned to a model built on the meta
device (no random init, no second copy in memory) and saved as safetensors by `transformers`, the
bytes copied from the checkpoint's file inside the kernel (`weights_out`).

The folder is built in a temporary sibling and renamed into place, with a marker naming the source
checkpoint written last, so a retried finalize either keeps a complete folder for the same
checkpoint or rebuilds it, and never reads a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from . import checkpoints
from .config import RunConfig
from .contract import HF_MARKER
from .errors import UserError
from .weights_out import CopyAhead, kernel_copies

log = logging.getLogger(__name__)
SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB")


def run_convert(config: RunConfig) -> dict:
    checkpoint = find_checkpoint(Path(config.checkpoint_dir))
    hf_dir = Path(config.hf_dir)
    source = checkpoint_identity(checkpoint, config)
    if read_marker(hf_dir) == source:
        log.info("%s already holds %s: kept", hf_dir, checkpoint)
    else:
        started = time.monotonic()
        replace_atomically(hf_dir, lambda out: export(checkpoint, out, config.model, source))
        log.info("converted %s to %s in %.1fs", checkpoint, hf_dir, time.monotonic() - started)
    return {"hfFolder": config.published(str(hf_dir))}


# --- finding the checkpoint -------------------------------------------------------------------

def find_checkpoint(folder: Path) -> Path:
    """The checkpoint `latest-rank0.pt` points to, else the one with the highest (epoch, batch)."""
    found = checkpoints.find_latest(folder)
    if found is None:
        raise UserError(
            f"no Composer checkpoint in {folder}: expected {checkpoints.LATEST}, ep*-ba*-rank0.pt files "
            "or sharded ep*-ba* folders of .distcp files; did training save one?",
            "CheckpointMissing",
        )
    return found


def checkpoint_identity(checkpoint: Path, config: RunConfig) -> dict[str, Any]:
    """What the marker records: a rewritten checkpoint at the same path counts as a new one.
    A copy pulled from an object store is named by its URI; its local mtime says nothing."""
    stat = (checkpoint / checkpoints.SHARDED_METADATA if checkpoint.is_dir() else checkpoint).stat()
    if config.remote_work_dir:
        return {"checkpoint": config.published(str(checkpoint)), "size": stat.st_size}
    return {"checkpoint": str(checkpoint), "size": stat.st_size, "mtimeNs": stat.st_mtime_ns}


def read_marker(hf_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((hf_dir / HF_MARKER).read_text())
    except (OSError, ValueError):
        return None


# --- reading the checkpoint -------------------------------------------------------------------

def load_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's model weights and Hugging Face metadata, on CPU."""
    state = checkpoints.read_state(checkpoint, checkpoints.MODEL_STATE)
    if "huggingface" not in state["integrations"]:
        raise UserError(
            f"checkpoint {checkpoint} lacks integrations.huggingface: was it saved by kubetune's "
            "trainer (Composer HuggingFaceModel with a tokenizer)?", "CheckpointUnreadable")
    return state


# --- writing the Hugging Face folder ----------------------------------------------------------

def export(checkpoint: Path, out: Path, base_model: str, source: dict[str, Any]) -> None:
    state = load_state(checkpoint)
    huggingface = state["integrations"]["huggingface"]
    if "peft_config" in huggingface["model"]:
        raise UserError(f"checkpoint {checkpoint} holds a PEFT adapter; kubetune converts full "
                        "fine-tunes only", "UnsupportedCheckpoint")
    config_content = huggingface["model"]["config"]["content"]
    out.mkdir(parents=True, exist_ok=True)
    # The weights' bytes are copied on a thread from here while the model is built (see CopyAhead).
    with kernel_copies(copy_ahead(state["model"], config_content, out)):
        write_tokenizer(huggingface["tokenizer"], out)
        model = build_model(config_content, state["model"])
        model.generation_config = generation_config(base_model, model.config)
        model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_BYTES)
    (out / HF_MARKER).write_text(json.dumps(source))  # last: its presence means complete


def copy_ahead(weights: dict[str, Any], config_content: dict[str, Any], out: Path) -> CopyAhead | None:
    """The weights file `save_pretrained` will most likely write for a model holding `weights`,
    started: one file (under a shard's size), the names without Composer's `model.` prefix in
    their order, a tensor sharing memory with an earlier one left out (tied weights). None where
    `build_model` casts them (other tensors) or it would be shards. A wrong guess costs a copy,
    never a byte: `save_pretrained`'s own call decides (`weights_out.save_file`)."""
    from transformers.utils import SAFE_WEIGHTS_NAME

    dtype = _dtype(config_content.get("torch_dtype"))
    predicted, seen = {}, set()
    for key, tensor in weights.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            return None
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            predicted[key.removeprefix("model.")] = tensor
    if sum(tensor.numel() * tensor.element_size() for tensor in predicted.values()) > SHARD_BYTES:
        return None
    return CopyAhead(predicted, str(out / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})


def build_model(config_content: dict[str, Any], weights: dict[str, Any]):
    """A causal LM with the trained weights, in the dtype the checkpoint's config names.

    The trainer loads models in float32, so that is what is saved: casting to the base model's
    bfloat16 would round away updates as small as the default learning rate (5e-7) makes.
    """
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = CONFIG_MAPPING[config_content["model_type"]].from_dict(dict(config_content))
    config.use_cache = True  # off while training (train/model.py), the default for inference
    dtype = _dtype(getattr(config, "torch_dtype", None))
    # Shapes only, and no random init of them (most of the build's time): the checkpoint's
    # tensors are assigned below.
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    # Composer's HuggingFaceModel holds the transformers model as `.model`.
    own = {key.removeprefix("model."): tensor.to(dtype) if tensor.is_floating_point() else tensor
           for key, tensor in weights.items()}
    model.load_state_dict(own, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied tensors by separate ones
    return model


def _dtype(value):
    import torch

    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, value) if isinstance(value, str) and hasattr(torch, value) else torch.float32


def write_tokenizer(files: dict[str, dict[str, Any]], out: Path) -> None:
    """Write back the files `tokenizer.save_pretrained` produced at training time.

    Composer keeps them in the checkpoint as {file name: {file_extension, content}}: JSON parsed,
    .txt split into lines, .jinja/.py as text, sentencepiece .model as serialized bytes.
    """
    if not files:
        raise UserError("the checkpoint carries no tokenizer: the trainer must give Composer's "
                        "HuggingFaceModel its tokenizer", "CheckpointUnreadable")
    out.mkdir(parents=True, exist_ok=True)
    for name, saved in files.items():
        extension, content = saved["file_extension"], saved["content"]
        path = out / (name if name.endswith(extension) else name + extension)
        if extension == ".json":
            path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        elif extension == ".txt":
            path.write_text("\n".join(content), encoding="utf-8")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def generation_config(base_model: str, model_config):
    """The base model's generation defaults (stop tokens, sampling), which fine-tuning keeps.

    Composer does not store them; when the base model cannot be read from here (a hub id without
    network), they are derived from the model config as `transformers` itself does.
    """
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base_model)
    except (OSError, ValueError) as error:  # transformers reports hub and file trouble as OSError
        log.info("generation config of %s unavailable (%s): derived from the model config",
                 base_model, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return GenerationConfig.from_model_config(model_config)


def replace_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Build `target` in a sibling folder and rename it into place (same filesystem: atomic)."""
    for stale in target.parent.glob(f".{target.name}.*-*"):  # left by an interrupted attempt
        shutil.rmtree(stale, ignore_errors=True)
    building = target.with_name(f".{target.name}.building-{os.getpid()}")
    retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
    try:
        fill(building)
        if target.exists():
            target.rename(retired)
        building.rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
