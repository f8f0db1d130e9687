"""Fine-tune a ViT image classifier with the seed card's recipe; write a model `classify` loads as-is.

Recipe (the defaults): AdamW at a constant learning rate, cross entropy, 5 epochs of batch 16,
RandomResizedCrop to the processor's size + the processor's normalization for training, a plain resize
for validation, the checkpoint with the best validation accuracy kept (ties: the lower validation loss). Labels are Normal=0 /
Malignant=1 from the class folders; the validation split is stratified and fixed by the seed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from tasks.images import ImageError, Preprocessor, ProcessorFallback, decode_image, make_preprocessor
from tasks.labels import CLASS_NAMES, LabeledImage, labeled_folder
from tasks.metrics import classification_metrics, probability_metrics, rate_intervals
from tasks.model import ModelError, check_weights, fetch_model, loading_weights, resolve_device
from tasks.model_files import DEFAULT_BASE_MODEL, share_model_files
from tasks.report import RESEARCH_NOTICE, interpretation, metric_text, seed_table, trust_notes


@dataclass(frozen=True)
class Recipe:
    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 5e-5  # AdamW, constant: the seed card names no schedule
    val_split: float = 0.15  # share of each class held out for choosing the best epoch
    seed: int = 42  # fixes the split, the head's initialization, shuffling and the crops
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (torchvision's default)
    workers: int = 0  # DataLoader processes decoding images; 0 decodes in the training process


class TrainingError(ValueError):
    """Training data or settings that cannot work; the message names the input and the fix."""


def split(images: list[LabeledImage], val_split: float, seed: int) -> tuple[list[LabeledImage], ...]:
    """A stratified (train, validation) split, the same for the same files and seed."""
    labels = [image.label for image in images]
    per_class = [labels.count(i) for i in range(len(CLASS_NAMES))]
    needed = max(2, math.ceil(1 / min(val_split, 1 - val_split)))
    if min(per_class) < needed:
        raise TrainingError(
            f"training needs at least {needed} images per class for --val-split {val_split}; found "
            f"{dict(zip(CLASS_NAMES, per_class, strict=True))}. Add images or change --val-split"
        )
    train, val = train_test_split(images, test_size=val_split, stratify=labels, random_state=seed)
    return sorted(train, key=lambda i: i.uri), sorted(val, key=lambda i: i.uri)


def random_resized_crop(
    image: Image.Image,
    size: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop on a PIL image: a random area and aspect, resized to (h, w)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            break
    else:  # no sample fitted: the central crop with the closest allowed aspect
        aspect = min(max(width / height, ratio[0]), ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        w, h = min(w, width), min(h, height)
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def input_size(processor_config: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the model's processor produces."""
    size = processor_config.get("size", 224)
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


def read_image(item: LabeledImage) -> Image.Image:
    """One training image, decoded as classify decodes it; TrainingError names the file and the fix."""
    try:
        with open(item.path, "rb") as handle:
            return decode_image(handle.read(), name=item.path)  # `.dcm` names as classify reads them
    except (OSError, ImageError) as exc:
        raise TrainingError(f"cannot train on {item.path}: {exc}; fix or remove the file") from exc


