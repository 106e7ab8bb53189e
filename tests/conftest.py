"""Suite-wide hooks.

With DFSFUSE_FAIL_ON_SKIP set (as .ci/run does), a run in which any test was
skipped fails: in CI the mounted tests must really run.
"""

import os

import pytest


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
