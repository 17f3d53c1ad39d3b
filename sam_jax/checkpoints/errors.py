"""The one error type of the converter: every problem found, reported together and briefly."""

from __future__ import annotations

from typing import Iterable

MAX_SHOWN = 6


class ConversionError(ValueError):
    """A checkpoint could not be converted. `problems` lists every problem, each naming its key."""

    def __init__(self, headline: str, problems: Iterable[str] = ()):
        self.headline = headline
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.headline]
        for p in self.problems[:MAX_SHOWN]:
            lines.append(f"  {p}")
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"  ... and {len(self.problems) - MAX_SHOWN} more")
        return "\n".join(lines)
