"""`oncoflow report`: a one-page report on the output dataset: volumes, Malignant share, confidence and errors, as plots.

Rendered with matplotlib's Agg backend (no display needed) into one PNG, written as is or embedded in
a self-contained HTML page. Research use only: the figures describe model outputs, not diagnoses.
"""

from __future__ import annotations

import base64
import html
import io
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: render without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.analytics import connect, retry_while_compacting  # noqa: E402
from tasks.storage import staged_file  # noqa: E402

# Over 0–1, not 0.5–1: at a threshold other than 0.5 the decided class's probability can be below 0.5.
CONFIDENCE_BINS = np.linspace(0.0, 1.0, 21)
DISCLAIMER = (
    "For research, not diagnosis: these are outputs of a statistical model, not clinical findings. "
    "Every result must be reviewed by a qualified person."
)
# Without labels this report cannot measure the model's error rates: it says what the seed card's mean.
ERROR_RATES = (
    "This report has no true labels, so it cannot say how often these labels are wrong. For scale: the "
    "seed model's card (650 test images) reports that it misses about 28 of every 100 malignant images "
    "and flags about 12 of every 100 normal images as malignant; a fine-tuned or other model has its own "
    "rates: measure them with `oncoflow evaluate`. The Malignant share counts the model's calls, "
    "not how many images show disease."
)


@dataclass
class ReportData:
    """The numbers behind the plots, each a list of tuples straight from DuckDB."""

    volumes: list[tuple[Any, ...]]  # (date, ok, errors)
    share: list[tuple[Any, ...]]  # (date, model_revision, malignant share among ok rows, ok rows)
    confidence: list[tuple[Any, ...]]  # (label, confidence) for ok rows of `latest`
    errors: list[tuple[Any, ...]]  # (category, rows)
    totals: dict[str, Any]


def gather(destination: str, storage: dict[str, Any] | None = None) -> ReportData:
    """Query the dataset through the deduplicating views (again if a compaction deletes a file meanwhile)."""
    return retry_while_compacting(lambda: _gather(destination, storage))


def _gather(destination: str, storage: dict[str, Any] | None) -> ReportData:
    db = connect(destination, storage)
    volumes = db.sql(
        "select date, count(*) filter (status = 'ok'), count(*) filter (status = 'error') "
        "from predictions group by date order by date"
    ).fetchall()
    share = db.sql(
        "select date, model_revision, avg((label = 'Malignant')::int), count(*) from predictions "
        "where status = 'ok' group by date, model_revision order by date, model_revision"
    ).fetchall()
    confidence = db.sql("select label, confidence from latest where status = 'ok'").fetchall()
    errors = db.sql(  # the images whose latest row is an error, as the totals count them
        "select split_part(error, ':', 1) as category, count(*) from latest where status = 'error' "
        "group by category order by count(*) desc, category"
    ).fetchall()
    images, ok, malignant, revisions = db.sql(
        "select count(*), count(*) filter (status = 'ok'), count(*) filter (label = 'Malignant'), "
        "count(distinct model_revision) from latest"
    ).fetchall()[0]
    # The Malignant share counts decisions: name the threshold(s) they were made at (as written, repr).
    thresholds = [
        row[0]
        for row in db.sql(
            "select distinct threshold from latest where status = 'ok' order by threshold"
        ).fetchall()
    ]
    totals = {
        "images (latest row each)": images,
        "classified ok": ok,
        "error rows (latest row each)": images - ok,
        "error share": f"{(images - ok) / images:.1%}" if images else "n/a",
        "Malignant": malignant,
        "Malignant share": f"{malignant / ok:.1%}" if ok else "n/a",
        "decision threshold(s) on prob_malignant": ", ".join(repr(float(t)) for t in thresholds) or "n/a",
        "rows in dataset": db.sql("select count(*) from predictions").fetchall()[0][0],
        "model revisions in latest": revisions,
    }
    return ReportData(volumes, share, confidence, errors, totals)


def confidence_histogram(data: ReportData) -> dict[str, np.ndarray]:
    """Images per CONFIDENCE_BINS bin, per label; every ok row of `latest` is in one bin (1.0 in the last)."""
    return {
        label: np.histogram([row[1] for row in data.confidence if row[0] == label], CONFIDENCE_BINS)[0]
        for label in ("Normal", "Malignant")
    }


