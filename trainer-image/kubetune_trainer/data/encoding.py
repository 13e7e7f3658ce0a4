"""Examples -> token ids with a loss mask, per task type, a batch at a time.

- prompt/response: prompt (with the tokenizer's special tokens, e.g. BOS) + response + EOS;
  loss on the response and EOS only. No template: the user bakes it into the prompt.
- chat: the model's chat template renders the conversation; loss on the assistant turns. The
  turns' character spans come from rendering prefixes of the conversation (the text added by
  turn i is render(messages[:i+1]) minus render(messages[:i], generation prompt)), so no
  `{% generation %}` markers are needed; for templates that write messages in order, all
  prefixes come from one render (`one_render`); templates that render prefixes inconsistently
  fall back to locating the contents in order. The tokens holding a span's first and last
  characters bound the learned tokens.
- text: BOS + text + EOS, loss everywhere.

Speed: each batch goes to the Rust tokenizer in one `encode_batch` call (it spreads the batch
over its threads), the fast variant without offsets where no offsets are needed, and the
results are laid out in flat arrays, never one numpy array per sample.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .light_tokenizer import LightTokenizer
from .one_render import Span, render_noting_starts, spans_from_starts, walks_in_order
from .packing import Sample
from .rules import Conversation, Example, PromptResponse, Text

Render = Callable[[Sequence[dict], bool], str]


class TemplateRefused(Exception):
    """The chat template cannot render this conversation; reported like a broken rule."""


@dataclass
class Encoded:
    """A batch of samples, flat: sample i is `ids[starts[i]:starts[i] + lengths[i]]`.

    A conversation the chat template refused has length 0 and its reason in `refusals`.
    """

    ids: np.ndarray  # int32
    mask: np.ndarray  # bool, True where the token is learned
    lengths: np.ndarray  # int64, one per example of the batch
    refusals: dict[int, str]

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def sample(self, index: int) -> Sample:
        start = int(self.starts[index])
        end = start + int(self.lengths[index])
        return Sample(self.ids[start:end], self.mask[start:end])


def backend(tokenizer: Any) -> Any:
    """The Rust tokenizer of a transformers fast tokenizer."""
    return tokenizer.backend_tokenizer


def positions(lengths: np.ndarray) -> np.ndarray:
    """Each token's position inside its sample, for flat arrays of samples of `lengths`."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def flat(id_lists: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The lists end to end, and their lengths. `array.fromlist` converts a list in one C loop
    (34 ns a token, against 48 for `np.fromiter` over the chained lists)."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    joined = array("i")  # C int: numpy's intc
    for ids in id_lists:
        joined.fromlist(ids)
    return np.frombuffer(joined, dtype=np.intc).astype(np.int32, copy=False), lengths


