"""Suite-wide hooks and fixtures.

With DFSFUSE_FAIL_ON_SKIP set (as .ci/run does), a run in which any test was
skipped fails: in CI the mounted tests must really run. For the same reason a
missing PostgreSQL installation is then an error of the tests that need it, not
a skip.

- `postgres_server` (session): one real PostgreSQL server (tests/pgserver.py)
  for the whole run, started only when a test first asks for it, in a temp dir
  under $DFSFUSE_TEST_TMPDIR (else /tmp), stopped by its PID at the end.
- `postgres_url` (function): a fresh database of that server, owned by its
  role `dfsfuse`, dropped after the test; the URL carries the password.
- `network` (module): a tests/netns.py Network of the module's own (a switch
  namespace, no machine yet: `network.add("db")` makes one), torn down at the
  end of the module with a check that no process, link or namespace is left.
  Where network namespaces cannot be made (not root, no iproute2) the tests that
  use it skip, and under DFSFUSE_FAIL_ON_SKIP fail.
"""

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

_databases = itertools.count(1)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("DFSFUSE_FAIL_ON_SKIP"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        if reporter:
            reporter.ensure_newline()
            reporter.write_line(f"DFSFUSE_FAIL_ON_SKIP: {len(skipped)} test(s) skipped; failing the run", red=True)
            for report in skipped[:20]:
                reporter.write_line(f"  skipped: {report.nodeid} {report.longrepr}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _unavailable(reason: str, what: str = "PostgreSQL"):
    if os.environ.get("DFSFUSE_FAIL_ON_SKIP"):
        pytest.fail(f"{reason} (DFSFUSE_FAIL_ON_SKIP is set: {what} must be there)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (a pgserver.PostgresServer, running)."""
    try:
        import pgserver
    except ImportError as exc:
        _unavailable(f"cannot import psycopg: {exc} (scripts/install.sh)")
    parent = os.environ.get("DFSFUSE_TEST_TMPDIR") or "/tmp"
    base = Path(tempfile.mkdtemp(prefix="dfsfuse-pg-", dir=parent))
    base.chmod(0o755)  # the server runs as the user postgres, who must reach base/data
    try:
        server = pgserver.PostgresServer(base)
    except pgserver.PostgresNotInstalled as exc:
        shutil.rmtree(base)
        _unavailable(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.stop(immediate=True)  # its data goes next: no shutdown checkpoint
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(request, postgres_server):
    """postgresql://dfsfuse:PASSWORD@127.0.0.1:PORT/DB for a new empty database DB, dropped afterwards.

    A test that stopped or killed the server leaves it to this fixture to start it again.
    """
    name = f"t{next(_databases)}_{re.sub(r'[^a-z0-9_]+', '_', request.node.name.lower())}"[:63]
    postgres_server.create_database(name)
    yield postgres_server.url(name, password=True)
    if not postgres_server.running():
        postgres_server.start()
    postgres_server.drop_database(name)


@pytest.fixture(scope="module")
def network():
    """The module's tests/netns.py Network (no machines yet); closed, and checked clean, at the end of the module."""
    import netns

    try:
        net = netns.Network()
    except netns.NetnsUnavailable as exc:
        reason = f"network namespaces unavailable: {exc}"
    else:
        reason = None
    if reason:
        _unavailable(reason, "network namespaces")
    try:
        yield net
    finally:
        net.close()
