"""The demo page at `/` (service/static/, service/demo.py), end to end in headless Chromium: upload a
shapes-world image, ask, and find the drawn boxes where the API's answer puts them.

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver) and the `selenium`
package (the dev extra); the browser tests are skipped, saying why, where they are missing. The page's
serving is tested everywhere.
"""

import base64
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model.shapes import generate_scene
from service import render
from service.demo import STATIC


@pytest.fixture(scope="module")
def server(bundled_server):  # tests/conftest.py: the bundled default model
    return bundled_server


def test_page_and_assets_are_served_offline(server):
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in [("demo.js", "text/javascript"), ("demo.css", "text/css")]:
        r = server.get(f"/demo/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert f"/demo/{name}" in page.text
    for path in ("/demo/nothing.js", "/demo/..%2Fdemo.py", "/demo/%2E%2E%2Frest.py", "/demo/"):
        assert server.get(path).status_code == 404, path
    # nothing is fetched from elsewhere: no absolute URL in any of the page's files
    for f in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text(), re.I), f.name
    assert "/demo/" not in json.dumps(server.get("/openapi.json").json()["paths"])


# --- in Chromium -----------------------------------------------------------------------------------------
def _binary(*names: str) -> str | None:
    return next((p for n in names if (p := shutil.which(n))), None)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    chromium, driver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--force-device-scale-factor=1", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


def drop(browser, image: Path) -> None:
    """Drop a file on the page's drop zone, as a user dragging it from their desktop would."""
    browser.execute_script("""
        const [b64, name] = arguments, bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/png"}));
        const zone = document.getElementById("drop");
        for (const type of ["dragenter", "dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", base64.b64encode(image.read_bytes()).decode(), image.name)


def ask(browser, server, image: Path, task: str, expression: str = "", dropped: bool = False,
        grounded: bool = False) -> dict:
    """Load the page, upload (or drop) `image`, choose `task` (a caption grounded or not), run it; -> the JSON
    the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    if dropped:
        drop(browser, image)
        assert browser.execute_script("return document.getElementById('file').files[0].name") == image.name
    else:
        browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.CSS_SELECTOR, f"input[name=task][value={task}]").click()
    box = browser.find_element(By.ID, "grounded")
    if task == "caption" and box.is_selected() != grounded:
        box.click()
    if expression:
        field = browser.find_element(By.ID, "expression")
        field.clear()
        field.send_keys(expression)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.body.dataset.answered") == task
        or d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error", \
        browser.find_element(By.ID, "status").text
    return json.loads(browser.find_element(By.ID, "json").text)


def drawn_boxes(browser) -> tuple[dict, list[dict]]:
    """The image's place on the page and natural size, and each drawn box's place and colour."""
    return browser.execute_script("""
        const img = document.getElementById("image"), r = img.getBoundingClientRect();
        const boxes = [...document.querySelectorAll("#boxes .box")].map((b) => {
          const q = b.getBoundingClientRect();
          return {left: q.left, top: q.top, right: q.right, bottom: q.bottom,
                  colour: getComputedStyle(b).borderTopColor, label: b.textContent};
        });
        return [{left: r.left, top: r.top, width: r.width, height: r.height,
                 natural: [img.naturalWidth, img.naturalHeight]}, boxes];""")


def expected_rect(img: dict, box) -> list[float]:
    sx, sy = img["width"] / img["natural"][0], img["height"] / img["natural"][1]
    return [img["left"] + box[0] * sx, img["top"] + box[1] * sy, img["left"] + box[2] * sx,
            img["top"] + box[3] * sy]


def assert_no_console_errors(browser):
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_refer_box_is_drawn_where_the_api_puts_it(browser, server, tmp_path):
    scene = generate_scene(0)  # 365 x 313: not square
    path = tmp_path / "scene.png"
    scene.image.save(path)
    expression = scene.expressions[0]
    shown = ask(browser, server, path, "refer", expression)
    api = httpx.post(server.url + "/v1/refer", files={"image": path.read_bytes()},
                     data={"expression": expression}, timeout=30).json()
    assert shown["expression"] == api["expression"] == expression
    assert shown["box"] == pytest.approx(api["box"])

    img, boxes = drawn_boxes(browser)
    assert img["natural"] == [scene.width, scene.height] and img["width"] > 100
    (box,) = boxes
    got = [box["left"], box["top"], box["right"], box["bottom"]]
    assert got == pytest.approx(expected_rect(img, api["box"]), abs=1.0)
    assert box["colour"] == "rgb({}, {}, {})".format(*render.PALETTE[0]) and box["label"] == expression
    assert_no_console_errors(browser)


