"""The dashboard page in a real headless Chromium: it renders roger state, and its pause
and resume buttons change the stored state (Debian's chromium + chromium-driver, which
.ci/run installs). Skipped, saying why, where no Chromium is installed, except under CI."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from celery_roger import Roger

from .conftest import wait_until
from .test_inspection import dashboard  # noqa: F401 (fixture)

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def click_fresh(find, what):
    """Click the element ``find()`` returns; the page re-renders every 2 s, so it is found
    afresh until a click lands."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt():
        try:
            found = find()
            if found is not None:
                found.click()
                return True
        except StaleElementReferenceException:
            pass
        return False

    wait_until(attempt, timeout=15, what=what)


def chromium(width: int = 1280, height: int = 900):
    """A headless Chromium (Debian's, through chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver")
    driver = chromium()
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
        click_fresh(lambda: button(label), f"the queue's {label} button")

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
    browser.switch_to.alert.accept()  # "Resume q-...?"
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
    base = dashboard("--flower-url", "http://flower.test:5555/")
    browser.get(f"{base}/jobs/{parked.id}")
    text = wait_until(lambda: (t := browser.find_element(By.ID, "view").text)
                      and "parked:" in t and t, timeout=15, what="the explanation")
    assert f"held by job {holder.id} on {w.nodename} (alive)" in text
    assert "position 1 of 1" in text
    # its history, as a timeline: parked behind the holder (lib.lua's history)
    assert f"behind execution key {key} at position 1, held by {holder.id}" in text, text
    # --flower-url: the job links to its Flower page
    links = {a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a.flower")}
    assert f"http://flower.test:5555/task/{parked.id}" in links, links
    shot = Path(os.environ.get("ROGER_SCREENSHOTS") or tmp_path) / "console-job.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    roger.cancel(holder.id)


def test_the_overview_shows_slots_rates_and_throttles(
        app_module, run, browser, dashboard, worker):  # noqa: F811

    roger = Roger(app_module.app)
    worker(concurrency=4)
    ek, rk, qk = f"{run}:tenant", f"{run}:api", f"{run}:digest"
    holders = [app_module.fragile.apply_async((run, f"h{i}", "sleep", 30), execution_key=ek,
                                              execution_limit=2) for i in range(2)]
    rated = [app_module.fragile.apply_async((run, f"r{i}"), rate="1/h", rate_key=rk)
             for i in range(3)]
    throttled = app_module.fragile.apply_async((run, "t"), queue_key=qk, queue_key_until=600)
    roger.set_limit("execution", ek, 2)
    wait_until(lambda: roger.store.redis.llen(roger.store.ratewait_key(rk)) == 2, timeout=20,
               what="two waiting on the rate")
    browser.get(dashboard())

    def rows():  # read in one script: the view may be rebuilt between two reads
        return browser.execute_script(
            "return [...document.querySelectorAll('#view tr')].map(tr => [...tr.cells]"
            ".map(td => td.innerText))")

    found = wait_until(lambda: (r := rows()) and any(row[:1] == [rk] for row in r) and r,
                       timeout=15, what="the rate key's row")
    assert [rk, "its jobs' own", "2"] == next(r for r in found if r[:1] == [rk])[:3], found
    slots = sorted(r[1] for r in found if r[:1] == [ek])
    assert slots == ["1", "2"], found
    assert all(r[2] == "2 (live)" for r in found if r[:1] == [ek]), found
    assert any(r[:2] == [qk, throttled.id] for r in found), found
    for job in (*holders, *rated):
        roger.cancel(job.id)
    roger.set_limit("execution", ek, None)


# -- crafted values: job ids, queue names, keys, arguments, errors, the partition ----------

#: Run in every new document before its own scripts: records each dialog and each
#: Content-Security-Policy violation, so a test sees an injection that fired and one that
#: only the CSP stopped (both fail it).
RECORDER = """
window.__seen = [];
for (const name of ["alert", "confirm", "prompt"]) {
  const original = window[name];
  window[name] = function (message) {
    window.__seen.push(name + ": " + message);
    return original.apply(this, arguments);
  };
}
document.addEventListener("securitypolicyviolation", (e) =>
  window.__seen.push("csp: " + e.violatedDirective + " " + e.blockedURI));
"""

#: What an injection would leave in the page: elements or handlers no roger page makes.
INJECTED = ("return [...document.querySelectorAll('img, iframe, object, embed, "
            "script:not([src]), [onerror], [onclick], [onload], [onmouseover]')]"
            ".map(e => e.outerHTML)")

FIND_BUTTON = """
const [first, label] = arguments;
for (const tr of document.querySelectorAll('#view tr')) {
  if (tr.cells.length && tr.cells[0].textContent === first) {
    return [...tr.querySelectorAll('button')].find(b => b.textContent === label) || null;
  }
}
return null;
"""

HAS_CELL = ("return [...document.querySelectorAll('#view td')]"
            ".some(td => td.textContent === arguments[0])")


def steal_payload(victim: str) -> str:
    """A job id that, rendered into an inline ``onclick="act('...')"`` (the old page), pauses
    ``victim`` with the operator's token: only characters that encodeURIComponent keeps."""
    import base64

    for pad in range(100):
        path = f"/api/roger/queues/{victim}{'-' * pad}/pause"
        encoded = base64.b64encode(path.encode()).decode()
        if encoded.isalnum():
            return f"x')-act(atob('{encoded}'))-('", f"{victim}{'-' * pad}"
    raise AssertionError("no clean base64")


