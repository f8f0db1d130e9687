"""The `oncoflow` CLI: bad arguments fail before any work, with a message naming the input and the fix."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import make_image

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--threshold", "1.5"], "--threshold"),
        (["--threshold", "nan"], "--threshold: Input should be a finite number"),
        (["--max-error-rate", "nan"], "--max-error-rate: Input should be a finite number"),
        (["--batch-size", "0"], "--batch-size"),
        (["--shard-size", "-3"], "--shard-size"),
        (["--precision", "int4"], "--precision"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_fail_before_any_work(image_folder: Path, tmp_path: Path, args, expected) -> None:
    output = tmp_path / "preds"
    result = invoke("classify", str(image_folder), "--output", str(output), *args)
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
    assert not output.exists()


def test_arguments_this_machine_cannot_honour_fail_before_any_work(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """Checked before Prefect starts or the model loads: exit 2 and the option to change."""
    import torch

    output = tmp_path / "preds"
    cases = [
        (["--device", "cpu", "--precision", "fp16"], "--precision fp16 is not supported on CPU"),
        (["--revision", "main"], "--revision applies to hub models only"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU is visible"))
    for args, expected in cases:
        result = invoke("classify", str(image_folder), "-o", str(output), "--model", tiny_model, *args)
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), (args, result.output)
        assert not output.exists()
    output.write_text("not a folder")
    result = invoke("classify", str(image_folder), "-o", str(output), "--model", tiny_model)
    assert result.exit_code == 2 and "is a file; give a folder" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ONCOFLOW_HOST_DECODE_SHARE", "half", "from 0 to 1"),
        ("ONCOFLOW_HOST_DECODE_SHARE", "1.5", "from 0 to 1"),
        ("ONCOFLOW_HOST_DECODE_SHARE", "-0.1", "from 0 to 1"),
        ("ONCOFLOW_CUDA_GRAPHS", "maybe", "is not 1 or 0"),
        ("ONCOFLOW_LEASE_WAIT_SECONDS", "1h", "number of seconds"),
        ("ONCOFLOW_LEASE_WAIT_SECONDS", "-5", "number of seconds"),
        ("ONCOFLOW_LEASE_WAIT_SECONDS", "inf", "number of seconds"),
    ],
)
def test_bad_environment_values_fail_before_any_work(
    image_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    output = tmp_path / "preds"
    result = invoke("classify", str(image_folder), "--output", str(output))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{variable}={value!r}" in text and expected in text
    assert not output.exists()


def test_host_decode_share_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.defaults import host_decode_share_from_env

    for value, share in [("auto", None), (" Auto ", None), ("", 0.0), ("0", 0.0), ("0.25", 0.25), ("1", 1.0)]:
        monkeypatch.setenv("ONCOFLOW_HOST_DECODE_SHARE", value)
        assert host_decode_share_from_env() == share
    monkeypatch.delenv("ONCOFLOW_HOST_DECODE_SHARE")
    assert host_decode_share_from_env() == 0.0  # nvjpeg decodes every JPEG unless asked otherwise


def test_cuda_graphs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.defaults import cuda_graphs_from_env

    for value, wanted in [
        ("1", True),
        (" On ", True),
        ("yes", True),
        ("", False),
        ("0", False),
        ("off", False),
    ]:
        monkeypatch.setenv("ONCOFLOW_CUDA_GRAPHS", value)
        assert cuda_graphs_from_env() is wanted
    monkeypatch.delenv("ONCOFLOW_CUDA_GRAPHS")
    assert cuda_graphs_from_env() is False


def test_missing_source(tmp_path: Path) -> None:
    result = invoke("classify", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "not an existing folder" in text and "nope" in text and "invalid" not in text


def test_output_inside_source(image_folder: Path) -> None:
    result = invoke("classify", str(image_folder), "--output", str(image_folder / "preds"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "lies inside the source" in text and not (image_folder / "preds").exists()


def test_output_containing_the_source_is_named_as_such(image_folder: Path) -> None:
    """Not "choose an output outside the source": it already is; it holds the source."""
    result = invoke("classify", str(image_folder), "--output", str(image_folder.parent))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"contains the source {str(image_folder)!r}" in text, text
    assert "neither lies inside the source nor contains it" in text


def test_offline_hub_id_says_how_to_use_a_local_folder(image_folder: Path, tmp_path: Path) -> None:
    result = invoke(
        "classify", str(image_folder), "--output", str(tmp_path / "out"), "--model", "someorg/some-vit"
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "someorg/some-vit" in text and "Hugging Face Hub" in text and "local folder" in text
    assert f"no folder '{os.path.abspath('someorg/some-vit')}'" in text  # a mistyped path shows as such
    assert not (tmp_path / "out").exists()


def test_a_model_file_instead_of_its_folder_names_the_folder(image_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "vit" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"\0" * 16)
    result = invoke("classify", str(image_folder), "--output", str(tmp_path / "out"), "--model", str(weights))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"model {str(weights)!r} is a file" in text, text
    assert f"such as {str(weights.parent)!r}" in text and not (tmp_path / "out").exists()


def test_model_folder_without_safetensors_is_refused(image_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    result = invoke("classify", str(image_folder), "--output", str(tmp_path / "out"), "--model", str(folder))
    assert result.exit_code == 2 and "invalid --model" in result.output and "safetensors" in result.output
    assert not (tmp_path / "out").exists()


def test_arguments_fail_before_any_work_with_a_message_that_reads(image_folder: Path, tmp_path: Path) -> None:
    """A mistyped model path, a missing --prefix sub-folder and a --limit below 1 exit 2 before any
    work; a problem of one option names it (SOURCE for the positional argument), and one of two options
    together reads as a sentence."""
    output = str(tmp_path / "out")
    cases = [
        (["classify", str(image_folder), "-o", output, "--model", "./no-such-model"], "invalid --model"),
        (["reprocess", str(image_folder), "-o", output, "--model", "./no-such-model"], "invalid --model"),
        (
            ["reprocess", str(image_folder), "-o", output, "--model", "org/new-vit", "--prefix", "2023/x"],
            "invalid --prefix '2023/x': SOURCE has no such sub-folder",
        ),
        (["classify", "s3://bucket/x?X-Amz-Signature=abc", "-o", output], "invalid SOURCE: must not embed"),
        (["classify", str(image_folder), "-o", output, "--ray-address", "ray://h:1"], "error: --ray-address"),
        (["serve", "--source", str(image_folder), "-o", output, "--limit", "0"], "--limit"),
        (
            ["classify", str(image_folder / "a.jpg"), "-o", output],
            f"is a file, not a folder; give a folder, such as the one that holds it ('{image_folder}')",
        ),
    ]
    for args, expected in cases:
        result = invoke(*args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in text, (args, text)
        assert "invalid invalid" not in text and "invalid --ray-address" not in text
        assert not (tmp_path / "out").exists()


def test_an_error_naming_a_long_path_prints_it_whole(tmp_path: Path) -> None:
    """A path longer than the terminal is one unbroken line to copy, not folded at column 80 with a
    newline inside it (the terminal wraps it for display)."""
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "scans"
    deep.parent.mkdir(parents=True)
    result = invoke("classify", str(deep), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and len(str(deep)) > 80
    assert str(deep) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_python_m_flows_cli_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "classify" in done.stdout


def test_the_terminal_filter_never_fails_the_code_that_logged() -> None:
    """A library's malformed log call (more placeholders than arguments) is the handler's to report,
    as without the filter; the filter must not raise it into the task that logged."""
    import logging

    from flows.cli import OneLineExpectedErrors

    quiet = OneLineExpectedErrors((ValueError,))
    record = logging.LogRecord("lib", logging.ERROR, __file__, 1, "bad %s %s", ("only-one",), None)
    assert quiet.filter(record) is True
    stopped = logging.LogRecord(
        "prefect.task_runs",
        logging.ERROR,
        __file__,
        1,
        "Finished in state Failed('Task run encountered an exception ShardStopped: run r was stopped: "
        "shard s wrote no rows')",
        (),
        None,
    )
    assert quiet.filter(stopped) is True
    assert (stopped.levelname, stopped.getMessage()) == (
        "INFO",
        "ended by the stop: run r was stopped: shard s wrote no rows",
    )


HEAVY_MODULES = ("torch", "transformers", "pyarrow", "s3fs", "botocore", "prefect", "PIL", "numpy")
LOADED_AFTER = """
import sys
from typer.testing import CliRunner
from flows.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = [m for m in {heavy!r} if m in sys.modules]
print(result.exit_code, ",".join(heavy) or "-")
print(result.output)
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        (["classify", "--help"], 0),
        (["classify", "SRC", "-o", "OUT", "--threshold", "1.5"], 2),
        (["classify", "SRC", "-o", "OUT", "--model", "MODEL"], 2),
        (["report", "OUT"], 2),
        (["erase", "SRC", "--uris", "SRC"], 2),
    ],
)
def test_help_and_bad_arguments_answer_without_loading_torch_or_storage_libraries(
    tmp_path: Path, image_folder: Path, args: list[str], code: int
) -> None:
    """`--help` and a mistyped argument answer in a fraction of a second: the CLI imports torch,
    transformers, pyarrow, s3fs and Prefect (1.5 s on a 2-core machine) only once a command has work to do."""
    (tmp_path / "not-a-model").mkdir()
    names = {"SRC": str(image_folder), "OUT": str(tmp_path / "out"), "MODEL": str(tmp_path / "not-a-model")}
    argv = [names.get(arg, arg) for arg in args]
    script = LOADED_AFTER.format(heavy=HEAVY_MODULES)
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60, cwd=Path.cwd()
    )
    first, _, output = done.stdout.partition("\n")
    assert first == f"{code} -", done.stdout + done.stderr
    if code == 2:
        assert "error:" in output or "Error" in output, output
    if args == ["--version"]:
        assert output.startswith("oncoflow 0."), output
    assert not (tmp_path / "out").exists()


