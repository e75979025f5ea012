"""The explorer's HTTP errors: a status code and a one-line message for the person."""

from __future__ import annotations

from ..io.errors import UserInputError

__all__ = ["ApiError", "BadRequest", "NotFound"]


class ApiError(UserInputError):
    """A request the explorer refuses: answered with ``status`` and ``{"error": message}``.

    Attributes:
        status: The HTTP status code (4xx).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadRequest(ApiError):
    """A malformed or out-of-range parameter (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class NotFound(ApiError):
    """An unknown image, layer, run, job or file (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)
