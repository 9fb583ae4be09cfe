"""What a user's mistake or the machine's fault is (RunError), and a name shown on one line (shown).

Imports no torch, so that the command line can answer before torch is imported."""

import sys
from pathlib import Path


class RunError(Exception):
    """A mistake in the input or a fault of the environment, not a bug of this script: main()
    prints its message, which says what to do, on one line and without a traceback."""


def shown(text: str | Path, keep_backslashes: bool = False) -> str:
    """text, a file name say, as one line that stdout and stderr can print, and that no other
    text prints as: a backslash doubled, and as backslash escapes a newline, a tab, a carriage
    return and what is not printable or not in the streams' encoding (a byte of a name that is
    not UTF-8 as that byte, \\xff; any other character as its bytes in UTF-8)."""
    encodings = [getattr(stream, "encoding", None) or "utf-8" for stream in (sys.stdout, sys.stderr)]

    def escaped(character: str) -> str:
        if character == "\\":
            return character if keep_backslashes else "\\\\"  # keep: a message whose paths are shown already
        if character in "\n\t\r":
            return repr(character)[1:-1]
        try:
            if character.isprintable():
                for encoding in encodings:
                    character.encode(encoding)
                return character
        except UnicodeEncodeError:
            pass
        try:  # Python hands over a byte of a name that is not text as a lone surrogate, \udcff for \xff
            return "".join(
                f"\\x{byte:02x}" for byte in character.encode(sys.getfilesystemencoding(), "surrogateescape")
            )
        except UnicodeEncodeError:  # a lone surrogate that stands for no byte
            return f"\\u{ord(character):04x}"

    return "".join(escaped(character) for character in str(text))
