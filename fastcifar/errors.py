"""What fastcifar tells its users when something is wrong: BadInput (exit 2, one paragraph) and the
helpers that keep a message short whatever it quotes."""


class BadInput(Exception):
    """Bad usage or bad input: the CLI prints the message as one paragraph and exits 2."""


def shown(value, limit: int = 60) -> str:
    """repr(value) for an error message, its middle cut when longer than `limit` characters: a
    5,000-digit --set value or a pasted file must not fill the terminal."""
    try:
        r = repr(value)
    except (RecursionError, MemoryError):  # a value read from a file, nested thousands of levels deep
        return f"a {type(value).__name__} nested too deep to show"
    return r if len(r) <= limit else f"{r[:limit - 16]}...{r[-10:]} ({len(r):,} characters)"


def why(e: BaseException, limit: int = 300) -> str:
    """An exception for an error message: 'TypeError: its first line' (cut at `limit` characters),
    or its bare name when it has no message. Libraries' multi-line messages and advice stay out."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit].rstrip()}" if lines else type(e).__name__
