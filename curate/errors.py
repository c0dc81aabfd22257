"""One exception type for every user-facing failure, so the CLI can print it as a single clear line."""


class CurateError(Exception):
    """A problem with the user's input or environment (bad file, unknown dataset, missing GPU...)."""


class InputError(CurateError):
    """Bad input data: the message names the file and the row (1-based, header = row 1) or field."""

    def __init__(self, path: object, message: str, row: int | None = None, line: int | None = None) -> None:
        where = f"{path}" + (f", row {row}" if row is not None else "") + (f" (line {line})" if line else "")
        super().__init__(f"{where}: {message}")
        self.path = path
        self.row = row
