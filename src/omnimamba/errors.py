"""Errors a user can cause (a bad path, a bad config value, a bad input). The CLI prints them as one line."""


class UserError(ValueError):
    """Something the user can fix; the message names the thing and the fix."""
