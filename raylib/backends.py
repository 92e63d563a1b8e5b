"""Training backends: how the worker loop wraps model, optimizer and data for distribution.

`accelerate` (the default) wraps the model in DDP over the process group Ray Train already
set up (gloo on CPU, NCCL on GPU), with mixed precision and gradient accumulation.

`deepspeed` is the same Accelerate loop with Accelerate's `DeepSpeedPlugin`: `prepare` hands
model + optimizer to `deepspeed.initialize` (ZeRO stage 2 or 3, optional CPU offload), and
`accelerator.backward` runs `engine.backward` + `engine.step`. The DeepSpeed config is
generated from the job by `deepspeed_config` (a pure function, printed by
`raylib train --print-deepspeed-config`) with the user's `backend.config` deep-merged on top.

The optimizer stays ours (`build_optimizer`: AdamW, SGD, bitsandbytes 8-bit / paged 8-bit
AdamW for QLoRA) and is passed to DeepSpeed as a client optimizer, and so does our LR
scheduler: that keeps every method's optimizer choice and the checkpoint format of the
scheduler identical on both backends. DeepSpeed's own optimizer/scheduler can still be
chosen through the escape hatch (`backend.config: {optimizer: ..., scheduler: ...}`).

`fsdp` is PyTorch FSDP2 (`fully_shard`) through Accelerate's `FullyShardedDataParallelPlugin`
(`fsdp_version=2`) in the same loop: `prepare` shards every transformer block (the model's
`_no_split_modules`), the embeddings/head and the root over the process group; parameters,
gradients and optimizer state are DTensor shards, `accelerator.backward` / `clip_grad_norm_` /
`accumulate` are Accelerate's FSDP2 paths. Options: `backend.fsdp_cpu_offload`,
`backend.fsdp_reshard_after_forward`, `backend.mixed_precision` (a MixedPrecisionPolicy with
fp32 gradient reduction), `train.gradient_checkpointing` (Accelerate's per-block activation
checkpointing instead of transformers'). Checkpoints hold every rank's shard
(torch.distributed.checkpoint, train_state/fsdp/) and a consolidated expert (the trainable
tensors gathered whole to rank 0). Accelerate 1.15 only turns FSDP on for accelerator devices
(`AcceleratorState` sets DistributedType.FSDP in its multi-GPU/XPU/NPU branch; on CPU the
plugin is silently dropped and the model would be DDP-wrapped), so on CPU `make_fsdp_accelerator`
sets the FSDP state itself over the gloo group: `fully_shard` and DTensor collectives run on
gloo, and everything after that is Accelerate's own FSDP2 code.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """`auto` -> bf16 autocast on a bf16-capable GPU, none on CPU (CPU autocast is slow)."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(job, device_type: str):
    from accelerate.state import AcceleratorState

    # Accelerate keeps process-wide state; a second run in one process (a plain run after
    # another, a benchmark) with another precision or backend would otherwise be refused
    AcceleratorState._reset_state(True)
    if job.backend.name == "deepspeed":
        return make_deepspeed_accelerator(job, device_type)
    if job.backend.name == "fsdp":
        return make_fsdp_accelerator(job, device_type)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=device_type == "cpu",
        mixed_precision=resolve_mixed_precision(job.backend.mixed_precision, device_type),
        gradient_accumulation_steps=job.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(model, train_cfg):
    """Optimizer over the trainable parameters; no weight decay on biases and norms."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    name = train_cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=0.9)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=train_cfg.lr)
    if name == "paged_adamw_8bit":
        device_type = groups[0]["params"][0].device.type
        if device_type != "cuda":
            # bitsandbytes pages optimizer state through CUDA unified memory only; elsewhere it
            # warns on every step and runs unpaged. Say it once, in our words, and run that.
            logging.getLogger("raylib.backends").info(
                "optimizer paged_adamw_8bit: paging needs CUDA, so on %s it steps as adamw_8bit", device_type)
            return bnb.optim.AdamW8bit(groups, lr=train_cfg.lr)
        return bnb.optim.PagedAdamW8bit(groups, lr=train_cfg.lr)
    raise ValueError(f"unknown optimizer {name!r}")


# --------------------------------------------------------------------------- deepspeed

#: (method, ZeRO stage) pairs that cannot run under DeepSpeed, with the reason (a ConfigError
#: before Ray starts). Every other method of the registry runs on both stages (tests/test_backends.py).
DEEPSPEED_UNSUPPORTED: dict[tuple[str, int], str] = {
    ("qlora", 3): (
        "ZeRO-3 partitions parameters while the model loads (zero.Init), and transformers refuses the "
        "device_map that places bitsandbytes 4-bit weights ('DeepSpeed Zero-3 is not compatible with "
        "passing a device_map'); the frozen 4-bit base is small anyway, so ZeRO-2 (partitioned LoRA "
        "optimizer state and gradients) is the stage for QLoRA"
    ),
}


def deepspeed_unsupported(method: str, stage: int) -> str | None:
    """Why `method` cannot run under ZeRO `stage`, or None when it can."""
    return DEEPSPEED_UNSUPPORTED.get((method, stage))


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, recursing into nested dicts (a new dict; inputs untouched)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_deepspeed_config(backend) -> dict:
    """`backend.config`: an inline dict, or the path of a JSON (or YAML) file holding one."""
    cfg = backend.config
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    from raylib.errors import ConfigError

    if not os.path.isfile(cfg):
        raise ConfigError("backend.config", f"{cfg!r} does not exist", "give the path of a DeepSpeed JSON config, or an inline mapping")
    with open(cfg) as f:
        text = f.read()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("backend.config", f"{cfg} is neither JSON nor YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(loaded, dict):
        raise ConfigError("backend.config", f"{cfg} must hold a JSON object (DeepSpeed config keys)")
    return loaded


def deepspeed_config(job, world_size: int | None = None, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config for `job` on `world_size` workers, user JSON merged on top.

    Generated: micro batch = train.batch_size, accumulation = train.grad_accum, global batch =
    micro x accumulation x world, bf16/fp16 from backend.mixed_precision (resolved for
    `device_type` like the Accelerate backend), gradient_clipping = train.max_grad_norm,
    ZeRO stage and offload from the backend keys. Client optimizers are allowed (ours, see
    the module docstring), also with offload.
    """
    b, t = job.backend, job.train
    world = world_size or job.scaling.num_workers
    precision = resolve_mixed_precision(b.mixed_precision, device_type)
    zero: dict[str, Any] = {"stage": b.zero_stage}
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if b.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if b.zero_stage == 3:
        # one full 16-bit state dict on rank 0 at save time: lets us write consolidated outputs
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    generated = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our optimizer (torch / bitsandbytes) as client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also under optimizer offload
        "steps_per_print": 10**9,  # progress is ours; DeepSpeed's own step log is noise
        "wall_clock_breakdown": False,
    }
    return deep_merge(generated, user_deepspeed_config(b))


