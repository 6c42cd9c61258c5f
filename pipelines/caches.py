"""Step caches: diffusers' own caches, installed by name on a video transformer.

    from pipelines.caches import available_caches, install_cache
    install_cache(pipe.transformer, "first-block")                 # the cache's defaults for this model
    install_cache(pipe.transformer, "taylorseer", cache_interval=3)
    remove_cache(pipe.transformer)

A step cache saves the work that changes little from one denoising step to the next: the blocks after the first
(first-block, mag, sea), attention and feed-forward outputs extrapolated from earlier steps (taylorseer), or attention
outputs reused for a few steps (pyramid-attention, faster, which also predicts the unconditional branch of
classifier-free guidance from the conditional one). Each name maps to a diffusers config; `install_cache` fills in
the defaults and the callbacks the configs need, and calls `transformer.enable_cache(config)`.

Guidance branches: the pipelines call the transformer once per branch of classifier-free guidance at every step.
first-block, mag, taylorseer and sea keep their state per branch: each call must run inside
`transformer.cache_context(branch)`, as diffusers' pipelines and this project's do. pyramid-attention and faster
keep one state per module, so they need every branch in one call: this project's pipelines then stack the branches
into one batch (unconditional first, the order FasterCache reads), as diffusers' CogVideoXPipeline does; diffusers'
WanPipeline calls the branches apart, so those two are refused on Wan.

Attention methods (`attention.apply`) replace attention processors; the caches wrap block and attention module
forwards. Either may be installed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MAG_RATIOS_FILE = "mag_ratios.json"  # beside a transformer's weights: its MagCache calibration
_INSTALLED_ATTR = "_t2v_step_cache"  # what install_cache set up: name, timestep hook, MagCache's calibrated ratios
# FirstBlockCache decides from the first block's output whether to run the others, with no exchange between processes.
NOT_UNDER_CONTEXT_PARALLELISM = ("cache 'first-block' cannot run under context parallelism: each process would decide "
                                 "from its own share of the tokens whether to skip the blocks, and processes that "
                                 "decide differently wait on each other forever")


@dataclass(frozen=True)
class StepCache:
    name: str
    config_class: str  # in diffusers.hooks
    summary: str
    defaults: dict  # for this project's VideoDiT (the embedded model); diffusers' own defaults elsewhere
    one_call_per_step: bool = False  # state per module, not per cache_context: every guidance branch in one call


CACHES = {cache.name: cache for cache in (
    StepCache("first-block", "FirstBlockCacheConfig",
              "FirstBlockCache: reuses the other blocks' last residual while the first block's output changes by "
              "less than `threshold`", dict(threshold=0.1)),
    StepCache("mag", "MagCacheConfig",
              "MagCache: skips the blocks while the calibrated residual magnitude ratios say little changes "
              "(`threshold`, `max_skip_steps`); needs `mag_ratios` calibrated for the model",
              dict(threshold=0.03, max_skip_steps=1, retention_ratio=0.2)),
    StepCache("taylorseer", "TaylorSeerCacheConfig",
              "TaylorSeer: computes attention and feed-forward every `cache_interval` steps and extrapolates them "
              "between", dict(cache_interval=2, disable_cache_before_step=4, max_order=1)),
    StepCache("faster", "FasterCacheConfig",
              "FasterCache: reuses self-attention every other step and predicts the unconditional branch from the "
              "conditional one", dict(spatial_attention_block_skip_range=2,
                                      spatial_attention_timestep_skip_range=(-1, 681),
                                      unconditional_batch_skip_range=5,
                                      unconditional_batch_timestep_skip_range=(-1, 641)),
              one_call_per_step=True),
    StepCache("pyramid-attention", "PyramidAttentionBroadcastConfig",
              "Pyramid Attention Broadcast: reuses self-attention for `spatial_attention_block_skip_range` steps "
              "within a timestep range", dict(spatial_attention_block_skip_range=2,
                                              spatial_attention_timestep_skip_range=(100, 800)),
              one_call_per_step=True),
    StepCache("sea", "SeaCacheConfig",
              "SeaCache: skips the blocks while a spectrally filtered view of the latents changes by less than "
              "`threshold`", dict(threshold=0.25)),
)}
# Set by install_cache itself; never user options.
_FILLED = {"current_timestep_callback", "raw_vision_callback", "calibrate"}


def available_caches() -> list[str]:
    """The cache names `install_cache` takes."""
    return list(CACHES)


def check_cache_name(name: str) -> None:
    """ValueError, listing the known names, unless `install_cache` takes `name` (to fail before weights load)."""
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}; known caches: {', '.join(CACHES)}")


def _model_kind(transformer) -> str:
    """Which set of caches and settings applies: "block", "video-dit", "wan", "hunyuan", "cogvideox"; ValueError for
    another model."""
    from t2v.models import BlockVideoDiT, VideoDiT

    if isinstance(transformer, VideoDiT):
        return "block" if isinstance(transformer, BlockVideoDiT) else "video-dit"
    kinds = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan",
             "CogVideoXTransformer3DModel": "cogvideox"}
    for cls in type(transformer).__mro__:
        if cls.__name__ in kinds:
            return kinds[cls.__name__]
    raise ValueError(f"step caches support this project's VideoDiT and diffusers' {', '.join(kinds)}; got "
                     f"{type(transformer).__name__}")


def _refusal(kind: str, name: str) -> str | None:
    """Why `name` cannot run on this kind of model, or None."""
    if kind == "block":
        return ("the block-diffusion model fills and reads a KV cache through every block and restarts its timesteps "
                "at each chunk: a skipped block leaves the cache of the finished chunks unfilled, and the step "
                "counters of the caches do not follow chunks")
    if kind == "wan" and CACHES[name].one_call_per_step:
        return ("diffusers' WanPipeline calls the transformer apart for the conditional and the unconditional "
                f"prediction, and {name} keeps one state per module across those calls, so the unconditional call "
                "would reuse the conditional call's attention; use first-block, mag, taylorseer or sea (state per "
                "branch)")
    if kind in ("hunyuan", "cogvideox") and name == "sea":
        return ("SeaCache needs the scheduler's step and sigma in every cache_context, which diffusers' "
                "HunyuanVideo and CogVideoX pipelines do not pass (it would silently run every block)")
    return None


def _family_settings(kind: str, name: str) -> dict:
    """Settings that depend on how the model names and shapes things."""
    if name == "taylorseer":
        # diffusers' default patterns name modules "attn"; Wan-style blocks have attn1, attn2 and ffn.
        modules = {"hunyuan": r"(single_)?transformer_blocks\.\d+\.attn",
                   "cogvideox": r"transformer_blocks\.\d+\.(attn1|ff)"}.get(kind, r"blocks\.\d+\.(attn1|attn2|ffn)")
        return dict(cache_identifiers=[modules], taylor_factors_dtype=torch.float32)
    if name in ("faster", "pyramid-attention"):
        # Only the main blocks: a looser pattern would also catch HunyuanVideo's text refiner blocks.
        blocks = {"hunyuan": (r"^transformer_blocks\.", r"^single_transformer_blocks\."),
                  "cogvideox": (r"^transformer_blocks\.",)}.get(kind, (r"^blocks\.",))
        settings = dict(spatial_attention_block_identifiers=blocks)
        if name == "faster":
            # CogVideoX's latents are (B, F, C, H, W); HunyuanVideo is guidance-distilled: one branch per step.
            settings.update(tensor_format="BFCHW" if kind == "cogvideox" else "BCFHW",
                            is_guidance_distilled=kind == "hunyuan", attention_weight_callback=lambda module: 0.5)
        return settings
    return {}


def install_cache(transformer, name: str, **options):
    """Installs the step cache `name` (see `available_caches`) on `transformer` with its defaults, overridden by
    `options` (the fields of its diffusers config). Replaces a cache installed before. Returns the transformer.

    mag: `mag_ratios` default to the calibration stored beside the model's weights (`mag_ratios.json`, shipped for the
    embedded model, written by `python -m pipelines.caches MODEL`); other models need them calibrated or passed.
    `num_inference_steps` (default 25) is followed by this project's pipelines on every call; for diffusers'
    pipelines pass the steps you will run.

    ValueError for an unknown name (listing the known ones), an option the cache does not take, or a model that
    cannot take the cache (saying why).
    """
    import diffusers.hooks

    check_cache_name(name)
    spec = CACHES[name]
    kind = _model_kind(transformer)
    reason = _refusal(kind, name)
    if reason:
        raise ValueError(f"cache {name!r} cannot run on {type(transformer).__name__}: {reason}")
    if name == "first-block" and getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(NOT_UNDER_CONTEXT_PARALLELISM)
    config_class = getattr(diffusers.hooks, spec.config_class)
    fields = {field.name for field in dataclasses.fields(config_class)} - _FILLED
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"cache {name!r} does not take option(s) {', '.join(unknown)}; it takes: "
                         f"{', '.join(sorted(f for f in fields if not f.startswith('_')))}")
    settings = dict(spec.defaults) if kind == "video-dit" else {}
    settings.update(_family_settings(kind, name), **options)
    if name == "faster" and settings.get("is_guidance_distilled") and \
            settings.get("spatial_attention_timestep_skip_range", (-1, 681))[1] > 999:
        # A guidance-distilled model's first call would then reuse attention it never computed.
        raise ValueError("cache 'faster' on a guidance-distilled model needs spatial_attention_timestep_skip_range "
                         "to leave out the first step (timestep 1000)")
    if isinstance(settings.get("taylor_factors_dtype"), str):
        settings["taylor_factors_dtype"] = getattr(torch, settings["taylor_factors_dtype"])

    current_timestep = _CurrentTimestep() if spec.one_call_per_step else None
    if current_timestep is not None:
        settings["current_timestep_callback"] = current_timestep
    if name == "mag":
        settings.setdefault("num_inference_steps", 25)
        settings.setdefault("mag_ratios", stored_mag_ratios(transformer))
        if settings["mag_ratios"] is None:
            raise ValueError(f"cache 'mag' needs magnitude ratios calibrated for this model, and "
                             f"{type(transformer).__name__} has none stored: calibrate with `python -m "
                             "pipelines.caches MODEL_OR_FOLDER` (writes them beside its weights), or pass mag_ratios")
    if name == "sea" and kind != "wan":  # diffusers reads Wan's latents itself
        settings["raw_vision_callback"] = _latent_videos(channels_second=kind != "cogvideox")
    config = config_class(**settings)  # checks the values before the model is touched

    remove_cache(transformer)
    transformer.enable_cache(config)
    timestep_hook = None
    if current_timestep is not None:
        timestep_hook = transformer.register_forward_pre_hook(current_timestep.record, with_kwargs=True)
    setattr(transformer, _INSTALLED_ATTR, dict(name=name, timestep_hook=timestep_hook,
                                               mag_ratios=settings.get("mag_ratios")))
    return transformer


def remove_cache(transformer):
    """Removes the cache `install_cache` installed (no-op without one). Returns the transformer."""
    installed = getattr(transformer, _INSTALLED_ATTR, None)
    if installed is None:
        return transformer
    transformer.disable_cache()
    if installed["timestep_hook"] is not None:
        installed["timestep_hook"].remove()
    delattr(transformer, _INSTALLED_ATTR)
    return transformer


def installed_cache(transformer) -> str | None:
    installed = getattr(transformer, _INSTALLED_ATTR, None)
    return None if installed is None else installed["name"]


def stored_mag_ratios(transformer) -> list[float] | None:
    """The MagCache ratios calibrated for this model, from `mag_ratios.json` in the folder its weights came from."""
    folder = getattr(transformer.config, "_name_or_path", None)
    path = Path(folder) / MAG_RATIOS_FILE if folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())["mag_ratios"]


class _CurrentTimestep:
    """The timestep of the transformer's latest call, for the caches that decide by timestep range (`record` is a
    forward pre-hook): a transformer alone does not know the pipeline that calls it."""

    def __init__(self):
        self.value = 1000.0

    def record(self, module, args, kwargs) -> None:
        from attention.adapters import timestep_value

        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
        if timestep is not None:
            self.value = timestep_value(timestep)

    def __call__(self) -> float:
        return self.value


def _latent_videos(channels_second: bool):
    """SeaCache's view of a call: the videos of the batch, each (C, F, H, W)."""

    def videos(module, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if latents.ndim != 5:
            return None
        return list((latents if channels_second else latents.transpose(1, 2)).unbind(0))

    return videos


# --- What the pipelines call around the transformer ---------------------------------------------------------------

def start_generation(transformer, num_inference_steps: int) -> None:
    """Before a generation: clears what a previous (perhaps interrupted) one left, and fits an installed MagCache
    to this number of steps (its calibrated ratios interpolated to the step count, as diffusers does)."""
    from diffusers.hooks.mag_cache import nearest_interp

    installed = getattr(transformer, _INSTALLED_ATTR, None)
    if installed is None:
        return
    config = transformer._cache_config
    if installed["name"] == "mag" and config.num_inference_steps != num_inference_steps:
        # In place: the hooks share this config, and installing again would put them outside any hooks added since
        # (context parallelism's token split).
        config.num_inference_steps = num_inference_steps
        config.mag_ratios = nearest_interp(torch.as_tensor(installed["mag_ratios"]), num_inference_steps)
    transformer._reset_stateful_cache()


def needs_one_call_per_step(transformer) -> bool:
    """True when the installed cache keeps one state per module, so every guidance branch must go in one call."""
    installed = getattr(transformer, _INSTALLED_ATTR, None)
    return installed is not None and CACHES[installed["name"]].one_call_per_step


def check_branches(transformer, branches: int) -> None:
    """FasterCache (unless guidance-distilled) reads every call's batch as unconditional and conditional halves."""
    config = getattr(transformer, "_cache_config", None)
    if branches != 2 and type(config).__name__ == "FasterCacheConfig" and not config.is_guidance_distilled:
        raise ValueError("cache 'faster' predicts the unconditional branch from the conditional one: it needs "
                         "classifier-free guidance at every step (a guidance scale other than 1)")


def branch_context(transformer, branch: str, step: int, sigma: float, num_inference_steps: int):
    """The cache context of one transformer call: the branch name keys the caches' state."""
    if not getattr(transformer, "is_cache_enabled", False):
        return contextlib.nullcontext()
    return transformer.cache_context(branch, step_index=step, sigma=sigma, num_inference_steps=num_inference_steps)


# --- MagCache calibration -------------------------------------------------------------------------------------------

CALIBRATION_PROMPTS = ("a red circle moves to the right on black", "a blue square moves up on white",
                       "a yellow triangle grows on gray", "a green circle shrinks on black")


def calibrate_mag_ratios(pipe, prompts=CALIBRATION_PROMPTS, num_inference_steps: int = 25, seed: int = 0) -> list:
    """MagCache's residual magnitude ratios of `pipe`'s transformer, step by step: diffusers' calibration mode run on
    each prompt, and the ratios of every prompt and guidance branch averaged."""
    import io
    from ast import literal_eval
    from diffusers.hooks import MagCacheConfig

    transformer = pipe.transformer
    reason = _refusal(_model_kind(transformer), "mag")
    if reason:
        raise ValueError(f"cannot calibrate MagCache on {type(transformer).__name__}: {reason}")
    remove_cache(transformer)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # diffusers prints each branch's ratios at its last step
            for prompt in prompts:
                pipe(prompt, num_inference_steps=num_inference_steps, output_type="latent",
                     generator=torch.Generator().manual_seed(seed))
    finally:
        transformer.disable_cache()
    # Each branch's list starts with the neutral 1.0 of its first step; the other printed lines are prose.
    runs = [literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[1.0")]
    return [round(sum(values) / len(values), 5) for values in zip(*runs)]


def main(argv=None) -> None:
    import argparse

    from pipelines.loading import load_pipeline

    parser = argparse.ArgumentParser(description="Calibrates MagCache for a model and writes its ratios beside the "
                                                 f"model's transformer weights ({MAG_RATIOS_FILE}).")
    parser.add_argument("model", help="a model name, a pipeline folder, or a diffusers folder of Wan, HunyuanVideo or "
                                       "CogVideoX")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    ratios = calibrate_mag_ratios(pipe, num_inference_steps=args.steps)
    path = Path(pipe.transformer.config._name_or_path) / MAG_RATIOS_FILE
    record = {"num_inference_steps": args.steps, "prompts": list(CALIBRATION_PROMPTS), "mag_ratios": ratios,
              "command": f"python -m pipelines.caches {args.model} --steps {args.steps}"}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
