"""The playground page at `/`: served (and turned off) by the app, and used
for real in headless Chromium (Debian's chromium + chromedriver, driven by
selenium; `scripts/browser-setup.sh` installs them) against a real server on
the tiny checkpoint."""

import os
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from qwen_vl.api.app import create_app
from qwen_vl.api.grounding import parse_grounding
from qwen_vl.demo.scenes import evaluation_scene
from qwen_vl.demo.tasks import iou
from qwen_vl.server.settings import parse
from tests.helpers import API_KEY, assert_error

# Where the browser test leaves its screenshots (CI keeps the folder as an artifact).
ARTIFACTS = Path(os.environ.get("QWEN_VL_TEST_ARTIFACTS", Path(__file__).parent.parent / "artifacts"))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ANSWER_TIMEOUT = 180  # seconds: the machine may be busy with other engines
# What the page's "ground" toggle asks for, as a whole answer.
GROUNDED_ANSWER = re.compile(r"<ref>[^<]{1,40}</ref><box>\(\d{1,3},\d{1,3}\),\(\d{1,3},\d{1,3}\)</box>")


def app_client(*flags: str) -> TestClient:
    """The app without its engine (its lifespan is not entered): enough for the page."""
    settings = parse(["--model", "unused", "--api-key", API_KEY, *flags]).api
    return TestClient(create_app(settings, engine=None))


def test_the_page_and_its_assets_load_without_a_key():
    client = app_client()
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/static/playground.js" in page.text and "/static/playground.css" in page.text
    # Nothing from elsewhere: the page works offline.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    script = client.get("/static/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/playground.css").status_code == 200
    # The API itself still wants the key.
    assert_error(client.get("/v1/models"), 401, code="invalid_api_key")


def test_no_playground_turns_the_page_off():
    client = app_client("--no-playground")
    assert_error(client.get("/"), 404)
    assert_error(client.get("/static/playground.js"), 404)


def test_the_environment_turns_the_page_off(monkeypatch):
    monkeypatch.setenv("QWEN_VL_NO_PLAYGROUND", "1")
    assert_error(app_client().get("/"), 404)


# ---- in a real browser --------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = "Debian's chromium and chromium-driver are not installed: run `bash scripts/browser-setup.sh`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1500",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # An explicit driver path: selenium then never looks for (or downloads) one.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "chromedriver.log"
    # An explicit driver path: selenium then never looks for (or downloads) one.
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(log)), options=options)
    except Exception as error:
        # Say why: the machine's other processes may starve or kill it (out of memory).
        raise RuntimeError(f"chromium did not start: {error}\nchromedriver's log:\n{log.read_text()[-3000:]}") from error
    # A 2-core machine busy with vLLM engines has taken minutes over one page load (selenium waits 120 s).
    driver.command_executor.client_config.timeout = 600
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two PNGs of different sizes, each with a shape to point at."""
    root = tmp_path_factory.mktemp("pictures")
    first = Image.new("RGB", (640, 400), "#dfe8f5")
    ImageDraw.Draw(first).ellipse((380, 120, 560, 300), fill="#d33")
    second = Image.new("RGB", (360, 480), "#f5efdf")
    ImageDraw.Draw(second).rectangle((60, 200, 260, 420), fill="#2a62c9")
    paths = [root / "circle.png", root / "square.png"]
    first.save(paths[0])
    second.save(paths[1])
    return paths, [first.size, second.size]


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(root, css: str):
    from selenium.webdriver.common.by import By

    return root.find_elements(By.CSS_SELECTOR, css)


def set_field(driver, css: str, value: str) -> None:
    field = find(driver, css)
    field.clear()
    field.send_keys(value)


def ask(driver, question: str) -> object:
    """Types the question, sends it; returns the new assistant turn once it has finished."""
    before = len(find_all(driver, ".turn.assistant"))
    set_field(driver, "#prompt", question)
    find(driver, "#send").click()
    wait_for(driver, lambda d: len(find_all(d, ".turn.assistant")) == before + 1)
    turn = find_all(driver, ".turn.assistant")[-1]
    wait_for(driver, lambda d: turn.get_attribute("data-state") != "streaming", ANSWER_TIMEOUT)
    return turn


def rect(driver, node) -> dict:
    return driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height};", node
    )


def assert_boxes_drawn_at(driver, turn, answer: str, image_index: int, size: tuple[int, int]) -> None:
    """Every box of the answer is drawn over image `image_index` (of `size`
    pixels) where its pixels fall, scaled to the displayed size."""
    expected = [b.to_pixels(*size) for b in parse_grounding(answer)]
    assert expected, answer
    figure = find(turn, ".grounded")
    picture = find(figure, "img")
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", picture) == list(
        size
    )
    drawn = find_all(figure, ".box")
    assert len(drawn) == len(expected)
    shown = rect(driver, picture)
    sx, sy = shown["w"] / size[0], shown["h"] / size[1]
    for node, (x1, y1, x2, y2) in zip(drawn, expected):
        assert node.get_attribute("data-image-index") == str(image_index)
        box = rect(driver, node)
        assert box["x"] == pytest.approx(shown["x"] + x1 * sx, abs=1.5)
        assert box["y"] == pytest.approx(shown["y"] + y1 * sy, abs=1.5)
        assert box["w"] == pytest.approx((x2 - x1) * sx, abs=1.5)
        assert box["h"] == pytest.approx((y2 - y1) * sy, abs=1.5)


def script_errors(driver) -> list[str]:
    """The page's uncaught errors and policy violations (a 401 the page handles is not one)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    return path


