"""Evaluation: join predictions to labels on image_uri and compute the seed card's metrics and more.

The formulas are scikit-learn's; Malignant (1) is the positive class. Only `status == "ok"` rows are
scored; error rows are counted. ECE and the Wilson intervals are the metrics scikit-learn does not have.
A metric whose denominator is empty (recall without Malignant images, precision when nothing is called
Malignant, ...) is None, null in metrics.json: undefined, never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from tasks.analytics import retry_while_compacting
from tasks.labels import CLASS_NAMES
from tasks.model_files import POSITIVE_LABEL
from tasks.sink import find_unreadable_file, open_dataset
from tasks.storage import Location, missing_bucket, open_location, storage_call

PREDICTION_COLUMNS = ["image_uri", "prob_malignant", "label", "threshold", "model", "model_revision"]
CALIBRATION_BINS = 10
WILSON_Z = 1.959963984540054  # the standard normal quantile of a two-sided 95% interval


class EvaluationError(ValueError):
    """Predictions and labels that cannot be evaluated; the message says why and what to do."""


def read_predictions(
    destination: str, model_revision: str | None = None, storage: dict[str, Any] | None = None
) -> pd.DataFrame:
    """The newest row per image for one model revision of a classify output dataset.

    A dataset holding several revisions must be narrowed with `model_revision` (a revision or a
    model_slug partition value): metrics that mix two models describe neither.
    """
    model_revision = revision_name(model_revision)
    location = open_location(destination, storage or {})
    if not storage_call(location.fs, location.path, lambda: location.fs.isdir(location.path)):
        raise FileNotFoundError(
            missing_bucket(location)
            or f"predictions dataset {destination!r} does not exist; check --predictions"
        )
    columns = [*PREDICTION_COLUMNS, "status", "error", "processed_at", "run_id", "model_slug"]
    wanted = None
    if model_revision:  # pushed down: other revisions' files are skipped, not loaded and dropped
        wanted = (pc.field("model_revision") == model_revision) | (pc.field("model_slug") == model_revision)

    def read() -> pa.Table | None:
        dataset = open_dataset(location)  # only the partition files: a stray README or export is not data
        return None if dataset is None else dataset.to_table(columns=columns, filter=wanted)

    try:
        table = retry_while_compacting(lambda: storage_call(location.fs, location.path, read))
    except pa.ArrowInvalid as exc:  # a damaged or foreign file: name it, and what to do
        raise (find_unreadable_file(location) or exc) from exc
    found = set() if table is None else set(pc.unique(table.column("model_revision")).drop_null().to_pylist())
    if model_revision and len(found) == 1 and model_revision not in found:
        # A model_slug names the folder the model was loaded from: the same weights loaded from another
        # folder wrote their rows under another slug. The revision the slug stands for takes them all.
        wanted = pc.field("model_revision") == found.pop()
        table = retry_while_compacting(lambda: storage_call(location.fs, location.path, read))
    if table is None:
        raise EvaluationError(
            f"predictions dataset {destination!r} holds no model_slug=*/date=*/*.parquet files; check "
            "--predictions: it must be the --output folder of `oncoflow classify`"
        )
    frame = table.to_pandas()
    revisions = sorted(frame["model_revision"].dropna().unique())
    if not revisions:
        if not model_revision:
            raise EvaluationError(f"predictions dataset {destination!r} holds no rows")
        present = retry_while_compacting(
            lambda: storage_call(location.fs, location.path, lambda: _revisions(location))
        )
        raise missing_revision(destination, model_revision, present)
    if len(revisions) > 1:
        pairs = frame[["model_revision", "model_slug"]].drop_duplicates().itertuples(index=False)
        raise several_revisions(destination, len(revisions), sorted(f"{r} ({s})" for r, s in pairs))
    # Rows written before file URIs spelled `%` as %25 (2026-11-27) compare in the current spelling, so
    # labels match them and an image with rows in both spellings counts once.
    frame["image_uri"] = canonical_uris(frame["image_uri"])
    # An image re-classified after its content changed has several rows; the newest one counts.
    # Ties on processed_at go to the later run_id, as in the `latest` view.
    frame = frame.sort_values(["processed_at", "run_id"], kind="stable").drop_duplicates(
        "image_uri", keep="last"
    )
    return frame.drop(columns=["model_slug", "run_id"]).reset_index(drop=True)


@dataclass(frozen=True)
class Joined:
    """Scored rows (ok and labelled) plus the counts of what could not be scored."""

    scored: pd.DataFrame  # image_uri, y_true, y_pred, prob_malignant, threshold, model, model_revision
    error_rows: int
    labelled_error_rows: int
    predictions_without_label: int  # the unlabelled error rows among them
    labels_without_prediction: int
    unmatched_labels: list[str] = field(default_factory=list)  # up to EXAMPLES labels without a prediction
    labelled_error_rows_by_class: dict[str, int] = field(default_factory=dict)  # Normal, Malignant
    labelled_error_examples: list[dict[str, str]] = field(
        default_factory=list
    )  # image_uri, error: up to EXAMPLES


EXAMPLES = 5  # unmatched image_uri values quoted in messages and reports


# In a stored row written before 2026-11-27 a `%` was literal; the current spelling has only `%25` and
# escapes of bytes that are not UTF-8 (0x80 and up, upper case): any other `%` is certainly old.
OLD_LITERAL_PERCENT = r"%(?!25|[89A-F][0-9A-F])"


def canonical_uris(uris: pd.Series) -> pd.Series:
    """Stored `file://` image_uri values in the current spelling: a literal `%` of an older row becomes
    `%25` (never decoded: in old rows `%20` meant the three characters). Others as they are."""
    local = uris.str.startswith("file://", na=False) & uris.str.contains("%", regex=False, na=False)
    if not local.any():
        return uris
    return uris.where(~local, uris[local].str.replace(OLD_LITERAL_PERCENT, "%25", regex=True))


def check_revision_choice(
    destination: str, model_revision: str | None = None, storage: dict[str, Any] | None = None
) -> str | None:
    """The model revision an evaluation of this dataset scores (None when the dataset holds no rows or
    cannot be opened here); EvaluationError when it holds several and `model_revision` is None, or none
    that `model_revision` names (a revision or a model_slug). Reads the two columns alone (cheap, so the
    CLI checks before Prefect starts); read_predictions says the rest."""
    model_revision = revision_name(model_revision)
    location = open_location(destination, storage or {})
    dataset = open_dataset(location)
    if dataset is None:
        return None
    table = dataset.to_table(columns=["model_revision", "model_slug"])
    revisions = pc.unique(table.column("model_revision")).drop_null()
    if model_revision is None and len(revisions) > 1:
        raise several_revisions(destination, len(revisions), _revisions(location))
    pairs = table.group_by(["model_revision", "model_slug"]).aggregate([]).to_pylist()
    chosen = {
        p["model_revision"] for p in pairs if model_revision in (None, p["model_revision"], p["model_slug"])
    }
    if model_revision is not None and not chosen:
        raise missing_revision(destination, model_revision, _revisions(location))
    return next(iter(chosen)) if len(chosen) == 1 else None


def revision_name(model_revision: str | None) -> str | None:
    """--model-revision as given, or the partition folder's name copied whole (`model_slug=vit-1a2b…`)."""
    return model_revision.removeprefix("model_slug=").rstrip("/") if model_revision else model_revision


