"""The multi-machine harness of the tests (tests/netns.py): machines reach each other
and nothing else, a mount made on a machine is visible here, and teardown
leaves nothing (and says so when something had been left)."""

import os
import socket
import subprocess
import time

import pytest

netns = pytest.importorskip("netns")


def _make(bridge):
    try:
        return netns.Network(bridge=bridge)
    except netns.NetnsUnavailable as exc:
        if os.environ.get("DFSFUSE_FAIL_ON_SKIP"):
            pytest.fail(f"network namespaces unavailable: {exc} (DFSFUSE_FAIL_ON_SKIP is set)", pytrace=False)
        pytest.skip(str(exc))


def _serve_once(machine, port):
    """A TCP server on the machine's address that answers one connection with b"hi"."""
    code = (f"import socket, sys\ns = socket.socket(); s.bind(({machine.address!r}, {port})); s.listen()\n"
            "print('ready', flush=True)\nc, _ = s.accept(); c.sendall(b'hi'); c.close()\n")
    process = machine.popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    return process


@pytest.mark.parametrize("bridge", [True, False], ids=["bridge", "router"])
def test_machines_reach_each_other_and_nothing_else(bridge):
    with _make(bridge) as network:
        one, two = network.add("one"), network.add("two")
        assert network.bridge is bridge
        assert one.address != two.address and one.address in {str(a) for a in network.subnet.hosts()}
        server = _serve_once(two, 7000)
        assert set(two.pids()) == {server.pid}  # nsenter execs: the PID is the server's own
        assert one.connect_errno(two.address, 7000) == "connected"
        assert server.wait(10) == 0
        assert one.connect_errno("127.0.0.1", 7000) == "ECONNREFUSED"  # its own loopback, not two's
        assert one.connect_errno("10.255.255.1", 7000) == "ENETUNREACH"  # no default route: nothing outside
        assert "default" not in one.ip("route").stdout
        names = {one.netns, two.netns, network.switch}
        assert names <= set(netns.namespaces())
        # From the host the subnet is a blackhole, so a client run here by mistake fails at once.
        with pytest.raises(OSError):
            socket.create_connection((two.address, 7000), timeout=2)
        assert f"blackhole {network.subnet}" in netns.ip("route").stdout
    assert not names & set(netns.namespaces())
    assert str(network.subnet) not in netns.ip("route").stdout


def test_a_mount_made_on_a_machine_is_visible_here(tmp_path):
    """nsenter --net keeps our mount namespace (ip netns exec would give the command one of its own)."""
    with _make(None) as network:
        machine = network.add("m")
        target = tmp_path / "mnt"
        target.mkdir()
        machine.run(["mount", "-t", "tmpfs", "netns-test", target])
        try:
            assert any(line.split()[1] == str(target) for line in open("/proc/mounts"))
            assert os.readlink("/proc/self/ns/mnt") == machine.run(["readlink", "/proc/self/ns/mnt"]).stdout.strip()
            assert os.readlink("/proc/self/ns/net") != machine.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
        finally:
            subprocess.run(["umount", target], check=True)


def test_teardown_ends_what_was_left_and_says_so():
    network = _make(None)
    machine = network.add("m")
    tracked = machine.popen(["sleep", "60"])
    stray = subprocess.Popen(machine.wrap(["sleep", "60"]))  # not started by popen(): found by its namespace
    deadline = time.monotonic() + 10
    while set(machine.pids()) != {tracked.pid, stray.pid} and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(netns.NetnsLeftovers, match=rf"process {stray.pid} still running .*sleep 60"):
        network.close()
    assert tracked.poll() is not None and stray.poll() is not None
    assert netns.leftovers(network.tag) == []
    network.close()  # twice is fine
