"""Process tuning: the values it sets, that setting them twice changes nothing, and that create_app applies it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from service import tuning
from service.app import create_app
from service.settings import Settings


@pytest.fixture(autouse=True)
def _restore_process() -> Iterator[None]:
    """The tests change process-wide state: put back what the rest of the suite runs with."""
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def test_model_threads_leave_a_core_to_the_event_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_quota = tmp_path / "absent"
    assert tuning.model_threads(3, no_quota) == 3  # asked for: taken as is
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert tuning.model_threads(0, no_quota) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert tuning.model_threads(0, no_quota) == 15
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")  # a container limited to 2.5 CPUs of the 16
    assert tuning.model_threads(0, cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert tuning.model_threads(0, cpu_max) == 15
    cpu_max.write_text("garbage")
    assert tuning.model_threads(0, cpu_max) == 15
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert tuning.model_threads(0, no_quota) == 1


def test_each_worker_takes_its_share_of_the_cores_less_its_event_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_quota = tmp_path / "absent"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert tuning.model_threads(0, no_quota, workers=4) == 3
    assert tuning.model_threads(0, no_quota, workers=16) == 1
    assert tuning.model_threads(0, no_quota, workers=64) == 1
    assert tuning.model_threads(5, no_quota, workers=4) == 5  # asked for: taken as is


def test_model_threads_read_a_cgroup_v1_quota_where_there_is_no_v2_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    no_v2 = tmp_path / "absent"
    quota = tmp_path / "cpu.cfs_quota_us"
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    quota.write_text("300000\n")  # docker run --cpus 3 on a cgroup v1 host
    assert tuning.model_threads(0, no_v2, quota) == 2
    quota.write_text("-1\n")  # no quota
    assert tuning.model_threads(0, no_v2, quota) == 15
    quota.write_text("garbage")
    assert tuning.model_threads(0, no_v2, quota) == 15
    assert tuning.model_threads(0, no_v2, tmp_path / "absent-too") == 15
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")  # where both are readable, v2 (the unified hierarchy) decides
    quota.write_text("300000\n")
    assert tuning.model_threads(0, cpu_max, quota) == 1


def test_tuning_sets_the_measured_values_and_a_second_call_changes_nothing(
    make_settings: Callable[..., Settings],
) -> None:
    sys.setswitchinterval(0.005)
    torch.set_num_threads(3)
    first = tuning.tune_process(make_settings(threads=2))
    assert first == tuning.Tuning(tuning.SWITCH_INTERVAL_S, first.malloc_pinned, 2)
    assert sys.getswitchinterval() == pytest.approx(tuning.SWITCH_INTERVAL_S)
    assert torch.get_num_threads() == 2
    assert tuning.tune_process(make_settings(threads=2)) == first
    assert (sys.getswitchinterval(), torch.get_num_threads()) == (first.switch_interval_s, 2)


@pytest.mark.skipif(tuning._glibc() is None, reason="mallopt is glibc's")
def test_glibc_accepts_the_malloc_thresholds() -> None:
    assert tuning.pin_malloc_thresholds()
    assert tuning.pin_malloc_thresholds()  # again: the same values, accepted again


def test_create_app_tunes_the_process(make_settings: Callable[..., Settings]) -> None:
    """An ASGI host that mounts create_app gets what python -m service gets."""
    sys.setswitchinterval(0.005)
    torch.set_num_threads(3)
    create_app(make_settings(threads=1))
    assert sys.getswitchinterval() == pytest.approx(tuning.SWITCH_INTERVAL_S)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(tuning.model_threads(0) + 1)
    create_app(make_settings(threads=0))
    assert torch.get_num_threads() == tuning.model_threads(0)
