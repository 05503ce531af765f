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
