"""The console's lists, filters, bulk actions and refresh, driven in a real headless
Chromium against a real dashboard: click and type as an operator would, then check Redis
and the page. ``ROGER_SCREENSHOTS=<dir>`` also saves a screenshot of each page there."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from .conftest import wait_until
from .fast.test_lists import bury
from .fast.test_transitions import admit, message
from .test_console_api import call, console  # noqa: F401 (fixture)
from .test_dashboard_browser import browser  # noqa: F401 (fixture)
from .test_inspection import dashboard  # noqa: F401 (fixture)

SHOTS = os.environ.get("ROGER_SCREENSHOTS")


def by(how, what):
    from selenium.webdriver.common.by import By

    return getattr(By, how), what


class Console:
    """The page under test, in ``browser``, at ``base``."""

    def __init__(self, driver, base):
        self.b, self.base = driver, base

    def open(self, path, showing):
        self.b.get(self.base + path)
        self.wait_text(showing)

    def wait_text(self, showing, where="view"):
        wait_until(lambda: showing in self.b.find_element(*by("ID", where)).text,
                   timeout=15, what=f"{showing!r} on the page")

    def rows(self):
        """The first cell of each row of the page's table."""
        return self.b.execute_script(
            "return [...document.querySelectorAll('#view tr')].slice(1)"
            ".map(tr => tr.cells[0].textContent)")

    def wait_rows(self, wanted, what):
        wait_until(lambda: self.rows() == wanted, timeout=15,
                   what=f"{what}: rows {wanted} (now {self.rows()})")

    def select(self, job_id):
        box = self.b.find_element(*by("CSS_SELECTOR", f'input[data-select="{job_id}"]'))
        if not box.is_selected():
            box.click()

    def selected(self):
        return self.b.execute_script(
            "return [...document.querySelectorAll('input[data-select]')]"
            ".filter(b => b.checked).map(b => b.dataset.select)")

    def press(self, label):
        self.b.find_element(*by("XPATH", f"//button[normalize-space()='{label}']")).click()

    def confirm(self):
        from selenium.common.exceptions import NoAlertPresentException

        def text():
            try:
                return self.b.switch_to.alert.text
            except NoAlertPresentException:
                return None

        shown = wait_until(text, timeout=10, what="a confirm dialog")
        self.b.switch_to.alert.accept()
        return shown

    def login(self, token):
        self.b.execute_script("sessionStorage.setItem('rogerToken', arguments[0])", token)

    def shot(self, name):
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.b.save_screenshot(str(Path(SHOTS) / f"console-{name}.png"))


@pytest.fixture
def page(browser, console):  # noqa: F811
    base, roger = console
    return Console(browser, base), roger


