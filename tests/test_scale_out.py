"""Roger state on Redis Cluster and behind Sentinel, through ``roger_redis_client``.

A one-node cluster owns all 16384 slots. Redis still refuses any command or script whose
declared keys span slots (CROSSSLOT), so these jobs show that every roger script keeps to
the partition's one slot, with a real worker and real publishers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
import redis
from celery import Celery
from redis.cluster import RedisCluster

from celery_roger import Roger
from celery_roger.testing import RedisServer, free_port, redis_server_binary

from .conftest import events, wait_until
from .test_faults import collect, done_counts, start_publishers, wait_all_done


def cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free and valid too."""
    for port in range(21000, 29000, 7):
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode(RedisServer):
    """A redis-server in cluster mode that serves every slot itself."""

    def __init__(self) -> None:
        super().__init__(port=cluster_port())

    def start(self) -> ClusterNode:
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--loglevel", "warning"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        cli = ["redis-cli", "-p", str(self.port)]
        wait_until(lambda: subprocess.run([*cli, "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG",
                   timeout=10, what="the cluster node to answer")
        subprocess.run([*cli, "cluster", "addslotsrange", "0", "16383"], check=True,
                       capture_output=True)
        wait_until(lambda: "cluster_state:ok" in subprocess.run(
            [*cli, "cluster", "info"], capture_output=True, text=True).stdout,
            timeout=20, what="cluster_state:ok")
        return self


@pytest.fixture
def cluster():
    try:
        subprocess.run(["redis-cli", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("redis-cli is needed to set up the cluster node")
    with ClusterNode() as node:
        yield node


def test_roger_on_redis_cluster(app_module, run, r, worker, redis_url, cluster):
    url = cluster.url.rsplit("/", 1)[0]
    env = {"ROGER_TEST_SETTINGS": json.dumps({"roger_redis_client": "cluster_client.make"}),
           "ROGER_TEST_CLUSTER_URL": url}
    w = worker(env=env)
    view = Celery("cluster-view", broker=redis_url, backend=redis_url)
    view.conf.update(roger_partition="test",
                     roger_redis_client=lambda: RedisCluster.from_url(url))
    roger = Roger(view)
    publisher_env = {**env, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}"}

    # Queue keys: of three publishes of one key, one is accepted.
    # Execution keys: six jobs of one key run one at a time (parked in the cluster).
    spec = {"run": run, "task": "fragile", "how": "sleep", "duration": 0.1,
            "jobs": [{"name": f"dup{i}", "qk": f"{run}:qk"} for i in range(3)]
            + [{"name": f"s{i}", "ek": f"{run}:ek"} for i in range(6)]}
    lines = collect(start_publishers([spec], publisher_env), timeout=60)
    assert [("ok" in x, "duplicate" in x) for x in lines[:3]] == [
        (True, False), (False, True), (False, True)]
    assert all("ok" in x for x in lines[3:]), lines
    wait_all_done(r, run, ["dup0"] + [f"s{i}" for i in range(6)], timeout=60)
    order = [e for e in (json.loads(x) for x in r.lrange(f"timeline:{run}", 0, -1))
             if e["event"] in ("attempt", "done") and e["name"].startswith("s")]
    assert [e["event"] for e in order] == ["attempt", "done"] * 6, order

    # Retry, then burial.
    lines = collect(start_publishers([{"run": run, "task": "once", "how": "fail",
                                       "jobs": [{"name": "doomed"}]}], publisher_env),
                    timeout=30)
    wait_until(lambda: roger.buried(f"q-{run}"), timeout=30, what="the job to be buried")

    # Pause and resume, cluster-wide; cancel of a parked job.
    roger.pause(f"q-{run}", reason="cluster test")
    lines = collect(start_publishers(
        [{"run": run, "task": "fragile", "how": "sleep", "duration": 1.0,
          "jobs": [{"name": "held", "ek": f"{run}:ek2"}, {"name": "parked", "ek": f"{run}:ek2"}]}],
        publisher_env), timeout=30)
    ids = {line["ok"]: line["name"] for line in lines}
    time.sleep(1.5)  # a window in which the paused queue may run nothing
    assert not [e for e in events(r, run, "attempt") if e["name"] in ids.values()]
    roger.resume(f"q-{run}")
    # The broker may deliver the two in either order: one runs, the other parks.
    (parked_id,) = wait_until(
        lambda: [i for i in ids if roger.job(i)["state"] == "parked"], timeout=20,
        what=f"one job to park behind the other\n{w.log()[-3000:]}")
    assert roger.cancel(parked_id) == "parked"
    (runner,) = set(ids.values()) - {ids[parked_id]}
    wait_all_done(r, run, [runner], timeout=30)
    wait_until(lambda: [e for e in events(r, run, "cb") if e["cb"] == "on_cancel"],
               timeout=15, what="on_cancel of the parked job")
    time.sleep(0.5)
    assert ids[parked_id] not in done_counts(r, run)
    assert roger.info()["partition"] == "test"
    log = w.log()
    assert "CROSSSLOT" not in log and "Unrecoverable" not in log, log[-3000:]
    assert w.is_alive()


@pytest.fixture
def sentinel(tmp_path):
    with RedisServer() as primary:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor roger 127.0.0.1 {primary.port} 1\n")
        proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            wait_until(lambda: _master_known(client), timeout=20,
                       what="the Sentinel to know the primary")
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def _master_known(client: redis.Redis) -> bool:
    try:
        return bool(client.sentinel_get_master_addr_by_name("roger"))
    except redis.RedisError:
        return False


def test_roger_through_sentinel(app_module, run, r, worker, redis_url, sentinel):
    env = {"ROGER_TEST_SETTINGS": json.dumps({"roger_redis_client": "cluster_client.sentinel"}),
           "ROGER_TEST_SENTINEL_PORT": str(sentinel)}
    w = worker(env=env)
    spec = {"run": run, "task": "fragile", "how": "sleep", "duration": 0.1,
            "jobs": [{"name": f"dup{i}", "qk": f"{run}:qk"} for i in range(2)]
            + [{"name": f"s{i}", "ek": f"{run}:ek"} for i in range(4)]}
    lines = collect(start_publishers(
        [spec], {**env, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}"}),
        timeout=60)
    assert "ok" in lines[0] and lines[1].get("duplicate") == lines[0]["ok"], lines
    wait_all_done(r, run, ["dup0"] + [f"s{i}" for i in range(4)], timeout=60)
    order = [e["event"] for e in events(r, run, "attempt") + events(r, run, "done")]
    assert len(order) == 10
    serial = [e for e in (json.loads(x) for x in r.lrange(f"timeline:{run}", 0, -1))
              if e["event"] in ("attempt", "done") and e["name"].startswith("s")]
    assert [e["event"] for e in serial] == ["attempt", "done"] * 4, serial
    assert "Unrecoverable" not in w.log()
