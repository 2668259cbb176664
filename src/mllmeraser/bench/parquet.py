"""Reading parquet files as the Hub's datasets store them: one file as a table (a one-line error naming a missing or
unreadable file) and an image column's bytes. Shared by the MLLMU-Bench (data.py) and CLEAR (clear_rows.py, clear.py)
readers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserInputError

if TYPE_CHECKING:
    import pyarrow as pa


def read_table(path: Path) -> pa.Table:
    """One parquet file as a table; a missing or unreadable file is a one-line error naming it."""
    # pyarrow is imported where a file is read, not with the module: `import mllmeraser` and the CLI's parser
    # (which reads the readers' split names) stay without it; it comes with the bench extra.
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserInputError(path, "no such parquet file")
    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or truncated file
        raise UserInputError(path, f"not a readable parquet file ({type(exc).__name__}: {first_line(exc)})") from None


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def image_bytes(image_field) -> bytes | None:
    return image_field.get("bytes") if isinstance(image_field, dict) else image_field
