"""Security: no pickles, no remote code, no secrets in rows or logs, no writes outside DEST."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pickle
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.classify import classify
from flows.cli import app
from tasks.inference import EngineOptions, classify_files
from tasks.model import ModelError, load_model
from tasks.redaction import has_credentials, redact, strip_query
from tasks.sink import SCHEMA, model_slug, shard_path, write_shard
from tasks.storage import DiscoveredFile, open_location, to_uri
from tests import corpus

ROOT = Path(__file__).resolve().parent.parent
SECRET = "SIGSECRET0123456789"


class Booby:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_beside_safetensors_are_never_loaded(tmp_path: Path, tiny_model: str) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    marker = tmp_path / "pickle-was-executed"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Booby(str(marker))))
    model = load_model(str(folder), device="cpu", precision="fp32")
    assert model.id2label == {0: "Normal", 1: "Malignant"}
    assert not marker.exists()


def test_remote_code_in_a_model_folder_is_never_run(tmp_path: Path, tiny_model: str) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    marker = tmp_path / "remote-code-was-executed"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForImageClassification": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(ModelError):  # refusing the folder is as good as ignoring its code
        load_model(str(folder), device="cpu", precision="fp32")
    assert not marker.exists()


def test_the_code_never_unpickles_or_trusts_remote_code() -> None:
    sources = [p for folder in ("tasks", "flows") for p in (ROOT / folder).glob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
    assert "use_safetensors=True" in (ROOT / "tasks" / "model.py").read_text()


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (
            f"403 for https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature={SECRET}",
            "https://bucket.s3.amazonaws.com/a.jpg",
            [SECRET, "AKIAIOSFODNN7EXAMPLE"],
        ),
        (f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/key", "bucket/key", [SECRET, "AKIAIOSFODNN7EXAMPLE"]),
        (f"failed: aws_secret_access_key={SECRET} token: {SECRET}", "failed:", [SECRET]),
        (f"Authorization: {SECRET}", "Authorization", [SECRET]),
        ("file:///data/scan?1.png is fine", "file:///data/scan?1.png is fine", []),
    ],
)
def test_redact(text: str, kept: str, gone: list[str]) -> None:
    cleaned = redact(text)
    assert kept in cleaned
    for secret in gone:
        assert secret not in cleaned


def test_strip_query_and_has_credentials() -> None:
    assert strip_query(f"https://u:p@host/a/b.png?sig={SECRET}#x") == "https://host/a/b.png"
    assert strip_query("s3://bucket/odd?name.png") == "s3://bucket/odd?name.png"
    assert has_credentials(f"s3://key:{SECRET}@bucket/x") and has_credentials(
        f"https://h/x?X-Amz-Signature={SECRET}"
    )
    assert not has_credentials("s3://bucket/prefix") and not has_credentials("/data/scans")


class SignedUrlHandler(http.server.BaseHTTPRequestHandler):
    """Serves images behind "signed" URLs: one works, one fails on download (HTTP 500), one is gone."""

    image = corpus.encode(corpus.random_rgb((20, 20), 1), "PNG")

    def status(self) -> int:
        known = {"/ok.png": 200, "/broken.png": 500 if self.command == "GET" else 200}
        return known.get(self.path.split("?", 1)[0], 404)

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status())
        self.send_header("Content-Length", str(len(self.image) if self.status() == 200 else 0))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.do_HEAD()
        if self.status() == 200:
            self.wfile.write(self.image)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def signed_url_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SignedUrlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_signed_url_secrets_never_reach_rows_or_logs(
    signed_url_server: str,
    tiny_model: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from fsspec.implementations.http import HTTPFileSystem

    fs = HTTPFileSystem()
    query = (
        f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature={SECRET}"
    )
    urls = {name: f"{signed_url_server}/{name}{query}" for name in ("ok.png", "gone.png", "broken.png")}
    files = {name: DiscoveredFile(to_uri(fs, url), url, "v1", 0) for name, url in urls.items()}
    model = load_model(tiny_model, device="cpu", precision="fp32")
    gone: Counter[str] = Counter()
    with caplog.at_level("DEBUG"):
        table = classify_files(
            [files["ok.png"], files["gone.png"]], fs, model, EngineOptions(), "r", "s", gone
        )
        with pytest.raises(ConnectionError) as outage:  # HTTP 500 after retries: the shard fails
            classify_files([files["broken.png"]], fs, model, EngineOptions(), "r", "s")
    rows = table.to_pylist()

    assert [r["status"] for r in rows] == ["ok"] and gone == {"vanished": 1}  # a 404: no row this run
    assert [r["image_uri"] for r in rows] == [f"{signed_url_server}/ok.png"]
    assert f"{signed_url_server}/broken.png" in str(outage.value)
    text = repr(rows) + str(outage.value) + caplog.text + "".join(capfd.readouterr())
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("-o", f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/preds"),
        ("--s3-endpoint-url", f"http://AKIAIOSFODNN7EXAMPLE:{SECRET}@minio:9000"),
    ],
)
def test_credentials_in_locations_are_refused_without_echoing_them(
    image_folder: Path, option: str, value: str
) -> None:
    arguments = ["classify", str(image_folder), option, value]
    if option != "-o":
        arguments += ["-o", str(image_folder.parent / "preds")]
    result = CliRunner().invoke(app, arguments)
    expected = "--output" if option == "-o" else option
    assert result.exit_code == 2 and expected in result.output and "environment" in result.output
    assert SECRET not in result.output and "AKIAIOSFODNN7EXAMPLE" not in result.output


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=0, max_size=40), revision=st.text(max_size=40))
def test_model_slug_is_one_safe_path_component(name: str, revision: str) -> None:
    slug = model_slug(name, revision)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", slug) and not slug.startswith(".") and "/" not in slug


@pytest.mark.parametrize(
    "name", ["../../../etc/evil", "/abs/path/", "..", "a/..", "C:\\\\x\\\\..", "\x00\n/"]
)
def test_hostile_model_names_write_inside_dest(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    relative = shard_path(model_slug(name, "sha256:../../x"), datetime.now(UTC), "0123abcd")
    written = write_shard(open_location(str(dest)), relative, pa.table({n: [] for n in SCHEMA.names}, SCHEMA))
    assert Path(written).resolve().is_relative_to(dest.resolve())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [Path(written)]


@pytest.mark.slow
def test_odd_file_names_stay_rows_and_never_paths(tmp_path: Path, tiny_model: str) -> None:
    source = tmp_path / "scans"
    png = corpus.encode(corpus.random_rgb((16, 16), 2), "PNG")
    names = [
        "we ird.png",
        "new\nline.png",
        "ünïcödé.png",
        "%2e%2e%2fescape.png",
        "back\\slash.png",
        "a..b.png",
    ]
    corpus.write_files(source, dict.fromkeys(names, png))
    with open(os.fsencode(source) + b"/bad\xff\xfe.png", "wb") as handle:  # not UTF-8
        handle.write(png)
    output = tmp_path / "out"
    summary = classify(str(source), str(output), model=tiny_model, device="cpu")

    assert summary["images_classified"] == 7 and summary["errors"] == 0
    rows = ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()
    uris = sorted(r["image_uri"].rsplit("/", 1)[-1] for r in rows)
    assert uris == sorted([*(n.replace("%", "%25") for n in names), "bad%FF%FE.png"])
    # A file literally named like the escaped one is another image, with another URI, classified too.
    (source / "bad%FF%FE.png").write_bytes(png)
    again = classify(str(source), str(output), model=tiny_model, device="cpu")
    assert again["images_found"] == 8 and again["images_classified"] == 1
    rows = ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len({r["image_uri"] for r in rows}) == 8
    assert {unquote_to_bytes(r["image_uri"].removeprefix("file://")) for r in rows} == {
        os.fsencode(path) for path in source.iterdir()
    }
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(source)]
    assert written and all(
        p.is_relative_to(output) and (p.name.startswith("part-") or p.parent.name == "_leases")
        for p in written
    )


@pytest.mark.parametrize("option", ["--labels", "--predictions", "--output"])
def test_evaluate_refuses_credentials_without_echoing_them(tmp_path: Path, option: str) -> None:
    signed = f"https://user:{SECRET}@host/labels.csv?X-Amz-Signature={SECRET}"
    values = {
        "--labels": str(tmp_path / "l.csv"),
        "--predictions": str(tmp_path / "p"),
        "--output": str(tmp_path / "r"),
    }
    values[option] = signed
    arguments = ["evaluate", *(part for item in values.items() for part in item)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and option in result.output and "environment" in result.output
    assert SECRET not in result.output
