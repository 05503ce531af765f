"""README's cluster recipe against a real Ray head on 127.0.0.1: `ray job submit --working-dir .`."""
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(900)


def test_ray_job_submit_to_a_local_head(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_job_submit.sh"), str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job submit check: OK" in proc.stdout


def test_free_ports_stay_out_of_the_ranges_others_draw_from():
    # Outgoing connections take local ports from the ephemeral range and Ray's workers bind theirs in
    # RAY_WORKER_PORTS: a port picked there can be gone before the head binds it (the agent then never
    # registers and `ray job submit` is refused until it gives up).
    from cluster.ports import RAY_WORKER_PORTS, _binds, ephemeral_ports, free_ports
    ephemeral = ephemeral_ports()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        assert port not in ephemeral and port not in RAY_WORKER_PORTS, (port, ephemeral)
        assert _binds(port)


def test_a_port_in_use_does_not_bind_and_no_room_falls_back_to_the_kernel():
    import socket

    from cluster.ports import _binds, free_ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not _binds(s.getsockname()[1])
    ports = free_ports(3, ephemeral=range(0, 65536))  # nothing left outside: the kernel's picks
    assert len(set(ports)) == 3 and all(_binds(p) for p in ports)
