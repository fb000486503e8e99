"""Streamed text: detokenized as tokens arrive, cut at the first stop string (text that may begin
one is held back until it is known)."""

from collections.abc import Sequence


def overlap(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class StopStrings:
    """Finds stop strings in streamed text; holds back text that may begin one."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.held = ""

    def feed(self, segment: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was completed."""
        text = self.held + segment
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((overlap(text, s) for s in self.stop), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class TextStream:
    """Streamed text of the generated tokens (EOS adds none), cut at the first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()
        self.stops = StopStrings(stop)

    def add(self, token: int, is_eos: bool, final: bool) -> tuple[str, bool]:
        """Text to emit for ``token``, and whether a stop string ended the generation."""
        segment = ""
        if self.detokenizer is not None:
            if not is_eos:
                self.detokenizer.add_token(token)
            if final:
                self.detokenizer.finalize()
            segment = self.detokenizer.last_segment
        text, stopped = self.stops.feed(segment)
        if final and not stopped:
            text += self.stops.flush()
        return text, stopped