DEEPSPEED_FIELDS = ("zero_stage", "offload_optimizer", "offload_params", "config")
FSDP_FIELDS = ("fsdp_cpu_offload", "fsdp_reshard_after_forward")
#: what an FSDP job uses instead of a DeepSpeed option (the fix of its ConfigError)
FSDP_EQUIVALENT = {
    "zero_stage": "FSDP2 always shards parameters, gradients and optimizer state (like ZeRO-3); "
                  "backend.fsdp_reshard_after_forward: false keeps gathered parameters until backward (like ZeRO-2)",
    "offload_optimizer": "under fsdp, backend.fsdp_cpu_offload: true offloads parameters, gradients and optimizer "
                         "state",
    "offload_params": "under fsdp, backend.fsdp_cpu_offload: true offloads parameters, gradients and optimizer state",
    "config": "FSDP options are backend.fsdp_cpu_offload, backend.fsdp_reshard_after_forward, backend.mixed_precision "
              "and train.gradient_checkpointing",
}


def _set_by_user(b, key: str) -> bool:
    """A resolved job (job.yaml, Tune trials) spells out every default: only a value that
    differs from the default means the user set that backend's option here."""
    default = type(b).model_fields[key].get_default(call_default_factory=True)
    return key in b.model_fields_set and getattr(b, key) != default


