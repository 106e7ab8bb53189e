"""The real PostgreSQL server of the tests (tests/pgserver.py, fixtures in tests/conftest.py)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")


def test_a_fresh_database_of_our_own(postgres_server, postgres_url):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        assert conn.execute("SELECT name FROM t ORDER BY id").fetchall() == [("one",), ("two",)]
        user, fsync, address, owner = conn.execute(
            "SELECT current_user, current_setting('fsync'), host(inet_server_addr()), pg_get_userbyid(datdba)"
            " FROM pg_database WHERE datname = current_database()").fetchone()
    assert (user, fsync, address, owner) == (postgres_server.user, "on", "127.0.0.1", postgres_server.user)


def test_restart_keeps_committed_data(postgres_server, postgres_url):
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (x integer)")
        conn.execute("INSERT INTO t VALUES (42)")
    before = postgres_server.pid
    postgres_server.restart()
    assert postgres_server.pid != before and postgres_server.running()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]


def test_a_crash_keeps_committed_data(postgres_server, postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x integer)")
        conn.execute("INSERT INTO t VALUES (7)")
        pending = psycopg.connect(postgres_url)
        pending.execute("INSERT INTO t VALUES (8)")  # never committed
        postgres_server.kill()
    pending.close()
    assert not postgres_server.running()
    postgres_server.start()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]


def test_password_and_password_file(postgres_server, postgres_url, tmp_path, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    database = psycopg.conninfo.conninfo_to_dict(postgres_url)["dbname"]
    bare = postgres_server.url(database)
    assert postgres_server.password and postgres_server.password not in bare

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bare.replace("@", ":wrong@", 1))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(bare)

    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:*:{postgres_server.user}:{postgres_server.password}\n")
    passfile.chmod(0o644)  # libpq ignores a password file that group or others can read
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(bare)
    passfile.chmod(0o600)
    with psycopg.connect(bare) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (postgres_server.user,)

    # write_passfile: the same for TCP and for the Unix socket.
    written = postgres_server.write_passfile(tmp_path / "written")
    assert written.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("PGPASSFILE", str(written))
    for url in (bare, postgres_server.socket_url(database)):
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_admin_is_trusted_on_the_socket_only(postgres_server):
    with postgres_server.admin_connect() as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(f"postgresql://{postgres_server.admin}@127.0.0.1:{postgres_server.port}/postgres")


def test_a_server_of_its_own_without_password_stops_by_pid(postgres_server):
    import pgserver

    parent = os.environ.get("DFSFUSE_TEST_TMPDIR") or "/tmp"
    base = Path(tempfile.mkdtemp(prefix="dfsfuse-pg-own-", dir=parent))
    base.chmod(0o755)
    server = pgserver.PostgresServer(base / "pg", user="plain", password=None)
    try:
        server.start()
        pid = server.pid
        assert pid in pgserver.running_pids()
        server.create_database("own")
        with psycopg.connect(server.url("own")) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("plain",)
    finally:
        server.stop()
    assert not server.running() and pid not in pgserver.running_pids()
    assert not (base / "pg" / "data" / "postmaster.pid").exists()  # a clean shutdown
    shutil.rmtree(base)
