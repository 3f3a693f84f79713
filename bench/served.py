"""Served throughput: ``python -m bench.served [--weights DIR] [--quick]``.

Starts a real ``python -m service`` process on 127.0.0.1 (a free port), waits for
``/readyz``, and drives ``POST /log-likelihood`` with one image per request:

1. the HTTP ceiling: the same load against ``bench/trivial_app.py`` (same uvicorn, no
   parsing, no model) with both generators (``wrk`` and the Python one of
   ``bench/loadgen.py``), which shows whether the generators can outrun the service;
2. closed loop at concurrency 1, 8, 64, 256 (``wrk`` when installed, else the Python
   generator; ``--generator``): throughput, p50/p95/p99 latency, the batch sizes the
   server formed (from its ``/metrics`` histogram ``glow_batch_size``, before/after each
   run), and 503s;
3. an open-loop Poisson sweep (Python generator), at rates set from the closed-loop
   throughput at concurrency 64 (``--rate-fractions``) or given (``--rates``): the same
   figures, latencies from the scheduled arrival, 503s past saturation;
4. all of it again with ``--max-batch-size 1`` (no batching), and the batching/no-batching
   throughput and p99 ratios at concurrency 64.

Every run is bounded in time and count; all traffic goes to 127.0.0.1. The full run takes
about 5 minutes; ``--quick`` is a smoke run of well under 2 minutes. ``--malloc-tuned``,
``--variant unfolded`` and ``--switch-interval`` run the same against the service with its
model form or switch interval swapped from outside (``bench/serve_variant.py``), to compare over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import LoadResult
from bench.models import REPO, add_model_arguments, checkpoint_exists, random_checkpoint, sample_png
from bench.timing import MALLOC_TUNED, fmt, write_results

HOST = "127.0.0.1"
OPERATION = "log_likelihood"  # the batcher's label in /metrics
ENDPOINT = "/log-likelihood"


# ----------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    command: list[str]


def wait_ready(server: Server, path: str, timeout: float) -> float:
    """Seconds until ``path`` answers 200; raises if the process exits or the timeout passes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{tail}")
        try:
            status, _ = http_get(server.port, path, timeout=2.0)
            if status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(server.command)}: {path} not ready after {timeout:g} s")


@contextmanager
def started(command: list[str], port: int, env: dict[str, str], log_dir: Path, name: str,
            ready_path: str, ready_timeout: float, cwd: Path = REPO) -> Iterator[Server]:
    """Run ``command`` (our child) in ``cwd``, wait for readiness, and always stop it: SIGTERM, then SIGKILL."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, port, log, command)
    try:
        seconds = wait_ready(server, ready_path, ready_timeout)
        print(f"  started {name} (pid {process.pid}, port {port}), ready in {seconds:.1f} s")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# ----------------------------------------------------------------- metrics
def scrape(port: int) -> dict[str, Any]:
    """The batch-size histogram of the log-likelihood batcher and request counts by status."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http_get(port, "/metrics")
    buckets: dict[float, float] = {}
    count = total = 0.0
    statuses: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "glow_batch_size_bucket" and labels.get("operation") == OPERATION:
                buckets[float(labels["le"])] = sample.value
            elif sample.name == "glow_batch_size_count" and labels.get("operation") == OPERATION:
                count = sample.value
            elif sample.name == "glow_batch_size_sum" and labels.get("operation") == OPERATION:
                total = sample.value
            elif sample.name == "glow_requests_total" and labels.get("endpoint") == ENDPOINT:
                statuses[labels["status"]] = sample.value
    return {"buckets": buckets, "count": count, "sum": total, "statuses": statuses}


def batch_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Batches formed between two scrapes: count, mean size, and the histogram's cumulative shares."""
    batches = after["count"] - before["count"]
    items = after["sum"] - before["sum"]
    cumulative = {le: after["buckets"].get(le, 0) - before["buckets"].get(le, 0) for le in sorted(after["buckets"])}
    median = next((le for le, n in cumulative.items() if batches and n >= batches / 2), math.nan)
    largest = next((le for le, n in cumulative.items() if batches and n >= batches), math.nan)
    return {"batches": batches, "items": items, "mean": items / batches if batches else math.nan,
            "median_le": median, "max_le": largest,
            "histogram": {("inf" if math.isinf(le) else f"{le:g}"): n for le, n in cumulative.items()}}