def several_revisions(destination: str, count: int, present: list[str]) -> EvaluationError:
    """`present`: each revision with its partition, `revision (slug)`."""
    return EvaluationError(
        f"predictions dataset {destination!r} holds {count} model revisions {present}; choose one with "
        "--model-revision (the flow parameter model_revision: a model_revision value or a model_slug "
        "partition name)"
    )


def missing_revision(destination: str, model_revision: str, present: list[str]) -> EvaluationError:
    path = "/" in model_revision or model_revision.startswith(("~", "."))
    hint = (
        " (a model folder's path is not a revision: the rows' `model` column holds the path)" if path else ""
    )
    return EvaluationError(
        f"predictions dataset {destination!r} holds no rows for model revision {model_revision!r}; "
        f"it holds {present or 'none'} (give a model_revision value or a model_slug partition name){hint}"
    )


def _revisions(location: Location) -> list[str]:
    """Each model_revision of the dataset, with its model_slug partition: `revision (slug)`."""
    dataset = open_dataset(location)
    if dataset is None:
        return []
    table = dataset.to_table(columns=["model_revision", "model_slug"])
    pairs = table.group_by(["model_revision", "model_slug"]).aggregate([]).to_pylist()
    return sorted(f"{p['model_revision']} ({p['model_slug']})" for p in pairs)