def test_a_grounded_chat_in_the_browser_draws_the_boxes_on_the_picture(browser, server, pictures):
    paths, sizes = pictures
    browser.get(f"{server}/")
    # The server has keys: the page loads, the API answers 401, and the page asks for a key.
    wait_for(browser, lambda d: "needed" in find(d, "#key-form").get_attribute("class"))
    set_field(browser, "#api-key", API_KEY)
    find(browser, "#save-key").click()
    wait_for(browser, lambda d: find(d, "#model").text == "qwen-vl-tiny")

    # Two images in one turn, through the file input; the boxes refer to the last one.
    find(browser, "#images").send_keys("\n".join(str(p) for p in paths))
    wait_for(browser, lambda d: len(find_all(d, "#attachments img")) == 2)
    set_field(browser, "#max-tokens", "96")
    find(browser, "#ground").click()
    turn = ask(browser, "框出图中的蓝色方块 (the blue square)")
    assert turn.get_attribute("data-state") == "done", find(turn, ".status").text
    answer = find(turn, ".text").text
    assert GROUNDED_ANSWER.fullmatch(answer), answer
    assert_boxes_drawn_at(browser, turn, answer, 1, sizes[1])

    # A second turn without images: the history (and its images) goes along,
    # so the boxes land on the first turn's last image again.
    turn = ask(browser, "And where is it now?")
    assert turn.get_attribute("data-state") == "done", find(turn, ".status").text
    answer = find(turn, ".text").text
    assert GROUNDED_ANSWER.fullmatch(answer), answer
    assert_boxes_drawn_at(browser, turn, answer, 1, sizes[1])
    # The first turn (its images included) came from the prefix cache, and the page says so.
    usage = re.search(r"(\d+) prompt tokens \((\d+) cached\)", find(turn, ".status").text)
    assert usage, find(turn, ".status").text
    assert 0 < int(usage[2]) < int(usage[1])
    screenshot(browser, "playground.png")
    assert script_errors(browser) == []


def red_circle_scene(first_seed: int = 6000):
    """The first evaluation scene (from `first_seed`) with a red circle in it: (scene, the circle)."""
    for seed in range(first_seed, first_seed + 200):
        scene = evaluation_scene(seed)
        circles = [s for s in scene.shapes if s.name == "red circle"]
        if circles:
            return scene, circles[0]
    raise AssertionError("no red circle in 200 evaluation scenes")