def test_ground_regions_and_exif_rotated_upload(browser, server, tmp_path):
    """A JPEG stored sideways with EXIF orientation 6: the browser shows it upright, as the server reads it,
    so the proposals' boxes land on the same pixels in both."""
    scene = generate_scene(4)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    path = tmp_path / "sideways.jpg"
    scene.image.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(path.read_bytes())).size == (scene.height, scene.width)  # as stored

    shown = ask(browser, server, path, "ground")
    api = httpx.post(server.url + "/v1/ground", files={"image": path.read_bytes()}, timeout=30).json()
    assert [r["text"] for r in shown["regions"]] == [r["text"] for r in api["regions"]]
    img, boxes = drawn_boxes(browser)
    assert img["natural"] == [scene.width, scene.height]  # upright, as the server measured it
    assert len(boxes) == len(api["regions"]) >= 1
    for i, (box, region) in enumerate(zip(boxes, api["regions"], strict=True)):
        got = [box["left"], box["top"], box["right"], box["bottom"]]
        assert got == pytest.approx(expected_rect(img, region["box"]), abs=1.0)
        assert box["colour"] == "rgb({}, {}, {})".format(*render.colour(i))


def test_grounded_caption_phrases_are_drawn_where_the_api_puts_them(browser, server, tmp_path):
    """Each object phrase of a grounded caption: its box drawn on the image, labelled with the phrase, and the
    phrase written in the caption in its box's colour."""
    from selenium.webdriver.common.by import By

    scene = generate_scene(2)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    shown = ask(browser, server, path, "caption", grounded=True)
    api = httpx.post(server.url + "/v1/caption", files={"image": path.read_bytes()}, data={"grounded": "true"},
                     timeout=30).json()
    assert shown["caption"] == api["caption"] and [p["text"] for p in shown["phrases"]] == \
        [p["text"] for p in api["phrases"]]
    boxed = [p for p in api["phrases"] if p["box"] is not None]
    assert boxed, "the bundled model grounds the phrases of a scene it captions"
    img, boxes = drawn_boxes(browser)
    assert len(boxes) == len(boxed)
    for i, (box, phrase) in enumerate(zip(boxes, boxed, strict=True)):
        got = [box["left"], box["top"], box["right"], box["bottom"]]
        assert got == pytest.approx(expected_rect(img, phrase["box"]), abs=1.0)
        assert box["colour"] == "rgb({}, {}, {})".format(*render.colour(i)) and box["label"] == phrase["text"]
    spans = browser.find_elements(By.CSS_SELECTOR, "#caption .phrase")
    assert [e.text for e in spans] == [p["text"] for p in boxed]
    assert [e.value_of_css_property("color") for e in spans] == \
        ["rgba({}, {}, {}, 1)".format(*render.colour(i)) for i in range(len(boxed))]
    assert browser.find_element(By.ID, "caption").text == api["caption"]
    assert_no_console_errors(browser)


def test_dropped_image_caption_and_an_error_are_shown(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "scene.png"
    generate_scene(3).image.save(path)
    shown = ask(browser, server, path, "caption", dropped=True)
    assert shown["caption"] and browser.find_element(By.ID, "caption").text == shown["caption"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#boxes .box")

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    browser.find_element(By.ID, "file").send_keys(str(junk))
    browser.find_element(By.ID, "run").click()
    status = browser.find_element(By.ID, "status")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: status.get_attribute("class") == "error")
    assert "400 bad_image" in status.text


def test_the_page_sends_the_api_key_it_is_given(browser, tmp_path):
    """With LOCCA_API_KEYS on, the page's calls are refused until a key is typed in, then answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from service import launch

    key = "demo-key-0123456789abcdef"
    path = tmp_path / "scene.png"
    generate_scene(5).image.save(path)
    with launch.launch(tmp_path / "serve.log", model="models/locca-tiny-shapes", backend="torch", threads=1,
                       api_keys=key) as keyed:
        browser.get_log("browser")  # drop what earlier tests left in the log
        browser.get(keyed.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(path))
        browser.find_element(By.ID, "run").click()
        status = browser.find_element(By.ID, "status")
        WebDriverWait(browser, 30).until(lambda d: status.get_attribute("class") == "error")
        assert "401" in status.text
        browser.find_element(By.ID, "api_key").send_keys(key)
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.answered"))
        assert json.loads(browser.find_element(By.ID, "json").text)["caption"]
        WebDriverWait(browser, 10).until(lambda d: "step" in d.find_element(By.ID, "model").text)
    # the refused calls (the model line and the first run, before the key) are the only errors
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe and all("401" in m for m in severe), severe
