"""Errors a user can act on. The CLI prints their message as one line and exits 2."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (the rest is often a dump or a traceback), for a one-line error;
    ``default`` (the exception's type name unless given) when it has no message."""
    message = str(error)
    if message:
        return message.splitlines()[0]
    return type(error).__name__ if default is None else default


class QuantarenaError(Exception):
    """Bad input: the message says what is wrong and what is valid."""


class ConfigError(QuantarenaError):
    pass


class DataError(QuantarenaError):
    pass


class ModelError(QuantarenaError):
    pass
