"""Errors that carry their HTTP status: FastAPI answers them as that status with the message."""

from fastapi import HTTPException


class CTVError(HTTPException):
    status_code = 500

    def __init__(self, message: str):
        super().__init__(status_code=type(self).status_code, detail=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInputError(CTVError):
    """The request names something that cannot be processed; the message says what and why."""

    status_code = 422


class ImageNotFoundError(InvalidInputError):
    status_code = 404


class PayloadTooLargeError(InvalidInputError):
    """The input is over a size limit (the message names the limit and how to change it)."""

    status_code = 413


class ConflictError(CTVError):
    """The request collides with work already under way on the same thing."""

    status_code = 409


class ModelUnavailableError(CTVError):
    """No usable weights yet (not trained, or the file on disk is unreadable)."""

    status_code = 503


class NotAuthorisedError(CTVError):
    """The request does not say whose data it is."""

    status_code = 401


class StorageFullError(CTVError):
    """The disk (or quota) the datastore writes to is full."""

    status_code = 507


class ServerBusyError(CTVError):
    """Too many requests waiting; the client should retry after ``retry_after_s``."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(int(retry_after_s))}
