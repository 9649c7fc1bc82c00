"""The HTTP floor for the serving benchmark: a bare FastAPI/uvicorn app whose one route echoes the JSON body.

``python bench/serve_floor.py PORT`` serves it with the same stack as capsa-serve (uvloop, httptools, no access log).
"""

import sys

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.post("/echo")
async def echo(request: Request) -> Response:
    """Answer with the request's own JSON body."""
    return Response(await request.body(), media_type="application/json")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", access_log=False,
                log_level="warning")
