"""The classify flow end to end on local folders: rows, schema, readers, incremental runs, artifacts."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from flows.classify import classify
from tasks.sink import SCHEMA
from tests.conftest import make_image

CONTRACT = {
    "image_uri": pa.string(),
    "fingerprint": pa.string(),
    "label": pa.string(),
    "label_id": pa.int32(),
    "confidence": pa.float64(),
    "prob_malignant": pa.float64(),
    "threshold": pa.float64(),
    "model": pa.string(),
    "model_revision": pa.string(),
    "run_id": pa.string(),
    "processed_at": pa.timestamp("us", tz="UTC"),
    "status": pa.string(),
    "error": pa.string(),
}


def read_rows(output: Path) -> list[dict]:
    return ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()


def test_classify_writes_the_contract(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    output = tmp_path / "preds"
    summary = classify(str(image_folder), str(output), model=tiny_model, device="cpu", shard_size=4)

    assert summary["images_found"] == 6 and summary["images_classified"] == 6
    assert summary["errors"] == 0 and len(summary["output_files"]) == 2  # 6 images, shards of 4
    files = sorted(output.rglob("*.parquet"))
    assert len(files) == 2
    assert all(
        f.parent.parent.name.startswith("model_slug=") and f.parent.name.startswith("date=") for f in files
    )
    assert not [p for p in output.rglob("*") if p.name.startswith(".")], "no temporary files left behind"

    dataset = ds.dataset(str(output), format="parquet", partitioning="hive")
    for name, kind in CONTRACT.items():
        assert dataset.schema.field(name).type == kind, name
    rows = dataset.to_table().to_pylist()
    uris = sorted(r["image_uri"] for r in rows)
    assert uris == sorted(
        "file://" + str(image_folder / p)
        for p in ["a.jpg", "b.PNG", "c.png", "sub/d.tif", "sub/deeper/e.jpeg", "sub/f.bmp"]
    )
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        assert row["label"] in {"Normal", "Malignant"}
        assert row["label_id"] == (1 if row["label"] == "Malignant" else 0)
        assert (row["label"] == "Malignant") == (row["prob_malignant"] >= row["threshold"])
        expected_confidence = (
            row["prob_malignant"] if row["label"] == "Malignant" else 1 - row["prob_malignant"]
        )
        assert row["confidence"] == pytest.approx(expected_confidence, abs=1e-9)
        assert row["model"] == tiny_model and row["model_revision"].startswith("sha256:")
        assert row["run_id"] == summary["run_id"]
    assert SCHEMA.metadata[b"oncoflow.schema_version"] == b"2"


def test_duckdb_reads_the_dataset(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    count, labelled, day = duckdb.sql(
        f"select count(*), count(label), min(date) from read_parquet('{output}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    assert (count, labelled) == (6, 6)
    assert str(day) == time.strftime("%Y-%m-%d", time.gmtime())


def test_incremental_runs(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")

    again = classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    assert again["images_found"] == 6 and again["images_classified"] == 0 and again["output_files"] == []
    assert again["malignant_share"] is None  # n/a, not 0%: no row was ok

    for n in range(3):
        make_image(image_folder / "new" / f"n{n}.jpg", seed=100 + n)
    changed = image_folder / "a.jpg"
    make_image(changed, (80, 80), seed=999)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    assert third["images_found"] == 9 and third["images_classified"] == 4

    rows = read_rows(output)
    assert len(rows) == 10
    assert len({(r["image_uri"], r["fingerprint"], r["model_revision"]) for r in rows}) == 10
    assert sum(r["image_uri"] == "file://" + str(changed) for r in rows) == 2


def test_a_file_put_back_to_an_earlier_version_is_classified_again(tmp_path: Path, tiny_model: str) -> None:
    """A restore from backup (`cp -p`, rsync -a: the old bytes and mtime) brings back a fingerprint
    DEST already holds. The newest row describes the version it replaced, so the file is new again, and
    `latest` shows the prediction of what is on disk."""
    from tasks.analytics import export_latest

    source, output = tmp_path / "src", tmp_path / "preds"
    scan = make_image(source / "scan.png", (64, 64), seed=1)
    backup = tmp_path / "backup.png"
    shutil.copy2(scan, backup)
    first = classify(str(source), str(output), model=tiny_model, device="cpu")
    make_image(scan, (90, 40), seed=2)  # replaced
    os.utime(scan, ns=(time.time_ns(), time.time_ns() + 10**9))
    classify(str(source), str(output), model=tiny_model, device="cpu")
    shutil.copy2(backup, scan)  # restored
    restored = classify(str(source), str(output), model=tiny_model, device="cpu")
    assert first["images_classified"] == restored["images_new"] == restored["images_classified"] == 1
    export_latest(str(output), str(tmp_path / "latest.csv"))
    (latest,) = duckdb.sql(f"select fingerprint, image_width from '{tmp_path / 'latest.csv'}'").fetchall()
    stat = scan.stat()
    assert latest == (f"{stat.st_size}:{stat.st_mtime_ns}", 64)
    again = classify(str(source), str(output), model=tiny_model, device="cpu")
    assert again["images_classified"] == 0


def test_another_model_classifies_everything_again(
    image_folder: Path, tmp_path: Path, tiny_model: str, tiny_model_imagenet: str
) -> None:
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    second = classify(str(image_folder), str(output), model=tiny_model_imagenet, device="cpu")
    assert second["images_classified"] == 6
    rows = read_rows(output)
    assert len(rows) == 12 and len({r["model_revision"] for r in rows}) == 2
    assert len({r["model_slug"] for r in rows}) == 2


def test_a_new_preprocessing_config_is_a_new_revision(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """Same weights, another image mean: other probabilities, so every image is classified again."""
    changed = tmp_path / "model-v2"
    shutil.copytree(tiny_model, changed)
    config = json.loads((changed / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.1, 0.2, 0.3]
    (changed / "preprocessor_config.json").write_text(json.dumps(config))
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    second = classify(str(image_folder), str(output), model=str(changed), device="cpu")
    assert second["images_classified"] == 6
    assert len({r["model_revision"] for r in read_rows(output)}) == 2


def test_threshold_decides_the_label(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    classify(str(image_folder), str(tmp_path / "low"), model=tiny_model, device="cpu", threshold=0.0)
    classify(str(image_folder), str(tmp_path / "high"), model=tiny_model, device="cpu", threshold=1.0)
    assert {r["label"] for r in read_rows(tmp_path / "low")} == {"Malignant"}
    high = read_rows(tmp_path / "high")
    assert {r["label"] for r in high} == {"Normal"} and {r["threshold"] for r in high} == {1.0}
    assert all(r["confidence"] == pytest.approx(1 - r["prob_malignant"]) for r in high)


def test_summary_artifact_is_published(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = classify(str(image_folder), str(tmp_path / "preds"), model=tiny_model, device="cpu")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["classify-summary"]))
        )
    mine = [a for a in artifacts if str(a.flow_run_id) == summary["run_id"]]
    assert len(mine) == 1
    table = (
        {row["metric"]: row["value"] for row in mine[0].data if isinstance(row, dict)}
        if isinstance(mine[0].data, list)
        else None
    )
    text = str(mine[0].data)
    assert "images_classified" in text and "malignant_share" in text
    assert table is None or table["images_classified"] == "6"


def test_folder_links_are_followed_once_and_loops_do_not_hang(tmp_path: Path) -> None:
    from tasks.storage import list_images, open_location

    root = tmp_path / "scans"
    make_image(root / "a" / "x.png")
    make_image(tmp_path / "elsewhere" / "y.png")
    (root / "a" / "up").symlink_to(root)  # a loop
    (root / "again").symlink_to(root / "a")  # a second way into a folder already scanned
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a real folder reached only through a link
    paths = sorted(f.path for f in list_images(open_location(str(root))))
    assert paths == [str(root / "a" / "x.png"), str(root / "linked" / "y.png")]


def test_a_link_added_above_a_folder_does_not_change_its_images_uris(tmp_path: Path) -> None:
    """An image keeps the URI of its real path whatever links point into its tree, wherever they sit
    and whatever they are called: a new link must not make last night's images look new."""
    from tasks.storage import list_images, open_location

    root = tmp_path / "scans"
    make_image(root / "ward" / "2024" / "deep" / "x.png")
    make_image(tmp_path / "elsewhere" / "y.png")
    before = sorted(f.uri for f in list_images(open_location(str(root))))
    (root / "0-shortcut").symlink_to(root / "ward" / "2024" / "deep")  # sorts (and sits) above "ward"
    (root / "ward" / "2024" / "a-up").symlink_to(root / "ward")
    (root / "a-first").symlink_to(tmp_path / "elsewhere")  # outside SOURCE: reached through links only
    (root / "b-second").symlink_to(tmp_path / "elsewhere")
    after = sorted(f.uri for f in list_images(open_location(str(root))))
    assert before == [f"file://{root}/ward/2024/deep/x.png"]
    assert after == [f"file://{root}/a-first/y.png", *before]  # the first link in path order, once


