"""`oncoflow erase`: every row of the named images goes, every other row stays, once."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs
from typer.testing import CliRunner

from flows.cli import app
from tasks.analytics import connect
from tasks.compact import compact, parquet_files_by_partition
from tasks.erase import Matcher, describe, erase, rewrite_without
from tasks.erase_list import read_erase_list
from tasks.storage import open_location
from tests.analytics_data import make_dataset
from tests.s3_fixtures import upload_folder


def all_rows(dest: Path | str, filesystem: s3fs.S3FileSystem | None = None) -> list[tuple]:
    table = ds.dataset(str(dest), filesystem=filesystem, format="parquet", partitioning="hive").to_table()
    return sorted(tuple(str(v) for v in row.values()) for row in table.to_pylist())


def uri_of(row: tuple) -> str:
    return row[0]  # image_uri is the contract's first column


def test_erase_counts_first_then_removes_every_row_of_the_named_images(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)  # site-a images 0-59 (old revision), 0-39 again (new); site-b 0-39 (old)
    before = all_rows(dest)
    files_before = sorted(dest.rglob("*.parquet"))
    wanted = "file:///scans/site-a/img_00003.jpg"  # rows of both revisions
    erase_list = tmp_path / "withdrawn.txt"
    typo = "file:///scans/site-a/img_0003.jpg"
    erase_list.write_text(f"# consent withdrawn 2026-11-29\n{wanted}\n\nfile:///scans/site-b/\n{typo}\n")

    plan = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(erase_list)])
    assert plan.exit_code == 0, plan.output
    text = " ".join(plan.output.split())
    assert "would erase 42 rows of 41 images" in text, text
    assert "2 files rewritten without them, 2 deleted" in text
    assert wanted in text and "run again with --yes" in text
    assert f"1 of the 3 entries of {erase_list} match no row" in text and text.endswith(
        f"{typo} nothing was erased: run again with --yes to erase these rows"
    ), text
    assert all_rows(dest) == before and sorted(dest.rglob("*.parquet")) == files_before, (
        "a plan touches nothing"
    )

    done = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(erase_list), "--yes"])
    assert done.exit_code == 0, done.output
    history = CliRunner().invoke(app, ["history", "--limit", "2"])
    assert [line.split()[1:3] for line in history.output.splitlines() if "erase" in line] == [
        ["erase", "│"],
        ["erase", "(plan)"],
    ], history.output
    assert "erased 42 rows of 41 images" in " ".join(done.output.split())
    after = all_rows(dest)
    expected = [
        r for r in before if uri_of(r) != wanted and not uri_of(r).startswith("file:///scans/site-b/")
    ]
    assert after == expected and len(after) == 140 - 42, "the others stay, values and all, once"
    assert not [p for p in dest.rglob(".*") if p.is_file()], "no temporary file left"
    assert connect(str(dest)).sql(
        f"select count(*) from predictions where image_uri = '{wanted}'"
    ).fetchall() == [(0,)]
    again = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(erase_list), "--yes"])
    assert again.exit_code == 0 and "no rows to erase" in again.output
    assert all_rows(dest) == after


def test_a_latest_export_filtered_to_some_images_is_an_erase_list(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    export = tmp_path / "latest.csv"
    assert CliRunner().invoke(app, ["latest", str(dest), "-o", str(export)]).exit_code == 0
    lines = export.read_text().splitlines()
    header, site_b = lines[0], [line for line in lines[1:] if "/site-b/" in line]
    (tmp_path / "site-b.csv").write_text("\n".join([header, *site_b]) + "\n")
    selection = read_erase_list(str(tmp_path / "site-b.csv"))
    assert len(selection.uris) == 40 and all("/site-b/" in uri for uri in selection.uris)


def test_an_interrupted_erase_never_double_counts_and_the_next_erase_or_compact_finishes_it(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    location = open_location(str(dest))
    wanted = "file:///scans/site-a/img_00001.jpg"
    files = [path for paths in parquet_files_by_partition(location).values() for path in paths]
    path = next(p for p in files if wanted in pq.read_table(p, columns=["image_uri"]).column(0).to_pylist())
    mask = Matcher(read_erase_list_of(tmp_path, wanted)).mask(pq.read_table(path, columns=["image_uri"]))
    rewrite_without(location, path, mask)  # the crash: rewritten file there, the old one not yet deleted

    views = connect(str(dest))
    assert views.sql("select count(*) from predictions").fetchall() == [(140,)], "no row counted twice"
    raw = duckdb.sql(f"select count(*) from read_parquet('{dest}/**/*.parquet')").fetchall()[0][0]
    assert raw == 140 + 19, "for now the file's other rows are in two files"
    plan = erase(location, read_erase_list_of(tmp_path, wanted))
    # one row in the other revision's file, one still in the left-over file: the plan names both
    assert (plan.rows_erased, plan.leftover_rows) == (1, 1), "the plan says the erased row is still there"
    assert "and 1 row in files an interrupted erase or compaction left" in describe(plan)
    report = compact(location, target_rows=2)  # target 2: finishes, merges nothing
    assert report.leftovers_deleted == 1
    assert duckdb.sql(f"select count(*) from read_parquet('{dest}/**/*.parquet')").fetchall()[0][0] == 139


def read_erase_list_of(folder: Path, *entries: str):  # noqa: ANN201 (a Selection)
    listed = folder / "list.txt"
    listed.write_text("\n".join(entries) + "\n")
    return read_erase_list(str(listed))


def test_erase_missing_from_removes_the_rows_of_images_deleted_at_the_source(
    image_folder: Path, tiny_model: str, tmp_path: Path
) -> None:
    dest = tmp_path / "preds"
    run = ["classify", str(image_folder), "-o", str(dest), "--model", tiny_model, "--device", "cpu"]
    assert CliRunner().invoke(app, run).exit_code == 0
    before = all_rows(dest)
    assert len(before) == 6
    gone = image_folder / "sub" / "f.bmp"
    gone.unlink()
    shutil.rmtree(image_folder / "sub" / "deeper")  # a whole folder deleted under a retention policy

    plan = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(image_folder)])
    text = " ".join(plan.output.split())
    assert plan.exit_code == 0 and "would erase 2 rows of 2 images" in text, text
    assert "lists 4 images: their rows stay" in text and gone.as_uri() in text

    other = tmp_path / "other-source"  # a SOURCE these rows never came from: nothing to erase
    other.mkdir()
    (other / "x.png").write_bytes((image_folder / "c.png").read_bytes())
    unrelated = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(other), "--yes"])
    assert unrelated.exit_code == 0 and "no rows to erase" in unrelated.output
    assert all_rows(dest) == before

    # A listing that leaves something out (an unreadable folder, here a broken link) could make images
    # that exist look deleted: nothing is erased until it is whole.
    broken = image_folder / "sub" / "moved.jpg"
    broken.symlink_to(tmp_path / "nowhere.jpg")
    refused = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(image_folder), "--yes"])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "left entries out" in text and "Nothing was erased" in text, text
    assert all_rows(dest) == before
    broken.unlink()

    done = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(image_folder), "--yes"])
    assert done.exit_code == 0, done.output
    after = all_rows(dest)
    assert len(after) == 4 and all(row in before for row in after)
    assert not any("/sub/f.bmp" in uri_of(r) or "/deeper/" in uri_of(r) for r in after)
    rerun = CliRunner().invoke(app, run)
    assert rerun.exit_code == 0 and all_rows(dest) == after, "nothing new to classify"


def test_erase_refuses_bad_arguments_before_any_work(image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    before = all_rows(dest)
    bad_line = tmp_path / "bad.txt"
    bad_line.write_text("file:///scans/site-a/img_00001.jpg\nhttps://pacs.example/img_2.jpg\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    good = tmp_path / "good.txt"
    good.write_text("file:///scans/site-a/img_00001.jpg\n")
    cases = [
        (["erase", str(dest)], 2, "give either --uris FILE or --missing-from SOURCE"),
        (
            ["erase", str(dest), "--uris", str(good), "--missing-from", str(image_folder)],
            2,
            "exactly one",
        ),
        (
            ["erase", str(dest), "--uris", str(bad_line)],
            2,
            "line 2: 'https://pacs.example/img_2.jpg' is neither",
        ),
        (["erase", str(dest), "--uris", str(empty)], 2, "names no image"),
        (["erase", str(dest), "--uris", str(tmp_path / "missing.txt")], 2, "invalid --uris"),
        (
            ["erase", str(dest), "--missing-from", str(tmp_path / "nowhere")],
            2,
            "is not an existing folder; give the SOURCE classify read",
        ),
        (["erase", str(image_folder), "--uris", str(bad_line)], 2, "line 2"),
        (
            ["erase", str(tmp_path / "nowhere"), "--uris", str(good)],
            2,
            "is not an existing folder; pass the --output of classify",
        ),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(app, args)
        text = " ".join(result.output.split())
        assert result.exit_code == code and message in text, (args, text)
    wrong_dest = CliRunner().invoke(app, ["erase", str(image_folder), "--uris", str(good), "--yes"])
    assert wrong_dest.exit_code == 1 and "holds no model_slug=… partition folders" in wrong_dest.output
    assert all_rows(dest) == before


@pytest.mark.s3
def test_erase_on_s3_keeps_every_other_row_once(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/erase")
    before = all_rows("preds/erase", s3)
    erase_list = tmp_path / "list.txt"
    erase_list.write_text("file:///scans/site-a/img_00002.jpg\n")
    result = CliRunner().invoke(app, ["erase", "s3://preds/erase", "--uris", str(erase_list), "--yes"])
    assert result.exit_code == 0 and "erased 2 rows of 1 image" in " ".join(result.output.split()), (
        result.output
    )
    s3.invalidate_cache()
    after = all_rows("preds/erase", s3)
    assert after == [r for r in before if uri_of(r) != "file:///scans/site-a/img_00002.jpg"]


@pytest.mark.s3
def test_erase_missing_from_an_s3_source(
    image_folder: Path, tiny_model: str, s3: s3fs.S3FileSystem, tmp_path: Path
) -> None:
    """Objects deleted under a lifecycle rule: their rows go; the rows of objects still there stay."""
    upload_folder(s3, image_folder, "scans/erase-src")
    run = ["classify", "s3://scans/erase-src", "-o", "s3://preds/erase-out", "--model", tiny_model]
    assert CliRunner().invoke(app, [*run, "--device", "cpu"]).exit_code == 0
    s3.invalidate_cache()
    before = all_rows("preds/erase-out", s3)
    assert len(before) == 6
    s3.rm("scans/erase-src/sub/f.bmp")
    erase = ["erase", "s3://preds/erase-out", "--missing-from", "s3://scans/erase-src", "--yes"]
    result = CliRunner().invoke(app, erase)
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "erased 1 row of 1 image" in text, text
    assert "lists 5 images: their rows stay" in text
    s3.invalidate_cache()
    after = all_rows("preds/erase-out", s3)
    assert after == [r for r in before if uri_of(r) != "s3://scans/erase-src/sub/f.bmp"]


@pytest.mark.parametrize("failing", [1, 2, 3, 4])
def test_a_transient_storage_error_mid_erase_is_retried_and_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """The n-th delete fails (a dropped connection): the retry finishes that file and goes on where the
    pass stopped; the counts are those of a clean run, whatever the files done before."""
    dest = tmp_path / "dest"
    make_dataset(dest)
    location = open_location(str(dest))
    before = all_rows(dest)
    selection = read_erase_list_of(tmp_path, "file:///scans/site-a/img_00003.jpg", "file:///scans/site-b/")
    real_rm, failures = location.fs.rm, []

    calls = []

    def flaky_rm(path: str, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == failing:
            failures.append(path)
            raise TimeoutError("the connection dropped")
        real_rm(path, *args, **kwargs)

    monkeypatch.setattr(location.fs, "rm", flaky_rm)
    report = erase(location, selection, apply=True)
    assert failures, "the fault was injected"
    assert (report.rows_erased, report.images_erased) == (42, 41)
    assert (report.files_rewritten, report.files_deleted, report.leftovers_deleted) == (2, 2, 0)
    assert report.entries_unmatched == [] and report.partitions == 3
    wanted = "file:///scans/site-a/img_00003.jpg"
    assert all_rows(dest) == [r for r in before if uri_of(r) != wanted and "/site-b/" not in uri_of(r)]


def test_missing_from_erases_only_images_that_are_certainly_gone(tmp_path: Path) -> None:
    """Rows under SOURCE that its listing does not name, but whose image is there all the same (in a
    hidden folder, behind a folder link the listing reached by its real path) or that a run wrote after
    the listing began, stay; an empty listing (an unmounted share with a marker file) erases nothing."""
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa

    from tests.analytics_data import OLD, rows, write
    from tests.conftest import make_image

    source = tmp_path / "src"
    for name in ("kept.jpg", ".incoming/hidden.jpg", "real/linked.jpg"):
        make_image(source / name)
    (source / "link").symlink_to(source / "real")
    (source / "patient-7").mkdir()  # where a share is mounted: unmounted, an empty folder
    (source / "patient-7" / ".not-mounted").write_text("")  # (a marker file does not make it full)
    uris = {
        "kept": (source / "kept.jpg").as_uri(),
        "hidden": (source / ".incoming" / "hidden.jpg").as_uri(),
        "through the link": (source / "link" / "linked.jpg").as_uri(),
        "gone": (source / "gone.jpg").as_uri(),
        "added since": (source / "added.jpg").as_uri(),
        "unmounted": (source / "patient-7" / "2024" / "scan.jpg").as_uri(),
    }
    dest = tmp_path / "dest"
    now = datetime.now(UTC)
    for number, (name, uri) in enumerate(uris.items()):
        when = now + timedelta(days=1) if name == "added since" else now - timedelta(days=1)
        table = rows(range(1), OLD, when, number, f"s{number}")
        table = table.set_column(0, "image_uri", pa.array([uri])).set_column(
            table.schema.get_field_index("processed_at"),
            "processed_at",
            pa.array([when], table.schema.field("processed_at").type),
        )
        write(dest, table, OLD, when, f"s{number}")

    result = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(source), "--yes"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "erased 1 row of 1 image" in text, text
    assert "2 images under" in text and "still exist (in a hidden folder, or reached through a link)" in text
    assert "1 image under" in text and "lie under an empty folder (an unmounted share?)" in text, text
    assert sorted(uri_of(r) for r in all_rows(dest)) == sorted(u for n, u in uris.items() if n != "gone")
    shutil.rmtree(source / "patient-7")  # really gone: the folder goes too
    again = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(source), "--yes"])
    assert again.exit_code == 0 and "erased 1 row of 1 image" in " ".join(again.output.split())

    unmounted = tmp_path / "mnt"
    unmounted.mkdir()
    (unmounted / ".not-mounted").write_text("")
    before = all_rows(dest)
    refused = CliRunner().invoke(app, ["erase", str(dest), "--missing-from", str(unmounted), "--yes"])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "holds no image" in text and "Nothing was erased" in text, text
    assert all_rows(dest) == before


def test_an_erase_that_fails_part_way_says_so_and_a_rerun_finishes(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    before = all_rows(dest)
    last_folder = sorted(p.parent for p in dest.rglob("*.parquet"))[-1]
    (last_folder / "part-zzzz.parquet").write_bytes(b"not parquet")  # read last
    listed = tmp_path / "list.txt"
    listed.write_text("file:///scans/site-a/\n")
    result = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(listed), "--yes"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "part-zzzz.parquet" in text, text
    assert "the erase stopped part way" in text and "run the same erase again to finish" in text, text
    (last_folder / "part-zzzz.parquet").unlink()
    rerun = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(listed), "--yes"])
    assert rerun.exit_code == 0, rerun.output
    assert all_rows(dest) == [r for r in before if not uri_of(r).startswith("file:///scans/site-a/")]


def test_erase_lists_in_other_spellings(tmp_path: Path) -> None:
    """An Excel CSV delimited by `;`, and a file:// URI of a folder without its trailing slash."""
    (tmp_path / "scans" / "p1").mkdir(parents=True)
    semicolons = tmp_path / "export.csv"
    semicolons.write_text("label;image_uri;confidence\nNormal;file:///scans/site-a/img_00001.jpg;0.9\n")
    assert read_erase_list(str(semicolons)).uris == {"file:///scans/site-a/img_00001.jpg"}
    folder = (tmp_path / "scans" / "p1").as_uri()
    assert read_erase_list_of(tmp_path, folder).prefixes == (folder + "/",)


