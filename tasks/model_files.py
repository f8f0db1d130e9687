"""A model's files and names, checked without loading it: the defaults, ModelError, the revision of a
local folder, its labels, and the checks `oncoflow` runs on --model before any work starts.

Standard library only (no torch, no transformers): the CLI imports this to check its arguments and to
show --help without importing torch (tasks.model, which loads and runs the model, imports from here).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

DEFAULT_MODEL = "Shivamnegi92/cancer-classification-vit"
DEFAULT_BASE_MODEL = "google/vit-base-patch16-224-in21k"  # what the default model was fine-tuned from
POSITIVE_LABEL = "Malignant"


class ModelError(Exception):
    """The model cannot be used as given; the message says why and how to fix it. Never retried."""


REVISION_FILES = ("config.json", "preprocessor_config.json")  # with the *.safetensors weights


def weights_revision(directory: str) -> str:
    """A stable identity for a local model: sha256 over everything that decides its outputs.

    The weights (*.safetensors), the model config and the preprocessing config: a new image mean,
    std or resize method changes the probabilities as much as new weights, so it is a new revision
    (its rows get their own partition, and every image is classified again)."""
    digest = hashlib.sha256()
    for name in model_files(directory):
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def share_model_files(folder: str) -> None:
    """Give the weights the permissions every other file of a saved model gets.

    safetensors writes its weights 0600 (owner only) while `config.json` gets the account's umask
    (usually 0644): a model trained by one account then fails to load for the account that runs the
    nightly flow. The config file's mode is the umask's answer, read without touching the process umask."""
    mode = os.stat(os.path.join(folder, "config.json")).st_mode & 0o777
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(path):
            os.chmod(path, mode)


def model_files(directory: str) -> list[str]:
    """The files a load needs and a revision hashes: the weights, the config, the processor config."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") or n in REVISION_FILES)


def unreadable_model_files(directory: str) -> list[str]:
    """The model_files this account cannot read."""
    return [
        n
        for n in model_files(directory)
        if not os.access(os.path.join(directory, n), os.R_OK, effective_ids=True)
    ]


SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit: a larger claim is not read into memory


