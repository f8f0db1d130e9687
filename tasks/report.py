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

from tasks.defaults import plural  # noqa: E402
from tasks.labels import CLASS_NAMES  # noqa: E402
from tasks.metrics import CALIBRATION_BINS, json_safe  # noqa: E402
from tasks.storage import is_image_name, open_location, write_atomic  # noqa: E402

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


PERCENT_METRICS = {
    "accuracy",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "false_negative_rate",
    "false_positive_rate",
}
# The images each metric divides by, as the reason it is n/a; MCC and the AUCs need all of them.
MALIGNANT, NORMAL = "no Malignant images", "no Normal images"
CALLED_MALIGNANT, CALLED_NORMAL = "nothing predicted Malignant", "nothing predicted Normal"
DENOMINATORS = {
    "precision": (CALLED_MALIGNANT,),
    "recall": (MALIGNANT,),
    "sensitivity": (MALIGNANT,),
    "false_negative_rate": (MALIGNANT,),
    "specificity": (NORMAL,),
    "false_positive_rate": (NORMAL,),
    "f1": (MALIGNANT,),  # null only when there is no Malignant image and none is predicted
}


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def undefined_reason(metrics: dict[str, Any], key: str) -> str:
    """Why metrics[key] is null: which group of images its denominator counts is empty."""
    tp, fp, tn, fn = (metrics[k] for k in ("tp", "fp", "tn", "fn"))
    empty = {
        MALIGNANT: tp + fn == 0,
        NORMAL: tn + fp == 0,
        CALLED_MALIGNANT: tp + fp == 0,
        CALLED_NORMAL: tn + fn == 0,
    }
    return next((reason for reason in DENOMINATORS.get(key, tuple(empty)) if empty[reason]), "undefined")


def metric_text(metrics: dict[str, Any], key: str) -> str:
    """metrics[key] as shown to people: a percentage, 4 decimals, or `n/a (no Malignant images)`."""
    value = metrics[key]
    if value is None:
        return f"n/a ({undefined_reason(metrics, key)})"
    return percent(value) if key in PERCENT_METRICS else f"{value:.4f}"


# The seed model card's performance table: (row name, metrics key).
SEED_ROWS = (
    ("Accuracy", "accuracy"),
    ("Precision", "precision"),
    ("Recall (Sensitivity)", "recall"),
    ("Specificity", "specificity"),
    ("F1 Score", "f1"),
    ("MCC", "mcc"),
)


def seed_table(metrics: dict[str, Any]) -> str:
    """The seed model card's performance table, filled with these metrics."""
    return "\n".join(
        [
            "| Metric | Value |",
            "|---|---|",
            *(f"| {name} | {metric_text(metrics, key)} |" for name, key in SEED_ROWS),
        ]
    )


FEW_IMAGES = 30  # per class: below it a 95% interval spans ±15 points or more (Wilson, near 75%)
LOW_PREVALENCE = 0.05  # the share at which precision is restated: rarer disease than in a curated set


def interval_text(metrics: dict[str, Any], key: str) -> str:
    """` (95% CI a–b)` for recall or specificity, or nothing when undefined."""
    bounds = (metrics.get("wilson_95") or {}).get(key)
    return "" if bounds is None else f" (95% CI {percent(bounds[0])}–{percent(bounds[1])})"


def precision_at(metrics: dict[str, Any], share: float) -> float | None:
    """The precision these sensitivity and specificity give where `share` of the images are Malignant."""
    sensitivity, specificity = metrics["recall"], metrics["specificity"]
    if sensitivity is None or specificity is None:
        return None
    called = sensitivity * share + (1 - specificity) * (1 - share)
    return sensitivity * share / called if called else None


def few_images_warning(metrics: dict[str, Any]) -> str | None:
    """A sentence when a class has fewer than FEW_IMAGES images (and more than none); else None."""
    counts = metrics["counts"]
    small = [name for name in ("Malignant", "Normal") if 0 < counts[name] < FEW_IMAGES]
    if not small:
        return None
    which = " and ".join(f"{plural(counts[name], name + ' image')}" for name in small)
    return (
        f"These figures rest on {which}: each percentage could be far off the model's true rate "
        f"(sensitivity{interval_text(metrics, 'recall')}, specificity"
        f"{interval_text(metrics, 'specificity')}). Evaluate on at least {FEW_IMAGES} images of each "
        "class, many more to compare models."
    )


