"""Errors the user can fix: the CLI prints them as one clear line and exits 2 (no traceback)."""


class UserError(Exception):
    """Bad input or a missing asset, with a message that says what to do."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name, directory or hub id that cannot be loaded."""


class MethodError(UserError, ValueError):
    """Unknown method, malformed or wrong-typed option, or an invalid selection."""
