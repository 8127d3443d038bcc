"""Errors as HTTP answers: every failure is ``{"error": "<one line>"}`` with its status.

:class:`ApiError` carries its own status; typed errors of the package map by
kind (:func:`status_of`): a missing run, layer or analysis is 404, bad input
400, a broken run 409, damaged data 500, an unreachable store 503.
"""

from __future__ import annotations

from typing import Any

from vitcnn_store.errors import (
    BrokenRunError,
    DamagedDataError,
    RunNotFoundError,
    StoreUnavailableError,
    VitcnnError,
)

__all__ = ["ApiError", "error_body", "one_line", "status_of"]


class ApiError(Exception):
    """An answer other than success: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def one_line(message: object) -> str:
    """The first line of ``message`` (errors answer with one line)."""
    text = str(message).strip()
    return text.splitlines()[0] if text else "error"


def status_of(error: BaseException) -> int:
    """The HTTP status that answers ``error``."""
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, RunNotFoundError):
        return 404
    if isinstance(error, BrokenRunError):
        return 409
    if isinstance(error, StoreUnavailableError):
        return 503
    if isinstance(error, DamagedDataError):
        return 500
    if isinstance(error, VitcnnError):
        return 400
    return 500


def error_body(message: object) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": one_line(message)}
