"""docs/analytics.md: every `sql` and `python` block runs against a generated dataset and returns rows."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from tasks.analytics import VIEWS_SQL, connect
from tests.analytics_data import add_edits, make_dataset

DOC = Path(__file__).resolve().parent.parent / "docs" / "analytics.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text()) if lang == language]


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "dest"
    make_dataset(path)
    add_edits(path)  # where a snippet that dedups naively gives other rows than the views
    (path / "notes.txt").write_text("kept beside the dataset: not data")  # README: never read as data
    return path


@pytest.fixture(scope="module")
def sql_results(dest: Path) -> list[list[tuple]]:
    """Run the sql blocks in order on one connection; the result of each block's last statement."""
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    results = []
    for body in blocks("sql"):
        for statement in filter(str.strip, body.replace("DEST", str(dest)).split(";")):
            relation = connection.sql(statement)
        results.append(relation.fetchall() if relation is not None else [])
    return results


def test_the_documented_views_are_the_code(dest: Path, sql_results: list) -> None:
    """The views' SQL is the code's; the documented `prediction_files` (DuckDB's read_parquet) gives the
    same `latest` as the code's (pyarrow), column for column."""
    files_view, views = blocks("sql")[0].split(";\n\n", 1)
    assert views == VIEWS_SQL and files_view.startswith("create or replace view prediction_files as")
    assert len(blocks("sql")) >= 6 and len(blocks("python")) == 2
    documented = duckdb.connect()
    documented.execute("set TimeZone = 'UTC'")
    for statement in filter(str.strip, blocks("sql")[0].replace("DEST", str(dest)).split(";")):
        documented.execute(statement)
    query = "select * from latest order by image_uri"
    ours = connect(str(dest)).sql(query)
    theirs = documented.sql(query)
    assert ours.columns == theirs.columns and ours.types == theirs.types
    assert ours.fetchall() == theirs.fetchall() and len(theirs.fetchall()) == 105


def test_every_documented_query_returns_rows(sql_results: list[list[tuple]]) -> None:
    for body, rows in zip(blocks("sql")[1:], sql_results[1:], strict=True):
        assert rows, f"no rows from:\n{body}"


def test_disagreement_queries_find_changed_labels(sql_results: list[list[tuple]]) -> None:
    matrix, changed = next(
        (sql_results[i], sql_results[i + 1])
        for i, body in enumerate(blocks("sql"))
        if "old_label, new.label" in body
    )
    assert sum(n for old, new, n in matrix if old != new) == len(changed) > 0
    assert all(old != new for _, old, new, *_ in changed)


def test_python_blocks_agree_with_duckdb(dest: Path, sql_results: list[list[tuple]]) -> None:
    """Both snippets' `latest` is the view's, row for row, and their results are the SQL blocks'."""
    view = sorted(
        connect(str(dest)).sql("select image_uri, fingerprint, model_revision from latest").fetchall()
    )
    pandas_block, polars_block = blocks("python")
    namespace: dict = {"DEST": str(dest)}
    exec(pandas_block, namespace)
    latest = namespace["latest"][["image_uri", "fingerprint", "model_revision"]]
    assert sorted(latest.itertuples(index=False, name=None)) == view
    share = namespace["result"]
    per_day = [(str(day), classified, malignant) for day, classified, malignant, _ in sql_results[1]]
    assert [
        tuple(row) for row in share[["intake_day", "classified", "malignant"]].itertuples(index=False)
    ] == [(day, int(c), int(m)) for day, c, m in per_day]
    namespace = {"DEST": str(dest)}
    exec(polars_block, namespace)
    latest = namespace["latest"].select("image_uri", "fingerprint", "model_revision").collect()
    assert sorted(latest.iter_rows()) == view
    queue = namespace["result"]
    duckdb_queue = next(
        rows for body, rows in zip(blocks("sql"), sql_results, strict=True) if "confidence < 0.65" in body
    )
    assert queue["image_uri"].to_list() == [row[0] for row in duckdb_queue] and queue.height > 0
