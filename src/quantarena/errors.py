"""Errors a user can act on. The CLI prints their message as one line and exits 2."""


class QuantarenaError(Exception):
    """Bad input: the message says what is wrong and what is valid."""


class ConfigError(QuantarenaError):
    pass


class DataError(QuantarenaError):
    pass


class ModelError(QuantarenaError):
    pass
