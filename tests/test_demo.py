"""--demo: the page's answer equals --predict's, and the page works in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import lenet
import utils
from conftest import REQUIRE_OPTIONAL, offline_env, optional

ROOT = Path(__file__).resolve().parents[1]
optional("gradio", "pip install gradio")
import demo  # noqa: E402


def drawn_digit() -> Image.Image:
    """A stroke as the page's canvas hands it over: black ink on a transparent 280 x 280 picture."""
    picture = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(picture).line([(150, 50), (135, 150), (120, 230)], fill=(0, 0, 0, 255), width=18)
    return picture


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "run"
    lenet.main(["--dataset", "fake", "--limit", "64", "--epochs", "1", "--out-dir", str(folder)])
    return folder


def test_the_page_answers_a_drawn_digit_as_predict_does(trained_run, tmp_path, monkeypatch):
    answers = {}

    def serve_once(model, layer, data, run, precision, resize, args):  # what the page would run, without the server
        answers["page"] = demo.answer(drawn_digit(), model, layer, data, precision, resize)
        return {}

    monkeypatch.setattr(demo, "serve", serve_once)
    lenet.main(["--demo", "--out-dir", str(trained_run)])
    drawn_digit().save(tmp_path / "digit.png")
    predicted = lenet.main(["--predict", str(tmp_path / "digit.png"), "--out-dir", str(trained_run)])
    top, seen, cam = answers["page"]
    expected = {one["class"]: one["percent"] / 100 for one in predicted["predictions"][0]["top"]}
    assert list(top) == list(expected) and len(top) == 3, "the same classes, in the same order"
    assert list(top.values()) == pytest.approx(list(expected.values()), rel=1e-6)
    assert seen.shape == cam.shape == (28 * 8, 28 * 8, 3)
    as_predict_sees_it = utils.prepare_image(drawn_digit(), (1, 28, 28))[0].numpy()
    assert (seen[::8, ::8, 0] == as_predict_sees_it).all() and as_predict_sees_it.max() > 200, "what the network saw"


def test_demo_without_gradio_or_of_several_runs_is_refused_in_one_sentence(trained_run, capsys, monkeypatch):
    with pytest.raises(SystemExit) as error:
        lenet.main(["--demo", "--seeds", "1,2", "--out-dir", str(trained_run)])
    assert error.value.code == 2 and "--demo serves one run" in capsys.readouterr().err
    found = utils.importlib.util.find_spec
    monkeypatch.setattr(utils.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else found(name, *a))
    with pytest.raises(SystemExit) as error:
        lenet.main(["--demo", "--out-dir", str(trained_run)])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "pip install gradio" in err and "Traceback" not in err


@pytest.mark.skipif(not (REQUIRE_OPTIONAL or shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="the browser test needs Chromium and ChromeDriver (Debian: chromium chromium-driver)")
def test_the_page_in_headless_chromium_answers_a_stroke_on_its_canvas(trained_run, tmp_path):
    webdriver = optional("selenium.webdriver", "pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "lenet.py", "--demo", "--out-dir", str(trained_run)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**offline_env(), "GRADIO_ANALYTICS_ENABLED": "False"})
    browser = None
    try:
        lines = []
        while not lines or "Ctrl-C stops it" not in lines[-1]:
            lines.append(server.stdout.readline())
            assert lines[-1], "the demo stopped before serving:\n" + "".join(lines)
        address = re.search(r"is at (http://127\.0\.0\.1:\d+/)", lines[-1]).group(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
        browser.get(address)
        wait = WebDriverWait(browser, 60)
        brush = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]"))
        wait.until(lambda page: "highlight" in brush.get_attribute("class"))  # the page hands over the brush
        canvas = max(browser.find_elements(By.CSS_SELECTOR, "canvas"), key=lambda element: element.size["height"])
        (webdriver.ActionChains(browser).move_to_element_with_offset(canvas, 0, -70).click_and_hold()
         .move_by_offset(8, 40).move_by_offset(8, 40).move_by_offset(4, 30).release().perform())
        def answered(page) -> list[str]:  # the label's rows, between its title and the next: a class, its probability
            text = page.find_element(By.TAG_NAME, "body").text
            label = text[text.index("top 3 classes"):text.index("what the network saw")]
            return re.findall(r"^.+\n\d+(?:\.\d+)?%$", label, re.MULTILINE)
        rows = wait.until(lambda page: len(answered(page)) == 3 and answered(page))
        assert len(rows) == 3, "three classes, each with its probability"
        shown = [image for image in browser.find_elements(By.TAG_NAME, "img")
                 if "/gradio_api/file=" in (image.get_attribute("src") or "")]
        assert len(shown) == 2, "what the network saw, and its Grad-CAM map"
        browser.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        if browser is not None:
            browser.quit()
        server.send_signal(signal.SIGINT)  # Ctrl-C stops it
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0 and "Demo stopped." in out, out
