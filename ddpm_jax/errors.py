"""Exception types shared by all modules; this module imports nothing from the package."""


class UserError(Exception):
    """An error caused by the user's input or environment; main prints its message as one line, without a traceback."""
