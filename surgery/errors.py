"""Errors a user can fix: one line that says what is wrong and what to do; the CLI exits non-zero."""


class SurgeryError(Exception):
    """A user-fixable problem; its message is shown as is, without a traceback."""

    exit_code = 2
