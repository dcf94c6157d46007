"""The gRPC ``envoy.service.ext_proc.v3.ExternalProcessor`` service.

``Process`` is a bidirectional stream; each stream is served by
:meth:`epp.handlers.StreamHandler.run` using grpc.aio's ``read``/``write`` API
(not the async-iterator API), so a cancelled stream (client gone, Envoy reset)
raises ``CancelledError`` inside the handler where ``finally`` releases the
request's state at once. Streams are independent tasks: an exception in one is
contained by the handler and never reaches another.
"""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.handlers import StreamHandler

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_PATH = f"/{SERVICE_NAME}/Process"
parse_request = pb.ProcessingRequest.FromString


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, handler: StreamHandler) -> None:
        self._handler = handler

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        await self._handler.run(context.read, context.write, _EOF)


def add_to_server(handler: StreamHandler, server: grpc.aio.Server) -> None:
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(handler), server)