def test_buried_list_filters_pages_and_bulk_actions(page, run):
    ui, roger = page
    store = roger.store
    for i in range(6):
        bury(store, f"b{i}", queue="qa" if i < 3 else "qb", task="t.one" if i % 2 else "t.two",
             error="KeyError" if i == 5 else "ValueError")
    ui.open("/buried", "Buried (newest first)")
    ui.wait_rows(["b5", "b4", "b3", "b2", "b1", "b0"], "every buried job, newest first")
    ui.shot("buried")

    # Type a filter, as an operator would; then follow a facet link.
    field = ui.b.find_element(*by("CSS_SELECTOR", "#filters input[name=task]"))
    field.send_keys("t.one")
    ui.press("filter")
    ui.wait_rows(["b5", "b3", "b1"], "the t.one filter")
    assert "task=t.one" in ui.b.current_url
    ui.b.find_element(*by("LINK_TEXT", "KeyError (1)")).click()
    ui.wait_rows(["b5"], "the KeyError facet on top of the task filter")

    # Pages of two, with the keyboard: n for the next page, f for the first.
    ui.open("/lists/buried?limit=2", "2 shown of 6")
    ui.wait_rows(["b5", "b4"], "page 1")
    ui.b.find_element(*by("TAG_NAME", "body")).send_keys("n")
    ui.wait_rows(["b3", "b2"], "page 2")
    ui.b.find_element(*by("TAG_NAME", "body")).send_keys("f")
    ui.wait_rows(["b5", "b4"], "back to page 1")

    # Bulk purge of two chosen rows, confirmed, with alice's token.
    ui.open("/buried", "Buried (newest first)")
    ui.login("alice-token")
    ui.wait_rows(["b5", "b4", "b3", "b2", "b1", "b0"], "every buried job")
    ui.select("b4")
    ui.select("b1")
    ui.press("purge selected")
    assert ui.confirm() == "Purge 2 buried jobs?"
    ui.wait_rows(["b5", "b3", "b2", "b0"], "the purge")
    assert not store.is_buried("b4") and not store.is_buried("b1") and store.is_buried("b5")

    # Bulk requeue: the jobs are published again and leave the buried queue.
    ui.select("b3")
    ui.select("b0")
    ui.press("requeue selected")
    assert ui.confirm() == "Requeue 2 buried jobs?"
    ui.wait_rows(["b5", "b2"], "the requeue")

    audit = call("GET", f"{ui.base}/api/roger/audit")[1]["items"]
    assert [(e["label"], e["action"], e["result"].get("ids")) for e in audit] == [
        ("alice", "requeue", ["b3", "b0"]), ("alice", "purge", ["b4", "b1"])]
    ui.open("/audit", "Audit log (2 actions")
    ui.shot("audit")


def test_refresh_keeps_selection_and_can_be_paused(page, run):
    ui, roger = page
    store = roger.store
    bury(store, "old")
    ui.open("/buried", "Buried (newest first)")
    ui.wait_rows(["old"], "the first row")
    ui.select("old")
    bury(store, "new1")
    ui.wait_rows(["new1", "old"], "the refresh to show a new burial")
    assert ui.selected() == ["old"], "a refresh keeps the selection"

    ui.b.find_element(*by("TAG_NAME", "body")).send_keys("p")
    wait_until(lambda: ui.b.find_element(*by("ID", "refresh")).text == "resume refresh",
               timeout=5, what="the refresh paused")
    bury(store, "new2")
    wait_until(lambda: call("GET", f"{ui.base}/api/roger/lists/buried")[1]["total"] == 3,
               timeout=5, what="the third burial")
    for _ in range(3):  # three refresh periods: the page stays as it was
        ui.b.execute_script("return new Promise(r => setTimeout(r, 2100))")
        assert ui.rows() == ["new1", "old"], "a paused page does not change"
    ui.press("resume refresh")
    ui.wait_rows(["new2", "new1", "old"], "the refresh resumed")
    assert ui.selected() == ["old"]


