"""The two kinds of failure the CLI distinguishes (exit 2 and exit 1)."""


class ConverterError(Exception):
    """Bad input: a file, key, shape, flag or network problem the user can act on (exit 2).

    The message is the whole story: which file/key/shape, and what to do. No traceback is shown.
    """


class VerificationError(Exception):
    """The converted model does not reproduce the original forward pass (exit 1)."""
