"""The two things data preparation needs from the model: its tokenizer and its max context."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..config import DEFAULT_MAX_CONTEXT, RunConfig, TaskType
from ..errors import TransientError, UserError
from . import light_tokenizer
from .hub import cache_folder, offline_reason, relative_note

log = logging.getLogger(__name__)

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
UNSET_MODEL_MAX = 10**6  # transformers' stand-in for "unknown" is ~1e30


def names_a_folder(model: str) -> bool:
    """A path, not a hub id: hub ids are `name` or `org/name`."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def load_failure(model: str, what: str, error: Exception, offline: str | None = None) -> Exception:
    """A local folder or an unknown hub id is the user's mistake; anything else may be the network."""
    if names_a_folder(model) and not os.path.exists(model):
        return UserError(f"model {model}: no such folder{relative_note(model)} (give a Hugging Face hub "
                         f"id, org/name, or the path of a model folder the pods mount)", "ModelNotFound")
    if offline and not os.path.exists(model):
        return UserError(f"model {model}: no such local folder{relative_note(model)}, and not in the Hugging "
                         f"Face cache ({cache_folder()}) while {offline}: give the path of a model folder the "
                         f"pods mount, or fill the cache (huggingface-cli download {model}) where the hub is "
                         f"reachable", "ModelNotFound")
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.exists(model) or "not a valid model identifier" in text or "does not appear to have" in text:
        return UserError(f"model {model}: cannot load its {what}: {text}")
    return TransientError(f"model {model}: cannot load its {what}: {text}")


def pretrained(loader: Any, model: str, what: str) -> Any:
    """`loader.from_pretrained(model)`; from the local cache alone when the hub cannot answer."""
    offline = None if os.path.exists(model) or names_a_folder(model) else offline_reason()
    if os.path.isdir(model) and relative_note(model):
        log.info("model %s: the local folder %s%s", model, os.path.abspath(model), relative_note(model))
    try:
        return loader.from_pretrained(model, local_files_only=offline is not None)
    except (OSError, ValueError) as error:
        raise load_failure(model, what, error, offline) from error


def load_tokenizer(model: str) -> Any:
    """A local folder's tokenizer is read without transformers where that gives the same one
    (see `light_tokenizer`): preparing data then never imports transformers and torch."""
    light = light_tokenizer.load(Path(model)) if os.path.isdir(model) else None
    if light is not None:
        return light
    from transformers import AutoTokenizer

    tokenizer = pretrained(AutoTokenizer, model, "tokenizer")
    if not tokenizer.is_fast:
        raise UserError(f"model {model}: a fast (Rust) tokenizer is needed for the token offsets")
    return tokenizer


def model_max_context(model: str, tokenizer: Any) -> int | None:
    """The longest context the model supports, from its config, else its tokenizer."""
    value = configured_context((local_config(model) or {}).get)  # a local folder: no transformers
    if value is None:
        from transformers import AutoConfig

        config = pretrained(AutoConfig, model, "config")
        value = configured_context(lambda key: getattr(config, key, None))
    if value is not None:
        return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < UNSET_MODEL_MAX else None


def local_config(model: str) -> dict[str, Any] | None:
    """A local folder's config.json as written, when it is readable JSON."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def configured_context(get: Callable[[str], Any]) -> int | None:
    for key in CONTEXT_KEYS:
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_context_length(requested: int | None, model_max: int | None) -> int:
    """contextLength: default min(8192, model max); above the model's max is rejected."""
    if requested is None:
        return min(DEFAULT_MAX_CONTEXT, model_max) if model_max else DEFAULT_MAX_CONTEXT
    if model_max is not None and requested > model_max:
        raise UserError(f"contextLength {requested} exceeds the model's maximum context of {model_max} "
                        f"tokens; set contextLength to {model_max} or less")
    return requested


def check_chat_template(config: RunConfig, tokenizer: Any) -> None:
    if config.task_type == TaskType.CHAT_COMPLETION and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model {config.model} has no chat template, which CHAT_COMPLETION needs "
                        f"(use INSTRUCTION_FINETUNE with the template baked into the prompts)")
