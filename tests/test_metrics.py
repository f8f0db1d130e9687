"""Metrics, labels and reports without Prefect: the seed card's table, operating points, joins, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tasks.labels import LabelError, label_id, labeled_folder, read_labels_file
from tasks.metrics import (
    EvaluationError,
    Joined,
    classification_metrics,
    compute_metrics,
    join_labels,
    operating_point,
    read_predictions,
    wilson_interval,
)
from tasks.report import interpretation, render_markdown, seed_table, write_report
from tests.analytics_data import FIRST_DAY, OLD, rows, write
from tests.conftest import make_image


def seed_card_predictions() -> tuple[np.ndarray, np.ndarray]:
    """650 test images as the seed card counts them: TP 138, FN 53, FP 55, TN 404."""
    y_true = np.array([1] * 138 + [1] * 53 + [0] * 55 + [0] * 404)
    y_pred = np.array([1] * 138 + [0] * 53 + [1] * 55 + [0] * 404)
    return y_true, y_pred


def test_the_seed_cards_table_is_reproduced() -> None:
    y_true, y_pred = seed_card_predictions()
    metrics = classification_metrics(y_true, y_pred)

    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (138, 53, 55, 404)
    assert round(100 * metrics["accuracy"], 2) == 83.38
    assert round(100 * metrics["precision"], 2) == 71.50
    assert round(100 * metrics["recall"], 2) == 72.25
    assert round(100 * metrics["specificity"], 2) == 88.02
    assert metrics["f1"] == pytest.approx(0.71875)  # the card truncates to 0.7187
    assert round(metrics["mcc"], 4) == 0.6009
    assert round(100 * metrics["false_negative_rate"], 2) == 27.75
    assert round(100 * metrics["false_positive_rate"], 2) == 11.98
    table = seed_table(metrics)
    for row in [
        "| Accuracy | 83.38% |",
        "| Precision | 71.50% |",
        "| Recall (Sensitivity) | 72.25% |",
        "| Specificity | 88.02% |",
        "| F1 Score | 0.7188 |",
        "| MCC | 0.6009 |",
    ]:
        assert row in table


def scored_frame(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_uri": [f"file:///scans/{n}.png" for n in range(len(y_true))],
            "y_true": y_true,
            "y_pred": (prob >= threshold).astype(int),
            "prob_malignant": prob,
            "threshold": threshold,
            "model": "demo",
            "model_revision": "sha256:abc",
        }
    )


def test_operating_point_is_the_highest_threshold_reaching_the_sensitivity() -> None:
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.35, 0.2, 0.1, 0.05])

    point = operating_point(y_true, prob, 0.75)
    assert point["threshold"] == 0.6  # 3 of 4 malignant at prob >= 0.6; any higher threshold catches 2
    assert point["sensitivity"] == 0.75
    assert point["specificity"] == pytest.approx(5 / 6) and point["false_positive_rate"] == pytest.approx(
        1 / 6
    )
    assert point["precision"] == 0.75
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (3, 1, 5, 1)

    everything = operating_point(y_true, prob, 1.0)
    assert everything["threshold"] == 0.3 and everything["sensitivity"] == 1.0
    assert everything["fp"] == 3  # 0.7, 0.4 and 0.35 are >= 0.3

    with pytest.raises(EvaluationError, match="both classes.*without --target-sensitivity"):
        operating_point(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), 0.9)


def test_metrics_report_and_plots_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = np.array([0] * 60 + [1] * 40)
    prob = np.clip(y_true * 0.5 + rng.uniform(0, 0.5, 100), 0, 1)
    joined = Joined(scored_frame(y_true, prob), 2, 1, 3, 4, [], {"Normal": 1, "Malignant": 0})
    metrics = compute_metrics(joined, target_sensitivity=0.9)

    assert metrics["counts"] == {"Normal": 60, "Malignant": 40}
    assert metrics["images"] == {
        "evaluated": 100,
        "error_rows": 2,
        "labelled_error_rows": 1,
        "predictions_without_label": 3,
        "labels_without_prediction": 4,
        "labels_without_prediction_examples": [],
        "labelled_error_rows_by_class": {"Normal": 1, "Malignant": 0},
        "labelled_error_examples": [],
    }
    assert metrics["threshold"] == 0.5 and metrics["model_revisions"] == ["sha256:abc"]
    assert 0.0 <= metrics["ece"] <= 1.0 and 0.0 <= metrics["brier"] <= 1.0
    assert metrics["roc_auc"] > 0.9 and metrics["pr_auc"] > 0.9
    assert metrics["operating_point"]["sensitivity"] >= 0.9

    written = write_report(str(tmp_path), metrics, y_true, joined.scored["y_pred"].to_numpy(), prob)
    for name in ("roc", "precision_recall", "confusion_matrix", "reliability"):
        data = Path(written[name]).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ["accuracy", "precision", "recall", "specificity", "f1", "mcc", "tp", "fp", "tn", "fn"]:
        assert saved[key] == metrics[key]
    assert saved["operating_point"]["threshold"] == metrics["operating_point"]["threshold"]
    report = (tmp_path / "report.md").read_text()
    assert "research, not diagnosis" in report.lower() and "| Recall (Sensitivity) |" in report
    assert "false negative rate" in report and "![roc](roc.png)" in report


def test_one_class_only_still_reports_what_it_can(tmp_path: Path) -> None:
    y_true = np.zeros(5, int)
    prob = np.array([0.1, 0.2, 0.6, 0.3, 0.4])
    # --target-sensitivity too: no operating point (null, said in the warning), not a failed evaluation
    metrics = compute_metrics(Joined(scored_frame(y_true, prob), 0, 0, 0, 0), target_sensitivity=0.9)
    assert metrics["roc_auc"] is None and metrics["fp"] == 1 and metrics["specificity"] == 0.8
    assert metrics["operating_point"] is None and "an operating point" in " ".join(
        render_markdown(metrics).split()
    )
    write_report(str(tmp_path), metrics, y_true, (prob >= 0.5).astype(int), prob)
    assert json.loads((tmp_path / "metrics.json").read_text())["roc_auc"] is None
    assert "n/a" in render_markdown(metrics)


def test_one_class_left_by_error_rows_says_to_fix_the_files_not_to_label_more() -> None:
    """Both classes labelled, but every Malignant image's row is an error row: the advice is about
    those files, not "label Malignant images too"."""
    uris = [f"file:///scans/{n}.png" for n in range(5)]
    predictions = pd.DataFrame(
        {
            "image_uri": uris,
            "prob_malignant": [0.1, 0.2, 0.3, None, None],
            "label": ["Normal"] * 3 + [None, None],
            "threshold": 0.5,
            "model": "m",
            "model_revision": "r",
            "status": ["ok"] * 3 + ["error"] * 2,
            "error": [None] * 3 + ["truncated: image file is truncated"] * 2,
        }
    )
    labels = pd.DataFrame({"image_uri": uris, "y_true": [0, 0, 0, 1, 1]})
    report = render_markdown(compute_metrics(join_labels(predictions, labels)))
    assert "the 2 labelled Malignant images all have error rows" in " ".join(report.split())
    assert "Label Malignant images too" not in report


@pytest.mark.parametrize(
    ("value", "expected"), [("Normal", 0), ("MALIGNANT", 1), (" malignant ", 1), ("0", 0), (1, 1), (1.0, 1)]
)
def test_labels_accept_names_and_ids_in_any_case(value: object, expected: int) -> None:
    assert label_id(value, "here") == expected


def test_unknown_label_names_the_row() -> None:
    with pytest.raises(LabelError, match=r"row 3.*'benign'"):
        label_id("benign", "row 3")


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_labels_file_paths_become_uris(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(
        {
            "image_uri": [
                "scans/a.png",
                "/abs/b.png",
                "s3://bucket/c.png",
                "file:///abs/d.png",
                "scans/a.png",
                "file:/abs/e f.png",  # RFC 8089's short form
                "S3://bucket/g.png",
                "s3a://bucket/h%20i.png",  # a key's text as given: keys may hold a literal %20
            ],
            "label": ["normal", "Malignant", "1", "0", "Normal", "1", "0", "1"],
        }
    )
    path = tmp_path / f"labels.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)

    labels = read_labels_file(str(path))
    assert dict(zip(labels["image_uri"], labels["y_true"], strict=True)) == {
        f"file://{tmp_path}/scans/a.png": 0,  # relative to the labels file's folder
        "file:///abs/b.png": 1,
        "s3://bucket/c.png": 1,
        "file:///abs/d.png": 0,
        "file:///abs/e f.png": 1,
        "s3://bucket/g.png": 0,
        "s3://bucket/h%20i.png": 1,
    }


def test_labels_file_problems_are_explained(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,label\na.png,Normal\n")
    with pytest.raises(LabelError, match="image_uri"):
        read_labels_file(str(tmp_path / "bad.csv"))
    (tmp_path / "both.csv").write_text("image_uri,label\na.png,Normal\na.png,Malignant\n")
    with pytest.raises(LabelError, match="both labels"):
        read_labels_file(str(tmp_path / "both.csv"))
    with pytest.raises(FileNotFoundError, match="--labels"):
        read_labels_file(str(tmp_path / "missing.csv"))


def test_join_counts_what_cannot_be_scored() -> None:
    predictions = pd.DataFrame(
        {
            "image_uri": ["u1", "u2", "u3", "u4"],
            "prob_malignant": [0.9, 0.2, None, 0.7],
            "label": ["Malignant", "Normal", None, "Malignant"],
            "threshold": 0.5,
            "model": "m",
            "model_revision": "r",
            "status": ["ok", "ok", "error", "ok"],
        }
    )
    labels = pd.DataFrame({"image_uri": ["u1", "u2", "u3", "u9"], "y_true": [1, 1, 0, 0]})
    joined = join_labels(predictions, labels)
    assert joined.scored["image_uri"].tolist() == ["u1", "u2"]
    assert joined.scored["y_pred"].tolist() == [1, 0]
    assert (joined.error_rows, joined.labelled_error_rows) == (1, 1)
    assert (joined.predictions_without_label, joined.labels_without_prediction) == (1, 1)
    assert joined.unmatched_labels == ["u9"]

    with pytest.raises(EvaluationError, match=r"relative to the labels file's folder.*'elsewhere'.*'u1'"):
        join_labels(predictions, pd.DataFrame({"image_uri": ["elsewhere"], "y_true": [1]}))


def test_report_counts_of_what_was_not_evaluated_add_up() -> None:
    """Unlabelled error rows are among the predictions without a label, and are said to be, once."""
    predictions = pd.DataFrame(
        {
            "image_uri": [f"u{n}" for n in range(20)],
            "prob_malignant": [0.9 if n % 2 else 0.1 for n in range(18)] + [None, None],
            "label": [("Malignant" if n % 2 else "Normal") for n in range(18)] + [None, None],
            "threshold": 0.5,
            "model": "m",
            "model_revision": "r",
            "status": ["ok"] * 18 + ["error"] * 2,
        }
    )
    labels = pd.DataFrame({"image_uri": ["u0", "u1", "gone"], "y_true": [0, 1, 1]})
    metrics = compute_metrics(join_labels(predictions, labels))
    text = render_markdown(metrics)
    assert (
        "Not evaluated: 0 labelled images whose row is an error row, 18 predictions without a label "
        "(2 of them error rows), 1 label without a prediction." in text
    )
    assert "Labels without a prediction, e.g. `gone`." in text
    assert metrics["images"]["labels_without_prediction_examples"] == ["gone"]


def test_labeled_folder_takes_classes_from_folder_names(tmp_path: Path) -> None:
    make_image(tmp_path / "NORMAL" / "a.png")
    make_image(tmp_path / "malignant" / "deep" / "b.jpg")
    make_image(tmp_path / "other" / "c.png")
    images = labeled_folder(str(tmp_path))
    assert [(Path(i.path).name, i.label) for i in images] == [("a.png", 0), ("b.jpg", 1)]
    assert images[0].uri == f"file://{tmp_path}/NORMAL/a.png"

    with pytest.raises(LabelError, match="Normal/ and Malignant/"):
        labeled_folder(str(tmp_path / "other"))


@pytest.mark.parametrize(
    ("y_true", "prob", "undefined"),
    [
        # Only Normal labels, none called Malignant (the reviewer's labels_onenormal.csv).
        (
            [0, 0, 0, 0],
            [0.1, 0.2, 0.3, 0.4],
            {
                "precision": "n/a (nothing predicted Malignant)",
                "recall": "n/a (no Malignant images)",
                "false_negative_rate": "n/a (no Malignant images)",
                "f1": "n/a (no Malignant images)",
                "mcc": "n/a (no Malignant images)",
                "roc_auc": "n/a (no Malignant images)",
            },
        ),
        # Only Malignant labels.
        (
            [1, 1, 1],
            [0.9, 0.2, 0.7],
            {
                "specificity": "n/a (no Normal images)",
                "false_positive_rate": "n/a (no Normal images)",
                "mcc": "n/a (no Normal images)",
                "pr_auc": "n/a (no Normal images)",
            },
        ),
        # Both classes, but the model calls nothing Malignant: F1 is 0, precision and MCC undefined.
        (
            [0, 1, 0, 1],
            [0.1, 0.2, 0.3, 0.4],
            {"precision": "n/a (nothing predicted Malignant)", "mcc": "n/a (nothing predicted Malignant)"},
        ),
    ],
)
def test_metrics_with_an_empty_denominator_are_null_and_explained(
    tmp_path: Path, y_true: list[int], prob: list[float], undefined: dict[str, str]
) -> None:
    truth, probabilities = np.array(y_true), np.array(prob)
    metrics = compute_metrics(Joined(scored_frame(truth, probabilities), 0, 0, 0, 0))
    for key in (
        "precision",
        "recall",
        "specificity",
        "f1",
        "mcc",
        "false_negative_rate",
        "false_positive_rate",
    ):
        assert (metrics[key] is None) == (key in undefined), key

    write_report(str(tmp_path), metrics, truth, (probabilities >= 0.5).astype(int), probabilities)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {key for key in undefined if key in metrics} <= {
        key for key, value in saved.items() if value is None
    }
    report = (tmp_path / "report.md").read_text()
    for text in undefined.values():
        assert text in report
    assert ("One class only" in report) == (len(set(y_true)) == 1)
    assert "research, not diagnosis" in report.lower()


def test_interpretation_never_says_zero_percent_of_nothing() -> None:
    """The model card's words: a rate over no images is n/a, not "misses about 0 of every 100"."""
    only_normal = classification_metrics(np.zeros(4, int), np.zeros(4, int))
    text = interpretation(only_normal)
    assert "misses about" not in text and "are in fact Normal" not in text
    assert "n/a (no Malignant images)" in text and "n/a (nothing predicted Malignant)" in text
    assert "of these 4 images" in text

    y_true, y_pred = seed_card_predictions()
    card = interpretation(classification_metrics(y_true, y_pred))
    assert "Catches 72.25% of the 191 Malignant images" in card and "(55 of the 459 Normal images)" in card
    assert "Of the 193 images it calls Malignant, 71.50% are Malignant" in card