def interpretation(metrics: dict[str, Any]) -> str:
    """What the error rates mean for a user, in the seed card's words, with the images behind each."""
    tp, fp, tn, fn = (metrics[k] for k in ("tp", "fp", "tn", "fn"))
    lines = [f"- Correctly classifies {percent(metrics['accuracy'])} of these {tp + fp + tn + fn} images."]
    if metrics["recall"] is None:
        lines.append(
            f"- Sensitivity and false negative rate: {metric_text(metrics, 'recall')} — these images "
            "cannot show how many malignant images it misses."
        )
    else:
        fnr = metrics["false_negative_rate"]
        lines.append(
            f"- Catches {percent(metrics['recall'])}{interval_text(metrics, 'recall')} of the {tp + fn} "
            f"Malignant images: **false negative rate {percent(fnr)}** — it misses about {100 * fnr:.0f} "
            "of every 100 malignant images."
        )
    if metrics["specificity"] is None:
        lines.append(
            f"- Specificity and false positive rate: {metric_text(metrics, 'specificity')} — these images "
            "cannot show how often it flags normal images."
        )
    else:
        fpr = metrics["false_positive_rate"]
        lines.append(
            f"- **False positive rate {percent(fpr)}** — it flags about {100 * fpr:.0f} of every 100 "
            f"normal images as Malignant ({fp} of the {tn + fp} Normal images); specificity "
            f"{percent(metrics['specificity'])}{interval_text(metrics, 'specificity')}."
        )
    if metrics["precision"] is None:
        lines.append(
            f"- Precision: {metric_text(metrics, 'precision')} — it calls none of these images Malignant."
        )
    else:
        share = metrics.get("malignant_share")
        line = (
            f"- Of the {tp + fp} images it calls Malignant, {percent(metrics['precision'])} are Malignant "
            f"and {percent(fp / (tp + fp))} are in fact Normal"
        )
        rare = precision_at(metrics, LOW_PREVALENCE)
        if share is not None and rare is not None:
            line += (
                f", with {percent(share)} of these images Malignant. That share sets precision (and "
                "accuracy, F1, PR AUC): where malignant images are rarer, more of the Malignant calls are "
                f"Normal — with this sensitivity and specificity, where {LOW_PREVALENCE:.0%} of images are "
                f"Malignant, about {100 * (1 - rare):.0f} in 100 Malignant calls would be Normal."
            )
        else:
            line += "."
        lines.append(line)
    return "\n".join(lines)


def one_class_warning(metrics: dict[str, Any]) -> str | None:
    """A sentence for labels of one class only, which leave half of the metrics undefined; else None."""
    counts = metrics["counts"]
    if counts["Malignant"] and counts["Normal"]:
        return None
    present, missing, undefined = (
        ("Normal", "Malignant", "sensitivity, the false negative rate")
        if not counts["Malignant"]
        else ("Malignant", "Normal", "specificity, the false positive rate")
    )
    failed = metrics["images"].get("labelled_error_rows_by_class", {}).get(missing, 0)
    if failed:  # labelled, but their rows are errors: more labels would not help
        return (
            f"The evaluated images hold no {missing} image, only {counts[present]} {present}: the "
            f"{failed} labelled {missing} images all have error rows (see their `error` column), so "
            f"{undefined}, MCC, the ROC/PR AUCs and an operating point cannot be measured and are n/a. "
            "Fix or replace those "
            "files and classify them again."
        )
    return (
        f"The labels hold no {missing} image, only {counts[present]} {present}: {undefined}, MCC, the "
        f"ROC/PR AUCs and an operating point cannot be measured on them and are n/a. Label {missing} "
        "images too."
    )


def trust_notes(metrics: dict[str, Any]) -> list[str]:
    """How far the numbers reach: the images behind each percentage, their 95% intervals, the scope."""
    counts, intervals = metrics["counts"], metrics["wilson_95"]
    called = metrics["tp"] + metrics["fp"]

    def interval(key: str) -> str:
        bounds = intervals[key]
        return metric_text(metrics, key) if bounds is None else f"{percent(bounds[0])}–{percent(bounds[1])}"

    return [
        f"- Sample size: sensitivity and the false negative rate rest on {counts['Malignant']} Malignant "
        f"images, specificity and the false positive rate on {counts['Normal']} Normal images, precision "
        f"on the {called} images called Malignant. With few images a percentage moves a lot from one "
        "set of images to the next.",
        f"- 95% confidence intervals (Wilson): sensitivity {interval('recall')}, specificity "
        f"{interval('specificity')}.",
        "- These figures describe this model on these images only. They do not transfer to other "
        "scanners, sites or patient populations: measure there, on labelled images from there.",
    ]