def check(job) -> None:
    """Driver-side backend validation (ConfigError naming the field and the fix)."""
    from raylib.errors import ConfigError

    b = job.backend
    if b.name != "fsdp":
        for key in FSDP_FIELDS:
            if _set_by_user(b, key):
                raise ConfigError(f"backend.{key}", f"is an FSDP option, but backend.name is {b.name!r}",
                                  f"set backend.name: fsdp, or remove backend.{key}")
    if b.name != "deepspeed":
        for key in DEEPSPEED_FIELDS:
            if _set_by_user(b, key):
                fix = f"set backend.name: deepspeed, or remove backend.{key}"
                if b.name == "fsdp":
                    fix += "; " + FSDP_EQUIVALENT[key]
                raise ConfigError(f"backend.{key}", f"is a DeepSpeed option, but backend.name is {b.name!r}", fix)
        if b.name == "fsdp":
            check_fsdp(job)
        return
    if b.offload_params and b.zero_stage != 3:
        raise ConfigError("backend.offload_params", f"parameter offload needs ZeRO stage 3 (zero_stage is {b.zero_stage})",
                          "set backend.zero_stage: 3, or remove backend.offload_params")
    from raylib.objectives import BATCH_OBJECTIVES

    if job.objective.name not in BATCH_OBJECTIVES:
        raise ConfigError("backend.name", f"objective {job.objective.name!r} samples rollouts from the policy "
                          "between optimizer steps (grpo: inside TRL's trainer), which is not wired to ZeRO's sharded "
                          f"parameters; the DeepSpeed backend runs {', '.join(BATCH_OBJECTIVES)}",
                          "use backend.name: accelerate with this objective")
    reason = deepspeed_unsupported(job.method.name, b.zero_stage)
    if reason:
        other = 2 if b.zero_stage == 3 else 3
        fix = ("use backend.name: accelerate for this method" if deepspeed_unsupported(job.method.name, other)
               else f"set backend.zero_stage: {other}, or use backend.name: accelerate")
        raise ConfigError("backend.zero_stage", f"method {job.method.name!r} cannot run under DeepSpeed ZeRO-{b.zero_stage}: "
                          f"{reason}", fix)
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("backend.name", "deepspeed is not installed here",
                          "pip install deepspeed, or use backend.name: accelerate")
    cfg = deepspeed_config(job)
    user = user_deepspeed_config(b)
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ConfigError("backend.config", f"zero_optimization.stage {stage!r}: raylib runs ZeRO stage 2 or 3",
                          "set backend.zero_stage instead of zero_optimization.stage in the JSON")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in user:
            raise ConfigError(f"backend.config.{key}", "batch sizes are generated from the job, not merged",
                              "set train.batch_size / train.grad_accum / scaling.num_workers instead")
    if "scheduler" in user and "optimizer" not in user:
        raise ConfigError("backend.config.scheduler", "a DeepSpeed scheduler needs DeepSpeed's optimizer",
                          "add backend.config.optimizer too, or drop the scheduler (train.lr_scheduler is used)")


def make_deepspeed_accelerator(job, device_type: str):
    """An Accelerator whose `prepare` runs `deepspeed.initialize` with the generated config.

    Accelerate only enables DeepSpeed when `cpu=False`; on a CPU-only worker we pass the
    process group's backend (gloo, already initialised by Ray Train) explicitly, so
    Accelerate keeps the world size Ray set up and DeepSpeed uses its CPU accelerator.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin, InitProcessGroupKwargs

    if not torch.distributed.is_initialized():  # no Ray (plain run, torchrun): DeepSpeed needs a group
        import deepspeed

        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl")
    prepare_cpu_ops(device_type)
    config = deepspeed_config(job, torch.distributed.get_world_size(), device_type)
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    precision = resolve_mixed_precision(job.backend.mixed_precision, device_type)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if device_type == "cpu" else []
    return Accelerator(
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- deepspeed in the loop

DS_TAG = "engine"  # one engine checkpoint per Ray checkpoint directory: a fixed tag


def deepspeed_engine(accelerator, model):
    """The DeepSpeedEngine `accelerator.prepare` returned, or None on the accelerate backend."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return model


def engine_backward_and_step(engine, loss, sync_gradients: bool, before_step=None) -> None:
    """What `accelerator.backward` does under DeepSpeed (accelerate's DeepSpeedEngineWrapper),
    with a hook between the engine's backward and its step: ZeRO's reduced (partitioned)
    gradients exist only there, and AdaLoRA's rank allocator scores weights by them.
    The engine scales the loss for accumulation and clips (gradient_clipping) itself."""
    engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
    engine.backward(loss)
    if sync_gradients:
        if before_step is not None:
            before_step()
        engine.step()