def check_images(images: list[LabeledImage], root: str, threads: int = min(16, os.cpu_count() or 1)) -> None:
    """Decode every image once before training, so a bad file fails the run at once, listed with every
    other bad file (relative to the data folder `root`), instead of hours into an epoch. Costs one decode
    per image (threads: PIL releases the GIL while it decodes)."""
    with ThreadPoolExecutor(threads) as pool:
        problems = [problem for problem in pool.map(_problem, images) if problem is not None]
    if problems:
        shown = "; ".join(f"{os.path.relpath(path, root)} ({reason})" for path, reason in problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise TrainingError(
            f"{len(problems)} of {len(images)} training images under {root!r} cannot be decoded; fix or "
            f"remove them, then run again: {shown}{more}"
        )


def _problem(item: LabeledImage) -> tuple[str, str] | None:
    """(path, why) for an image read_image refuses, else None."""
    try:
        read_image(item)
    except TrainingError as exc:
        return item.path, str(exc.__cause__)
    return None


class LabeledImages(torch.utils.data.Dataset):
    """(pixels, label) pairs; training items get a fresh random crop per epoch, fixed by (seed, epoch)."""

    def __init__(
        self,
        images: list[LabeledImage],
        preprocess: Preprocessor | ProcessorFallback,
        size: tuple[int, int],
        recipe: Recipe,
        augment: bool,
    ) -> None:
        self.images, self.preprocess, self.size, self.recipe, self.augment = (
            images,
            preprocess,
            size,
            recipe,
            augment,
        )
        self.epoch = 0  # set before each epoch; DataLoader workers are re-created per epoch and see it

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        item = self.images[index]
        image = read_image(item)
        if self.augment:
            rng = np.random.default_rng([self.recipe.seed, self.epoch, index])
            image = random_resized_crop(image, self.size, rng, self.recipe.crop_scale)
        return self.preprocess(image), item.label


@dataclass
class TrainResult:
    output: str
    best_epoch: int
    history: list[dict[str, float]]
    validation: dict[str, Any]
    counts: dict[str, dict[str, int]]


def load_base(base_model: str) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """The base network with a fresh Normal/Malignant head, its folder and its processor config."""
    from transformers import AutoModelForImageClassification

    directory, _ = fetch_model(base_model, None)
    processor_path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(processor_path):
        raise ModelError(
            f"base model {base_model!r} has no preprocessor_config.json; save its image processor"
        )
    with open(processor_path) as handle:
        processor_config = json.load(handle)
    with loading_weights(base_model, directory, what="base model"):
        network, loading = AutoModelForImageClassification.from_pretrained(
            directory,
            num_labels=len(CLASS_NAMES),
            id2label=dict(enumerate(CLASS_NAMES)),
            label2id={name: i for i, name in enumerate(CLASS_NAMES)},
            ignore_mismatched_sizes=True,  # a base with another head (or none) gets a new 2-class head
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    check_weights(loading, base_model, directory, new_head=True, what="base model")
    # A base that already has a 2-class head (another fine-tuned model; its classes maybe in the other
    # order) keeps it through from_pretrained: start every run from a new head, under the caller's seed.
    head = getattr(network, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ModelError(
            f"base model {base_model!r} has no `classifier` head to replace; use a ViT-style model"
        )
    for module in head.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm):
            module.reset_parameters()
    return network, directory, processor_config


def run_epoch(
    network: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass: trains when given an optimizer; returns (mean loss, labels, prob_malignant)."""
    network.train(optimizer is not None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total, labels, probs = 0.0, [], []
    with torch.set_grad_enabled(optimizer is not None):
        for pixels, target in loader:
            pixels, target = pixels.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast:
                logits = network(pixel_values=pixels).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += loss.item() * len(target)
            labels.append(target.cpu().numpy())
            probs.append(torch.softmax(logits.float(), dim=-1)[:, 1].detach().cpu().numpy())
    return total / len(loader.dataset), np.concatenate(labels), np.concatenate(probs).astype(np.float64)  # type: ignore[arg-type]


def fine_tune(
    data: str,
    output: str,
    base_model: str = DEFAULT_BASE_MODEL,
    recipe: Recipe | None = None,
    device: str = "auto",
    on_epoch: Callable[[dict[str, float]], None] = lambda _: None,
) -> TrainResult:
    """Train on data/Normal + data/Malignant and save the best epoch's model to `output`."""
    recipe = recipe or Recipe()
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(output) and os.listdir(output):
        raise TrainingError(f"output folder {output!r} is not empty; choose a new folder or remove it")
    torch_device = resolve_device(device)  # type: ignore[arg-type]
    images = labeled_folder(data)
    train_images, val_images = split(images, recipe.val_split, recipe.seed)
    torch.manual_seed(recipe.seed)
    # The base model first: an unreachable hub id fails at once, not after every image was decoded.
    network, base_dir, processor_config = load_base(base_model)
    check_images(images, os.path.abspath(os.path.expanduser(data)))
    network = network.to(torch_device)
    preprocess = make_preprocessor(processor_config, base_dir)
    size = input_size(processor_config)
    loaders = {
        name: torch.utils.data.DataLoader(
            LabeledImages(images, preprocess, size, recipe, augment=name == "train"),
            batch_size=recipe.batch_size,
            shuffle=name == "train",
            generator=torch.Generator().manual_seed(recipe.seed),
            num_workers=recipe.workers,
            pin_memory=torch_device.type == "cuda",
        )
        for name, images in (("train", train_images), ("val", val_images))
    }
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"rank": (-1.0, 0.0)}
    for epoch in range(1, recipe.epochs + 1):
        started = time.perf_counter()
        loaders["train"].dataset.epoch = epoch  # type: ignore[attr-defined]
        train_loss, _, _ = run_epoch(network, loaders["train"], torch_device, optimizer)
        val_loss, y_true, prob = run_epoch(network, loaders["val"], torch_device, None)
        scores = classification_metrics(y_true, (prob >= 0.5).astype(int))
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": scores["accuracy"],
                "seconds": time.perf_counter() - started,
            }
        )
        on_epoch(history[-1])
        rank = (scores["accuracy"], -val_loss)  # equal accuracy: the more confident epoch wins
        if rank > best["rank"]:
            best = {
                "rank": rank,
                "epoch": epoch,
                "metrics": {**scores, **probability_metrics(y_true, prob)},
                "state": {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()},
            }
    network.load_state_dict(best["state"])
    counts = {
        part: {name: sum(i.label == n for i in images) for n, name in enumerate(CLASS_NAMES)}
        for part, images in (("train", train_images), ("validation", val_images))
    }
    result = TrainResult(output, best["epoch"], history, best["metrics"], counts)
    save_model(network, base_dir, output, model_card(result, base_model, data, recipe))
    return result


