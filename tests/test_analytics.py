"""The output as an analytics dataset: compaction, the `latest` view and export, old schemas, the report."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.analytics import connect, export_latest
from tasks.compact import compact, merge_bin, parquet_files_by_partition
from tasks.dataset_report import DISCLAIMER, gather
from tasks.metrics import read_predictions
from tasks.sink import SCHEMA, read_index
from tasks.storage import open_location
from tests.analytics_data import FIRST_DAY, MODEL, NEW, OLD, add_edits, make_dataset, rows, write
from tests.conftest import make_image


def all_rows(dest: Path) -> list[tuple]:
    """Every row of every visible file, all columns, as sortable tuples (duplicates kept)."""
    table = ds.dataset(str(dest), format="parquet", partitioning="hive").to_table()
    return sorted(tuple(str(v) for v in row.values()) for row in table.to_pylist())


def parquet_files(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*.parquet") if not p.name.startswith("."))


def count(dest: Path, sql: str) -> int:
    return connect(str(dest)).sql(sql).fetchall()[0][0]


def test_compaction_keeps_every_row_once_and_merges_small_files(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    before = all_rows(dest)
    assert len(parquet_files(dest)) == 7

    report = compact(open_location(str(dest)), target_rows=1000)

    assert all_rows(dest) == before, "same rows, same values, nothing lost or doubled"
    files = parquet_files(dest)
    assert len(files) == 3 and report.files_merged == 7 and report.rows_merged == 140
    assert all(f.name.startswith("part-c") for f in files)
    assert pq.read_metadata(files[0]).metadata[b"oncoflow.schema_version"] == b"2"
    assert not [p for p in dest.rglob(".*")], "no temporary files left"
    again = compact(open_location(str(dest)), target_rows=1000)
    assert again.files_written == 0 and all_rows(dest) == before


def test_compact_refuses_a_folder_that_is_no_dataset_and_writes_nothing_into_it(image_folder: Path) -> None:
    """The image SOURCE given by mistake: before, `merged 0 files` and a lease file left in the archive."""
    before = sorted(image_folder.rglob("*"))
    result = CliRunner().invoke(app, ["compact", str(image_folder)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "holds no model_slug=… partition folders" in text, text
    assert f"{str(image_folder)!r} holds" in text, "named as typed, not as a file:// URI"
    assert sorted(image_folder.rglob("*")) == before
    latest = CliRunner().invoke(app, ["latest", str(image_folder), "-o", str(image_folder.parent / "l.csv")])
    text = " ".join(latest.output.split())
    assert f"no Parquet files under {str(image_folder)!r}, only other files" in text, text


def test_compact_after_a_first_night_that_found_no_image_has_nothing_to_merge(
    tmp_path: Path, tiny_model: str
) -> None:
    """classify of an empty night leaves DEST holding only its lease folder: a dataset with no rows
    yet, not "the image SOURCE given by mistake" (a scheduled compaction failed on it)."""
    source = tmp_path / "scans"
    source.mkdir()
    (source / "README.txt").write_text("images arrive here nightly")
    dest = tmp_path / "preds"
    run = ["classify", str(source), "-o", str(dest), "--model", tiny_model, "--device", "cpu"]
    assert CliRunner().invoke(app, run).exit_code == 0
    assert [p.name for p in dest.iterdir()] == ["_leases"]
    result = CliRunner().invoke(app, ["compact", str(dest)])
    assert result.exit_code == 0 and "nothing to merge: the dataset holds no rows yet" in result.output
    listed = tmp_path / "list.txt"
    listed.write_text("file:///scans/a.png\n")
    erased = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(listed), "--yes"])
    assert erased.exit_code == 0 and "no rows to erase: the dataset holds no rows yet" in erased.output


@pytest.mark.parametrize("command", ["latest", "report"])
def test_latest_and_report_name_an_image_folder_given_for_the_dataset(
    image_folder: Path, tmp_path: Path, command: str
) -> None:
    """Not "run classify --output IMAGES first", which would write the rows into the image archive."""
    target = tmp_path / ("out.parquet" if command == "latest" else "out.html")
    result = CliRunner().invoke(app, [command, str(image_folder), "-o", str(target)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "the image SOURCE given by mistake?" in text, text
    assert "--output folder of `oncoflow classify`" in text and "first" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, [command, str(empty), "-o", str(target)])
    assert "run `oncoflow classify SOURCE --output" in " ".join(result.output.split())
    assert not target.exists()


def test_compaction_respects_the_target_size(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)  # day 1 holds 3 files of 20 rows
    compact(open_location(str(dest)), target_rows=50)
    day_one = [f for f in parquet_files(dest) if "date=2026-03-01" in str(f)]
    assert sorted(pq.read_metadata(f).num_rows for f in day_one) == [20, 40]


def test_interrupted_compaction_never_double_counts_and_the_next_run_finishes_it(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    location = open_location(str(dest))
    latest_before = connect(str(dest)).sql("select * from latest order by image_uri").fetchall()
    inputs = next(iter(parquet_files_by_partition(location).values()))
    merge_bin(location, inputs)  # the crash: merged file written, inputs not yet deleted

    raw = duckdb.sql(f"select count(*) from read_parquet('{dest}/**/*.parquet')").fetchall()[0][0]
    assert raw == 140 + 60, "raw files hold the merged rows twice for now"
    assert count(dest, "select count(*) from predictions") == 140
    assert connect(str(dest)).sql("select * from latest order by image_uri").fetchall() == latest_before

    report = compact(location, target_rows=1000)
    assert report.leftovers_deleted == len(inputs) == 3
    assert duckdb.sql(f"select count(*) from read_parquet('{dest}/**/*.parquet')").fetchall()[0][0] == 140


def test_a_crashed_compaction_among_shards_named_like_merged_files_is_finished(tmp_path: Path) -> None:
    """Shard ids are 20 hex digits, so one shard in 16 starts `part-c` like a merged file; a leftover
    input so named, sorted after the merged file, must not be read after it was deleted. Stale
    temporaries of killed writes go too; a fresh one (a write in progress) stays."""
    dest = tmp_path / "dest"
    shards = ["0" * 20, "c" + "f" * 19]
    for number, shard in enumerate(shards):
        table = rows(range(number * 10, number * 10 + 10), OLD, FIRST_DAY, number, shard)
        write(dest, table, OLD, FIRST_DAY, shard)
    location = open_location(str(dest))
    inputs = next(iter(parquet_files_by_partition(location).values()))
    merged, _ = merge_bin(location, inputs)  # the crash: merged file written, inputs not yet deleted
    assert sorted([*inputs, merged])[-1].endswith(f"part-{shards[1]}.parquet")
    folder = Path(merged).parent
    stale, fresh = (
        folder / f".part-{'1' * 20}.parquet.tmp-{'a' * 32}",
        folder / f".part-c.parquet.tmp-{'b' * 32}",
    )
    # A day whose only shard was killed before its rename: a partition folder with no Parquet file.
    lone = folder.parent / "date=2026-02-27" / f".part-{'2' * 20}.parquet.tmp-{'c' * 32}"
    lone.parent.mkdir()
    for old in (stale, lone):
        old.write_bytes(b"killed a week ago")
        os.utime(old, (time.time() - 7 * 86400, time.time() - 7 * 86400))
    fresh.write_bytes(b"being written")

    result = CliRunner().invoke(app, ["compact", str(dest)])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert (
        "2 inputs of an interrupted compaction deleted" in text and "2 stale temporary files deleted" in text
    )
    assert [p.name for p in parquet_files(dest)] == [Path(merged).name]
    assert not stale.exists() and not lone.exists() and fresh.exists()
    assert count(dest, "select count(*) from predictions") == 20


def test_incremental_runs_keep_working_after_compaction(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    from flows.classify import classify

    dest = tmp_path / "preds"
    classify(str(image_folder), str(dest), model=tiny_model, device="cpu", shard_size=2)
    before = all_rows(dest)
    result = CliRunner().invoke(app, ["compact", str(dest)])
    assert result.exit_code == 0, result.output
    assert "merged 3 files into 1" in result.output
    assert len(parquet_files(dest)) == 1 and all_rows(dest) == before

    again = classify(str(image_folder), str(dest), model=tiny_model, device="cpu", shard_size=2)
    assert again["images_new"] == 0 and all_rows(dest) == before


def read_during_compactions(
    dest: Path, read: Callable[[], set[str]], reads: int = 4, pause: float = 0.0
) -> None:
    """Call `read` (the image URIs a reader saw) over and over while another thread writes small shards
    and compacts, merging and deleting every file of a partition each round (at least 12 rounds, and
    on until `reads` reads have run under the churn).

    Every read must succeed and hold every image written before it began."""
    location = open_location(str(dest))
    committed = set(read_index(location, OLD).column("image_uri").to_pylist())
    done = threading.Event()
    made = [0]

    def churn() -> None:
        try:
            round_ = 0
            while round_ < 12 or made[0] < reads:
                for day in range(2):
                    images = range(1000 + 10 * round_, 1000 + 10 * round_ + 10)
                    when = FIRST_DAY + timedelta(days=day)
                    for start in range(images.start, images.stop, 2):
                        shard = f"r{start}d{day}"
                        write(dest, rows(range(start, start + 2), OLD, when, start, shard), OLD, when, shard)
                    committed.update(f"file:///scans/site-a/img_{n:05d}.jpg" for n in images)
                compact(open_location(str(dest)), target_rows=10**6)
                round_ += 1
                time.sleep(pause)
        finally:
            done.set()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        while not done.is_set():
            expected = set(committed)
            assert expected <= read()
            made[0] += 1
    finally:
        made[0] = reads  # a failed read ends the churn too
        worker.join()


def test_the_index_read_during_compactions_holds_every_row_and_never_fails(tmp_path: Path) -> None:
    """A classify that starts while `oncoflow compact` merges (and deletes) files under it."""
    make_dataset(tmp_path / "dest", shard_rows=2)
    location = open_location(str(tmp_path / "dest"))
    read_during_compactions(
        tmp_path / "dest", lambda: set(read_index(location, OLD).column("image_uri").to_pylist()), reads=20
    )


def test_latest_report_and_evaluate_read_through_compactions(tmp_path: Path) -> None:
    """`latest`, `report` and `evaluate` read every file: a file deleted by a compaction under them makes
    them read again instead of failing (before, about one read in four failed with "No such file")."""
    dest = tmp_path / "dest"
    make_dataset(dest, shard_rows=2)
    export = tmp_path / "latest.parquet"

    def read() -> set[str]:
        export_latest(str(dest), str(export))
        latest = set(pq.read_table(export, columns=["image_uri"]).column("image_uri").to_pylist())
        evaluated = set(read_predictions(str(dest), OLD)["image_uri"])
        assert gather(str(dest)).totals["images (latest row each)"] >= len(latest)  # rows only grow
        return latest & evaluated

    read_during_compactions(dest, read, pause=0.5)  # back-to-back compactions could outlast 10 reads


def test_latest_is_one_row_per_image_from_the_newest_revision(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    # site-b/img_00003 changes content on day 4: the old revision classifies the new version.
    changed = rows(range(3, 4), OLD, FIRST_DAY + timedelta(days=3), 99, "changed", "site-b")
    changed = changed.set_column(1, "fingerprint", pa.array(["2000:1800000000000000000"]))
    write(dest, changed, OLD, FIRST_DAY + timedelta(days=3), "changed")
    edits = add_edits(dest)  # an edit after the reprocess; the old model again under another spelling

    connection = connect(str(dest))
    latest = {
        row[0]: row
        for row in connection.sql("select image_uri, model_revision, fingerprint from latest").fetchall()
    }
    assert len(latest) == 105
    site_a = [uri for uri in latest if "/site-a/" in uri]
    assert {latest[u][1] for u in site_a if int(u[-9:-4]) < 40 and not u.endswith("_00005.jpg")} == {NEW}
    assert latest["file:///scans/site-a/img_00005.jpg"][1:] == (OLD, "3000:1800000000000000000")
    assert {latest[u][1] for u in site_a if int(u[-9:-4]) >= 40} == {OLD}, "not reprocessed yet: old row"
    assert latest["file:///scans/site-b/img_00003.jpg"][2] == "2000:1800000000000000000"
    assert {uri: latest[uri][1] for uri in edits} == edits
    # One revision per model_revision, named by its first row's spelling of the model.
    assert connection.sql("select model, model_revision from revisions order by first_seen").fetchall() == [
        (MODEL, OLD),
        (MODEL, NEW),
    ]


@pytest.mark.parametrize("extension", [".parquet", ".csv"])
def test_latest_command_exports_one_row_per_image(tmp_path: Path, extension: str) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    output = tmp_path / "export" / f"latest{extension}"
    result = CliRunner().invoke(app, ["latest", str(dest), "--output", str(output)])
    assert result.exit_code == 0, result.output
    reader = "read_parquet" if extension == ".parquet" else "read_csv"
    uris, images, newest = duckdb.sql(
        f"select count(*), count(distinct image_uri), count(*) filter (model_revision = '{NEW}') "
        f"from {reader}('{output}')"
    ).fetchall()[0]
    assert (uris, images, newest) == (100, 100, 40)


def test_analytics_commands_reject_a_missing_dataset(tmp_path: Path) -> None:
    for command in (["compact"], ["latest", "--output", "x.csv"], ["report", "--output", "r.html"]):
        result = CliRunner().invoke(app, [command[0], str(tmp_path / "nope"), *command[1:]])
        assert result.exit_code == 2 and "not an existing folder" in " ".join(result.output.split()), command
    result = CliRunner().invoke(app, ["compact", str(tmp_path), "--target-rows", "1"])
    assert result.exit_code == 2 and "--target-rows" in result.output


def test_an_empty_dest_is_reported_at_once_not_retried(tmp_path: Path) -> None:
    """ "No Parquet files" is a wrong path, not a compaction under way: one attempt, then the message."""
    from tasks.analytics import NoDatasetFiles, prediction_files, retry_while_compacting

    attempts: list[int] = []

    def read() -> object:
        attempts.append(1)
        return prediction_files(open_location(str(tmp_path)))

    with pytest.raises(NoDatasetFiles, match="no Parquet files under"):
        retry_while_compacting(read)
    assert len(attempts) == 1


def test_analytics_commands_reject_a_wrong_output_type_before_reading(tmp_path: Path) -> None:
    for command, wanted in (("latest", ".parquet or .csv"), ("report", ".html or .png")):
        result = CliRunner().invoke(app, [command, str(tmp_path), "--output", str(tmp_path / "out.txt")])
        assert result.exit_code == 2 and f"must end in {wanted}" in " ".join(result.output.split())
    for command, name in (("latest", "folder.csv"), ("report", "folder.html")):
        (tmp_path / name).mkdir()
        result = CliRunner().invoke(app, [command, str(tmp_path), "--output", str(tmp_path / name)])
        assert result.exit_code == 2 and "is an existing folder" in " ".join(result.output.split())


@pytest.mark.parametrize("name", ["dest?x", "dest[ab]", "dest*", "dest\\[a]x"])
def test_a_dest_named_like_a_pattern_is_read_as_itself(tmp_path: Path, name: str) -> None:
    """A folder name holding ?, [ or * is a name, not a pattern: no rows of a neighbouring dataset."""
    dest = tmp_path / name
    make_dataset(dest)
    # What `dest?x` and `dest*` would match as globs: the same file names, other images.
    neighbour = tmp_path / "destax"
    shutil.copytree(dest, neighbour)
    for file in neighbour.rglob("*.parquet"):
        table = pq.read_table(file)
        uris = pa.compute.replace_substring(table.column("image_uri"), "/scans/", "/elsewhere/")
        pq.write_table(table.set_column(0, "image_uri", uris), file)
    output = tmp_path / "latest.csv"
    result = CliRunner().invoke(app, ["latest", str(dest), "--output", str(output)])
    assert result.exit_code == 0, result.output
    exported = duckdb.sql(f"select image_uri from read_csv('{output}')").fetchall()
    assert len(exported) == 100 and not [uri for (uri,) in exported if "elsewhere" in uri]
    report = CliRunner().invoke(app, ["report", str(dest), "--output", str(tmp_path / "r.png")])
    assert report.exit_code == 0 and ": 100 images" in " ".join(report.output.split()), report.output


def test_key_value_folders_above_dest_are_not_columns(tmp_path: Path) -> None:
    """`s3://lake/project=onco/preds`-like paths: only model_slug and date below DEST are partitions; a
    `status=bad` or `date=...` folder above DEST must not overwrite the rows' own values."""
    dest = tmp_path / "project=onco" / "status=bad" / "date=2020-01-01" / "dest"
    make_dataset(dest)
    connection = connect(str(dest))
    statuses = dict(connection.sql("select status, count(*) from predictions group by status").fetchall())
    assert statuses == {"ok": 126, "error": 14}
    days = connection.sql("select distinct date::varchar from predictions order by 1").fetchall()
    assert days == [("2026-03-01",), ("2026-03-02",), ("2026-03-03",)]
    assert "project" not in connection.sql("select * from latest").columns


def test_files_of_an_older_schema_stay_readable(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    # A v0-like file: the contract columns only, no schema_version metadata (as before the extras).
    contract = [
        name
        for name in SCHEMA.names
        if name not in {"shard_id", "precision", "image_width", "image_height", "decoder"}
    ]
    old = (
        rows(range(500, 505), OLD, FIRST_DAY, 5, "v0", "site-old")
        .select(contract)
        .replace_schema_metadata(None)
    )
    folder = next(dest.glob("model_slug=*")) / "date=2026-03-01"
    pq.write_table(old, folder / "part-v0.parquet")

    unified = pa.unify_schemas([SCHEMA, pa.schema([("date", pa.string()), ("model_slug", pa.string())])])
    table = ds.dataset(str(dest), format="parquet", partitioning="hive", schema=unified).to_table()
    assert table.num_rows == 145
    old_rows = table.filter(pa.compute.field("shard_id").is_null())
    assert old_rows.num_rows == 5 and old_rows.column("precision").null_count == 5

    assert count(dest, "select count(*) from predictions where image_width is null and status = 'ok'") == 5
    index = read_index(open_location(str(dest)), OLD)
    assert "file:///scans/site-old/img_00500.jpg" in index.column("image_uri").to_pylist()
    compact(open_location(str(dest)), target_rows=1000)  # schemas are never mixed in one file
    assert (folder / "part-v0.parquet").exists() and count(dest, "select count(*) from predictions") == 145


@pytest.mark.parametrize("extension", [".html", ".png"])
def test_report_renders_the_four_plots(tmp_path: Path, extension: str) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    output = tmp_path / f"report{extension}"
    result = CliRunner().invoke(app, ["report", str(dest), "--output", str(output)])
    assert result.exit_code == 0, result.output
    # 100 images; the latest row of 10 is an error row (14 error rows in all, over both revisions).
    assert "100 images, 10 error rows (10.0%)" in " ".join(result.output.split())
    data = gather(str(dest))
    assert data.totals["error rows (latest row each)"] == 10 and data.totals["error share"] == "10.0%"
    assert data.totals["decision threshold(s) on prob_malignant"] == "0.5"
    assert sum(rows for _, rows in data.errors) == 10  # the plot counts what the totals count
    if extension == ".html":
        page = output.read_text()
        assert DISCLAIMER in page and "Malignant share" in page and "error share" in page
        assert "misses about 28 of every 100 malignant images" in page and "oncoflow evaluate" in page
        png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1))  # type: ignore[union-attr]
    else:
        png = output.read_bytes()
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width >= 1200 and image.height >= 800