def zero_stage(engine) -> int:
    return engine.zero_optimization_stage() if engine is not None else 0


def needs_lockstep(engine, model=None) -> bool:
    """ZeRO-3 and FSDP2 forwards gather parameters collectively: every rank must run each one."""
    return zero_stage(engine) == 3 or (model is not None and is_fsdp2(model))


def save_engine_state(engine, out_dir: str) -> None:
    """Collective: every rank writes its ZeRO shard (optimizer + trainable fp32 partition).

    Frozen weights (a PEFT method's base model) are not written: they come from model.path.
    """
    os.makedirs(out_dir, exist_ok=True)
    engine.save_checkpoint(out_dir, tag=DS_TAG, exclude_frozen_parameters=True)


def load_engine_state(engine, ckpt_dir: str) -> None:
    """Collective: restore weights and optimizer state written by `save_engine_state`."""
    path, _ = engine.load_checkpoint(
        ckpt_dir, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no engine checkpoint in {ckpt_dir}")


def gathered_trainable(model):
    """Context: under ZeRO-3 the trainable parameters whole on every rank (collective).

    A PEFT method saves only its trainable tensors, so that is all we gather: the frozen
    base stays partitioned. For full fine-tuning that is the whole model (it must fit one
    worker's memory at save time). Elsewhere a no-op.
    """
    return gathered_zero3_params(model, trainable_only=True)


def gathered_zero3_params(model, trainable_only: bool = False):
    """Context: every ZeRO-3-partitioned parameter of `model` (or only the trainable ones)
    whole on this rank, e.g. for a forward outside the engine; a no-op when nothing is
    partitioned (accelerate, ZeRO-2)."""
    import contextlib

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id") and (p.requires_grad or not trainable_only)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def print_deepspeed_config(job, local: bool = False, stream=None) -> None:
    """What `raylib train --print-deepspeed-config` shows: the config each worker will use."""
    import sys

    from raylib.errors import ConfigError

    if job.backend.name != "deepspeed":
        raise ConfigError("backend.name", f"is {job.backend.name!r}: there is no DeepSpeed config to print",
                          "set backend.name: deepspeed (e.g. --set backend.name=deepspeed)")
    use_gpu = job.scaling.use_gpu
    if use_gpu == "auto":
        import torch

        use_gpu = torch.cuda.is_available()
    world = 1 if local else job.scaling.num_workers
    json.dump(deepspeed_config(job, world, "cuda" if use_gpu else "cpu"), stream or sys.stdout, indent=2)
    print(file=stream or sys.stdout)


def prepare_cpu_ops(device_type: str) -> None:
    """Build/load DeepSpeed's CPU shared-memory comm op safely before DeepSpeed does.

    DeepSpeed JIT-builds the op through torch's cpp_extension, whose lock is a plain file
    ("baton"): a worker killed while holding it (a failed run, Ray restarting workers)
    leaves the file behind and every later DeepSpeed process waits on it forever. Here the
    check runs under an OS lock (released when its holder dies); a baton found while we
    hold it is stale and is removed. DeepSpeed's own later load then finds the op built.
    """
    if device_type != "cpu":
        return
    import filelock
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    build_dir = _get_build_directory(builder.name, verbose=False)
    with filelock.FileLock(os.path.join(build_dir, "raylib-build.lock"), timeout=900):
        baton = os.path.join(build_dir, "lock")
        if os.path.exists(baton):
            logging.getLogger("raylib.backends").warning("removing a stale DeepSpeed build lock %s", baton)
            os.remove(baton)
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()


# --------------------------------------------------------------------------- fsdp (FSDP2)

#: methods that cannot run under FSDP2, with the reason (a ConfigError before Ray starts).
#: Every other method of the registry runs (tests/test_fsdp.py).
FSDP_UNSUPPORTED: dict[str, str] = {
    "adalora": (
        "AdaLoRA reads its adapter weights outside the blocks' forward (the orthogonality regulariser in "
        "AdaLoraModel.forward, after FSDP2 has resharded them: 'The size of tensor a (4) must match the size of "
        "tensor b (8)') and its rank allocator scores whole gradients and masks weights in place, which are "
        "DTensor shards under FSDP2 (DeepSpeed has a gathered view for this; FSDP2 has none)"
    ),
}

#: train.optimizer values FSDP2 cannot step, with the reason
FSDP_UNSUPPORTED_OPTIMIZERS: dict[str, str] = {
    name: ("bitsandbytes' 8-bit optimizers update parameters through their own kernels, which have no DTensor "
           "sharding rule, and every trainable parameter is a DTensor shard under FSDP2 ('Operator "
           "bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy registered')")
    for name in ("adamw_8bit", "paged_adamw_8bit")
}


def fsdp_unsupported(method: str) -> str | None:
    """Why `method` cannot run under FSDP2, or None when it can."""
    return FSDP_UNSUPPORTED.get(method)


def check_fsdp(job) -> None:
    """Driver-side checks of `backend.name: fsdp` (ConfigError naming the field and the fix)."""
    from raylib.errors import ConfigError
    from raylib.objectives import BATCH_OBJECTIVES

    if job.objective.name not in BATCH_OBJECTIVES:
        raise ConfigError("backend.name", f"objective {job.objective.name!r} samples rollouts from the policy "
                          "between optimizer steps (grpo: inside TRL's trainer), which is not wired to FSDP2's sharded "
                          f"parameters; the FSDP backend runs {', '.join(BATCH_OBJECTIVES)}",
                          "use backend.name: accelerate with this objective")
    reason = fsdp_unsupported(job.method.name)
    if reason:
        ds = [stage for stage in (2, 3) if not deepspeed_unsupported(job.method.name, stage)]
        fix = "use backend.name: accelerate" + (" or deepspeed" if ds else "") + " for this method"
        raise ConfigError("backend.name", f"method {job.method.name!r} cannot run under FSDP2: {reason}", fix)
    reason = FSDP_UNSUPPORTED_OPTIMIZERS.get(job.train.optimizer)
    if reason:
        from raylib.methods import get_method

        default = get_method(job.method.name).default_optimizer == job.train.optimizer
        whose = f" ({job.method.name}'s default optimizer)" if default else ""
        raise ConfigError("train.optimizer", f"{job.train.optimizer}{whose} cannot step under FSDP2: {reason}",
                          "set train.optimizer: adamw (or sgd), or use backend.name: accelerate or deepspeed")


def make_fsdp_accelerator(job, device_type: str):
    """An Accelerator whose `prepare` runs Accelerate's FSDP2 path (`fully_shard` per block).

    Without a process group (a plain run, one process) a world of one is set up first: FSDP2
    shards over a device mesh. On CPU, Accelerate 1.15 leaves an FSDP plugin unused (see the
    module docstring), so the state is switched to FSDP here; prepare, backward, clipping,
    accumulation and state dicts are then Accelerate's FSDP2 code over gloo.
    """
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo" if device_type == "cpu" else "nccl")
    b, precision = job.backend, resolve_mixed_precision(job.backend.mixed_precision, device_type)
    policy = None
    if precision != "no":  # compute in 16 bit, reduce gradients in fp32 (the sharded master weights stay fp32)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=b.fsdp_reshard_after_forward,
        # pinned host memory needs CUDA; on CPU the policy only keeps the shards where they are
        cpu_offload=CPUOffloadPolicy(pin_memory=device_type == "cuda") if b.fsdp_cpu_offload else False,
        auto_wrap_policy="transformer_based_wrap",  # one FSDP unit per block of `_no_split_modules`
        activation_checkpointing=job.train.gradient_checkpointing,
        mixed_precision_policy=policy,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,  # every rank loads the model (see models.load_model)
    )
    # Accelerate marks the process with ACCELERATE_USE_FSDP=true, which a later Accelerator in the
    # same process (another run, a benchmark) would take as "use FSDP": keep the environment as it was
    before = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        accelerator = Accelerator(
            cpu=device_type == "cpu",
            mixed_precision=precision,
            fsdp_plugin=plugin,
            gradient_accumulation_steps=job.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            step_scheduler_with_optimizer=False,
        )
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = before
    if accelerator.distributed_type != DistributedType.FSDP:
        if device_type != "cpu":
            raise RuntimeError(f"Accelerate did not enable FSDP on {device_type} "
                               f"(distributed type {accelerator.distributed_type})")
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        if precision == "fp16":  # what Accelerate makes for FSDP2 on a GPU: fp16 needs loss scaling
            from accelerate.utils.fsdp_utils import get_fsdp2_grad_scaler

            accelerator.scaler = get_fsdp2_grad_scaler(device="cpu")
            accelerator.native_amp = True
    return accelerator


