"""The errors a user can act on. Every stage raises these with a message that names the input (file,
line, field or flag) and the fix; the CLI prints that one line and exits with `exit_code`
(`--debug` shows the traceback instead)."""

from __future__ import annotations


class StepdpoError(Exception):
    """Base of every user-facing error; exit status 2 unless a subclass says otherwise."""

    exit_code = 2


class OptionsError(StepdpoError, ValueError):
    """An option value that cannot work, found when the options are built (before any work)."""
