"""Errors the user can fix: the CLI prints them as one clear line and exits 2 (no traceback)."""


class UserError(Exception):
    """Bad input or a missing asset, with a message that says what to do."""
