"""Several GPUs for one video: diffusers' context parallelism on this project's transformers, in one call.

    # torchrun --nproc-per-node 2 make_video.py
    torch.distributed.init_process_group()
    pipe = load_pipeline(device=f"cuda:{rank}")          # every rank loads the same pipeline
    enable_context_parallel(pipe)                        # Ulysses over the ranks of the world
    video = pipe(prompt, generator=torch.Generator().manual_seed(0)).frames[0]   # same call, same video everywhere
    if torch.distributed.get_rank() == 0:
        export_video(video, "out.mp4")
    leave_process_group()                                # every rank meets and exits

Each rank runs the whole call with the same inputs; inside the transformer every rank holds a share of the video's
tokens, and the output is gathered back onto every rank. Under Ulysses every attention method of this project runs
(`attention.context_parallel`); under ring attention only dense attention does.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from attention import current_method
from attention.context_parallel import ContextParallel

KINDS = ("ulysses", "ring")


def leave_process_group(code: int = 0):
    """The end of a process of a torchrun launch that initialised torch.distributed: every rank meets, the process
    group is torn down, and the process exits with `code` at once (output flushed first). A process left to the
    interpreter's and C++ runtime's exit after a gloo group has now and then aborted one rank ("terminate called
    without an active exception") after its work was done, failing the launch; an immediate exit skips that teardown.
    Without an initialised group it only returns."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def enable_context_parallel(pipe_or_transformer, kind: str = "ulysses", degree: int | None = None):
    """Splits each video's tokens across the ranks of the initialised torch.distributed world, through diffusers'
    `ContextParallelConfig` and `transformer.enable_parallelism`. Returns the transformer.

    pipe_or_transformer: a pipeline (its `transformer` is used) or a transformer: this project's `VideoDiT`, or
        diffusers' `WanTransformer3DModel`. An attention method may be applied before or after this call.
    kind: "ulysses": around each attention the ranks exchange tokens for heads (all-to-all), so every rank attends
        over the whole video for a share of the heads; every attention method runs, unchanged. "ring": queries stay
        and keys and values pass around the ranks; dense attention only, on an attention backend that returns its
        log-sum-exp (diffusers' "flash", "_native_cudnn", "_native_flash": `transformer.set_attention_backend`).
    degree: the number of ranks one video is split over; None (the default) takes the world size, the only degree
        supported: every process of the world works on the same video.

    A video's token count must divide by the degree (`check_video_shape` says so before generating).

    Raises RuntimeError when torch.distributed is not initialised (launch with torchrun, or call
    `torch.distributed.init_process_group`), and ValueError for an unknown kind, a world of one process, a degree
    other than the world size, heads that do not divide by the degree (Ulysses), a model without a plan (the
    block-diffusion and MATE models), or under ring a method other than dense or diffusers' "native" backend.
    diffusers raises RuntimeError when parallelism is already enabled on the model.
    """
    from diffusers import ContextParallelConfig

    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group: launch with "
                           "torchrun (or accelerate launch) and call torch.distributed.init_process_group() first")
    world = torch.distributed.get_world_size()
    if world < 2:
        raise ValueError("context parallelism splits a video across processes, and this world has one: launch "
                         "several (torchrun --nproc-per-node N)")
    degree = world if degree is None else int(degree)
    if degree != world:
        raise ValueError(f"degree must be the world size ({world}): every process works on the same video, got "
                         f"{degree}")
    _check_model(transformer, kind, degree)

    config = ContextParallelConfig(ulysses_degree=degree) if kind == "ulysses" else ContextParallelConfig(
        ring_degree=degree)
    with _cpu_ranks_without_accelerator():
        transformer.enable_parallelism(config=config)
    return transformer


def _check_model(transformer, kind: str, degree: int) -> None:
    name = type(transformer).__name__
    if hasattr(transformer, "chunk_call"):
        raise ValueError(f"{name} (block diffusion) does not support context parallelism: a chunk's tokens, its "
                         "caption segments and its KV cache stay on one rank")
    if getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"{name} has no context-parallel plan (`_cp_plan`): diffusers cannot split its forward")
    heads = transformer.config.num_attention_heads
    if kind == "ulysses" and heads % degree:
        raise ValueError(f"Ulysses context parallelism gives each rank a share of the attention heads: {name}'s "
                         f"{heads} heads do not divide among {degree} ranks")
    if kind == "ring":
        ContextParallel("ring", degree).require_dense(current_method(transformer) or "dense")
        if _attention_backend(transformer) == "native":
            raise ValueError("ring attention merges partial attentions by their log-sum-exp, which diffusers' "
                             "'native' attention backend does not return: call transformer.set_attention_backend() "
                             "with 'flash', '_native_cudnn' or '_native_flash' first, or use Ulysses")


def _attention_backend(transformer) -> str:
    """The diffusers attention backend the model's attention runs on: a processor's own, else the active one."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
    return _AttentionBackendRegistry.get_active_backend()[0].value


@contextlib.contextmanager
def _cpu_ranks_without_accelerator():
    """diffusers places rank r on device `r % torch.accelerator.device_count()`, a division by zero on a machine
    without an accelerator (CPU processes over gloo). There every rank runs on the CPU: count one device meanwhile."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    device_count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = device_count


__all__ = ["enable_context_parallel"]