def test_the_report_ties_precision_to_the_malignant_share_and_warns_of_few_images() -> None:
    """Precision holds only at the evaluated set's Malignant share: report.md says the share and what
    the same sensitivity and specificity give where malignant images are rare; a class of a handful of
    images gets a warning with the intervals; the Brier score comes with its no-skill reference."""
    y_true, y_pred = seed_card_predictions()
    prob = np.where(y_pred == 1, 0.8, 0.2)
    card = compute_metrics(Joined(scored_frame(y_true, prob), 0, 0, 0, 0))
    text = render_markdown(card)
    # sensitivity 0.7225, specificity 0.8802 at 5%: 0.0361 / (0.0361 + 0.1138) = 24% of calls Malignant
    assert "with 29.38% of these images Malignant" in text, text
    assert "where 5% of images are Malignant, about 76 in 100 Malignant calls would be Normal" in text
    assert "Catches 72.25% (95% CI 65.51%–78.12%) of the 191 Malignant images" in text
    assert "Few images" not in text
    share = 191 / 650
    assert (
        f"| Brier score of always answering the Malignant share (no skill) | {share * (1 - share):.4f} |"
        in text
    )

    few = compute_metrics(
        Joined(scored_frame(np.array([1, 1, 0, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2, 0.3])), 0, 0, 0, 0)
    )
    text = render_markdown(few)
    assert "> **Few images.** These figures rest on 2 Malignant images and 3 Normal images" in text, text
    assert "sensitivity (95% CI 34.24%–100.00%)" in text
    assert "Evaluated 5 labelled images" in text


