"""The one error type of the converter: every problem found, reported together and briefly."""

from __future__ import annotations

from typing import Iterable, Optional

from ..config import SamConfig

MAX_SHOWN = 6


def printable(name: str) -> str:
    """A name read from a file, as an error message shows it: as it is, or quoted and escaped when
    it holds a newline or another character that would garble the message."""
    return name if name.isprintable() else repr(name)


class ConversionError(ValueError):
    """A checkpoint could not be converted. `problems` lists every problem, each naming its key;
    `config` is the model the checkpoint was checked against, where one was found."""

    def __init__(self, headline: str, problems: Iterable[str] = (), config: Optional[SamConfig] = None):
        self.headline = headline
        self.problems = list(problems)
        self.config = config
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.headline]
        for p in self.problems[:MAX_SHOWN]:
            lines.append(f"  {p}")
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"  ... and {len(self.problems) - MAX_SHOWN} more")
        return "\n".join(lines)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): what a
    one-line error can quote of a library's own message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
