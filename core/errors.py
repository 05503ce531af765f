"""The project's one error type for bad input."""


class InputError(Exception):
    """Bad user input or a damaged file; the message is one line naming file:line or key."""
