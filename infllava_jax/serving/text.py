"""Generated ids -> answer text, piece by piece, cut at the request's stop strings.

Text is released as soon as it decodes to whole characters (a multi-byte character split over
tokens waits for its rest, as the chat does) and cannot be the start of a stop string; the
pieces of a stream add up to the text of the whole answer (`TextStream.full`).
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.sent = 0             # characters released so far
        self.stopped = False      # a stop string was found: nothing more is released

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        text = self._decode()
        if text.endswith("\ufffd"):   # wait for the rest of a multi-byte character
            return ""
        return self._release(text, final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._release(self._decode(), final=True)

    @classmethod
    def full(cls, tokenizer, stop: list[str], tokens) -> tuple[str, bool]:
        """(text of the whole answer, whether a stop string ended it)."""
        s = cls(tokenizer, stop)
        s.tokens = [int(t) for t in tokens]
        text = s.finish()
        return text, s.stopped

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _release(self, text: str, final: bool) -> str:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, final, self.stopped = text[:min(cuts)], True, True
        end = len(text) if final else len(text) - self._held(text)
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that could begin a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
