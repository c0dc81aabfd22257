"""Serve the replay OpenAI-compatible server in the foreground (offline demos, `just build-sage-responses`).

    python -m curate.replay --port 8765 [--data-dir ../shared/data] [--latency 0.05] [--fault-rate 0.1]

It answers SaGE prompts with the recorded gpt-3.5-turbo answers and Rules of Thumb from
<data-dir>/sage/quality100, so the whole SaGE pipeline runs offline and for free. Prompts it has no
recording for get HTTP 404. Needs the `replay` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curate.replay.recording import Q100, data_available, default_data_dir, recording_sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curate.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply (default: %(default)s)")
    ap.add_argument("--fault-rate", type=float, default=0.0,
                    help="share of requests answered 429/500/stalled (default: %(default)s)")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="folder holding sage/quality100 (default: $CURATE_REPLAY_DATA, $CURATE_SHARED_DATA or "
                         "../shared/data beside the checkout: %(default)s)")
    args = ap.parse_args(argv)
    if not data_available(args.data_dir):
        print(f"error: SaGE q100 recording not found under {args.data_dir / Q100}", file=sys.stderr)
        return 1
    try:
        import uvicorn

        from curate.replay.app import ServerState, create_app
        from curate.replay.recording import Lookup
    except ImportError as e:  # fastapi/uvicorn are the `replay` extra
        print(f"error: {e.name} is not installed: pip install 'ethics-curate[replay]'", file=sys.stderr)
        return 1
    state = ServerState(lookup=Lookup.from_dir(args.data_dir), sources=recording_sources(args.data_dir),
                        latency_s=args.latency, fault_rate=args.fault_rate)
    print(f"replay OpenAI server on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