def encode_prompt_responses(tokenizer: Any, examples: Sequence[PromptResponse]) -> Encoded:
    rust = backend(tokenizer)
    prompts = rust.encode_batch_fast([example.prompt for example in examples], add_special_tokens=True)
    responses = rust.encode_batch_fast([example.response for example in examples], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    prompt_lengths, id_lists = [], []
    for prompt, response in zip(prompts, responses):
        ids = prompt.ids
        prompt_lengths.append(len(ids))
        ids += response.ids  # in place: these lists are long, copies cost
        if eos is not None and (len(ids) == prompt_lengths[-1] or ids[-1] != eos):
            ids.append(eos)
        id_lists.append(ids)
    ids, lengths = flat(id_lists)
    mask = positions(lengths) >= np.repeat(np.asarray(prompt_lengths, dtype=np.int64), lengths)
    return Encoded(ids, mask, lengths, {})


def encode_texts(tokenizer: Any, examples: Sequence[Text]) -> Encoded:
    encoded = backend(tokenizer).encode_batch_fast([example.text for example in examples], add_special_tokens=True)
    eos = tokenizer.eos_token_id
    id_lists = [item.ids for item in encoded]
    for ids in id_lists:
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
    ids, lengths = flat(id_lists)
    return Encoded(ids, np.ones(len(ids), dtype=bool), lengths, {})


# --- chat --------------------------------------------------------------------------------------

class ChatRenderer:
    """The model's chat template: `render(messages, generation_prompt)`, and `rendered`, a
    conversation's text with its assistant spans, from one render where the template allows
    (see `one_render`), else from a render per prefix."""

    def __init__(self, render: Render, one_pass: Callable[[Sequence[dict]], tuple[str, list[int]]] | None = None,
                 prompt: str = ""):
        self.render = render
        self.one_pass = one_pass  # the full text and each message's start in it
        self.prompt = prompt  # the generation prompt's text, for one_pass

    def __call__(self, messages: Sequence[dict], generation_prompt: bool = False) -> str:
        return self.render(messages, generation_prompt)

    def rendered(self, messages: Sequence[dict]) -> tuple[str, list[Span]]:
        if self.one_pass is None:
            full = self.render(messages, False)
        else:
            full, starts = self.one_pass(messages)
            spans = spans_from_starts(messages, full, starts, self.prompt)
            if spans is not None:
                return full, spans
        return full, assistant_spans(self.render, messages, full)


def chat_renderer(tokenizer: Any) -> ChatRenderer:
    """The model's chat template, as a `ChatRenderer`.

    The compiled template is called directly: `apply_chat_template` costs several times the
    render itself per call. It falls back to `apply_chat_template` where that shortcut renders
    differently, and to a render per prefix where one render would give other spans.
    """

    def slow(messages: Sequence[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)

    try:
        template = compiled_template(tokenizer)
        variables = dict(tokenizer.special_tokens_map)
    except Exception:  # no template, or a transformers without this helper: the public path
        return ChatRenderer(guarded(slow))

    def fast(messages: Sequence[dict], generation_prompt: bool) -> str:
        return template.render(messages=list(messages), tools=None, documents=None,
                               add_generation_prompt=generation_prompt, **variables)

    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    try:
        same = all(fast(probe[:n], n < 2) == slow(probe[:n], n < 2) for n in (1, 2))
    except Exception:
        same = False
    if not same:
        return ChatRenderer(guarded(slow))
    renderer = ChatRenderer(guarded(fast))
    try:
        in_order = walks_in_order(tokenizer.get_chat_template(), template.environment)
    except Exception:  # a template jinja parses only at render time: no shortcut
        in_order = False
    if in_order:
        once = guarded(lambda messages, _: render_noting_starts(template, variables, messages))
        prompt = generation_prompt(renderer)
        candidate = ChatRenderer(renderer.render, once, prompt or "")
        if prompt is not None and same_spans(candidate, renderer):
            return candidate
    return renderer


PROBES = [  # conversations on which one render must give what a render per prefix gives
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
    [{"role": "system", "content": " s\n"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "\nu2 "}, {"role": "assistant", "content": " a2\n"}],
    [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
     {"role": "user", "content": "four"}, {"role": "assistant", "content": "five six"},
     {"role": "user", "content": "seven"}, {"role": "assistant", "content": "eight nine ten"}],
]


def generation_prompt(renderer: ChatRenderer) -> str | None:
    """What the generation prompt adds after a conversation, or None if it is not appended."""
    try:
        plain, prompted = renderer(PROBES[0][:1], False), renderer(PROBES[0][:1], True)
    except TemplateRefused:
        return None
    return prompted[len(plain):] if prompted.startswith(plain) else None


def same_spans(candidate: ChatRenderer, reference: ChatRenderer) -> bool:
    """One render gives the text and spans a render per prefix gives, on every probe the
    template accepts (one refusing system messages skips that probe), and on at least two."""
    checked = 0
    for messages in PROBES:
        try:
            full = reference(messages, False)
        except TemplateRefused:
            continue
        spans = prefix_spans(reference.render, messages, full)
        try:
            full_once, starts = candidate.one_pass(messages)
        except TemplateRefused:
            return False
        if spans is None or full_once != full or spans_from_starts(messages, full, starts, candidate.prompt) != spans:
            return False
        checked += 1
    return checked >= 2


def compiled_template(tokenizer: Any) -> Any:
    if isinstance(tokenizer, LightTokenizer):  # compiled as transformers would, without importing it
        template = tokenizer.compiled_chat_template()
    else:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.get_chat_template())
    # The same globals as a flat dict: jinja copies its ChainMap of them on every render, which
    # was two thirds of a short conversation's render time.
    template.globals = dict(template.globals)
    return template


def guarded(render: Render) -> Render:
    def checked(messages: Sequence[dict], generation_prompt: bool = False) -> str:
        try:
            return render(messages, generation_prompt)
        except Exception as error:  # jinja's TemplateError, or any error the template's code raises
            raise TemplateRefused(f"the model's chat template refused the conversation: {error}") from error

    return checked


def render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    return chat_renderer(tokenizer)(messages, generation_prompt)


def assistant_spans(render: Render, messages: Sequence[dict], full: str) -> list[Span]:
    """Character spans of the assistant turns in `full` (the rendered conversation)."""
    spans = prefix_spans(render, messages, full)
    return spans if spans is not None else content_spans(messages, full)


def prefix_spans(render: Render, messages: Sequence[dict], full: str) -> list[Span] | None:
    """Spans from prefix renders; None when the template renders prefixes inconsistently.
    The last turn ends the conversation: its render through that turn is `full` itself."""
    spans: list[Span] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], True)
        through = full if index == len(messages) - 1 else render(messages[: index + 1], False)
        if not (full.startswith(through) and through.startswith(before) and len(before) < len(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def content_spans(messages: Sequence[dict], full: str) -> list[Span]:
    """Fallback: find every message's content in order; the assistant ones are the spans."""
    spans: list[Span] = []
    cursor = 0
    for number, message in enumerate(messages, start=1):
        content = message["content"].strip()  # templates often trim contents
        start = full.find(content, cursor)
        if start < 0:
            raise TemplateRefused(f"the model's chat template drops the content of message {number}")
        cursor = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, cursor))
    return spans