def test_erasing_every_row_says_how_many_partitions_it_emptied(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make_dataset(dest)
    listed = tmp_path / "all.txt"
    listed.write_text("file:///scans/\n")
    result = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(listed), "--yes"])
    text = " ".join(result.output.split())
    assert (
        result.exit_code == 0 and "erased 140 rows of 100 images" in text and "(of 3 partitions)" in text
    ), text
    assert not list(dest.rglob("*.parquet"))


def test_a_silenced_log_does_not_hide_what_the_listing_left_out(tmp_path: Path) -> None:
    """The refusal counts what the listing left out itself: a logging setup that drops warnings (or
    disables the storage logger) cannot make an incomplete listing look whole."""
    import logging

    from tasks.erase import IncompleteListing, source_selection

    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(b"x")
    (source / "moved.jpg").symlink_to(tmp_path / "nowhere.jpg")
    logging.disable(logging.WARNING)
    try:
        with pytest.raises(IncompleteListing, match="left entries out"):
            source_selection(open_location(str(source)))
    finally:
        logging.disable(logging.NOTSET)


def test_a_plan_during_a_compaction_counts_again_when_a_file_vanishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan takes no lease: a file a concurrent compaction merged and deleted under it means a new
    count from a new listing, not a failure and not rows counted twice."""
    from tasks.erase import Pass

    dest = tmp_path / "dest"
    make_dataset(dest)
    location = open_location(str(dest))
    real_read, reads = Pass.read, []

    def read_during_a_compaction(self: Pass, path: str):  # noqa: ANN202
        reads.append(path)
        if len(reads) == 2:
            compact(location, target_rows=1000)  # merges and deletes the files listed
            return real_read(self, path)  # this one is gone now
        return real_read(self, path)

    monkeypatch.setattr(Pass, "read", read_during_a_compaction)
    selection = read_erase_list_of(tmp_path, "file:///scans/site-a/img_00003.jpg", "file:///scans/site-b/")
    report = erase(location, selection)
    assert (report.rows_erased, report.images_erased, report.leftover_rows) == (42, 41, 0), report
