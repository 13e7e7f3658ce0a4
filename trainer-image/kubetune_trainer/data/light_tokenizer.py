"""A model folder's tokenizer read straight from its `tokenizer.json`, without transformers.

Importing transformers imports torch and scikit-learn on the way: seconds and ~700 MB per
process before `prepare` reads its first record, its largest fixed cost. For the common layout
(`tokenizer_class` PreTrainedTokenizerFast, special tokens in `added_tokens_decoder`, no custom
code) transformers uses the Rust tokenizer of `tokenizer.json` as it is, so loading that gives
the same token ids; `load` returns None for any other layout and the caller uses transformers.
The chat template is compiled in the environment transformers builds for it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
UNSET_MAX_LENGTH = int(1e30)  # transformers' model_max_length when the config names none
# Keys by which transformers would change the Rust tokenizer or resolve tokens differently.
CUSTOM_KEYS = ("auto_map", "extra_special_tokens", "add_bos_token", "add_eos_token")


class LightTokenizer:
    """The parts of a transformers fast tokenizer that data preparation uses."""

    is_fast = True

    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None):
        self.backend_tokenizer = backend
        self.special_tokens_map: dict[str, Any] = {name: token_text(config[name]) for name in SPECIAL_TOKENS
                                                   if config.get(name)}
        extra = [token_text(token) for token in config.get("additional_special_tokens") or []]
        if extra:
            self.special_tokens_map["additional_special_tokens"] = extra
        self.chat_template = chat_template
        self.model_max_length = config.get("model_max_length", UNSET_MAX_LENGTH)
        self._template = None

    def _id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def get_chat_template(self) -> str:
        if not self.chat_template:
            raise ValueError("the tokenizer has no chat template")
        return self.chat_template

    def compiled_chat_template(self) -> Any:
        if self._template is None:  # compiling costs ~0.3 s: once per tokenizer
            self._template = compile_chat_template(self.get_chat_template())
        return self._template

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """Rendering only (what `prepare` calls), with transformers' template variables."""
        assert not tokenize, "LightTokenizer renders; `encode_batch` tokenizes"
        return self.compiled_chat_template().render(messages=list(messages), tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **self.special_tokens_map)


def token_text(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken's fields."""
    return token["content"] if isinstance(token, dict) else str(token)


def load(folder: Path) -> LightTokenizer | None:
    """The folder's tokenizer, or None when only transformers builds it right."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not plain_layout(folder, config):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # unreadable or unusual files: transformers reports them properly
        return None
    if not same_as_transformers(backend, config):
        return None
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return LightTokenizer(backend, config, chat_template_of(folder, config))


def plain_layout(folder: Path, config: dict[str, Any]) -> bool:
    return (config.get("tokenizer_class") == "PreTrainedTokenizerFast"
            and isinstance(config.get("added_tokens_decoder"), dict)
            and not any(config.get(key) for key in CUSTOM_KEYS)
            and not isinstance(config.get("chat_template"), list)  # named templates
            and (folder / "tokenizer.json").is_file()
            and not (folder / "added_tokens.json").exists()
            and not (folder / "additional_chat_templates").exists())


def same_as_transformers(backend: Any, config: dict[str, Any]) -> bool:
    """transformers adds special tokens the Rust tokenizer lacks, and rebuilds a pre-tokenizer
    whose add_prefix_space differs from the config's: in those cases the ids could differ."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    wanted = [token_text(token) for token in config["added_tokens_decoder"].values()]
    wanted += [token_text(config[name]) for name in SPECIAL_TOKENS if config.get(name)]
    wanted += [token_text(token) for token in config.get("additional_special_tokens") or []]
    if any(token not in added for token in wanted):
        return False
    if backend.pre_tokenizer is None:
        return True
    state = json.loads(backend.pre_tokenizer.__getstate__())
    return state.get("add_prefix_space", config.get("add_prefix_space", False)) == config.get("add_prefix_space", False)


def chat_template_of(folder: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` takes priority over the config's entry, as in transformers."""
    file = folder / "chat_template.jinja"
    return file.read_text(encoding="utf-8") if file.is_file() else config.get("chat_template")


def compile_chat_template(source: str) -> Any:
    """The template in the environment transformers compiles chat templates in."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}` marks assistant text for transformers' masks; it renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(source)
