"""Split R1-style `<think>…</think>` output into reasoning_content and content (whole text or streamed deltas)."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(text: str, think_open: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output; the same split as streaming gives.

    think_open: the prompt already ended with `<think>` (R1 templates), so the output starts inside it.
    """
    rs = ReasoningStream(think_open)
    pieces = rs.feed(text) + rs.flush()
    reasoning = "".join(t for f, t in pieces if f == "reasoning_content")
    content = "".join(t for f, t in pieces if f == "content")
    return (reasoning if rs.saw_reasoning else None), content


class ReasoningStream:
    """Feed text deltas; get (field, text) pieces with field 'reasoning_content' or 'content'."""

    def __init__(self, think_open: bool = False):
        self.mode = "reasoning" if think_open else "undecided"
        self.buf = ""
        self.after_close = False
        self.saw_reasoning = think_open

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.buf += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "undecided":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.buf, self.mode, self.saw_reasoning = s[len(OPEN):], "reasoning", True
                    continue
                if s and OPEN.startswith(s):
                    return out  # could still become <think>
                if not s and self.buf:
                    return out
                self.mode = "content"
                continue
            if self.mode == "reasoning":
                if CLOSE in self.buf:
                    r, rest = self.buf.split(CLOSE, 1)
                    if r:
                        out.append(("reasoning_content", r))
                    self.buf, self.mode, self.after_close = rest, "content", True
                    continue
                keep = next((k for k in range(min(len(CLOSE) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(CLOSE[:k])), 0)
                emit = self.buf[: len(self.buf) - keep]
                if emit:
                    out.append(("reasoning_content", emit))
                self.buf = self.buf[len(emit):]
                return out
            # content
            if self.after_close:
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return out
                self.after_close = False
            if self.buf:
                out.append(("content", self.buf))
                self.buf = ""
            return out

    def flush(self) -> list[tuple[str, str]]:
        if not self.buf:
            return []
        field = "reasoning_content" if self.mode == "reasoning" else "content"
        text, self.buf = self.buf, ""
        return [(field, text)]
