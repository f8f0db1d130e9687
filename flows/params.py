"""Validated parameters shared by the CLI and the flows: bad input fails here, before any work starts."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.defaults import (
    DEFAULT_MAX_PIXELS,
    ERROR_CATEGORIES,
    TARGET_ROWS,
    cuda_graphs_from_env,
    host_decode_share_from_env,
    lease_wait_from_env,
)
from tasks.erase_list import read_erase_list
from tasks.model_files import DEFAULT_BASE_MODEL, DEFAULT_MODEL
from tasks.redaction import has_credentials, redact
from tasks.uris import file_uri_path, full_file_uri

P = TypeVar("P", bound=BaseModel)


def _normalized(location: str) -> str:
    """Comparable form of a location: absolute local path, or the URI without a trailing slash."""
    with suppress(ValueError):  # a location the validators refuse is compared as written
        location = location_argument(location)
    if "://" not in location:
        return os.path.abspath(os.path.expanduser(location)).rstrip("/") + "/"
    return location.rstrip("/") + "/"


REMOTE_SCHEMES = ("s3", "s3a")
URI_WITHOUT_COLON = re.compile(r"(?i)(s3a?|file)//+")  # `s3//bucket/x`: would be a local folder `s3/`


def location_argument(value: str, local_only: bool = False) -> str:
    """A location argument in the one spelling the rest of oncoflow reads, or a ValueError saying why not.

    - a plain path: kept as given (`~` and relative paths are resolved where it is opened);
    - `file:///abs/path`, `file://localhost/abs/path` and `file:/abs/path` (RFC 8089; Java and Spark
      write the last): the local path, its %XX escapes decoded (`Path.as_uri()` writes a space as
      %20); a `file://` URI with another host, or with a relative path, is refused: mount the share
      and give its path;
    - `s3://bucket/prefix` (`S3://` and `s3a://` too): `s3://` plus the rest; it must name a bucket.
    A cloud filesystem fsspec has installed (gcsfs's gs://, adlfs's az://) or one the program
    registered itself is passed through (fsspec_scheme); any other scheme (http://, ftp://, zip://, ...)
    is refused, naming the ones that work. `local_only`: refuse every URI but file:// (the report
    folder of evaluate, the training data and model folders).
    """
    value = full_file_uri(value)
    if "://" not in value and (typo := URI_WITHOUT_COLON.match(value)):  # `s3//bucket/x`
        raise ValueError(
            f"{value!r} looks like a URI missing its colon; write {typo.group(1).lower()}://"
            f"{value[typo.end() :]} (for a local folder named {typo.group(1)!r}, write ./{value})"
        )
    if "://" not in value:
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme in REMOTE_SCHEMES or scheme == "file":  # `s3:/bucket`, `file:relative`: a typo
            rest = value.split(":", 1)[1].lstrip("/")
            meant = f"s3://{rest}" if scheme != "file" and rest else "s3://BUCKET/prefix"
            if scheme != "file" and rest and "/" not in rest.rstrip("/"):  # a bucket, or a key?
                meant += f" (a bucket) or s3://BUCKET/{rest}"
            raise ValueError(
                f"{value!r} is neither a path nor a URI; write "
                + ("file:///absolute/path" if scheme == "file" else meant)
            )
        return value
    scheme, rest = value.split("://", 1)
    if scheme.lower() == "file":
        path = file_uri_path(value)
        if path is None:
            raise ValueError(
                f"{value!r} is not a local file:// URI; write file:///absolute/path (or a plain path); "
                "for a network share, mount it and give its path"
            )
        return path
    if scheme.lower() in REMOTE_SCHEMES:
        if local_only:
            raise ValueError(f"{value!r} is on an object store; this must be a local folder or file")
        if not rest.split("/", 1)[0]:
            raise ValueError(f"{value!r} names no bucket; write s3://BUCKET/prefix")
        if "//" in rest.rstrip("/"):  # keys would start with "/" or hold an empty part: a typo
            raise ValueError(f"{value!r} has an empty part (`//`); write s3://{re.sub('/+', '/', rest)}")
        return f"s3://{rest}"
    if not local_only and fsspec_scheme(scheme):
        return value
    hint = ""
    if scheme.lower() in {"http", "https"} and not local_only:
        hint = "; for an S3-compatible server write s3://BUCKET/prefix and pass its URL as --s3-endpoint-url"
    raise ValueError(
        f"{value!r}: {scheme}:// is not supported; give a local path, a file:// URI"
        + ("" if local_only else " or s3://BUCKET/prefix")
        + hint
    )


CLOUD_SCHEMES = frozenset({"gs", "gcs", "az", "abfs", "abfss"})  # object stores, with their fsspec package


def fsspec_scheme(scheme: str) -> bool:
    """A cloud object store whose fsspec filesystem is installed here, or a filesystem the running
    program registered itself (`fsspec.register_implementation`): passed through to fsspec as is,
    untested by oncoflow. fsspec's other built-ins (http, ftp, zip, github, memory, ...) are not
    places a dataset can live and are refused."""
    from fsspec.registry import get_filesystem_class, known_implementations, registry

    if scheme in CLOUD_SCHEMES:
        try:
            get_filesystem_class(scheme)
        except (ValueError, ImportError):
            return False
        return True
    return scheme in registry and scheme not in known_implementations


def require_folder(location: str, name: str, fix: str = "check the path") -> None:
    """Fail unless a local path or file:// URI is an existing folder (object stores are checked later)."""
    if "://" in _normalized(location):
        return
    path = _normalized(location).rstrip("/") or "/"
    if os.path.isfile(path):
        raise ValueError(
            f"{name} {location!r} is a file, not a folder; give a folder, such as the one that holds it "
            f"({os.path.dirname(path)!r})"
        )
    if not os.path.isdir(path):
        raise ValueError(f"{name} {location!r} is not an existing folder; {fix}")


def require_apart(
    inputs: str, inputs_name: str, output: str, output_name: str = "output", kind: str = "folder"
) -> None:
    """Fail when the output lies inside the inputs or the other way round (a run would read its own
    output); `kind`: what the output is (a folder, or a file)."""
    a, b = _normalized(inputs), _normalized(output)
    if a == b:
        where = f"is the {inputs_name} itself"
    elif b.startswith(a):
        where = f"lies inside the {inputs_name} {inputs!r}"
    elif a.startswith(b):
        where = f"contains the {inputs_name} {inputs!r}"
    else:
        return
    apart = (
        f"outside the {inputs_name}"
        if kind == "file"
        else f"that neither lies inside the {inputs_name} nor contains it"
    )
    raise ValueError(
        f"{output_name} {output!r} {where}: a run would read its own output; choose an {output_name} {kind} {apart}"
    )


class StorageParams(BaseModel):
    """Where S3 endpoint and credentials come from, for every command that reads or writes a dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, SeaweedFS, Ceph), e.g. http://minio:9000; "
        "default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS",
    )
    aws_credentials_block: str | None = Field(
        None,
        min_length=1,
        description="Name of a prefect-aws AwsCredentials block; default: the standard AWS credential chain",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _an_http_endpoint_without_credentials(cls, value: str | None) -> str | None:
        if value is not None and not is_endpoint(value):
            raise ValueError(ENDPOINT_FORM)
        return refuse_credentials(value)

    @model_validator(mode="after")
    def _a_usable_endpoint_from_the_environment(self) -> StorageParams:
        uses_s3 = any(isinstance(v, str) and v.startswith("s3://") for v in self.__dict__.values())
        if uses_s3 and not self.s3_endpoint_url:
            check_endpoint_environment()
        return self


ENDPOINT_FORM = "must be an http:// or https:// URL with a host, e.g. http://minio:9000"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's order: the first set wins


def is_endpoint(value: str) -> bool:
    return re.match(r"^https?://[^/\s]+", value) is not None


def check_endpoint_environment() -> None:
    """Fail before any work when the endpoint variable that S3 access would use is malformed: botocore
    would otherwise fail on the first request, after Prefect has started, with a message naming no
    variable. Credentials in it are refused like in --s3-endpoint-url."""
    for variable in ENDPOINT_VARIABLES:
        value = os.environ.get(variable)
        if value:
            if not is_endpoint(value) or has_credentials(value):
                raise ValueError(
                    f"environment variable {variable} {ENDPOINT_FORM} and without credentials "
                    f"(they go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); fix or unset it"
                )
            return


def refuse_credentials(value: str | None) -> str | None:
    # Parameters are stored in run records and logs; credentials belong in the environment.
    if value and has_credentials(value):
        raise ValueError(
            "must not embed credentials, tokens or a signed query string; pass them through the "
            "environment (AWS_* variables, an AWS profile) instead"
        )
    return value


class ClassifyParams(StorageParams):
    """Everything one classify (or reprocess) run needs to know."""

    source: str = Field(min_length=1, description="Folder, file:// URI or s3://bucket/prefix to classify")
    output: str = Field(min_length=1, description="Output dataset folder or s3:// prefix (Hive Parquet)")
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hub id or local save_pretrained folder")
    revision: str | None = Field(None, description="Hub branch, tag or commit (hub models only)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="Images per forward pass; default 256 on a GPU, 32 on a CPU"
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Malignant iff prob_malignant >= threshold")
    shard_size: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Images per task and per output file; default 4000 when the model runs on a GPU, else 1000",
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images become too_large rows")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="cpu: exact PIL path; gpu: resize (+nvjpeg) on device; auto: gpu on a GPU (bilinear models)",
    )
    max_error_rate: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fail the run (after writing) when the share of error rows exceeds this",
    )
    exif_orientation: bool = Field(
        False, description="Rotate JPEGs per their EXIF tag (the reference does not)"
    )
    compile: bool = Field(
        False,
        description="Run the model through torch.compile: faster batches after a one-time compile "
        "(seconds to a minute per process); for large runs",
    )
    dry_run: bool = Field(
        False,
        description="Only count what a run would classify (new, changed, retried images) from the listing and "
        "the output's index: no model weights are loaded and nothing is written",
    )
    retry_errors: list[str] = Field(
        default_factory=list,
        description="Classify again the images whose newest row for this model is an error of these "
        "categories (or 'all'), e.g. ['unsupported'] after installing a decoder; error rows are final otherwise",
    )

    @field_validator("retry_errors", mode="before")
    @classmethod
    def _error_categories(cls, value: object) -> list[str]:
        """None, a list, or one comma-separated string ("unsupported,read_failed", "all")."""
        if value is None:
            return []
        names = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        names = [str(name).strip() for name in names if str(name).strip()]
        if "all" in names:
            return list(ERROR_CATEGORIES)
        unknown = sorted(set(names) - set(ERROR_CATEGORIES))
        if unknown:
            raise ValueError(
                f"unknown error categories {', '.join(unknown)}; give some of {', '.join(ERROR_CATEGORIES)}, "
                "comma-separated, or all"
            )
        return sorted(set(names))

    @field_validator("source", "output")
    @classmethod
    def _a_location(cls, value: str) -> str:
        return location_argument(refuse_credentials(value) or value)

    @model_validator(mode="after")
    def _check_locations(self) -> ClassifyParams:
        require_apart(self.source, "source", self.output)
        require_folder(self.source, "source")
        output = _normalized(self.output).rstrip("/")
        if "://" not in self.output and os.path.exists(output) and not os.path.isdir(output):
            raise ValueError(f"output {self.output!r} is a file; give a folder (it is created if missing)")
        if self.revision and os.path.isdir(os.path.expanduser(self.model)):
            raise ValueError(f"--revision applies to hub models only; model {self.model!r} is a local folder")
        host_decode_share_from_env()  # bad environment values fail here, before any work starts
        cuda_graphs_from_env()
        lease_wait_from_env()
        return self


def describe_validation_error(
    error: ValidationError, cli: bool = True, names: dict[str, str] | None = None
) -> str:
    """One line per problem, naming the CLI option (`--batch-size`), or the flow parameter
    (`batch_size`) with `cli=False`. Never the rejected value itself: it may hold credentials."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        arguments = {**CLI_ARGUMENTS, **(names or {})}
        name = (arguments.get(field) or f"--{field.replace('_', '-')}") if cli else f"parameter {field}"
        message = problem["msg"].removeprefix("Value error, ")
        # A problem of one field names it; one of the whole input (two options that clash) already
        # names what it concerns, as a sentence of its own.
        lines.append(f"invalid {name}: {message}" if field else message)
    return redact("\n".join(lines))


CLI_ARGUMENTS = {"source": "SOURCE", "dest": "DEST"}  # fields the CLI takes as positional arguments


def flow_params(factory: Callable[..., P], **values: Any) -> P:
    """A flow's validated parameters; a ValueError naming each bad parameter otherwise.

    Raised `from None`: pydantic's own error quotes the input values (a URI with a key in it), and a
    flow run's state message, stored by the Prefect API, is not a log record that redaction sees."""
    try:
        return factory(**values)
    except ValidationError as exc:
        message = describe_validation_error(exc, cli=False)
    raise ValueError(message) from None


DASK_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")


class RunnerParams(BaseModel):
    """Where shard tasks run: `local` threads, a Dask cluster or a Ray cluster (see flows/runners.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    runner: Literal["local", "dask", "ray"] = "local"
    dask_address: str | None = Field(None, description="Dask scheduler, e.g. tcp://10.0.0.5:8786")
    dask_workers: int | None = Field(
        None, ge=1, le=256, description="Workers of the LocalCluster started without address (default 1)"
    )
    ray_address: str | None = Field(None, description="Ray cluster, e.g. ray://10.0.0.5:10001")

    @model_validator(mode="after")
    def _check_runner(self) -> RunnerParams:
        if self.dask_address and self.runner != "dask":
            raise ValueError("--dask-address needs --runner dask")
        if self.dask_workers is not None and (self.runner != "dask" or self.dask_address):
            raise ValueError(
                "--dask-workers sizes the LocalCluster that --runner dask starts without --dask-address; "
                "a cluster given by address has its own workers: drop --dask-workers or --dask-address"
                if self.dask_address
                else "--dask-workers needs --runner dask (it sizes the LocalCluster started here)"
            )
        if self.ray_address and self.runner != "ray":
            raise ValueError("--ray-address needs --runner ray")
        if self.dask_address and not self.dask_address.startswith(DASK_SCHEMES):
            raise ValueError(
                f"--dask-address {self.dask_address!r} is not a scheduler address; "
                "use tcp://HOST:8786 (the address `dask scheduler` prints)"
            )
        if self.runner == "ray" and importlib.util.find_spec("prefect_ray") is None:
            raise ValueError(
                "--runner ray needs the optional Ray support: pip install 'oncoflow[ray]' (prefect-ray)"
            )
        return self


class DestParams(StorageParams):
    """An existing output dataset."""

    dest: str = Field(min_length=1, description="Output dataset folder written by `oncoflow classify`")

    @model_validator(mode="after")
    def _check_dest(self) -> DestParams:
        require_folder(self.dest, "dataset", "pass the --output of classify")
        return self

    @field_validator("dest")
    @classmethod
    def _a_location(cls, value: str) -> str:
        return location_argument(refuse_credentials(value) or value)


class DatasetParams(DestParams):
    """An existing output dataset to compact, summarize or export (`oncoflow compact|latest|report`)."""

    target_rows: int = Field(TARGET_ROWS, ge=2, le=100_000_000, description="Rows per compacted file")


class EraseParams(DestParams):
    """Which rows `oncoflow erase` removes from DEST: the images an erase list names, or those under a
    SOURCE that it no longer holds (tasks/erase.py)."""

    uris: str | None = Field(
        None,
        description="Local text file naming the images, one URI, path or folder/ prefix per line "
        "(or a CSV with an image_uri column)",
    )
    missing_from: str | None = Field(
        None, description="Erase the rows of images under this SOURCE that it no longer holds"
    )
    apply: bool = Field(False, description="Erase; without it, only count what would be erased")

    @field_validator("missing_from")
    @classmethod
    def _a_source(cls, value: str | None) -> str | None:
        return None if value is None else location_argument(refuse_credentials(value) or value)

    @field_validator("uris")
    @classmethod
    def _a_readable_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = location_argument(value, local_only=True)
        read_erase_list(path)  # its errors name the line and the fix
        return os.path.abspath(os.path.expanduser(path))

    @model_validator(mode="after")
    def _one_selection(self) -> EraseParams:
        if (self.uris is None) == (self.missing_from is None):
            raise ValueError("give either --uris FILE or --missing-from SOURCE (exactly one)")
        if self.missing_from is not None:
            require_folder(self.missing_from, "--missing-from", "give the SOURCE classify read")
            require_apart(self.missing_from, "--missing-from", self.dest, "DEST")
        return self


class EvaluateParams(StorageParams):
    """One evaluation: saved predictions (a folder or s3:// dataset) + a local labels file, or a labelled
    folder classified first."""

    output: str = Field(min_length=1, description="Report folder: metrics.json, report.md, plots")
    predictions: str | None = Field(None, description="A classify output dataset to evaluate")
    labels: str | None = Field(None, description="csv or parquet with image_uri,label (with predictions)")
    model_revision: str | None = Field(
        None, description="The revision (or model_slug) to pick from predictions"
    )
    data: str | None = Field(None, description="A folder with Normal/ and Malignant/ sub-folders to classify")
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hub id or local folder (with data)")
    revision: str | None = Field(None, description="Hub branch, tag or commit (with data, hub models only)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="Images per forward pass (with data); default 256 GPU, 32 CPU"
    )
    target_sensitivity: float | None = Field(
        None, gt=0.0, le=1.0, description="Also report the highest threshold reaching this sensitivity"
    )
    compile: bool = Field(
        False, description="Classify --data through torch.compile (to check that path's agreement)"
    )

    @field_validator("output", "predictions", "labels", "data")
    @classmethod
    def _a_location(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = refuse_credentials(value)  # the report folder, the labels file and --data are local
        return value and location_argument(value, local_only=info.field_name != "predictions")

    @model_validator(mode="after")
    def _check_inputs(self) -> EvaluateParams:
        if (self.predictions is None) == (self.data is None):
            raise ValueError("give either --predictions DEST with --labels FILE, or --data LABELED_DIR")
        if self.predictions is not None and not self.labels:
            raise ValueError("--predictions needs --labels FILE (csv or parquet with image_uri,label)")
        if self.predictions is not None:
            classify_only = {
                "--model": self.model != DEFAULT_MODEL,
                "--revision": self.revision is not None,
                "--device": self.device != "auto",
                "--precision": self.precision != "auto",
                "--batch-size": self.batch_size is not None,
                "--compile": self.compile,
            }
            if given := [option for option, set_here in classify_only.items() if set_here]:
                they = ("they classify", "go") if len(given) > 1 else ("it classifies", "goes")
                raise ValueError(
                    f"{', '.join(given)} {they[1]} with --data ({they[0]} it), not with --predictions, "
                    "whose rows are already classified; to pick one model's rows of DEST use --model-revision"
                )
            require_folder(
                self.predictions, "--predictions", "give the --output folder of `oncoflow classify`"
            )
            if not os.path.isfile(os.path.expanduser(self.labels or "")):
                raise ValueError(f"--labels {self.labels!r} is not an existing local file; check the path")
            require_apart(self.predictions, "predictions", self.output)
        output = _normalized(self.output).rstrip("/")
        if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
            raise ValueError(
                f"--output {self.output!r} is a file; give a folder for the report (it is created)"
            )
        if self.data is not None:
            if self.labels or self.model_revision:
                raise ValueError("--labels and --model-revision go with --predictions, not with --data")
            require_folder(self.data, "--data")
            require_apart(self.data, "data", self.output)
            if self.revision and os.path.isdir(os.path.expanduser(self.model)):
                raise ValueError(
                    f"--revision applies to hub models only; model {self.model!r} is a local folder"
                )
        return self


class TrainParams(BaseModel):
    """One fine-tuning run; the defaults are the seed model card's recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    data: str = Field(min_length=1, description="Folder with Normal/ and Malignant/ sub-folders of images")
    output: str = Field(min_length=1, description="New folder for the trained model (save_pretrained)")
    base_model: str = Field(DEFAULT_BASE_MODEL, min_length=1, description="Hub id or folder")
    epochs: int = Field(5, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    val_split: float = Field(0.15, gt=0.0, lt=1.0, description="Share of each class held out for validation")
    seed: int = Field(42, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(0, ge=0, le=64, description="DataLoader processes decoding images")

    @field_validator("data", "output")
    @classmethod
    def _a_local_folder(cls, value: str) -> str:
        return location_argument(value, local_only=True)

    @model_validator(mode="after")
    def _check_folders(self) -> TrainParams:
        require_folder(self.data, "--data")
        require_apart(self.data, "--data", self.output, "--output")
        output = os.path.expanduser(self.output)
        if os.path.exists(output) and not os.path.isdir(output):
            raise ValueError(f"--output {self.output!r} is a file; give a new folder for the model")
        if os.path.isdir(output) and os.listdir(output):
            raise ValueError(f"--output {self.output!r} exists and is not empty; choose a new folder")
        return self
