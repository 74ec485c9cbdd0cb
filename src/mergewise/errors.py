"""The one exception type users see: the CLI prints it as a single `error: …` line (exit 2)."""


class MergewiseError(Exception):
    """Bad input or a refused operation; the message names the file, tensor or key at fault."""
