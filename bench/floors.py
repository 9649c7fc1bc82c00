"""The floors the serving benchmark compares against: servers that do no inference at all.

``python -m bench.floors asgi PORT``: a bare ASGI app under the same uvicorn stack as capsa-serve (uvloop,
httptools, no access log) that reads the request body and answers a fixed JSON document: the HTTP limit of one
Python process.
``python -m bench.floors fastapi PORT``: a FastAPI route that echoes the JSON body (FastAPI's own cost on top).
``python -m bench.floors grpc PORT``: a bare ``grpc.aio`` server whose ``ModelInfer`` answers a fixed, prebuilt
``ModelInferResponse`` without decoding the request: the gRPC limit.
"""

import asyncio
import sys
from typing import Any

ANSWER = (b'{"model_name":"mlp","model_version":"1","outputs":[{"name":"prediction","datatype":"FP32","shape":[1,1],'
          b'"data":[0.0]},{"name":"risk","datatype":"FP32","shape":[1,1],"data":[0.0]},{"name":"risk_score",'
          b'"datatype":"FP32","shape":[1],"data":[0.0]}]}')
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Plain ASGI: read the whole body, answer the fixed document (lifespan events acknowledged)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def fastapi_app() -> Any:
    """A FastAPI app whose ``POST /echo`` answers the request's own JSON body."""
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    return app


async def grpc_floor(port: int) -> None:
    """Serve ``inference.GRPCInferenceService/ModelInfer`` with a fixed answer until killed."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    response = pb.ModelInferResponse(model_name="mlp", model_version="1")
    for name, shape in (("prediction", [1, 1]), ("risk", [1, 1]), ("risk_score", [1])):
        response.outputs.add(name=name, datatype="FP32", shape=shape)
        response.raw_output_contents.append(b"\0" * 4)
    body = response.SerializeToString()

    async def infer(request: bytes, context: Any) -> bytes:
        return body

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})  # identity (de)serializers: bytes in and out
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    """``KIND PORT``: serve one floor until SIGTERM."""
    kind, port = argv[0], int(argv[1])
    if kind == "grpc":
        asyncio.run(grpc_floor(port))
        return
    import uvicorn

    app = bare_app if kind == "asgi" else fastapi_app()
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
