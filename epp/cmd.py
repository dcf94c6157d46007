"""``pdroute epp``: wire the datastore, endpoint source, scraper, director and servers.

Flags follow the GIE/llm-d EPP (``--grpc-port``, ``--grpc-health-port``,
``--metrics-port``, ``--config-file``/``--config-text``, ``--refresh-metrics-interval``,
``--metrics-staleness-threshold``, ``--secure-serving``, ``--cert-path``,
``--disable-endpoint-subset-filter``, ``-v``) plus ``--endpoints FILE`` for a static
pool (no Kubernetes) and ``--max-request-body-bytes``. Durations accept Go-style
strings (``50ms``, ``2s``, ``1m``) or plain seconds.

Start-up order: configuration and the endpoint file are validated before any port
is bound (errors name the flag, file and key; exit status 2), then the servers
start NOT_SERVING and turn ready when the endpoint source delivered its first set.
SIGTERM/SIGINT: health turns NOT_SERVING, in-flight streams get
``--drain-timeout`` to finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("epp")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """``50ms``, ``2s``, ``1.5``, ``1m`` -> seconds (argparse type)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 50ms, 2s, 1m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from epp.handlers import DEFAULT_MAX_REQUEST_BODY_BYTES

    p = parser
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (9002)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (9003)")
    p.add_argument(
        "--ext-proc-transport",
        choices=("h2", "grpcio"),
        default="h2",
        help="gRPC server: h2 = pdroute's own HTTP/2 server on the event loop (default, "
        "several times cheaper per request), grpcio = grpc.aio",
    )
    p.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (9090; -1 off)"
    )
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--config-file", help="EndpointPickerConfig YAML file")
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML as a string")
    p.add_argument(
        "--endpoints",
        "--endpoints-file",
        dest="endpoints",
        metavar="FILE",
        help="static endpoint file (YAML, reloaded on change; see epp/datalayer/README.md)",
    )
    p.add_argument(
        "--endpoints-poll-interval",
        type=duration,
        default=1.0,
        metavar="DURATION",
        help="how often the endpoint file is checked for changes (1s)",
    )
    p.add_argument(
        "--refresh-metrics-interval",
        type=duration,
        default=0.1,
        metavar="DURATION",
        help="model-server metrics scrape interval (100ms)",
    )
    p.add_argument(
        "--metrics-scrape-timeout",
        type=duration,
        default=1.0,
        metavar="DURATION",
        help="timeout of one metrics scrape (1s)",
    )
    p.add_argument(
        "--metrics-staleness-threshold",
        type=duration,
        default=2.0,
        metavar="DURATION",
        help="metrics older than this count as stale (2s)",
    )
    p.add_argument(
        "--secure-serving",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve ext_proc and health over TLS (default on; self-signed unless --cert-path)",
    )
    p.add_argument(
        "--cert-path",
        type=Path,
        metavar="DIR",
        help="directory with tls.crt and tls.key (reloaded when they change)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        metavar="BYTES",
        help=f"request bodies above this get 413 ({DEFAULT_MAX_REQUEST_BODY_BYTES})",
    )
    p.add_argument(
        "--disable-endpoint-subset-filter",
        action="store_true",
        help="ignore the proxy's envoy.lb.subset_hint",
    )
    p.add_argument(
        "--drain-timeout",
        type=duration,
        default=30.0,
        metavar="DURATION",
        help="on SIGTERM, how long in-flight streams may finish (30s)",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    try:
        from epp.datalayer.kube_source import add_kube_arguments
    except ImportError:  # pragma: no cover - kube support not installed
        return
    add_kube_arguments(p)


class StartupError(Exception):
    """A configuration problem found before serving (printed, exit status 2)."""


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if verbosity <= 0:
        logging.getLogger("epp").setLevel(logging.INFO)


def _build(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can fail on bad configuration, before any port is bound
    (cheap checks first: the endpoint source, then the scheduling config)."""
    from epp.config import ConfigError
    from epp.datalayer.scraper import MetricsScraper
    from epp.datalayer.static_file import EndpointFileError, StaticFileSource
    from epp.datastore import Datastore
    from epp.handlers import StreamHandler
    from epp.requestcontrol import build_director

    if args.cert_path is not None:
        if not args.secure_serving:
            raise StartupError("--cert-path needs --secure-serving")
        missing = [f for f in ("tls.crt", "tls.key") if not (args.cert_path / f).is_file()]
        if missing:
            raise StartupError(f"--cert-path {args.cert_path}: missing {', '.join(missing)}")
    source: Any = None
    if args.endpoints:
        source = StaticFileSource(args.endpoints, poll_interval_s=args.endpoints_poll_interval)
        try:
            source.load()
        except EndpointFileError as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"--endpoints: {e}") from None
    try:
        from epp.datalayer.kube_source import build_kube_source

        kube = build_kube_source(args)
    except ImportError:  # pragma: no cover
        kube = None
    except ValueError as e:
        raise StartupError(str(e)) from None
    if kube is not None:
        if source is not None:
            raise StartupError("--endpoints and Kubernetes discovery flags are mutually exclusive")
        source = kube
    if source is None:
        raise StartupError(
            "no endpoint source: pass --endpoints FILE, or --pool-name / "
            "--endpoint-selector with --endpoint-target-ports (Kubernetes)"
        )
    datastore = Datastore(staleness_s=args.metrics_staleness_threshold)
    try:
        director = build_director(
            datastore, config_path=args.config_file, config_text=args.config_text
        )
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"--config-file: {e}") from None

    # The config's data-layer settings (scheme, path, engineConfigs, ...) were checked
    # when the director was built; config mistakes already failed above, naming the key.
    scraper = MetricsScraper(
        datastore,
        interval_s=args.refresh_metrics_interval,
        timeout_s=args.metrics_scrape_timeout,
        **director.scrape_options.scraper_kwargs(),
    )
    if director.needs_response_body:
        log.info(
            "the scheduling config needs response bodies (usage): configure Envoy's ext_proc "
            "response_body_mode FULL_DUPLEX_STREAMED (pdroute.stack.envoy: "
            "EnvoyOptions(response_body=True)); without it token usage is not reported"
        )
    handler = StreamHandler(
        director,
        max_request_body_bytes=args.max_request_body_bytes,
        honor_subset_hint=not args.disable_endpoint_subset_filter,
    )
    return {
        "datastore": datastore,
        "director": director,
        "source": source,
        "scraper": scraper,
        "handler": handler,
    }


async def serve(args: argparse.Namespace, parts: dict[str, Any]) -> int:
    from epp.server import EppServer, ServerOptions
    from epp.server.observability import PoolGauges

    director = parts["director"]
    source = parts["source"]
    datastore = parts["datastore"]

    def ready() -> bool:
        return bool(director.ready() and source.ready())

    try:
        server = EppServer(
            parts["handler"],
            ready,
            ServerOptions(
                host=args.host,
                grpc_port=args.grpc_port,
                health_port=args.grpc_health_port,
                metrics_port=args.metrics_port,
                transport=args.ext_proc_transport,
                secure_serving=args.secure_serving,
                cert_path=args.cert_path,
                max_receive_bytes=args.max_request_body_bytes + (1 << 20),
                grace_s=args.drain_timeout,
                drain_notice_s=min(1.0, args.drain_timeout / 2),
            ),
            gauges=PoolGauges(datastore),
        )
    except ValueError as e:
        raise StartupError(str(e)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    start_plugins = getattr(director, "start", None)
    if callable(start_plugins):
        start_plugins()  # plugins' background work, e.g. KV-event subscriptions
    tasks = [
        asyncio.create_task(source.run(datastore), name="endpoint-source"),
        asyncio.create_task(parts["scraper"].run(), name="metrics-scraper"),
    ]
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    code = 0
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper:
                exc = t.exception()
                log.error("%s stopped: %r; shutting down", t.get_name(), exc)
                code = 1
        log.info("shutting down (drain %.1fs)", args.drain_timeout)
    finally:
        await server.stop()
        close_plugins = getattr(director, "aclose", None)
        if close_plugins is not None:
            with contextlib.suppress(Exception):
                await close_plugins()
        for t in [*tasks, stopper]:
            t.cancel()
        for t in [*tasks, stopper]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return code


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    try:
        parts = _build(args)
    except StartupError as e:
        print(f"pdroute epp: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        return int(runner(serve(args, parts)))
    except StartupError as e:
        print(f"pdroute epp: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use
        print(f"pdroute epp: {e}", file=sys.stderr)
        return 2
