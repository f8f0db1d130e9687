"""S3 sources and outputs against a real S3 server (moto's, on loopback): every mix with local folders,
incremental runs, a network that fails one request in four, fail-fast errors and secrets kept out."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import boto3
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import requests
import s3fs
from typer.testing import CliRunner

import tasks.inference
import tasks.storage
from flows.classify import classify
from flows.cli import app
from tasks.storage import open_location, storage_call, write_atomic
from tests.conftest import make_image
from tests.s3_fixtures import ACCESS_KEY, SECRET_KEY, FaultyProxy, free_port, upload_folder

pytestmark = pytest.mark.s3

VOLATILE = {"run_id", "processed_at"}
IMAGES = ["a.jpg", "b.PNG", "c.png", "sub/d.tif", "sub/deeper/e.jpeg", "sub/f.bmp"]


def read_rows(output: str, client: s3fs.S3FileSystem | None = None) -> list[dict]:
    """Every row of the dataset at `output` (local folder, or `s3://` through `client`)."""
    if client is None:
        return ds.dataset(output, format="parquet", partitioning="hive").to_table().to_pylist()
    path = output.removeprefix("s3://")
    return ds.dataset(path, filesystem=client, format="parquet", partitioning="hive").to_table().to_pylist()


def stable(rows: list[dict]) -> list[dict]:
    """Rows without the columns that differ between two runs of the same input, in a fixed order."""
    return sorted(
        ({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=lambda r: r["image_uri"]
    )


def run(source: str, output: str, model: str, **options) -> dict:
    return classify(source, output, model=model, device="cpu", shard_size=4, **options)


def test_s3_to_s3(image_folder: Path, s3: s3fs.S3FileSystem, tiny_model: str) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    summary = run("s3://scans/incoming", "s3://preds/out", tiny_model)

    assert summary["images_found"] == 6 and summary["images_classified"] == 6 and summary["errors"] == 0
    assert all(path.startswith("preds/out/model_slug=") for path in summary["output_files"])
    assert sorted(s3.find("preds")) == sorted(summary["output_files"]), "only the shard files, no probe left"
    rows = read_rows("s3://preds/out", s3)
    assert sorted(r["image_uri"] for r in rows) == [f"s3://scans/incoming/{name}" for name in sorted(IMAGES)]
    for row in rows:
        info = s3.info(row["image_uri"])
        etag = info["ETag"].strip('"')
        assert row["fingerprint"] == f"{etag}:{info['size']}"
        assert row["status"] == "ok" and row["label"] in {"Normal", "Malignant"}


def test_keys_with_query_like_text_are_read_as_the_objects_they_name(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    s3_server: str,
    tiny_model: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`?versionId=` is legal text in a key: the object it names is read, not a shorter key (a false
    `missing` row, final), also through the ranged probe that large files get first."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(
        Bucket="scans", Key="odd/scan?versionId=7.jpg", Body=(image_folder / "a.jpg").read_bytes()
    )
    client.put_object(Bucket="scans", Key="odd/b?versionId=8.png", Body=(image_folder / "c.png").read_bytes())
    client.put_object(Bucket="scans", Key="odd/scan", Body=b"another object")
    monkeypatch.setattr(tasks.inference, "PROBE_FROM_BYTES", 100)  # every file is probed, then read
    rows = {r["image_uri"]: r for r in read_rows_of(run("s3://scans/odd", "s3://preds/odd", tiny_model), s3)}
    assert sorted(rows) == ["s3://scans/odd/b?versionId=8.png", "s3://scans/odd/scan?versionId=7.jpg"]
    assert {r["status"] for r in rows.values()} == {"ok"}, [r["error"] for r in rows.values()]


def test_the_source_read_check_skips_archived_hidden_and_non_image_objects(
    image_folder: Path, s3: s3fs.S3FileSystem, s3_server: str, tiny_model: str
) -> None:
    """The one-byte read before the model loads probes an image the run could read: archived images
    first in key order (a lifecycle rule's Glacier) or a hidden file do not fail the run.

    An archived image gets no row (a restore keeps its ETag, so a final error row would keep it
    unclassified for good): the run counts it, and the run after its restore classifies it. A shard of
    archived images only writes no file."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket="scans", Key="incoming/.DS_Store", Body=b"finder")
    archived = [f"0-{year}.jpg" for year in range(2016, 2020)]  # the first shard of 4
    for name in archived:
        client.put_object(
            Bucket="scans",
            Key=f"incoming/{name}",
            Body=(image_folder / "a.jpg").read_bytes(),
            StorageClass=("GLACIER", "DEEP_ARCHIVE")[name.endswith("7.jpg")],
        )
    upload_folder(s3, image_folder, "scans/incoming")
    summary = run("s3://scans/incoming", "s3://preds/out", tiny_model)
    rows = {r["image_uri"].rsplit("/", 1)[-1]: r for r in read_rows_of(summary, s3)}
    assert len(rows) == len(IMAGES) and {r["status"] for r in rows.values()} == {"ok"}
    assert summary["images_archived"] == 4 and summary["images_classified"] == 6
    assert len(summary["output_files"]) == 2 and sorted(s3.find("preds")) == sorted(summary["output_files"])
    client.restore_object(Bucket="scans", Key="incoming/0-2019.jpg", RestoreRequest={"Days": 1})
    again = run("s3://scans/incoming", "s3://preds/out", tiny_model)
    assert again["images_new"] == 4 and again["images_archived"] == 3
    assert [(r["image_uri"], r["status"]) for r in read_rows_of(again, s3)] == [
        ("s3://scans/incoming/0-2019.jpg", "ok")
    ]


def test_an_s3_listing_counts_the_objects_that_are_not_images_by_extension(s3: s3fs.S3FileSystem) -> None:
    from collections import Counter

    from tasks.storage import list_images

    for key in ("a.jpg", "slide.svs", "exports/IM000001", "exports/notes.TXT", ".hidden/x.svs", "b.JPEG"):
        s3.pipe_file(f"scans/in/{key}", b"x")
    s3.pipe_file("scans/in/empty-folder/", b"")  # a folder marker, as consoles create them
    skipped: Counter[str] = Counter()
    listed = [f.uri for f in list_images(open_location("s3://scans/in"), skipped)]
    assert listed == ["s3://scans/in/a.jpg", "s3://scans/in/b.JPEG"]
    assert skipped == Counter({".svs": 1, "no extension": 1, ".txt": 1})


def test_dicom_objects_without_an_extension_are_found_by_their_marker_once(
    s3: s3fs.S3FileSystem, tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS's object store names DICOM objects by UID, without extension: they are read by their
    first kB (a ranged GET) until DEST has rows for them; DICOMDIR, reports and other objects are not
    listed. Shown on the second night with an object that is no DICOM any more: listed because known."""
    from collections import Counter

    from tasks.storage import list_images
    from tests import corpus

    data, uid = corpus.make_dicom(corpus.dicom_ramp()), corpus.DICOM_UID_NAME
    objects = {f"2026/11/29/{uid}": data, "2026/11/29/IM000002": data, "DICOMDIR": data, "README": b"x" * 300}
    objects |= {"2026/11/29/SR000001": corpus.dicom_report(data), "tiny": b"DICM"}
    for key, content in objects.items():
        s3.pipe_file(f"scans/pacs/{key}", content)
    s3.call_s3("put_object", Bucket="scans", Key="pacs/2025/IM000001", Body=data, StorageClass="GLACIER")
    skipped: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        listed = [f.uri for f in list_images(open_location("s3://scans/pacs"), skipped)]
    assert listed == ["s3://scans/pacs/2026/11/29/" + name for name in (uid, "IM000002")]
    assert skipped == Counter({"no extension": 2, "DICOM without images": 2})
    warning = " ".join(caplog.text.split())
    assert (
        "left 1 object(s) without an image extension unread: they are in an archive storage class" in warning
    )
    assert "s3://scans/pacs/2025/IM000001" in warning
    s3.rm_file("scans/pacs/2025/IM000001")

    summary = run("s3://scans/pacs", "s3://preds/pacs", tiny_model)
    assert summary["images_classified"] == 2 and summary["ok"] == 2
    s3.pipe_file("scans/pacs/2026/11/29/IM000002", b"replaced: no DICOM any more " * 20)  # new ETag
    s3.pipe_file("scans/pacs/2026/11/29/IM000003", data)
    key = f"pacs/2026/11/29/{uid}"  # classified, then moved to an archive class by a lifecycle rule
    s3.call_s3(
        "copy_object",
        Bucket="scans",
        Key=key,
        CopySource={"Bucket": "scans", "Key": key},
        StorageClass="GLACIER",
    )
    again = run("s3://scans/pacs", "s3://preds/pacs", tiny_model)
    assert (again["images_found"], again["images_new"]) == (3, 2)  # IM000002 by its rows, IM000003 read


def read_rows_of(summary: dict, client: s3fs.S3FileSystem) -> list[dict]:
    return [
        row for path in summary["output_files"] for row in pq.read_table(path, filesystem=client).to_pylist()
    ]


def test_an_object_replaced_after_listing_gets_the_etag_of_what_was_read(
    image_folder: Path, s3: s3fs.S3FileSystem, tiny_model: str
) -> None:
    """Its row describes the content classified, so the next run does not classify it a second time."""
    from tasks.inference import EngineOptions, classify_files
    from tasks.model import load_model
    from tasks.sink import select_new
    from tasks.storage import list_images

    upload_folder(s3, image_folder, "scans/incoming")
    location = open_location("s3://scans/incoming")
    listed = sorted(list_images(location), key=lambda file: file.uri)
    replacement = make_image(image_folder / "new.jpg", size=(80, 60), seed=42)
    s3.pipe_file(listed[0].path, replacement.read_bytes())  # a scanner rewrites it while the run is underway

    model = load_model(tiny_model, device="cpu", precision="fp32")
    rows = classify_files(listed, location.fs, model, EngineOptions(batch_size=4), "run", "shard")
    row = next(r for r in rows.to_pylist() if r["image_uri"] == listed[0].uri)
    info = s3.info(listed[0].path)
    assert row["fingerprint"] == f"{info['ETag'].strip(chr(34))}:{info['size']}" != listed[0].fingerprint
    assert row["image_width"] == 80 and row["status"] == "ok"
    assert select_new(list_images(location), rows) == []


def test_a_store_listing_without_etags_keeps_its_listed_fingerprint(
    image_folder: Path, s3: s3fs.S3FileSystem
) -> None:
    """Where the listing has no ETag (`size:mtime`), the read keeps that fingerprint: the next listing
    finds it again, so the object is not classified every night."""
    from dataclasses import replace

    from tasks.storage import list_images, read_file

    upload_folder(s3, image_folder, "scans/incoming")
    location = open_location("s3://scans/incoming")
    listed = sorted(list_images(location), key=lambda file: file.uri)[0]
    no_etag = replace(listed, fingerprint=f"{listed.size}:2026-11-27T00:00:00Z", etag_listed=False)
    data, read = read_file(no_etag, location.fs)
    assert len(data) == listed.size and read.fingerprint == no_etag.fingerprint
    assert read_file(listed, location.fs)[1].fingerprint == listed.fingerprint  # ETag listings: the GET's


def test_every_mix_of_local_and_s3_gives_the_same_predictions(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    tiny_model: str,
    tmp_path: Path,
) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    run(str(image_folder), str(tmp_path / "local"), tiny_model)
    run("s3://scans/incoming", str(tmp_path / "from-s3"), tiny_model)
    run(str(image_folder), "s3://preds/from-local", tiny_model)

    def predictions(rows: list[dict], root: str) -> dict[str, tuple]:
        return {
            r["image_uri"].removeprefix(root): (r["label"], r["prob_malignant"], r["image_width"])
            for r in rows
        }

    local = predictions(read_rows(str(tmp_path / "local")), f"file://{image_folder}/")
    assert sorted(local) == sorted(IMAGES)
    assert predictions(read_rows(str(tmp_path / "from-s3")), "s3://scans/incoming/") == local
    assert predictions(read_rows("s3://preds/from-local", s3), f"file://{image_folder}/") == local


def test_incremental_on_s3(
    image_folder: Path, s3: s3fs.S3FileSystem, tiny_model: str, tmp_path: Path
) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    run("s3://scans/incoming", "s3://preds/out", tiny_model)

    again = run("s3://scans/incoming", "s3://preds/out", tiny_model)
    assert again["images_found"] == 6 and again["images_classified"] == 0 and again["output_files"] == []

    for n in range(3):
        s3.pipe_file(
            f"scans/incoming/new/n{n}.jpg", make_image(tmp_path / f"n{n}.jpg", seed=100 + n).read_bytes()
        )
    s3.pipe_file("scans/incoming/a.jpg", make_image(tmp_path / "a2.jpg", (80, 80), seed=999).read_bytes())
    third = run("s3://scans/incoming", "s3://preds/out", tiny_model)
    assert third["images_found"] == 9 and third["images_classified"] == 4

    rows = read_rows("s3://preds/out", s3)
    assert len(rows) == 10 and len({(r["image_uri"], r["fingerprint"]) for r in rows}) == 10
    assert sum(r["image_uri"] == "s3://scans/incoming/a.jpg" for r in rows) == 2


def test_a_dry_run_on_s3_writes_no_object_and_needs_no_write_access(
    image_folder: Path, s3: s3fs.S3FileSystem, tiny_model: str
) -> None:
    """Not even the output's write check: a versioned bucket keeps every object version ever written."""
    upload_folder(s3, image_folder, "scans/incoming")
    s3.call_s3("put_bucket_versioning", Bucket="preds", VersioningConfiguration={"Status": "Enabled"})
    plan = run("s3://scans/incoming", "s3://preds/out", tiny_model, dry_run=True)
    assert (plan["images_found"], plan["images_new"], plan["images_changed"]) == (6, 6, 0)
    assert plan["output_exists"] is False and plan["output"] == "s3://preds/out"
    versions = s3.call_s3("list_object_versions", Bucket="preds")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers"), versions
    run("s3://scans/incoming", "s3://preds/out", tiny_model)
    s3.pipe_file("scans/incoming/a.jpg", b"another version")
    again = run("s3://scans/incoming", "s3://preds/out", tiny_model, dry_run=True)
    assert (again["images_new"], again["images_changed"], again["images_unchanged"]) == (1, 1, 5)
    assert again["output_exists"] is True


@pytest.mark.slow
def test_a_network_failing_one_request_in_four_gives_the_clean_output(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    s3_server: str,
    tiny_model: str,
) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    clean = run("s3://scans/incoming", "s3://preds/clean", tiny_model)
    with FaultyProxy(s3_server, every=4) as proxy:
        flaky = run("s3://scans/incoming", "s3://preds/flaky", tiny_model, s3_endpoint_url=proxy.url)
        again = run("s3://scans/incoming", "s3://preds/flaky", tiny_model, s3_endpoint_url=proxy.url)

    assert set(proxy.injected) == {"slowdown", "internal", "drop", "truncate"}, proxy.injected
    assert flaky["images_classified"] == clean["images_classified"] == 6 and flaky["errors"] == 0
    assert again["images_classified"] == 0, "the incremental index was read whole through the faults"
    assert stable(read_rows("s3://preds/flaky", s3)) == stable(read_rows("s3://preds/clean", s3))
    assert sorted(p.split("/", 2)[2] for p in s3.find("preds/flaky")) == sorted(
        p.split("/", 2)[2] for p in s3.find("preds/clean")
    )


def test_an_interrupted_upload_leaves_no_object(
    s3: s3fs.S3FileSystem,
    s3_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks.storage, "RETRY_ATTEMPTS", 1)  # fail quickly: every attempt is cut anyway
    with FaultyProxy(s3_server, every=1, faults=("cut_upload",)) as proxy:
        output = open_location(
            "s3://preds/out", {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        )
        with pytest.raises(ConnectionError, match="s3://preds/out/part-0.parquet"):
            write_atomic(output, "part-0.parquet", b"x" * 200_000)
    assert proxy.injected["cut_upload"] >= 1
    assert s3.find("preds") == []


def test_storage_call_retries_transient_errors_only(
    s3: s3fs.S3FileSystem, caplog: pytest.LogCaptureFixture
) -> None:
    fs = open_location("s3://scans").fs
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        assert storage_call(fs, "scans/x", flaky) == "done" and len(attempts) == 3
    retries = [r.getMessage() for r in caplog.records if r.name == "tasks.storage"]
    assert len(retries) == 2 and retries[0].startswith(
        "storage error on s3://scans/x (attempt 1 of 3), trying again in"
    )
    assert "s3://scans/x" in retries[0], "a stalled store shows in the log, naming what it was doing"

    def missing() -> None:
        attempts.append(1)
        raise FileNotFoundError("gone")

    attempts.clear()
    with pytest.raises(FileNotFoundError, match="s3://scans/x"):
        storage_call(fs, "scans/x", missing)
    assert len(attempts) == 1


@pytest.mark.parametrize(
    ("source", "output", "expected"),
    [
        ("s3://no-such-bucket/scans", "s3://preds/out", "s3://no-such-bucket/scans not found"),
        ("s3://scans/no-such-prefix", "s3://preds/out", "nothing under 's3://scans/no-such-prefix'"),
        ("s3://scans/incoming", "s3://no-such-bucket/out", "bucket 'no-such-bucket' .* was not found"),
    ],
)
def test_missing_bucket_or_prefix_fails_before_the_model_loads(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    source: str,
    output: str,
    expected: str,
) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    with pytest.raises(FileNotFoundError, match=expected) as raised:
        # A model that cannot load: reaching the storage error proves storage is checked first.
        classify(source, output, model="/no/such/model", device="cpu")
    assert "check the bucket" in str(raised.value) and "--s3-endpoint-url" in str(raised.value)
    assert s3.find("preds") == []


def test_an_endpoint_with_the_bucket_in_its_path_is_named_with_the_fix(
    image_folder: Path, s3: s3fs.S3FileSystem, s3_server: str
) -> None:
    """http://minio:9000/scans sends every request to /scans/BUCKET/...: the bucket is "not found"."""
    upload_folder(s3, image_folder, "scans/incoming")
    with pytest.raises(FileNotFoundError) as raised:
        classify(
            "s3://scans/incoming",
            "s3://preds/out",
            model="/no/such/model",
            device="cpu",
            s3_endpoint_url=f"{s3_server}/scans",
        )
    assert f"the S3 endpoint {s3_server}/scans (its path '/scans' comes before every bucket name" in str(
        raised.value
    )
    assert f"an endpoint is usually the server alone, {s3_server}, with the bucket in s3://" in str(
        raised.value
    )
    assert s3.find("preds") == []


def test_a_source_naming_one_object_says_so(image_folder: Path, s3: s3fs.S3FileSystem) -> None:
    """Not "the prefix holds no objects": the object exists, and its prefix is what to give."""
    upload_folder(s3, image_folder, "scans/incoming")
    with pytest.raises(FileNotFoundError) as raised:
        classify("s3://scans/incoming/a.jpg", "s3://preds/out", model="/no/such/model", device="cpu")
    assert str(raised.value) == (
        "'s3://scans/incoming/a.jpg' is one object, not a prefix; give the prefix that holds it "
        "(s3://scans/incoming)"
    )
    assert s3.find("preds") == []


def test_a_missing_bucket_is_named_by_the_commands_that_read_a_dataset(
    s3: s3fs.S3FileSystem, tmp_path: Path
) -> None:
    """A typo in the bucket is not reported as an empty dataset ("run classify first")."""
    labels = tmp_path / "labels.csv"
    labels.write_text("image_uri,label\ns3://scans/a.png,Normal\n")
    for args in (
        ["latest", "s3://no-such-bucket/out", "-o", str(tmp_path / "l.csv")],
        ["report", "s3://no-such-bucket/out", "-o", str(tmp_path / "r.html")],
        ["compact", "s3://no-such-bucket/out"],
        [
            "evaluate",
            "--predictions",
            "s3://no-such-bucket/out",
            "--labels",
            str(labels),
            "-o",
            str(tmp_path),
        ],
    ):
        result = CliRunner().invoke(app, args)
        text = " ".join(result.output.split())
        assert result.exit_code == 1, (args, text)
        assert (
            "bucket 'no-such-bucket' (of 's3://no-such-bucket/out') was not found at the S3 endpoint http"
            in text
        ), text
    result = CliRunner().invoke(app, ["latest", "s3://preds/out", "-o", str(tmp_path / "l.csv")])
    assert result.exit_code == 1 and "no Parquet files under 's3://preds/out'" in result.output


def test_access_denied_fails_before_the_model_loads(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    s3_server: str,
) -> None:
    from prefect_aws import AwsCredentials

    upload_folder(s3, image_folder, "scans/incoming")
    client = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    client.create_user(UserName="reader")
    read_only = {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}
    client.put_user_policy(
        UserName="reader",
        PolicyName="read-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [read_only]}),
    )
    key = client.create_access_key(UserName="reader")["AccessKey"]
    block = f"reader-{uuid.uuid4().hex[:8]}"
    AwsCredentials(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]).save(
        block
    )
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()

    with pytest.raises(PermissionError, match="access denied to s3://preds/out") as raised:
        classify("s3://scans/incoming", "s3://preds/out", model="/no/such/model", aws_credentials_block=block)
    assert "--aws-credentials-block" in str(raised.value)
    assert key["SecretAccessKey"] not in str(raised.value)

    # Listing without reading: not a run that writes a final read_failed row for every image.
    list_only = {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:PutObject"], "Resource": "*"}
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    client.put_user_policy(
        UserName="reader",
        PolicyName="read-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [list_only]}),
    )
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    with pytest.raises(PermissionError, match="access denied to s3://scans/incoming/") as raised:
        classify("s3://scans/incoming", "s3://preds/out", model="/no/such/model", aws_credentials_block=block)
    assert "s3:GetObject" in str(raised.value)
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    assert s3.find("preds") == []


@pytest.mark.slow
def test_a_wrong_endpoint_fails_fast_naming_it(image_folder: Path, s3: s3fs.S3FileSystem) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    wrong = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=f"cannot connect to the S3 endpoint {wrong}"):
        classify("s3://scans/incoming", "s3://preds/out", model="/no/such/model", s3_endpoint_url=wrong)


def test_https_to_a_plain_http_endpoint_fails_fast_naming_the_scheme(
    image_folder: Path, s3: s3fs.S3FileSystem, s3_server: str
) -> None:
    upload_folder(s3, image_folder, "scans/incoming")
    https = s3_server.replace("http://", "https://")
    with pytest.raises(ConnectionError, match="TLS handshake.*http:// for a server without TLS") as failure:
        classify("s3://scans/incoming", "s3://preds/out", model="/no/such/model", s3_endpoint_url=https)
    assert "transient" not in str(failure.value)


def test_cli_endpoint_option_and_block_keep_secrets_out(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    s3_server: str,
    tiny_model: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials

    upload_folder(s3, image_folder, "scans/incoming")
    # Only the block holds credentials and only the option names the endpoint.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    secret, token = f"secret-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    block = f"scans-{uuid.uuid4().hex[:8]}"
    AwsCredentials(aws_access_key_id="AKIATEST", aws_secret_access_key=secret, aws_session_token=token).save(
        block
    )

    caplog.set_level(logging.INFO)
    result = CliRunner().invoke(
        app,
        [
            "classify",
            "s3://scans/incoming",
            "--output",
            "s3://preds/out",
            "--model",
            tiny_model,
            "--device",
            "cpu",
        ]
        + ["--s3-endpoint-url", s3_server, "--aws-credentials-block", block],
    )
    assert result.exit_code == 0, result.output
    rows = read_rows("s3://preds/out", s3)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}

    # evaluate reads the same S3 output through the same two options (a deployment passes them too).
    labels = image_folder.parent / "labels.csv"
    labels.write_text(
        "image_uri,label\n"
        + "".join(f"{r['image_uri']},{'Normal' if i % 2 else 'Malignant'}\n" for i, r in enumerate(rows))
    )

    def evaluate_s3(report: str, endpoint: str):
        arguments = ["evaluate", "--predictions", "s3://preds/out", "--labels", str(labels), "-o", report]
        storage = ["--s3-endpoint-url", endpoint, "--aws-credentials-block", block]
        return CliRunner().invoke(app, arguments + storage)

    evaluated = evaluate_s3(str(image_folder.parent / "report"), s3_server)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((image_folder.parent / "report" / "metrics.json").read_text())
    assert metrics["images"]["evaluated"] == 6
    wrong = f"http://127.0.0.1:{free_port()}"
    unreachable = evaluate_s3(str(image_folder.parent / "r2"), wrong)
    text = " ".join(unreachable.output.split())
    assert unreachable.exit_code == 1 and f"cannot connect to the S3 endpoint {wrong}" in text, text
    assert "Traceback" not in unreachable.output

    run_id = rows[0]["run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(run_id))
        logs = client.read_logs()
        artifacts = client.read_artifacts()
    assert flow_run.parameters["aws_credentials_block"] == block
    parquet = b"".join(s3.cat_file(path) for path in s3.find("preds"))
    seen = {
        "cli output": result.output + evaluated.output + unreachable.output,
        "captured logs": caplog.text,
        "flow run parameters": json.dumps(flow_run.parameters, default=str),
        "prefect logs": " ".join(log.message for log in logs),
        "artifacts": " ".join(str(a.data) for a in artifacts),
        "parquet": parquet.decode("latin-1"),
    }
    for where, text in seen.items():
        assert secret not in text and token not in text, f"a secret leaked into the {where}"


def test_cli_rejects_a_malformed_endpoint(image_folder: Path, tmp_path: Path) -> None:
    for endpoint in ("minio:9000", "ftp://minio", "http://"):
        result = CliRunner().invoke(
            app,
            ["classify", str(image_folder), "--output", str(tmp_path / "out"), "--s3-endpoint-url", endpoint],
        )
        text = " ".join(result.output.split())
        assert result.exit_code == 2, text
        assert "invalid --s3-endpoint-url: must be an http:// or https:// URL with a host" in text, text
        assert "pattern" not in text


def test_a_block_naming_an_assumed_role_profile_lets_botocore_refresh_it(
    image_folder: Path,
    s3: s3fs.S3FileSystem,
    tiny_model: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_aws import AwsCredentials

    from flows.credentials import block_options

    (tmp_path / "no-aws-config").write_text(
        "[profile nightly]\nrole_arn = arn:aws:iam::123456789012:role/oncoflow-nightly\n"
        "source_profile = base\nrole_session_name = oncoflow\nregion = us-east-1\n"
    )
    (tmp_path / "no-aws-credentials").write_text(
        f"[base]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    block = f"role-{uuid.uuid4().hex[:8]}"
    AwsCredentials(profile_name="nightly").save(block)

    options = block_options(block)
    assert options["profile"] == "nightly" and "key" not in options and "token" not in options
    upload_folder(s3, image_folder, "scans/incoming")
    summary = classify(
        "s3://scans/incoming", "s3://preds/out", model=tiny_model, device="cpu", aws_credentials_block=block
    )
    assert summary["images_classified"] == summary["images_found"] > 0