def test_wilson_intervals_match_published_values() -> None:
    assert wilson_interval(7, 10) == pytest.approx([0.3968, 0.8922], abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx([0.0, 0.4345], abs=1e-4)
    assert wilson_interval(5, 5) == pytest.approx([0.5655, 1.0], abs=1e-4)
    assert wilson_interval(0, 0) is None
    for trials in (1, 3, 7, 10, 1000):  # exact at the ends: no 2.8e-17 in metrics.json
        assert wilson_interval(0, trials)[0] == 0.0 and wilson_interval(trials, trials)[1] == 1.0


def test_report_states_sample_size_intervals_and_how_far_the_numbers_reach(tmp_path: Path) -> None:
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.35, 0.2, 0.1, 0.05])
    metrics = compute_metrics(Joined(scored_frame(y_true, prob), 0, 0, 0, 0), target_sensitivity=0.75)
    assert metrics["wilson_95"]["recall"] == pytest.approx(wilson_interval(3, 4))
    assert metrics["wilson_95"]["specificity"] == pytest.approx(wilson_interval(5, 6))

    write_report(str(tmp_path), metrics, y_true, (prob >= 0.5).astype(int), prob)
    assert json.loads((tmp_path / "metrics.json").read_text())["wilson_95"]["recall"] == pytest.approx(
        wilson_interval(3, 4)
    )
    report = (tmp_path / "report.md").read_text()
    assert "rest on 4 Malignant images" in report and "on 6 Normal images" in report
    low, high = wilson_interval(3, 4)  # type: ignore[misc]
    assert f"sensitivity {100 * low:.2f}%–{100 * high:.2f}%" in report
    assert "do not transfer to other scanners, sites or patient populations" in report
    assert "its sensitivity here is optimistic: confirm it on another labelled set" in report


