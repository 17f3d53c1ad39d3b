"""The demo's one error type: what a request did wrong, answered as JSON {"error": message}."""

from __future__ import annotations


class DemoError(Exception):
    """A request the server refuses: `message` is shown on the page as it is; `status` is the
    HTTP status (400 bad input, 404 an image no longer held, 413 too large, ...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