@pytest.fixture
def recording(browser):
    """The browser, recording dialogs and CSP violations in every page it loads."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    return browser


class Page:
    """The page under test: find and click buttons while it re-renders every 2 s, take
    the confirm it asks, and check nothing was injected."""

    def __init__(self, browser):
        self.browser = browser
        self.seen: list[str] = []

    def open(self, url):
        self.collect()
        self.browser.get(url)

    def open_job(self, base, job_id, showing):
        """The page of ``job_id`` (its id quoted in the URL as it is), once it shows
        ``showing``; its heading names the job, as text."""
        from selenium.webdriver.common.by import By

        self.open(f"{base}/jobs/{urllib.parse.quote(job_id, safe='')}")
        wait_until(lambda: showing in self.browser.find_element(By.ID, "view").text,
                   timeout=15, what=f"the page of job {job_id!r} to show {showing!r}")
        assert self.browser.find_element(By.CSS_SELECTOR, "#view h3").text == f"Job {job_id}"
        self.clean()

    def collect(self):
        """Dialogs and CSP violations the current document recorded (kept across pages)."""
        from selenium.common.exceptions import WebDriverException

        try:
            self.seen += self.browser.execute_script("return window.__seen || []") or []
            self.browser.execute_script("window.__seen = []")
        except WebDriverException:
            pass

    def clean(self):
        assert self.browser.execute_script(INJECTED) == []
        self.collect()
        unexpected = [s for s in self.seen if not s.startswith("confirm: ")]
        assert unexpected == [], f"dialogs or CSP violations: {unexpected}"

    def click(self, first_cell, label):
        click_fresh(lambda: self.browser.execute_script(FIND_BUTTON, first_cell, label),
                    f"the {label} button of {first_cell!r}")

    def click_exact(self, xpath):
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.common.by import By

        def attempt():
            try:
                self.browser.find_element(By.XPATH, xpath).click()
                return True
            except (NoSuchElementException, StaleElementReferenceException):
                return False

        wait_until(attempt, timeout=15, what=xpath)

    def dialog(self):
        """The dialog now open: its text, accepted (fails when none opens)."""
        from selenium.common.exceptions import NoAlertPresentException

        def text():
            try:
                return self.browser.switch_to.alert.text or " "
            except NoAlertPresentException:
                return None

        shown = wait_until(text, timeout=10, what="a dialog")
        self.browser.switch_to.alert.accept()
        return shown

    def no_dialog(self):
        from selenium.common.exceptions import NoAlertPresentException

        try:
            shown = self.browser.switch_to.alert.text
        except NoAlertPresentException:
            return
        pytest.fail(f"unexpected dialog: {shown!r}")

    def has_cell(self, text):
        return self.browser.execute_script(HAS_CELL, text)


def test_crafted_values_stay_text_and_actions_reach_the_right_job(
        app_module, run, r, recording, dashboard, worker):  # noqa: F811
    """Job ids, a queue, a key, arguments, error text and a pause reason that would break
    out of the old page's ``onclick="act('...')"`` or its HTML are shown as text, open no
    dialog, and the cancel / resume / requeue buttons act on exactly that job or queue."""
    from selenium.webdriver.common.by import By

    from .conftest import events

    roger = Roger(app_module.app)
    queue = f"q-{run}"
    steal, victim = steal_payload(f"victim-{run}")
    holder_id = f"{run}x')-alert(1)-('"
    parked_id = f'{run}"><img src=x onerror=alert(2)>'
    buried_id = f"{run}{steal}"
    cancelled_id = f"{run}</a><img src=x onerror=alert(3)>')-alert(4)-('"
    crafted_queue = f"q-{run}')-alert(5)-('<img src=x onerror=alert(6)>"
    reason = "<img src=x onerror=alert(7)>')-alert(8)-('"
    key = f"{run}:k')-alert(9)-('<img src=x onerror=alert(10)>"
    name = "<img src=x onerror=alert(11)>')-alert(12)-('"

    worker(concurrency=2)
    app_module.once.apply_async((run, name, "fail2"), task_id=buried_id)
    wait_until(lambda: [j for j in roger.buried(queue) if j.id == buried_id], timeout=20,
               what="the burial")
    app_module.fragile.apply_async((run, "holder", "sleep", 60), task_id=holder_id,
                                   execution_key=key)
    wait_until(lambda: roger.job(holder_id)["state"] == "running", timeout=15,
               what="the holder to run")
    app_module.fragile.apply_async((run, "parked"), task_id=parked_id, execution_key=key)
    wait_until(lambda: roger.store.parked_ids(key) == [parked_id], timeout=15, what="parking")
    roger.pause(crafted_queue, reason=reason)
    roger.cancel(cancelled_id)

    base = dashboard("--token", "s3cret")
    page = Page(recording)
    page.open(base + "/")
    recording.execute_script("sessionStorage.setItem('rogerToken', 's3cret')")

    # The overview shows every crafted value as text.
    for text in (holder_id, crafted_queue, key, cancelled_id):
        wait_until(lambda text=text: page.has_cell(text), timeout=15, what=repr(text))
    assert page.has_cell(f"paused 0s ago ({reason})") or any(
        page.has_cell(f"paused {s}s ago ({reason})") for s in range(1, 30))
    page.clean()

    # Resume the crafted queue: exactly it, and nothing else, is resumed; no other dialog.
    page.click(crafted_queue, "resume")
    assert page.dialog() == f"Resume queue {crafted_queue}?"
    wait_until(lambda: crafted_queue not in roger.paused_queues(), timeout=10,
               what="the crafted queue resumed")
    time.sleep(0.5)
    page.no_dialog()
    page.clean()

    # A crafted /jobs/<id> link: the parked job's page; its cancel reaches that job.
    page.open_job(base, parked_id, "parked")
    page.click_exact("//div[@id='view']/button[normalize-space()='cancel']")
    assert page.dialog() == f"Cancel job {parked_id}?"
    wait_until(lambda: roger.store.is_cancelled(parked_id), timeout=10,
               what="the parked job cancelled")
    assert roger.store.parked_ids(key) == []
    wait_until(lambda: f'"id":{json.dumps(parked_id)}' in
               recording.find_element(By.ID, "msg").text.replace(", ", ","),
               timeout=10, what="the page to report the cancel")
    page.clean()

    # The overview's cancel on the crafted holder id reaches that job.
    page.open(base + "/")
    page.click(holder_id, "cancel")
    assert page.dialog() == f"Cancel job {holder_id}?"
    wait_until(lambda: roger.store.is_cancelled(holder_id), timeout=10,
               what="the holder cancelled")
    wait_until(lambda: roger.job(holder_id)["state"] != "running", timeout=15,
               what="the holder stopped")
    time.sleep(0.5)
    page.no_dialog()
    page.clean()

    # The buried page: the crafted error and task arguments are text; requeue reaches the
    # job (its third attempt succeeds) and the crafted id pauses nothing.
    page.open(base + "/buried")
    wait_until(lambda: page.has_cell(buried_id), timeout=15, what="the buried row")
    assert page.has_cell(f"RuntimeError: boom {name}") or any(
        name in td.text for td in recording.find_elements(By.CSS_SELECTOR, "#view td"))
    page.clean()
    page.click(buried_id, "requeue")
    assert page.dialog() == f"Requeue buried job {buried_id}?"
    wait_until(lambda: [e for e in events(r, run, "done") if e["name"] == name], timeout=20,
               what="the requeued job to run")
    time.sleep(0.5)
    page.no_dialog()
    page.clean()

    # The page at /jobs/<the holder's crafted id> too.
    page.open_job(base, holder_id, "cancelled")

    assert page.seen == [f"confirm: Resume queue {crafted_queue}?",
                         f"confirm: Cancel job {parked_id}?",
                         f"confirm: Cancel job {holder_id}?",
                         f"confirm: Requeue buried job {buried_id}?"]
    paused = roger.paused_queues()
    assert victim not in paused and crafted_queue not in paused and queue not in paused


def test_a_crafted_partition_name_stays_text(app_module, run, recording, dashboard):  # noqa: F811
    """``roger_partition`` (no braces allowed) with markup: the title and header show it as
    text, nothing runs, and the page's pause button still works in that partition."""
    from celery import Celery
    from selenium.webdriver.common.by import By

    partition = f"p{run}</title><script>alert(1)</script><img src=x onerror=alert(2)>'\""
    base = dashboard("--token", "s3cret", env={"ROGER_TEST_PARTITION": partition})
    page = Page(recording)
    page.open(base + "/")
    queue = f"q-{run}"
    wait_until(lambda: page.has_cell(queue), timeout=15, what="the queues table")
    assert recording.title == f"roger: {partition}"
    assert recording.find_element(By.ID, "partition").text == partition
    page.clean()

    app = Celery("crafted-partition", broker=app_module.app.conf.broker_url)
    app.conf.update(roger_redis_url=app_module.app.conf.roger_redis_url,
                    roger_partition=partition)
    try:
        other = Roger(app)
        recording.execute_script("sessionStorage.setItem('rogerToken', 's3cret')")
        page.click(queue, "pause")
        assert page.dialog() == f"Pause queue {queue}?"
        wait_until(lambda: queue in other.paused_queues(), timeout=10,
                   what="the pause in the crafted partition")
        assert queue not in Roger(app_module.app).paused_queues()  # not in "test"
        page.click(queue, "resume")
        assert page.dialog() == f"Resume queue {queue}?"
        wait_until(lambda: queue not in other.paused_queues(), timeout=10, what="the resume")
        time.sleep(0.5)
        page.no_dialog()
        page.clean()
        assert page.seen == [f"confirm: Pause queue {queue}?", f"confirm: Resume queue {queue}?"]
    finally:
        app.close()