def confusion_table(metrics: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| | predicted Normal | predicted Malignant |",
            "|---|---|---|",
            f"| **true Normal** ({metrics['counts']['Normal']}) | TN {metrics['tn']} | FP {metrics['fp']} |",
            f"| **true Malignant** ({metrics['counts']['Malignant']}) | FN {metrics['fn']} | TP {metrics['tp']} |",
        ]
    )


def threshold_text(metrics: dict[str, Any]) -> str:
    """The decision threshold the labels were made at; several, said plainly, when rows differ."""
    thresholds = metrics.get("thresholds") or [metrics["threshold"]]
    if len(thresholds) == 1:
        return f"decision threshold on prob_malignant: {float(thresholds[0])!r}."  # as written: not rounded
    return (
        f"decision thresholds on prob_malignant: {', '.join(repr(float(t)) for t in thresholds)} (rows were "
        "classified at different --threshold values; the figures below mix their decisions)."
    )


def render_markdown(metrics: dict[str, Any], title: str = "oncoflow evaluation") -> str:
    """report.md: the seed card's table, what it means, the details and the plots."""
    images = metrics["images"]
    lines = [
        f"# {title}",
        "",
        RESEARCH_NOTICE,
        "",
        f"Model: {', '.join(metrics['models'])} (revision {', '.join(metrics['model_revisions'])}); "
        + threshold_text(metrics),
        f"Evaluated {plural(images['evaluated'], 'labelled image')} ({metrics['counts']['Normal']} Normal, "
        f"{metrics['counts']['Malignant']} Malignant). Not evaluated: "
        f"{plural(images['labelled_error_rows'], 'labelled image')} whose row is an error row, "
        f"{plural(images['predictions_without_label'], 'prediction')} without a label "
        f"({images['error_rows'] - images['labelled_error_rows']} of them error rows), "
        f"{plural(images['labels_without_prediction'], 'label')} without a prediction.",
    ]
    if images.get("labelled_error_examples"):
        quoted = ", ".join(f"`{e['image_uri']}` ({e['error']})" for e in images["labelled_error_examples"])
        lines.append(f"Labelled images whose row is an error row, e.g. {quoted}.")
    if images.get("labels_without_prediction_examples"):
        quoted = ", ".join(f"`{uri}`" for uri in images["labels_without_prediction_examples"])
        lines.append(f"Labels without a prediction, e.g. {quoted}.")
    warning = one_class_warning(metrics)
    if warning:
        lines += ["", f"> **One class only.** {warning}"]
    few = few_images_warning(metrics)
    if few:
        lines += ["", f"> **Few images.** {few}"]
    lines += [
        "",
        "## Performance",
        "",
        seed_table(metrics),
        "",
        "## What the error rates mean",
        "",
        interpretation(metrics),
        "",
        "## How far these numbers reach",
        "",
        *trust_notes(metrics),
        "",
        "## Confusion matrix",
        "",
        confusion_table(metrics),
        "",
        "## Probabilities",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| ROC AUC | {metric_text(metrics, 'roc_auc')} |",
        f"| PR AUC (average precision) | {metric_text(metrics, 'pr_auc')} |",
        f"| Brier score (lower is better) | {metrics['brier']:.4f} |",
        *(
            [f"| Brier score of always answering the Malignant share (no skill) | {reference:.4f} |"]
            if (reference := metrics.get("brier_reference")) is not None
            else []
        ),
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
            *(
                f"| {name} | {metric_text(point, key)} |"
                for name, key in (
                    ("Sensitivity", "sensitivity"),
                    ("Specificity", "specificity"),
                    ("Precision", "precision"),
                    ("False positive rate", "false_positive_rate"),
                    ("False negative rate", "false_negative_rate"),
                )
            ),
            f"| TP / FP / TN / FN | {point['tp']} / {point['fp']} / {point['tn']} / {point['fn']} |",
            "",
            "These images chose this threshold, so its sensitivity here is optimistic: confirm it on "
            "another labelled set of images before relying on it.",
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


def predictions_key(predictions: str, folder: str) -> str | None:
    """What identifies the predictions a report scored, for comparing two reports of one REPORT folder:
    an object store's prefix; a local DEST by its real path; `evaluate --data`'s own folder inside
    REPORT (`predictions-cpu-fp32`) by its name alone, so a REPORT moved or reached by another path is
    still the same. None for a relative path (saved so by an older oncoflow: its base is unknown)."""
    if "://" in predictions:
        return predictions.rstrip("/")
    if not os.path.isabs(predictions):
        return None
    path = predictions.rstrip("/")
    name, parent = os.path.basename(path), os.path.dirname(path)
    # REPORT's own folder, here or where REPORT was (moved since: gone from there)
    if name.startswith("predictions") and (
        os.path.realpath(parent) == os.path.realpath(folder) or not os.path.exists(path)
    ):
        return f"REPORT/{name}"
    return os.path.realpath(path)


def check_not_among_images(folder: str) -> None:
    """ValueError when REPORT holds image files and no report (metrics.json): an image folder given by
    mistake. The plots would go in among the images, replacing any of the same name, and be classified
    with them the next night if the folder is a classify SOURCE."""
    if os.path.exists(os.path.join(folder, "metrics.json")):
        return
    try:
        with os.scandir(folder) as entries:
            images = sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())
    except OSError:  # none yet (it is created), or not a folder: check_writable says so
        return
    if images:
        raise ValueError(
            f"report folder {folder!r} holds {len(images)} image file(s) (e.g. {images[0]!r}) and no "
            f"report: the plots ({', '.join(PLOTS.values())}) would go in among them, replacing any of the "
            "same name, and be classified with them if the folder is a classify SOURCE. Give a new or "
            "empty --output folder"
        )