def test_parked_lines_keys_and_release(page, run):
    ui, roger = page
    store = roger.store
    store.renew("w1", registered=False)
    admit(store, "holder", "tenant:1")
    for i in range(3):
        admit(store, f"p{i}", "tenant:1")
    store.take_queue_key("digest:1", "someone")

    ui.open("/lists/parked", "Parked jobs")
    ui.login("alice-token")
    ui.b.find_element(*by("LINK_TEXT", "tenant:1")).click()
    ui.wait_rows(["p0", "p1", "p2"], "the line behind tenant:1, in order")
    positions = ui.b.execute_script(
        "return [...document.querySelectorAll('#view tr')].slice(1).map(tr => tr.cells[1]"
        ".textContent)")
    assert positions == ["1", "2", "3"]
    ui.shot("parked-line")
    ui.select("p1")
    ui.press("cancel selected")
    assert ui.confirm() == "Cancel 1 job?"
    wait_until(lambda: store.is_cancelled("p1"), timeout=10, what="p1 cancelled")
    ui.wait_rows(["p0", "p2"], "p1 out of the line")

    admit(store, "other-holder", "other:1")
    ui.open("/lists/execution_keys", "Execution keys")
    wait_until(lambda: sorted(ui.rows()) == ["other:1", "tenant:1"], timeout=15,
               what="both keys")
    ui.b.find_element(*by("CSS_SELECTOR", "#filters input[name=prefix]")).send_keys("tenant:")
    ui.press("filter")
    ui.wait_rows(["tenant:1"], "the prefix filter")
    ui.shot("execution-keys")
    ui.press("release")
    assert ui.confirm().startswith("Release execution key tenant:1?")
    wait_until(lambda: store.redis.hget(store.k_holders, "tenant:1") == b"p0", timeout=10,
               what="the key handed to p0")

    ui.open("/lists/queue_keys", "Queue keys")
    ui.press("release")
    assert ui.confirm() == "Release queue key digest:1?"
    wait_until(lambda: store.queue_key_holder("digest:1") is None, timeout=10,
               what="the queue key released")
    # A buried job's page: purge it (a buried job gets requeue and purge, not cancel).
    bury(store, "dead-1")
    ui.open("/jobs/dead-1", "buried after")
    assert not ui.b.find_elements(*by("XPATH", "//div[@id='view']/button[.='cancel']"))
    ui.b.find_element(*by("XPATH", "//div[@id='view']/button[.='purge']")).click()
    assert ui.confirm() == "Purge buried job dead-1?"
    wait_until(lambda: not store.is_buried("dead-1"), timeout=10, what="dead-1 purged")
    labels = [(e["label"], e["action"]) for e in
              call("GET", f"{ui.base}/api/roger/audit")[1]["items"]]
    assert labels == [("alice", "purge"), ("alice", "release queue key"),
                      ("alice", "release execution key"), ("alice", "cancel")]


def test_running_retries_held_and_cancelled_lists(page, run):
    ui, roger = page
    store = roger.store
    store.renew("w1", registered=False)
    for i in range(3):  # recorded as running on w1, as a worker's admission records them
        ek = f"tenant:{i}"
        store.admit(f"r{i}", instance="w1", execution_key=ek, message=message(f"r{i}", ek),
                    info={"job": f"r{i}", "instance": "w1", "queue": "q", "ek": ek,
                          "task": "app.sync_tenant", "worker": "celery@web-1",
                          "pid": 4100 + i, "admitted_at": time.time() - 30 * i})
    for i in range(3):
        store.schedule_retry(f"t{i}", 60 + i, {"kind": "entry", "task": "app.sync", "args": [],
                                               "kwargs": {}, "options": {"headers": {
                                                   "roger": {"q": "q1", "rc": i + 1}}}})
    store.pause("q2", "deploy")
    store.hold("h1", "q2", {"kind": "entry", "task": "app.mail", "args": [], "kwargs": {},
                            "options": {"headers": {"roger": {"q": "q2"}}}})
    roger.cancel("gone-1")

    ui.open("/lists/running", "Running jobs")
    wait_until(lambda: sorted(ui.rows()) == ["r0", "r1", "r2"], timeout=15,
               what="the running jobs")
    ui.shot("running")
    ui.b.find_element(*by("CSS_SELECTOR", "#filters input[name=queue]")).send_keys("other")
    ui.press("filter")
    ui.wait_rows([], "no running job on queue 'other'")

    ui.open("/lists/retries", "Waiting retries")
    ui.wait_rows(["t0", "t1", "t2"], "the retries by due time")
    due = re.findall(r"in (\d+)s", ui.b.find_element(*by("ID", "view")).text)
    assert len(due) == 3 and all(30 < int(s) <= 62 for s in due), due  # in about a minute
    ui.shot("retries")
    ui.open("/lists/retries?task=app.other", "Waiting retries")
    ui.wait_rows([], "no retry of app.other")
    ui.open("/lists/held", "Held for a paused queue")
    ui.wait_rows(["h1"], "the held job")
    ui.b.find_element(*by("CSS_SELECTOR", "#filters input[name=queue]")).send_keys("q1")
    ui.press("filter")
    ui.wait_rows([], "nothing held for q1")
    ui.open("/lists/cancelled", "Cancellations")
    ui.wait_rows(["gone-1"], "the cancellation")
    ui.open("/", "Queues")
    ui.shot("overview")
