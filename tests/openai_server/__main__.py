"""Serve the replay OpenAI-compatible server in the foreground, for demos and `just build-sage-responses`.

    python -m tests.openai_server --port 8765 [--latency 0.05] [--fault-rate 0.1]

It answers SaGE prompts with the recorded gpt-3.5-turbo answers and Rules of Thumb from
../shared/data/sage/quality100, so the whole SaGE pipeline runs offline and for free.
"""

from __future__ import annotations

import argparse

import uvicorn

from tests.openai_server.app import Lookup, ServerState, create_app
from tests.openai_server.fixture import DEFAULT_DATA_DIR, data_available


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="share of requests answered 429/500/stalled")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    args = ap.parse_args()
    from pathlib import Path

    if not data_available(Path(args.data_dir)):
        raise SystemExit(f"SaGE q100 files not found under {args.data_dir}/sage/quality100")
    state = ServerState(lookup=Lookup.from_dir(Path(args.data_dir)), latency_s=args.latency,
                        fault_rate=args.fault_rate)
    print(f"replay OpenAI server on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
