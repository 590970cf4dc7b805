"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input or config: the CLI prints the message and exits with code 2.

    The message names the file or key, says what is wrong and how to fix it.
    """
