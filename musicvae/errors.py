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


class OversizedYAMLError(MusicVAEError):
    """A YAML file or text that would expand past musicvae's limits (an alias bomb, a nesting too deep).

    Not a ValueError on purpose: jsonargparse turns a loader's ValueError into a parse error that
    carries the offending value, so this one passes through it to the command's one-line report.
    """


class NonFiniteError(MusicVAEError):
    """Training produced a NaN or Inf; the message gives the step and what went non-finite.

    Raised instead of saving, so no checkpoint ever holds non-finite weights.
    """
