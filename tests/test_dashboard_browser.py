"""The dashboard page in a real headless Chromium: it renders roger state, and its pause
and resume buttons change the stored state (Debian's chromium + chromium-driver, which
.ci/run installs). Skipped, saying why, where no Chromium is installed, except under CI."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from celery_roger import Roger

from .conftest import wait_until
from .test_inspection import dashboard  # noqa: F401 (fixture)

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_pause_and_resume_from_the_page(app_module, run, browser, dashboard, tmp_path):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    roger = Roger(app_module.app)
    queue = f"q-{run}"
    base = dashboard("--token", "s3cret")
    browser.get(base + "/")

    def button(label):
        """The queue's button, or None (also while the page re-renders under us)."""
        try:
            rows = browser.find_elements(By.XPATH,
                                         f"//tr[td[1][normalize-space()='{queue}']]")
            if not rows:
                return None
            found = rows[0].find_elements(By.XPATH,
                                          f".//button[normalize-space()='{label}']")
        except StaleElementReferenceException:
            return None
        return found[0] if found else None

    def click(label):
        """Click the queue's button; the page re-renders every 2 s, so find it afresh."""
        def attempt():
            try:
                found = button(label)
                if found is not None:
                    found.click()
                    return True
            except StaleElementReferenceException:
                pass
            return False
        wait_until(attempt, timeout=15, what=f"the queue's {label} button")

    browser.execute_script("sessionStorage.setItem('rogerToken', 's3cret')")
    click("pause")
    browser.switch_to.alert.accept()  # "Pause q-...?"
    wait_until(lambda: queue in roger.paused_queues(), timeout=10, what="the stored pause")
    wait_until(lambda: button("resume"), timeout=10, what="the resume button")
    shot = tmp_path / "dashboard-paused.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 1000
    click("resume")
    wait_until(lambda: queue not in roger.paused_queues(), timeout=10, what="the resume")
    wait_until(lambda: button("pause"), timeout=10, what="the page to show it resumed")

    # Without the token, the page's action is refused and nothing changes.
    browser.execute_script("sessionStorage.removeItem('rogerToken')")
    click("pause")
    browser.switch_to.alert.accept()
    wait_until(lambda: "refused (401)" in browser.find_element(By.ID, "msg").text,
               timeout=10, what="the refusal shown on the page")
    time.sleep(0.3)
    assert queue not in roger.paused_queues()


def test_the_job_page_explains_why_a_job_is_not_running(app_module, run, r, browser,
                                                        dashboard, worker, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    roger = Roger(app_module.app)
    w = worker()
    key = f"{run}:ek"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 30), execution_key=key)
    parked = app_module.fragile.apply_async((run, "parked"), execution_key=key)
    wait_until(lambda: roger.store.parked_ids(key) == [parked.id], timeout=15, what="parking")
    base = dashboard()
    browser.get(f"{base}/jobs/{parked.id}")
    text = wait_until(lambda: (t := browser.find_element(By.ID, "view").text)
                      and "parked:" in t and t, timeout=15, what="the explanation")
    assert f"held by job {holder.id} on {w.nodename} (alive)" in text
    assert "position 1 of 1" in text
    shot = tmp_path / "dashboard-job.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    roger.cancel(holder.id)
