"""The playground page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by selenium loads /, submits a prompt and reads the final text.

Where the browser or selenium is missing the test is skipped with the reason; `.ci/run`
installs both.
"""

from __future__ import annotations

import shutil

import pytest

from elfctl.runs import load_for_sampling
from tests.serve_fixture import running
from tests.test_golden import random_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "Headless Chromium is not installed here (apt-get install chromium chromium-driver), "
        "so the playground cannot be tested in a browser.",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install 'elfctl[serve-test]')"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PAGE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


def test_the_playground_shows_the_text_forming_and_a_final_text_that_starts_with_the_prompt(
    browser, tmp_path
):
    ckpt = random_checkpoint(tmp_path, "tiny")
    loaded = load_for_sampling(str(ckpt), None, None, "cpu", for_prompting=True)
    with running(loaded, frames=4) as (base, _):
        browser.get(base + "/")
        WebDriverWait(browser, PAGE_TIMEOUT_S).until(
            lambda d: d.find_element(By.ID, "model").text == "serving tiny"
        )
        browser.find_element(By.ID, "prompt").send_keys("the dog")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("8")
        browser.find_element(By.ID, "go").click()
        final = browser.find_element(By.ID, "final")
        WebDriverWait(browser, PAGE_TIMEOUT_S).until(
            lambda d: final.get_attribute("data-done") != "false"
        )
        status = browser.find_element(By.ID, "status").text
        assert final.get_attribute("data-done") == "true", status
        assert final.text.startswith("the dog")
        assert browser.find_element(By.ID, "step").text == "step 8 of 8"  # frames were shown
        assert browser.find_element(By.ID, "live").text == final.text
