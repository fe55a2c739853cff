"""The throwaway servers of chatkit.testing start, answer and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatkit.testing import redis_server


def test_the_redis_server_answers_and_restarts_empty() -> None:
    redis = pytest.importorskip("redis")
    with redis_server() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("k") is None
        client.close()
        directory = server.directory
    assert not Path(directory).exists()


def test_the_postgres_cluster_answers(postgres_dsn: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
