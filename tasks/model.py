"""Load the classifier once per process: resolve hub id or local folder, device, precision, revision.

Security: weights load from safetensors only (`use_safetensors=True`), never with
`trust_remote_code`, never through `torch.load` of a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tasks.images import Preprocessor, ProcessorFallback, make_preprocessor
from tasks.model_files import (  # ModelError is raised and imported from here too
    ModelError,
    check_model_name,
    model_files,
    model_labels,
    positive_class,
    weights_revision,
)

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run classifier and the facts every output row records about it."""

    name: str
    revision: str
    directory: str
    network: torch.nn.Module
    id2label: dict[int, str]
    positive_id: int
    processor_config: dict[str, Any]
    device: torch.device
    precision: str
    preprocess: Preprocessor | ProcessorFallback  # built once with the model, reused by every shard

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def resolve_device(device: Device) -> torch.device:
    """`auto` picks CUDA when available; asking for `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 instructions (where bf16 matmuls are fast)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """`auto`: fp16 on GPUs; on CPUs, bf16 where the CPU has native bf16, else fp32.

    GPU: bench/throughput.py on an H100 (16,000 images) measured fp16 and bf16 equally fast (9,350 and
    9,443 img/s model-only, 7.5× fp32), but fp16 kept every label of fp32 (max probability difference
    0.0009) where bf16 changed 0.65% of labels (max difference 0.0073): fp16 has 3 more mantissa bits,
    and ViT activations stay far inside its range. A model whose fp16 logits overflow fails with an
    error that names `--precision bf16`.
    CPU: bf16 measured about 2.6 times as fast as fp32 on an AVX512-BF16 CPU with probabilities within
    0.01 of fp32 (see bench/README.md). `--precision fp32` gives exact parity with the reference snippet.
    """
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ModelError("--precision fp16 is not supported on CPU; use fp32 or bf16")
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def fetch_model(name: str, revision: str | None, weights: bool = True) -> tuple[str, str]:
    """Return (local directory, revision) for a local folder or a Hugging Face Hub id; `weights=False`
    fetches a hub model's configuration only (its revision is the commit all the same)."""
    directory = check_model_name(name)
    if directory is not None:
        if revision:
            raise ModelError(f"--revision applies to hub models only; {name!r} is a local folder")
        return directory, weights_revision(directory)
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(
            name,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.md"] if weights else ["*.json", "*.md"],
        )
    except Exception as exc:
        raise ModelError(
            f"cannot fetch model {name!r} from the Hugging Face Hub ({type(exc).__name__}): no network, "
            "HF_HUB_OFFLINE=1, or a wrong id/revision. Without network, pass a local folder saved with "
            "`save_pretrained` instead (--model, or --base-model for train), or download it elsewhere with "
            f"`hf download {name}` and copy the cache (HF_HOME). If you meant a local folder: there is "
            f"no folder {os.path.abspath(os.path.expanduser(name))!r}."
        ) from exc
    return directory, os.path.basename(directory.rstrip("/"))


# (name, revision, device, precision) → (the local folder's files as last loaded, the model)
_cache: dict[tuple[str, str | None, str, str], tuple[tuple[tuple[str, int, int], ...], LoadedModel]] = {}
_cache_lock = threading.Lock()


def folder_signature(name: str) -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime) of the files a local model's revision hashes (model_files: a note or a log
    written beside them changes nothing); empty for hub ids (their revision says it). A link to the
    folder counts as its target's files, so a link moved to another version changes it too."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        return ()
    files = [(n, os.stat(os.path.join(path, n))) for n in model_files(path)]
    return tuple((n, st.st_size, st.st_mtime_ns) for n, st in files)


def clear_model_cache() -> None:
    """Forget loaded models (benchmarks measuring a cold start; freeing memory between archives)."""
    with _cache_lock:
        _cache.clear()
        _forwards.clear()


