"""Every prefix of a conversation from one render, for templates that write messages in order.

An assistant turn's span is render(messages[:i], generation prompt) .. render(messages[:i+1])
(`encoding.prefix_spans`): 3.5 renders for a typical conversation. A template that loops over
`messages` once and writes each message from it and the ones before it (nothing that depends on
later messages: `loop.last`, `messages | length`, `messages[-1]`, a second loop, a namespace the loop writes to) has written
render(messages[:k]) by the time it takes message k. So one render that notes where each message
starts gives every prefix: render(messages[:k]) is the text before message k's start, and with
the generation prompt that text plus the prompt.

Which templates qualify is decided once, by `walks_in_order` on the template's syntax tree and
by the caller comparing both ways on probe conversations (`encoding.chat_renderer`). Each span is
checked again (`spans_from_starts`); a conversation that fails is rendered prefix by prefix.
"""

from __future__ import annotations

from typing import Any, Sequence

Span = tuple[int, int]
LOOKS_AHEAD = {"last", "length", "revindex", "revindex0", "nextitem"}  # loop attributes that see later items


def walks_in_order(template_source: str, environment: Any) -> bool:
    """The template iterates `messages` in one loop, reads it otherwise only as `messages[0]`,
    asks no loop for what comes later, and keeps no state in a namespace (which could carry
    what a later message holds to text written after the loop)."""
    from jinja2 import nodes

    tree = environment.parse(template_source)
    loops = [node for node in tree.find_all(nodes.For)
             if isinstance(node.iter, nodes.Name) and node.iter.name == "messages"]
    if len(loops) != 1:
        return False
    allowed = {id(loops[0].iter)}
    allowed |= {id(node.node) for node in tree.find_all(nodes.Getitem)
                if isinstance(node.node, nodes.Name) and isinstance(node.arg, nodes.Const) and node.arg.value == 0}
    if any(node.name == "messages" and id(node) not in allowed for node in tree.find_all(nodes.Name)):
        return False
    if any(True for _ in tree.find_all(nodes.NSRef)):
        return False
    return not any(isinstance(node.node, nodes.Name) and node.node.name == "loop" and node.attr in LOOKS_AHEAD
                   for node in tree.find_all(nodes.Getattr))


class NotedMessages(list):
    """The conversation as the template sees it: taking a message notes how much text the
    template has written so far (`written` is kept up to date by `render_noting_starts`)."""

    def __init__(self, messages: Sequence[dict]):
        super().__init__(messages)
        self.written = 0
        self.starts: list[int] = []

    def __iter__(self):
        for message in list.__iter__(self):
            self.starts.append(self.written)
            yield message


def render_noting_starts(template: Any, variables: dict[str, Any], messages: Sequence[dict]) -> tuple[str, list[int]]:
    """The whole conversation rendered once, and where in it each message starts."""
    noted = NotedMessages(messages)
    context = template.new_context({"messages": noted, "tools": None, "documents": None,
                                    "add_generation_prompt": False, **variables})
    pieces = []
    for piece in template.root_render_func(context):  # what `render` joins; `generate` adds a frame a piece
        pieces.append(piece)
        noted.written += len(piece)
    return "".join(pieces), noted.starts


def spans_from_starts(messages: Sequence[dict], full: str, starts: list[int], prompt: str) -> list[Span] | None:
    """The assistant spans, as `encoding.prefix_spans` gives them; None if a check fails (then
    the conversation is rendered prefix by prefix). `prompt` is the generation prompt's text."""
    if len(starts) != len(messages):
        return None
    ends = starts[1:] + [len(full)]
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = starts[index] + len(prompt)
        if not (full.startswith(prompt, starts[index]) and start < ends[index]):
            return None
        spans.append((start, ends[index]))
    return spans