def test_a_file_link_to_an_image_source_holds_itself_is_not_listed_twice(tmp_path: Path) -> None:
    """A `by-patient/` tree of links into `by-date/` (a PACS export, a curation): each image once, at its
    own path (or its folder link's); a link to a file not listed itself, or to an image outside SOURCE,
    stays listed, once for several links."""
    import numpy as np

    from tasks.storage import list_images, open_location
    from tests.corpus import make_dicom

    root, day = tmp_path / "scans", tmp_path / "scans" / "by-date" / "2026-11-01"
    make_image(day / "x.png")
    (day / "IM000001").write_bytes(make_dicom(np.zeros((8, 8), np.uint16)))
    (day / "blob").write_bytes((day / "x.png").read_bytes())
    make_image(root / ".trash" / "old.png")
    make_image(tmp_path / "elsewhere" / "y.png")
    make_image(tmp_path / "other-disk" / "z.png")
    (root / "archive").symlink_to(tmp_path / "other-disk")  # a folder of SOURCE kept on another disk
    links = root / "by-patient" / "p-17"
    links.mkdir(parents=True)
    (links / "x.png").symlink_to(day / "x.png")
    (links / "scan.dcm").symlink_to(day / "IM000001")  # found by its content there
    (links / "blob.png").symlink_to(day / "blob")  # not an image name there
    (links / "old.png").symlink_to(root / ".trash" / "old.png")  # hidden folders are not listed
    (links / "y.png").symlink_to(tmp_path / "elsewhere" / "y.png")  # outside SOURCE
    (links / "y2.png").symlink_to(tmp_path / "elsewhere" / "y.png")  # ... a second time
    (links / "relative.png").symlink_to("../../by-date/2026-11-01/x.png")
    (links / "z.png").symlink_to("../../archive/z.png")
    listed = sorted(str(Path(f.path).relative_to(root)) for f in list_images(open_location(str(root))))
    assert listed == [
        "archive/z.png",
        "by-date/2026-11-01/IM000001",
        "by-date/2026-11-01/x.png",
        "by-patient/p-17/blob.png",
        "by-patient/p-17/old.png",
        "by-patient/p-17/y.png",
    ]


