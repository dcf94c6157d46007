"""Envoy in front of the EPP: bootstrap rendering and a process runner.

:func:`render_bootstrap` turns an :class:`EnvoyOptions` into an Envoy v3 bootstrap
(a plain dict; :func:`bootstrap_yaml` dumps it). ``pdroute up``, the integration
tests and the overhead benchmark all use it; ``envoy-example.yaml`` next to this
file is its output for a two-endpoint pool (regenerate with
``python -m pdroute.stack.envoy > pdroute/stack/envoy-example.yaml``).

What the bootstrap does:

* one HTTP listener with the ``ext_proc`` filter talking to the EPP over HTTP/2
  (optionally TLS without verification: the EPP's certificate is self-signed by
  default), ``request_body_mode: FULL_DUPLEX_STREAMED``, response bodies only
  when asked (``response_body=True``: usage-aware plugins), ``message_timeout``
  set, ``failure_mode_allow`` from the options, and
  ``metadata_options.receiving_namespaces.untyped: [envoy.lb]`` (without it Envoy
  silently drops the EPP's routing metadata). The ``upstream.address`` attribute
  is sent with response headers so the EPP learns which endpoint served.
  Response headers go to the EPP only when ``response_headers`` (``pdroute up``:
  when the EPP config's plugins need the response phase, see
  ``Pipeline.needs_response_phase``); without them each request makes one ext_proc
  round trip instead of two. Headers the EPP decides at routing time (session
  tokens) are added to the response from its ``envoy.lb`` metadata by the route's
  ``response_headers_to_add`` either way.
* Routing is keyed on the ``envoy.lb`` dynamic metadata
  ``x-gateway-destination-endpoint``, never on the request header: the header is
  client-steerable whenever the EPP is bypassed (fail-open).

Two upstream modes:

``pool`` (the default when the pool's members are known, as in ``pdroute up``)
    A STATIC cluster holding exactly the pool members, with Envoy's
    ``envoy.load_balancing_policies.override_host`` policy reading the metadata
    list. The first address is used; a retry (``connect-failure``, ``reset``,
    ``refused-stream``; ``num_retries``) goes to the next address of the ordered
    list, which is how "fallbacks are used when the primary is down" works.
    Addresses that are not pool members are ignored, so nothing outside the
    pool can ever be reached. Without metadata (EPP down and
    ``failure_mode_allow: true``) the fallback policy (least-request over the
    pool) picks a member: fail-open serves traffic, still only to the pool.
    Envoy can fail open in FULL_DUPLEX only before the first body chunk went to
    the EPP, so the EPP cluster is health-checked (gRPC health, 1 s) and ejected
    after one refused connection; with no healthy EPP the stream fails to open at
    once and ``failure_mode_allow`` applies. Requests in flight when the EPP dies,
    and those in the short window before Envoy's workers see it unhealthy, get 500.
    A changed pool needs a re-rendered bootstrap (or EDS; not done here).

``original_dst`` (pool membership unknown to Envoy, e.g. a pool that changes)
    An ``ORIGINAL_DST`` cluster keyed on the same metadata. ORIGINAL_DST reads one
    address, so a small Lua filter copies the list's first entry to
    ``x-gateway-destination-endpoint-primary`` (still metadata, never a header);
    fallbacks are not used, and fail-open is refused: without metadata an
    ORIGINAL_DST cluster would send the request to the listener's own address.

Retries (pool mode) happen only when no response started: ``connect-failure``,
``refused-stream`` and ``reset-before-request``. A 5xx answer from a model server
is returned to the client as is (re-running inference elsewhere is the client's
call, and the sidecar's for P/D legs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdroute.protocol import headers as hdr
from pdroute.stack.procs import spawn_in_group, stop_process_group, tail

DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
ENVOY_LB = "envoy.lb"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

_T = "type.googleapis.com/"
_HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_OVERRIDE_HOST = _T + "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
_LEAST_REQUEST = _T + "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
_LUA = _T + "envoy.extensions.filters.http.lua.v3.Lua"
#: ORIGINAL_DST parses its metadata value as one address, but the EPP sends an ordered
#: list; this filter (after ext_proc, before the router) copies the list's first
#: entry to PRIMARY_KEY for the cluster to use.
PRIMARY_KEY = "x-gateway-destination-endpoint-primary"
_PRIMARY_LUA = f"""
function envoy_on_request(handle)
  local md = handle:streamInfo():dynamicMetadata():get("{ENVOY_LB}")
  if md == nil then return end
  local v = md["{DESTINATION_ENDPOINT}"]
  if v == nil then return end
  local first = string.match(v, "^%s*([^,%s]+)")
  if first ~= nil then
    handle:streamInfo():dynamicMetadata():set("{ENVOY_LB}", "{PRIMARY_KEY}", first)
  end
