"""The one exception type for problems a user can fix (bad file, bad option, broken model).

The CLI turns an `NmtError` into a single line on stderr and exit code 1 (2 for `UsageError`);
anything else is a bug and keeps its traceback under `--verbose`.
"""


class NmtError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UsageError(NmtError):
    """An option value that cannot work (exit code 2, like other usage errors)."""
