"""The one error type users see: a single line saying what is wrong, where, and what to do."""


class UserError(Exception):
    """Bad input from the user (data file, config, path). The CLI prints it on one line, exit code 2."""
