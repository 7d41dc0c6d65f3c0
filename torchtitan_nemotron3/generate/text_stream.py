"""New tokens as text while they come, and stop strings.

Byte-level BPE can split one character over several tokens, so the text is decoded
whole each time and only a stable part is released: not a trailing U+FFFD (half a
character), and not the last few characters that could still become a stop string.
A stop string may span tokens, so it is looked for in the text; nothing from it on
is released. Special tokens are shown (``<think>`` is what one wants to see); stop
tokens never reach the stream (the loop stops before).
"""


class TextStream:
    """Feed token ids with ``push``; it returns the text that became final and
    whether a stop string was reached; ``finish`` releases the rest."""

    def __init__(self, tok, stop_strings: list[str] = ()):
        self.tok = tok
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def _release(self, upto: str) -> str:
        new = upto[len(self.text) :] if upto.startswith(self.text) else ""
        self.text += new
        return new

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        full = self.tok.decode(self.ids)
        for s in self.stop_strings:
            at = full.find(s)
            if at >= 0:
                self.stopped = True
                return self._release(full[:at]), True
        if full.endswith("\ufffd"):
            return "", False
        return self._release(full[: len(full) - self.hold]), False

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.tok.decode(self.ids))
