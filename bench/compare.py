"""Side by side over HTTP: ``python -m bench.compare [--old PATH] [--litserve]``.

Starts each server once on 127.0.0.1 and drives ``POST /log-likelihood`` with ``wrk``
(multipart bodies), level by level, alternating the servers within each round (the order
rotates every round), so that a slow minute of a shared machine hits all of them:

- ``ours``: ``python -m service`` of this checkout;
- ``ours-wN``: the same with ``--workers N`` (``--workers N ...``): N processes on one port;
- ``old``: ``python -m service`` of another checkout (``--old``, e.g. a worktree of a1150d0);
- ``litserve``: ``bench/litserve_app.py`` (the same decode, runner, scorer and response model
  served by LitServe; needs the ``bench`` extra), when ``--litserve``.

Levels: one image per request at each ``--concurrency``, and ``--bulk-images`` images per
request at ``--bulk-concurrency``. Before timing, one bulk request goes to every server and
their results must be identical (field by field, exactly), or the run stops.

With ``--in-process``, ``bench/inprocess.py`` (the served form timed in a fresh process, no HTTP) takes a
turn in the rotation of the levels that fill batches (one image at concurrency >= 64, and bulk), and
each server's images/s is printed over its figures: the issue-17 ratios "served / in-process".

Per run: requests/s and images/s, p50/p99 latency, and the CPU each request cost, from
``/proc`` (utime + stime of every thread of the server's process tree, before and after):
for ``ours``/``old``, split into the event loops (the main thread of each server process), the
model threads and the rest (request-decoding threads, a supervisor); for LitServe, its
processes summed. The load generator's own CPU is not counted. Ratios are each of ours / each
other server, per level, of the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import inprocess, loadgen
from bench.models import DEFAULT_IMAGES, DEFAULT_WEIGHTS, REPO, pngs_of
from bench.served import HOST, Server, free_port, started
from bench.timing import write_results

ENDPOINT = "/log-likelihood"
FIELDS = ("log_likelihood", "bits_per_dim", "anomaly_score", "percentile", "is_anomaly")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # pip's, beside the interpreter


# --------------------------------------------------------------------- CPU
def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (LitServe runs its API server and worker as child processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``'s process tree, by thread id."""
    out: dict[int, float] = {}
    for process in process_tree(pid):
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from ``py-spy dump`` (empty without py-spy)."""
    try:
        dump = subprocess.run([PY_SPY, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in re.findall(r"Thread (\d+) \(\w+\): \"([^\"]+)\"", dump)}


# Where the event loop's samples fall: the library of the innermost frame (first match wins).
LIBRARIES = (
    ("h11", "h11/"), ("uvicorn", "uvicorn/"), ("multipart", "python_multipart/|multipart/|formparsers"),
    ("fastapi", "fastapi/"), ("starlette", "starlette/"), ("pydantic", "pydantic"), ("asyncio", "asyncio/|selectors"),
    ("logging+json", "logging/|json/"), ("prometheus", "prometheus_client"), ("service", "service/"),
)


def start_py_spy(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy sampling every thread of ``pid`` at 100 Hz for ``seconds``, idle samples left out."""
    out = Path(tempfile.mkstemp(prefix="glow-spy-", suffix=".txt")[1])
    command = [PY_SPY, "record", "--pid", str(pid), "--threads", "--nonblocking", "--rate", "100", "--duration",
               str(round(seconds)), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def finish_py_spy(spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, float] | None:
    """The main thread's samples by library, as shares of its samples (None if py-spy could not sample)."""
    process, out = spy
    process.wait(60)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("thread") or "MainThread" not in stack.split(";", 1)[0]:
            continue
        leaf = stack.rsplit(";", 1)[-1]
        library = next((name for name, pattern in LIBRARIES if re.search(pattern, leaf)), "other")
        counts[library] = counts.get(library, 0) + int(count)
    out.unlink(missing_ok=True)
    total = sum(counts.values())
    return {name: n / total for name, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else None


@dataclass
class Target:
    name: str
    server: Server
    names: dict[int, str] = field(default_factory=dict)  # thread names of every process of the server
    loops: list[int] = field(default_factory=list)  # the main threads that run an event loop

    def split(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        """CPU seconds between two snapshots: event loops, model threads, the rest (or all, for other servers)."""
        loops = set(self.loops) or {self.server.process.pid}
        parts = {"loop": 0.0, "model": 0.0, "rest": 0.0}
        for tid, seconds in after.items():
            spent = seconds - before.get(tid, 0.0)
            if self.name == "litserve":
                parts["rest"] += spent
            elif tid in loops:
                parts["loop"] += spent
            elif self.names.get(tid, "").startswith("glow-model"):
                parts["model"] += spent
            else:
                parts["rest"] += spent
        return parts


# -------------------------------------------------------------------- runs
def results_of(port: int, body: bytes, content_type: str) -> list[dict[str, Any]]:
    import http.client

    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        connection.request("POST", ENDPOINT, body, {"Content-Type": content_type})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"port {port}: {response.status} {payload[:300]!r}")
    return [{key: result[key] for key in FIELDS} for result in json.loads(payload)["results"]]


def run_level(target: Target, body: bytes, content_type: str, concurrency: int, duration: float, images: int,
              profile: bool = False) -> dict[str, Any]:
    """One wrk run against one server; ``profile``: py-spy samples its event loop meanwhile."""
    url = f"http://{HOST}:{target.server.port}{ENDPOINT}"
    loadgen.run_wrk(url, body, content_type, concurrency, min(1.0, duration), timeout_s=35)  # warm-up
    spy = start_py_spy(target.server.process.pid, max(1.0, duration - 1)) if profile else None
    before = thread_cpu(target.server.process.pid)
    result = loadgen.run_wrk(url, body, content_type, concurrency, duration, timeout_s=35)
    cpu = target.split(before, thread_cpu(target.server.process.pid))
    loop_profile = finish_py_spy(spy) if spy is not None else None
    ok = max(result.ok, 1)
    return {
        "server": target.name, "concurrency": concurrency, "images": images, "requests_per_s": result.throughput,
        "images_per_s": result.throughput * images, "p50_ms": result.latency(50) * 1e3,
        "p99_ms": result.latency(99) * 1e3, "ok": result.ok, "failed": sum(result.statuses.values()) - result.ok
        + result.errors, "cpu_ms_per_request": {part: 1e3 * seconds / ok for part, seconds in cpu.items()},
        "loop_profile": loop_profile,
    }


def rotations(names: list[str], rounds: int) -> Iterator[list[str]]:
    for index in range(rounds):
        shift = index % len(names)
        yield names[shift:] + names[:shift]


def summarise(runs: list[dict[str, Any]], servers: list[str]) -> list[dict[str, Any]]:
    rows = []
    for level in sorted({(run["images"], run["concurrency"]) for run in runs}):
        row: dict[str, Any] = {"images": level[0], "concurrency": level[1]}
        for server in servers:
            mine = [run for run in runs if (run["images"], run["concurrency"]) == level and run["server"] == server]
            if not mine:
                continue
            cpu = {part: statistics.median(run["cpu_ms_per_request"][part] for run in mine)
                   for part in mine[0]["cpu_ms_per_request"]}
            row[server] = {
                "requests_per_s": statistics.median(run["requests_per_s"] for run in mine),
                "rounds": [round(run["requests_per_s"], 1) for run in mine],
                "p50_ms": statistics.median(run["p50_ms"] for run in mine),
                "p99_ms": statistics.median(run["p99_ms"] for run in mine),
                "failed": sum(run["failed"] for run in mine),
                "cpu_ms_per_request": cpu,
            }
        for mine in [name for name in servers if name.startswith("ours") and name in row]:
            for other in [name for name in servers if name in row and name != mine]:
                if other.startswith("ours") and mine == "ours":
                    continue  # each variant against plain ours once
                row[f"{mine}/{other}"] = row[mine]["requests_per_s"] / row[other]["requests_per_s"]
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], servers: list[str]) -> None:
    print(f"\n{'level':>14} {'server':>9} {'req/s (rounds)':>28} {'p50 ms':>8} {'p99 ms':>8}"
          f"  CPU ms/request: loop + model + rest = total")
    for row in rows:
        level = f"{row['images']} img, c={row['concurrency']}"
        for server in servers:
            if server not in row:
                continue
            s = row[server]
            cpu = s["cpu_ms_per_request"]
            rounds = "/".join(f"{r:g}" for r in s["rounds"])
            print(f"{level:>14} {server:>9} {s['requests_per_s']:>8.1f} ({rounds:>17}) {s['p50_ms']:>8.1f}"
                  f" {s['p99_ms']:>8.1f}  {cpu['loop']:.2f} + {cpu['model']:.2f} + {cpu['rest']:.2f}"
                  f" = {sum(cpu.values()):.2f}" + (f"  ({s['failed']} failed)" if s["failed"] else ""))
        ratios = "  ".join(f"{key} {value:.2f}x" for key, value in row.items() if "/" in key)
        if ratios:
            print(f"{'':>14} {'':>9} {ratios}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                   help="IDX/.npz/folder whose first images are sent (default: Fashion-MNIST's test set; random pixels"
                   " where absent)")
    p.add_argument("--old", type=Path, default=None, help="a checkout of an earlier commit to serve as 'old'")
    p.add_argument("--litserve", action="store_true", help="also serve through LitServe (bench/litserve_app.py)")
    p.add_argument("--workers", type=int, nargs="*", default=[],
                   help="also serve this tree with --workers N, as 'ours-wN', for each N given")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64, 256])
    p.add_argument("--bulk-images", type=int, default=64, help="images per bulk request (0: no bulk level)")
    p.add_argument("--bulk-concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per server and level, alternating servers")
    p.add_argument("--python", action="append", default=[], metavar="SERVER=PATH",
                   help="the interpreter of one server (ours, old, litserve), e.g. a venv with uvloop (repeat)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for both services (repeat)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy samples the event loop of ours and old in the first round at the highest concurrency")
    p.add_argument("--in-process", action="store_true",
                   help="also time the served form in process (bench/inprocess.py) in the rotation of the one-image"
                   " levels of concurrency >= 64 (full batches) and of the bulk level, and print each server's"
                   " images/s over it")
    p.add_argument("--json", type=Path, help="also write every run to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not loadgen.wrk_available():
        print("bench.compare needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    blobs, source = pngs_of(args.images, max(args.bulk_images, 1))
    one, one_type = loadgen.multipart_body(blobs[0])
    bulk, bulk_type = _multipart_many(blobs)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    service = ["--host", HOST, "--weights", str(args.weights.resolve()), "--device", "cpu", *args.server_arg]
    commands = {"ours": ([sys.executable, "-m", "service", *service], REPO, env)}
    for workers in args.workers:
        commands[f"ours-w{workers}"] = ([sys.executable, "-m", "service", *service, "--workers", str(workers)], REPO, env)
    if args.old is not None:
        old = args.old.resolve()
        old_service = [*service[:3], str(old / "weights" / "fashion-mnist"), *service[4:]]  # its own checkpoint format
        commands["old"] = ([sys.executable, "-m", "service", *old_service], old, {**env, "PYTHONPATH": str(old)})
    if args.litserve:
        commands["litserve"] = ([sys.executable, "-m", "bench.litserve_app", "--weights", str(args.weights.resolve())],
                                REPO, env)
    for choice in args.python:
        server, _, python = choice.partition("=")
        if server not in commands:
            print(f"--python {choice}: no server {server!r}", file=sys.stderr)
            return 2
        command, cwd, server_env = commands[server]
        commands[server] = ([python, *command[1:]], cwd, server_env)
    print(f"image: {source}; wrk, {args.duration:g} s per run after 1 s of warm-up, {args.rounds} rounds;"
          f" load average before: {os.getloadavg()[0]:.2f}")
    runs: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []  # bench.inprocess figures, per level and round
    with ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
        targets: dict[str, Target] = {}
        for name, (command, cwd, server_env) in commands.items():
            port = free_port()
            ready = "/health" if name == "litserve" else "/readyz"
            server = stack.enter_context(started([*command, "--port", str(port)], port, server_env, Path(logs),
                                                 name, ready, 300, cwd=cwd))
            stack.callback(_terminate, process_tree(server.process.pid)[1:])  # LitServe's children
            targets[name] = Target(name, server)
        reference = results_of(targets["ours"].server.port, bulk, bulk_type)
        for name, target in targets.items():
            results = results_of(target.server.port, bulk, bulk_type)
            same = results == reference
            if name == "litserve" and not same:
                print("litserve's results differ from ours: stopping", file=sys.stderr)
                return 1
            print(f"outputs of {name}: {len(results)} images, "
                  + ("identical to ours" if same else "not ours (another commit's calibration)"))
        for target in targets.values():
            if target.name != "litserve":
                per_process = {pid: thread_names(pid) for pid in process_tree(target.server.process.pid)}
                target.names = {tid: name for names in per_process.values() for tid, name in names.items()}
                target.loops = [pid for pid, names in per_process.items()  # the processes with a model thread
                                if any(name.startswith("glow-model") for name in names.values())]
        levels = [(1, c, one, one_type) for c in args.concurrency]
        if args.bulk_images:
            levels.append((args.bulk_images, args.bulk_concurrency, bulk, bulk_type))
        profiled = max(args.concurrency, default=None) if args.profile else None
        ceiling_levels = {(1, c) for c in args.concurrency if c >= inprocess.SERVED_BATCH}  # full batches
        ceiling_levels.add((args.bulk_images, args.bulk_concurrency))
        for images, concurrency, body, content_type in levels:
            names = list(targets) + (["in-process"] if args.in_process and (images, concurrency) in ceiling_levels
                                     else [])
            for round_index, order in enumerate(rotations(names, args.rounds)):
                for name in order:
                    if name == "in-process":
                        figures = inprocess.run(args.weights.resolve(), args.images, inprocess.SERVED_BATCH,
                                                args.duration)
                        ceilings.append({"images": images, "concurrency": concurrency, **figures})
                        print(f"  {images} img c={concurrency} in-process: model {figures['model']:.1f} img/s,"
                              f" pipeline {figures['pipeline']:.1f} img/s", flush=True)
                        continue
                    profile = round_index == 0 and images == 1 and concurrency == profiled and name != "litserve"
                    run = run_level(targets[name], body, content_type, concurrency, args.duration, images, profile)
                    runs.append(run)
                    print(f"  {images} img c={concurrency} {name}: {run['requests_per_s']:.1f} req/s,"
                          f" p99 {run['p99_ms']:.0f} ms", flush=True)
                    if run["loop_profile"]:
                        print("    event loop (py-spy): " + ", ".join(
                            f"{library} {share:.0%}" for library, share in run["loop_profile"].items()))
    rows = summarise(runs, list(commands))
    print_table(rows, list(commands))
    if ceilings:
        inprocess.print_ratios(rows, ceilings, list(commands))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        write_results(args.json, {"runs": runs, "summary": rows, "in_process": ceilings, "argv": sys.argv})
    return 0


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _multipart_many(blobs: list[bytes]) -> tuple[bytes, str]:
    """One multipart body with an ``images`` file part per blob."""
    boundary = "glowcompare0000000000000000000000000000"
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{index}.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n"
        for index, blob in enumerate(blobs)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


if __name__ == "__main__":
    sys.exit(main())
