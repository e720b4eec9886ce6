"""A job's history (``roger_history_ttl``) from real workers: each transition a job goes
through is in ``Roger(app).job(id)["history"]``, in order, and in ``celery roger job``."""

from __future__ import annotations

import json

from .conftest import wait_until
from .test_inspection import cli, roger  # noqa: F401 (fixtures)


def events(roger, job_id):  # noqa: F811
    return [e["event"] for e in roger.job(job_id)["history"]]


def test_a_parked_jobs_history_and_a_buried_one(app_module, run, roger, worker, cli):  # noqa: F811
    worker()
    ek = f"{run}:tenant"
    first = app_module.fragile.apply_async((run, "a", "sleep", 1), execution_key=ek)
    wait_until(lambda: "admitted" in events(roger, first.id), timeout=15,
               what="the first job admitted")
    second = app_module.fragile.apply_async((run, "b"), execution_key=ek)
    wait_until(lambda: "succeeded" in events(roger, second.id), timeout=20,
               what="the second job to end")
    assert events(roger, first.id) == ["admitted", "succeeded"]
    assert events(roger, second.id) == ["parked", "promoted", "admitted", "succeeded"]
    history = roger.job(second.id)["history"]
    assert history[0]["detail"] == f"behind execution key {ek} at position 1, held by {first.id}"
    assert history[1]["detail"] == f"execution key {ek} handed on by {first.id}"
    assert [e["at"] for e in history] == sorted(e["at"] for e in history)
    assert history[2]["worker"] and history[2]["worker"] == history[3]["worker"]

    failing = app_module.once.delay(run, "c", "fail")
    wait_until(lambda: roger.job(failing.id)["state"] == "buried" and
               "failed, buried" in events(roger, failing.id), timeout=20,
               what="the failing job buried")
    # (the retry and the burial are recorded as decided, before the attempt's end)
    assert events(roger, failing.id) == ["started", "retry scheduled", "failed, retrying",
                                         "started", "buried", "failed, buried"]
    assert roger.requeue_buried(failing.id) == 1
    # (it fails again at once: it may have run twice more by the time this looks)
    wait_until(lambda: events(roger, failing.id).count("started") >= 3, timeout=20,
               what=f"the requeued job to start: {roger.job(failing.id)}")
    assert events(roger, failing.id)[6:8] == ["requeued", "started"]

    shown = cli("job", second.id).stdout
    assert "history:" in shown and "promoted" in shown and "UTC" in shown, shown
    as_json = json.loads(cli("job", second.id, "--json").stdout)
    assert [e["event"] for e in as_json["history"]] == events(roger, second.id)


def test_a_cancel_says_who_cancelled(roger, run, cli):  # noqa: F811
    cli("cancel", f"{run}-later")
    [entry] = roger.job(f"{run}-later")["history"]
    assert entry["event"] == "cancelled" and entry["detail"].endswith(" (CLI)"), entry
    roger.cancel(f"{run}-other", by="ops-runbook")
    assert roger.job(f"{run}-other")["history"][0]["detail"] == "by ops-runbook"
