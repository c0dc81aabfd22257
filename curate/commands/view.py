"""`curate view`: the local web app over a store (datasets, rows, teacher logits, SaGE questions, annotation)."""

from __future__ import annotations

import errno
import socket
from typing import Annotated

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors, safe
from curate.errors import CurateError
from curate.store import DatasetStore


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one line rather than uvicorn's traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CurateError(f"port {port} on {host} is in use; pick another with --port") from None
        raise CurateError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


@app.command("view")
@friendly_errors
def view_cmd(
    store: StoreOpt = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8750,
    host: Annotated[str, typer.Option(help="Address to bind (keep 127.0.0.1 unless you mean to share the store "
                                           "with your network).")] = "127.0.0.1",
) -> None:
    """Look at the store in a browser: datasets, versions, cards, lineage, rows with a WHERE filter, teacher
    logits, SaGE questions, and the Annotate page. Read-only except for annotation judgments."""
    import uvicorn

    from curate.view.app import create_app

    st = DatasetStore(store)
    sock = bind_socket(host, port)
    console.print(f"curate view: http://{safe(host)}:{port}/  (store {safe(st.root)}; Ctrl-C stops)", highlight=False)
    config = uvicorn.Config(create_app(st), log_level="warning")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
