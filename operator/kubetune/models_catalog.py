"""Models kubetune knows by name: their maximum context length and size.

A run may name any Hugging Face id or a model folder; for the models listed here the API can
check `contextLength` before a GPU is requested and pick size-dependent defaults (the learning
rate of 405B models). `get_models()` in the SDK shows this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_B = 1_000_000_000


@dataclass(frozen=True)
class ModelInfo:
    name: str  # Hugging Face id
    family: str
    max_context_length: int
    parameters: int


def _pair(org: str, base: str, instruct: str, family: str, context: int, params: float) -> list[ModelInfo]:
    """Base and instruction-tuned variants share their architecture, so their limits too."""
    return [ModelInfo(f"{org}/{name}", family, context, int(params * _B)) for name in (base, instruct)]


SUPPORTED_MODELS: tuple[ModelInfo, ...] = tuple(
    [
        *_pair("meta-llama", "Llama-3.2-1B", "Llama-3.2-1B-Instruct", "llama3", 131072, 1.24),
        *_pair("meta-llama", "Llama-3.2-3B", "Llama-3.2-3B-Instruct", "llama3", 131072, 3.21),
        *_pair("meta-llama", "Llama-3.1-8B", "Llama-3.1-8B-Instruct", "llama3", 131072, 8.03),
        *_pair("meta-llama", "Llama-3.1-70B", "Llama-3.1-70B-Instruct", "llama3", 131072, 70.6),
        *_pair("meta-llama", "Llama-3.1-405B", "Llama-3.1-405B-Instruct", "llama3", 131072, 405.9),
        ModelInfo("meta-llama/Llama-3.3-70B-Instruct", "llama3", 131072, int(70.6 * _B)),
        *_pair("mistralai", "Mistral-7B-v0.3", "Mistral-7B-Instruct-v0.3", "mistral", 32768, 7.25),
        *_pair("mistralai", "Mixtral-8x7B-v0.1", "Mixtral-8x7B-Instruct-v0.1", "mixtral", 32768, 46.7),
        *_pair("Qwen", "Qwen2.5-0.5B", "Qwen2.5-0.5B-Instruct", "qwen2", 32768, 0.49),
        *_pair("Qwen", "Qwen2.5-7B", "Qwen2.5-7B-Instruct", "qwen2", 32768, 7.62),
        *_pair("Qwen", "Qwen2.5-72B", "Qwen2.5-72B-Instruct", "qwen2", 32768, 72.7),
        *_pair("google", "gemma-2-2b", "gemma-2-2b-it", "gemma2", 8192, 2.61),
        *_pair("google", "gemma-2-9b", "gemma-2-9b-it", "gemma2", 8192, 9.24),
        *_pair("google", "gemma-2-27b", "gemma-2-27b-it", "gemma2", 8192, 27.2),
    ]
)

# The hub resolves ids case-insensitively, so the catalog does too.
_BY_NAME = {info.name.lower(): info for info in SUPPORTED_MODELS}
_405B_RE = re.compile(r"(?<![0-9])405b(?![a-z0-9])", re.IGNORECASE)


def lookup(model: str) -> ModelInfo | None:
    return _BY_NAME.get(model.strip().lower())


def supported_models() -> tuple[ModelInfo, ...]:
    return SUPPORTED_MODELS


def is_405b(model: str) -> bool:
    """True for the 405B-parameter class, known by the catalog or by name (a local copy's folder)."""
    info = lookup(model)
    if info is not None:
        return info.parameters >= 400 * _B
    return _405B_RE.search(model) is not None
