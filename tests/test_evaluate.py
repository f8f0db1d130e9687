"""The evaluate flow and CLI on real classify output: joins, the --data path, operating points, artifacts."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, matthews_corrcoef, roc_auc_score
from typer.testing import CliRunner

from flows.classify import classify
from flows.cli import app
from flows.evaluate import evaluate
from tests.conftest import cpu_compiler_missing, make_image

runner = CliRunner()


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    """8 Normal and 8 Malignant images, one corrupt Normal file, and one image outside the class folders."""
    root = tmp_path / "labeled"
    for n in range(8):
        make_image(root / "Normal" / f"n{n}.png", (40, 30), seed=n)
        make_image(root / "malignant" / "sub" / f"m{n}.jpg", (30, 40), seed=100 + n)
    (root / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    make_image(root / "unsorted" / "x.png", seed=999)
    return root


def rows(destination: Path) -> pd.DataFrame:
    return ds.dataset(str(destination), format="parquet", partitioning="hive").to_table().to_pandas()


def test_evaluate_data_gives_the_numbers_computed_from_classify_output(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    state = evaluate(
        output=str(tmp_path / "report"), data=str(labeled), model=tiny_model, device="cpu", return_state=True
    )
    metrics = state.result()

    # The same images through classify itself, scored by hand with scikit-learn.
    classify(str(labeled), str(tmp_path / "direct"), model=tiny_model, device="cpu")
    direct = rows(tmp_path / "direct")
    ok = direct[(direct["status"] == "ok") & ~direct["image_uri"].str.contains("/unsorted/")]
    y_true = ok["image_uri"].str.contains("/malignant/").astype(int)
    y_pred = (ok["label"] == "Malignant").astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()

    assert metrics["images"] == {
        "evaluated": 16,
        "error_rows": 1,
        "labelled_error_rows": 1,
        "predictions_without_label": 1,
        "labels_without_prediction_examples": [],
        "labels_without_prediction": 0,
        "labelled_error_rows_by_class": {"Normal": 1, "Malignant": 0},
        "labelled_error_examples": [
            {
                "image_uri": f"file://{labeled}/Normal/broken.png",
                "error": metrics["images"]["labelled_error_examples"][0]["error"],
            }
        ],
    }
    assert metrics["images"]["labelled_error_examples"][0]["error"].startswith("truncated: ")
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"whose row is an error row, e.g. `file://{labeled}/Normal/broken.png` (truncated: " in report
    assert metrics["counts"] == {"Normal": 8, "Malignant": 8}
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (tp, fp, tn, fn)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    if min(tp + fp, tp + fn, tn + fp, tn + fn):
        assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    else:  # scikit-learn says 0 where MCC is undefined (an untrained model may call every image Normal)
        assert metrics["mcc"] is None
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y_true, ok["prob_malignant"]))
    assert metrics["models"] == [tiny_model] and metrics["threshold"] == 0.5

    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text())["tp"] == tp
    assert (report / "predictions-cpu").is_dir(), "the classify output is kept inside the report"
    for plot in ("roc", "precision_recall", "confusion_matrix", "reliability"):
        assert (report / f"{plot}.png").read_bytes().startswith(b"\x89PNG")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert "| Accuracy |" in str(by_key["evaluation-report"].data)
    assert "data:image/png;base64," in str(by_key["evaluation-report"].data)
    assert "mcc" in str(by_key["evaluation-metrics"].data)


def test_operating_point_then_classify_threshold_reproduces_it(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    predictions = tmp_path / "preds"
    classify(str(labeled), str(predictions), model=tiny_model, device="cpu")
    labels = tmp_path / "labels.csv"
    lines = ["image_uri,label"]
    lines += [f"labeled/Normal/n{n}.png,normal" for n in range(8)]  # relative to the labels file
    lines += [f"file://{labeled}/malignant/sub/m{n}.jpg,1" for n in range(8)]
    lines += ["labeled/Normal/missing.png,Normal"]
    labels.write_text("\n".join(lines) + "\n")

    result = runner.invoke(
        app,
        ["evaluate", "--predictions", str(predictions), "--labels", str(labels), "-o", str(tmp_path / "r1")]
        + ["--target-sensitivity", "0.85"],
    )
    assert result.exit_code == 0, result.output
    assert "Recall (Sensitivity)" in result.output and "research use only" in result.output.lower()
    metrics = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert metrics["images"]["labels_without_prediction"] == 1
    assert (
        metrics["images"]["predictions_without_label"] == 2
    )  # unsorted/x.png and the unlabelled broken file
    assert metrics["images"]["evaluated"] == 16 and metrics["images"]["error_rows"] == 1
    point = metrics["operating_point"]
    assert point["sensitivity"] >= 0.85 and {"threshold", "specificity", "precision"} <= point.keys()

    rethresholded = tmp_path / "preds-at-point"
    classify(str(labeled), str(rethresholded), model=tiny_model, device="cpu", threshold=point["threshold"])
    again = runner.invoke(
        app,
        [
            "evaluate",
            "--predictions",
            str(rethresholded),
            "--labels",
            str(labels),
            "-o",
            str(tmp_path / "r2"),
        ],
    )
    assert again.exit_code == 0, again.output
    applied = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert applied["threshold"] == point["threshold"]
    assert applied["recall"] == point["sensitivity"] and applied["specificity"] == point["specificity"]
    assert (applied["tp"], applied["fp"]) == (point["tp"], point["fp"])


def test_several_model_revisions_must_be_chosen(
    labeled: Path, tmp_path: Path, tiny_model: str, tiny_model_imagenet: str
) -> None:
    predictions = tmp_path / "preds"
    first = classify(str(labeled), str(predictions), model=tiny_model, device="cpu")
    classify(str(labeled), str(predictions), model=tiny_model_imagenet, device="cpu")
    labels = tmp_path / "labels.parquet"
    pd.DataFrame({"image_uri": [f"{labeled}/Normal/n0.png"], "label": ["Normal"]}).to_parquet(labels)
    common = [
        "evaluate",
        "--predictions",
        str(predictions),
        "--labels",
        str(labels),
        "-o",
        str(tmp_path / "r"),
    ]

    ambiguous = runner.invoke(app, common)  # an argument problem: exit 2 before Prefect starts
    text = " ".join(ambiguous.output.split())
    assert ambiguous.exit_code == 2 and "holds 2 model revisions" in text and "--model-revision" in text, text
    assert first["model_revision"] in text and not (tmp_path / "r").exists()

    unknown = runner.invoke(app, [*common, "--model-revision", "sha256:nope"])
    text = " ".join(unknown.output.split())
    assert unknown.exit_code == 2 and "no rows for model revision 'sha256:nope'" in text
    assert first["model_revision"] in text, "the revisions it holds are listed"
    a_path = runner.invoke(app, [*common, "--model-revision", tiny_model])  # the model, not its revision
    text = " ".join(a_path.output.split())
    assert a_path.exit_code == 2 and f"no rows for model revision {tiny_model!r}" in text, text
    assert "a model folder's path is not a revision" in text

    chosen = runner.invoke(app, [*common, "--model-revision", first["model_revision"]])
    assert chosen.exit_code == 0, chosen.output
    assert "n/a (no Malignant images)" in chosen.output, "one Normal label: recall is undefined, not 0%"
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["model_revisions"] == [first["model_revision"]] and metrics["images"]["evaluated"] == 1

    # The other revision into the same REPORT would replace that report: refused, the report kept.
    report = (tmp_path / "r" / "report.md").read_text()
    other = next(r for r in rows(predictions)["model_revision"].unique() if r != first["model_revision"])
    replacing = runner.invoke(app, [*common, "--model-revision", other])
    text = " ".join(replacing.output.split())
    assert replacing.exit_code == 2 and "holds the report of model revision" in text, text  # before Prefect
    assert first["model_revision"] in text and "its own --output" in text
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "r" / "report.md").read_text() == report
    again = runner.invoke(app, [*common, "--model-revision", first["model_revision"]])
    assert again.exit_code == 0, again.output  # the same report again: refreshed
    separate = runner.invoke(app, [*common[:-1], str(tmp_path / "r2"), "--model-revision", other])
    assert separate.exit_code == 0, separate.output
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["model_revisions"] == [other]


def test_a_folder_of_images_is_refused_as_report_folder(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    """--output given an image folder: the plots would go in among the scans (and a nightly run of that
    folder would classify them): exit 2 before any work, the folder untouched."""
    scans = tmp_path / "scans"
    shutil.copytree(labeled / "Normal", scans)
    before = sorted(p.name for p in scans.iterdir())
    result = runner.invoke(
        app, ["evaluate", "-o", str(scans), "--data", str(labeled), "--model", tiny_model, "--device", "cpu"]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"report folder {str(scans)!r} holds" in text, text
    assert "and no report: the plots (roc.png" in text and "Give a new or empty --output folder" in text
    assert sorted(p.name for p in scans.iterdir()) == before


def test_evaluating_another_model_into_a_report_folder_refuses_before_classifying(
    labeled: Path, tmp_path: Path, tiny_model: str, tiny_model_imagenet: str
) -> None:
    """--data with another model into a REPORT that holds one model's report: refused before the labelled
    folder is classified again (a local model: exit 2 before Prefect starts; the flow checks a hub
    model's revision before classifying), the first report and its predictions kept."""
    report = tmp_path / "report"
    arguments = ["evaluate", "-o", str(report), "--data", str(labeled), "--device", "cpu"]
    first = runner.invoke(app, [*arguments, "--model", tiny_model])
    assert first.exit_code == 0, first.output
    metrics = json.loads((report / "metrics.json").read_text())
    before = sorted(p.name for p in report.rglob("*.parquet"))

    second = runner.invoke(app, [*arguments, "--model", tiny_model_imagenet])
    text = " ".join(second.output.split())
    assert second.exit_code == 2 and "holds the report of model revision" in text, text
    assert "Beginning flow run" not in second.output
    assert json.loads((report / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in report.rglob("*.parquet")) == before, "nothing classified"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--predictions", "p", "--data", "d"], "either --predictions"),
        (["--predictions", "p"], "--labels"),
        (["--data", "nowhere"], "--data"),
        (["--predictions", "p", "--labels", "l.csv", "--target-sensitivity", "0"], "--target-sensitivity"),
    ],
)
def test_bad_evaluate_arguments_fail_before_any_work(tmp_path: Path, args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["evaluate", "-o", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert not (tmp_path / "r").exists()


def test_options_of_the_other_mode_and_models_that_cannot_run_fail_before_any_work(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    """--predictions rows are classified already: the options that classify go with --data only; with
    --data, the classify checks (a local --model with --revision, fp16 on a CPU) hold as for classify."""
    (tmp_path / "preds").mkdir()
    (tmp_path / "labels.csv").write_text("image_uri,label\n")
    saved = ["--predictions", str(tmp_path / "preds"), "--labels", str(tmp_path / "labels.csv")]
    cases = [
        ([*saved, "--model", tiny_model, "--device", "cpu"], "--model, --device go with --data"),
        ([*saved, "--compile"], "--compile goes with --data"),
        (
            ["--data", str(labeled), "--model", tiny_model, "--revision", "v2"],
            "--revision applies to hub models",
        ),
        (["--data", str(labeled), "--model", str(tmp_path / "gone")], "invalid --model"),
        (["--data", str(tmp_path / "preds"), "--model", tiny_model], "needs one sub-folder per class"),
        (
            ["--data", str(labeled), "--model", tiny_model, "--device", "cpu", "--precision", "fp16"],
            "fp16 is not",
        ),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["evaluate", "-o", str(tmp_path / "r"), *args])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in text, (args, text)
        assert not (tmp_path / "r").exists()


@pytest.mark.skipif(cpu_compiler_missing(), reason="torch.compile needs a C++ compiler (g++)")
def test_evaluate_data_compiled_scores_what_the_uncompiled_model_scores(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    """evaluate --data --compile checks the compiled path on labelled images: same counts, same AUC.
    Each setting classifies into its own predictions folder (one folder for both scored the first
    one's rows again); into the same REPORT, the second would replace the first's report: refused."""

    def metrics(*options: str, report: str = "report") -> dict:
        arguments = [
            "evaluate",
            "-o",
            str(tmp_path / report),
            "--data",
            str(labeled),
            "--model",
            tiny_model,
        ]
        result = runner.invoke(app, [*arguments, "--device", "cpu", "--precision", "fp32", *options])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / report / "metrics.json").read_text())

    plain = metrics()
    refused = runner.invoke(
        app,
        ["evaluate", "-o", str(tmp_path / "report"), "--data", str(labeled), "--model", tiny_model]
        + ["--device", "cpu", "--precision", "fp32", "--compile"],
    )
    assert refused.exit_code == 2 and "predictions-cpu-fp32)" in " ".join(refused.output.split())
    compiled = metrics("--compile", "--batch-size", "4", report="compiled")
    assert plain["predictions"] == str(tmp_path / "report" / "predictions-cpu-fp32")
    assert compiled["predictions"] == str(tmp_path / "compiled" / "predictions-cpu-fp32-compiled")
    assert len(list((tmp_path / "compiled" / "predictions-cpu-fp32-compiled").rglob("*.parquet"))) >= 1
    assert compiled["images"]["evaluated"] == plain["images"]["evaluated"] == 16
    assert [compiled[key] for key in ("tp", "fp", "tn", "fn")] == [
        plain[key] for key in ("tp", "fp", "tn", "fn")
    ]
    assert compiled["roc_auc"] == pytest.approx(plain["roc_auc"], abs=1e-6)


def test_missing_inputs_and_a_file_as_report_folder_fail_before_any_work(tmp_path: Path) -> None:
    """Checked before Prefect starts: exit 2, naming the option."""
    (tmp_path / "preds").mkdir()
    (tmp_path / "labels.csv").write_text("image_uri,label\n")
    (tmp_path / "afile.parquet").write_bytes(b"")
    cases = [
        (
            ["--predictions", str(tmp_path / "nope"), "--labels", str(tmp_path / "labels.csv")],
            "--predictions",
        ),
        (["--predictions", str(tmp_path / "preds"), "--labels", str(tmp_path / "nope.csv")], "--labels"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["evaluate", "-o", str(tmp_path / "r"), *args])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"{expected} " in text and "not an existing" in text, text
    result = runner.invoke(
        app,
        [
            "evaluate",
            "-o",
            str(tmp_path / "afile.parquet"),
            "--predictions",
            str(tmp_path / "preds"),
            "--labels",
            str(tmp_path / "labels.csv"),
        ],
    )
    text = " ".join(result.output.split())  # the console folds long lines: where, depends on the path
    assert result.exit_code == 2 and "--output" in text and "is a file" in text, text
    assert not (tmp_path / "r").exists()


def test_labels_match_standard_file_uris_and_odd_names(tmp_path: Path, tiny_model: str) -> None:
    """Labels written with Path.as_uri() (%20, %23, %25) or as plain paths match classify's image_uri."""
    folder = tmp_path / "scans"
    names = ["a b.png", "c#1.png", "100%.png", "d%20e.png"]
    for seed, name in enumerate(names):
        make_image(folder / name, seed=seed)
    predictions = tmp_path / "preds"
    classify(str(folder), str(predictions), model=tiny_model, device="cpu")
    for spelling in (lambda p: p.as_uri(), str):
        labels = tmp_path / "labels.csv"
        pd.DataFrame(
            {"image_uri": [spelling(folder / n) for n in names], "label": ["Normal", "Malignant"] * 2}
        ).to_csv(labels, index=False)
        metrics = evaluate(str(tmp_path / "report"), predictions=str(predictions), labels=str(labels))
        assert metrics["images"]["evaluated"] == 4 and metrics["images"]["labels_without_prediction"] == 0


def test_labels_of_error_rows_only_say_so(labeled: Path, tmp_path: Path, tiny_model: str) -> None:
    """The URIs match, but the one labelled image could not be decoded: the message says that."""
    predictions = tmp_path / "preds"
    classify(str(labeled), str(predictions), model=tiny_model, device="cpu")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image_uri,label\n{labeled}/Normal/broken.png,Normal\n")
    args = ["evaluate", "--predictions", str(predictions), "--labels", str(labels), "-o", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 in common" in text, text
    assert (
        "all 1 labelled images are error rows (1 truncated)" in text and "image_uri values match" not in text
    )


def test_rows_written_before_percent_was_escaped_still_match(tmp_path: Path) -> None:
    """Rows from before `%` became %25 in file URIs: labels copied from them match, and an image with
    rows in both spellings counts once (its newest row)."""
    import pyarrow as pa

    from tests.analytics_data import FIRST_DAY, OLD, rows, write

    # Old rows: `%` literal. A name like scan%20001.jpg is not "scan 001.jpg": %20 were three characters.
    old_uris = ["file:///x/100%.png", "file:///x/scan%20001.jpg", "file:///x/ok.png"]
    old = rows(range(0, 3), OLD, FIRST_DAY, 1, "old")
    write(tmp_path / "dest", old.set_column(0, "image_uri", pa.array(old_uris)), OLD, FIRST_DAY, "old")
    new = rows(range(0, 1), OLD, FIRST_DAY + timedelta(days=1), 2, "new")
    new = new.set_column(0, "image_uri", pa.array(["file:///x/100%25.png"]))
    write(tmp_path / "dest", new, OLD, FIRST_DAY + timedelta(days=1), "new")
    labels = tmp_path / "labels.csv"
    # Labels: one copied from an old row, one as Path.as_uri() spells the file, one plain.
    label_uris = ["file:///x/100%.png", Path("/x/scan%20001.jpg").as_uri(), "file:///x/ok.png"]
    labels.write_text(
        "image_uri,label\n"
        + "".join(
            f"{u},{lab}\n" for u, lab in zip(label_uris, ["Normal", "Malignant", "Normal"], strict=True)
        )
    )
    metrics = evaluate(str(tmp_path / "report"), predictions=str(tmp_path / "dest"), labels=str(labels))
    assert metrics["images"]["evaluated"] == 3 and metrics["images"]["labels_without_prediction"] == 0
    assert metrics["images"]["predictions_without_label"] == 0


def labels_csv(path: Path, labeled: Path, classes: tuple[str, ...] = ("Normal", "malignant")) -> Path:
    lines = ["image_uri,label"]
    if "Normal" in classes:
        lines += [f"{labeled}/Normal/n{n}.png,Normal" for n in range(8)]
    if "malignant" in classes:
        lines += [f"{labeled}/malignant/sub/m{n}.jpg,Malignant" for n in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_reads_only_the_dataset_files_in_dest(
    labeled: Path, tmp_path: Path, tiny_model: str
) -> None:
    """Notes and exports saved in DEST are not predictions: they neither break nor change the metrics."""
    predictions = tmp_path / "preds"
    classify(str(labeled), str(predictions), model=tiny_model, device="cpu")
    labels = labels_csv(tmp_path / "labels.csv", labeled)
    command = ["evaluate", "--predictions", str(predictions), "--labels", str(labels), "-o"]
    clean = runner.invoke(app, [*command, str(tmp_path / "r1")])
    assert clean.exit_code == 0, clean.output

    rows(predictions).to_parquet(predictions / "latest-export.parquet")  # the full schema, same images
    (predictions / "README.txt").write_text("reviewed by Dr. X")
    with_strays = runner.invoke(app, [*command, str(tmp_path / "r2")])
    assert with_strays.exit_code == 0, with_strays.output
    before, after = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert after["images"] == before["images"] and after["images"]["evaluated"] == 16
    assert (after["tp"], after["fp"], after["tn"], after["fn"]) == (
        before["tp"],
        before["fp"],
        before["tn"],
        before["fn"],
    )


def test_labels_of_one_class_give_null_metrics_and_a_warning(
    labeled: Path, tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    predictions = tmp_path / "preds"
    classify(str(labeled), str(predictions), model=tiny_model, device="cpu")
    labels = labels_csv(tmp_path / "normal-only.csv", labeled, classes=("Normal",))

    metrics = evaluate(output=str(tmp_path / "r"), predictions=str(predictions), labels=str(labels))
    assert metrics["recall"] is None and metrics["false_negative_rate"] is None and metrics["mcc"] is None
    assert metrics["specificity"] is not None and metrics["counts"] == {"Normal": 8, "Malignant": 0}
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["recall"] is None and saved["roc_auc"] is None and saved["wilson_95"]["recall"] is None
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| Recall (Sensitivity) | n/a (no Malignant images) |" in report
    assert "misses about" not in report and "One class only" in report
    assert any("no Malignant image" in record.getMessage() for record in caplog.records)


def test_an_unusable_labels_file_fails_before_any_work(tmp_path: Path) -> None:
    """The labels file's content is an argument too: exit 2, the file and the row named, no REPORT."""
    (tmp_path / "preds").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("image_uri,label\na.png,Normal\nb.png,benign\n")
    args = ["evaluate", "-o", str(tmp_path / "r"), "--predictions", str(tmp_path / "preds")]
    result = runner.invoke(app, [*args, "--labels", str(labels)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "labels.csv row 3" in text and "'benign'" in text, text
    assert not (tmp_path / "r").exists()
    labels.write_text("image_uri;label\na.png;Normal\n")  # European Excel's "CSV"
    result = runner.invoke(app, [*args, "--labels", str(labels)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "separated by semicolons: save it with commas" in text, text
