"""Errors that carry a message for the user: what is wrong, where, and what to change.

The command-line entry points print these without a stack trace; anything else is a bug.
"""


class MusicVAEError(Exception):
    """Base class of the errors the command line reports as plain messages."""


class DataError(MusicVAEError, ValueError):
    """Input data that cannot be used; the message names the file or setting."""


class ConfigError(MusicVAEError, ValueError):
    """A setting that cannot work; the message names it and says what to change."""


class CheckpointError(MusicVAEError, ValueError):
    """A checkpoint that cannot be loaded or resumed from."""


class NonFiniteError(MusicVAEError):
    """Training produced a NaN or Inf; the message gives the step and what went non-finite.

    Raised instead of saving, so no checkpoint ever holds non-finite weights.
    """
