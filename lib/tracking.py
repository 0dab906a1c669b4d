"""MLflow tracking of every training run: CML's Experiments page shows them; elsewhere a local store.

Where: MLFLOW_TRACKING_URI when set (CML sets it in sessions and jobs), else an SQLite store inside the
project beside the run folders, `<output_dir>/mlflow.db` (artifacts in `<output_dir>/mlartifacts`):

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --default-artifact-root runs/mlartifacts

One MLflow run per training run (a resumed run continues its MLflow run; the id is kept in the run
folder), in the experiment `qlora-<task>`, written by the main process only. Logged: the settings and the
runtime plan (parameters), the loss, learning rate and gradient norm at every logging step, throughput,
peak memory and wall time, the base vs adapter metrics, and the adapter, the run record, metrics.json and
the plots as artifacts. `tracking="off"` turns it off. A tracking server that fails is a warning, never a
failed training run.

Hand-written rather than transformers' MLflowCallback: one MLflow run here spans training, a resume and
the evaluation afterwards, and that callback opens and closes a run per `train()` call.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

from transformers import TrainerCallback

RUN_ID_FILE = "mlflow_run_id"  # in the run folder: the MLflow run a resumed or evaluated run continues
LOCAL_STORE, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"
LOGGED_STEP_METRICS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy")


def enabled(config) -> bool:
    """Whether to track this run: "off" never; "auto" when mlflow is installed; "on" requires it."""
    installed = importlib.util.find_spec("mlflow") is not None
    if config.tracking == "on" and not installed:
        from lib.config import ConfigError

        raise ConfigError("tracking", "on", "auto or off: mlflow is not installed (pip install -r requirements.txt)")
    return config.tracking != "off" and installed


def tracking_uri(config) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(config.output_dir).resolve() / LOCAL_STORE}"


def experiment_name(config) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"qlora-{config.task}"


def _client_and_run(config):
    """(MlflowClient, run id) of the config's run, created on first use."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    id_file = config.run_dir / RUN_ID_FILE
    if id_file.is_file():
        return client, id_file.read_text(encoding="utf-8").strip()
    experiment = client.get_experiment_by_name(experiment_name(config))
    if experiment is None:
        artifacts = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            artifacts = (Path(config.output_dir).resolve() / LOCAL_ARTIFACTS).as_uri()
        experiment_id = client.create_experiment(experiment_name(config), artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=config.run_name, tags={
        "task": config.task, "base_model": config.base_model, "mlflow.source.name": "lib.fine_tuner"})
    config.run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id, encoding="utf-8")
    return client, run.info.run_id


def _safely(what: str, action) -> None:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - tracking must never fail a training run
        warnings.warn(f"MLflow tracking: {what} failed ({type(error).__name__}: {error}); training goes on",
                      stacklevel=3)


class MlflowTracking(TrainerCallback):
    """Logs the run's parameters at the start and its step metrics at every logging step (main process)."""

    def __init__(self, config, plan):
        self.config, self.plan, self.client, self.run_id = config, plan, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return

        def start():
            from mlflow.entities import Param

            self.client, self.run_id = _client_and_run(self.config)
            logged = self.client.get_run(self.run_id).data.params
            values = {**{name: _text(value) for name, value in self.config.to_dict().items()},
                      **{f"plan.{name}": _text(value) for name, value in self.plan.to_dict().items()}}
            new = [Param(name, value) for name, value in values.items() if name not in logged]
            if new:  # a resumed run logged them already (MLflow refuses a changed value)
                self.client.log_batch(self.run_id, params=new)

        _safely("starting the run", start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.client is None or not logs:
            return
        values = {name: float(logs[name]) for name in LOGGED_STEP_METRICS if _number(logs.get(name))}
        if values:
            _safely("logging step metrics", lambda: _log_metrics(self.client, self.run_id, values, state.global_step))


def log_results(config, record: dict | None = None, report: dict | None = None) -> None:
    """After training (record) or evaluation (report): summary metrics, then the run folder's files."""
    if not enabled(config):
        return

    def log():
        client, run_id = _client_and_run(config)
        values = {}
        if record:
            values.update({name: record[name] for name in ("tokens_per_s", "peak_memory_gib", "wall_time_s",
                                                           "train_tokens", "global_step") if _number(record.get(name))})
            values.update({f"train.{name}": value for name, value in record.get("train_metrics", {}).items()
                           if _number(value)})
        if report:
            from lib.evaluation import report_scores

            for system, scores in report_scores(report).items():
                values.update({f"{system}.{metric}": value for metric, value in scores.items() if _number(value)})
        if values:
            step = int(record["global_step"]) if record and _number(record.get("global_step")) else 0
            _log_metrics(client, run_id, values, step)
        run_dir = config.run_dir
        for name in ("run_record.json", "metrics.json", "run_config.json"):
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        for plot in sorted(run_dir.glob("*.png")):
            client.log_artifact(run_id, str(plot), "plots")
        if record and (run_dir / "adapter").is_dir():
            client.log_artifacts(run_id, str(run_dir / "adapter"), "adapter")

    _safely("logging results", log)


def _log_metrics(client, run_id: str, values: dict, step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(name, float(value), now, step) for name, value in values.items()])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _text(value) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
