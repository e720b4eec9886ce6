"""``roger_redis_client`` for the scale-out test: a Redis Cluster client."""

import os

from redis.cluster import RedisCluster


def make() -> RedisCluster:
    return RedisCluster.from_url(os.environ["ROGER_TEST_CLUSTER_URL"], socket_timeout=5,
                                 socket_connect_timeout=5)
