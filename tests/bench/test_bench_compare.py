"""bench/compare.py's bookkeeping (CPU from /proc, rounds, summaries, py-spy parsing, bodies) and the LitServe
app's batching, without servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from bench.compare import _multipart_many, finish_py_spy, process_tree, rotations, summarise, thread_cpu


def test_rotations_alternate_which_server_goes_first() -> None:
    assert list(rotations(["ours", "old", "litserve"], 4)) == [
        ["ours", "old", "litserve"], ["old", "litserve", "ours"], ["litserve", "ours", "old"], ["ours", "old", "litserve"],
    ]


def test_thread_cpu_counts_each_thread_of_the_process_tree() -> None:
    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        burnt.set()
        release.wait(10)

    before = thread_cpu(os.getpid())
    worker = threading.Thread(target=burn)
    worker.start()
    try:
        assert burnt.wait(30)
        during = thread_cpu(os.getpid())
    finally:
        release.set()
        worker.join()
    assert worker.native_id in during and worker.native_id not in before
    assert during[worker.native_id] >= 0.2
    with subprocess.Popen(["sleep", "5"]) as child:
        try:
            assert child.pid in process_tree(os.getpid())
        finally:
            child.kill()


def test_summarise_takes_medians_per_level_and_the_ratios_to_ours() -> None:
    def run(server: str, rate: float, loop_ms: float) -> dict[str, Any]:
        return {"server": server, "images": 1, "concurrency": 64, "requests_per_s": rate, "p50_ms": 10.0,
                "p99_ms": 20.0, "failed": 0, "cpu_ms_per_request": {"loop": loop_ms, "model": 1.0, "rest": 0.5}}

    runs = [run("ours", 100, 1.0), run("ours", 120, 3.0), run("ours", 110, 2.0), run("litserve", 50, 0.0),
            run("litserve", 60, 0.0)]
    (row,) = summarise(runs, ["ours", "litserve"])
    assert row["ours"]["requests_per_s"] == 110 and row["ours"]["rounds"] == [100, 120, 110]
    assert row["ours"]["cpu_ms_per_request"] == {"loop": 2.0, "model": 1.0, "rest": 0.5}
    assert row["ours/litserve"] == pytest.approx(110 / 55)


def test_py_spy_samples_of_the_main_thread_are_shared_by_library(tmp_path: Path) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text(
        "thread (1): MainThread;run (asyncio/base_events.py:600);_run_once (asyncio/base_events.py:1900) 6\n"
        "thread (1): MainThread;run (asyncio/base_events.py:600);handle_events (h11/_connection.py:400) 3\n"
        "thread (1): MainThread;__call__ (service/middleware.py:80) 1\n"
        "thread (2): glow-model_0;forward (torch/nn/modules/module.py:1) 50\n"
    )

    class Done:
        def wait(self, timeout: float) -> None: ...

    assert finish_py_spy((Done(), raw)) == {"asyncio": 0.6, "h11": 0.3, "service": 0.1}  # type: ignore[arg-type]
    assert not raw.exists()


def test_a_bulk_body_holds_every_image_as_an_images_part() -> None:
    blobs = [bytes([index]) * (index + 1) for index in range(5)]
    body, content_type = _multipart_many(blobs)

    async def parts() -> list[bytes]:
        async def stream():  # type: ignore[no-untyped-def]
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        return [await part.read() for part in form.getlist("images")]  # type: ignore[union-attr]

    assert asyncio.run(parts()) == blobs


def test_the_litserve_app_splits_a_batch_into_model_calls_and_back_into_requests() -> None:
    pytest.importorskip("litserve")
    from bench.litserve_app import GlowScoring

    class Runner:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def score_batch(self, items: list[str]) -> list[str]:
            self.calls.append(len(items))
            return [f"score of {item}" for item in items]

    api = GlowScoring(Path("unused"), max_images=2, max_batch_size=4)
    api.runner = Runner()  # type: ignore[assignment]
    out = api.predict([["a", "b", "c"], ["d"], ["e", "f"]])  # type: ignore[list-item]
    assert api.runner.calls == [2, 2, 2]
    assert out == [["score of a", "score of b", "score of c"], ["score of d"], ["score of e", "score of f"]]