def test_labels_file_that_is_not_utf8_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("image_uri,label\nimgs/caf\u00e9.jpg,Normal\n".encode("cp1252"))
    with pytest.raises(LabelError, match=r"excel\.csv.*not UTF-8.*line 2.*save it as UTF-8 CSV"):
        read_labels_file(str(path))


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_spaces_around_labels_file_values_are_ignored(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(
        {
            "image_uri": [" file:///x.jpg", "scans/a.png  ", "\ts3://b/c.png"],
            "label": [" Malignant", "0 ", " 1 "],
        }
    )
    path = tmp_path / f"labels.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
    labels = read_labels_file(str(path))
    assert dict(zip(labels["image_uri"], labels["y_true"], strict=True)) == {
        "file:///x.jpg": 1,
        f"file://{tmp_path}/scans/a.png": 0,
        "s3://b/c.png": 1,
    }


def test_predictions_are_read_from_the_dataset_files_only(tmp_path: Path) -> None:
    """A README or an export saved in DEST is neither read nor counted, whatever its schema."""
    dest = tmp_path / "dest"
    table = rows(range(10), OLD, FIRST_DAY, seed=0, shard="s0")
    write(dest, table, OLD, FIRST_DAY, "s0")
    (dest / "README.txt").write_text("notes, not data")
    table.to_pandas().assign(image_uri="file:///elsewhere.jpg").to_parquet(dest / "latest-export.parquet")
    (dest / "model_slug=x").mkdir()
    pd.DataFrame({"n": [1]}).to_parquet(dest / "model_slug=x" / "not-in-a-date-folder.parquet")

    predictions = read_predictions(str(dest))
    assert sorted(predictions["image_uri"]) == sorted(table.column("image_uri").to_pylist())
    assert set(predictions["model_revision"]) == {OLD}

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EvaluationError, match=r"'.*empty'.*model_slug=\*/date=\*/\*\.parquet.*--predictions"):
        read_predictions(str(tmp_path / "empty"))


