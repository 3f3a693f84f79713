"""``python -m bench.litserve_app --weights DIR --port N``: the service's scoring served by LitServe, for bench/compare.py.

The same work per image as ``POST /log-likelihood``: the service's decoding
(``service.imaging.decode_images``), its runner (``service.runner.ModelRunner``: the folded
TorchScript form, the anomaly scorer, the complexity feature) and its response model
(``LogLikelihoodResponse``, serialised with ``exclude_none``), in a process tuned as the
service tunes its own (``service.tuning``). LitServe batches requests; a batch's images go
to the model in calls of at most ``--max-images`` (the service's ``--max-batch-size``).
Multipart ``images`` parts only, no limits or error mapping: a load target, not a service.

LitServe (``pip install litserve==0.2.19``, the ``bench`` extra) is configured as screened
best for this model: ``max_batch_size`` 64 requests, ``batch_timeout`` 0, ``fast_queue``
(ZeroMQ), one inference worker, one API server.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve as ls

from service import imaging
from service.runner import ModelRunner, Scorable, Score
from service.schemas import ImageScore, LogLikelihoodResponse
from service.settings import Settings
from service.tuning import tune_process


class GlowScoring(ls.LitAPI):  # type: ignore[misc]
    """decode_request: multipart images -> Scorables; predict: one model call per ``max_images``; encode: JSON."""

    def __init__(self, weights: Path, max_images: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weights, self.max_images = weights, max_images

    def setup(self, device: str) -> None:
        tune_process(Settings.from_args(["--device", "cpu"]))
        self.runner = ModelRunner(self.weights, "cpu")
        self.runner.load()
        self.runner.warm_up(self.max_images)

    # LitServe reads the parameter and return annotations of decode_request and encode_response as the
    # endpoint's request and response types: left out, the request is Starlette's and parsed as a form
    def decode_request(self, request, **kwargs: Any) -> list[Scorable]:  # type: ignore[no-untyped-def]
        blobs = [part.file.read() for part in request.getlist("images")]
        return self.runner.scorable(imaging.decode_images(blobs, self.runner.image_shape))

    def batch(self, inputs: list[list[Scorable]]) -> list[list[Scorable]]:
        return inputs

    def predict(self, requests: list[list[Scorable]], **kwargs: Any) -> list[list[Score]]:
        items = [item for request in requests for item in request]
        scores: list[Score] = []
        for start in range(0, len(items), self.max_images):
            scores += self.runner.score_batch(items[start : start + self.max_images])
        out, start = [], 0
        for request in requests:
            out.append(scores[start : start + len(request)])
            start += len(request)
        return out

    def unbatch(self, output: list[list[Score]]) -> list[list[Score]]:
        return output

    def encode_response(self, scores: list[Score], **kwargs: Any):  # type: ignore[no-untyped-def]
        response = LogLikelihoodResponse(
            results=[
                ImageScore(log_likelihood=s.log_likelihood, bits_per_dim=s.bits_per_dim, anomaly_score=s.anomaly_score,
                           percentile=s.percentile, is_anomaly=s.is_anomaly)
                for s in scores
            ],
            anomaly_method=self.runner.scorer.method,
            threshold=self.runner.scorer.threshold,
        )
        return response.model_dump(exclude_none=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.litserve_app", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per LitServe batch")
    p.add_argument("--max-images", type=int, default=64, help="images per model call")
    args = p.parse_args(argv)
    api = GlowScoring(args.weights, args.max_images, api_path="/log-likelihood",
                      max_batch_size=args.max_batch_size, batch_timeout=0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