end
"""

MODE_POOL = "pool"
MODE_ORIGINAL_DST = "original_dst"


class EnvoyConfigError(ValueError):
    """An option combination that cannot work (named in the message)."""


@dataclass
class EnvoyOptions:
    listen_port: int
    admin_port: int
    epp_port: int
    #: Pool members ``ip:port`` (required for ``mode="pool"``).
    pool: list[str] = field(default_factory=list)
    mode: str = MODE_POOL
    listen_host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"
    epp_host: str = "127.0.0.1"
    #: TLS to the EPP (no certificate verification: the EPP's cert is self-signed).
    epp_tls: bool = False
    #: FailOpen (True) or FailClose (False, the InferencePool CRD default).
    failure_mode_allow: bool = False
    #: False renders Envoy alone (no ext_proc: the pool's least-request policy routes);
    #: for overhead baselines.
    epp_enabled: bool = True
    #: gRPC health check of the EPP (0 disables; fail-open depends on it, see _epp_cluster).
    epp_health_interval_s: float = 1.0
    #: Per-message ext_proc timeout (Envoy's default, 200 ms, is too short for queueing).
    message_timeout_s: float = 10.0
    #: Route the response body through the EPP (only when the director needs usage).
    response_body: bool = False
    #: Send response headers to the EPP (status, served endpoint, response headers
    #: such as session tokens). False saves two of seven ext_proc messages per
    #: request; the EPP then sees the response end only when the stream closes.
    response_headers: bool = True
    #: Retries walk the EPP's ordered fallback list (pool mode).
    num_retries: int = 2
    route_timeout_s: float = 300.0
    connect_timeout_s: float = 1.0
    #: Largest request body Envoy buffers for a retry (bytes).
    retry_buffer_bytes: int = 16 * 1024 * 1024


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _split_host_port(hp: str) -> tuple[str, int]:
    host, sep, port = hp.rpartition(":")
    if not sep or not port.isdigit():
        raise EnvoyConfigError(f"pool member {hp!r} is not ip:port")
    return host.strip("[]"), int(port)


def _h2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _HTTP_OPTS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _circuit_breakers() -> dict[str, Any]:
    big = 100_000
    return {
        "thresholds": [
            {
                "max_connections": big,
                "max_pending_requests": big,
                "max_requests": big,
                "max_retries": big,
            }
        ]
    }


def _epp_cluster(o: EnvoyOptions) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STATIC",
        "connect_timeout": _duration(o.connect_timeout_s),
        "typed_extension_protocol_options": _h2_options(),
        "circuit_breakers": _circuit_breakers(),
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _addr(o.epp_host, o.epp_port)}}]}
            ],
        },
    }
    if o.epp_health_interval_s > 0:
        # Fail-open needs the ext_proc stream to fail *before* Envoy streams the body
        # (FULL_DUPLEX can only fail open up to the first chunk). With the EPP
        # marked unhealthy (gRPC health check, or ejected after one refused
        # connection) and no panic routing, opening the stream fails at once, and
        # failure_mode_allow then decides. A NOT_SERVING EPP (not ready) counts too.
        interval = _duration(o.epp_health_interval_s)
        cluster["health_checks"] = [
            {
                "timeout": _duration(max(o.epp_health_interval_s * 0.8, 0.1)),
                "interval": interval,
                "no_traffic_interval": interval,
                # One slow answer from a busy EPP must not eject it (that fails every
                # request closed); a dead EPP is ejected at once by the outlier
                # detection below (connection refused is a local-origin failure).
                "unhealthy_threshold": 3,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
            }
        ]
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0.0}}
        cluster["outlier_detection"] = {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "base_ejection_time": interval,
            "max_ejection_time": interval,
            "max_ejection_percent": 100,
            "interval": interval,
        }
    if o.epp_tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TLS,
                # Empty validation context: encrypt, do not verify (self-signed EPP cert).
                "common_tls_context": {"validation_context": {}, "alpn_protocols": ["h2"]},
            },
        }
    return cluster


def _metadata_key(key: str = DESTINATION_ENDPOINT) -> dict[str, Any]:
    return {"key": ENVOY_LB, "path": [{"key": key}]}


def _pool_cluster(o: EnvoyOptions) -> dict[str, Any]:
    common: dict[str, Any] = {
        "name": "inference_pool",
        "connect_timeout": _duration(o.connect_timeout_s),
        "circuit_breakers": _circuit_breakers(),
    }
    if o.mode == MODE_ORIGINAL_DST:
        common.update(
            {
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {
                    "use_http_header": False,
                    "metadata_key": _metadata_key(PRIMARY_KEY),
                },
            }
        )
        return common
    members = [_split_host_port(m) for m in o.pool]
    common.update(
        {
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "inference_pool",
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _addr(h, p)}} for h, p in members]}
                ],
            },
            "load_balancing_policy": {
                "policies": [
                    {
                        "typed_extension_config": {
                            "name": "envoy.load_balancing_policies.override_host",
                            "typed_config": {
                                "@type": _OVERRIDE_HOST,
                                "override_host_sources": [{"metadata": _metadata_key()}],
                                "fallback_policy": {
                                    "policies": [
                                        {
                                            "typed_extension_config": {
                                                "name": "envoy.load_balancing_policies.least_request",
                                                "typed_config": {"@type": _LEAST_REQUEST},
                                            }
                                        }
                                    ]
                                },
                            },
                        }
                    }
                ]
            },
        }
    )
    return common


def _ext_proc_filter(o: EnvoyOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _EXT_PROC,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "epp"},
                "timeout": _duration(max(o.message_timeout_s, 1.0)),
            },
            "failure_mode_allow": o.failure_mode_allow,
            "message_timeout": _duration(o.message_timeout_s),
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND" if o.response_headers or o.response_body else "SKIP",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "response_body_mode": "FULL_DUPLEX_STREAMED" if o.response_body else "NONE",
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND" if o.response_body else "SKIP",
            },
            "metadata_options": {"receiving_namespaces": {"untyped": [ENVOY_LB]}},
            "response_attributes": ["upstream.address"],
        },
    }


def _primary_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {"@type": _LUA, "default_source_code": {"inline_string": _PRIMARY_LUA}},
    }


def _route(o: EnvoyOptions) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": "inference_pool", "timeout": _duration(o.route_timeout_s)}
    if o.mode == MODE_POOL and o.num_retries > 0:
        route["retry_policy"] = {
            "retry_on": "connect-failure,refused-stream,reset-before-request",
            "num_retries": o.num_retries,
            "per_try_timeout": _duration(o.route_timeout_s),
        }
    return {
        "match": {"prefix": "/"},
        "route": route,
        "request_body_buffer_limit": o.retry_buffer_bytes,
        # Response headers the EPP decided at routing time (session tokens), from its
        # envoy.lb metadata: with response_header_mode SKIP they need no round trip;
        # with SEND the EPP's response-headers answer may still overwrite them.
        "response_headers_to_add": [
            {
                "header": {
                    "key": name,
                    "value": f"%DYNAMIC_METADATA({hdr.ENVOY_LB_NAMESPACE}:{name})%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "keep_empty_value": False,
            }
            for name in hdr.RESPONSE_HEADERS_FROM_METADATA
        ],
    }


def render_bootstrap(o: EnvoyOptions) -> dict[str, Any]:
    """The Envoy bootstrap for ``o`` (raises :class:`EnvoyConfigError` on bad options)."""
    if o.mode not in (MODE_POOL, MODE_ORIGINAL_DST):
        raise EnvoyConfigError(
            f"mode: expected {MODE_POOL!r} or {MODE_ORIGINAL_DST!r}, got {o.mode!r}"
        )
    if o.mode == MODE_POOL and not o.pool:
        raise EnvoyConfigError("pool: mode 'pool' needs the pool members (ip:port list)")
    if o.mode == MODE_ORIGINAL_DST and (o.failure_mode_allow or not o.epp_enabled):
        raise EnvoyConfigError(
            "failure_mode_allow: fail-open needs mode 'pool' (an ORIGINAL_DST cluster without "
            "EPP metadata would route to the listener's own address)"
        )
    if o.message_timeout_s <= 0:
        raise EnvoyConfigError("message_timeout_s must be > 0")
    hcm = {
        "@type": _HCM,
        "stat_prefix": "inference",
        "codec_type": "AUTO",
        "route_config": {
            "name": "inference",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": [_route(o)]}],
        },
        "http_filters": [
            *([_ext_proc_filter(o)] if o.epp_enabled else []),
            *([_primary_filter()] if o.mode == MODE_ORIGINAL_DST else []),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    clusters = [_pool_cluster(o)]
    if o.epp_enabled:
        clusters.insert(0, _epp_cluster(o))
    return {
        "admin": {"address": _addr(o.admin_host, o.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "inference",
                    "address": _addr(o.listen_host, o.listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def bootstrap_yaml(o: EnvoyOptions) -> str:
    return yaml.safe_dump(render_bootstrap(o), sort_keys=False)


def find_envoy() -> str | None:
    """The Envoy binary: ``$PDROUTE_ENVOY``, the bootstrap's cache, or ``envoy`` on PATH."""
    path = os.environ.get("PDROUTE_ENVOY")
    if path:
        return path
    cache = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))
    cands = sorted(cache.glob("envoy-*/bin/envoy-binary"))
    if cands:
        return str(cands[-1])
    return shutil.which("envoy")