def test_evaluate_reads_the_row_latest_shows_and_a_slug_means_its_revision(tmp_path: Path) -> None:
    """Two runs' rows of an image at the same processed_at: the later run_id counts, as in `latest`
    (before, pandas' unstable sort picked either). A model_slug names the folder the model was loaded
    from; the same weights loaded from another folder wrote under another slug, and count too."""
    from tasks.analytics import connect
    from tasks.sink import model_slug, shard_path, write_shard
    from tasks.storage import open_location

    dest = tmp_path / "dest"
    first = rows(range(50), OLD, FIRST_DAY, seed=0, shard="a")
    second = rows(range(50), OLD, FIRST_DAY, seed=1, shard="b")  # same processed_at, other predictions
    second = second.set_column(second.schema.get_field_index("run_id"), "run_id", pa.array(["run-z"] * 50))
    write(dest, first, OLD, FIRST_DAY, "a")
    write(dest, second, OLD, FIRST_DAY, "b")
    copy = rows(range(50, 60), OLD, FIRST_DAY, seed=2, shard="c", model="/elsewhere/vit-copy")
    write_shard(
        open_location(str(dest)), shard_path(model_slug("/elsewhere/vit-copy", OLD), FIRST_DAY, "c"), copy
    )

    predictions = read_predictions(str(dest), model_slug("/models/vit", OLD)).set_index("image_uri")
    assert len(predictions) == 60
    assert (
        len(read_predictions(str(dest), f"model_slug={model_slug('/models/vit', OLD)}/")) == 60
    )  # as on disk
    chosen = predictions["prob_malignant"].fillna(-1).to_dict()  # error rows: no probability
    latest = connect(str(dest)).sql("select image_uri, coalesce(prob_malignant, -1) from latest").fetchall()
    assert dict(latest) == chosen
    later = second.to_pandas().set_index("image_uri")["prob_malignant"].fillna(-1).to_dict()
    assert {uri: chosen[uri] for uri in later} == later