def is_fsdp2(model) -> bool:
    """`model` was sharded by FSDP2's `fully_shard` (what `prepare` returns on the fsdp backend)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a PEFT method's base model) are not written: they come from model.path
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def save_fsdp_state(model, optimizer, out_dir: str) -> None:
    """Collective: every rank writes its shard of the trainable weights and of the optimizer
    state (torch.distributed.checkpoint: `__<rank>_0.distcp`, rank 0 also `.metadata`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _torch_optimizer(optimizer), options=_fsdp_options())
    os.makedirs(out_dir, exist_ok=True)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=out_dir)


def load_fsdp_state(model, optimizer, ckpt_dir: str) -> None:
    """Collective: restore the shards written by `save_fsdp_state` (any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not os.path.isfile(os.path.join(ckpt_dir, ".metadata")):
        raise RuntimeError(f"no FSDP checkpoint (torch.distributed.checkpoint .metadata) in {ckpt_dir}")
    opt = _torch_optimizer(optimizer)
    model_sd, optim_sd = get_state_dict(model, opt, options=_fsdp_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_fsdp_options(strict=False))


def _canonical_fqn(name: str) -> str:
    """A parameter name as torch.distributed.checkpoint's state dicts spell it (no wrappers)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def fsdp_consolidated(model, rank: int):
    """Context (collective): the trainable tensors of an FSDP2 `model` gathered whole to rank 0
    (fp32, CPU) and, on rank 0 only, put in place of the DTensor shards, with the modules'
    original classes and without activation checkpointing's wrappers, so a method's `save`
    (save_pretrained, ...) sees a plain model and writes a plain, consolidated expert. Frozen
    weights stay sharded (a PEFT expert does not hold them; full fine-tuning trains them all,
    so then the whole model is gathered: it must fit rank 0's CPU memory).
    Everything is put back on exit; no forward may run inside. Elsewhere a no-op."""
    import contextlib

    if not is_fsdp2(model):
        return contextlib.nullcontext()
    return _fsdp_consolidated(model, rank)