def join_labels(predictions: pd.DataFrame, labels: pd.DataFrame) -> Joined:
    """Inner join on image_uri; count both sides' leftovers and the error rows."""
    merged = predictions.merge(labels, on="image_uri", how="outer", indicator=True)
    with_both = merged[merged["_merge"] == "both"]
    is_error = with_both["status"] != "ok"
    scored = with_both[~is_error].copy()
    if scored.empty:
        common = len(with_both)
        if common:  # the URIs match, but every labelled image is an error row
            reasons = with_both["error"] if "error" in with_both else pd.Series("", index=with_both.index)
            errors = reasons.fillna("").str.split(":").str[0].value_counts()
            categories = ", ".join(f"{count} {category or 'error'}" for category, count in errors.items())
            fix = (
                f"all {common} labelled images are error rows ({categories}): fix or replace those "
                "files (the error column says why), run classify again, then evaluate"
            )
        else:
            label_example = labels["image_uri"].iloc[0] if len(labels) else None
            prediction_example = predictions["image_uri"].iloc[0] if len(predictions) else None
            fix = (
                "check that the labels' image_uri values match the predictions' (file:///abs/path or "
                "s3://bucket/key; a relative path in a labels file is relative to the labels file's "
                f"folder): e.g. a label for {label_example!r}, a prediction for {prediction_example!r}"
            )
        raise EvaluationError(
            f"no successfully classified image has a label: {len(predictions)} prediction rows, "
            f"{len(labels)} labels, {common} in common; {fix}"
        )
    scored["y_true"] = scored["y_true"].astype(int)
    scored["y_pred"] = (scored["label"].str.lower() == POSITIVE_LABEL.lower()).astype(int)
    keep = ["image_uri", "y_true", "y_pred", "prob_malignant", "threshold", "model", "model_revision"]
    return Joined(
        scored=scored[keep].sort_values("image_uri").reset_index(drop=True),
        error_rows=int((predictions["status"] != "ok").sum()),
        labelled_error_rows=int(is_error.sum()),
        predictions_without_label=int((merged["_merge"] == "left_only").sum()),
        labels_without_prediction=int((merged["_merge"] == "right_only").sum()),
        unmatched_labels=sorted(merged.loc[merged["_merge"] == "right_only", "image_uri"])[:EXAMPLES],
        labelled_error_rows_by_class={
            name: int((with_both.loc[is_error, "y_true"] == class_id).sum())
            for class_id, name in enumerate(("Normal", POSITIVE_LABEL))
        },
        labelled_error_examples=[
            {"image_uri": str(uri), "error": str(error or "")}
            for uri, error in with_both.loc[is_error]
            .sort_values("image_uri")[["image_uri", "error"]]
            .head(EXAMPLES)
            .itertuples(index=False)
        ]
        if "error" in with_both
        else [],
    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """The seed card's table (as fractions) plus the confusion counts and the two error rates.

    None where the denominator is empty: precision when nothing is called Malignant, recall and the
    false negative rate without Malignant images, specificity and the false positive rate without
    Normal ones, F1 when no image is labelled or called Malignant, MCC when any row or column of the
    confusion matrix is empty.
    """
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    malignant, normal, called_malignant, called_normal = tp + fn, tn + fp, tp + fp, tn + fn
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred)) if called_malignant else None,
        "recall": float(recall_score(y_true, y_pred)) if malignant else None,
        "specificity": float(recall_score(y_true, y_pred, pos_label=0)) if normal else None,
        # 2TP / (2TP + FP + FN): still defined (as 0) when only one of precision and recall is.
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)) if tp + fp + fn else None,
        "mcc": float(matthews_corrcoef(y_true, y_pred))
        if malignant and normal and called_malignant and called_normal
        else None,
        "false_negative_rate": fn / malignant if malignant else None,
        "false_positive_rate": fp / normal if normal else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def wilson_interval(successes: int, trials: int) -> list[float] | None:
    """The Wilson score 95% interval [low, high] of a proportion; None without trials.

    Unlike p ± 1.96·SE it stays inside [0, 1] and is honest for small counts and for 0% or 100%.
    """
    if not trials:
        return None
    share = successes / trials
    shrink = 1 + WILSON_Z**2 / trials
    centre = (share + WILSON_Z**2 / (2 * trials)) / shrink
    half = WILSON_Z * math.sqrt(share * (1 - share) / trials + WILSON_Z**2 / (4 * trials**2)) / shrink
    # At 0% and 100% the bound is exactly 0 or 1; floating point would write 2.8e-17 or 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return [low, high]