def load_model(
    name: str,
    revision: str | None = None,
    device: Device = "auto",
    precision: Precision = "auto",
    expect_revision: str | None = None,
) -> LoadedModel:
    """Load (once per process) an image classifier ready for inference.

    A local folder saved again in place (new weights) is loaded again: a long-lived worker must not
    write rows under the revision of weights that are gone. Unless this process already holds
    `expect_revision` (a run's shards ask for the revision the run started with): a run keeps the
    weights it began with, whatever is saved over its folder or wherever its link is moved meanwhile."""
    key = (name, revision, device, precision)
    with _cache_lock:
        if expect_revision is not None and key in _cache and _cache[key][1].revision == expect_revision:
            return _cache[key][1]
        signature = folder_signature(name)
        if key not in _cache or _cache[key][0] != signature:
            loaded = _load(name, revision, device, precision)
            if folder_signature(name) != signature:  # the revision hashed may not be the weights read
                raise ModelError(
                    f"model folder {name!r} changed while it was being loaded (a save or copy in progress?); "
                    "run again once it is complete"
                )
            _cache[key] = (signature, loaded)
        return _cache[key][1]


@dataclass(frozen=True)
class ModelFiles:
    """A model's folder and identity, checked without building the network (cheap; needs no GPU)."""

    directory: str
    revision: str
    processor_config: dict[str, Any]
    id2label: dict[int, str]
    positive_id: int