def _fsdp_consolidated(model, rank: int):
    import contextlib

    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    @contextlib.contextmanager
    def ctx():
        full = get_model_state_dict(model, options=_fsdp_options(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            yield model
            return
        made: dict[int, torch.nn.Parameter] = {}
        swapped, classes, unwrapped = [], [], []
        try:
            # activation checkpointing's CheckpointWrapper out of the tree: PEFT picks the adapter's
            # keys by module names, which must be the plain model's (no "_checkpoint_wrapped_module")
            for parent in list(model.modules()):
                for child_name, child in list(parent._modules.items()):
                    inner = getattr(child, "_checkpoint_wrapped_module", None)
                    if inner is not None:
                        parent._modules[child_name] = inner
                        unwrapped.append((parent, child_name, child))
            for mod_name, module in model.named_modules():
                for p_name, p in list(module._parameters.items()):
                    if not isinstance(p, DTensor):
                        continue
                    if id(p) not in made:
                        fqn = _canonical_fqn(f"{mod_name}.{p_name}" if mod_name else p_name)
                        if fqn not in full:
                            if p.requires_grad:
                                raise RuntimeError(f"{fqn} is missing from the gathered FSDP state dict")
                            continue  # frozen: not part of the expert
                        made[id(p)] = torch.nn.Parameter(full[fqn], requires_grad=p.requires_grad)
                    module._parameters[p_name] = made[id(p)]
                    swapped.append((module, p_name, p))
                if isinstance(module, FSDPModule):  # FSDP<Class> -> Class (config.json "architectures")
                    bases = [c for c in type(module).__bases__ if c is not FSDPModule]
                    if len(bases) == 1:
                        classes.append((module, type(module)))
                        module.__class__ = bases[0]
            yield model
        finally:
            for module, p_name, p in reversed(swapped):
                module._parameters[p_name] = p
            for module, cls in classes:
                module.__class__ = cls
            for parent, child_name, child in reversed(unwrapped):
                parent._modules[child_name] = child

    return ctx()