def rate_intervals(decisions: dict[str, Any]) -> dict[str, list[float] | None]:
    """95% Wilson intervals of sensitivity (`recall`) and specificity, from classification_metrics."""
    tp, fp, tn, fn = (decisions[k] for k in ("tp", "fp", "tn", "fn"))
    return {"recall": wilson_interval(tp, tp + fn), "specificity": wilson_interval(tn, tn + fp)}


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Weighted mean |share of Malignant − mean prob_malignant| over equal-width probability bins."""
    which = np.clip((prob * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(y_true[members].mean() - prob[members].mean())
    return float(total / len(prob))


def probability_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float | None]:
    """Threshold-free quality of prob_malignant; AUCs are null when only one class is present."""
    both = len(np.unique(y_true)) == 2
    return {
        "roc_auc": float(roc_auc_score(y_true, prob)) if both else None,
        "pr_auc": float(average_precision_score(y_true, prob)) if both else None,
        "brier": float(brier_score_loss(y_true, prob, labels=[0, 1])),
        "ece": expected_calibration_error(y_true, prob),
    }


def operating_point(y_true: np.ndarray, prob: np.ndarray, target_sensitivity: float) -> dict[str, Any]:
    """The highest threshold whose sensitivity is >= the target, and what it costs.

    Thresholds follow classify's rule (Malignant iff prob_malignant >= threshold), so passing the exact
    value to `classify --threshold` reproduces these numbers on the same images.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise EvaluationError(f"target sensitivity {target_sensitivity} must be in (0, 1]")
    if len(np.unique(y_true)) < 2:
        raise EvaluationError(
            "an operating point needs labelled images of both classes; these labels have one: add "
            "images of the other class, or evaluate without --target-sensitivity"
        )
    _, tpr, thresholds = roc_curve(y_true, prob, drop_intermediate=False)
    threshold = float(thresholds[int(np.argmax(tpr >= target_sensitivity))])
    at = classification_metrics(y_true, (prob >= threshold).astype(int))
    return {
        "target_sensitivity": target_sensitivity,
        "threshold": threshold,
        "sensitivity": at["recall"],
        "specificity": at["specificity"],
        "precision": at["precision"],
        "false_positive_rate": at["false_positive_rate"],
        "false_negative_rate": at["false_negative_rate"],
        "accuracy": at["accuracy"],
        **{k: at[k] for k in ("tp", "fp", "tn", "fn")},
    }


def compute_metrics(joined: Joined, target_sensitivity: float | None = None) -> dict[str, Any]:
    """Everything metrics.json holds, from joined predictions and labels."""
    scored = joined.scored
    y_true = scored["y_true"].to_numpy()
    y_pred = scored["y_pred"].to_numpy()
    prob = scored["prob_malignant"].to_numpy(dtype=float)
    thresholds = sorted(scored["threshold"].unique().tolist())
    decisions = classification_metrics(y_true, y_pred)
    metrics: dict[str, Any] = {
        "models": sorted(scored["model"].unique().tolist()),
        "model_revisions": sorted(scored["model_revision"].unique().tolist()),
        # The decisions are classify's own labels, made at the threshold recorded in each row:
        # `threshold` is that number, null when the rows were decided at several (`thresholds`).
        "threshold": thresholds[0] if len(thresholds) == 1 else None,
        "thresholds": thresholds,
        "images": {
            "evaluated": len(scored),
            "error_rows": joined.error_rows,
            "labelled_error_rows": joined.labelled_error_rows,
            "labelled_error_rows_by_class": joined.labelled_error_rows_by_class,
            "predictions_without_label": joined.predictions_without_label,
            "labels_without_prediction": joined.labels_without_prediction,
            "labels_without_prediction_examples": joined.unmatched_labels,
            "labelled_error_examples": joined.labelled_error_examples,
        },
        "counts": {name: int((y_true == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        # Precision, accuracy, F1 and PR AUC depend on it: compare them only at the same share.
        "malignant_share": float(y_true.mean()) if len(y_true) else None,
        "predicted_counts": {name: int((y_pred == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        **decisions,
        "wilson_95": rate_intervals(decisions),
        **probability_metrics(y_true, prob),
        # The Brier score of always answering the Malignant share: the no-skill reference.
        "brier_reference": float(y_true.mean() * (1 - y_true.mean())) if len(y_true) else None,
        "operating_point": None,
    }
    if target_sensitivity is not None:
        if not 0.0 < target_sensitivity <= 1.0:
            raise EvaluationError(f"target sensitivity {target_sensitivity} must be in (0, 1]")
        if len(np.unique(y_true)) == 2:  # else null, like the other metrics one class leaves undefined
            metrics["operating_point"] = operating_point(y_true, prob, target_sensitivity)
    return metrics


def json_safe(value: Any) -> Any:
    """NaN/inf become null: metrics.json stays valid JSON for every reader."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
