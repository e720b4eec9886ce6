"""Which brokers fused publish takes (fuse.py): only kombu's plain Redis transport, with
roger's own client; everything else takes the long road. Pure: no connection is made."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_roger.config import Settings
from celery_roger.errors import ConfigurationError
from celery_roger.fuse import Fuse
from celery_roger.store import Store


def fuse_for(broker: str, **conf: object) -> Fuse:
    app = Celery("fuse-tests", broker=broker)
    app.conf.update(roger_redis_url="redis://127.0.0.1:1/0", **conf)
    return Fuse(app, Store(Settings.from_app(app)))


def test_a_plain_redis_broker_is_fused():
    assert fuse_for("redis://127.0.0.1:1/0").usable


@pytest.mark.parametrize(("broker", "conf"), [
    ("amqp://guest:guest@127.0.0.1:1//", {}),
    ("rediss://127.0.0.1:1/0?ssl_cert_reqs=required", {}),
    ("sentinel://127.0.0.1:1", {"broker_transport_options": {"master_name": "m"}}),
    ("redis://127.0.0.1:1/0", {"broker_transport_options": {"global_keyprefix": "app:"}}),
    ("redis://127.0.0.1:1/0", {"roger_fused_publish": False}),
    ("redis://127.0.0.1:1/0", {"roger_redis_client": "redis.Redis"}),
], ids=["rabbitmq", "tls", "sentinel", "global_keyprefix", "setting off", "own client"])
def test_everything_else_takes_the_long_road(broker, conf):
    assert not fuse_for(broker, **conf).usable


def test_the_setting_must_be_a_bool():
    app = Celery("fuse-tests", broker="redis://127.0.0.1:1/0")
    app.conf.roger_fused_publish = "yes"
    with pytest.raises(ConfigurationError, match="roger_fused_publish must be True or False"):
        Settings.from_app(app)
