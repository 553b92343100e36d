"""Errors that are the caller's fault. main.py turns them into HTTP 4xx responses."""


class InvalidInputError(ValueError):
    """The request names something that cannot be contoured; the message says what and why."""

    status_code = 422


class ImageNotFoundError(InvalidInputError):
    status_code = 404
