"""Errors shared by every step."""


class UserError(Exception):
    """Something the user can fix (bad input, wrong path, unreachable server).

    The CLI prints the message without a traceback and exits with status 2, so the message
    must name the file or setting at fault and say what to do next.
    """
