"""The reprocess flow: classify a whole archive (or one sub-folder of it) with a given model.

Rows of other models stay untouched (each model revision has its own partition and its own incremental
index), and an interrupted reprocess resumes where it stopped: re-running it classifies only what this
model revision has not written yet. It is the classify flow's own code path, under its own flow name so
the history tells nightly runs and reprocessing apart.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect import flow

from flows.classify import classify_images
from flows.params import ClassifyParams, flow_params, location_argument
from flows.runners import local_task_runner
from tasks.defaults import DEFAULT_MAX_PIXELS
from tasks.redaction import has_credentials


def within(source: str, prefix: str) -> str:
    """SOURCE narrowed to the sub-folder `prefix` (relative to SOURCE); SOURCE itself when empty. A full
    path or URI inside SOURCE is taken as the part below SOURCE."""
    given = prefix
    if is_full_location(source, prefix):
        prefix = below(source, prefix)
    prefix = prefix.strip("/")
    if ".." in prefix.split("/"):
        raise ValueError(f"--prefix {given!r} must stay inside SOURCE: give a sub-folder path without '..'")
    if not prefix:
        return source
    if not has_credentials(source):  # refused by ClassifyParams, without echoing them
        try:
            source = location_argument(source)  # a malformed SOURCE is named as given, not joined
        except ValueError as exc:
            raise ValueError(f"invalid SOURCE: {exc}") from None
    narrowed = f"{source.rstrip('/')}/{prefix}"
    return narrowed if "://" in source else real_sub_folder(source, narrowed)


def is_full_location(source: str, prefix: str) -> bool:
    """A URI (`s3://…`, `file:…`), or for a local SOURCE an absolute path (`/…`, `~/…`); `/2023` on an
    S3 SOURCE and a folder named `~backup` stay relative to SOURCE."""
    if "://" in prefix or prefix.startswith("file:"):
        return True
    local = "://" not in source or source.startswith("file:")
    return local and (prefix.startswith("/") or prefix == "~" or prefix.startswith("~/"))


def below(source: str, path: str) -> str:
    """`path` (a full path or URI) relative to SOURCE; a ValueError when it is not inside SOURCE. Both are
    spelled as the CLI reads locations first (`file:` URIs as paths, `s3a://` and `S3://` as `s3://`);
    local paths compare as written, then with links resolved."""
    try:
        base, full = (location_argument(location) for location in (source, path))
    except ValueError as exc:
        raise ValueError(f"invalid --prefix {path!r}: {exc}") from None
    if "://" in base or "://" in full:
        pairs = [(base.rstrip("/"), full.rstrip("/"))]
    else:
        base, full = (os.path.abspath(os.path.expanduser(location)) for location in (base, full))
        pairs = [(base, full), (os.path.realpath(base), os.path.realpath(full))]
    for root, inside in pairs:
        root, inside = root.rstrip("/"), inside.rstrip("/")
        if inside == root:
            return ""
        if inside.startswith(root + "/"):
            return inside[len(root) + 1 :]
    raise ValueError(
        f"--prefix {path!r} is not inside SOURCE {source!r}; give a sub-folder of SOURCE, relative to "
        "it (e.g. 2023/ward-4) or as a full path inside it"
    )


def real_sub_folder(source: str, narrowed: str) -> str:
    """`narrowed` spelled through SOURCE's real folders when links inside SOURCE lead there (`--prefix
    latest` a link to `2026/11`): classify gives those images their real paths as URIs, so the prefix
    must too, or its images would be classified again under new URIs. A prefix leading outside SOURCE
    is kept: classify reaches such folders through their links as well."""
    root = os.path.realpath(os.path.expanduser(source))
    real = os.path.realpath(os.path.expanduser(narrowed))
    if real == root:
        return source
    if not real.startswith(root.rstrip("/") + "/"):
        return narrowed
    return os.path.join(source.rstrip("/"), os.path.relpath(real, root))


@flow(
    name="reprocess",
    task_runner=local_task_runner(),
    log_prints=True,
)
def reprocess(
    source: str,
    output: str,
    model: str,
    prefix: str = "",
    revision: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    batch_size: int | None = None,
    threshold: float = 0.5,
    shard_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: Literal["auto", "cpu", "gpu"] = "auto",
    s3_endpoint_url: str | None = None,
    aws_credentials_block: str | None = None,
    max_error_rate: float | None = None,
    exif_orientation: bool = False,
    compile: bool = False,
    retry_errors: list[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Classify every image under SOURCE (or SOURCE/PREFIX) with MODEL, resuming an interrupted run."""
    values = {k: v for k, v in locals().items() if k != "prefix"}
    return classify_images(flow_params(ClassifyParams, **{**values, "source": within(source, prefix)}))