def test_lowercase_model_labels_are_written_as_the_contract_spells_them(
    image_folder: Path, tmp_path: Path
) -> None:
    """A model saved with `malignant`/`normal` gets the contract's labels, and the summary counts them."""
    import json

    from flows.demo import build_tiny_model

    model = build_tiny_model(str(tmp_path / "lowercase"), seed=1)
    config_path = Path(model) / "config.json"
    config = json.loads(config_path.read_text())
    config["id2label"] = {"0": "normal", "1": "malignant"}
    config_path.write_text(json.dumps(config))

    summary = classify(str(image_folder), str(tmp_path / "preds"), model=model, device="cpu", threshold=0.0)
    rows = read_rows(tmp_path / "preds")
    assert {r["label"] for r in rows} == {"Malignant"}
    assert summary["malignant"] == len(rows) == 6


def test_files_that_are_not_images_by_their_extension_are_counted_in_the_log(
    tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run of 0 images over slides (.svs) or DICOM files without an extension said nothing about them:
    a warning names what SOURCE holds and what oncoflow lists; beside images, one info line."""
    source = tmp_path / "slides"
    for name in ("a.svs", "b.SVS", "sub/IM000001", "notes.txt", ".DS_Store"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"x")
    with caplog.at_level("INFO"):
        summary = classify(str(source), str(tmp_path / "out"), model=tiny_model, device="cpu")
    assert summary["images_found"] == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"{source} holds no images, only 4 other file(s) (.svs 2," in warning, warning
    assert "no extension 1" in warning and ".txt 1" in warning and ".DS_Store" not in warning
    assert ".dcm, .dicom, .gif, .jpeg, .jpg" in warning and "DICOM images named otherwise" in warning
    make_image(source / "scan.png", seed=1)
    caplog.clear()
    with caplog.at_level("INFO", logger="prefect.task_runs"):
        summary = classify(str(source), str(tmp_path / "out"), model=tiny_model, device="cpu")
    assert summary["images_found"] == 1
    logged = {r.levelname: r.getMessage() for r in caplog.records if "not images" in r.getMessage()}
    assert list(logged) == ["INFO"], logged
    assert "skipped 4 file(s) that are not images (.svs 2" in logged["INFO"]


def test_a_new_threshold_on_an_existing_output_says_what_it_applies_to(
    image_folder: Path, tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows already written keep their threshold (they are not classified again): the run says so, with
    the threshold as written (an operating point is one image's exact probability: a hint rounded up to
    0.9 would leave that image out)."""
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    make_image(image_folder / "later.png", seed=99)
    with caplog.at_level("WARNING"):
        summary = classify(
            str(image_folder), str(output), model=tiny_model, device="cpu", threshold=0.8999999999999999
        )
    assert summary["images_new"] == 1
    assert {r["threshold"] for r in read_rows(output)} == {0.5, 0.8999999999999999}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "6 at 0.5" in warning, warning
    assert "--threshold 0.8999999999999999 applies to new and changed images only" in warning
    assert "prob_malignant >= 0.8999999999999999`" in warning


def test_an_output_folder_holding_other_files_and_no_dataset_is_warned_about(
    image_folder: Path, tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """--output pointed at another folder of images by mistake: the run goes on (a project folder may
    hold notes) but says so, until the folder holds a dataset."""
    other = tmp_path / "other-scans"
    for number in range(3):
        make_image(other / f"x{number}.png", seed=number)
    with caplog.at_level("WARNING"):
        summary = classify(str(image_folder), str(other), model=tiny_model, device="cpu")
    assert summary["images_classified"] == 6 and list(other.glob("model_slug=*/date=*/*.parquet"))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"{other} holds 3 files or folders and no oncoflow dataset yet" in warning, warning
    caplog.clear()
    make_image(image_folder / "later.png", seed=50)
    with caplog.at_level("WARNING"):
        classify(str(image_folder), str(other), model=tiny_model, device="cpu")
    assert "no oncoflow dataset" not in caplog.text, "a dataset now: no warning"


def test_exif_orientation_on_an_existing_output_says_what_it_applies_to(
    image_folder: Path, tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """--exif-orientation, like --threshold, applies to new and changed images only: a run that turns
    it on (or off) over rows made the other way says how many keep their pixels; a run that keeps the
    setting says nothing."""
    output = tmp_path / "preds"
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")

    def warnings(**options: object) -> str:
        caplog.clear()
        with caplog.at_level("WARNING"):
            classify(str(image_folder), str(output), model=tiny_model, device="cpu", **options)  # type: ignore[arg-type]
        return " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    assert "--exif-orientation" not in warnings(), "every row so far made without it"
    make_image(image_folder / "later.png", seed=99)
    turned_on = warnings(exif_orientation=True)
    assert "already holds 6 rows of this model revision classified without --exif-orientation" in turned_on
    assert sorted(r["decoder"] for r in read_rows(output)) == ["pil"] * 6 + ["pil+exif_orientation"]
    assert "holds 1 rows of this model revision classified with --exif-orientation" in warnings()


def test_select_files_counts_the_changed_and_the_retried_among_the_files_to_classify() -> None:
    """What a run (and its dry run) counts: new files, files whose newest row is of another version
    (changed, also after an error row, also back to an older version), and error rows retried."""
    from datetime import UTC, datetime

    import pyarrow as pa

    from tasks.sink import select_files
    from tasks.storage import DiscoveredFile

    rows = [  # image, fingerprint, hour, error category of the row
        ("kept", "v1", 1, None),
        ("edited", "v1", 1, None),
        ("failed", "v1", 1, "read_failed"),
        ("failed-then-edited", "v1", 1, "read_failed"),
        ("restored", "v1", 1, None),
        ("restored", "v2", 2, None),
    ]
    index = pa.table(
        {
            "image_uri": [f"file:///s/{name}.png" for name, *_ in rows],
            "fingerprint": [fingerprint for _, fingerprint, _, _ in rows],
            "processed_at": [datetime(2026, 11, 1, hour, tzinfo=UTC) for *_, hour, _ in rows],
            "run_id": ["run"] * len(rows),
            "error_category": [category for *_, category in rows],
        }
    )
    listed = {
        "kept": "v1",
        "edited": "v2",
        "failed": "v1",
        "failed-then-edited": "v2",
        "restored": "v1",
        "new": "v1",
    }
    files = [DiscoveredFile(f"file:///s/{name}.png", f"/s/{name}.png", fp, 1) for name, fp in listed.items()]

    def names(selected: list[DiscoveredFile]) -> list[str]:
        return [file.uri.removeprefix("file:///s/").removesuffix(".png") for file in selected]

    plain = select_files(files, index)
    assert names(plain.files) == ["edited", "failed-then-edited", "restored", "new"]
    assert (plain.changed, plain.retried) == (3, 0)
    retrying = select_files(files, index, ["read_failed"])
    assert names(retrying.files) == ["edited", "failed", "failed-then-edited", "restored", "new"]
    assert (retrying.changed, retrying.retried) == (3, 1)
    assert select_files(files, index.slice(0, 0)) == (files, 0, 0)


def test_a_file_replaced_after_listing_gets_the_fingerprint_of_what_was_read(
    image_folder: Path, tiny_model: str
) -> None:
    """Its row describes the content classified, so the next run does not classify it a second time."""
    from tasks.inference import EngineOptions, classify_files
    from tasks.model import load_model
    from tasks.sink import select_new
    from tasks.storage import list_images, open_location

    location = open_location(str(image_folder))
    listed = list(list_images(location))
    replaced = Path(listed[0].path)
    make_image(replaced, size=(80, 60), seed=42)  # a scanner rewrites it while the run is underway
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10**9))
    model = load_model(tiny_model, device="cpu", precision="fp32")
    rows = classify_files(listed, location.fs, model, EngineOptions(batch_size=4), "run", "shard")
    stat = replaced.stat()
    assert (
        rows.column("fingerprint")[0].as_py() == f"{stat.st_size}:{stat.st_mtime_ns}" != listed[0].fingerprint
    )
    assert rows.column("image_width")[0].as_py() == 80
    assert select_new(list_images(location), rows) == []


def test_loading_a_model_draws_no_progress_bar(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """transformers' "Loading weights" bar put two lines of carriage returns in every nightly log; it is
    off while oncoflow loads a model, and left as it was for the rest of the process."""
    from transformers.utils import logging as transformers_logging

    from flows.demo import build_tiny_model
    from tasks.model import load_model

    folder = build_tiny_model(str(tmp_path / "model"), seed=3)  # not in load_model's cache yet
    capfd.readouterr()
    assert transformers_logging.is_progress_bar_enabled()
    load_model(folder, device="cpu", precision="fp32")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out, captured.err
    assert transformers_logging.is_progress_bar_enabled()
