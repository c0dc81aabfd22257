"""Strict CSV reading for builders: every problem becomes one `InputError` naming the file and row.

Why not polars/pyarrow's CSV readers: their errors name byte offsets or nothing at all, and they silently
accept a truncated final record; users need "file X, row N: what is wrong".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

from curate.errors import InputError


def read_text_utf8(path: Path) -> str:
    """Decode strictly as UTF-8 (a BOM is allowed); a bad byte is reported with its line number."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            path, f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}", line=line
        ) from None


def iter_csv_rows(
    path: Path,
    required: Sequence[str] = (),
    *,
    header: bool = True,
    columns: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (row number, record) with row 1 = header (or first record when there is no header).

    With ``header=False`` the caller names the ``columns``. A record with the wrong number of fields,
    an unterminated quote (a truncated file) or a missing required column raises `InputError`.
    """
    text = read_text_utf8(path)
    if not text.strip():
        raise InputError(path, "file is empty")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row_no = 0
    try:
        if header:
            names = next(reader)
            row_no = 1
            missing = [c for c in required if c not in names]
            if missing:
                raise InputError(
                    path, f"missing column(s) {', '.join(missing)} (found: {', '.join(names)})", row=1
                )
        else:
            names = list(columns or [])
        for record in reader:
            row_no += 1
            if not record:  # a blank line, e.g. the file's final newline in some editors
                continue
            if len(record) != len(names):
                raise InputError(
                    path,
                    f"expected {len(names)} fields, found {len(record)}"
                    + (" (truncated file?)" if _at_end(reader, text) else ""),
                    row=row_no,
                    line=reader.line_num,
                )
            yield row_no, dict(zip(names, record, strict=True))
    except csv.Error as e:
        raise InputError(path, f"malformed CSV ({e}); is the file truncated?", row=row_no + 1,
                         line=reader.line_num) from None


def _at_end(reader: object, text: str) -> bool:
    """True when the bad record is the last one, which is what a cut-off download looks like."""
    return not text.endswith("\n")
