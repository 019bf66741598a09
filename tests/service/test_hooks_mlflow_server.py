"""The MlflowServer test helper really runs MLflow: sqlite and PostgreSQL, restart keeps data."""
from __future__ import annotations

from mlflow import MlflowClient


def test_sqlite_server_survives_restart(tmp_path):
    from support.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "srv").start()
    try:
        client = MlflowClient(server.url)
        client.create_registered_model("kept")
        port = server.port
        server.restart()
        assert server.port == port
        assert MlflowClient(server.url).get_registered_model("kept").name == "kept"
        server.kill()
        assert not server.running and not server.healthy()
    finally:
        server.stop()


def test_postgres_server_uses_its_own_database(postgres_mlflow_server, postgres_database_uri):
    import psycopg2

    client = MlflowClient(postgres_mlflow_server.url)
    client.create_registered_model("on-postgres")
    dsn = postgres_database_uri.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM registered_models")
        assert ("on-postgres",) in cur.fetchall()
