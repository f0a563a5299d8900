"""One exception type for bad input. The CLI prints its message as one line and exits 2."""


class SlayerError(Exception):
    """Bad input: the message names the file, the field and what was expected."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (a path may hold a newline): what the CLI prints
    as its single error line."""
    return "".join(ch if ch.isprintable() or ch == "\t" else ascii(ch)[1:-1] for ch in text)
