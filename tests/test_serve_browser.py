"""The Gradio demo end to end in headless Chromium (Debian's chromium + chromium-driver, via selenium).

Screenshots go to tests/artifacts/. Skipped only where chromium or its driver is not installed
(`apt-get install chromium chromium-driver`; CI installs both in .ci/run).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import ElementClickInterceptedException, NoSuchElementException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import janus
from janus.serve import create_app, serve_in_background
from janus.testing import save_tiny_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = janus.load(save_tiny_checkpoint(tmp_path_factory.mktemp("browser") / "tiny"), device="cpu")
    step = model._step

    def slow_step(*args, **kwargs):  # the tiny model is too quick to ever show a progress bar
        time.sleep(0.05)
        return step(*args, **kwargs)

    model._step = slow_step
    with serve_in_background(create_app(model, model_name="tiny")) as address:
        yield address


@pytest.fixture(scope="module")
def browser(url):  # after the server starts, closed before it stops
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        # The closed network here refuses Chromium's background connections: switch them all off.
        for flag in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1280,1000",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))
    print(f"screenshot: {ARTIFACTS / name}")


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def click(driver, by: str, selector: str, timeout: float = 60) -> None:
    """Click once the element exists and nothing covers it: while Gradio lays the page out, the header
    can sit over the tabs for a moment, and Chromium then refuses the click."""

    def clicked(d) -> bool:
        d.find_element(by, selector).click()
        return True

    ignored = (ElementClickInterceptedException, NoSuchElementException)
    WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(clicked)


def answered(driver) -> list:
    return [a for a in driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]') if a.text.strip()]


def idle(driver, element_id: str) -> bool:
    """Gradio hides a component's status tracker once its event has finished."""
    tracker = driver.find_element(By.CSS_SELECTOR, f'#{element_id} [data-testid="status-tracker"]')
    return "hide" in tracker.get_attribute("class").split()


def test_chat_with_an_uploaded_image_streams_answers_over_two_turns(browser, url, tmp_path):
    picture = tmp_path / "blue-square.png"
    Image.new("RGB", (64, 64), (40, 60, 220)).save(picture)
    browser.get(url + "/")
    box = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chat-input textarea"))
    browser.find_element(By.CSS_SELECTOR, "#chat-input input[type=file]").send_keys(str(picture))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input img"))  # the upload's thumbnail
    for turn, question in enumerate(["What colour is the square?", "And how big is it?"], start=1):
        box.send_keys(question, Keys.ENTER)
        wait(browser, lambda d: len(answered(d)) >= turn and idle(d, "chatbot"))  # the answer has streamed in
        assert len(answered(browser)) == turn
        assert question in browser.find_element(By.ID, "chatbot").text
    assert browser.find_elements(By.CSS_SELECTOR, "#chatbot img")  # the uploaded image is shown in the conversation
    screenshot(browser, "serve-chat.png")


def test_generate_shows_progress_then_images_in_the_gallery(browser, url):
    browser.get(url + "/")
    click(browser, By.XPATH, "//button[@role='tab' and text()='Generate']")
    prompt = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys("a red circle above a blue square")
    click(browser, By.ID, "generate")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery [role=progressbar]"))
    screenshot(browser, "serve-generate-progress.png")
    images = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .gallery-item img"))
    assert len(images) == 4  # the default number of images
    wait(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im) for im in images))
    screenshot(browser, "serve-generate.png")
