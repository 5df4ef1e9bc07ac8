"""Domain errors; the API maps each class to one HTTP status (api/errors.py)."""


class UnikError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(UnikError):
    status = 400


class Unauthorized(UnikError):
    status = 401


class Forbidden(UnikError):
    status = 403


class NotFound(UnikError):
    status = 404


class Conflict(UnikError):
    status = 409


class TooLarge(UnikError):
    status = 413


class NotImplementedByProvider(UnikError):
    status = 501


class BadGateway(UnikError):
    status = 502
