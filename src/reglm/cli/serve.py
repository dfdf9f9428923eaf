"""``reglm serve``: a trained model as an HTTP/JSON service (the ``serve`` extra).

The model is loaded, the address bound, and one line ``reglm: serving RUN on http://HOST:PORT``
printed on standard error once requests are accepted (``--port 0`` picks a free port; the line
says which). SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish
(at most ``--drain-seconds``), then exits with status 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import Any

from reglm.cli.common import handling_signals
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve a trained model over HTTP/JSON: /score, /next, /health, /model (docs at /docs)"
    )
    p.add_argument("run", help="run directory (or a model directory)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB); larger: 413"
    )
    p.add_argument(
        "--max-sentences", type=int, default=1000, help="most sentences per /score request (default: 1000); more: 413"
    )
    p.add_argument(
        "--max-words", type=int, default=500, help="most words per sentence or prefix (default: 500); more: 413"
    )
    p.add_argument(
        "--max-k", type=int, default=1000, help="most next words per /next request (default: 1000); more: 422"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a request waits for others to share its model call (default: 2)",
    )
    p.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="most words per shared model call (default: 8192)"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long requests in flight may take to finish (default: 30)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request on standard error")
    p.set_defaults(func=cmd_serve)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a ReglmError naming the address when that fails."""
    if not 0 <= port < 65536:
        raise ReglmError(f"--port {port} must be in [0, 65535]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ReglmError(
            f"--host {host!r} is not an address of this machine ({exc.strerror}); use e.g. 127.0.0.1"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ReglmError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port (0 picks a free one)"
        ) from None
    sock.listen(2048)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from reglm.serve.app import Batching, Limits, create_app
    except ImportError as exc:
        raise ReglmError(
            f"reglm serve needs the serve extra ({exc.name} is missing): pip install 'reglm[serve]'"
        ) from None
    from reglm.api import load
    from reglm.devices import resolve_device

    limits = Limits(args.max_body_bytes, args.max_sentences, args.max_words, args.max_k)
    batching = Batching(args.max_wait_ms, args.max_batch_tokens)
    if args.drain_seconds < 0:
        raise ReglmError(f"--drain-seconds {args.drain_seconds} must be >= 0")
    sock = _bind(args.host, args.port)
    try:
        lm = load(args.run, args.checkpoint, resolve_device(args.device))
    except BaseException:
        sock.close()
        raise
    app = create_app(lm, str(args.run), limits, batching)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(
        app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=args.drain_seconds
    )
    print(f"reglm: serving {args.run} on http://{shown}:{port} (API docs at /docs)", file=sys.stderr, flush=True)
    stops: list[int] = []
    # uvicorn handles SIGINT/SIGTERM while it runs (stop accepting, drain), then raises the signal
    # again for the handler it found: this one notes it, so that a requested stop exits with 0
    server = uvicorn.Server(config)
    with handling_signals(lambda signum, _frame: stops.append(signum)):
        server.run(sockets=[sock])
    if not server.started and not stops:
        raise ReglmError("the service did not start; the lines above say why")
    reason = f" on {signal.Signals(stops[0]).name}, requests in flight answered" if stops else ""
    print(f"reglm: stopped{reason}", file=sys.stderr, flush=True)
    return 0
