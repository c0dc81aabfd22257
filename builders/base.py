"""What every builder returns: the version it produced (or found) and what it noticed on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

from curate.store import Version


@dataclass
class BuildResult:
    version: Version
    created: bool  # False: an identical version already existed, nothing new was written
    notes: list[str] = field(default_factory=list)  # duplicates, empty fields, missing files...

    def summary(self) -> str:
        verb = "built" if self.created else "unchanged, already stored as"
        return f"{verb} {self.version.ref} ({self.version.hash[:16]}, {self.version.num_rows():,} rows)"
