"""User-facing errors: the CLI prints them as one line naming the bad input and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a config value). The message names the input."""