QUICK_EXIT_SCRIPT = """
import atexit, sys
from pathlib import Path
import flows  # registers the last exit hook
from flows.quick_exit import run_command

marks = Path(sys.argv[1])

class Module:
    def __del__(self):  # runs while Python tears the interpreter down
        (marks / "teardown").write_text("ran")

kept = Module()
atexit.register(lambda: (marks / "exit-hook").write_text("ran"))

def main():
    print("row " * 50_000)  # more than a pipe's buffer: must all arrive
    sys.stderr.write("the last line\\n")
    if sys.argv[2] == "raise":
        raise RuntimeError("a bug")
    sys.exit(int(sys.argv[2]))

if sys.argv[3] == "cli":
    run_command(main)
else:
    main()
"""


@pytest.mark.parametrize(
    ("code", "entry", "returncode", "teardown"),
    [
        ("3", "cli", 3, False),  # a CLI command: same exit code, output and exit hooks; no teardown
        ("0", "cli", 0, False),
        ("3", "plain", 3, True),  # imported elsewhere (a worker, the tests): Python's normal exit
        ("raise", "cli", 1, True),  # a bug: Python's own traceback and exit
    ],
)
def test_a_command_ends_after_its_exit_hooks_without_the_teardown(
    tmp_path: Path, code: str, entry: str, returncode: int, teardown: bool
) -> None:
    """The CLI skips the interpreter's teardown (1.5 s after a run on 2 cores), losing nothing."""
    done = subprocess.run(
        [sys.executable, "-c", QUICK_EXIT_SCRIPT, str(tmp_path), code, entry],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == returncode, done.stderr
    assert done.stdout == "row " * 50_000 + "\n"
    assert done.stderr.startswith("the last line\n")
    assert ("RuntimeError: a bug" in done.stderr) == (code == "raise")
    assert (tmp_path / "exit-hook").read_text() == "ran"
    assert (tmp_path / "teardown").exists() == teardown


def test_classify_command_prints_a_summary(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    result = invoke(
        "classify", str(image_folder), "-o", str(tmp_path / "out"), "--model", tiny_model, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert "images_classified" in result.output and "research use only" in result.output.lower()
    assert f"\noutput: {tmp_path / 'out'}\n" in result.output, result.output  # where the rows went


@pytest.mark.slow
def test_module_entry_point_runs_the_same_flow(
    image_folder: Path, tmp_path: Path, tiny_model: str, prefect_server: str
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    command = [sys.executable, "-m", "flows.classify", str(image_folder), "-o", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--model", tiny_model, "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert "images_classified" in done.stdout
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 1


def test_help_explains_every_option() -> None:
    result = invoke("classify", "--help")
    assert result.exit_code == 0
    for option in [
        "--output",
        "--model",
        "--revision",
        "--device",
        "--precision",
        "--batch-size",
        "--threshold",
    ]:
        assert option in result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "without address [default: 1]" in text  # rich markup would swallow an unescaped [default: 1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "explained"),
    [
        ("config", "tensor(s) it needs"),
        ("shape", "another shape"),
    ],
)
def test_an_explained_error_is_not_buried_under_a_traceback(
    image_folder: Path, tmp_path: Path, prefect_server: str, tiny_model: str, damage: str, explained: str
) -> None:
    """Prefect reports the failed run in one line; the CLI's `error:` line says why and what to do.
    Some of a model's problems show only when the weights load: a config.json that does not fit them
    (more layers, or wider ones, than the weights hold)."""
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_model, tmp_path / "deeper"))
    config = json.loads((folder / "config.json").read_text())
    change = {"num_hidden_layers": 4} if damage == "config" else {"hidden_size": 64}
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    oncoflow = str(Path(sys.executable).parent / "oncoflow")  # the installed console script
    command = [oncoflow, "classify", str(image_folder), "-o", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--model", str(folder)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 1
    stderr = " ".join(done.stderr.split())
    assert "error:" in stderr and explained in stderr, stderr
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr


def test_an_explained_error_is_said_once_by_prefect_then_by_the_cli(
    tmp_path: Path, prefect_server: str
) -> None:
    """A failed task's error is not repeated by the task's and the flow's later records on the terminal."""
    from tests.analytics_data import make_dataset

    make_dataset(tmp_path / "dest")
    (tmp_path / "labels.csv").write_text("image_uri,label\nelsewhere.png,Normal\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    command = [
        str(Path(sys.executable).parent / "oncoflow"),
        "evaluate",
        "--predictions",
        str(tmp_path / "dest"),
    ]
    command += ["--labels", str(tmp_path / "labels.csv"), "-o", str(tmp_path / "r")]
    command += ["--model-revision", "sha256:00000000000000aa"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "error: no successfully classified image has a label" in output, output
    assert output.count("0 in common") == 2, output  # Prefect's one line, then the CLI's `error:`


def test_after_an_explained_error_prefects_exit_progress_note_is_not_shown() -> None:
    """ "EventsWorker - Still processing items: 1 items remaining..." followed the `error:` of a failed
    run (Prefect sending its last events at exit): dropped once an explained error was shown, kept before."""
    from flows.cli import OneLineExpectedErrors

    def record(message: str, error: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord(
            "prefect.EventsWorker", logging.WARNING, __file__, 1, message, None, exc_info
        )

    terminal = OneLineExpectedErrors((ValueError,))
    note = "Still processing items: 1 items remaining..."
    assert terminal.filter(record(note))  # no explained error yet: Prefect's own business
    assert terminal.filter(record("Encountered exception", ValueError("source folder is empty")))
    assert not terminal.filter(record(note))
    assert terminal.filter(record("Stopping temporary server on http://127.0.0.1:1"))


def test_history_names_an_unreachable_prefect_api() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for command in (["history"], ["prune", "--dry-run"]):
            result = invoke(*command)
            text = " ".join(result.output.split())
            assert result.exit_code == 1 and "cannot reach the Prefect API at http://127.0.0.1:9/api" in text
            assert "PREFECT_API_URL" in text


def test_a_run_fails_before_any_work_when_the_prefect_api_is_down(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """The nightly cron line with the server stopped: one line naming the URL and both fixes, before
    the model loads or anything is written (it was a traceback from Prefect's engine)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    output = tmp_path / "preds"
    model = ["--model", tiny_model, "--device", "cpu"]
    labeled = tmp_path / "labeled"
    for number, label in enumerate(["Normal", "Malignant"]):
        make_image(labeled / label / "x.png", seed=number)
    commands = [
        ["classify", str(image_folder), "-o", str(output), *model],
        ["reprocess", str(image_folder), "-o", str(output), *model],
        ["evaluate", "--data", str(labeled), "-o", str(tmp_path / "report"), *model],
        ["compact", str(tmp_path / "dataset")],
    ]
    (tmp_path / "dataset").mkdir()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for command in commands:
            result = invoke(*command)
            text = " ".join(result.output.split())
            assert result.exit_code == 1, (command, text)
            assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in text, (command, text)
            assert "(`prefect server start`), or unset PREFECT_API_URL to run on a temporary server" in text
    assert not output.exists() and not (tmp_path / "report").exists()
    assert not list((tmp_path / "dataset").iterdir())


def test_an_empty_source_folder_fails_like_an_empty_s3_prefix(tmp_path: Path, tiny_model: str) -> None:
    """An unmounted share is an empty folder: the run fails and says so instead of 'classifying' nothing."""
    source = tmp_path / "mnt" / "scans"
    source.mkdir(parents=True)
    output = tmp_path / "preds"
    result = invoke("classify", str(source), "-o", str(output), "--model", tiny_model, "--device", "cpu")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "is empty" in text and "mount it" in text
    assert not list(output.rglob("*.parquet"))

    (source / "README.txt").write_text("scans arrive here nightly")  # not empty, just no images yet
    result = invoke("classify", str(source), "-o", str(output), "--model", tiny_model, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_serve_names_a_bad_cron_and_an_unreachable_api(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    common = [
        "serve",
        "--source",
        str(image_folder),
        "--output",
        str(tmp_path / "out"),
        "--model",
        tiny_model,
    ]
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # as if from a Prefect profile
        for cron in ("0 2 * *", "61 2 * * *"):
            result = invoke(*common, "--cron", cron)
            text = " ".join(result.output.split())
            assert result.exit_code == 2 and f"invalid --cron '{cron}'" in text and "minute 0-59" in text
        result = invoke(*common)
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and "cannot reach the Prefect API at http://127.0.0.1:9/api" in text
        result = invoke(*common[:-1], str(tmp_path / "no-such-model"))  # before anything is served
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "invalid --model" in text and "no-such-model" in text
        result = invoke(*common[:-1], "example-org/not-cached-vit")  # out of reach (offline): a warning
        text = " ".join(result.output.split())
        assert "warning: cannot fetch model 'example-org/not-cached-vit'" in text and "Serving anyway" in text
        assert result.exit_code == 1 and "cannot reach the Prefect API" in text  # went on to serve
    with temporary_settings({PREFECT_API_URL: None}):  # no server: the arguments are still checked first
        result = invoke(*common, "--cron", "bad cron")
        assert result.exit_code == 2 and "invalid --cron 'bad cron'" in " ".join(result.output.split())
        result = invoke(*common)
        assert result.exit_code == 2 and "serve needs a running Prefect server" in result.output


def test_locations_fail_before_any_work_unless_they_name_somewhere_oncoflow_can_go(
    image_folder: Path, tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URI that names no bucket, another host's file:// path or a scheme oncoflow does not read
    exits 2 naming the argument, for every command; reports and training stay local."""
    output = str(tmp_path / "out")
    folder = str(image_folder)
    cases = [
        (["classify", "s3://", "-o", output], "invalid SOURCE: 's3://' names no bucket"),
        (
            ["reprocess", "s3://", "-o", output, "--model", "o/m", "--prefix", "2023"],
            "invalid SOURCE: 's3://' names no bucket",
        ),
        (
            ["reprocess", "s3:/b", "-o", output, "--model", "o/m", "--prefix", "2023"],
            "invalid SOURCE: 's3:/b' is neither",
        ),
        (["classify", folder, "-o", "s3:///x"], "invalid --output: 's3:///x' names no bucket"),
        (["classify", "gs://b/x", "-o", output], "gs:// is not supported"),
        (["classify", "file://server/share", "-o", output], "not a local file:// URI"),
        (["compact", "s3://"], "invalid DEST: 's3://' names no bucket"),
        (["latest", "S3://", "-o", "x.csv"], "names no bucket"),
        (["latest", folder, "-o", "gs://b/x.csv"], "invalid --output"),
        (["classify", "https://minio:9000/scans", "-o", output], "pass its URL as --s3-endpoint-url"),
        (["latest", folder, "-o", "github://x.csv"], "github:// is not supported"),
        (["classify", folder, "-o", "s3:/bucket/x"], "write s3://bucket/x"),
        (["latest", folder, "-o", "s3:/preds/latest.parquet"], "write s3://preds/latest.parquet"),
        (
            ["latest", folder, "-o", "s3:/latest.csv"],
            "write s3://latest.csv (a bucket) or s3://BUCKET/latest.csv",
        ),
        # The colon left out: before, a local folder ./s3/preds/out got the dataset and the run said nothing.
        (["classify", folder, "-o", "s3//preds/out"], "missing its colon; write s3://preds/out"),
        (["classify", "S3A//b/x", "-o", output], "write s3a://b/x"),
        (
            ["classify", "s3://scans//incoming/p", "-o", output],
            "has an empty part (`//`); write s3://scans/incoming/p",
        ),
        (["serve", "--source", "s3:/b", "-o", output], "invalid --source: 's3:/b' is neither"),
        (["report", folder, "-o", "file:r.html"], "write file:///absolute/path"),
        (["evaluate", "--data", folder, "-o", "s3://b/report"], "must be a local folder"),
        (["evaluate", "--predictions", "s3://b/p", "--labels", "s3://b/l.csv", "-o", output], "--labels"),
        (["train", "--data", "s3://b/d", "-o", output], "must be a local folder"),
    ]
    for args, expected in cases:
        result = invoke(*args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in text, (args, text)
        assert not (tmp_path / "out").exists()
    # A malformed endpoint variable, named, when an argument is on S3; local runs do not read it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")
    for args in (["classify", "s3://b/x", "-o", output], ["latest", folder, "-o", "s3://b/x.csv"]):
        result = invoke(*args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "environment variable AWS_ENDPOINT_URL must be" in text, text
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://user:pass@minio:9000")
    result = invoke("compact", "s3://b/x")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "AWS_ENDPOINT_URL_S3" in text and "pass" not in text, text


def test_file_uris_are_read_as_rfc_8089_says(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    """`file://localhost/p` and `Path.as_uri()` (a space as %20) name the local folder, not a folder
    named like the URI below the working directory."""
    source = tmp_path / "my scans"
    image_folder.rename(source)
    output = tmp_path / "out put"
    result = invoke(
        "classify",
        "file://localhost" + source.as_uri()[len("file://") :],
        "-o",
        "file:" + output.as_uri()[len("file://") :],  # file:/abs/path, as Java and Spark write it
        "--model",
        tiny_model,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    rows = duckdb.sql(f"select image_uri from read_parquet('{output}/**/*.parquet')").fetchall()
    assert len(rows) == 6 and all(uri.startswith(f"file://{source}/") for (uri,) in rows)
    assert not Path("file:").exists() and not (Path.cwd() / "localhost").exists()


def test_a_config_that_does_not_fit_the_weights_fails_instead_of_using_random_layers(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """transformers fills tensors missing from the weights (or of another shape) with random values and
    goes on: a config.json edited or copied from another model would write plausible rows from random
    layers. The run fails naming the model, and writes nothing (training: tests/test_training.py), in one
    line: transformers' own table of the tensors (30 lines and more, twice) is not shown."""
    deeper, wider = tmp_path / "deeper", tmp_path / "wider"
    for folder, change in ((deeper, {"num_hidden_layers": 4}), (wider, {"hidden_size": 64})):
        shutil.copytree(tiny_model, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    output = tmp_path / "out"
    with records_of(logging.getLogger("transformers.modeling_utils")) as logged:
        for args, expected in (
            (
                ["classify", str(image_folder), "-o", str(output), "--model", str(deeper)],
                "tensor(s) it needs",
            ),
            (["classify", str(image_folder), "-o", str(output), "--model", str(wider)], "another shape"),
        ):
            result = invoke(*args, "--device", "cpu")
            text = " ".join(result.output.split())
            assert result.exit_code == 1 and "do not fit its config.json" in text and expected in text, text
            assert not output.exists() or not list(output.rglob("*.parquet"))
    assert not [record for record in logged if "LOAD REPORT" in str(record.msg)]


@contextlib.contextmanager
def records_of(logger: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """The records that reach `logger`'s handlers meanwhile (after its filters)."""
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)


def test_transformers_load_report_is_shown_when_the_load_itself_fails() -> None:
    """Its error then says "look at the above report": the table dropped meanwhile is logged after all."""
    from tasks.model import no_load_report

    logger = logging.getLogger("transformers.modeling_utils")
    with records_of(logger) as logged, pytest.raises(RuntimeError), no_load_report():
        logger.warning("ViT LOAD REPORT from: /m\nkey | CONVERSION | ...")
        assert logged == []
        raise RuntimeError("For details look at the `CONVERSION` entries of the above report!")
    assert [record.getMessage().split(" from")[0] for record in logged] == ["ViT LOAD REPORT"]


def test_a_model_folder_that_cannot_load_fails_before_any_work(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """Missing or broken configuration files are found when the arguments are read (exit 2) by every
    command that takes a model, `serve` included, not by the run at 02:00."""
    import torch

    missing, broken, cut, garbage = (tmp_path / name for name in ("missing", "broken", "cut", "garbage"))
    for folder in (missing, broken, cut, garbage):
        shutil.copytree(tiny_model, folder)
    (missing / "preprocessor_config.json").unlink()
    (broken / "config.json").write_text('{"id2label": ')
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a download that stopped
    (garbage / "model.safetensors").write_bytes(b"<html>proxy error</html>")
    output = str(tmp_path / "out")
    for model, expected in (
        (missing, "has no preprocessor_config.json"),
        (broken, "config.json is not a valid configuration"),
        (cut, f"{str(cut)!r}: its weights file model.safetensors is damaged or incomplete (cut short: "),
        (garbage, "model.safetensors is damaged or incomplete (its header claims"),
    ):
        for args in (
            ["classify", str(image_folder), "-o", output, "--model", str(model)],
            ["evaluate", "--data", str(image_folder), "-o", output, "--model", str(model)],
            ["train", "--data", str(image_folder), "-o", output, "--base-model", str(model)],
            ["serve", "--source", str(image_folder), "-o", output, "--model", str(model)],
        ):
            result = invoke(*args)
            text = " ".join(result.output.split())
            assert result.exit_code == 2 and expected in text, (args, text)
    # A classifier must name a Malignant class; a base model for train need not (it gets a new head).
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tiny_model, unlabelled)
    config = json.loads((unlabelled / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "LABEL_0", "1": "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    (unlabelled / "config.json").write_text(json.dumps(config))
    for args in (
        ["classify", str(image_folder), "-o", output, "--model", str(unlabelled)],
        ["evaluate", "--data", str(image_folder), "-o", output, "--model", str(unlabelled)],
        ["serve", "--source", str(image_folder), "-o", output, "--model", str(unlabelled)],
    ):
        result = invoke(*args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "none of them 'Malignant'" in text, (args, text)
    # Exactly Normal and Malignant: rows labelled Benign, or a third class, are not the output contract.
    for labels, expected in (
        (["Benign", "Malignant"], "if 'Benign' means not malignant, set config.id2label"),
        (
            ["Normal", "Benign", "Malignant"],
            "has 3 classes ['Benign', 'Malignant', 'Normal']; oncoflow classifies two",
        ),
    ):
        config["id2label"] = dict(enumerate(labels))
        config["label2id"] = {label: n for n, label in enumerate(labels)}
        (unlabelled / "config.json").write_text(json.dumps(config))
        result = invoke("classify", str(image_folder), "-o", output, "--model", str(unlabelled))
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in text, (labels, text)
    result = invoke("train", "--data", str(image_folder), "-o", output, "--base-model", str(unlabelled))
    assert "Malignant'" not in result.output and "invalid --base-model" not in result.output
    if not torch.cuda.is_available():
        result = invoke("serve", "--source", str(image_folder), "-o", output, "--device", "cuda")
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "no CUDA GPU is visible" in text, text
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_fails_before_any_work(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """A parent that is a file, a virtual filesystem: exit 2 naming --output, not a failed run later.
    The check leaves nothing behind when it passes."""
    from tasks.storage import probe_local_folder

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    outputs = [str(blocker / "preds"), "/proc/oncoflow-preds"]
    for output in outputs:
        for args in (
            ["classify", str(image_folder), "-o", output, "--model", tiny_model, "--device", "cpu"],
            ["evaluate", "--data", str(image_folder), "-o", output, "--model", tiny_model],
            ["latest", str(image_folder), "-o", output + "/latest.csv"],
        ):
            result = invoke(*args)
            text = " ".join(result.output.split())
            assert result.exit_code == 2 and "invalid --output: cannot create or write" in text, (args, text)
    probe_local_folder(str(tmp_path / "new" / "deeper" / "preds"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "scans"]


def test_retry_errors_classifies_again_the_error_rows_of_the_given_categories(
    tmp_path: Path, tiny_model: str
) -> None:
    """Error rows are final, so a fix that does not change the file (a higher --max-pixels, a decoder
    installed, access granted) needs --retry-errors: only the images whose newest row is an error of
    those categories run again, and their new row is the one `latest` shows."""
    source, output = tmp_path / "scans", tmp_path / "preds"
    for number in range(3):
        make_image(source / f"small-{number}.png", size=(40, 40), seed=number)
    make_image(source / "large.png", size=(120, 100), seed=9)
    (source / "empty.png").write_bytes(b"")
    common = ["-o", str(output), "--model", tiny_model, "--device", "cpu"]

    def run(*args: str) -> str:
        result = invoke("classify", str(source), *common, *args)
        assert result.exit_code == 0, result.output
        return result.output

    def rows() -> list[tuple]:
        query = f"select image_uri, status, error from read_parquet('{output}/**/*.parquet') order by processed_at"
        return [(Path(uri).name, status, error) for uri, status, error in duckdb.sql(query).fetchall()]

    run("--max-pixels", "5000")
    assert sorted((name, status) for name, status, _ in rows())[:2] == [
        ("empty.png", "error"),
        ("large.png", "error"),
    ]
    run("--max-pixels", "20000")  # a new limit alone applies to new images only
    run("--max-pixels", "20000", "--retry-errors", "unsupported,read_failed")  # not these categories
    assert len(rows()) == 5
    retried = run("--max-pixels", "20000", "--retry-errors", "too_large")
    assert len(rows()) == 6 and rows()[-1][:2] == ("large.png", "ok")
    assert re.search(r"images_retried [^\n]*│ +1 │", retried), retried
    run("--retry-errors", "all")  # empty.png is tried again (and fails again); large.png's newest is ok
    assert len(rows()) == 7 and rows()[-1] == ("empty.png", "error", "empty: the file has zero bytes"), str(
        rows()[-3:]
    )
    latest = invoke("latest", str(output), "-o", str(tmp_path / "latest.csv"))
    assert latest.exit_code == 0, latest.output
    newest = duckdb.sql(f"select status from '{tmp_path / 'latest.csv'}' where image_uri like '%large.png'")
    assert newest.fetchall() == [("ok",)]

    refused = invoke("classify", str(source), *common, "--retry-errors", "too-large")
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "unknown error categories too-large" in text and "too_large" in text
    assert len(rows()) == 7


def test_dry_run_counts_what_a_run_would_classify_and_writes_nothing(
    tmp_path: Path, tiny_model: str, tiny_model_imagenet: str
) -> None:
    """Before a nightly run or a reprocess of an archive: how many images are new, changed since their
    rows, or retried, named by a few examples; the output is neither created nor written."""
    source, output = tmp_path / "scans", tmp_path / "preds"
    for number in range(4):
        make_image(source / f"scan-{number}.png", seed=number)
    (source / "empty.png").write_bytes(b"")
    common = ["-o", str(output), "--model", tiny_model, "--device", "cpu"]

    def table(result) -> dict[str, str]:
        assert result.exit_code == 0, result.output
        return dict(re.findall(r"│ (\w+)[^│\n]*│ +(\S+) │", result.output))

    first = invoke("classify", str(source), *common, "--dry-run")
    assert table(first)["images_new"] == "5" and table(first)["images_found"] == "5", first.output
    assert "nothing was classified or written" in first.output
    assert f"would classify file://{source}/scan-0.png" in first.output  # as the image_uri column
    assert f"{output} does not exist yet: a run would start a new dataset there" in " ".join(
        first.output.split()
    )
    assert not output.exists()

    assert invoke("classify", str(source), *common).exit_code == 0
    make_image(source / "scan-1.png", size=(80, 60), seed=7)  # replaced by another version
    make_image(source / "scan-9.png", seed=9)  # new
    plan = table(invoke("classify", str(source), *common, "--dry-run", "--retry-errors", "empty"))
    assert {key: plan[key] for key in ("images_found", "images_new", "images_changed", "images_retried")} == {
        "images_found": "6",
        "images_new": "3",
        "images_changed": "1",
        "images_retried": "1",
    }
    assert plan["images_unchanged"] == "3"
    count = f"select count(*) from read_parquet('{output}/**/*.parquet')"
    assert duckdb.sql(count).fetchall() == [(5,)]

    nightly = invoke("classify", str(source), *common)
    assert table(nightly)["images_changed"] == "1" and table(nightly)["images_new"] == "2"
    assert duckdb.sql(count).fetchall() == [(7,)]

    other_model = ["-o", str(output), "--model", tiny_model_imagenet, "--device", "cpu", "--dry-run"]
    reprocessing = invoke("reprocess", str(source), *other_model)
    reprocess = table(reprocessing)
    assert reprocess["images_new"] == "6" and reprocess["images_changed"] == "0"
    assert "does not exist yet" not in reprocessing.output
    assert duckdb.sql(count).fetchall() == [(7,)]

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "_leases").write_text("in the way")  # the run would fail on it: the dry run says so
    warned = invoke("classify", str(source), "-o", str(blocked), "--model", tiny_model, "--dry-run")
    text = " ".join(warned.output.split())
    assert warned.exit_code == 0 and f"blocked by {blocked}/_leases: a file where the output needs" in text


def test_a_file_in_the_way_inside_the_output_is_named(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """A file where the output needs a folder (`DEST/_leases`, a partition): the message names it, not
    just --output, and says what to do."""
    output = tmp_path / "preds"
    output.mkdir()
    (output / "_leases").write_text("in the way")
    result = invoke(
        "classify", str(image_folder), "-o", str(output), "--model", tiny_model, "--device", "cpu"
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"({output}/_leases)" in text, text
    assert "a file stands where a folder of the output must be; move it away" in text and "[Errno" not in text


def test_the_message_names_the_file_in_the_way_deep_inside_the_output(tmp_path: Path) -> None:
    """A partition folder that is a file: the error of the write below it names that file."""
    from tasks.storage import output_error

    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "model_slug=m").write_text("not a folder")
    error = NotADirectoryError(
        20, "Not a directory", str(tmp_path / "preds" / "model_slug=m" / "date=2026-11-29")
    )
    message = str(output_error(error, f"file://{tmp_path}/preds"))
    assert f"({tmp_path}/preds/model_slug=m); a file stands where a folder" in message, message


def test_log_lines_on_a_terminal_get_lines_of_their_own_above_the_progress_bar(
    tmp_path: Path, image_folder: Path, tiny_model: str, prefect_server: str
) -> None:
    """On a terminal, Prefect's log records went to the end of the progress bar's line
    (`classifying ━━ 0/?  22:07:13.882 | INFO ...`): each must start a line of its own."""
    import pty

    primary, secondary = pty.openpty()
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "120"}
    oncoflow = str(Path(sys.executable).parent / "oncoflow")
    command = [oncoflow, "classify", str(image_folder), "-o", str(tmp_path / "out"), "--model", tiny_model]
    process = subprocess.Popen(
        [*command, "--device", "cpu", "--shard-size", "2"], stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=240) == 0
    os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    # What stays visible of each line: the terminal's \r\n ends it; a \r before returns to its start.
    shown = [ansi.sub("", line.removesuffix("\r").rsplit("\r", 1)[-1]) for line in text.split("\n")]
    records = [line for line in shown if "| INFO" in line]
    assert any("classified 6 of 6 images" in line for line in records), text
    assert "classifying" in text, "a progress bar was shown"
    stuck = [line for line in records if not re.match(r"\d\d:\d\d:\d\d\.\d{3} \| INFO", line)]
    assert not stuck, stuck
