"""Ground truth: labels from a labels file (csv/parquet) or from class folders, keyed by image URI.

Labels are `Normal` = 0 and `Malignant` = 1 (the seed card's ids), written either way and in any case.
Image locations are compared as URIs, the form classify writes: a local path in a labels file becomes
`file:///abs/path`, a relative path being taken relative to the labels file's own folder (so a labels
file travels with its images); `s3://...` URIs are kept as they are, and `file://...` URIs are brought
to classify's spelling (percent-encoded or not: tasks.uris.canonical_file_uri).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from tasks.model_files import POSITIVE_LABEL
from tasks.storage import list_images, open_location
from tasks.uris import canonical_file_uri, full_file_uri, printable_path

NEGATIVE_LABEL = "Normal"
CLASS_NAMES = (NEGATIVE_LABEL, POSITIVE_LABEL)  # index = label id
_LABEL_IDS = {"normal": 0, "0": 0, "malignant": 1, "1": 1}


class LabelError(ValueError):
    """Labels that cannot be used as given; the message names the input and the fix."""


def label_id(value: object, where: str) -> int:
    """0 for Normal / 0, 1 for Malignant / 1 (case-insensitive); anything else is an error."""
    text = str(value).strip().lower()
    if text.endswith(".0"):  # 0/1 read from a float column
        text = text[:-2]
    if text not in _LABEL_IDS:
        raise LabelError(f"{where}: label {value!r} is not one of Normal, Malignant, 0, 1 (any case)")
    return _LABEL_IDS[text]


def to_image_uri(location: str, base_folder: str) -> str:
    """A URI comparable with classify's image_uri; relative paths are relative to base_folder.

    `file://` URIs may be percent-encoded or not (`Path.as_uri()` or classify's own spelling): both
    are brought to classify's spelling (tasks.uris.canonical_file_uri)."""
    location = full_file_uri(location)
    if location.lower().startswith("file://"):
        return canonical_file_uri(location)
    if "://" in location:
        scheme, rest = location.split("://", 1)
        # S3:// and s3a:// name what classify writes as s3://; a key's text is kept as given (a key may
        # hold a literal `%20`, so escapes are not decoded)
        return f"s3://{rest}" if scheme.lower() in {"s3", "s3a"} else location
    path = os.path.expanduser(location)
    return "file://" + printable_path(os.path.normpath(os.path.join(base_folder, path)))


def read_labels_file(path: str) -> pd.DataFrame:
    """`image_uri, label` from a .csv or .parquet file → DataFrame(image_uri, y_true)."""
    path = os.path.expanduser(path)  # `--labels=~/x.csv`: the shell leaves a `~` after `=` alone
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path!r} does not exist; check --labels")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except UnicodeDecodeError as exc:  # Excel's plain "CSV" is cp1252 or similar, not UTF-8
            raise LabelError(
                f"labels file {path!r} is not UTF-8 text (line {first_non_utf8_line(path)}); save it as "
                'UTF-8 CSV (in Excel: Save As, "CSV UTF-8")'
            ) from exc
        except pd.errors.EmptyDataError as exc:
            raise LabelError(
                f"labels file {path!r} is empty; it needs a header line `image_uri,label` and one line per image"
            ) from exc
        except pd.errors.ParserError as exc:  # e.g. "Expected 2 fields in line 22, saw 3"
            raise LabelError(
                f"labels file {path!r} is not a valid CSV file ({str(exc).strip()}); every line needs the "
                "header's number of fields: quote values that contain a comma"
            ) from exc
    elif extension in {".parquet", ".pq"}:
        try:
            frame = pd.read_parquet(path)
        except (pa.ArrowException, OSError) as exc:
            raise LabelError(f"labels file {path!r} is not a readable Parquet file ({exc})") from exc
    else:
        raise LabelError(f"labels file {path!r} must end in .csv or .parquet")
    # Headers as typed by hand: `Image_URI`, ` label ` are the same columns.
    frame.columns = [str(column).strip().lower() for column in frame.columns]
    missing = {"image_uri", "label"} - set(frame.columns)
    if missing:
        separated = next((s for s in (";", "\t") if len(frame.columns) == 1 and s in frame.columns[0]), None)
        how = {";": "semicolons", "\t": "tabs"}.get(separated or "")
        raise LabelError(
            f"labels file {path!r} lacks column(s) {sorted(missing)}; it needs `image_uri,label` "
            f"(found {list(frame.columns)})"
            + (f"; its columns are separated by {how}: save it with commas (Excel: CSV UTF-8)" if how else "")
        )
    if frame.empty:
        raise LabelError(f"labels file {path!r} holds no labels, only a header; add one line per image")
    if frame.columns.duplicated().any():
        raise LabelError(f"labels file {path!r} has two columns named alike: {list(frame.columns)}")
    base = os.path.dirname(os.path.abspath(path))
    # Spaces around a value ("a.png , Normal" typed by hand) are not part of it; label_id strips too.
    first = 2 if extension == ".csv" else 1  # a CSV's line 1 is its header; Parquet rows count from 1
    uris = [
        to_image_uri(image_location(u, f"{path} row {n + first}"), base)
        for n, u in enumerate(frame["image_uri"])
    ]
    labels = [label_id(v, f"{path} row {n + first}") for n, v in enumerate(frame["label"])]
    return deduplicated(pd.DataFrame({"image_uri": uris, "y_true": labels}), path)


def image_location(value: object, where: str) -> str:
    """A labels row's image_uri, stripped; an empty or missing one is an error (never the labels folder)."""
    text = "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()
    if not text:
        raise LabelError(f"{where}: image_uri is empty; give the image's path or URI, or remove the row")
    return text


def first_non_utf8_line(path: str) -> int:
    """The number of the first line that is not valid UTF-8 (a newline is never inside a character)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def deduplicated(labels: pd.DataFrame, source: str) -> pd.DataFrame:
    """One label per image; the same image labelled both ways is an error, repeats are harmless."""
    conflicting = labels.groupby("image_uri")["y_true"].nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise LabelError(
            f"{source}: {len(conflicting)} image(s) carry both labels, e.g. {conflicting.index[0]!r}; "
            "keep one label per image"
        )
    return labels.drop_duplicates("image_uri").reset_index(drop=True)


@dataclass(frozen=True)
class LabeledImage:
    uri: str
    path: str
    label: int


def labeled_folder(folder: str) -> list[LabeledImage]:
    """Images under folder/Normal/ and folder/Malignant/ (names in any case, searched recursively).

    Other sub-folders and loose files are not labelled; an image's class is its top-level folder.
    """
    root = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"labeled folder {folder!r} does not exist; check --data")
    class_ids = {c.lower(): i for i, c in enumerate(CLASS_NAMES)}
    classes = {name: class_ids[name.lower()] for name in os.listdir(root) if name.lower() in class_ids}
    if sorted(classes.values()) != [0, 1]:
        raise LabelError(
            f"labeled folder {folder!r} needs one sub-folder per class, Normal/ and Malignant/ "
            f"(any case); found {sorted(os.listdir(root))}"
        )
    images = []
    for name, class_id in sorted(classes.items()):
        for file in list_images(open_location(os.path.join(root, name))):
            images.append(LabeledImage(file.uri, file.path, class_id))
    return sorted(images, key=lambda image: image.uri)
