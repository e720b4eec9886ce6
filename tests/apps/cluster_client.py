"""``roger_redis_client`` factories for the scale-out tests: Redis Cluster and Sentinel."""

import os

from redis.cluster import RedisCluster


def make() -> RedisCluster:
    return RedisCluster.from_url(os.environ["ROGER_TEST_CLUSTER_URL"], socket_timeout=5,
                                 socket_connect_timeout=5)


def sentinel():
    """The primary that the Sentinel at ROGER_TEST_SENTINEL_PORT names ``roger``."""
    from redis.sentinel import Sentinel

    port = int(os.environ["ROGER_TEST_SENTINEL_PORT"])
    return Sentinel([("127.0.0.1", port)], socket_timeout=5).master_for("roger", socket_timeout=5)
