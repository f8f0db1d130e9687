"""The train flow: fine-tune a ViT on a labelled folder with the seed card's recipe, save it for classify.

Run it with `oncoflow train` or `python -m flows.train`.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.logs import send_logs_to_prefect
from flows.params import TrainParams, flow_params
from tasks.model_files import DEFAULT_BASE_MODEL
from tasks.training import Recipe, TrainResult, fine_tune

send_logs_to_prefect()  # warnings (a lease wait, a skipped file) reach the run logs in the UI


def log_epoch(epoch: dict[str, float]) -> None:
    print(
        f"epoch {epoch['epoch']:>3}: train loss {epoch['train_loss']:.4f}, validation loss "
        f"{epoch['val_loss']:.4f}, validation accuracy {100 * epoch['val_accuracy']:.2f}% "
        f"({epoch['seconds']:.1f} s)"
    )


@task(cache_policy=NONE, log_prints=True)
def train_model(params: TrainParams) -> TrainResult:
    """The whole training loop; one task, because its state (the network) cannot cross task boundaries."""
    recipe = Recipe(
        epochs=params.epochs,
        batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        val_split=params.val_split,
        seed=params.seed,
        workers=params.workers,
    )
    return fine_tune(params.data, params.output, params.base_model, recipe, params.device, on_epoch=log_epoch)


@flow(name="train", log_prints=True)
def train(
    data: str,
    output: str,
    base_model: str = DEFAULT_BASE_MODEL,
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 5e-5,
    val_split: float = 0.15,
    seed: int = 42,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    workers: int = 0,
) -> dict[str, Any]:
    """Fine-tune BASE_MODEL on DATA/Normal + DATA/Malignant; write the best epoch's model to OUTPUT."""
    params = flow_params(TrainParams, **locals())
    result = train_model(params)
    with open(f"{result.output}/README.md") as handle:
        create_markdown_artifact(handle.read(), key="train-model-card", description="Research use only.")
    print(
        f"saved the epoch-{result.best_epoch} model to {result.output}: validation accuracy "
        f"{100 * result.validation['accuracy']:.2f}%, recall {100 * result.validation['recall']:.2f}%"
    )
    return {
        "output": result.output,
        "best_epoch": result.best_epoch,
        "validation": result.validation,
        "counts": result.counts,
        "history": result.history,
    }


if __name__ == "__main__":
    from flows.cli import train_command_app
    from flows.quick_exit import run_command

    run_command(train_command_app)