def span_mask(encoding: Any, spans: Sequence[Span]) -> np.ndarray:
    """Learned tokens: every token that holds a character of a span."""
    mask = np.zeros(len(encoding), dtype=bool)  # len(encoding.ids) would copy the ids once more
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:  # a character no token holds (a normalizer dropped it)
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        else:
            mask[first:last + 1] = True
    return mask


def encode_conversations(tokenizer: Any, examples: Sequence[Conversation],
                         render: ChatRenderer | None = None) -> Encoded:
    render = render or chat_renderer(tokenizer)
    texts, span_lists, refusals = [], [], {}
    for number, example in enumerate(examples):
        try:
            full, spans = render.rendered(example.messages)
        except TemplateRefused as refused:
            full, spans = "", []
            refusals[number] = str(refused)
        texts.append(full)
        span_lists.append(spans)
    # The template writes the special tokens (BOS...) itself: do not add them a second time.
    encodings = backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    id_lists = [[] if number in refusals else encoding.ids for number, encoding in enumerate(encodings)]
    ids, lengths = flat(id_lists)
    masks = [span_mask(encoding, spans) for number, (encoding, spans) in enumerate(zip(encodings, span_lists))
             if number not in refusals]
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return Encoded(ids, mask, lengths, refusals)


def encode_batch(tokenizer: Any, examples: Sequence[Example], render: ChatRenderer | None = None) -> Encoded:
    """All examples of a batch are of one task type (one run has one)."""
    if not examples:
        return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64), {})
    if isinstance(examples[0], PromptResponse):
        return encode_prompt_responses(tokenizer, examples)
    if isinstance(examples[0], Conversation):
        return encode_conversations(tokenizer, examples, render)
    return encode_texts(tokenizer, examples)


def encode_one(tokenizer: Any, example: Example) -> Sample:
    encoded = encode_batch(tokenizer, [example])
    if encoded.refusals:
        raise TemplateRefused(encoded.refusals[0])
    return encoded.sample(0)


def truncate(item: Sample, context_length: int) -> tuple[Sample, bool]:
    """Keep the first `context_length` tokens; say whether anything was cut."""
    if len(item) <= context_length:
        return item, False
    return Sample(item.input_ids[:context_length], item.loss_mask[:context_length]), True
