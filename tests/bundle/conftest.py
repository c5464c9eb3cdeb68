"""Helpers for the bundle tests: run ``python -m monai.bundle`` as a user does, read MLflow stores back.

The bundle runs in subprocesses with the repository root as working directory. Tiny settings keep each
run at a few seconds of training; most of a run's time is importing MONAI, so one trained bundle
(``trained_bundle``, session scope) is shared by the evaluation, inference, export and resume tests.

Test modules reach the helpers through the ``bundle`` fixture (``bundle.train(...)``, ``bundle.configs``):
``import conftest`` would be ambiguous next to ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_DIR = REPO_ROOT / "bundles" / "adversarial_unet_segmentation"
CONFIGS = BUNDLE_DIR / "configs"
TRAIN_JSON = CONFIGS / "train.json"
EVALUATE_JSON = CONFIGS / "evaluate.json"
INFERENCE_JSON = CONFIGS / "inference.json"
PAPER_JSON = CONFIGS / "paper.json"
METADATA_JSON = CONFIGS / "metadata.json"
SHARED_DIR = REPO_ROOT.parent / "shared"
EXPERIMENT = "adversarial_unet_segmentation"

TINY_FEATURES = [8, 8, 16, 16, 32, 8]
TINY_IMAGE_SIZE = 32
TINY_NET: dict[str, Any] = {"features": TINY_FEATURES, "image_size": TINY_IMAGE_SIZE}
# adv#recipe paper: the tests exercise the mechanics of appended FGSM copies, whatever recipe the study made the
# bundle's default (tests/test_publish.py checks that default where users read it)
TINY: dict[str, Any] = {**TINY_NET, "max_train": 16, "max_val": 8, "max_epochs": 2, "batch_size": 8,
                        "adv#recipe": "paper"}  # fmt: skip
OUTPUT_TAIL = 8000


def overrides(settings: Mapping[str, Any]) -> list[str]:
    """``{"adv#method": "none", "features": [8, 8]}`` -> ``["--adv#method", "none", "--features", "[8,8]"]``."""
    args: list[str] = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        args += [f"--{key}", str(value)]
    return args


def bundle_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bundle subprocess.

    ``MLFLOW_TRACKING_URI`` is removed unless given in ``extra``: MONAI's MLFlowHandler prefers it over the
    config's store, which would send the runs of these tests elsewhere. One OpenMP thread per process:
    the tiny networks gain nothing from more, and a busy 2-core machine slows multi-threaded runs a lot.
    """
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NO_PROXY", "127.0.0.1,localhost")
    env.update(extra or {})
    return env


@dataclass
class BundleRun:
    """A finished ``python -m monai.bundle`` command."""

    command: list[str]
    returncode: int
    output: str  # stdout and stderr
    root: Path | None = None  # its --bundle_root, if any

    def describe(self) -> str:
        return f"`{shlex.join(self.command)}` exited with {self.returncode}; last output:\n{self.output[-OUTPUT_TAIL:]}"


def run_bundle(
    *args: Any,
    expect_success: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    root: Path | None = None,
) -> BundleRun:
    """``python -m monai.bundle *args`` from the repository root; fails the test (showing the output) on a
    non-zero exit status when ``expect_success``."""
    command = [sys.executable, "-m", "monai.bundle", *(str(a) for a in args)]
    try:
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=bundle_env(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"`{shlex.join(command)}` ran over {timeout} s; last output:\n{output[-OUTPUT_TAIL:]}")
    run = BundleRun(command, result.returncode, result.stdout + result.stderr, root)
    if expect_success:
        assert run.returncode == 0, run.describe()
    return run


def train_bundle(
    root: Path,
    settings: Mapping[str, Any] | None = None,
    tracking: str | None = None,
    config_file: str | None = None,
    **kwargs: Any,
) -> BundleRun:
    """``run training`` with the tiny settings (``settings`` override them) and ``--bundle_root root``."""
    args: list[Any] = ["run", "training", "--config_file", config_file or TRAIN_JSON, "--bundle_root", root]
    if tracking:
        args += ["--tracking", tracking]
    args += overrides({**TINY, **(settings or {})})
    return run_bundle(*args, root=root, **kwargs)