def safetensors_damage(path: str) -> str | None:
    """Why a .safetensors file cannot be whole (cut short, or its header unreadable), from its header and
    size alone (a few kB read, not the weights); None when they agree. A file of the right size with
    damaged bytes inside is found only by the load (loading_weights)."""
    if not os.path.isfile(path):
        return "not a file"
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            return f"{size} bytes, shorter than a header"
        header_size = int.from_bytes(start, "little")
        if header_size > SAFETENSORS_MAX_HEADER:
            return f"its header claims {header_size} bytes; safetensors allows {SAFETENSORS_MAX_HEADER}"
        if header_size > size - 8:
            return f"its header claims {header_size} bytes, the file holds {size}"
        try:
            header = json.loads(handle.read(header_size))
            end = max(
                (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                default=0,
            )
        except (
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            return f"unreadable header: {str(exc)[:120] or type(exc).__name__}"
    if 8 + header_size + end > size:
        return f"cut short: {size} of {8 + header_size + end} bytes"
    return None


def check_model_name(name: str, classifier: bool = False) -> str | None:
    """The local folder `name` names (None for a hub id), or ModelError when it cannot load: a folder
    without .safetensors weights, without config.json or preprocessor_config.json (or with one that is
    not JSON), files this account cannot read, or a name that is neither a folder nor a hub id 'org/name'.
    `classifier`: its config.json must also name exactly the classes Normal and Malignant (a base model
    for train need not).

    Cheap (no hashing, no download, no weights read): the CLI runs it before Prefect starts (classify,
    reprocess, evaluate --data, train --base-model, serve) so a wrong --model exits 2 now, not at 02:00."""
    if os.path.isdir(os.path.expanduser(name)):
        directory = os.path.abspath(os.path.expanduser(name))
        try:
            names = os.listdir(directory)
        except OSError as exc:
            raise ModelError(
                f"model folder {directory!r} cannot be listed ({exc.strerror}); let this account read it"
            ) from exc
        if not any(n.endswith(".safetensors") for n in names):
            raise ModelError(
                f"model folder {directory!r} has no .safetensors weights; oncoflow never loads pickled "
                "weights. Re-save it with `model.save_pretrained(folder, safe_serialization=True)`"
            )
        missing = [n for n in REVISION_FILES if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ModelError(
                f"model folder {directory!r} has no {' and no '.join(missing)}; save the model and its image "
                "processor into it: `model.save_pretrained(folder)`, "
                "`AutoImageProcessor.from_pretrained(base).save_pretrained(folder)`"
            )
        unreadable = unreadable_model_files(directory)
        if unreadable:
            raise ModelError(
                f"model folder {directory!r}: this account cannot read {', '.join(unreadable)}; let it read "
                f"them (`chmod a+r {directory}/*`, or run as the account that saved the model)"
            )
        for file_name in REVISION_FILES:
            try:
                with open(os.path.join(directory, file_name)) as handle:
                    if not isinstance(content := json.load(handle), dict):
                        raise ValueError("not a JSON object")
            except ValueError as exc:
                raise ModelError(
                    f"model folder {directory!r}: {file_name} is not a valid configuration ({exc}); "
                    "save the model again with `save_pretrained`"
                ) from exc
            if classifier and file_name == "config.json":
                positive_class(model_labels(content, name), name)
        for file_name in sorted(n for n in names if n.endswith(".safetensors")):
            if damage := safetensors_damage(os.path.join(directory, file_name)):
                raise ModelError(
                    f"model {name!r}: its weights file {file_name} is damaged or incomplete ({damage}); save it "
                    "again (`save_pretrained`) or download it again"
                )
        return directory
    if os.path.isfile(os.path.expanduser(name)):
        raise ModelError(
            f"model {name!r} is a file; give the folder that holds the model's config.json and weights "
            f"(`save_pretrained` writes one), such as {os.path.dirname(name) or '.'!r}"
        )
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model {name!r} is neither an existing folder nor a hub id of the form 'org/name'; check the path"
        )
    return None


CANONICAL_LABELS = {label.lower(): label for label in ("Normal", POSITIVE_LABEL)}


def canonical_label(label: str) -> str:
    """`malignant`/`NORMAL` as the output contract spells them (`Malignant`/`Normal`), so the rows and
    every query on `label = 'Malignant'` agree whatever case the model's config used; others as given."""
    return CANONICAL_LABELS.get(label.strip().lower(), label)


def model_labels(config: dict[str, Any], name: str) -> dict[int, str]:
    """config.json's id2label as {class number: label}, labels spelled as the output contract does."""
    labels = config.get("id2label") or {}
    try:
        return {int(k): canonical_label(str(v)) for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelError(
            f"model {name!r}: id2label in config.json is not a map of class numbers to labels ({exc}); "
            "set config.id2label to {0: 'Normal', 1: 'Malignant'} when saving it"
        ) from exc


def positive_class(id2label: dict[int, str], name: str) -> int:
    """The class id whose label is `Malignant` (case-insensitive). A classifier has exactly two classes,
    Normal and Malignant: every row's `label` is one of them (queries and reports count
    `label = 'Normal'`), and `--threshold` on prob_malignant decides between the two. A model whose other
    class is `Benign`, or with a third class, would write labels the output contract does not have."""
    labels = sorted(id2label.values())
    fix = "set config.id2label to {0: 'Normal', 1: 'Malignant'} when saving it"
    positive = [class_id for class_id, label in id2label.items() if label.lower() == POSITIVE_LABEL.lower()]
    if not positive:
        raise ModelError(f"model {name!r} has labels {labels}, none of them {POSITIVE_LABEL!r}; {fix}")
    if len(id2label) != 2 or len(positive) != 1:
        raise ModelError(
            f"model {name!r} has {len(id2label)} classes {labels}; oncoflow classifies two, Normal and "
            f"Malignant (a threshold on prob_malignant decides between them): fine-tune a two-class model "
            f"(`oncoflow train`), or {fix}"
        )
    other = next(label for label in labels if label.lower() != POSITIVE_LABEL.lower())
    if other != "Normal":
        raise ModelError(
            f"model {name!r} has labels {labels}; every row is labelled Normal or Malignant (queries and "
            f"reports count label = 'Normal'): if {other!r} means not malignant, {fix}"
        )
    return positive[0]
