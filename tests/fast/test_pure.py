"""Pure parts, no Redis: the job header, key validation, settings."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_roger.config import Settings, redact_url, retry_levels
from celery_roger.errors import ConfigurationError
from celery_roger.job import as_key, header_problem, is_roger_task, job_header, job_keys
from celery_roger.keys import MAX_KEY_BYTES, validate
from celery_roger.records import StoredJob
from celery_roger.task import RogerTask


def test_job_keys_read_the_header_and_ignore_what_is_not_a_key() -> None:
    assert job_keys({"roger": {"ek": "e", "qk": "q"}}) == ("e", "q")
    assert job_keys({"roger": {"ek": 5, "qk": None}}) == ("", "")
    assert job_keys({"roger": "garbage"}) == ("", "")
    assert job_keys({}) == ("", "")
    assert job_header({"roger": ["not", "a", "dict"]}) == {}
    assert as_key(b"bytes") == ""


def test_header_problem_names_what_is_wrong() -> None:
    assert header_problem({"roger": {"ek": "e", "q": "default"}}) is None
    assert header_problem({}) is None
    assert "not a mapping" in (header_problem({"roger": [1]}) or "")
    assert "ek=" in (header_problem({"roger": {"ek": 7}}) or "")


def test_is_roger_task_needs_no_import_of_the_task_module() -> None:
    app = Celery("pure", set_as_current=False)

    @app.task(base=RogerTask, name="pure.keyed")
    def keyed() -> None: ...

    @app.task(name="pure.plain")
    def plain() -> None: ...

    assert is_roger_task(keyed)
    assert not is_roger_task(plain)
    assert not is_roger_task(None)


@pytest.mark.parametrize(("value", "error", "words"), [
    (5, TypeError, "must be a str or None"),
    ("", ValueError, "must not be an empty string"),
    ("x" * (MAX_KEY_BYTES + 1), ValueError, "more than the 1024 allowed"),
    ("\ud800", ValueError, "not valid UTF-8"),
])
def test_a_bad_key_is_refused_with_its_task_and_kind(value, error, words) -> None:
    with pytest.raises(error, match=words) as caught:
        validate("proj.sync", "queue_key", value)
    assert "proj.sync: queue_key" in str(caught.value)


def test_good_keys_pass() -> None:
    assert validate("t", "execution_key", None) is None
    assert validate("t", "execution_key", "tenant:7") == "tenant:7"


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="roger_retry_levels"):
        retry_levels("roger_retry_levels", "1,2")
    app = Celery("pure-settings", set_as_current=False)
    app.conf.roger_lease_seconds = 1
    with pytest.raises(ConfigurationError, match="roger_lease_seconds"):
        Settings.from_app(app)


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host/0?password=secret") == "redis://host/0?password=***"


def test_a_stored_job_is_told_by_its_kind_or_by_its_fields() -> None:
    message = {"body": "e30=", "headers": {"id": "j", "roger": {"q": "q"}}}
    entry = {"task": "t", "args": [], "kwargs": {},
             "options": {"headers": {"roger": {"q": "e"}}}}
    buried = {"task": "t", "error": "boom", "publish": entry}
    for value, kind, queue in ((message, "message", "q"), ({"raw": message}, "message", "q"),
                               (entry, "entry", "e"), (buried, "buried", "e")):
        for tagged in (value, {**value, "kind": kind}):
            job = StoredJob.of(tagged)
            assert job.kind == kind, tagged
            assert job.headers["roger"]["q"] == queue
    assert StoredJob.of({"kind": "entry", **entry}).message is None
    assert StoredJob.of(buried).entry == entry
    assert StoredJob.of({"kind": "nonsense", "raw": "x"}).message is None, "not a dict"


def test_queue_key_until_takes_end_start_or_seconds_and_names_what_was_wrong():
    from celery_roger.keys import queue_key_until

    assert queue_key_until("t", "end") == "end"
    assert queue_key_until("t", "start") == "start"
    assert queue_key_until("t", 3600) == 3600.0
    for bad, error in (("later", ValueError), (0, ValueError), (-1, ValueError),
                       (float("nan"), ValueError), (True, TypeError), ([1], TypeError)):
        with pytest.raises(error, match=r"^t: queue_key_until must be"):
            queue_key_until("t", bad)


def test_a_task_with_a_bad_queue_key_until_fails_at_its_definition():
    from celery import Celery

    from celery_roger import RogerTask

    app = Celery("until-test", set_as_current=False)
    app.finalize()
    # shared=False: a shared task would be made again by every app finalized later in this
    # process (Celery's shared tasks), and fail there.
    with pytest.raises(ValueError, match="digest: queue_key_until must be"):
        @app.task(base=RogerTask, name="digest", queue_key="d", queue_key_until="hourly",
                  shared=False)
        def digest():
            pass