def inspect_model(name: str, revision: str | None = None, weights: bool = True) -> ModelFiles:
    """Fetch (hub) or find (folder) a model and check its files: processor config, labels, safetensors."""
    directory, resolved_revision = fetch_model(name, revision, weights)
    processor_path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(processor_path):
        raise ModelError(
            f"model {name!r} has no preprocessor_config.json; save the image processor beside the weights "
            "(`AutoImageProcessor.from_pretrained(base).save_pretrained(folder)`)"
        )
    try:
        with open(processor_path) as handle:
            processor_config = json.load(handle)
        with open(os.path.join(directory, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the configuration of model {name!r} in {directory!r}: {exc}") from exc
    id2label = model_labels(config, name)
    return ModelFiles(
        directory, resolved_revision, processor_config, id2label, positive_class(id2label, name)
    )


@contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar per load: two lines of carriage returns in
    every nightly log, for a load that takes well under a second from disk. Off while loading (a hub
    download keeps huggingface_hub's own bar); left as it was afterwards."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


class _DropLoadReport(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.dropped.append(record)
            return False
        return True


@contextmanager
def no_load_report() -> Iterator[None]:
    """transformers logs a table of every tensor missing from the weights or of another shape (30 lines
    or more; "Consider training on your downstream task"). check_weights says the same in one line with
    the fix, or accepts it (a new head when training): the table is dropped while loading, unless the
    load itself fails (transformers' error then points at "the above report": it is shown)."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    except BaseException:
        logger.removeFilter(report_filter)
        for record in report_filter.dropped:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(report_filter)


@contextmanager
def loading_weights(name: str, directory: str, what: str = "model") -> Iterator[None]:
    """Around from_pretrained: its failures become a ModelError naming the model and the fix (a damaged
    or cut-short safetensors file raised safetensors' own error, a traceback instead of an `error:`
    line); transformers' loading bar and its LOAD REPORT table are off meanwhile."""
    from safetensors import SafetensorError

    try:
        with no_loading_bar(), no_load_report():
            yield
    except SafetensorError as exc:
        raise ModelError(
            f"cannot load {what} {name!r}: its weights file in {directory!r} is damaged or incomplete "
            f"({exc}); save it again (`save_pretrained`) or download it again"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {what} {name!r} from {directory!r}: {exc}") from exc


def own_weights(network: Any) -> None:
    """Copy into this process's memory the tensors that still map the weights file (safetensors loads
    by mmap, and `.to()` in the same dtype on the CPU copies nothing): new weights copied over the file
    during a run (`cp` truncates it in place) would end the process with SIGBUS at the next batch."""
    with torch.no_grad():
        for tensor in (*network.parameters(), *network.buffers()):
            tensor.data = tensor.data.clone()


def _load(name: str, revision: str | None, device: Device, precision: Precision) -> LoadedModel:
    from transformers import AutoModelForImageClassification

    torch_device = resolve_device(device)
    chosen_precision = resolve_precision(precision, torch_device)
    files = inspect_model(name, revision)
    with loading_weights(name, files.directory):
        network, loading = AutoModelForImageClassification.from_pretrained(
            files.directory,
            use_safetensors=True,
            trust_remote_code=False,
            ignore_mismatched_sizes=True,  # reported by check_weights: one line, not a traceback
            output_loading_info=True,
        )
    check_weights(loading, name, files.directory)
    network = network.to(device=torch_device, dtype=DTYPES[chosen_precision]).eval()
    if torch_device.type == "cpu":  # weights kept in their dtype still map the file: own a copy
        own_weights(network)
    return LoadedModel(
        name=name,
        revision=files.revision,
        directory=files.directory,
        network=network,
        id2label=files.id2label,
        positive_id=files.positive_id,
        processor_config=files.processor_config,
        device=torch_device,
        precision=chosen_precision,
        preprocess=make_preprocessor(files.processor_config, files.directory),
    )


def check_weights(
    loading: dict[str, Any], name: str, directory: str, new_head: bool = False, what: str = "model"
) -> None:
    """ModelError unless every tensor the model's config.json asks for was loaded from its weights.

    transformers fills a tensor missing from the weights, or of another shape, with random values and
    goes on: a config.json edited by hand or copied from another model would classify (or train) with
    random layers and write plausible-looking rows. `new_head`: the classifier head may be missing or
    of another shape (training puts a new one on its base)."""
    head = ("classifier.",) if new_head else ()
    missing = sorted(key for key in loading.get("missing_keys", ()) if not key.startswith(head))
    mismatched = sorted(
        (key, list(stored), list(wanted))
        for key, stored, wanted in loading.get("mismatched_keys", ())
        if not key.startswith(head)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) it needs are not in the weights (such as {missing[0]})")
    if mismatched:
        key, stored, wanted = mismatched[0]
        problems.append(
            f"{len(mismatched)} tensor(s) have another shape (such as {key}: {stored} in the weights, "
            f"{wanted} by config.json)"
        )
    if problems:
        raise ModelError(
            f"the weights of {what} {name!r} in {directory!r} do not fit its config.json: "
            + "; ".join(problems)
            + ". Was config.json edited, or copied from another model? Save the model again with "
            "save_pretrained (or fetch it again) so the two belong together"
        )


def check_compile(device: torch.device) -> None:
    """ModelError unless torch.compile can build kernels for `device` here: Triton on a GPU, a C++
    compiler on a CPU (inductor's own search: $CXX, else g++). Run before any work (--compile)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ModelError(
                "--compile on a GPU needs Triton, which is not installed here (`pip install triton`, the "
                "version your PyTorch names); or run without --compile"
            )
        return
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:
        raise ModelError(
            f"--compile on a CPU needs a C++ compiler and none was found ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}); install g++ (or set CXX to one), or run without --compile"
        ) from exc


class FixedBatchForward:
    """`network(pixel_values=...).logits` run at one static batch shape, built on the first call.

    Every call runs at `batch_size` images: a shorter batch (a shard's last) is padded with zeros and
    the padding's logits dropped, so a run builds once. The first call builds while other callers wait
    (two shards in flight share one model). If building fails the forward runs as plain PyTorch from
    then on, with one warning: these only change speed, and a night's run must not fail on them.
    Subclasses: CompiledForward (--compile), GraphedForward (CUDA graphs)."""

    failure_warning = ""  # "%s" is the reason

    def __init__(self, network: torch.nn.Module, batch_size: int) -> None:
        self.network = network
        self.batch_size = batch_size
        self.ready = False
        self.failed: str | None = None
        self.lock = threading.Lock()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        count = inputs.shape[0]
        if self.failed is None and count <= self.batch_size and not self.ready:
            with self.lock:
                if not self.ready and self.failed is None:
                    try:
                        self.build(self.padded(inputs))
                        self.ready = True
                    except Exception as exc:
                        if not self.expected(exc):
                            raise  # the model's own error (a bad input): as without
                        self.failed = build_failure(exc)
                        logger.warning(self.failure_warning, self.failed)
        if self.failed is not None or count > self.batch_size:
            return self.network(pixel_values=inputs).logits
        return self.run(self.padded(inputs), count)

    def padded(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] == self.batch_size:
            return inputs
        padding = inputs.new_zeros((self.batch_size - inputs.shape[0], *inputs.shape[1:]))
        return torch.cat([inputs, padding])

    def build(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def run(self, inputs: torch.Tensor, count: int) -> torch.Tensor:
        raise NotImplementedError

    def expected(self, exc: Exception) -> bool:
        """Whether `exc`, raised while building, means "cannot build here" (then: run without)."""
        raise NotImplementedError


class CompiledForward(FixedBatchForward):
    """--compile: the forward through torch.compile (inductor), compiled on the first call (a new
    shape would compile again, tens of seconds: hence one static batch). The CLI checks for the
    compiler before any work; a compile that fails anyway runs uncompiled."""

    failure_warning = "--compile failed, the model runs uncompiled (%s)"

    def __init__(self, network: torch.nn.Module, batch_size: int) -> None:
        super().__init__(network, batch_size)
        self.module = torch.compile(network, dynamic=False)

    def build(self, inputs: torch.Tensor) -> None:
        self.module(pixel_values=inputs)  # compiles

    def run(self, inputs: torch.Tensor, count: int) -> torch.Tensor:
        logits: torch.Tensor = self.module(pixel_values=inputs).logits
        return logits[:count]

    def expected(self, exc: Exception) -> bool:
        from torch._dynamo.exc import TorchDynamoException

        return isinstance(exc, TorchDynamoException)


class GraphedForward(FixedBatchForward):
    """CUDA graphs: the forward captured once and replayed, one call per batch instead of the ~1,500
    operator calls of the eager forward (each holding the GIL a little, while the engine's feeder needs
    it; bench/README.md). Same kernels, so the same outputs as the eager forward at that batch size.

    Replays run on a stream of their own, in call order under a lock: the captured input and output
    buffers are shared, and two shards in flight call from two threads. A capture that fails (a model
    whose forward synchronizes with the host, too little memory) runs eager."""

    failure_warning = "CUDA graphs failed, the model runs without them (%s)"

    def build(self, inputs: torch.Tensor) -> None:
        device = inputs.device
        self.static_inputs = inputs.clone()
        warm = torch.cuda.Stream(device)
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(warm):
            for _ in range(3):  # warm-up (cuBLAS handles, autotuning) on a side stream, as capture asks
                self.network(pixel_values=self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's calls may break the capture (the feeder keeps decoding)
        with torch.inference_mode(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_logits = self.network(pixel_values=self.static_inputs).logits
        self.stream = torch.cuda.Stream(device)

    def run(self, inputs: torch.Tensor, count: int) -> torch.Tensor:
        caller = torch.cuda.current_stream(inputs.device)
        with self.lock:
            self.stream.wait_stream(caller)  # the inputs are ready, the previous logits read
            with torch.cuda.stream(self.stream):
                self.static_inputs.copy_(inputs)
                self.graph.replay()
                logits = self.static_logits[:count].clone()  # the next replay overwrites the buffer
            caller.wait_stream(self.stream)
        inputs.record_stream(self.stream)
        logits.record_stream(caller)
        return logits

    def expected(self, exc: Exception) -> bool:
        return isinstance(exc, RuntimeError)  # CUDA capture errors, out of memory


def build_failure(exc: BaseException) -> str:
    """What stopped the build, in one line: the compiler's own error, not dynamo's wrapper."""
    cause = getattr(exc, "inner_exception", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


FORWARDS: dict[str, type[FixedBatchForward]] = {"compile": CompiledForward, "cuda_graphs": GraphedForward}
# (id(network), kind, batch size) → its forward (which holds the network, so the id stays its own)
_forwards: dict[tuple[int, str, int], FixedBatchForward] = {}


def fixed_batch_forward(model: LoadedModel, kind: str, batch_size: int) -> FixedBatchForward:
    """The model's forward of `kind` (FORWARDS) for `batch_size`, built once per process and reused by
    every shard."""
    with _cache_lock:
        key = (id(model.network), kind, batch_size)
        if key not in _forwards:
            _forwards[key] = FORWARDS[kind](model.network, batch_size)
        return _forwards[key]


def compiled_forward(model: LoadedModel, batch_size: int) -> FixedBatchForward:
    """The model's --compile forward for `batch_size`."""
    return fixed_batch_forward(model, "compile", batch_size)
