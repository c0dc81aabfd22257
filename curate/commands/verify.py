"""`curate verify`: re-hash stored versions against their manifests (bit rot, hand edits, planted files)."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.commands._app import StoreOpt, app, console, err_console, friendly_errors, safe
from curate.errors import CurateError
from curate.store import DatasetStore, check_name, parse_ref


@app.command("verify")
@friendly_errors
def verify_cmd(
    ref: Annotated[
        str | None, typer.Argument(help="NAME or NAME@VERSION to check (default: every version of every dataset).")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Re-hash every data file of the stored versions against their manifests; also refuse symlinks and files
    the manifest does not list. Prints one line per bad file and exits 1 if there is any."""
    st = DatasetStore(store)
    if ref is None:
        targets: list[tuple[str, str | None]] = [(n, None) for n in st.names()]
        if not targets:
            console.print(f"store {safe(st.root)} is empty: nothing to verify", highlight=False)
            return
    else:
        name, tag = parse_ref(ref)
        if check_name(name) not in st.names():  # a typo is not a dataset that verified clean
            known = ", ".join(st.names()) or "none"
            raise CurateError(f"no dataset named {name!r} in store {st.root} (datasets: {known})")
        targets = [(name, tag)]
    checked, problems = 0, []
    for name, tag in targets:
        try:
            n, found = st.verify_dataset(name, tag)
        except CurateError as e:
            n, found = 0, [str(e)]
        checked += n
        problems += found
    for line in problems:
        err_console.print(f"[bold red]bad:[/] {safe(line)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]OK[/]: {checked} version(s) of {len(targets)} dataset(s) in {safe(st.root)} match "
                  "their manifests", highlight=False)