def render_png(data: ReportData, title: str) -> bytes:
    """The four plots on one 2×2 figure, as PNG bytes."""
    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5), dpi=110)
    (volume_ax, share_ax), (confidence_ax, error_ax) = axes

    days = [str(row[0]) for row in data.volumes]
    ok = [row[1] for row in data.volumes]
    failed = [row[2] for row in data.volumes]
    volume_ax.bar(days, ok, color="#4c72b0", label="ok")
    volume_ax.bar(days, failed, bottom=ok, color="#dd8452", label="error")
    volume_ax.set_title("Rows written per day (an image classified again adds a row)")
    volume_ax.set_ylabel("rows")
    volume_ax.legend()
    volume_ax.tick_params(axis="x", rotation=30)

    for revision in sorted({row[1] for row in data.share}):
        points = [(str(row[0]), row[2] * 100) for row in data.share if row[1] == revision]
        share_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=revision)
    share_ax.set_title("Malignant share per day (ok rows), by model revision")
    share_ax.set_ylabel("% Malignant")
    share_ax.set_ylim(0, 100)
    if data.share:  # no ok row: nothing plotted, and an empty legend only warns
        share_ax.legend(fontsize=8)
    share_ax.tick_params(axis="x", rotation=30)

    colors = {"Normal": "#4c72b0", "Malignant": "#c44e52"}
    for label, images in confidence_histogram(data).items():
        confidence_ax.stairs(
            images,
            CONFIDENCE_BINS,
            fill=True,
            alpha=0.7,
            color=colors[label],
            label=f"{label} ({images.sum()})",
        )
    confidence_ax.set_title("Confidence of the latest prediction per image")
    confidence_ax.set_xlabel("confidence (probability of the decided class)")
    confidence_ax.set_ylabel("images")
    confidence_ax.legend()

    categories = [row[0] for row in data.errors] or ["(no errors)"]
    counts = [row[1] for row in data.errors] or [0]
    error_ax.barh(categories[::-1], counts[::-1], color="#dd8452")
    error_ax.set_title("Error rows by category (latest row per image)")
    error_ax.set_xlabel("rows")

    figure.suptitle(title, fontsize=14)
    # The PNG travels alone (a slide, a chat): it carries what the error rates mean, like the HTML page.
    notice = "\n".join(textwrap.wrap(f"{DISCLAIMER} {ERROR_RATES}", 190))
    figure.text(0.5, 0.005, notice, ha="center", va="bottom", fontsize=8.5, style="italic")
    figure.tight_layout(rect=(0, 0.07, 1, 0.96))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def render_html(data: ReportData, png: bytes, title: str) -> str:
    """A self-contained page: totals, the plots (embedded PNG) and the research-use statement."""
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in data.totals.items()
    )
    image = base64.b64encode(png).decode()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:2em}"
        ".note{background:#fff3cd;padding:.8em;border:1px solid #e0c36c}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='note'><strong>{html.escape(DISCLAIMER)}</strong> "
        f"{html.escape(ERROR_RATES)}</p>"
        f"<table>{rows}</table><img alt='oncoflow report plots' src='data:image/png;base64,{image}' "
        "style='max-width:100%'></body></html>"
    )


def write_report(destination: str, output: str, storage: dict[str, Any] | None = None) -> ReportData:
    """Render the report of DEST to OUTPUT (.html or .png; a local file or an s3:// key), atomically."""
    extension = os.path.splitext(output)[1].lower()
    if extension not in {".html", ".png"}:
        raise ValueError(f"--output {output!r} must end in .html or .png")
    data = gather(destination, storage)
    name = destination.rstrip("/").rsplit("/", 1)[-1] if "://" in destination else None
    title = f"oncoflow report: {name or os.path.basename(os.path.abspath(destination))}"
    png = render_png(data, title)
    content = png if extension == ".png" else render_html(data, png, title).encode()
    with staged_file(output, storage) as staged, open(staged, "wb") as handle:
        handle.write(content)
    return data
