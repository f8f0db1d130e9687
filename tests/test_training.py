"""Fine-tuning with the seed recipe: a tiny ViT learns an obvious signal, and classify loads the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.demo import build_tiny_model
from tasks.labels import labeled_folder
from tasks.training import Recipe, TrainingError, fine_tune, random_resized_crop, split

runner = CliRunner()


def write_signal_images(root: Path, per_class: int, seed: int) -> Path:
    """Normal = bright noisy squares, Malignant = dark ones: a signal any crop keeps."""
    rng = np.random.default_rng(seed)
    for name, level in (("Normal", 190), ("Malignant", 70)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = np.clip(level + rng.normal(0, 35, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name.lower()}_{n}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`oncoflow train` on 24 + 24 images with a tiny 32-pixel base ViT; a separate held-out folder."""
    root = tmp_path_factory.mktemp("training")
    base = build_tiny_model(str(root / "base"), seed=3, image_size=32)
    data = write_signal_images(root / "train", 24, seed=0)
    (root / "model.partial").mkdir()  # a folder of the user's, named like a temporary: left alone
    (root / "model.partial" / "notes.txt").write_text("mine")
    result = runner.invoke(
        app,
        ["train", "--data", str(data), "--output", str(root / "model"), "--base-model", base]
        + ["--epochs", "6", "--batch-size", "8", "--learning-rate", "1e-3", "--val-split", "0.25"]
        + ["--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    return {
        "model": root / "model",
        "holdout": write_signal_images(root / "holdout", 10, seed=1),
    }


def test_train_writes_a_model_folder_with_a_model_card(trained: dict[str, Path]) -> None:
    model = trained["model"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= {
        p.name for p in model.iterdir()
    }
    assert not list(model.glob("*.bin")) and not list(model.parent.glob(".model.partial-*"))
    assert (model.with_name("model.partial") / "notes.txt").read_text() == "mine"
    # safetensors alone would write the weights 0600: the account running the nightly flow could not load them
    modes = {name: (model / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes["model.safetensors"] == modes["config.json"], modes
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "Normal", "1": "Malignant"}
    assert config["label2id"] == {"Normal": 0, "Malignant": 1}
    card = (model / "README.md").read_text()
    assert (
        "| Recall (Sensitivity) |" in card and "| MCC |" in card and "research, not diagnosis" in card.lower()
    )
    assert "Validation images: 6 Normal, 6 Malignant" in card  # 0.25 of 24 per class, stratified
    assert "rest on 6 Malignant images" in card and "95% confidence intervals (Wilson): sensitivity" in card
    assert card.count("\n| 6 |") == 1, "one line per epoch"


def test_trained_model_is_accurate_on_held_out_images_through_classify(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report"
    result = runner.invoke(
        app,
        ["evaluate", "--data", str(trained["holdout"]), "--model", str(trained["model"])]
        + ["-o", str(report), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"]["evaluated"] == 20 and metrics["images"]["error_rows"] == 0
    assert metrics["accuracy"] > 0.9, metrics
    print("held-out accuracy", metrics["accuracy"])
    assert metrics["models"] == [str(trained["model"])]


def test_split_is_stratified_and_repeatable(tmp_path: Path) -> None:
    images = labeled_folder(str(write_signal_images(tmp_path / "data", 20, seed=0)))
    train, val = split(images, 0.15, seed=42)
    assert [i.uri for i in val] == [i.uri for i in split(images, 0.15, seed=42)[1]]
    assert [i.uri for i in val] != [i.uri for i in split(images, 0.15, seed=7)[1]]
    assert sorted(i.label for i in val) == [0, 0, 0, 1, 1, 1] and len(train) == 34
    assert not {i.uri for i in train} & {i.uri for i in val}

    with pytest.raises(TrainingError, match="at least 7 images per class"):
        split(images[:10], 0.15, seed=42)


def test_random_resized_crop_has_the_processor_size_and_follows_the_seed() -> None:
    image = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8))
    crops = [random_resized_crop(image, (32, 24), np.random.default_rng(s)) for s in (0, 0, 1)]
    assert all(crop.size == (24, 32) for crop in crops)
    assert np.array_equal(np.asarray(crops[0]), np.asarray(crops[1]))
    assert not np.array_equal(np.asarray(crops[0]), np.asarray(crops[2]))
    # Impossible areas fall back to a central crop instead of failing.
    fallback = random_resized_crop(image, (16, 16), np.random.default_rng(0), scale=(2.0, 3.0))
    assert fallback.size == (16, 16)


def test_hub_base_model_without_network_says_what_to_do(tmp_path: Path) -> None:
    data = write_signal_images(tmp_path / "data", 8, seed=0)
    result = runner.invoke(
        app, ["train", "--data", str(data), "-o", str(tmp_path / "model"), "--base-model", "someorg/base-vit"]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "someorg/base-vit" in text and "local folder" in text
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--val-split", "1"], "--val-split"),
        (["--epochs", "0"], "--epochs"),
        (["--learning-rate", "0"], "--learning-rate"),
    ],
)
def test_bad_train_arguments_fail_before_any_work(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "m"), *args])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_train_data_and_model_that_cannot_work_fail_before_any_work(tmp_path: Path) -> None:
    """Checked before Prefect starts (no flow run): exit 2, naming the input and the fix."""
    few = write_signal_images(tmp_path / "few", 3, seed=0)
    (tmp_path / "unlabelled" / "scans").mkdir(parents=True)
    cases = [
        (["--data", str(tmp_path / "unlabelled")], "needs one sub-folder per class, Normal/ and Malignant/"),
        (["--data", str(few)], "training needs at least 7 images per class for --val-split 0.15"),
        (["--data", str(few), "--base-model", str(tmp_path / "no-model")], "invalid --base-model"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--data", str(few), "--device", "cuda"], "no CUDA GPU is visible"))
    for args, expected in cases:
        result = runner.invoke(app, ["train", "-o", str(tmp_path / "model"), *args])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in text, (args, text)
        assert not (tmp_path / "model").exists()
    result = runner.invoke(app, ["train", "--data", str(few), "-o", str(few / "model")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "read its own output" in text and not (few / "model").exists(), text


def test_train_refuses_a_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "model")])
    assert result.exit_code == 2 and "not empty" in " ".join(result.output.split()), result.output
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_gpu_uses_bf16_autocast_and_learns(tmp_path: Path) -> None:
    base = build_tiny_model(str(tmp_path / "base"), seed=3, image_size=32)
    data = write_signal_images(tmp_path / "data", 24, seed=0)
    recipe = Recipe(epochs=6, batch_size=8, learning_rate=1e-3, val_split=0.25)
    result = fine_tune(str(data), str(tmp_path / "model"), base, recipe, device="cuda")
    assert result.validation["accuracy"] > 0.9
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "Normal", "1": "Malignant"}


def test_a_base_with_a_two_class_head_gets_a_new_head_from_the_seed(tmp_path: Path, tiny_model: str) -> None:
    """A fine-tuned base (maybe with its classes the other way round) must not pass its head on."""
    from tasks.model import load_model
    from tasks.training import load_base

    base = load_model(tiny_model, device="cpu", precision="fp32").network.classifier.weight
    torch.manual_seed(1)
    first = load_base(tiny_model)[0].classifier.weight
    torch.manual_seed(2)
    second = load_base(tiny_model)[0].classifier.weight
    torch.manual_seed(1)
    again = load_base(tiny_model)[0].classifier.weight
    assert not torch.equal(first, base) and not torch.equal(first, second) and torch.equal(first, again)


def train_on_cpu(data: Path, output: Path, base: str) -> Result:
    args = ["--data", str(data), "-o", str(output), "--base-model", base, "--device", "cpu"]
    return runner.invoke(app, ["train", *args])


def test_a_base_whose_config_does_not_fit_its_weights_is_refused(tmp_path: Path, tiny_model: str) -> None:
    """Training from a base with random layers (its config.json edited, or copied from another model)
    would hand over a model that looks trained; only the head may be new."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    data = write_signal_images(tmp_path / "data", 8, seed=0)
    result = train_on_cpu(data, tmp_path / "m", str(base))
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "do not fit its config.json" in text and "it needs" in text, text
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_a_base_whose_weights_file_is_cut_short_is_refused_in_one_line(
    tmp_path: Path, tiny_model: str
) -> None:
    """A download that stopped half-way: an `error:` naming the base model and the fix, before any work
    (was safetensors' own error under a traceback, once the training had started)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    data = write_signal_images(tmp_path / "data", 8, seed=0)
    result = train_on_cpu(data, tmp_path / "m", str(base))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"invalid --base-model: model {str(base)!r}" in text, text
    assert "damaged or incomplete" in text and "download it again" in text, text


def test_unreadable_training_images_are_all_listed_before_training(tmp_path: Path, tiny_model: str) -> None:
    data = write_signal_images(tmp_path / "data", 8, seed=0)
    truncated = data / "Malignant" / "malignant_2.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (data / "Normal" / "notes.png").write_text("not an image")
    result = train_on_cpu(data, tmp_path / "m", tiny_model)
    text = "".join(result.output.split())  # the console folds long lines anywhere, even inside a path
    assert result.exit_code == 1 and "2of17trainingimagesunder" in text, result.output
    assert "Malignant/malignant_2.png(truncated" in text and "Normal/notes.png(not_an_image" in text
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_demo_outputs_say_they_come_from_a_toy_model(tmp_path: Path) -> None:
    from flows.demo import DEMO_BANNER, mark_as_demo

    card = tmp_path / "README.md"
    card.write_text("# Image classifier\n\n| Recall | 100.00% |\n")
    mark_as_demo(str(card))
    assert card.read_text().startswith(DEMO_BANNER) and "| Recall | 100.00% |" in card.read_text()
    assert "not a medical model" in DEMO_BANNER


def test_a_model_that_cannot_be_moved_into_place_is_kept(tmp_path: Path, tiny_model: str) -> None:
    """Training is done and saved; if the output folder filled up meanwhile, the model is not lost."""
    from transformers import ViTForImageClassification

    from tasks.training import TrainingError, save_model

    network = ViTForImageClassification.from_pretrained(tiny_model)
    output = tmp_path / "model"
    output.mkdir()
    (output / "something.txt").write_text("saved here during training")
    with pytest.raises(TrainingError, match="the trained model is complete in") as error:
        save_model(network, tiny_model, str(output), "# card")
    kept = Path(str(error.value).split("complete in ", 1)[1].split(",", 1)[0])
    assert (kept / "model.safetensors").exists() and (kept / "README.md").read_text() == "# card"


def test_train_refuses_a_file_as_output(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_text("not a folder")
    (tmp_path / "data").mkdir()
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "model.bin")]
    )
    assert result.exit_code == 2 and "is a file" in " ".join(result.output.split())


def test_a_model_saves_into_an_empty_folder_behind_a_symlink(tmp_path: Path, tiny_model: str) -> None:
    """--output may be an empty mount point or a link to one: neither can be replaced by a rename, so
    the files move into it (weights last), and the link and folder stay as they were."""
    from transformers import ViTForImageClassification

    from tasks.model import load_model
    from tasks.training import save_model

    network = ViTForImageClassification.from_pretrained(tiny_model)
    (tmp_path / "volume").mkdir()
    (tmp_path / "model").symlink_to(tmp_path / "volume")
    save_model(network, tiny_model, str(tmp_path / "model") + "/", "# card")
    assert (tmp_path / "model").is_symlink()
    assert sorted(p.name for p in (tmp_path / "volume").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert not list(tmp_path.glob(".*partial*"))
    loaded = load_model(str(tmp_path / "model"), device="cpu", precision="fp32")
    assert loaded.id2label == {0: "Normal", 1: "Malignant"}
