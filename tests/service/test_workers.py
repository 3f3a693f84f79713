"""``python -m service --workers N``: one port, merged metrics, restarts, SIGTERM to all, one-line start errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from service_testing import ServerProcess, eventually, random_pixels, to_png, wait_until

from service.workers import bound_socket

STARTED = "Application startup complete."


def scored(url: str) -> float:
    """glow_requests_total of 200 answers to /log-likelihood, from one scrape (on a connection of its own)."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(sample.value for family in families if family.name == "glow_requests"
               for sample in family.samples if sample.name == "glow_requests_total"
               and sample.labels["endpoint"] == "/log-likelihood" and sample.labels["status"] == "200")


def scored_by_worker(shared: Path) -> dict[int, float]:
    """The same count per worker process, from the files of prometheus_client's multiprocess mode."""
    out: dict[int, float] = {}
    for path in shared.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        out[int(path.stem.split("_")[1])] = sum(
            item[1] for item in values if (key := item[0]) and '"/log-likelihood"' in key and '"200"' in key and "_total" in key)
    return out


def worker_pids(shared: Path) -> set[int]:
    """Every worker that has started: each writes its batch histograms' file at start."""
    return {int(path.stem.split("_")[1]) for path in shared.glob("histogram_*.db")}


def score_each_on_its_own_connection(url: str, count: int) -> None:
    png = to_png(random_pixels(1, 0)[0])

    def one(_: int) -> int:
        return httpx.post(f"{url}/log-likelihood", files={"images": ("x.png", png, "image/png")}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(count))) == {200}


def started_workers(server: ServerProcess) -> int:
    return sum(STARTED in line for line in server.lines)


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The metrics folder the workers share, set for the server process (it keeps one it did not make)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def two_workers(tiny_checkpoint: Path, shared: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(["--weights", str(tiny_checkpoint), "--device", "cpu", "--workers", "2"])
    try:
        wait_until(lambda: started_workers(server) == 2 or server.process.poll() is not None, timeout_s=120)
        assert started_workers(server) == 2, server.output()
        yield server
    finally:
        server.kill()


def test_two_workers_share_the_port_restart_and_stop_together(two_workers: ServerProcess, shared: Path) -> None:
    """One server through its life (one start for the suite's time): both workers serve, every scrape counts
    both, a killed worker is started again with its counts kept, and SIGTERM stops all with exit 0."""
    url = two_workers.url
    score_each_on_its_own_connection(url, 40)
    per_worker = scored_by_worker(shared)
    assert len(per_worker) == 2 and all(count > 0 for count in per_worker.values()), per_worker  # both served
    assert [scored(url) for _ in range(6)] == [40.0] * 6  # whichever worker answers the scrape
    assert httpx.get(f"{url}/readyz").status_code == 200

    victim = max(per_worker.items(), key=lambda item: item[1])[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: started_workers(two_workers) == 3 or two_workers.process.poll() is not None, timeout_s=120)
    assert started_workers(two_workers) == 3, two_workers.output()
    assert "starting it again" in two_workers.output()
    score_each_on_its_own_connection(url, 10)
    assert scored(url) == 50.0  # the dead worker's 200s stay counted

    workers = worker_pids(shared) - {victim}
    assert len(workers) == 2
    two_workers.process.send_signal(signal.SIGTERM)
    assert two_workers.finish() == 0
    assert not [pid for pid in workers if running(pid)]
    assert "Traceback" not in two_workers.output()


def test_a_missing_checkpoint_with_workers_exits_1_with_one_line(tmp_path: Path) -> None:
    server = ServerProcess(["--weights", str(tmp_path / "nowhere"), "--device", "cpu", "--workers", "3"])
    try:
        assert server.finish() == 1
    finally:
        server.kill()
    assert server.lines == [f"python -m service: {tmp_path / 'nowhere'}: weights file not found"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_exits_1_with_one_line(tiny_checkpoint: Path, workers: str) -> None:
    with socket.socket() as taken:  # without SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(["--weights", str(tiny_checkpoint), "--device", "cpu", "--workers", workers,
                                "--port", str(port)])
        try:
            assert server.finish() == 1
        finally:
            server.kill()
    assert len(server.lines) == 1 and server.lines[0].startswith(f"python -m service: cannot listen on 127.0.0.1:{port}")


def test_a_host_that_does_not_resolve_exits_1_with_one_line(tiny_checkpoint: Path) -> None:
    server = ServerProcess(["--weights", str(tiny_checkpoint), "--device", "cpu", "--host", "not a host"])
    try:
        assert server.finish() == 1
    finally:
        server.kill()
    assert len(server.lines) == 1 and server.lines[0].startswith("python -m service: cannot listen on not a host:")


def test_workers_exit_when_their_parent_is_killed(two_workers: ServerProcess, shared: Path) -> None:
    pids = worker_pids(shared)
    assert len(pids) == 2
    two_workers.process.kill()
    wait_until(lambda: not [pid for pid in pids if running(pid)])


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's, which nobody may reap in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_workers_connections_get_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets: a listening socket made with proto 0 left every
    response written in two parts waiting ~40 ms for the client's delayed ACK."""
    nodelay: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one() -> None:
        listening = bound_socket("127.0.0.1", 0, listen=True)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname())
            await eventually(lambda: bool(nodelay))
            writer.close()

    asyncio.run(accept_one())
    assert nodelay == [1]
