"""One exception type for bad input. The CLI prints its message as one line and exits 2."""


class SlayerError(Exception):
    """Bad input: the message names the file, the field and what was expected."""
