"""MLflow tracking that cannot hang or stop a training: a reachability check at start, bounded HTTP retries, and
logging failures turned into warnings with a summary of what was not logged.

MLflow's HTTP client retries a request 7 times with exponential backoff (factor 2) and a 120 s timeout per try, so
an unreachable server stalls a training for many minutes at its first call, and a server that dies mid-run stalls
it at every call. For the bundle's runs, :func:`bound_http_retries` lowers these where the user has not set them,
:func:`check_tracking_server` refuses an unreachable server at start in one line, and :class:`TrackingGuard`
(installed on MONAI's ``MLFlowHandler`` by :func:`~monai_adv.bundle.prepare_mlflow_handlers`) lets training go
on when logging fails. At the end of a training, :func:`log_best_model` logs the best model (``models/model.pt``)
into the training's run as an MLflow model, under the same guard.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_adv.errors import TrackingError

__all__ = [
    "HTTP_DEFAULTS",
    "LOGGING_CALLS",
    "MODEL_METADATA_KEYS",
    "TrackingGuard",
    "bound_http_retries",
    "check_tracking_server",
    "log_best_model",
]

logger = logging.getLogger(__name__)

# what the bundle's runs use unless the environment sets them (MLflow's defaults: 7 retries, factor 2, 120 s)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
# MlflowClient methods that only send records: a failure of one loses that record, not the training
LOGGING_CALLS = frozenset(
    {"log_batch", "log_metric", "log_param", "log_artifact", "log_artifacts", "log_dict", "log_text", "log_figure",
     "log_image", "log_table", "log_inputs", "set_tag", "set_terminated", "update_run"}
)  # fmt: skip


# MlflowClient methods that read: when the server has failed, a question asked before gets its last answer
READ_CALLS = frozenset({"get_experiment_by_name", "get_experiment", "search_runs", "get_run"})
# the last answer of the server at each URI to each read (shared by the guards of one process: the validator's
# handler starts after the trainer's, and asks the same questions)
_ANSWERS: dict[tuple, Any] = {}


def _key(uri: str, name: str, args: tuple, kwargs: dict) -> tuple:
    return (uri, name, repr(args), repr(sorted(kwargs.items())))


def bound_http_retries() -> dict[str, str]:
    """Set MLflow's HTTP retry and timeout variables to :data:`HTTP_DEFAULTS` where the environment has not set them.

    Returns:
        The variables that were set here (those the user had set are left as they are).
    """
    chosen = {name: value for name, value in HTTP_DEFAULTS.items() if name not in os.environ}
    os.environ.update(chosen)
    return chosen


def _is_http(uri: Any) -> bool:
    return isinstance(uri, str) and uri.lower().startswith(("http://", "https://"))


def check_tracking_server(tracking_uri: str | None = None, timeout: float = 5.0) -> str | None:
    """Refuse an HTTP tracking server that does not answer within ``timeout`` seconds, in one line.

    Any HTTP answer counts (even 401 or 404: the server is there); a refused or timed-out connection does not.
    Non-HTTP stores (sqlite, databricks, ...) are not checked.

    Args:
        tracking_uri: the server; default the ``MLFLOW_TRACKING_URI`` environment variable (None: nothing to check).
        timeout: seconds to wait for the answer.

    Returns:
        The URI checked, or None when there was nothing to check.

    Raises:
        TrackingError: (a ``RuntimeError``) naming the server, why it did not answer, and what to do instead.
    """
    from_env = tracking_uri is None
    uri = os.environ.get("MLFLOW_TRACKING_URI") if from_env else tracking_uri
    if not _is_http(uri):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        source = " (MLFLOW_TRACKING_URI)" if from_env or uri == os.environ.get("MLFLOW_TRACKING_URI") else ""
        raise TrackingError(
            f"the MLflow tracking server {uri}{source} does not answer within {timeout:g} s ({reason}): start it, "
            "or unset MLFLOW_TRACKING_URI to log to the bundle's local store (eval/mlruns.db with --tracking mlflow), "
            "or train without --tracking."
        ) from None
    return uri


# The stop that SIGTERM raised (TrainingRun.terminate): it may arrive inside a guarded MLflow call, which must not
# take it for a logging failure.
_STOP: list[BaseException] = []


def request_stop(error: BaseException) -> None:
    """Record the error that stops the training (SIGTERM), so that a guarded MLflow call re-raises it."""
    _STOP[:] = [error]


class TrackingGuard:
    """An ``MlflowClient`` stand-in whose logging calls (:data:`LOGGING_CALLS`) warn instead of raising.

    Every other attribute is the client's own. Reads (:data:`READ_CALLS`) and ``create_run`` are answered by the
    server and remembered; once the server has failed, a read asked before gets its last answer, so that a
    handler that starts late (the validator's, at the end of the first epoch) joins the run. A failed logging call is recorded, and the first failure is
    logged as a warning; after ``max_failures`` failures in a row the server is given up on for the rest of the
    training (the calls are recorded as not sent, and cost no time). :meth:`summary` says what was not logged; it
    is logged when the run is terminated (``set_terminated``) or, if that never comes, at exit.

    Args:
        client: an ``mlflow.MlflowClient`` (e.g. ``MLFlowHandler.client``).
        max_failures: consecutive failures after which no more calls are sent.
    """

    def __init__(self, client: Any, max_failures: int = 2) -> None:
        self.client = client
        self.max_failures = max_failures
        self.consecutive_failures = 0
        self.gave_up = False
        self.failed_calls: dict[str, int] = defaultdict(int)
        self.lost_metrics: dict[str, list[int]] = defaultdict(list)
        self.lost_params: set[str] = set()
        self.lost_artifacts: list[str] = []
        self.first_error: str | None = None
        self.reported = False
        self.run_id: str | None = None  # the run its handler logs to (created, read or terminated through it)

    @property
    def uri(self) -> str:
        return str(getattr(self.client, "tracking_uri", "?"))

    def __getattr__(self, name: str) -> Any:
        if name == "client":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        attribute = getattr(self.client, name)
        if not callable(attribute) or name not in LOGGING_CALLS | READ_CALLS | {"create_run"}:
            return attribute

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if name in LOGGING_CALLS:
                return self._call(name, attribute, args, kwargs)
            return self._read(name, attribute, args, kwargs)

        return guarded

    def _read(self, name: str, method: Any, args: tuple, kwargs: dict) -> Any:
        """A read (or ``create_run``): the server's answer, remembered; after a failure, the last answer to the same
        question if there was one (else the error is raised)."""
        key = _key(self.uri, name, args, kwargs)
        if not self.gave_up:
            try:
                answer = method(*args, **kwargs)
            except Exception as err:
                if _STOP:
                    raise _STOP[0] from err
                if key not in _ANSWERS:
                    raise
                self._failed(name, err)
            else:
                if name == "create_run":  # a later search of its experiment finds it
                    experiment = kwargs.get("experiment_id", args[0] if args else None)
                    search = _key(self.uri, "search_runs", (experiment,), {})
                    _ANSWERS[search] = [*(_ANSWERS.get(search) or []), answer]
                else:
                    _ANSWERS[key] = answer
                if name in ("create_run", "get_run") and hasattr(getattr(answer, "info", None), "run_id"):
                    self.run_id = str(answer.info.run_id)
                if name == "get_experiment" and hasattr(answer, "name"):  # the experiment just created has a name
                    _ANSWERS[_key(self.uri, "get_experiment_by_name", (answer.name,), {})] = answer
                self.consecutive_failures = 0
                return answer
        if key not in _ANSWERS:
            raise TrackingError(
                f"MLflow at {self.uri} stopped answering ({self.first_error}), and {name} has no earlier answer."
            )
        return _ANSWERS[key]

    def _call(self, name: str, method: Any, args: tuple, kwargs: dict) -> Any:
        if name == "set_terminated" and (args or kwargs.get("run_id")):
            self.run_id = str(kwargs.get("run_id", args[0] if args else None))
        if self.gave_up:
            self.record_failure(name, args, kwargs)
            return None
        try:
            result = method(*args, **kwargs)
        except Exception as err:  # any failure to log must not stop the training
            if _STOP:  # not a logging failure: the stop, arrived during the call (perhaps wrapped by MLflow)
                raise _STOP[0] from err
            self.record_failure(name, args, kwargs)
            self._failed(name, err)
            if name == "set_terminated":
                self.report()
            return None
        self.consecutive_failures = 0
        if name == "set_terminated":
            self.report()
        return result

    def _failed(self, name: str, error: Exception) -> None:
        self.consecutive_failures += 1
        text = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        if self.first_error is None:
            self.first_error = text
            logger.warning(f"MLflow logging to {self.uri} failed ({name}: {text}); training goes on without it.")
            atexit.register(self.report)
        if self.consecutive_failures >= self.max_failures and not self.gave_up:
            self.gave_up = True
            logger.warning(
                f"MLflow at {self.uri} failed {self.consecutive_failures} times in a row: nothing more is sent to it "
                "in this training (checkpoints are still written); a summary of what was not logged follows at the "
                "end."
            )

    def record_failure(self, name: str, args: tuple, kwargs: dict) -> None:
        """Count a call that did not reach the server (for :meth:`summary`)."""
        self.failed_calls[name] += 1
        if name == "log_batch":
            for metric in kwargs.get("metrics") or (args[1] if len(args) > 1 else []):
                self.lost_metrics[str(getattr(metric, "key", "?"))].append(int(getattr(metric, "step", 0) or 0))
            for param in kwargs.get("params") or (args[2] if len(args) > 2 else []):
                self.lost_params.add(str(getattr(param, "key", "?")))
        elif name == "log_metric":
            key = kwargs.get("key", args[1] if len(args) > 1 else "?")
            self.lost_metrics[str(key)].append(int(kwargs.get("step", args[4] if len(args) > 4 else 0) or 0))
        elif name == "log_param":
            self.lost_params.add(str(kwargs.get("key", args[1] if len(args) > 1 else "?")))
        elif name in ("log_artifact", "log_artifacts"):
            self.lost_artifacts.append(
                os.path.basename(str(kwargs.get("local_path", args[1] if len(args) > 1 else "?")))
            )
        elif name == "log_model":
            self.lost_artifacts.append(f"the model {kwargs.get('name', '?')!r}")

    def summary(self) -> str | None:
        """What was not logged, in one paragraph; None when everything was."""
        if not self.failed_calls:
            return None
        parts = []
        if self.lost_metrics:
            metrics = ", ".join(
                f"{key} (steps {min(steps)}-{max(steps)}, {len(steps)} values)"
                for key, steps in sorted(self.lost_metrics.items())
            )
            parts.append(f"metrics {metrics}")
        if self.lost_params:
            parts.append(f"params {', '.join(sorted(self.lost_params))}")
        if self.lost_artifacts:
            parts.append(f"artifacts {', '.join(self.lost_artifacts)}")
        if "set_terminated" in self.failed_calls:
            parts.append("the run's end (it stays RUNNING on the server)")
        calls = ", ".join(f"{name} x{count}" for name, count in sorted(self.failed_calls.items()))
        return (
            f"MLflow: not logged to {self.uri}: {'; '.join(parts) or 'records'} ({calls}; first error: "
            f"{self.first_error}). The checkpoints and model.pt in the bundle's models/ folder are complete."
        )

    def report(self) -> None:
        """Log :meth:`summary` as a warning, once."""
        text = self.summary()
        if _STOP:  # the stop's one line is the last thing the user reads
            return
        if text and not self.reported:
            self.reported = True
            logger.warning(text)


# the fields of the bundle's metadata.json that go with a logged model (MLflow's ``metadata=``)
MODEL_METADATA_KEYS = (
    "name", "version", "task", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "image_classes", "label_classes", "pred_classes", "intended_use", "network_data_format",
)  # fmt: skip


def _json_safe(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _requirements(network: Any) -> list[str]:
    """``dist==version`` of torch, monai and the package of the network's class: what unpickling the model needs
    (given explicitly, MLflow does not load the model in a subprocess to infer them)."""
    from importlib import metadata

    distributions = metadata.packages_distributions()
    requirements = []
    for package in dict.fromkeys(("torch", "monai", type(network).__module__.split(".")[0])):
        for distribution in distributions.get(package, [])[:1]:
            requirements.append(f"{distribution}=={metadata.version(distribution).split('+')[0]}")
    return requirements


def _best_network(network: Any, model_path: Path) -> Any:
    """A CPU copy of ``network`` (unwrapped from (Distributed)DataParallel) with the weights of ``model_path``."""
    import torch

    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    module = module.module if isinstance(module, torch.nn.DataParallel) else module
    model = copy.deepcopy(module).to("cpu")
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return model.eval()


def log_best_model(
    handlers: Iterable[Any] | None,
    network: Any,
    model_path: str | os.PathLike,
    input_shape: Sequence[int],
    metadata: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    name: str = "model",
) -> str | None:
    """Log the best model of a training into its MLflow run, as an MLflow model that ``mlflow.pytorch.load_model``
    gives back as a working network.

    The run is that of the first ``MLFlowHandler`` in ``handlers`` (its current run, else the run it logged to,
    which MONAI's handler closes when the trainer completes); without one (no ``--tracking mlflow``, e.g. TensorBoard
    tracking) nothing is done. ``network`` gets the weights of ``model_path`` (on a CPU copy) and is logged with
    ``mlflow.pytorch.log_model(name=name)``: pickled, so that the model loads as the network's own class (any batch
    size, ``.eval()``, fine-tuning), which needs ``torch`` and ``monai`` installed where it is loaded (the logged
    requirements). Its signature comes from ``mlflow.models.infer_signature`` on a zero input of ``input_shape``
    and the network's output (MLflow makes the batch dimension variable), and ``metadata`` (the bundle's
    ``metadata.json``: the fields in :data:`MODEL_METADATA_KEYS`) and ``settings`` go with it.

    A failure to log (the server is down, the file does not fit the network) is a warning, like any failed logging
    call under :class:`TrackingGuard` (one that has given up on the server sends nothing): the checkpoints and
    ``model_path`` stay as they are. When ``model_path`` does not exist (no validation, or no finite score, saved a
    best model), nothing is logged.

    Args:
        handlers: the trainer's handlers (``@train#handlers``); others than MLFlowHandler are ignored.
        network: the network whose weights ``model_path`` holds (``@network_def``).
        model_path: the best model's state dict (``@ckpt_path``, ``models/model.pt``).
        input_shape: one input of the network with its batch dimension, e.g. ``(1, in_channels, *image_size)``.
        metadata: the bundle's metadata (``@_meta_``).
        settings: the training's settings (``@settings``), logged as ``metadata["settings"]``.
        name: the model's name in the run (``runs:/<run_id>/<name>``).

    Returns:
        The model's URI ``runs:/<run_id>/<name>``, or None when nothing was logged.
    """
    from monai.handlers import MLFlowHandler

    found = [h for h in handlers or [] if isinstance(h, MLFlowHandler)]
    if not found:
        return None
    handler = found[0]
    path = Path(model_path)
    if not path.is_file():
        logger.info(f"MLflow: no best model to log ({path} was not written in this training).")
        return None
    guard = handler.client if isinstance(handler.client, TrackingGuard) else TrackingGuard(handler.client)
    if guard.gave_up:
        _model_not_logged(guard, path, name, "the server stopped answering earlier in this training")
        return None
    try:
        uri = _log_model(handler, guard, network, path, input_shape, metadata, settings, name)
    except Exception as err:  # a failure to log must not lose the training's end (the lock release follows)
        if _STOP:
            raise _STOP[0] from err
        _model_not_logged(guard, path, name, " ".join(f"{type(err).__name__}: {err}".split())[:300], err)
        return None
    guard.consecutive_failures = 0
    logger.info(f"MLflow: the best model {path} is logged as {uri} ({guard.uri}).")
    return uri


def _model_not_logged(guard: TrackingGuard, path: Path, name: str, reason: str, error: Exception | None = None) -> None:
    """Record the model as not logged (in the guard's summary, if that is still to come) and say so in one warning."""
    guard.record_failure("log_model", (), {"name": name})
    if error is not None:
        guard.consecutive_failures += 1
        guard.first_error = guard.first_error or reason
    logger.warning(
        f"MLflow: the best model {path} was not logged to {guard.uri} ({reason}). {path} is complete; log it later "
        "with mlflow.pytorch.log_model."
    )


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.pytorch.log_model``) on ``uri`` for a while; then the
    tracking URI it had, and ``MLFLOW_TRACKING_URI`` as it was (``mlflow.set_tracking_uri`` also sets it)."""
    import mlflow

    environment = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


def _log_model(
    handler: Any,
    guard: TrackingGuard,
    network: Any,
    path: Path,
    input_shape: Sequence[int],
    metadata: Mapping[str, Any] | None,
    settings: Mapping[str, Any] | None,
    name: str,
) -> str:
    import math

    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    run_id = handler.cur_run.info.run_id if handler.cur_run is not None else guard.run_id
    if run_id is None:
        raise TrackingError("no MLflow run of this training was found (the trainer's handler never started one).")
    model = _best_network(network, path)
    if not all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters() if p.numel()):
        raise TrackingError(f"{path} holds weights that are not finite.")
    example = np.zeros(tuple(int(s) for s in input_shape), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example))
    signature = infer_signature(example, output.detach().cpu().numpy())
    model_metadata = {k: v for k, v in (metadata or {}).items() if k in MODEL_METADATA_KEYS}
    if settings:
        model_metadata["settings"] = {k: v for k, v in settings.items() if not str(k).startswith("_")}
    model_metadata["source"] = path.name
    status = guard.get_run(run_id).info.status
    with _fluent_tracking_uri(guard.uri):  # the handler's store (MLFLOW_TRACKING_URI, or the config's tracking_uri)
        mlflow.start_run(run_id=run_id)  # the fluent API puts a model into the active run's experiment
        try:
            mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                metadata=_json_safe(model_metadata),
                pip_requirements=_requirements(model),
                serialization_format="pickle",
            )
        finally:  # give the run back the status it had (MONAI's handler closed it as FINISHED)
            mlflow.end_run(status=status if status != "RUNNING" else "FINISHED")
            if status == "RUNNING":
                guard.update_run(run_id, status="RUNNING")
    return f"runs:/{run_id}/{name}"
