"""Strict CSV reading for builders: every problem becomes one `InputError` naming the file and row.

Two readers with one set of messages:

- `iter_csv_rows` streams records through Python's `csv` module: exact row numbers (1-based, header = row 1),
  exact messages. It is the reference and the diagnostic path.
- `csv_batches_sql` is DuckDB's parallel CSV reader for big files (~20x faster). Its errors name lines or
  nothing useful, so a builder that sees it fail calls `diagnose`, which re-reads the file with
  `iter_csv_rows` and raises the exact error.

Why not polars/pyarrow's CSV readers alone: their errors name byte offsets or nothing at all, and they
silently accept a truncated final record; users need "file X, row N: what is wrong".
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from curate.errors import InputError

# Exactly the characters `str.strip()` removes, so SQL-side trimming matches Python's byte for byte.
PY_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


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


def utf8_error(path: Path, chunk: int = 1 << 20) -> InputError | None:
    """The first invalid UTF-8 byte of `path` as the error `read_text_utf8` would raise, reading in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.start is relative to the decoder's pending bytes + this block; pending bytes are < 4
                pending = len(e.object) - len(block)
                bad = offset - pending + e.start
                f.seek(bad)
                byte = f.read(1)[0]
                f.seek(0)
                head = f.read(bad)
                return InputError(path, f"not valid UTF-8: byte 0x{byte:02x} at offset {bad}",
                                  line=head.count(b"\n") + 1)
            if not block:
                return None
            offset += len(block)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, io.SEEK_END)
        return f.read(1) == b"\n"


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, encoding="utf-8-sig", newline="", errors="strict")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None


def csv_header(path: Path, required: Sequence[str] = ()) -> list[str]:
    """The header's column names; a missing required column is an error naming row 1."""
    with _open_text(path) as fh:
        try:
            names = next(csv.reader(fh, strict=True), None)
        except UnicodeDecodeError:
            raise utf8_error(path) or InputError(path, "not valid UTF-8") from None
        except csv.Error as e:
            raise InputError(path, f"malformed CSV header ({e})", row=1) from None
    if names is None:
        raise InputError(path, "file is empty")
    missing = [c for c in required if c not in names]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (found: {', '.join(names)})", row=1)
    return names


def iter_csv_rows(
    path: Path,
    required: Sequence[str] = (),
    *,
    header: bool = True,
    columns: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (row number, record) with row 1 = header (or first record when there is no header), streaming.

    With ``header=False`` the caller names the ``columns``. A record with the wrong number of fields,
    an unterminated quote (a truncated file), a missing required column or a non-UTF-8 byte raises
    `InputError`.
    """
    with _open_text(path) as fh:
        reader = csv.reader(fh, strict=True)
        row_no = 0
        try:
            if header:
                names = next(reader, None)
                if names is None:
                    raise InputError(path, "file is empty")
                row_no = 1
                missing = [c for c in required if c not in names]
                if missing:
                    raise InputError(
                        path, f"missing column(s) {', '.join(missing)} (found: {', '.join(names)})", row=1
                    )
            else:
                names = list(columns or [])
            seen_any = False
            for record in reader:
                row_no += 1
                if not record:  # a blank line, e.g. the file's final newline in some editors
                    continue
                seen_any = True
                if len(record) != len(names):
                    raise InputError(
                        path,
                        f"expected {len(names)} fields, found {len(record)}"
                        + ("" if _ends_with_newline(path) else " (truncated file?)"),
                        row=row_no,
                        line=reader.line_num,
                    )
                yield row_no, dict(zip(names, record, strict=True))
            if not header and not seen_any:
                raise InputError(path, "file is empty")
        except UnicodeDecodeError:
            raise utf8_error(path) or InputError(path, "not valid UTF-8") from None
        except csv.Error as e:
            raise InputError(path, f"malformed CSV ({e}); is the file truncated?", row=row_no + 1,
                             line=reader.line_num) from None


def iter_checked_rows(path: Path, required: Sequence[str], *, header: bool = True,
                      columns: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """`iter_csv_rows` plus the whole-file checks: at least one data row, no required column empty in every row."""
    wanted = list(required) if header else list(columns or [])
    empty = set(wanted)
    n = 0
    for row_no, rec in iter_csv_rows(path, required, header=header, columns=columns):
        n += 1
        if empty:
            empty -= {c for c in empty if rec[c].strip()}
        yield row_no, rec
    check_whole_file(path, n, [c for c in wanted if c in empty])


def check_whole_file(path: Path, n_rows: int, empty_columns: Sequence[str]) -> None:
    """A split with no rows, or a required column with no value at all, is bad input, not an empty dataset."""
    if n_rows == 0:
        raise InputError(path, "no data rows (header only?)")
    if empty_columns:
        raise InputError(path, f"column(s) {', '.join(empty_columns)} empty in every row")


def extra_columns(path: Path, used: Sequence[str]) -> list[str]:
    """Header columns a builder does not use (it drops them; the build notes say so)."""
    return [c for c in csv_header(path, used) if c not in used]


def csv_batches_sql(names: Sequence[str]) -> str:
    """DuckDB `read_csv(...)` over `$path` with every column as text, header on, strict: for big files.

    Empty fields come back as NULL; wrap them in ``coalesce(col, '')``. Blank lines are skipped, as
    `iter_csv_rows` does.
    """
    cols = ", ".join(f"'{_sql_str(n)}': 'VARCHAR'" for n in names)
    return (
        "read_csv($path, header = true, auto_detect = false, strict_mode = true, all_varchar = true, "
        f"delim = ',', quote = '\"', escape = '\"', columns = {{{cols}}})"
    )


_WS_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]"  # RE2 class of those characters


def sql_strip(expr: str) -> str:
    """SQL for Python's ``str.strip()`` of `expr`: the characters of `PY_WHITESPACE`, from both ends.

    The anchored regexes (RE2 matches an end-anchored one from the end) pass the common value with nothing to
    strip through untouched. The strip itself is a regex replace, not DuckDB's character-set ``trim``, which
    costs ~0.3 s per million values even on rows whose CASE branch is never taken (measured, DuckDB 2.0).
    """
    return (f"CASE WHEN regexp_matches({expr}, '^{_WS_CLASS}') OR regexp_matches({expr}, '{_WS_CLASS}$') "
            f"THEN regexp_replace({expr}, '^{_WS_CLASS}+|{_WS_CLASS}+$', '', 'g') ELSE {expr} END")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def diagnose(path: Path, required: Sequence[str], check: Callable[[int, dict[str, str]], object],
             fast_error: str | None = None) -> InputError:
    """Re-read `path` with the exact reader and per-row `check`; return the first error for the caller to raise.

    Used when the fast reader failed (or flagged a batch): the user gets the same one-line message, with
    the row, that the exact reader gives. When the exact reader finds nothing, the fast reader's first line.
    """
    try:
        for row_no, rec in iter_csv_rows(path, required):
            check(row_no, rec)
    except InputError as e:
        return e
    first = (fast_error or "rejected by the CSV reader").strip().splitlines()[0]
    return InputError(path, f"could not read the CSV: {first}")
