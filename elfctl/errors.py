"""The one exception type the CLI turns into a one-sentence message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown key, a malformed line.

    The message must be one clear sentence naming the problem; the CLI prints
    it without a traceback and exits with code 2.
    """
