"""Settings: every flag has a GLOW_* variable, flags win, and a bad value is one clear line (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import main
from service.settings import DEFAULT_WEIGHTS, Settings, SettingsError, flag

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_args([])
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")
    assert settings.weights == (str(DEFAULT_WEIGHTS),) and DEFAULT_WEIGHTS == REPO / "weights" / "fashion-mnist"
    assert settings.anomaly_fpr == 0.01


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("host", "0.0.0.0", "0.0.0.0"),
        ("port", "9000", 9000),
        ("weights", "weights/mnist", ("weights/mnist",)),
        ("weights", "mnist=weights/mnist,weights/fashion-mnist", ("mnist=weights/mnist", "weights/fashion-mnist")),
        ("device", "cpu", "cpu"),
        ("device", "CUDA:1", "cuda:1"),
        ("max_batch_size", "1", 1),
        ("max_wait_ms", "2.5", 2.5),
        ("max_queue_size", "4096", 4096),
        ("request_timeout_s", "3", 3.0),
        ("anomaly_fpr", "0.05", 0.05),
        ("max_body_bytes", "2048", 2048),
        ("max_images_per_request", "8", 8),
        ("max_sample_n", "4", 4),
        ("log_level", "WARNING", "warning"),
        ("workers", "4", 4),
    ],
)
def test_every_setting_is_a_flag_and_a_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, value: object
) -> None:
    assert getattr(Settings.from_args([flag(name), text]), name) == value
    monkeypatch.setenv(f"GLOW_{name.upper()}", text)
    assert getattr(Settings.from_args([]), name) == value


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOW_MAX_BATCH_SIZE", "3")
    assert Settings.from_args([]).max_batch_size == 3
    assert Settings.from_args(["--max-batch-size", "5"]).max_batch_size == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "x"], "--port / GLOW_PORT: Input should be a valid integer"),
        (["--port", "70000"], "--port / GLOW_PORT: Input should be less than or equal to 65535"),
        (["--workers", "0"], "--workers / GLOW_WORKERS: Input should be greater than or equal to 1"),
        (["--max-batch-size", "0"], "--max-batch-size / GLOW_MAX_BATCH_SIZE: Input should be greater than or equal"),
        (["--max-wait-ms", "-1"], "--max-wait-ms / GLOW_MAX_WAIT_MS: Input should be greater than or equal to 0"),
        (["--max-wait-ms", "nan"], "--max-wait-ms / GLOW_MAX_WAIT_MS: Input should be a finite number"),
        (["--request-timeout-s", "0"], "--request-timeout-s / GLOW_REQUEST_TIMEOUT_S: Input should be greater than 0"),
        (["--anomaly-fpr", "1"], "--anomaly-fpr / GLOW_ANOMALY_FPR: Input should be less than 1"),
        (["--anomaly-fpr", "0"], "--anomaly-fpr / GLOW_ANOMALY_FPR: Input should be greater than 0"),
        (["--device", "tpu"], "--device / GLOW_DEVICE: device must be auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "--device / GLOW_DEVICE: device must be auto, cpu, cuda or cuda:N"),
        (["--log-level", "loud"], "--log-level / GLOW_LOG_LEVEL"),
        (["--max-images-per-request", "10", "--max-queue-size", "5"], "could never be queued"),
        (["--max-sample-n", "99", "--max-queue-size", "50"], "could never be queued"),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--port"], "expected one argument"),
    ],
)
def test_bad_values_are_refused_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_args(argv)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOW_MAX_QUEUE_SIZE", "lots")
    with pytest.raises(SettingsError, match="GLOW_MAX_QUEUE_SIZE.*'lots'"):
        Settings.from_args([])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weights", "a b=weights/mnist"], "--weights / GLOW_WEIGHTS: 'a b=weights/mnist': the name"),
        (["--weights", "mnist="], "'mnist=': no checkpoint path"),
        (["--weights", ","], "--weights / GLOW_WEIGHTS: no checkpoint given"),
    ],
)
def test_bad_weights_entries_are_refused_in_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_args(argv)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_weights_flags_repeat_and_a_flag_wins_over_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOW_WEIGHTS", "a=x,b=y")
    assert Settings.from_args([]).weights == ("a=x", "b=y")
    argv = ["--weights", "fashion=weights/fashion-mnist", "--weights", "mnist=weights/mnist"]
    assert Settings.from_args(argv).weights == ("fashion=weights/fashion-mnist", "mnist=weights/mnist")


def test_main_exits_2_with_one_line_for_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-batch-size", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m service: invalid settings: --max-batch-size")


def test_the_readme_lists_every_setting_with_its_default() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        default = str(field.default).lower() if isinstance(field.default, bool) else field.default
        if name == "weights":  # absolute here, relative to the checkout in the README
            default = ",".join(str(Path(path).relative_to(REPO)) for path in default)
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        row = f"| `{flag(name)}` | `{default}` |"
        assert row in readme, f"README's settings table lacks {row}"
