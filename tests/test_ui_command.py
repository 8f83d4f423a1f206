"""`kdablate ui`: it finds ./NAME.yaml, and prints the runs table's link (in Model training mode)
with the recipes that compare arms only once the server answers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from kdablate import tracking
from kdablate.runner import RunOptions, run_study
from kdablate.study import load_study
from tests.datafiles import TINY_STUDY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_prints_the_link_once_the_server_answers(mlflow_store, tmp_path):
    (tmp_path / "h1.yaml").write_text(TINY_STUDY.replace("seeds: [0, 1]", "seeds: [0]"))
    assert run_study(load_study(tmp_path / "h1.yaml"), RunOptions(cache_dir=tmp_path / "c", progress=False)) == 0
    exp = tracking.client().get_experiment_by_name("h1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kdablate.cli", "ui", "h1", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline, line = time.monotonic() + 280, ""
        while time.monotonic() < deadline and "MLflow UI on" not in line:
            line = proc.stdout.readline()
        assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:  # already answering
            assert r.status == 200
        recipes = proc.stdout.readline()
        assert "tags.role != 'arm'" in recipes and "Group by -> tag `arm`" in recipes
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
