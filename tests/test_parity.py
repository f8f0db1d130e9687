"""Predictions agree with the seed card's reference snippet (one image at a time, fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import list_images, open_location


def reference_predictions(model_dir: str, paths: list[Path]) -> dict[str, tuple[str, float, float]]:
    """The seed card's snippet: AutoImageProcessor → AutoModelForImageClassification → softmax → argmax."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    results = {}
    for path in paths:
        with Image.open(path) as opened:  # the seed snippet's Image.open(f).convert("RGB"), file closed
            image = opened.convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**inputs).logits, dim=-1)[0]
        predicted = int(probs.argmax())
        results["file://" + str(path)] = (
            model.config.id2label[predicted],
            float(probs[predicted]),
            float(probs[model.config.label2id["Malignant"]]),
        )
    return results


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_imagenet"])
def test_engine_matches_reference_snippet(model_fixture: str, image_folder: Path, request) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    files = list(list_images(open_location(str(image_folder))))
    model = load_model(model_dir, device="cpu", precision="fp32")
    table = classify_files(
        files, open_location(str(image_folder)).fs, model, EngineOptions(batch_size=4), "r", "s"
    )
    expected = reference_predictions(model_dir, [Path(f.path) for f in files])

    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * len(files)
    for row in rows:
        label, confidence, prob_malignant = expected[row["image_uri"]]
        assert row["label"] == label
        assert row["confidence"] == pytest.approx(confidence, abs=1e-3)
        assert row["prob_malignant"] == pytest.approx(prob_malignant, abs=1e-3)


def test_processor_config_is_honoured(tiny_model_imagenet: str, image_folder: Path) -> None:
    """The ImageNet-normalised, 64×64, bicubic processor gives different pixels than ViT's defaults."""
    from transformers import AutoImageProcessor

    from tasks.images import Preprocessor, decode_image

    model = load_model(tiny_model_imagenet, device="cpu", precision="fp32")
    preprocess = Preprocessor.from_config(model.processor_config)
    assert preprocess is not None and (preprocess.height, preprocess.width) == (64, 64)
    image = decode_image((image_folder / "sub" / "d.tif").read_bytes())
    ours = preprocess(image)
    theirs = AutoImageProcessor.from_pretrained(tiny_model_imagenet)(images=image, return_tensors="np")
    assert ours.shape == (3, 64, 64)
    np.testing.assert_allclose(ours, theirs["pixel_values"][0], atol=1e-4)
