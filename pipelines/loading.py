"""One-line loading of a text-to-video pipeline, and writing its frames to a video file.

    from pipelines import load_pipeline, export_video
    pipe = load_pipeline()                         # the embedded model, on CUDA if there is one
    video = pipe("a red circle moves to the right on black").frames[0]
    export_video(video, "red_circle.mp4")

    pipe = load_pipeline("Wan2.1-T2V-1.3B-Diffusers", attention="vmoba")   # a local diffusers folder of a real model
    pipe = load_pipeline(cache="first-block")      # a step cache (pipelines.caches)
    pipe = load_pipeline(parallel="ulysses")       # under torchrun: one video split over every process
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipelines.block_diffusion import BlockDiffusionPipeline
from pipelines.caches import NOT_UNDER_CONTEXT_PARALLELISM, check_cache_name, install_cache
from pipelines.parallel import KINDS as PARALLEL_KINDS, enable_context_parallel
from pipelines.text_to_video import TextToVideoPipeline
from t2v import TRAINED_ATTENTION_FILE  # a folder names the attention its weights were fine-tuned with; re-exported

VIDEO_SUFFIXES = (".mp4", ".gif")
# This project's pipeline classes a folder's model_index.json may name.
PIPELINE_CLASSES = {cls.__name__: cls for cls in (TextToVideoPipeline, BlockDiffusionPipeline)}
# diffusers' own pipelines of real models, whose transformers the attention adapters support (Wan 2.1 and 2.2 share
# WanPipeline). They load with their own class and keep their own call; this project's guidance does not apply.
DIFFUSERS_PIPELINES = ("WanPipeline", "HunyuanVideoPipeline", "CogVideoXPipeline")


def available_models() -> dict[str, Path]:
    """Models known by name: the one embedded in the package (first) and its variants."""
    from t2v import EMBEDDED_MODEL, EMBEDDED_VARIANTS, embedded_model_path

    names = (EMBEDDED_MODEL, *EMBEDDED_VARIANTS)
    return {name: embedded_model_path(name) for name in names if embedded_model_path(name).is_dir()}


def _read_trained(path: str | os.PathLike, read):
    """`read` of a folder's attention_config.json (None without one); a malformed file names its path."""
    config = Path(path) / TRAINED_ATTENTION_FILE
    if not config.is_file():
        return None
    try:
        return read(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read {config}: {error}") from error


def trained_attention(path: str | os.PathLike) -> tuple[str, dict] | None:
    """(method, options) a pipeline folder's weights were fine-tuned with, or None for the model's own attention."""
    return _read_trained(path, lambda data: (str(data["method"]), dict(data.get("options", {})))
                         if "method" in data else None)


def trained_high_noise_model(path: str | os.PathLike) -> tuple[str, float] | None:
    """(model, boundary_ratio) that attention_config.json names to run a fine-tuned folder's noisiest steps (its
    `high_noise_model`: the dense model a sparse variant was distilled from), or None."""
    def read(data):
        lead = data.get("high_noise_model")
        return None if lead is None else (str(lead["model"]), float(lead["boundary_ratio"]))
    return _read_trained(path, read)


def trained_opening_model(path: str | os.PathLike) -> tuple[str, int] | None:
    """(model, frames) that attention_config.json names to make a block model's first frames (its
    `opening_model`: a bidirectional model at the length it was trained at), or None."""
    def read(data):
        opening = data.get("opening_model")
        return None if opening is None else (str(opening["model"]), int(opening["frames"]))
    return _read_trained(path, read)


def _dense_companion(path, cls: type, host: type, role: str, name: str) -> Path:
    """The folder of the dense model that attention_config.json names for `role`, checked: only `host` folders take
    one, and it must be a TextToVideoPipeline folder."""
    if cls is not host:
        raise ValueError(f"{path}: {role} is supported only by {host.__name__} folders")
    companion = resolve_model_path(name)
    if pipeline_class(companion) is not TextToVideoPipeline:
        raise ValueError(f"{path}: its {role.split(' ', 1)[1]} {name!r} is not a TextToVideoPipeline folder")
    return companion


def measured_quality(path: str | os.PathLike) -> str | None:
    """One line of a folder's measured quality (its quality.json), or None where none was shipped. Fields: accuracy
    and what it counts (`of`), clips, optionally the dense model's accuracy on the same clips and, for a sparse
    variant, `psnr` (mean, median, under_20db, under_10db: PSNR of each clip against the dense model's clip from
    the same seed), device, date."""
    from t2v import QUALITY_FILE

    file = Path(path) / QUALITY_FILE
    if not file.is_file():
        return None
    try:
        q = json.loads(file.read_text())
        text = f"{q['accuracy']:.1%} {q['of']} ({q['clips']:,} held-out clips"
        if "dense_accuracy" in q:
            text += f", the dense model {q['dense_accuracy']:.1%}"
        psnr = q.get("psnr")
        if psnr:
            text += (f"; {psnr['mean']:.1f} dB from the dense model's clip, median {psnr['median']:.1f}, "
                     f"{psnr['under_20db']:.1%} of clips under 20 dB, {psnr['under_10db']:.1%} under 10 dB")
        return text + f"; {q['device']}, {q['date']})"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read {file}: {error}") from error


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """The pipeline folder for a model name or path; errors say what was expected."""
    if name_or_path is None:
        from t2v import default_model_path

        return default_model_path()
    known = available_models()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    path = Path(name_or_path)
    expected = (f"expected a pipeline folder saved by {' or '.join(PIPELINE_CLASSES)}, or a diffusers folder of "
                f"{', '.join(DIFFUSERS_PIPELINES)} (with model_index.json), or one of: {', '.join(known)}")
    if not path.exists():
        raise FileNotFoundError(f"unknown model {str(name_or_path)!r}: no such folder; {expected}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"unknown model {str(path)!r}: it has no model_index.json; {expected}")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {index_file}: {error}") from error
    class_name = index.get("_class_name")
    if class_name in DIFFUSERS_PIPELINES:
        # Checked here so that a half-copied download fails with its path rather than deep inside diffusers.
        components = [name for name, spec in index.items()
                      if isinstance(spec, list) and len(spec) == 2 and spec[0] is not None]
        missing = [name for name in components if not (path / name).is_dir()]
        if "transformer" not in components or missing:
            lacking = ", ".join(missing) if "transformer" in components else "a transformer"
            raise ValueError(f"incomplete model {str(path)!r}: it holds a {class_name} without {lacking}; {expected}")
    elif class_name not in PIPELINE_CLASSES:
        raise ValueError(f"unknown model {str(path)!r}: it holds a {class_name}; {expected}")
    return path


def pipeline_class(path: str | os.PathLike) -> type:
    """The pipeline class a resolved folder's model_index.json names (diffusers' own for its real models)."""
    class_name = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    if class_name in DIFFUSERS_PIPELINES:
        import diffusers

        return getattr(diffusers, class_name)
    return PIPELINE_CLASSES[class_name]


def pipeline_transformers(pipe) -> list:
    """The transformers of a pipeline that attention methods install in: Wan 2.2's two experts, else the one."""
    return [model for model in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if model is not None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {str(device)!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is available")
    return device


def launched_distributed() -> bool:
    """Whether this process was started by torchrun or accelerate launch (which describe the group in the
    environment), or already belongs to an initialised process group."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return initialised or all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Joins the process group the launcher describes, unless one is initialised already, and returns this
    process's device: `device`, its LOCAL_RANK-th GPU for None or "cuda", or the CPU without CUDA."""
    if not launched_distributed():
        raise RuntimeError("context parallelism splits one video across several processes: launch them with "
                           "`torchrun --nproc-per-node N ...` (or `accelerate launch --num_processes N ...`)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None or str(device) == "cuda":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device)
    if not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def load_pipeline(
    name_or_path: str | os.PathLike | None = None,
    attention: str | None = None,
    guidance: list | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache: str | None = None,
    cache_options: dict | None = None,
    parallel: str | None = None,
    **attention_options,
):
    """Loads a TextToVideoPipeline or BlockDiffusionPipeline (None: the embedded model), or a local diffusers folder
    of a real model (WanPipeline, HunyuanVideoPipeline, CogVideoXPipeline: diffusers' pipeline itself is returned,
    with its own call), onto `device` (default CUDA if available, else CPU) in `dtype` (default bfloat16 on CUDA,
    float32 elsewhere).

    attention: a registered attention method installed in every self-attention layer, with `attention_options`.
        None installs the method a fine-tuned folder names in attention_config.json (the one its weights were
        trained with), and the high-noise model it names there, if any (the shipped sparse variants: the dense
        model runs the noisiest steps, where the clip's layout is decided), else leaves the model's own; a named
        method runs alone, and "dense" is plain attention in every case. An opening model named there (the block
        model's: the dense model makes a clip's first 16 frames) is attached whatever the method. `save_pretrained`
        does not write that file: copy it along with a fine-tuned folder.
    guidance: registered guidance names or Guidance objects, used by every call that passes no `guidance`. Only
        this project's pipelines take them: a diffusers pipeline runs its own classifier-free guidance.
    cache: a step cache of `pipelines.caches` (diffusers' FirstBlockCache, MagCache, ...) installed on every
        transformer with its defaults and `cache_options`; ValueError for a model that cannot take it.
    parallel: "ulysses" or "ring": context parallelism (`pipelines.parallel.enable_context_parallel`), every video
        split across the processes of the launch. Needs a launch by torchrun or accelerate launch: the process group
        is initialised from the environment when none is (NCCL on CUDA, this process's GPU the LOCAL_RANK-th,
        gloo on the CPU), and `device` defaults to that GPU. RuntimeError when not launched so.
    """
    import attention as attention_registry
    from t2v.guidance import resolve_guidance

    # Names are checked before the weights are read, so a typo fails fast.
    if attention is not None:
        attention_registry.get_method(attention)
    elif attention_options:
        raise ValueError(f"attention options {sorted(attention_options)} given without an attention method")
    default_guidance = resolve_guidance(guidance)
    if cache is not None:
        check_cache_name(cache)
    if cache is None and cache_options:
        raise ValueError(f"cache options {sorted(cache_options)} given without a cache")
    if parallel is not None:
        if parallel not in PARALLEL_KINDS:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {parallel!r}")
        if cache == "first-block":
            raise ValueError(NOT_UNDER_CONTEXT_PARALLELISM)
        device = init_distributed(device)
    path = resolve_model_path(name_or_path)
    cls = pipeline_class(path)
    if guidance and cls.__name__ in DIFFUSERS_PIPELINES:
        raise ValueError(f"guidance methods apply only to this project's pipelines ({', '.join(PIPELINE_CLASSES)}); "
                         f"{path} holds diffusers' {cls.__name__}, which runs its own classifier-free guidance "
                         "(set guidance_scale)")
    trained = trained_attention(path) if attention is None else None
    lead = trained_high_noise_model(path) if attention is None else None
    opening = trained_opening_model(path)
    if trained is not None:
        attention, attention_options = trained
        attention_registry.get_method(attention)
    # A missing or wrong companion model fails before any weights are read.
    lead_path = lead and _dense_companion(path, cls, TextToVideoPipeline, "a high-noise model", lead[0])
    opening_path = opening and _dense_companion(path, cls, BlockDiffusionPipeline, "an opening model", opening[0])
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no notes about experimental guiders on every load
    try:
        pipe = cls.from_pretrained(path, dtype=dtype)
        if lead is not None:
            dense = TextToVideoPipeline.from_pretrained(lead_path, dtype=dtype)  # with the model's own attention
            pipe.set_high_noise_model(dense.transformer, dense.text_encoder, lead[1])
        if opening is not None:
            opener = TextToVideoPipeline.from_pretrained(opening_path, dtype=dtype)
            pipe.set_opening_model(opener.transformer, opener.text_encoder, opening[1])
    except OSError as error:
        raise OSError(f"could not load the model in {path}: {error}") from error
    except ImportError as error:  # diffusers' real-model pipelines need transformers for their text encoders
        raise ImportError(f"could not load the model in {path}: {' '.join(str(error).split())}") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.to(device)
    if attention is not None:
        for transformer in pipeline_transformers(pipe):
            attention_registry.apply(transformer, attention, **attention_options)
    for transformer in pipeline_transformers(pipe):
        # The cache before the split: its block hooks then see this process's share of the tokens, as the blocks do.
        if cache is not None:
            install_cache(transformer, cache, **(cache_options or {}))
        if parallel is not None:
            enable_context_parallel(transformer, parallel)
    if cls.__name__ not in DIFFUSERS_PIPELINES:
        pipe.default_guidance = default_guidance
    return pipe


def check_output_path(path: str | os.PathLike) -> Path:
    """Checks that a video can be written at `path` (known suffix, folder writable), creating the folder if needed."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write {str(path)!r}: the file name must end in {' or '.join(VIDEO_SUFFIXES)}")
    if path.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: it is a folder")
    check_writable_dir(path.parent)
    return path


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and proves it writable by writing a file there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write to folder {str(folder)!r}: {error.strerror or error}") from error
    return folder


def video_array(frames) -> np.ndarray:
    """uint8 (frames, height, width, 3) from np/torch (F, H, W, 3) in [0, 1] or uint8, or a list of PIL images."""
    if isinstance(frames, (list, tuple)) and frames and not isinstance(frames[0], (np.ndarray, torch.Tensor)):
        frames = np.stack([np.asarray(image.convert("RGB")) for image in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected one video of shape (frames, height, width, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frames


def export_video(frames, path: str | os.PathLike, fps: int = 8, scale: int | None = None) -> Path:
    """Writes one video as .mp4 (H.264 through imageio-ffmpeg) or .gif, returns its path.

    Small clips are enlarged by a whole factor with nearest-neighbour sampling, so that each model pixel stays a sharp
    square: by default the smallest factor that makes the short side at least 256 pixels (scale=1 keeps the size).
    A GIF stores identical consecutive frames as one frame shown for their summed time (same playback, fewer frames
    when read back); an MP4 keeps every frame.
    """
    path = check_output_path(path)
    frames = video_array(frames)
    if scale is None:
        scale = max(1, math.ceil(256 / min(frames.shape[1:3])))
    if scale < 1:
        raise ValueError(f"scale must be a whole number >= 1, got {scale}")
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        from diffusers.utils import export_to_video
        from PIL import Image

        # H.264 in yuv420p needs even sizes; pad by one edge pixel rather than let ffmpeg rescale.
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        # As PIL images: diffusers scales numpy frames by 255 whatever their dtype.
        images = [Image.fromarray(frame) for frame in frames]
        export_to_video(images, str(path), fps=fps, quality=8, macro_block_size=1)
    return path
