"""Tracking to a real MLflow server: ``MLFLOW_TRACKING_URI=http://...`` wins over the bundle's sqlite store."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Terminate the server's whole process group (uvicorn workers, job runners), killing it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """``http://127.0.0.1:<port>`` of an MLflow server with a sqlite store and local artifacts in ``tmp_path``."""
    mlflow_script = Path(sys.executable).with_name("mlflow")
    launcher = [str(mlflow_script)] if mlflow_script.is_file() else [sys.executable, "-m", "mlflow"]
    port = free_port()
    url = f"http://{HOST}:{port}"
    store, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    log_path = tmp_path / "server.log"
    monkeypatch.setenv("NO_PROXY", f"{HOST},localhost")  # this process's MlflowClient must not use a proxy
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*launcher, "server", "--host", HOST, "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
            env={**os.environ, "NO_PROXY": f"{HOST},localhost"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mlflow") is None and not Path(sys.executable).with_name("mlflow").is_file(),
                    reason="the mlflow command is not installed")  # fmt: skip
def test_training_is_tracked_on_an_mlflow_server(bundle, mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    root = tmp_path / "bundle"
    run = bundle.train(root, {"adv#method": "fgsm"}, tracking="mlflow", env={"MLFLOW_TRACKING_URI": url})
    assert not (root / "eval" / "mlruns.db").exists(), "the run went to the sqlite store, not to the server"

    client, mlflow_run = bundle.single_mlflow_run(url)
    assert mlflow_run.info.status == "FINISHED", run.describe()
    params = mlflow_run.data.params
    assert params["adv_method"] == "fgsm" and float(params["adv_epsilon"]) == pytest.approx(0.1)
    iou = bundle.metric_steps(client, mlflow_run.info.run_id, "val_mean_iou")
    assert [step for step, _ in iou] == [1, 2] and all(0.0 <= v <= 1.0 for _, v in iou)
    assert "adv_loss_fgsm" in mlflow_run.data.metrics
    # the resolved config went through the server into its artifact store
    names = [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
    assert any(re.fullmatch(r"config_.*\.json", n) for n in names), names
    assert list(artifacts.rglob("config_*.json")), "the server's artifact folder holds no config"