def test_labels_files_typed_by_hand_or_broken(tmp_path: Path) -> None:
    """Hand-typed headers are read; a broken file names itself and the fix, never a bare parser error."""
    typed = tmp_path / "typed.csv"
    typed.write_text("Image_URI , Label\na.png,normal\nfile://localhost/abs/b.png,1\n")
    labels = read_labels_file(str(typed))
    assert dict(zip(labels["image_uri"], labels["y_true"], strict=True)) == {
        f"file://{tmp_path}/a.png": 0,
        "file:///abs/b.png": 1,
    }
    cases = {
        "empty.csv": ("", "is empty"),
        "header.csv": ("image_uri,label\n", "holds no labels"),
        "fields.csv": ("image_uri,label\na.png,Normal\nb.png,Normal,extra\n", r"not a valid CSV.*line 3"),
        "blank.csv": ("image_uri,label\na.png,Normal\n,Malignant\n", r"row 3: image_uri is empty"),
        "broken.parquet": ("PAR1 not really", "not a readable Parquet file"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LabelError, match=message) as error:
            read_labels_file(str(tmp_path / name))
        assert name in str(error.value)
    nulls = tmp_path / "nulls.parquet"
    pd.DataFrame({"image_uri": ["a.png", None], "label": ["Normal", "Normal"]}).to_parquet(nulls)
    with pytest.raises(LabelError, match=r"row 2: image_uri is empty"):  # Parquet has no header line
        read_labels_file(str(nulls))


def test_a_labels_path_with_a_tilde_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--labels=~/labels.csv`: the shell does not expand a `~` after `=`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "labels.csv").write_text("image_uri,label\na.png,Normal\n")
    labels = read_labels_file("~/labels.csv")
    assert labels["image_uri"].tolist() == [f"file://{tmp_path}/a.png"]


def test_rows_decided_at_several_thresholds_are_said_so() -> None:
    """metrics.json: `threshold` is a number when every row was decided at one, else null, and
    `thresholds` always lists them; report.md says the figures mix the decisions."""
    y_true = np.array([1, 1, 0, 0, 1, 0])
    prob = np.array([0.9, 0.46, 0.2, 0.47, 0.6, 0.1])
    one = compute_metrics(Joined(scored_frame(y_true, prob, 0.468), 0, 0, 0, 0))
    assert one["threshold"] == 0.468 and one["thresholds"] == [0.468]
    assert "decision threshold on prob_malignant: 0.468." in render_markdown(one)
    exact = compute_metrics(Joined(scored_frame(y_true, prob, 0.4699999999999999), 0, 0, 0, 0))
    assert "decision threshold on prob_malignant: 0.4699999999999999." in render_markdown(exact)  # not 0.47
    frame = scored_frame(y_true, prob, 0.468)
    frame.loc[3:, "threshold"] = 0.47
    frame["y_pred"] = (frame["prob_malignant"] >= frame["threshold"]).astype(int)
    mixed = compute_metrics(Joined(frame, 0, 0, 0, 0))
    assert mixed["threshold"] is None and mixed["thresholds"] == [0.468, 0.47]
    assert json.loads(json.dumps(mixed))["thresholds"] == [0.468, 0.47]
    assert "decision thresholds on prob_malignant: 0.468, 0.47 (rows were classified" in render_markdown(
        mixed
    )


def test_a_report_folder_is_refreshed_by_the_same_evaluation_however_it_is_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One REPORT holds one report: the same revision and predictions refresh it — from another working
    directory, after REPORT was moved, from a metrics.json an older oncoflow wrote with a relative
    path — while another revision or another DEST is refused."""
    from tasks.report import check_report_folder

    def holding(report: Path, revisions: list[str], predictions: str) -> Path:
        report.mkdir(parents=True, exist_ok=True)
        (report / "metrics.json").write_text(
            json.dumps({"model_revisions": revisions, "predictions": predictions})
        )
        return report

    moved = holding(tmp_path / "moved", ["sha256:a"], "/where/it/was/report/predictions-cpu-fp32")
    check_report_folder(str(moved), ["sha256:a"], str(moved / "predictions-cpu-fp32"))
    with pytest.raises(ValueError, match="predictions-cpu-fp32"):
        check_report_folder(str(moved), ["sha256:a"], str(moved / "predictions-cpu-fp32-compiled"))
    with pytest.raises(ValueError, match="holds the report of model revision sha256:a"):
        check_report_folder(str(moved), ["sha256:b"], str(moved / "predictions-cpu-fp32"))

    (tmp_path / "data" / "out").mkdir(parents=True)
    dest = holding(tmp_path / "r", ["sha256:a"], str(tmp_path / "data" / "out"))
    monkeypatch.chdir(tmp_path / "data")
    check_report_folder(str(dest), ["sha256:a"], "out/")  # the same DEST, spelled from elsewhere
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="would replace it"):
        check_report_folder(str(dest), ["sha256:a"], str(tmp_path / "other"))

    older = holding(tmp_path / "older", ["sha256:a"], "out")  # relative: its base is unknown
    check_report_folder(str(older), ["sha256:a"], str(tmp_path / "other"))
    on_s3 = holding(tmp_path / "s3", ["sha256:a"], "s3://bucket/preds/")
    check_report_folder(str(on_s3), ["sha256:a"], "s3://bucket/preds")
    with pytest.raises(ValueError):
        check_report_folder(str(on_s3), ["sha256:a"], "s3://bucket/other")
    holding(tmp_path / "broken", [], "")
    (tmp_path / "broken" / "metrics.json").write_text('{"model_rev')  # cut short: replaced
    check_report_folder(str(tmp_path / "broken"), ["sha256:b"], "s3://bucket/preds")


def test_a_model_must_have_the_classes_normal_and_malignant_once_each() -> None:
    from tasks.model_files import ModelError, positive_class

    assert positive_class({0: "Normal", 1: "Malignant"}, "m") == 1
    assert positive_class({0: "Malignant", 1: "Normal"}, "m") == 0
    for labels in ({0: "Malignant", 1: "Malignant"}, {0: "Benign", 1: "Malignant"}, {0: "Normal"}):
        with pytest.raises(ModelError, match="Normal"):
            positive_class(labels, "m")
