"""MLflow tracking that cannot hang or stop a training: a reachability check at start, bounded HTTP retries, and
logging failures turned into warnings with a summary of what was not logged.

MLflow's HTTP client retries a request 7 times with exponential backoff (factor 2) and a 120 s timeout per try, so
an unreachable server stalls a training for many minutes at its first call, and a server that dies mid-run stalls
it at every call. For the bundle's runs, :func:`bound_http_retries` lowers these where the user has not set them,
:func:`check_tracking_server` refuses an unreachable server at start in one line, and :class:`TrackingGuard`
(installed on MONAI's ``MLFlowHandler`` by :func:`~monai_adv.bundle.prepare_mlflow_handlers`) lets training go
on when logging fails.
"""

from __future__ import annotations

import atexit
import logging
import os
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Any

from monai_adv.errors import TrackingError

__all__ = ["HTTP_DEFAULTS", "LOGGING_CALLS", "TrackingGuard", "bound_http_retries", "check_tracking_server"]

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
        if self.gave_up:
            self._record(name, args, kwargs)
            return None
        try:
            result = method(*args, **kwargs)
        except Exception as err:  # any failure to log must not stop the training
            if _STOP:  # not a logging failure: the stop, arrived during the call (perhaps wrapped by MLflow)
                raise _STOP[0] from err
            self._record(name, args, kwargs)
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

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
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