def copy_bundle_outputs(source: Path, destination: Path, parts: tuple[str, ...] = ("models", "data")) -> Path:
    """Copy the checkpoints and generated data of a bundle root (not its MLflow store) into a fresh root."""
    destination.mkdir(parents=True, exist_ok=True)
    for part in parts:
        shutil.copytree(source / part, destination / part)
    return destination


def sqlite_uri(root: Path) -> str:
    """The MLflow store ``--tracking mlflow`` uses by default for bundle root ``root``."""
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(str(root / "eval" / "mlruns.db"))


def single_mlflow_run(tracking_uri: str, experiment: str = EXPERIMENT):
    """``(client, run)`` for the only run of ``experiment`` in the store at ``tracking_uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {tracking_uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment!r}, found {[r.info.run_id for r in runs]}"
    return client, runs[0]


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of a metric's history, sorted by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def load_tiny_network(path: Path, spatial_dims: int = 2, in_channels: int = 3, features=TINY_FEATURES):
    """A BasicUNet with the given settings, weights from a bundle ``model.pt``."""
    from monai.networks.nets import BasicUNet

    network = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2, features=features)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.eval()


HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop_server(process: subprocess.Popen) -> None:
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


@dataclass
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 started by :func:`mlflow_server`; unpacks as ``(url, artifacts)``."""

    url: str
    artifacts: Path
    process: subprocess.Popen

    def __iter__(self):  # ``url, artifacts = mlflow_server``
        return iter((self.url, self.artifacts))

    def stop(self) -> None:
        """Stop the server now (the fixture's own stop is then a no-op)."""
        stop_server(self.process)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real MLflow server (:class:`MlflowServer`: ``url, artifacts = mlflow_server``) with a sqlite store and
    local artifacts in ``tmp_path``; stopped at the end of the test. Skips where the ``mlflow`` command is absent."""
    if shutil.which("mlflow") is None and not Path(sys.executable).with_name("mlflow").is_file():
        pytest.skip("the mlflow command is not installed")
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
        yield MlflowServer(url, artifacts, process)
    finally:
        stop_server(process)


class BundleTools:
    """The helpers and paths of this file, handed to tests by the ``bundle`` fixture."""

    repo_root = REPO_ROOT
    bundle_dir = BUNDLE_DIR
    configs = CONFIGS
    train_json = TRAIN_JSON
    evaluate_json = EVALUATE_JSON
    inference_json = INFERENCE_JSON
    paper_json = PAPER_JSON
    metadata_json = METADATA_JSON
    shared_dir = SHARED_DIR
    experiment = EXPERIMENT
    tiny = TINY
    tiny_net = TINY_NET
    tiny_features = TINY_FEATURES
    tiny_image_size = TINY_IMAGE_SIZE
    overrides = staticmethod(overrides)
    env = staticmethod(bundle_env)
    run = staticmethod(run_bundle)
    train = staticmethod(train_bundle)
    copy_outputs = staticmethod(copy_bundle_outputs)
    sqlite_uri = staticmethod(sqlite_uri)
    single_mlflow_run = staticmethod(single_mlflow_run)
    metric_steps = staticmethod(metric_steps)
    load_tiny_network = staticmethod(load_tiny_network)
    free_port = staticmethod(free_port)


@pytest.fixture(scope="session")
def bundle() -> BundleTools:
    """Paths and helpers for bundle tests (see :class:`BundleTools`)."""
    return BundleTools()


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> BundleRun:
    """A bundle root trained for 2 tiny epochs with FGSM (``adv#track_loss`` on) and ``--tracking mlflow``
    (sqlite store in eval/).

    Shared: tests that write into a bundle root copy it first (:func:`copy_bundle_outputs`).
    """
    root = tmp_path_factory.mktemp("trained_bundle")
    return train_bundle(root, {"adv#method": "fgsm", "adv#track_loss": "true"}, tracking="mlflow")


@pytest.fixture
def one_torch_thread():
    """Run in-process bundle work on one thread (see :func:`bundle_env`), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def restore_determinism():
    """In-process bundle runs call ``monai.utils.set_determinism(seed=...)``: undo it afterwards."""
    yield
    from monai.utils import set_determinism

    set_determinism(seed=None)