# -------------------------------------------------------------------- runs
def closed(server: Server, generator: str, request: bytes, body: bytes, content_type: str, concurrency: int,
           duration: float, args: argparse.Namespace) -> LoadResult:
    if generator == "wrk":
        return loadgen.run_wrk(f"http://{HOST}:{server.port}{ENDPOINT}", body, content_type, concurrency, duration,
                               threads=args.wrk_threads, timeout_s=args.request_timeout)
    return asyncio.run(loadgen.closed_loop(HOST, server.port, request, concurrency, duration,
                                           max_requests=args.max_requests, request_timeout=args.request_timeout))


def describe(result: LoadResult, stats: dict[str, Any] | None) -> str:
    s = result.statuses
    rejected = s.get(503, 0)
    other = sum(v for k, v in s.items() if not 200 <= int(k) < 300 and int(k) != 503)
    line = (f"{fmt(result.throughput):>9}{fmt(result.latency(50) * 1e3):>9}{fmt(result.latency(95) * 1e3):>9}"
            f"{fmt(result.latency(99) * 1e3):>9}{result.ok:>8}{rejected:>6}{other + result.errors:>6}")
    if stats is not None:
        line += f"{fmt(stats['mean']):>8}{fmt(stats['median_le'], 0):>7}{fmt(stats['max_le'], 0):>7}"
    return line


HEADER = (f"{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'2xx':>8}{'503':>6}{'err':>6}"
          f"{'batch':>8}{'p50<=':>7}{'max<=':>7}")


def run_config(
    name: str, extra: list[str], weights: Path, args: argparse.Namespace, env: dict[str, str], log_dir: Path,
    body: bytes, content_type: str, generator: str, rates: list[float] | None,
) -> dict[str, Any]:
    """One server configuration: closed-loop levels, then the open-loop sweep."""
    port = free_port()
    request = loadgen.build_request("POST", ENDPOINT, HOST, port, body, content_type)
    launcher = ["-m", "service"]
    if args.variant != "served" or args.switch_interval is not None:  # the service with bench/serve_variant.py's changes
        launcher = ["-m", "bench.serve_variant", "--variant", args.variant]
        if args.switch_interval is not None:
            launcher += ["--switch-interval", str(args.switch_interval)]
        launcher.append("--")
    command = [sys.executable, *launcher, "--host", HOST, "--port", str(port), "--weights", str(weights),
               "--device", args.server_device, "--log-level", args.server_log_level, *extra, *args.server_arg]
    print(f"\n== {name}: {' '.join(shlex.quote(c) for c in command[1:])}")
    out: dict[str, Any] = {"name": name, "command": command, "closed": [], "open": []}
    with started(command, port, env, log_dir, name.replace(" ", "_"), "/readyz", args.ready_timeout) as server:
        print(f"closed loop ({generator}; {args.duration:g} s per level after {args.warmup:g} s of warm-up)")
        print(f"{'conc':>6}{HEADER}")
        for concurrency in args.concurrency:
            if args.warmup > 0:
                closed(server, generator, request, body, content_type, concurrency, args.warmup, args)
            before = scrape(port)
            result = closed(server, generator, request, body, content_type, concurrency, args.duration, args)
            stats = batch_stats(before, scrape(port))
            print(f"{concurrency:>6}{describe(result, stats)}")
            out["closed"].append({**result.summary(), "batches": stats})
        if rates is None:
            at64 = next((r["throughput"] for r in out["closed"] if r["target"] == 64), None)
            peak = at64 if at64 and math.isfinite(at64) else max((r["throughput"] for r in out["closed"]), default=0)
            rates = [round(f * peak, 1) for f in args.rate_fractions if f * peak > 0]
        out["rates"] = rates
        if rates:
            print(f"open loop (Poisson, python generator, {args.open_duration:g} s per rate; latency from the "
                  f"scheduled arrival)")
            print(f"{'rate/s':>8}{HEADER}{'drop':>6}{'lag99':>7}")
            for index, rate in enumerate(rates):
                before = scrape(port)
                result = asyncio.run(loadgen.open_loop(
                    HOST, port, request, rate, args.open_duration, seed=args.seed + index,
                    max_requests=args.max_requests, max_connections=args.max_connections,
                    drain_timeout=args.request_timeout + 10, request_timeout=args.request_timeout,
                ))
                stats = batch_stats(before, scrape(port))
                print(f"{rate:>8.1f}{describe(result, stats)}{result.dropped + result.unfinished:>6}"
                      f"{fmt(result.lag_p99 * 1e3):>7}")
                out["open"].append({**result.summary(), "batches": stats})
                time.sleep(min(5.0, args.settle))  # let a saturated queue drain before the next rate
    return out


