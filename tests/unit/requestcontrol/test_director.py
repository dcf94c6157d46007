"""The Director: body parsing errors, admission, subset hints, decisions and hooks."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from types import MappingProxyType

import orjson
import pytest

from epp.config import PD_EXAMPLE_PATH, ConfigError
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.errors import BadRequest, NoReadyEndpoint, Shed
from epp.requestcontrol import (
    EppDirector,
    IncomingRequest,
    ResponseInfo,
    build_director,
    detect_api,
    parse_body,
)

NOW = 50.0
HEAD_TEXT = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def store(
    n: int = 3, *, roles: list[str | None] | None = None, waiting: int = 0, kv: float = 0.0
) -> Datastore:
    ds = Datastore(clock=lambda: NOW)
    eps = []
    for i in range(n):
        role = roles[i] if roles else None
        labels = MappingProxyType({} if role is None else {"llm-d.ai/role": role})
        eps.append(Endpoint(f"pod{i}", f"10.1.0.{i}", 8000, labels=labels))
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(
            e.key, EndpointMetrics(waiting=waiting, kv_cache_usage=kv, updated_at=NOW)
        )
    return ds


def chat(content: str = "hello", model: str = "m", **extra: object) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    )


def req(
    body: bytes, path: str = "/v1/chat/completions", hint: list[str] | None = None, **headers: str
) -> IncomingRequest:
    h = {":path": path, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return IncomingRequest(headers=h, body=body, subset_hint=hint, request_id="rid-1")


def director(ds: Datastore, **kw: object) -> EppDirector:
    return build_director(ds, rng=random.Random(7), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (b"", "/v1/completions", "request body is empty"),
        (b"{not json", "/v1/completions", "not valid JSON"),
        (b"[1, 2]", "/v1/completions", "must be a JSON object"),
        (b'{"prompt": "x"}', "/v1/completions", "non-empty string 'model'"),
        (b'{"model": 5, "prompt": "x"}', "/v1/completions", "non-empty string 'model'"),
        (b'{"model": "m"}', "/v1/chat/completions", "'messages' must be a non-empty list"),
        (b'{"model": "m", "prompt": {"a": 1}}', "/v1/completions", "'prompt' must be a string"),
        (b'{"model": "m", "input": 3}', "/v1/embeddings", "'input' must be a string"),
        (b'{"model": "m", "instructions": 1}', "/v1/responses", "'instructions' must be a string"),
        (
            b'{"model": "m", "prompt": "x", "cache_salt": 1}',
            "/v1/completions",
            "'cache_salt' must be a string",
        ),
    ],
)
async def test_bad_bodies_are_400(body: bytes, path: str, message: str) -> None:
    d = director(store())
    with pytest.raises(BadRequest, match=message) as ei:
        await d.route(req(body, path))
    assert ei.value.status == 400


async def test_bad_priority_header_is_400() -> None:
    with pytest.raises(BadRequest, match="x-gateway-inference-priority must be an integer"):
        await director(store()).route(req(chat(), x_gateway_inference_priority="high"))


def test_api_detection_cache_is_bounded_and_exact() -> None:
    from epp.requestcontrol import parse

    for i in range(3 * parse._API_CACHE_MAX):
        suffix = ("/v1/chat/completions", "/v1/embeddings", "/v1/x")[i % 3]
        expected = ("chat/completions", "embeddings", "completions")[i % 3]
        path = f"{suffix}?n={i}"
        assert detect_api(path) == expected
        assert detect_api(path) == expected  # cached answer
        assert len(parse._API_BY_PATH) <= parse._API_CACHE_MAX


def test_api_detection_and_prompt_extraction() -> None:
    assert detect_api("/v1/chat/completions?x=1") == "chat/completions"
    assert detect_api("/v1/completions") == "completions"
    assert detect_api("/v1/responses") == "responses"
    assert detect_api("/v1/embeddings/") == "embeddings"
    assert detect_api("/v1/unknown") == "completions"
    p = parse_body(chat("hi"), "/v1/chat/completions")
    assert p.api == "chat/completions" and p.prompt == '[{"role":"user","content":"hi"}]'
    assert parse_body(b'{"model":"m","prompt":["a","b"]}', "/v1/completions").prompt == "a\nb"
    tok = parse_body(b'{"model":"m","prompt":[1,2,3]}', "/v1/completions")
    assert tok.prompt_tokens == 3
    r = parse_body(b'{"model":"m","instructions":"be brief","input":"q"}', "/v1/responses")
    assert r.prompt == "be brief\nq"
    r2 = parse_body(b'{"model":"m","input":[{"role":"user","content":"q"}]}', "/v1/responses")
    assert r2.prompt == '[{"role":"user","content":"q"}]'
    e = parse_body(b'{"model":"m","input":"text","cache_salt":"s"}', "/v1/embeddings")
    assert (e.api, e.prompt, e.cache_salt) == ("embeddings", "text", "s")


async def test_empty_pool_and_empty_subset_are_503() -> None:
    empty = Datastore(clock=lambda: NOW)
    empty.replace_endpoints([])
    with pytest.raises(NoReadyEndpoint, match="no ready endpoint in the pool") as ei:
        await director(empty).route(req(chat()))
    assert ei.value.status == 503
    with pytest.raises(NoReadyEndpoint, match="subset hint"):
        await director(store()).route(req(chat(), hint=["10.9.9.9:8000"]))
    with pytest.raises(NoReadyEndpoint, match="subset hint"):  # empty list: nothing eligible
        await director(store()).route(req(chat(), hint=[]))
    with pytest.raises(NoReadyEndpoint):
        director(empty).route_bodyless(req(b""))


async def test_subset_hint_restricts_the_choice() -> None:
    d = director(store(4))
    for _ in range(10):
        dec = await d.route(req(chat("q" * 300), hint=["10.1.0.2:8000", "10.1.0.3:8000"]))
        assert dec.endpoints[0] in ("10.1.0.2:8000", "10.1.0.3:8000")
        dec.finish(ResponseInfo(status=200))


async def test_sheddable_requests_get_429_only_when_saturated() -> None:
    saturated = director(store(2, waiting=10))  # 10/5 = 2.0 >= 1
    with pytest.raises(Shed, match=r"saturated \(2.00 >= 1.0\)") as ei:
        await saturated.route(req(chat(), x_gateway_inference_priority="-1"))
    assert ei.value.status == 429
    # Priority 0 is never shed; a calm pool admits sheddable requests.
    assert (await saturated.route(req(chat()))).endpoints
    calm = director(store(2, waiting=1, kv=0.1))
    assert (await calm.route(req(chat(), x_gateway_inference_priority="-1"))).endpoints


async def test_stale_metrics_count_as_saturated_for_admission() -> None:
    ds = store(2)
    for e in ds.endpoints():
        ds.update_metrics(e.key, EndpointMetrics(updated_at=NOW - 60))  # stale
    with pytest.raises(Shed):
        await director(ds).route(req(chat(), x_gateway_inference_priority="-5"))
    assert (await director(ds).route(req(chat()))).endpoints  # still routable


async def test_pd_decision_sets_prefiller_header() -> None:
    ds = store(4, roles=["decode", "decode", "prefill", "prefill"])
    d = director(ds, config_path=str(PD_EXAMPLE_PATH))
    short = await d.route(req(chat("hi")))
    assert short.endpoints[0] in ("10.1.0.0:8000", "10.1.0.1:8000")
    assert short.set_headers == {}
    long = await d.route(req(chat("long " * 200)))
    assert long.endpoints[0] in ("10.1.0.0:8000", "10.1.0.1:8000")
    assert long.set_headers["x-prefiller-host-port"] in ("10.1.0.2:8000", "10.1.0.3:8000")
    assert long.prefill_endpoint == long.set_headers["x-prefiller-host-port"]
    assert long.body is None and long.model == "m"


async def test_inflight_is_released_once_and_served_endpoint_learns() -> None:
    ds = store(3)
    d = director(ds)
    dec = await d.route(req(chat("shared prefix " * 50)))
    primary = dec.endpoints[0]
    assert d.inflight(primary) == 1
    other = next(e.key for e in ds.endpoints() if e.key != primary)
    dec.finish(ResponseInfo(status=200, served_endpoint=other))
    dec.finish(ResponseInfo(status=200, served_endpoint=other))  # idempotent
    assert d.inflight(primary) == 0
    index = d.pipeline.plugins["prefix-cache-scorer"].producer.index  # type: ignore[attr-defined]
    assert sorted(index.endpoints()) == sorted([primary, other])


async def test_session_token_round_trip() -> None:
    text = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: session-affinity-scorer\n- type: queue-scorer\n"
        "schedulingProfiles:\n- name: d\n  plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]\n"
    )
    ds = store(3)
    d = director(ds, config_text=text)
    first = await d.route(req(chat()))
    token = first.response_headers(ResponseInfo(status=200))["x-session-token"]
    assert base64.b64decode(token).decode() == first.endpoints[0]
    # Known at routing time too: the handler puts it in the envoy.lb metadata, from
    # which the gateway adds it when response headers do not reach the EPP.
    assert first.routing_metadata == {"x-session-token": token}
    assert d.needs_response_phase is False  # session tokens do not need it
    # Make the bound endpoint the busiest: affinity (10) still beats queue (1).
    for e in ds.endpoints():
        ds.update_metrics(
            e.key, EndpointMetrics(waiting=9 if e.key == first.endpoints[0] else 0, updated_at=NOW)
        )
    again = await d.route(req(chat(), x_session_token=token))
    assert again.endpoints[0] == first.endpoints[0]
    # The token names the endpoint that served, the first when the proxy lists several.
    other = next(e.key for e in ds.endpoints() if e.key != again.endpoints[0])
    info = ResponseInfo(status=200, served_endpoint=f" {other} , {again.endpoints[0]}")
    assert base64.b64decode(again.response_headers(info)["x-session-token"]).decode() == other


async def test_bodyless_routes_to_a_random_ready_endpoint() -> None:
    d = director(store(3))
    seen = set()
    for _ in range(30):
        dec = d.route_bodyless(req(b"", "/v1/models"))
        seen.add(dec.endpoints[0])
        assert dec.response_headers(ResponseInfo()) == {}
        dec.finish(ResponseInfo(status=200))
    assert seen == {"10.1.0.0:8000", "10.1.0.1:8000", "10.1.0.2:8000"}
    assert d.inflight("10.1.0.0:8000") == 0


def test_build_director_configs(tmp_path: Path) -> None:
    ds = store()
    d = build_director(ds)
    assert d.config.profile_handler == "single-profile-handler"
    assert d.needs_response_body is False
    assert d.needs_response_phase is False  # the default plugins route without it
    inflight = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: active-request-scorer\n"
        "schedulingProfiles:\n- name: d\n  plugins: [{pluginRef: active-request-scorer}]\n"
    )
    # In-flight counts end with the response: that needs the response phase.
    assert build_director(ds, config_text=inflight).needs_response_phase is True
    assert [p.type for p in d.data_layer_plugins] == [
        "metrics-data-source",
        "core-metrics-extractor",
    ]
    assert d.ready()
    assert not build_director(Datastore()).ready()  # no endpoint set delivered yet
    p = tmp_path / "c.yaml"
    p.write_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: random-picker}]\n"
        "engineConfigs: [{name: vllm}]\n"
    )
    d2 = build_director(ds, config_path=str(p))
    assert d2.config.engine_configs == ({"name": "vllm"},)
    with pytest.raises(ConfigError, match=r"c2.yaml: plugins\[0\].parameters.threshold"):
        bad = tmp_path / "c2.yaml"
        bad.write_text(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
            "plugins: [{type: load-aware-scorer, parameters: {threshold: -1}}]\n"
        )
        build_director(ds, config_path=str(bad))
    # engineConfigs specs are checked at start-up too, naming the file and key.
    bad3 = tmp_path / "c3.yaml"
    bad3.write_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        "engineConfigs: [{name: vllm, queuedRequestsSpec: 'q{a=~b}'}]\n"
    )
    with pytest.raises(
        ConfigError, match=r"c3.yaml: engineConfigs\[0\]\.queuedRequestsSpec: bad label matcher"
    ):
        build_director(ds, config_path=str(bad3))
    with pytest.raises(
        ConfigError, match=r"<config-text>: engineConfigs\[0\]\.kvSpec: unknown key"
    ):
        build_director(ds, config_text=HEAD_TEXT + "engineConfigs: [{name: x, kvSpec: k}]\n")
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.schem: unknown parameter"):
        build_director(
            ds,
            config_text=HEAD_TEXT
            + "plugins: [{type: metrics-data-source, parameters: {schem: x}}]\n",
        )
    assert build_director(ds).scrape_options.path == "/metrics"
    with pytest.raises(ValueError, match="not both"):
        build_director(ds, config_path="a", config_text="b")


async def test_plugin_exceptions_never_crash_routing(caplog: pytest.LogCaptureFixture) -> None:
    d = director(store(2))
    hook = d.pipeline.pre_request[0]

    def boom(*_a: object) -> None:
        raise RuntimeError("boom")

    hook.pre_request = boom  # type: ignore[method-assign]
    dec = await d.route(req(chat()))
    assert dec.endpoints
    assert "pre-request hook" in caplog.text
    d.pipeline.scheduler.handler.pick = boom  # type: ignore[method-assign]
    from epp.errors import Internal

    with pytest.raises(Internal, match="scheduling failed: RuntimeError"):
        await d.route(req(chat()))


class _Prep:
    """A fake async PrepareData hook (a neighbour of the director)."""

    name = "prep"

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.started = 0
        self.stopped = 0

    async def prepare_data(self, cycle: object, request: object, endpoints: object) -> None:
        import asyncio

        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("tokenizer down")
        request.prompt_tokens = 1234  # type: ignore[attr-defined]

    def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1


async def test_prepare_data_runs_before_scheduling_and_is_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = build_director(store(2), rng=random.Random(1), prepare_timeout_s=0.05)
    ok = _Prep()
    d.pipeline.prepare_data.append(ok)  # type: ignore[arg-type]
    dec = await d.route(req(chat()))
    assert dec.request is not None and dec.request.prompt_tokens == 1234
    # A failing or slow hook never fails the request; the data is just missing.
    d.pipeline.prepare_data[:] = [_Prep(fail=True)]  # type: ignore[list-item]
    dec = await d.route(req(chat()))
    assert dec.endpoints and dec.request is not None and dec.request.prompt_tokens is None
    assert "tokenizer down" in caplog.text
    d.pipeline.prepare_data[:] = [_Prep(delay=5.0)]  # type: ignore[list-item]
    dec = await d.route(req(chat()))
    assert dec.endpoints and "timed out" in caplog.text


async def test_several_prepare_hooks_all_run_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = build_director(store(2), rng=random.Random(1), prepare_timeout_s=1.0)
    ok, bad = _Prep(delay=0.01), _Prep(fail=True)
    d.pipeline.prepare_data[:] = [bad, ok]  # type: ignore[list-item]
    dec = await d.route(req(chat()))
    assert dec.request is not None and dec.request.prompt_tokens == 1234
    assert "tokenizer down" in caplog.text


async def test_cancelling_a_request_during_prepare_cancels_it() -> None:
    import asyncio

    d = build_director(store(2), rng=random.Random(1), prepare_timeout_s=5.0)
    d.pipeline.prepare_data[:] = [_Prep(delay=5.0)]  # type: ignore[list-item]
    task = asyncio.create_task(d.route(req(chat())))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_start_and_aclose_reach_plugins_with_lifecycle() -> None:
    d = build_director(store(2), rng=random.Random(1))
    p = _Prep()
    d.pipeline.plugins["prep"] = p  # type: ignore[assignment]
    d.start()
    await d.aclose()
    assert (p.started, p.stopped) == (1, 1)
