"""Evaluation reports: metrics.json, report.md in the seed card's table layout, and PNG plots."""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay  # noqa: E402

from tasks.labels import CLASS_NAMES  # noqa: E402
from tasks.metrics import CALIBRATION_BINS, json_safe  # noqa: E402

RESEARCH_NOTICE = (
    "> **For research, not diagnosis.** These numbers describe a statistical model on one set of "
    "labelled images. They are not clinical findings; every result must be reviewed by a qualified person."
)
PLOTS = {
    "roc": "roc.png",
    "precision_recall": "precision_recall.png",
    "confusion_matrix": "confusion_matrix.png",
    "reliability": "reliability.png",
}


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def seed_table(metrics: dict[str, Any]) -> str:
    """The seed model card's performance table, filled with these metrics."""
    rows = [
        ("Accuracy", percent(metrics["accuracy"])),
        ("Precision", percent(metrics["precision"])),
        ("Recall (Sensitivity)", percent(metrics["recall"])),
        ("Specificity", percent(metrics["specificity"])),
        ("F1 Score", f"{metrics['f1']:.4f}"),
        ("MCC", f"{metrics['mcc']:.4f}"),
    ]
    return "\n".join(["| Metric | Value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def interpretation(metrics: dict[str, Any]) -> str:
    """What the error rates mean for a user, in the seed card's words."""
    called_malignant = metrics["tp"] + metrics["fp"]
    wrong_share = metrics["fp"] / called_malignant if called_malignant else 0.0
    return "\n".join(
        [
            f"- Correctly classifies {percent(metrics['accuracy'])} of these images.",
            f"- Catches {percent(metrics['recall'])} of the Malignant images: **false negative rate "
            f"{percent(metrics['false_negative_rate'])}** — it misses about "
            f"{100 * metrics['false_negative_rate']:.0f} of every 100 malignant images.",
            f"- **False positive rate {percent(metrics['false_positive_rate'])}** — it flags about "
            f"{100 * metrics['false_positive_rate']:.0f} of every 100 normal images as Malignant.",
            f"- Of the images it calls Malignant, {percent(metrics['precision'])} are Malignant "
            f"and {percent(wrong_share)} are in fact Normal.",
        ]
    )


def confusion_table(metrics: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| | predicted Normal | predicted Malignant |",
            "|---|---|---|",
            f"| **true Normal** ({metrics['counts']['Normal']}) | TN {metrics['tn']} | FP {metrics['fp']} |",
            f"| **true Malignant** ({metrics['counts']['Malignant']}) | FN {metrics['fn']} | TP {metrics['tp']} |",
        ]
    )


def optional(value: float | None) -> str:
    return "n/a (one class only)" if value is None else f"{value:.4f}"


def render_markdown(metrics: dict[str, Any], title: str = "oncoflow evaluation") -> str:
    """report.md: the seed card's table, what it means, the details and the plots."""
    images = metrics["images"]
    lines = [
        f"# {title}",
        "",
        RESEARCH_NOTICE,
        "",
        f"Model: {', '.join(metrics['models'])} (revision {', '.join(metrics['model_revisions'])}); "
        f"decision threshold on prob_malignant: {metrics['threshold']}.",
        f"Evaluated {images['evaluated']} labelled images ({metrics['counts']['Normal']} Normal, "
        f"{metrics['counts']['Malignant']} Malignant). Not evaluated: {images['error_rows']} error rows "
        f"({images['labelled_error_rows']} of them labelled), {images['predictions_without_label']} "
        f"predictions without a label, {images['labels_without_prediction']} labels without a prediction.",
        "",
        "## Performance",
        "",
        seed_table(metrics),
        "",
        "## What the error rates mean",
        "",
        interpretation(metrics),
        "",
        "## Confusion matrix",
        "",
        confusion_table(metrics),
        "",
        "## Probabilities",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| ROC AUC | {optional(metrics['roc_auc'])} |",
        f"| PR AUC (average precision) | {optional(metrics['pr_auc'])} |",
        f"| Brier score (lower is better) | {metrics['brier']:.4f} |",
        f"| ECE, {CALIBRATION_BINS} bins (lower is better) | {metrics['ece']:.4f} |",
    ]
    point = metrics.get("operating_point")
    if point:
        lines += [
            "",
            f"## Operating point for sensitivity ≥ {percent(point['target_sensitivity'])}",
            "",
            f"Threshold **{point['threshold']!r}** (use this exact value: `oncoflow classify "
            f"--threshold {point['threshold']!r}`):",
            "",
            "| Metric | Value |",
            "|---|---|",
            f"| Sensitivity | {percent(point['sensitivity'])} |",
            f"| Specificity | {percent(point['specificity'])} |",
            f"| Precision | {percent(point['precision'])} |",
            f"| False positive rate | {percent(point['false_positive_rate'])} |",
            f"| False negative rate | {percent(point['false_negative_rate'])} |",
            f"| TP / FP / TN / FN | {point['tp']} / {point['fp']} / {point['tn']} / {point['fn']} |",
        ]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({file})" for name, file in PLOTS.items()]
    return "\n".join(lines) + "\n"


def draw_plot(name: str, ax: Any, y_true: np.ndarray, y_pred: np.ndarray, prob: np.ndarray) -> None:
    """One of PLOTS on the given axes; curves need labelled images of both classes."""
    if name == "confusion_matrix":
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=[0, 1], display_labels=list(CLASS_NAMES), ax=ax, colorbar=False
        )
    elif len(np.unique(y_true)) < 2:
        ax.set_title(f"{name}: needs labelled images of both classes")
    elif name == "roc":
        RocCurveDisplay.from_predictions(y_true, prob, ax=ax, name="prob_malignant", plot_chance_level=True)
    elif name == "precision_recall":
        PrecisionRecallDisplay.from_predictions(
            y_true, prob, ax=ax, name="prob_malignant", plot_chance_level=True
        )
    else:
        CalibrationDisplay.from_predictions(
            y_true, prob, n_bins=CALIBRATION_BINS, ax=ax, name="prob_malignant"
        )


def save_plots(folder: str, y_true: np.ndarray, y_pred: np.ndarray, prob: np.ndarray) -> dict[str, str]:
    """ROC, precision-recall, confusion matrix and reliability diagram as PNGs; returns their paths."""
    paths = {}
    for name, file in PLOTS.items():
        figure, ax = plt.subplots(figsize=(5, 5))
        try:
            draw_plot(name, ax, y_true, y_pred, prob)
            paths[name] = os.path.join(folder, file)
            figure.savefig(paths[name], dpi=100, bbox_inches="tight")
        finally:
            plt.close(figure)
    return paths


def write_report(
    folder: str, metrics: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, prob: np.ndarray
) -> dict[str, str]:
    """REPORT/metrics.json, REPORT/report.md and the plots; returns what was written."""
    os.makedirs(folder, exist_ok=True)
    written = save_plots(folder, y_true, y_pred, prob)
    written["metrics"] = os.path.join(folder, "metrics.json")
    with open(written["metrics"], "w") as handle:
        json.dump(json_safe(metrics), handle, indent=2)
    written["report"] = os.path.join(folder, "report.md")
    with open(written["report"], "w") as handle:
        handle.write(render_markdown(metrics))
    return written
