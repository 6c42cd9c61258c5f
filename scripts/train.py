"""Train the embedded text-to-video model on the procedural video world, and export it as a pipeline folder.

    accelerate launch scripts/train.py --output-dir runs/t2v-tiny --steps 3000 --batch-size 256 --mixed-precision bf16
    python scripts/train.py --export runs/t2v-tiny/ema --to t2v/checkpoints/t2v-tiny

Training writes accelerate checkpoints (safetensors) every --save-every steps and the EMA weights at the end;
--resume DIR continues from a checkpoint, --init-from DIR starts from exported weights with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


# The embedded model's classifier-free guidance scale, the best of those swept (2 to 8): stronger guidance rounded
# squares into circles and flickered more, 2 was no better (docs/benchmarks.md). Other models should be swept.
EXPORT_GUIDANCE_SCALE = 2.5


def export_pipeline(weights: Path, destination: Path, dtype: str = "float16", shard: str = "15MB",
                    guidance_scale: float = EXPORT_GUIDANCE_SCALE) -> None:
    """Writes a diffusers pipeline folder (model_index.json and one subfolder per component).

    Its guider is classifier-free guidance at `guidance_scale`, the scale a call uses unless it passes its own.

    The scheduler's shift is the one the weights were trained with (train_config.json beside them; runs from
    before the option drew unshifted times), so that sampling spends its steps where training put its times.
    Weights fine-tuned with a sparse attention method get an attention_config.json naming it, which `load_pipeline`
    installs."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    from pipelines import BlockDiffusionPipeline, TextToVideoPipeline
    from pipelines.loading import TRAINED_ATTENTION_FILE
    from t2v.models import BlockVideoDiT, MateVideoDiT, TextEncoder, VideoDiT
    from t2v.training import TrainConfig

    config = weights.parent / "train_config.json"
    trained = json.loads(config.read_text()) if config.exists() else {}
    shift = trained.get("timestep_shift", 1.0) if config.exists() else TrainConfig.timestep_shift
    # A block-causal model exports as a BlockDiffusionPipeline (chunk-by-chunk generation).
    saved_class = json.loads((weights / "transformer" / "config.json").read_text()).get("_class_name")
    pipeline_class, model_class = {"BlockVideoDiT": (BlockDiffusionPipeline, BlockVideoDiT),
                                   "MateVideoDiT": (TextToVideoPipeline, MateVideoDiT)}.get(
        saved_class, (TextToVideoPipeline, VideoDiT))
    pipe = pipeline_class(
        text_encoder=TextEncoder.from_pretrained(weights / "text_encoder"),
        transformer=model_class.from_pretrained(weights / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    # The configs name the exported pipeline, not the training folder the weights were read from.
    for model in (pipe.text_encoder, pipe.transformer):
        model.register_to_config(_name_or_path=destination.name)
    pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(destination, max_shard_size=shard)
    attention_file = destination / TRAINED_ATTENTION_FILE
    if trained.get("attention"):  # weights fine-tuned with a sparse method load with that method installed
        attention_file.write_text(json.dumps(
            {"method": trained["attention"], "options": trained.get("attention_options", {})}, indent=2) + "\n")
    else:  # a folder exported into before must not keep a method these weights were not trained with
        attention_file.unlink(missing_ok=True)
    print(f"exported pipeline to {destination}")


def main(argv=None):
    from t2v.training import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/t2v-tiny")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timestep-shift", type=float, default=TrainConfig.timestep_shift,
                        help="shift of the training times toward noise (and the exported scheduler's shift)")
    parser.add_argument("--position-lr-scale", type=float, default=1.0,
                        help="learning-rate factor for the zero-initialised position and modulation tables")
    parser.add_argument("--min-timestep", type=float, default=0.0,
                        help="train only on times in [this, 1): 0.9 trains the high-noise band where layout is set")
    parser.add_argument("--caption-attribute-loss", type=float, default=0.0,
                        help="weight of an auxiliary loss that reads each caption's attributes back from the text "
                             "encoder, so that it keeps words such as left and right apart (0: off)")
    parser.add_argument("--foreground-weight", type=float, default=1.0,
                        help="loss weight of pixels on and next to objects relative to the plain background, where "
                             "shapes are told apart (1: a plain mean)")
    parser.add_argument("--teacher-weight", type=float, default=0.0,
                        help="with --attention: share of the regression target taken from a dense teacher's "
                             "velocity (--teacher-from, else the --init-from weights with dense attention), so that "
                             "the sparse model's clips stay close to the dense model's (1: distillation only; 0: data "
                             "only)")
    parser.add_argument("--teacher-from", default=None,
                        help="exported weights of the dense teacher (default: --init-from); needed to go on "
                             "distilling from a sparse model's export")
    parser.add_argument("--distill-guidance-scale", type=float, default=0.0,
                        help="with --teacher-weight: train on pairs of passes (with and without the caption) and fit "
                             "the teacher's classifier-free-guided velocity at this scale as well as each pass; use "
                             "the scale the pipeline samples with. A step then sees half as many clips (batch // 2, "
                             "each twice) and no caption dropout (0: off)")
    parser.add_argument("--on-policy-share", type=float, default=0.0,
                        help="with --teacher-weight 1: share of each batch taken from states on the student's own "
                             "guided sampling paths instead of noised data clips, so that it learns the teacher's "
                             "velocity where its own sampler goes; paths are sampled batch // 2 at a time as the "
                             "store runs out; --min-timestep does not apply to them (0: off)")
    parser.add_argument("--on-policy-guidance-scale", type=float, default=TrainConfig.on_policy_guidance_scale,
                        help="the guidance scale of those paths (the one the pipeline samples with)")
    parser.add_argument("--on-policy-steps", type=int, default=TrainConfig.on_policy_steps,
                        help="the sampling steps of those paths (the ones the pipeline is run with)")
    parser.add_argument("--block", action="store_true",
                        help="train a block-causal model (chunk-by-chunk generation) on windows of long clips with a "
                             "noise level per chunk; from --init-from a VideoDiT's or a block model's weights; "
                             "--transformer-config may set chunk_frames and window_chunks, and --frames must be "
                             "their window, (window_chunks + 1) * chunk_frames")
    parser.add_argument("--mixer", choices=("attention", "mate"), default="attention",
                        help="the token mixer: self-attention, or LinGen's MATE (bidirectional Mamba2 + temporal "
                             "swin attention); MATE from --init-from a VideoDiT takes its weights, self-attention's "
                             "becoming the swin branch's")
    parser.add_argument("--frames", type=int, default=16, help="frames of a training clip (a block model's window)")
    parser.add_argument("--long-frames", type=int, default=TrainConfig.long_frames,
                        help="with --block: the length of the long clips windows are cut from")
    parser.add_argument("--chain-prob", type=float, default=TrainConfig.chain_prob,
                        help="with --block: share of one-object long clips whose motion changes part-way")
    parser.add_argument("--window-start-share", type=float, default=TrainConfig.window_start_share,
                        help="with --block: share of windows that start at a clip's first frame")
    parser.add_argument("--history-noise", type=float, default=TrainConfig.history_noise,
                        help="with --block: the largest noise level of the finished chunks a chunk learns from")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="with --block: processes that draw the training batches ahead on the CPU (the long "
                             "world's drawing otherwise bounds the step rate at a large batch; 0: drawn in the loop)")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop with a checkpoint after this long")
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks (GPU)")
    parser.add_argument("--attention", default=None, help="train with this attention method (e.g. vmoba)")
    parser.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --attention (repeatable), e.g. threshold=0.25")
    parser.add_argument("--resume", default=None, help="accelerate checkpoint folder to continue from")
    parser.add_argument("--init-from", default=None, help="exported weights (text_encoder/, transformer/) to start from")
    parser.add_argument("--transformer-config", default="{}", help="JSON overrides of the VideoDiT config")
    parser.add_argument("--text-encoder-config", default="{}", help="JSON overrides of the TextEncoder config")
    parser.add_argument("--export", type=Path, default=None, help="export these EMA weights as a pipeline and stop")
    parser.add_argument("--export-guidance-scale", type=float, default=EXPORT_GUIDANCE_SCALE,
                        help="the exported pipeline's classifier-free guidance scale (default: the embedded model's, "
                             "see docs/benchmarks.md)")
    parser.add_argument("--to", type=Path, default=Path("t2v/checkpoints/t2v-tiny"))
    args = parser.parse_args(argv)

    if args.export is not None:
        export_pipeline(args.export, args.to, guidance_scale=args.export_guidance_scale)
        return

    from t2v.cli import parse_option
    from t2v.training import train

    cfg = TrainConfig(
        output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, mixed_precision=args.mixed_precision,
        seed=args.seed, timestep_shift=args.timestep_shift, min_timestep=args.min_timestep,
        position_lr_scale=args.position_lr_scale, caption_attribute_loss=args.caption_attribute_loss,
        foreground_weight=args.foreground_weight, teacher_weight=args.teacher_weight,
        teacher_from=args.teacher_from, distill_guidance_scale=args.distill_guidance_scale,
        on_policy_share=args.on_policy_share, on_policy_guidance_scale=args.on_policy_guidance_scale,
        on_policy_steps=args.on_policy_steps, block=args.block, mixer=args.mixer, frames=args.frames,
        long_frames=args.long_frames,
        chain_prob=args.chain_prob, history_noise=args.history_noise, window_start_share=args.window_start_share,
        data_workers=args.data_workers,
        save_every=args.save_every, max_minutes=args.max_minutes,
        init_from=args.init_from,
        compile=args.compile, attention=args.attention,
        attention_options=dict(parse_option(o) for o in args.attention_option),
        transformer=json.loads(args.transformer_config), text_encoder=json.loads(args.text_encoder_config),
    )
    final = train(cfg, resume=args.resume)
    print(f"EMA weights in {final}")


if __name__ == "__main__":
    main()
