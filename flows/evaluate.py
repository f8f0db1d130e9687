"""The evaluate flow: predictions (saved, or made now from a labelled folder) + labels → metrics and report.

Run it with `oncoflow evaluate` or `python -m flows.evaluate`. Research use only: the report describes
a statistical model on one set of labelled images, not a diagnostic test.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.classify import classify
from flows.credentials import storage_options
from flows.logs import send_logs_to_prefect
from flows.params import EvaluateParams, flow_params
from tasks.defaults import plural
from tasks.labels import labeled_folder, read_labels_file
from tasks.metrics import compute_metrics, join_labels, read_predictions
from tasks.model import inspect_model
from tasks.model_files import DEFAULT_MODEL
from tasks.report import (
    PLOTS,
    check_report_folder,
    few_images_warning,
    metric_text,
    one_class_warning,
    render_markdown,
    write_report,
)

send_logs_to_prefect()  # warnings (a lease wait, a skipped file) reach the run logs in the UI

SUMMARY_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "mcc",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)


def classify_labeled_folder(params: EvaluateParams) -> tuple[str, pd.DataFrame, str]:
    """Run the classify flow over the labelled folder into REPORT/predictions; (dest, labels, revision)."""
    assert params.data is not None
    truth = pd.DataFrame(
        [(image.uri, image.label) for image in labeled_folder(params.data)], columns=["image_uri", "y_true"]
    )
    destination = os.path.join(os.path.abspath(params.output), predictions_folder(params))
    if os.path.exists(
        os.path.join(params.output, "metrics.json")
    ):  # before classifying: whose report is there
        revision = inspect_model(params.model, params.revision, weights=False).revision
        check_report_folder(params.output, [revision], destination)
    summary = classify(
        source=params.data,
        output=destination,
        model=params.model,
        revision=params.revision,
        device=params.device,
        precision=params.precision,
        batch_size=params.batch_size,
        compile=params.compile,
        s3_endpoint_url=params.s3_endpoint_url,
        aws_credentials_block=params.aws_credentials_block,
    )
    return destination, truth, summary["model_revision"]


def predictions_folder(params: EvaluateParams) -> str:
    """REPORT's sub-folder for --data's predictions: `predictions`, plus the settings that change the
    numbers when they are not the defaults (`predictions-cuda-bf16-compiled`). Classify's index is
    keyed by model revision only, so one folder for every setting would score the first setting's rows
    again: each setting gets its own rows, and a re-run with the same ones resumes."""
    parts: list[str] = [part for part in (params.device, params.precision) if part != "auto"]
    return "-".join(["predictions", *parts, *(["compiled"] if params.compile else [])])


@task(cache_policy=NONE)
def score(
    destination: str,
    labels: pd.DataFrame,
    revision: str | None,
    target: float | None,
    storage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join the newest predictions of one model revision to the labels and compute the metrics."""
    joined = join_labels(read_predictions(destination, revision, storage), labels)
    metrics = compute_metrics(joined, target)
    metrics["predictions"] = (
        destination if "://" in destination else os.path.abspath(os.path.expanduser(destination))
    )
    for warning in (one_class_warning(metrics), few_images_warning(metrics)):
        if warning:
            get_run_logger().warning(warning)
    return {"metrics": metrics, "scored": joined.scored}


@task(cache_policy=NONE)
def save_report(folder: str, metrics: dict[str, Any], scored: pd.DataFrame) -> dict[str, str]:
    """metrics.json, report.md and the PNG plots in the report folder."""
    return write_report(
        folder,
        metrics,
        scored["y_true"].to_numpy(),
        scored["y_pred"].to_numpy(),
        scored["prob_malignant"].to_numpy(dtype=float),
    )


def publish_report(metrics: dict[str, Any], written: dict[str, str]) -> None:
    """The report as Prefect artifacts: the markdown with its plots inlined, and the metrics as a table."""
    markdown = render_markdown(metrics)
    for name, file in PLOTS.items():
        with open(written[name], "rb") as handle:
            inline = "data:image/png;base64," + base64.b64encode(handle.read()).decode()
        markdown = markdown.replace(f"]({file})", f"]({inline})")
    create_markdown_artifact(
        markdown, key="evaluation-report", description="Research use only, not a diagnosis."
    )
    rows = [
        {"metric": key, "value": str(metrics[key]) if metrics[key] is not None else metric_text(metrics, key)}
        for key in (*SUMMARY_KEYS, "tp", "fp", "tn", "fn")
    ]
    create_table_artifact(rows, key="evaluation-metrics", description="oncoflow evaluate; research use only.")


@flow(name="evaluate", log_prints=True)
def evaluate(
    output: str,
    predictions: str | None = None,
    labels: str | None = None,
    model_revision: str | None = None,
    data: str | None = None,
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    batch_size: int | None = None,
    target_sensitivity: float | None = None,
    s3_endpoint_url: str | None = None,
    aws_credentials_block: str | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Evaluate predictions against labels; write metrics.json, report.md and plots to OUTPUT."""
    params = flow_params(EvaluateParams, **locals())
    chosen: str | None
    if params.data is not None:
        destination, truth, chosen = classify_labeled_folder(params)
    else:
        assert params.predictions is not None and params.labels is not None
        destination, truth, chosen = (
            params.predictions,
            read_labels_file(params.labels),
            params.model_revision,
        )
    storage = storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    scored = score(destination, truth, chosen, params.target_sensitivity, storage)
    metrics = scored["metrics"]
    written = save_report(params.output, metrics, scored["scored"])
    publish_report(metrics, written)
    images = metrics["images"]
    print(
        f"evaluated {plural(images['evaluated'], 'image')}: accuracy {metric_text(metrics, 'accuracy')}, "
        f"recall {metric_text(metrics, 'recall')}, specificity {metric_text(metrics, 'specificity')}; "
        f"not evaluated: {plural(images['labelled_error_rows'], 'labelled error row')}, "
        f"{plural(images['predictions_without_label'], 'prediction')} without label, "
        f"{plural(images['labels_without_prediction'], 'label')} without prediction. Report: {written['report']}"
    )
    return metrics


if __name__ == "__main__":
    from flows.cli import evaluate_command_app
    from flows.quick_exit import run_command

    run_command(evaluate_command_app)
