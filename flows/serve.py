"""The deployments, served from this machine: `oncoflow serve` (or `python deployments/serve.py`).

`flow.serve` needs no work pool and no worker: this process polls the Prefect API and runs each
scheduled or manually triggered run in a subprocess. deployments/prefect.yaml declares the same
deployments for `prefect deploy` to a work pool.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.classify import classify
from flows.evaluate import evaluate
from flows.reprocess import reprocess
from tasks.model_files import DEFAULT_MODEL

NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day, in `timezone`
TAGS = ["oncoflow", "research-only"]
STORAGE_PARAMETERS = ("s3_endpoint_url", "aws_credentials_block")  # evaluate reads DEST with them too


def build_deployments(
    source: str,
    output: str,
    model: str = DEFAULT_MODEL,
    cron: str = NIGHTLY_CRON,
    timezone: str = "UTC",
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> list[RunnerDeployment]:
    """classify-nightly (cron, in `timezone`); reprocess-archive and evaluate run on demand (their forms ask
    for the model, or the labels and the report folder). `options`: other classify parameters (threshold,
    max_error_rate, ...) for classify-nightly and reprocess-archive; its storage ones for evaluate too."""
    options = options or {}
    # Stored in the deployment and shown in the UI's forms: a relative path would name a folder relative
    # to wherever a run happens to start (deployments/deploy.sh refuses them for that reason).
    source, output = absolute_local(source), absolute_local(output)
    chosen_device = {} if device == "auto" else {"device": device}  # only options given are stored
    if os.path.isdir(os.path.expanduser(model)):
        model = absolute_local(model)
    defaults: dict[str, Any] = {
        "source": source,
        "output": output,
        "model": model,
        **chosen_device,
        **options,
    }
    storage = {k: v for k, v in options.items() if k in STORAGE_PARAMETERS}
    reprocessing = {k: v for k, v in options.items() if k != "threshold"}
    # to_deployment is sync-or-async by context; called here from sync code it returns the deployment.
    return [
        classify.to_deployment(  # type: ignore[list-item]
            name="classify-nightly",
            schedules=[Cron(cron, timezone=timezone)],
            parameters=defaults,
            description="Classify the images that arrived since the last run. Research use only.",
            tags=TAGS,
        ),
        reprocess.to_deployment(  # type: ignore[list-item]
            name="reprocess-archive",
            # Not the nightly model's --threshold: an operating point belongs to one model, and a
            # reprocess runs another (the run form asks for it, 0.5 by default).
            parameters={"source": source, "output": output, **chosen_device, **reprocessing},
            description="Re-classify a whole archive (or one sub-folder) with a new model; resumable.",
            tags=TAGS,
        ),
        evaluate.to_deployment(  # type: ignore[list-item]
            name="evaluate",
            parameters={"predictions": output, **storage},
            description="Score DEST's predictions against a labels file; report with metrics and plots.",
            tags=TAGS,
        ),
    ]


def absolute_local(location: str) -> str:
    """A local path made absolute (`~` expanded); URIs as given."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def serve_deployments(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Register the deployments and run their flow runs from this process until interrupted."""
    serve(*deployments, limit=limit)  # type: ignore[arg-type]