def check_report_folder(folder: str, revisions: list[str], predictions: str) -> None:
    """ValueError when REPORT already holds the report of other model revisions or of another predictions
    folder (another --device/--precision/--compile, another DEST): writing this one would replace it,
    and the two are compared side by side, not one instead of the other. The same revisions and
    predictions again (new labels, more images) refresh the report. A metrics.json that is not JSON (cut
    short by a crash) is replaced. A folder of images and no report is refused (check_not_among_images)."""
    check_not_among_images(folder)
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path) as handle:
            earlier = json.load(handle)
    except (OSError, ValueError):  # none yet, or not one this folder can be said to hold
        return
    if not isinstance(earlier, dict):
        return
    old_revisions = list(earlier.get("model_revisions") or [])
    old_predictions = str(earlier.get("predictions") or "")
    old_key = predictions_key(old_predictions, folder) if old_predictions else None
    if "://" not in predictions:  # this evaluation's own: relative to where it runs
        predictions = os.path.abspath(os.path.expanduser(predictions))
    if old_revisions == list(revisions) and old_key in (None, predictions_key(predictions, folder)):
        return
    raise ValueError(
        f"report folder {folder!r} holds the report of model revision {', '.join(old_revisions) or '?'} "
        f"(predictions {old_predictions or '?'}); this evaluation, of {', '.join(revisions)} (predictions "
        f"{predictions}), would replace it. Give each model revision and setting its own --output, or "
        f"delete {path} to replace that report"
    )


def write_report(
    folder: str, metrics: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, prob: np.ndarray
) -> dict[str, str]:
    """REPORT/metrics.json, REPORT/report.md and the plots; returns what was written. Refused (before
    writing) when REPORT holds the report of another model revision or predictions folder."""
    check_report_folder(
        folder, list(metrics.get("model_revisions") or []), str(metrics.get("predictions") or "")
    )
    os.makedirs(folder, exist_ok=True)
    written = save_plots(folder, y_true, y_pred, prob)
    # Whole or not at all (a crash leaves the earlier file); metrics.json last: it names what REPORT holds.
    report = open_location(folder)
    written["report"] = write_atomic(report, "report.md", render_markdown(metrics).encode())
    written["metrics"] = write_atomic(
        report, "metrics.json", json.dumps(json_safe(metrics), indent=2).encode()
    )
    return written
