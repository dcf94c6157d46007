"""``pdroute bbr``: run the body-based routing ext_proc server.

Put it in Envoy's filter chain before the pools' EPP filters (request body mode
``FULL_DUPLEX_STREAMED`` or ``BUFFERED``, response modes ``SKIP``/``NONE``); route
rules then match the ``x-gateway-model-name`` header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from epp.bbr.server import DEFAULT_MAX_BODY_BYTES, MODEL_HEADER, BbrServer, BodyRouter

_MODES = {"full-duplex": "FULL_DUPLEX_STREAMED", "buffered": "BUFFERED"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, default=9004, help="ext_proc + gRPC health port (default 9004)"
    )
    parser.add_argument(
        "--header-name", default=MODEL_HEADER, help=f"header to set (default {MODEL_HEADER})"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get 413 (default 16 MiB)",
    )
    parser.add_argument(
        "--default-body-mode",
        choices=sorted(_MODES),
        default="full-duplex",
        help="body mode assumed when Envoy does not announce one (protocol_config)",
    )
    parser.add_argument(
        "--secure-serving",
        action="store_true",
        help="serve TLS (self-signed unless --cert-path is given)",
    )
    parser.add_argument(
        "--cert-path", type=Path, default=None, help="directory with tls.crt and tls.key (reloaded)"
    )
    parser.add_argument("--grace-s", type=float, default=5.0, help="graceful shutdown period")
    parser.add_argument("--log-level", default="info")


def _mode(name: str) -> int:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    return int(processing_mode_pb2.ProcessingMode.BodySendMode.Value(_MODES[name]))


async def _main(args: argparse.Namespace) -> int:
    creds = None
    if args.secure_serving or args.cert_path is not None:
        from epp.server.tls import server_credentials

        try:
            creds = server_credentials(args.cert_path)()  # a factory: one per bound port
        except (OSError, ValueError) as exc:
            logging.getLogger(__name__).error("TLS: %s", exc)
            return 2
    router = BodyRouter(
        header_name=args.header_name,
        max_body_bytes=args.max_body_bytes,
        default_mode=_mode(args.default_body_mode),
    )
    server = BbrServer(router, host=args.host, port=args.port, credentials=creds)
    try:
        await server.start()
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        logging.getLogger(__name__).error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(args.grace_s)
    return 0


def run(args: argparse.Namespace) -> int:
    level = logging.getLevelName(str(args.log_level).upper())
    if not isinstance(level, int):
        print(f"pdroute bbr: --log-level: unknown level {args.log_level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_body_bytes <= 0:
        logging.getLogger(__name__).error("--max-body-bytes must be > 0")
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(_main(args))
    return uvloop.run(_main(args))
