"""Errors that carry a message for the user: what is wrong, where, and what to change.

The command-line entry points print these without a stack trace; anything else is a bug.
"""

import unicodedata

#: Unicode categories escaped in messages: control and format characters, line and paragraph
#: separators (str.splitlines() breaks at \x1c-\x1e, \x85, \u2028 too), and the lone surrogates of
#: undecodable file-name bytes (which stderr cannot even encode).
_ESCAPED = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def printable(text: object) -> str:
    """`text` with every control character written as its Python escape (`\n`, `\x1b`, `\u202e`).

    A file may be named "a.wav<newline>skipped b.wav: ...": printed as it is, its name would forge a
    line of a report or of an error. Other characters, accents and scripts included, are kept.
    """
    text = str(text)
    if not any(unicodedata.category(ch) in _ESCAPED for ch in text):
        return text
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in _ESCAPED else ch for ch in text)


class MusicVAEError(Exception):
    """Base class of the errors the command line reports as plain messages, always one line: the
    file names in them are escaped by `printable`."""

    def __str__(self) -> str:
        return printable(super().__str__())


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
