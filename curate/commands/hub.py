"""`curate push` / `curate pull`: versions to and from Hugging Face Hub dataset repos."""

from __future__ import annotations

from typing import Annotated

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.store import DatasetStore

EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint", help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).",
                 show_default=False),
]


@app.command("push")
@friendly_errors
def push_cmd(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION to push.")],
    repo_id: Annotated[str, typer.Argument(help="Dataset repo, ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (default main).")] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Move an existing tag that does not hold this version's files.")
    ] = False,
    store: StoreOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Upload a version (parquet, manifest, card) in one checked commit and tag it (v1, v2, …).

    The local version is verified first. The commit is made on the branch head it was computed from (retried if
    another push lands meanwhile) and tagged only after its files were checked against the version. Pushing a
    version that is already there commits nothing. The token comes from $HF_TOKEN or `hf auth login`; it is
    never printed or written anywhere.
    """
    from curate.hub import push

    st = DatasetStore(store)
    v = st.get(ref)
    console.print(f"pushing {v.ref} ({v.hash[:16]}, {v.num_rows():,} rows) to {repo_id} …")
    r = push(st, ref, repo_id, private=private, revision=revision, endpoint=endpoint, repair=repair)
    if r.commit is None:
        console.print(f"[cyan]already there:[/] {repo_id} tag {r.tag} holds this content; nothing committed")
    elif r.created_commit:
        console.print(f"[green]pushed[/] {repo_id} commit {r.commit[:12]}, tagged {r.tag}")
    else:
        console.print(f"[green]tagged[/] {repo_id} commit {r.commit[:12]} as {r.tag} (content was already there)")
    if r.repaired:
        console.print(f"[yellow]repaired:[/] tag {r.tag} moved to checked commit {str(r.commit)[:12]}")
    console.print(f"  load with: datasets.load_dataset({repo_id!r}, <config>, revision={r.tag!r})")


@app.command("pull")
@friendly_errors
def pull_cmd(
    repo: Annotated[str, typer.Argument(help="ORG/NAME[@REVISION] (a tag like v3, a branch or a commit).")],
    name: Annotated[str | None, typer.Option("--name", help="Store the version under this name.")] = None,
    store: StoreOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Download a Hub revision into the store as a version, verifying its content hash first.

    The dataset name (--name, else the one in the repo's manifest.json) is checked before anything is written.
    """
    from curate.hub import pull

    r = pull(DatasetStore(store), repo, name=name, endpoint=endpoint)
    verb = "pulled" if r.created else "already in the store as"
    console.print(f"[green]{verb}[/] {r.version.ref} ({r.version.hash[:16]}, {r.version.num_rows():,} rows) "
                  f"from {repo} commit {r.commit[:12]}")
