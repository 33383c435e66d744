"""The data package's user-facing error."""

from __future__ import annotations


class DataError(ValueError):
    """Input data, prepared shards or a data checkpoint cannot be used as given.

    The message names the file (with ``path:line`` where a line is at fault) and says how to fix it;
    the CLI prints it without a traceback.
    """