def save_model(network: torch.nn.Module, base_dir: str, output: str, card: str) -> None:
    """save_pretrained (safetensors + config with id2label) + the base's processor config + README.md.

    Written to a hidden folder of its own and moved into place, so a crash never leaves half a model
    and no folder of the user's (`MODEL.partial`) is touched. A new --output: the hidden folder sits
    beside it and is renamed to it in one step. An existing empty one (checked before training; it may
    be a mount point or a symlink, which cannot be replaced): the hidden folder sits inside it and its
    files move up one by one, the weights last, so a folder with weights always holds a whole model.
    """
    target = output.rstrip("/") or "/"
    into_existing = os.path.isdir(target)
    parent = target if into_existing else (os.path.dirname(target) or ".")
    name = "model" if into_existing else os.path.basename(target)
    partial = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex}")
    try:
        network.save_pretrained(partial)  # type: ignore[operator]
        share_model_files(partial)
        shutil.copy(os.path.join(base_dir, "preprocessor_config.json"), partial)
        with open(os.path.join(partial, "README.md"), "w") as handle:
            handle.write(card)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        if into_existing:
            if set(os.listdir(target)) != {os.path.basename(partial)}:
                raise OSError(errno.ENOTEMPTY, "something else was saved there during training")
            for file in sorted(os.listdir(partial), key=lambda n: n.endswith(".safetensors")):
                os.replace(os.path.join(partial, file), os.path.join(target, file))
            os.rmdir(partial)
        else:
            os.replace(partial, target)
    except OSError as exc:  # e.g. something was saved into the output folder meanwhile: keep the model
        raise TrainingError(
            f"the trained model is complete in {partial}, but it cannot be moved to {target} ({exc}); "
            f"move it there yourself (mv {partial} NEW_FOLDER)"
        ) from exc


def model_card(result: TrainResult, base_model: str, data: str, recipe: Recipe) -> str:
    """README.md for the trained model: the seed card's layout, with this run's validation metrics."""
    validation = result.validation
    val_counts = result.counts["validation"]
    # what trust_notes needs: the images behind each rate and their 95% intervals
    reach = {**validation, "counts": val_counts, "wilson_95": rate_intervals(validation)}
    reach_notes = "\n".join(trust_notes(reach))
    epochs = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {100 * h['val_accuracy']:.2f}% |"
        for h in result.history
    )
    return f"""# Image classifier (Normal / Malignant), fine-tuned with oncoflow

{RESEARCH_NOTICE}

## Model Details
- Base Model: {base_model}
- Labels: Normal (Label 0), Malignant (Label 1), from the class folders of `{os.path.abspath(data)}`
- Training images: {result.counts["train"]["Normal"]} Normal, {result.counts["train"]["Malignant"]} Malignant
- Validation images: {val_counts["Normal"]} Normal, {val_counts["Malignant"]} Malignant (stratified split, seed {recipe.seed})

## Performance
The model achieves the following performance on the validation set (best epoch: {result.best_epoch}):

{seed_table(validation)}

ROC AUC {metric_text(validation, "roc_auc")}; TP {validation["tp"]}, FN {validation["fn"]}, FP {validation["fp"]}, TN {validation["tn"]}.

## Interpretation
{interpretation(validation)}

Validation images chose the best epoch, so these numbers are optimistic: measure the model on images
it has never seen with `oncoflow evaluate`.

## How far these numbers reach
{reach_notes}

## Training
- Epochs: {recipe.epochs}, batch size: {recipe.batch_size}, learning rate: {recipe.learning_rate} (AdamW, constant)
- Loss: cross entropy; augmentation: RandomResizedCrop (scale {recipe.crop_scale[0]}-{recipe.crop_scale[1]}) + the processor's normalization; validation: resize only
- Checkpoint: best validation accuracy (ties: lower validation loss)

| epoch | train loss | validation loss | validation accuracy |
|---|---|---|---|
{epochs}

## Usage
```
oncoflow classify SOURCE --output DEST --model {os.path.abspath(result.output)}
```
"""