def http_ceiling(args: argparse.Namespace, env: dict[str, str], log_dir: Path, body: bytes, content_type: str
                 ) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, "-m", "bench.trivial_app", "--port", str(port), *args.trivial_arg]
    print(f"\n== HTTP ceiling: the trivial endpoint ({' '.join(command[1:])}), concurrency 64, "
          f"{args.trivial_duration:g} s each")
    request = loadgen.build_request("POST", ENDPOINT, HOST, port, body, content_type)
    out: dict[str, Any] = {}
    with started(command, port, env, log_dir, "trivial", "/readyz", 60) as server:
        print(f"{'generator':>10}{HEADER[:-22]}")
        generators = ["python"] + (["wrk"] if loadgen.wrk_available() else [])
        for generator in generators:
            closed(server, generator, request, body, content_type, 64, 1.0, args)  # warm-up
            result = closed(server, generator, request, body, content_type, 64, args.trivial_duration, args)
            print(f"{generator:>10}{describe(result, None)}")
            out[generator] = result.summary()
    if not loadgen.wrk_available():
        print("  (wrk not installed: apt-get install wrk; closed loops use the Python generator)")
    return out


# -------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "checkpoint to serve (default weights/fashion-mnist; a random-weight one when absent)",
                        "the request's image: the first of this file")
    p.add_argument("--body", choices=["multipart", "json"], default="multipart", help="request encoding")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="the batching run's --max-batch-size (default: the service's own default)")
    p.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-size 1 run")
    p.add_argument("--variant", choices=["served", "unfolded"], default="served",
                   help="the model form the service runs: its own (served: folded, TorchScript) or the eager "
                        "layer-by-layer Glow (unfolded); see bench/serve_variant.py")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="the server's sys.setswitchinterval (via bench/serve_variant.py; default: the service's 0.0005)")
    p.add_argument("--malloc-tuned", action="store_true",
                   help=f"run the servers with GLIBC_TUNABLES={MALLOC_TUNED} (no mmap/munmap of big buffers per batch)")
    p.add_argument("--server-device", default="cpu", help="the service's --device (default cpu; auto: CUDA if present)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the server (default: unset, torch's own choice, as deployed)")
    p.add_argument("--server-log-level", default="info", help="the service's --log-level (default info, as shipped)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for python -m service (repeat)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the servers (repeat), e.g. PYTHONPATH=/opt/extra")
    p.add_argument("--trivial-arg", action="append", default=[], help="extra flag for bench.trivial_app (repeat)")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                   help="closed-loop generator (auto: wrk when installed)")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per closed-loop level")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load before each level")
    p.add_argument("--rates", type=float, nargs="*", default=None, help="open-loop rates per second (default: fractions)")
    p.add_argument("--rate-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.8, 1.0, 1.25, 2.0],
                   help="open-loop rates as fractions of the batching run's closed-loop req/s at concurrency 64")
    p.add_argument("--open-duration", type=float, default=8.0, help="seconds of arrivals per open-loop rate")
    p.add_argument("--settle", type=float, default=3.0, help="pause between open-loop rates")
    p.add_argument("--max-connections", type=int, default=1536,
                   help="open loop: most connections in flight (more than the server's queue, so 503s can show)")
    p.add_argument("--max-requests", type=int, default=200_000, help="bound on requests per run")
    p.add_argument("--request-timeout", type=float, default=35.0, help="client timeout per request")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--trivial-duration", type=float, default=5.0)
    p.add_argument("--no-trivial", action="store_true", help="skip the trivial-endpoint ceiling")
    p.add_argument("--peer-json", type=Path,
                   help="JSON of bench.model_throughput --json: print served req/s over the peer's best in-process")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s levels, 1 s warm-up, 3 open-loop rates of 3 s, 2 s trivial runs")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.open_duration, args.trivial_duration, args.settle = 3.0, 1.0, 3.0, 2.0, 1.0
        args.rate_fractions = [0.5, 1.0, 2.0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if loadgen.wrk_available() else "python"
    if generator == "wrk" and not loadgen.wrk_available():
        raise SystemExit("wrk is not installed (apt-get install wrk), use --generator python")
    env = dict(os.environ)
    if args.server_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    if args.malloc_tuned:
        env["GLIBC_TUNABLES"] = MALLOC_TUNED
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # the repo first
    images = Path(args.images) if args.images else None
    png, image_source = sample_png(images, args.seed)
    body, content_type = (loadgen.multipart_body if args.body == "multipart" else loadgen.json_body)(png)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "generator": generator}
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"server threads {args.server_threads or 'unset (torch default)'}, log level {args.server_log_level}, "
          f"model {args.variant}, switch interval {args.switch_interval or 'default'}, "
          f"GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"request: POST {ENDPOINT}, one image ({image_source}, PNG {len(png)} bytes) as {args.body}, "
          f"body {len(body)} bytes")
    with tempfile.TemporaryDirectory(prefix="glow-bench-") as tmp:
        log_dir = Path(tmp)
        weights = args.weights
        if not checkpoint_exists(weights):
            print(f"weights: {weights} not found: serving random weights "
                  f"({args.levels} levels x {args.steps} steps, width {args.hidden})")
            weights = random_checkpoint(log_dir / "random-checkpoint", args)
        else:
            print(f"weights: {weights}")
        if not args.no_trivial:
            results["http_ceiling"] = http_ceiling(args, env, log_dir, body, content_type)
        configs = [("batching", [] if args.max_batch_size is None else ["--max-batch-size", str(args.max_batch_size)])]
        if not args.no_unbatched:
            configs.append(("no batching", ["--max-batch-size", "1"]))
        rates = args.rates
        runs = []
        for name, extra in configs:
            run = run_config(name, extra, weights, args, env, log_dir, body, content_type, generator, rates)
            rates = run["rates"]  # the same absolute rates for every configuration
            runs.append(run)
        results["runs"] = runs

    # ratios
    print("\nsummary")
    def at(run: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
        return next((r for r in run["closed"] if r["target"] == concurrency), None)

    if "http_ceiling" in results:
        ceiling = max(r["throughput"] for r in results["http_ceiling"].values())
        print(f"  HTTP ceiling (trivial endpoint, concurrency 64): {ceiling:.0f} req/s")
        results["http_ceiling_req_s"] = ceiling
    batched = at(runs[0], 64)
    if batched:
        print(f"  served log-likelihood at concurrency 64: {batched['throughput']:.1f} req/s, "
              f"p99 {batched['p99_ms']:.1f} ms, mean batch {fmt(batched['batches']['mean'])}")
    if len(runs) > 1 and batched and at(runs[1], 64):
        single = at(runs[1], 64)
        assert single is not None
        ratio = batched["throughput"] / single["throughput"] if single["throughput"] else math.nan
        print(f"  batching / --max-batch-size 1 at concurrency 64: {ratio:.2f}x throughput (target >= 4x), "
              f"p99 {batched['p99_ms']:.1f} ms vs {single['p99_ms']:.1f} ms (target: no worse)")
        results["batching_ratio_c64"] = ratio
    if args.peer_json and batched:
        data = json.loads(args.peer_json.read_text())
        peer = data.get("peer_best_log_likelihood", {}).get("images_per_s")
        if peer:
            print(f"  served at concurrency 64 / the nflows peer's best in-process ({peer:.1f} img/s): "
                  f"{batched['throughput'] / peer:.2f}x (target >= 1.5x)")
            results["served_over_peer"] = batched["throughput"] / peer
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