def test_files_saved_inside_dest_are_refused_or_ignored(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """An export or report written into DEST would join the dataset: the commands refuse it, and files
    that land there anyway (a user's notes, an old export) are not read as data."""
    from flows.classify import classify

    dest = tmp_path / "preds"
    classify(str(image_folder), str(dest), model=tiny_model, device="cpu")
    before = all_rows(dest)
    for command in (["latest", "-o", "latest.parquet"], ["report", "-o", "report.html"]):
        result = CliRunner().invoke(app, [command[0], str(dest), command[1], str(dest / command[2])])
        assert result.exit_code == 2 and "--output" in result.output, result.output
        assert not (dest / command[2]).exists()
    (tmp_path / "l.csv").write_text("image_uri,label\n")
    result = CliRunner().invoke(
        app,
        ["evaluate", "--predictions", str(dest), "--labels", str(tmp_path / "l.csv"), "-o", str(dest / "e")],
    )
    assert result.exit_code == 2 and "read its own output" in result.output

    (dest / "notes.txt").write_text("checked by Dr. X")
    duckdb.sql(f"copy (select 1 as n) to '{dest / 'old-export.parquet'}' (format parquet)")
    again = classify(str(image_folder), str(dest), model=tiny_model, device="cpu")
    assert again["images_new"] == 0
    assert count(dest, "select count(*) from predictions") == len(before) == 6
    result = CliRunner().invoke(app, ["latest", str(dest), "-o", str(tmp_path / "latest.csv")])
    assert result.exit_code == 0 and "wrote 6 rows" in result.output, result.output


@pytest.mark.parametrize(
    "content", [b"", b"not parquet at all" * 10, None], ids=["zero-byte", "garbage", "copy"]
)
def test_a_damaged_file_in_dest_is_named_with_the_fix(
    image_folder: Path, tmp_path: Path, tiny_model: str, content: bytes | None
) -> None:
    """A part file another tool truncated or put there blocks classify and compact until moved; both
    name it and say so (exit 1, no traceback), and nothing is written or deleted. So does a partition
    folder copied beside itself (`date=2026-11-29 (copy)`), which every reader failed on with a bare
    "error parsing '2026-11-29 (copy)' as scalar of type date32"."""
    dest = tmp_path / "preds"
    assert (
        CliRunner()
        .invoke(app, ["classify", str(image_folder), "-o", str(dest), "--model", tiny_model])
        .exit_code
        == 0
    )
    (partition,) = dest.glob("model_slug=*/date=*")
    damaged = partition / "part-00000000000000000000.parquet"
    expected = f"{damaged.name} is not a readable Parquet file"
    if content is None:
        damaged = Path(shutil.copytree(partition, f"{partition} (copy)"))
        expected = f"{damaged.name} is not a partition oncoflow writes"
    else:
        damaged.write_bytes(content)
    files = sorted(dest.rglob("*.parquet"))
    make_image(image_folder / "later.png", seed=99)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image_uri,label\n{image_folder / 'a.jpg'},Normal\n")
    for command in (
        ["classify", str(image_folder), "-o", str(dest), "--model", tiny_model, "--device", "cpu"],
        ["compact", str(dest)],
        ["latest", str(dest), "-o", str(tmp_path / "latest.csv")],
        ["report", str(dest), "-o", str(tmp_path / "report.html")],
        ["evaluate", "--predictions", str(dest), "--labels", str(labels), "-o", str(tmp_path / "evaluation")],
    ):
        result = CliRunner().invoke(app, command)
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and "Traceback" not in result.output, text
        assert expected in text and "move it out of DEST" in text, text
        assert sorted(dest.rglob("*.parquet")) == files


def test_report_histogram_counts_rows_decided_at_any_threshold(tmp_path: Path) -> None:
    """At --threshold 0.3 a Malignant row can have confidence 0.35: it must still be in the histogram."""
    from tasks.dataset_report import confidence_histogram, gather

    dest = tmp_path / "dest"
    frame = rows(range(40), OLD, FIRST_DAY, seed=3, shard="s0").to_pandas()
    malignant = frame["prob_malignant"] >= 0.3
    frame["label"] = frame["label"].where(
        frame["status"] != "ok", malignant.map({True: "Malignant", False: "Normal"})
    )
    frame["confidence"] = frame["prob_malignant"].where(malignant, 1 - frame["prob_malignant"])
    frame["threshold"] = 0.3
    write(dest, pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), OLD, FIRST_DAY, "s0")

    data = gather(str(dest))
    ok = frame[frame["status"] == "ok"]
    assert (ok["confidence"] < 0.5).any(), "the case the old 0.5–1 bins dropped"
    counts = confidence_histogram(data)
    for label in ("Normal", "Malignant"):
        assert counts[label].sum() == (ok["label"] == label).sum()


def test_a_damaged_local_file_fails_once_not_like_a_compaction(tmp_path: Path) -> None:
    """ "Parquet magic bytes not found" is a damaged file, not one merged away: no rerun of the query."""
    from tasks.analytics import retry_while_compacting

    dest = tmp_path / "dest"
    make_dataset(dest)
    damaged = parquet_files(dest)[2]
    damaged.write_bytes(b"garbage" * 50)
    attempts: list[int] = []

    def read() -> list[tuple]:
        attempts.append(1)
        return connect(str(dest)).sql("select count(*) from latest").fetchall()

    with pytest.raises(duckdb.Error, match="magic bytes") as error:
        retry_while_compacting(read)
    assert len(attempts) == 1 and damaged.name in str(error.value)