def test_the_demo_draws_its_box_on_the_red_circle(browser, demo_server, tmp_path):
    """The shipped demo, asked in the page where the red circle is, answers with a box, and the
    box drawn on the picture covers the circle (IoU >= 0.5 with where the scene drew it)."""
    scene, circle = red_circle_scene()
    picture = tmp_path / "scene.png"
    scene.image.save(picture)
    browser.get(f"{demo_server}/")
    wait_for(browser, lambda d: "needed" in find(d, "#key-form").get_attribute("class"))
    set_field(browser, "#api-key", API_KEY)
    find(browser, "#save-key").click()
    wait_for(browser, lambda d: find(d, "#model").text == "qwen-vl-demo")
    find(browser, "#images").send_keys(str(picture))
    wait_for(browser, lambda d: len(find_all(d, "#attachments img")) == 1)
    turn = ask(browser, "Where is the red circle?")
    assert turn.get_attribute("data-state") == "done", find(turn, ".status").text
    answer = find(turn, ".text").text
    assert_boxes_drawn_at(browser, turn, answer, 0, scene.image.size)
    # Where the page drew it, in the picture's pixels.
    figure = find(turn, ".grounded")
    shown, [drawn] = rect(browser, find(figure, "img")), [rect(browser, n) for n in find_all(figure, ".box")]
    sx, sy = scene.width / shown["w"], scene.height / shown["h"]
    x1, y1 = (drawn["x"] - shown["x"]) * sx, (drawn["y"] - shown["y"]) * sy
    box = (x1, y1, x1 + drawn["w"] * sx, y1 + drawn["h"] * sy)
    assert iou(box, circle.box) >= 0.5, (answer, box, circle.box)
    screenshot(browser, "playground-demo.png")
    assert script_errors(browser) == []


def test_stop_aborts_the_streamed_answer(browser, server):
    browser.get(f"{server}/")
    if find(browser, "#ground").is_selected():
        find(browser, "#ground").click()
    # The key from the last test is only in that page's memory; give it again.
    wait_for(browser, lambda d: "needed" in find(d, "#key-form").get_attribute("class"))
    set_field(browser, "#api-key", API_KEY)
    find(browser, "#save-key").click()
    wait_for(browser, lambda d: find(d, "#model").text == "qwen-vl-tiny")
    set_field(browser, "#max-tokens", "1500")
    set_field(browser, "#prompt", "Tell me a long story.")
    find(browser, "#send").click()
    turn = wait_for(browser, lambda d: (find_all(d, ".turn.assistant") or [None])[-1])
    wait_for(browser, lambda d: find(turn, ".text").text, ANSWER_TIMEOUT)
    find(browser, "#stop").click()
    wait_for(browser, lambda d: turn.get_attribute("data-state") != "streaming")
    assert turn.get_attribute("data-state") == "stopped"
    assert find(browser, "#send").is_enabled() and not find(browser, "#stop").is_enabled()
    stopped_at = find(turn, ".text").text
    assert stopped_at
    # Nothing arrives after the stop.
    time.sleep(1.0)
    assert find(turn, ".text").text == stopped_at


def test_pasted_images_are_attached(browser, server):
    browser.get(f"{server}/")
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement("canvas");
        canvas.width = 30;
        canvas.height = 20;
        canvas.toBlob((blob) => {
            const clipboard = new DataTransfer();
            for (const name of ["a.png", "b.png"]) clipboard.items.add(new File([blob], name, {type: "image/png"}));
            document.getElementById("prompt").dispatchEvent(
                new ClipboardEvent("paste", {clipboardData: clipboard, bubbles: true}));
            done();
        }, "image/png");
    """)
    wait_for(browser, lambda d: len(find_all(d, "#attachments img")) == 2)
    sizes = browser.execute_script("return [...document.querySelectorAll('#attachments img')]"
                                   ".map((img) => [img.naturalWidth, img.naturalHeight])")
    assert sizes == [[30, 20], [30, 20]]
