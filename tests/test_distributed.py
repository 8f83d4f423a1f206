"""The smoke study through a local Ray instance into a local MLflow tracking server."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kdablate import tracking
from kdablate.study import load_study
from tests.test_compose import PLUGIN

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def ray_head(tmp_path):
    port = free_port()
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--disable-usage-stats", "--include-dashboard=false"], capture_output=True, text=True)
    assert start.returncode == 0, start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


RAY_PLUGIN = PLUGIN.format(name="raylab_uniform")  # a structure only the plugin module registers


def test_smoke_study_on_ray_into_a_tracking_server(mlflow_server, ray_head, tmp_path, monkeypatch):
    """The smoke grid plus a plugin arm: Ray workers import the study's plugin module from the
    study's folder before they build the cell."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (tmp_path / "raylab_plugin.py").write_text(RAY_PLUGIN)
    (tmp_path / "raysmoke.yaml").write_text(f"""
extends: {ROOT / "studies" / "smoke.yaml"}
plugins: [raylab_plugin]
arms: [{{name: mine, mass: {{name: constant, eps: 0.1}}, structure: raylab_uniform, alpha: 1.0}}]
""")
    out = subprocess.run(
        [sys.executable, "-m", "kdablate.cli", "run", "raysmoke.yaml", "--executor", "ray",
         "--address", ray_head, "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    study = load_study(tmp_path / "raysmoke.yaml")
    client = tracking.client(mlflow_server)
    exp_id = client.get_experiment_by_name("raysmoke").experiment_id
    runs = tracking.search_cells(client, exp_id)
    assert sorted(r.data.tags["config_hash"] for r in runs) == sorted(c.config_hash() for c in study.cells)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_name for r in runs} >= {"mine/seed0", "mine/seed1"}
    # Ray ran the cells in its own worker processes, not in the driver that opened the study run.
    driver = client.search_runs([exp_id], "tags.kind = 'study'")[0].data.tags["kdablate.worker_pid"]
    assert driver not in {r.data.tags["kdablate.worker_pid"] for r in runs}
    assert "config.json" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    # The report reads the same runs back through the server (artifacts proxied over HTTP).
    from analysis import report

    assert report.main([str(tmp_path / "raysmoke.yaml"), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "raysmoke" / "calibration.png").stat().st_size > 0
    assert f"read from `{mlflow_server}`" in (tmp_path / "figures" / "raysmoke" / "report.md").read_text()