def envoy_argv(
    binary: str, config_path: str, *, concurrency: int = 1, log_level: str = "warning"
) -> list[str]:
    """Command line for one Envoy: no hot restart (several Envoys share this host)."""
    return [
        binary,
        "-c",
        config_path,
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
        "-l",
        log_level,
    ]


class EnvoyProcess:
    """Runs one Envoy with a rendered bootstrap; ``start`` returns when it is ready.

    Usable as a context manager. Output goes to ``<workdir>/envoy.log``; on a failed
    start the log's tail is in the exception.
    """

    def __init__(
        self,
        options: EnvoyOptions,
        *,
        binary: str | None = None,
        workdir: str | Path | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
        wrapper: list[str] | None = None,
    ) -> None:
        self.options = options
        #: Command prefix for the Envoy process (e.g. ``valgrind ...`` in benchmarks).
        self.wrapper = list(wrapper or ())
        found = binary or find_envoy()
        if not found:
            raise FileNotFoundError("Envoy not found: run scripts/bootstrap or set $PDROUTE_ENVOY")
        self.binary = found
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pdroute-envoy-"))
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "envoy.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def url(self) -> str:
        return f"http://{self.options.listen_host}:{self.options.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.options.admin_host}:{self.options.admin_port}"

    def render(self) -> str:
        """The bootstrap written at start (the options' one; benchmarks override)."""
        return bootstrap_yaml(self.options)

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render())
        argv = envoy_argv(
            self.binary,
            str(self.config_path),
            concurrency=self.concurrency,
            log_level=self.log_level,
        )
        self.proc = spawn_in_group([*self.wrapper, *argv], self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"envoy not ready after {timeout_s}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counter/gauge values from the admin ``/stats`` (name -> value)."""
        url = self.admin_url + "/stats" + (f"?filter={prefix}" if prefix else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def host_health(self, cluster: str) -> dict[str, str]:
        """``ip:port`` -> health flags (``healthy``, ``/failed_active_hc``, ...) from admin."""
        with urllib.request.urlopen(self.admin_url + "/clusters", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, str] = {}
        prefix = cluster + "::"
        for line in text.splitlines():
            if line.startswith(prefix) and "::health_flags::" in line:
                host, _, flags = line[len(prefix) :].partition("::health_flags::")
                out[host] = flags
        return out

    def wait_epp_health(self, healthy: bool, timeout_s: float = 10.0) -> None:
        """Block until Envoy sees the EPP as healthy (or not): health checks take an
        interval to notice a change."""
        deadline = time.monotonic() + timeout_s
        while True:
            flags = self.host_health("epp")
            now = bool(flags) and all(f == "healthy" for f in flags.values())
            if now == healthy:
                # The main thread saw it; give the worker threads a moment to get the
                # updated host set (cluster updates are posted to them asynchronously).
                time.sleep(0.2)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"EPP health in Envoy is {flags}, wanted healthy={healthy}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        stop_process_group(proc, timeout_s)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def example_options() -> EnvoyOptions:
    return EnvoyOptions(
        listen_port=8081,
        admin_port=19000,
        epp_port=9002,
        pool=["127.0.0.1:8000", "127.0.0.1:8001"],
        epp_tls=True,
        failure_mode_allow=False,
    )


if __name__ == "__main__":  # pragma: no cover - regenerates envoy-example.yaml
    sys.stdout.write(
        "# Generated by `python -m pdroute.stack.envoy` (pdroute.stack.envoy.render_bootstrap).\n"
        "# Envoy in front of a pdroute EPP on 127.0.0.1:9002 (TLS, fail-closed) and a\n"
        "# two-endpoint pool; see the module docstring for the routing design.\n"
    )
    sys.stdout.write(bootstrap_yaml(example_options()))
