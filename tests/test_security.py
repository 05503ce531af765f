"""What the project listens on: Ray's dashboard and the trainers' rendezvous stay on 127.0.0.1.

Ray 2.60's own gRPC servers (GCS, raylet, core workers, agents) listen on every interface whatever
address Ray is given; token authentication (on by default, kept on) guards them. The README
("Faults, integrity, security") lists them. These tests check what is ours to choose.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(code: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_local_ray_dashboard_listens_on_loopback_only(tmp_path):
    out = run_script("""
        import json, sys, psutil, ray
        from cluster.run import connect
        from cluster.config import load_config
        cfg = load_config("configs/tiny.yaml", ["cluster.dashboard=true", f"run_dir={sys.argv[1]}"])
        assert connect(cfg)
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        port = int(url.rsplit(":", 1)[1])
        ips = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
        print(json.dumps({"url": url, "ips": ips}))
        ray.shutdown()
        """, str(tmp_path / "run"))
    got = json.loads(out.strip().splitlines()[-1])
    assert got["url"].startswith("127.0.0.1:")
    assert got["ips"] == ["127.0.0.1"], got


def test_trainer_rendezvous_listens_on_loopback_only(tmp_path):
    # Two ranks meet the way cluster.run starts TrainerWorkers on a local cluster, all-reduce, and
    # report every socket they listen on.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = """
        import json, os, sys, psutil, torch, torch.distributed as dist
        from cluster.run import rendezvous
        from cluster.config import load_config
        from trainer.engine import init_distributed
        rank, port, run_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        cfg = load_config("configs/tiny.yaml", [f"run_dir={run_dir}"])
        master = rendezvous(cfg, ("127.0.0.1", port))
        master = (master[0], master[1], os.path.join(run_dir, ".rendezvous-test"))  # both ranks: one file
        init_distributed(rank, 2, *master[:2], "gloo", store_file=master[2])
        t = torch.ones(1) * (rank + 1)
        dist.all_reduce(t)
        ips = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                      if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN})
        dist.barrier()
        print(json.dumps({"sum": t.item(), "ips": ips}))
        dist.destroy_process_group()
        """
    env_code = textwrap.dedent(code)
    procs = [subprocess.Popen([sys.executable, "-c", env_code, str(r), str(port), str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"}) for r in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["sum"] == 3.0
        assert r["ips"] and all(ip in ("127.0.0.1", "::1") for ip in r["ips"]), r


def test_rendezvous_uses_a_file_store_only_on_loopback(tmp_path):
    from cluster.config import load_config
    from cluster.run import rendezvous

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"run_dir={tmp_path}"])
    host, port, store = rendezvous(cfg, ("127.0.0.1", 1234))
    assert store and Path(store).parent == tmp_path.resolve() and not Path(store).exists()
    assert rendezvous(cfg, ("10.1.2.3", 1234)) == ("10.1.2.3", 1234, None)
