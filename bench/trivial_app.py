"""A trivial FastAPI endpoint: the HTTP ceiling to quote beside the model's figures.

``python -m bench.trivial_app --port 8001`` serves ``POST /log-likelihood`` (reads the whole
body, answers a fixed JSON of the real endpoint's shape and size, no parsing, no model),
``GET /readyz`` and ``GET /healthz``, under the same uvicorn settings as ``python -m service``
(access log off, lifespan on). ``bench/served.py`` drives it with its load generators first,
to check that they can generate more load than the service will absorb.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

RESULT = (
    b'{"results":[{"log_likelihood":-2011.0625,"bits_per_dim":3.70078125,"anomaly_score":-0.5734,'
    b'"percentile":31.25,"is_anomaly":false}],"anomaly_method":"trivial","threshold":2.5}'
)

app = FastAPI(title="trivial")


@app.post("/log-likelihood")
async def log_likelihood(request: Request) -> Response:
    await request.body()
    return Response(RESULT, media_type="application/json")


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trivial_app", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--http", default="auto", help="uvicorn HTTP implementation: auto (as the service), h11, httptools")
    p.add_argument("--loop", default="auto", help="uvicorn event loop: auto (as the service), asyncio, uvloop")
    args = p.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, http=args.http, loop=args.loop, log_level="warning",
                access_log=False, lifespan="on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
