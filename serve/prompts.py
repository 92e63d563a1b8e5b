"""What a request's text is, whichever engine answers it: the prompt an expert sees (its
training template for chat requests) and where the answer ends (the caller's stop strings,
plus the alpaca template's end markers for chat). One place, so the HF and vLLM engines
answer the same request with the same prompt and the same cut."""

from __future__ import annotations

from raylib.serve.requests import GenRequest

END_MARKERS = ("### End", "\n\n###")  # the alpaca template's end (see raylib.evaluation)


def render(tokenizer, template: str, req: GenRequest) -> str:
    """The prompt text: completions as sent; chat via the expert's training template
    (alpaca: the last user message is the instruction, system text its input)."""
    if req.kind != "chat":
        return req.prompt
    from raylib.data import render_prompt

    if template == "chat":
        return tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    user = [m["content"] for m in req.messages if m.get("role") == "user"]
    system = [m["content"] for m in req.messages if m.get("role") == "system"]
    return render_prompt(template, user[-1] if user else "", "\n".join(system), tokenizer)


def stops(template: str, req: GenRequest) -> list[str]:
    """The strings that end the answer (not part of it)."""
    out = list(req.stop)
    if req.kind == "chat" and template == "alpaca":
        out += list(END_MARKERS)
    return out


def cut(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    first = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text[:first], True) if first >= 0 else (text, False)


def answer(text: str, stop_strings: list[str], chat: bool) -> tuple[str, bool]:
    """The answer in `text` (everything decoded so far): cut at the first stop string, chat
    answers without surrounding whitespace; and whether a stop string was found."""
    text, found = cut(text, stop_strings)
    return (text.strip() if chat else text), found


def stream_piece(text: str, stop_strings: list[str], sent: int, chat: bool) -> tuple[str, int] | None:
    """A stream's next piece of `text` (everything decoded so far) after the `sent` characters
    already streamed, and the new count; None when nothing new may be shown yet. Held back:
    a trailing partial multi-byte character (up to 3 replacement characters), the last
    len(longest stop) - 1 characters (they may still become a stop string) and, for chat,
    leading and trailing whitespace (the answer is stripped)."""
    partial = len(text) - len(text.rstrip("\ufffd"))
    text = text[: len(text) - min(partial, 3)]
    visible, _ = cut(text, stop_strings)
    hold = max((len(x) for x in stop_strings), default=1) - 1
    if chat:
        visible = visible.lstrip()
    end = max(sent, len(visible) - hold)
    if chat:
        end = max(sent, min(end, len(visible.rstrip())))
    if end <= sent:
        return None
    return visible[sent:end], end


def shown_tokens(tokenizer, tokens: list[int], text: str, chat: bool) -> int:
    """How many generated tokens the returned (stop-cut) answer `text` is made of."""
    for m in range(len(tokens) + 1):
        piece = tokenizer.decode(tokens[:m], skip_special_tokens=True)
        if len(piece.strip() if chat else piece) >= len(text):
            return m
    return len(tokens)
