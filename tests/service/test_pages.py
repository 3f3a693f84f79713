"""The web page in a real browser: Debian's chromium driven by Playwright, against ``python -m service``
on 127.0.0.1 with the shipped Fashion-MNIST weights. Skipped, with the reason, without either."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_testing import REPO, ServerProcess, make_checkpoint, random_pixels, to_png, wait_until

from model.data import load_images

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
MNIST_TEST = REPO.parent / "shared/data/mnist/t10k-images-idx3-ubyte.gz"
TIMEOUT_MS = 120_000  # the shared CI machine can be slow


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first Fashion-MNIST test image and the first MNIST test digit, as PNG files."""
    for path in (FASHION_TEST, MNIST_TEST):
        if not path.is_file():
            pytest.skip(f"{path} is not here")
    folder = tmp_path_factory.mktemp("page-images")
    out = {}
    for name, path in (("fashion", FASHION_TEST), ("digit", MNIST_TEST)):
        out[name] = folder / f"{name}.png"
        out[name].write_bytes(to_png(load_images(path)[0]))
    return out


def started(weights: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(["--weights", str(weights), "--max-batch-size", "8"])
    try:
        process.wait_listening()
        wait_until(lambda: httpx.get(f"{process.url}/readyz").status_code == 200, timeout_s=120)
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    yield from started(Path("weights/fashion-mnist"))


@pytest.fixture(scope="module")
def conditional_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A tiny class-conditional checkpoint's service (classes "cat" and "dog")."""
    yield from started(make_checkpoint(tmp_path_factory.mktemp("conditional-page"), seed=1, labels=("cat", "dog")))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


def opened(browser: Any, server: ServerProcess) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    assert all(url.startswith(server.url) or url.startswith(("data:", "blob:")) for url in requests), requests
    page.close()


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[Any]:
    yield from opened(browser, server)


def test_an_unconditional_model_offers_no_class(page: Any) -> None:
    assert page.is_hidden("#label-picker")


def test_a_class_conditional_model_samples_the_class_chosen_and_names_the_predicted_one(
    browser: Any, conditional_server: ServerProcess, tmp_path: Path
) -> None:
    for page in opened(browser, conditional_server):
        assert page.is_visible("#label-picker")
        options = page.eval_on_selector_all("#label-select option", "options => options.map(o => o.value)")
        assert options == ["", "cat", "dog"]
        page.select_option("#label-select", "dog")
        page.wait_for_selector("#sample-grid[data-label='dog']")
        shown = page.eval_on_selector_all("#sample-grid img", "images => images.map(i => i.src.split(',')[1])")
        expected = httpx.get(f"{conditional_server.url}/sample",
                             params={"n": len(shown), "seed": 0, "temperature": 0.7, "label": "dog"}).json()
        assert shown == expected["images"]
        (tmp_path / "x.png").write_bytes(to_png(random_pixels(1, seed=4)[0]))
        page.set_input_files("#score-files", str(tmp_path / "x.png"))
        page.wait_for_selector("#score-results li")
        assert "predicted class" in page.inner_text("#score-results li")


def test_a_fashion_image_and_a_digit_get_different_verdicts(page: Any, images: dict[str, Path]) -> None:
    page.set_input_files("#score-files", str(images["fashion"]))
    page.wait_for_selector("#score-results li:nth-child(1)")
    page.set_input_files("#score-files", str(images["digit"]))
    page.wait_for_selector("#score-results li:nth-child(2)")
    newest, oldest = page.locator("#score-results li").all()
    assert oldest.get_attribute("data-verdict") == "typical"
    assert newest.get_attribute("data-verdict") == "anomalous"
    assert "percentile" in newest.inner_text() and newest.locator("img").count() == 2  # image and heatmap overlay


def test_the_drop_zone_opens_the_file_picker_from_the_keyboard(page: Any) -> None:
    # the click on the (hidden) file input is what opens the picker; recorded rather than waiting for the
    # browser's file-chooser event, which a loaded machine delayed past any timeout once
    page.evaluate("document.getElementById('score-files').addEventListener('click', e => {"
                  " e.preventDefault(); document.body.dataset.picked = 'true'; })")
    page.press("#drop-zone", "Enter")  # focuses it, then the key
    page.wait_for_selector("body[data-picked=true]")
    assert page.get_attribute("#score-files", "multiple") is not None


def test_moving_the_temperature_slider_draws_new_samples(page: Any) -> None:
    page.wait_for_selector("#sample-grid img")
    before = page.eval_on_selector_all("#sample-grid img", "images => images.map(i => i.src)")
    assert len(before) == 16
    page.focus("#temperature")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_selector("#sample-grid[data-temperature='0.85']")
    after = page.eval_on_selector_all("#sample-grid img", "images => images.map(i => i.src)")
    assert len(after) == 16 and not set(after) & set(before)
    assert page.inner_text("#temperature-value") == "0.85"


def test_the_round_trip_shows_the_same_pixels(page: Any, images: dict[str, Path]) -> None:
    page.set_input_files("#roundtrip-file", str(images["fashion"]))
    page.wait_for_selector("#roundtrip-result[data-same]")
    assert page.get_attribute("#roundtrip-result", "data-same") == "true"
    assert "same pixels" in page.inner_text("#roundtrip-result")


def test_the_model_card_and_a_narrow_screen(page: Any) -> None:
    assert "fashion-mnist" in page.inner_text("#model-card")
    assert page.is_hidden("#model-picker")  # one model served (GET /models absent or listing one)
    page.set_viewport_size({"width": 360, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_docs_render_offline(browser: Any, server: ServerProcess) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url) else route.abort())
    page.goto(f"{server.url}/docs")
    page.wait_for_selector("text=/log-likelihood")
    page.close()
