"""The HTTP service of a Glow checkpoint (the contract: docs/API.md; run it with ``python -m service``).

Layers, each with one job: ``settings`` (flags and GLOW_* variables), ``app`` (the
FastAPI factory and its lifespan), ``routes`` and ``schemas`` (the endpoints and their
bodies), ``imaging`` (PNG/JPEG <-> pixel arrays), ``batcher`` (generic asyncio dynamic
batching, no torch), ``runner`` (the model on its device, off the event loop), ``state``
(what one running app holds), ``middleware`` (request IDs, access logs, body limit),
``metrics`` (Prometheus) and ``client`` (a typed httpx client).
"""
