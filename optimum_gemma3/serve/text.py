"""Generated tokens to text, incrementally, cut at the first stop string (OpenAI's `stop`)."""

from __future__ import annotations

from collections.abc import Sequence

# What a tokenizer decodes an incomplete UTF-8 sequence to: held back until completed.
REPLACEMENT = "\ufffd"


class CompletionText:
    """The text of a growing list of generated tokens: `add(token)` returns what can be
    shown now. Text that could still become a stop string is held back; a stop string
    ends the text before it (`stopped`). Special tokens (EOS, turn markers) are not text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return ""
        return self._show(text, final=False)

    def finish(self) -> str:
        """What is left to show once generation has ended."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._show(text, final=True)

    @property
    def text(self) -> str:
        return self.shown

    def _show(self, text: str, final: bool) -> str:
        end = len(text)
        hits = [text.find(s) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            end -= self._held_back(text)
        # Decoding more tokens can change earlier text (spaces a tokenizer cleans up):
        # what was shown stays shown, and only the text after it is new.
        delta = text[len(self.shown) : end] if end > len(self.shown) else ""
        self.shown += delta
        return delta

    def _held_back(self, text: str) -> int:
        """The longest end of `text` that begins a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
