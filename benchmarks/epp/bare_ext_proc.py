"""The cheapest useful ext_proc server: a reference point for the EPP's own cost.

Round-robin over the pool, same protocol as the EPP (headers held until the body
is complete, ``x-gateway-destination-endpoint`` header + ``envoy.lb`` metadata, the
body re-sent as one streamed chunk, an empty answer to response headers), grpc.aio
on uvloop, no parsing, no scheduling, no metrics. ``envoy_overhead.py --with-bare``
runs it next to ``pdroute epp`` so the EPP's cost can be quoted as a ratio to this
floor, which holds up better than absolute numbers on a busy machine.

    python benchmarks/epp/bare_ext_proc.py PORT IP:PORT[,IP:PORT...]
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

_OW = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class Bare(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, pool: list[str]) -> None:
        self._rr = itertools.cycle(pool)

    async def Process(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        body: list[bytes] = []
        while True:
            m = await context.read()
            if m is _EOF:
                return
            kind = m.WhichOneof("request")
            if kind == "request_body":
                body.append(m.request_body.body)
                if m.request_body.end_of_stream:
                    ep = next(self._rr)
                    hv = {"key": "x-gateway-destination-endpoint", "raw_value": ep.encode()}
                    r = pb.ProcessingResponse(
                        request_headers={
                            "response": {
                                "header_mutation": {
                                    "set_headers": [{"header": hv, "append_action": _OW}]
                                },
                                "clear_route_cache": True,
                            }
                        }
                    )
                    r.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
                        "x-gateway-destination-endpoint"
                    ].string_value = ep
                    await context.write(r)
                    stream = {"body": b"".join(body), "end_of_stream": True}
                    await context.write(
                        pb.ProcessingResponse(
                            request_body={
                                "response": {"body_mutation": {"streamed_response": stream}}
                            }
                        )
                    )
            elif kind == "response_headers":
                await context.write(pb.ProcessingResponse(response_headers={}))


async def main(port: int, pool: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Bare(pool), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for svc in ("", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health.set(svc, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2].split(",")))
