"""Flow-matching training of VideoDiT and its text encoder on the procedural video world, with accelerate.

Rectified flow: x_t = (1 - t) * video + t * noise, the model predicts the velocity noise - video at timestep
1000 * t, which is what diffusers' FlowMatchEulerDiscreteScheduler integrates. Data are generated on the fly on the
training device; nothing is read from disk.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from t2v import TRAINED_ATTENTION_FILE
from t2v.data import VideoWorld, vocabulary
from t2v.data.long_clips import LongVideoWorld
from t2v.models import BlockVideoDiT, TextEncoder, VideoDiT
from t2v.models.block_dit import block_model_from
from t2v.models.mate_dit import MateVideoDiT, mate_model_from
from t2v.training.block_training import block_batch, worker_batches
from t2v.training.caption_attributes import CaptionAttributeHead, attribute_targets
from t2v.training.distillation import DenseTeacher, blended_target, guidance_pairs, guided_error
from t2v.training.flow_path import path_velocity, sample_timesteps  # noqa: F401 (sample_timesteps re-exported)
from t2v.training.foreground_weights import foreground_weights
from t2v.training.on_policy import OnPolicyStates


@dataclass
class TrainConfig:
    output_dir: str = "runs/t2v-tiny"
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 4e-4
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    mixed_precision: str = "no"
    seed: int = 0
    frames: int = 16
    height: int = 32
    width: int = 32
    two_object_prob: float = 0.25
    timestep_shift: float = 3.0
    position_lr_scale: float = 1.0  # learning-rate factor for the position tables (absolute and modulation)
    min_timestep: float = 0.0  # train only on times in [min_timestep, 1): e.g. the high-noise band where layout is set
    caption_attribute_loss: float = 0.0  # weight of the auxiliary loss that reads a caption's attributes back
    foreground_weight: float = 1.0  # loss weight of pixels on and next to objects relative to background pixels
    teacher_weight: float = 0.0  # share of the target taken from a dense teacher's velocity (0: data only)
    teacher_from: str | None = None  # exported weights of the dense teacher (default: init_from, with dense attention)
    distill_guidance_scale: float = 0.0  # above 1: also fit the teacher's guided velocity at this scale (0: off)
    on_policy_share: float = 0.0  # share of each batch taken from the student's own guided sampling paths (0: off)
    on_policy_guidance_scale: float = 2.5  # the guidance scale those paths are sampled with
    on_policy_steps: int = 20  # the number of sampling steps of those paths
    block: bool = False  # train a block-causal BlockVideoDiT on windows of long clips (diffusion forcing)
    mixer: str = "attention"  # the token mixer: "attention" (VideoDiT) or "mate" (MateVideoDiT, LinGen's MATE)
    long_frames: int = 64  # length of the long clips its windows are cut from
    chain_prob: float = 0.3  # share of one-object long clips whose motion changes part-way
    window_start_share: float = 0.35  # share of windows that start at a clip's first frame
    history_noise: float = 0.05  # largest time (noise level) of the history chunks a chunk learns to continue
    data_workers: int = 0  # block training: background processes drawing the batches (0: drawn in the loop)
    save_every: int = 1000
    log_every: int = 50
    max_minutes: float | None = None
    init_from: str | None = None
    compile: bool = False
    attention: str | None = None
    attention_options: dict = field(default_factory=dict)
    transformer: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)


class FlowMatchingModule(torch.nn.Module):
    """Text encoder and transformer as one module, so accelerate wraps, clips and checkpoints them together.

    Returns the flow-matching loss (a plain mean over pixels, or weighted by ``pixel_weights``) and the auxiliary
    caption-attribute loss (0 without its head). With ``teacher_velocity`` the target blends the data's velocity
    with it by ``teacher_weight`` (see `blended_target`).
    """

    def __init__(self, text_encoder: TextEncoder, transformer: VideoDiT, attribute_head: CaptionAttributeHead = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.attribute_head = attribute_head

    def forward(self, input_ids, text_mask, videos, t, noise, attribute_targets=None, stated=None, pixel_weights=None,
                teacher_velocity=None, teacher_weight: float = 0.0, guidance_scale: float = 0.0):
        if input_ids.ndim == 3:  # one caption per chunk (B, chunks, L) for a block-causal model
            text = self.text_encoder(input_ids.flatten(0, 1), text_mask.flatten(0, 1)).unflatten(0, input_ids.shape[:2])
        else:
            text = self.text_encoder(input_ids, text_mask)
        velocity = path_velocity(self.transformer, text, text_mask, videos, t, noise)
        error = velocity.float() - blended_target(videos, noise, teacher_velocity, teacher_weight)
        flow = weighted_mean(error ** 2, pixel_weights)
        if guidance_scale:  # a batch of guidance pairs: half the loss on each pass, half on the guided velocity
            pair_weights = None if pixel_weights is None else pixel_weights.chunk(2)[0]
            flow = (flow + weighted_mean(guided_error(error, guidance_scale) ** 2, pair_weights)) / 2
        if self.attribute_head is None:
            return flow, torch.zeros((), device=flow.device)
        return flow, self.attribute_head(text, text_mask, attribute_targets, stated)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return (values if weights is None else values * weights).mean()


def build_models(cfg: TrainConfig) -> tuple[TextEncoder, VideoDiT]:
    if cfg.mixer not in ("attention", "mate"):
        raise ValueError(f"mixer must be 'attention' or 'mate', got {cfg.mixer!r}")
    if cfg.block:
        return _build_block_models(cfg)
    if cfg.mixer == "mate":
        return _build_mate_models(cfg)
    if cfg.init_from:
        root = Path(cfg.init_from)
        # Config overrides may add parameters the weights lack (e.g. absolute_positions); those keep their own init.
        overrides = dict(low_cpu_mem_usage=False, **cfg.transformer) if cfg.transformer else {}
        return (TextEncoder.from_pretrained(root / "text_encoder"),
                VideoDiT.from_pretrained(root / "transformer", **overrides))
    return _new_models(cfg, VideoDiT)


def _new_models(cfg: TrainConfig, model_class: type) -> tuple[TextEncoder, VideoDiT]:
    """A new text encoder and a new transformer of `model_class` for the training clips, `cfg.transformer` on top."""
    text_encoder = TextEncoder(vocab=vocabulary(), **cfg.text_encoder)
    transformer_cfg = dict(text_dim=text_encoder.config.hidden_size, sample_frames=cfg.frames,
                           sample_height=cfg.height, sample_width=cfg.width)
    transformer_cfg.update(cfg.transformer)
    return text_encoder, model_class(**transformer_cfg)


def _build_variant(cfg: TrainConfig, model_class: type, convert, options: dict) -> tuple[TextEncoder, VideoDiT]:
    """A `model_class` transformer: from its own saved weights, converted by `convert(video_dit, **options)` from a
    trained VideoDiT's, or new."""
    if not cfg.init_from:
        return _new_models(cfg, model_class)
    root = Path(cfg.init_from)
    text_encoder = TextEncoder.from_pretrained(root / "text_encoder")
    saved = json.loads((root / "transformer" / "config.json").read_text()).get("_class_name")
    if saved == model_class.__name__:
        return text_encoder, model_class.from_pretrained(root / "transformer", **options)
    return text_encoder, convert(VideoDiT.from_pretrained(root / "transformer"), **options)


def _build_block_models(cfg: TrainConfig) -> tuple[TextEncoder, BlockVideoDiT]:
    """A BlockVideoDiT: from a block model's weights, from a trained VideoDiT's (the same parameters, made
    block-causal), or new. `cfg.transformer` may set chunk_frames and window_chunks."""
    block_options = {k: cfg.transformer[k] for k in ("chunk_frames", "window_chunks") if k in cfg.transformer}
    return _build_variant(cfg, BlockVideoDiT, block_model_from, block_options)


def _build_mate_models(cfg: TrainConfig) -> tuple[TextEncoder, MateVideoDiT]:
    """A MateVideoDiT: from a MATE model's weights, from a trained VideoDiT's (self-attention's weights become the
    TE-branch's, the Mamba branch starts closed), or new. `cfg.transformer` may set its config (mate_window, ...)."""
    return _build_variant(cfg, MateVideoDiT, mate_model_from, cfg.transformer)


POSITION_TABLES = ("frame_embedding", "row_embedding", "column_embedding", "frame_modulation_embedding",
                   "row_modulation_embedding", "column_modulation_embedding")


def fine_tuned_with_sparse_attention(weights: str | Path) -> bool:
    """Whether exported weights (a pipeline folder, or a run's ema/ folder) were fine-tuned with a sparse method."""
    weights = Path(weights)
    if (weights / TRAINED_ATTENTION_FILE).is_file():
        return True
    run_config = weights.parent / "train_config.json"
    return run_config.is_file() and bool(json.loads(run_config.read_text()).get("attention"))


def parameter_groups(module: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: the position tables at `position_lr_scale` times the learning rate, the rest at it.

    The tables start at zero on top of trained weights and get a small, noisy gradient, so at the common rate
    they stay small next to the features they are added to; a larger rate lets them catch up. At factor 1 there
    is one group, as before the option (so older checkpoints resume).
    """
    if cfg.position_lr_scale == 1.0:
        return [{"params": list(module.parameters())}]
    tables, rest = [], []
    for name, parameter in module.named_parameters():
        (tables if name.rsplit(".", 1)[-1] in POSITION_TABLES else rest).append(parameter)
    groups = [{"params": rest}]
    if tables:
        groups.append({"params": tables, "lr": cfg.learning_rate * cfg.position_lr_scale})
    return groups


def sampling_scheduler(cfg: TrainConfig) -> FlowMatchEulerDiscreteScheduler:
    """The sampler's scheduler as exported with the init weights, else one with the training times' shift."""
    if cfg.init_from and (Path(cfg.init_from) / "scheduler").is_dir():
        return FlowMatchEulerDiscreteScheduler.from_pretrained(cfg.init_from, subfolder="scheduler")
    return FlowMatchEulerDiscreteScheduler(shift=cfg.timestep_shift)


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Trains and returns the folder of the final EMA weights (text_encoder/ and transformer/ subfolders)."""
    if cfg.foreground_weight <= 0:
        raise ValueError(f"foreground_weight must be positive (1: a plain mean), got {cfg.foreground_weight}")
    if not 0 <= cfg.teacher_weight <= 1:
        raise ValueError(f"teacher_weight must lie in [0, 1], got {cfg.teacher_weight}")
    if cfg.teacher_weight and not ((cfg.teacher_from or cfg.init_from) and (cfg.attention or cfg.mixer == "mate")):
        raise ValueError("teacher_weight needs a trained teacher (teacher_from, or the init_from weights with the "
                         "model's own dense attention) and attention (the method the student trains with) or the "
                         "MATE mixer")
    if cfg.mixer == "mate" and (cfg.block or cfg.attention):
        raise ValueError("the MATE mixer has no attention method to install and no block-causal variant")
    if cfg.teacher_from and not cfg.teacher_weight:
        raise ValueError("teacher_from is used only with a teacher_weight above 0")
    if cfg.distill_guidance_scale and not (cfg.teacher_weight and cfg.distill_guidance_scale > 1
                                           and cfg.batch_size >= 2):
        raise ValueError(f"distill_guidance_scale must be above 1 (a guidance scale) and needs a teacher_weight "
                         f"above 0 and a batch of at least one pair, got {cfg.distill_guidance_scale} with "
                         f"teacher_weight {cfg.teacher_weight} and batch_size {cfg.batch_size}")
    if cfg.on_policy_share and cfg.teacher_weight != 1:
        # There the data's velocity would point at the clip the student's own path ended at.
        raise ValueError(f"on_policy_share needs teacher_weight 1 (the teacher's velocity is the only target on the "
                         f"student's own paths), got teacher_weight {cfg.teacher_weight}")
    if cfg.teacher_weight and not cfg.teacher_from and fine_tuned_with_sparse_attention(cfg.init_from):
        raise ValueError(f"init_from {cfg.init_from} was fine-tuned with a sparse attention method, so with dense "
                         f"attention it is no teacher: name the dense model it came from with teacher_from")
    if cfg.block and (cfg.teacher_weight or cfg.on_policy_share or cfg.caption_attribute_loss or cfg.attention):
        raise ValueError("block training (block) takes none of teacher_weight, on_policy_share, "
                         "caption_attribute_loss or attention")
    if cfg.data_workers < 0 or (cfg.data_workers and not cfg.block):
        raise ValueError(f"data_workers draws block training's batches: a count >= 0 with block, got "
                         f"{cfg.data_workers} (block={cfg.block})")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=None)
    set_seed(cfg.seed + accelerator.process_index)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    text_encoder, transformer = build_models(cfg)
    teacher = None
    if cfg.teacher_weight:
        # A named teacher is taken as saved (the student's config overrides would add untrained parts to it); else
        # the student's models are copied before their attention changes, so the teacher keeps the model's own.
        # A MATE student is distilled from the attention model it was converted from.
        teacher_models = build_models(replace(cfg, init_from=cfg.teacher_from or cfg.init_from, transformer={},
                                              text_encoder={}, mixer="attention")) \
            if cfg.teacher_from or cfg.mixer != "attention" else (copy.deepcopy(text_encoder),
                                                                 copy.deepcopy(transformer))
        teacher = DenseTeacher(*teacher_models).to(accelerator.device)
    if cfg.attention:
        # Fine-tuning with a sparse method (VMoBA is trained this way) goes through its kernel's backward.
        from t2v.training.attention_finetune import apply_training_attention

        with accelerator.autocast():  # the probe then sees the dtype training hands the method
            apply_training_attention(transformer, cfg.attention, cfg.attention_options, device=accelerator.device)
    if cfg.compile:
        # Fixed batch and fixed-length captions keep one graph; a block that fails to compile runs eagerly instead.
        torch._dynamo.config.suppress_errors = True
        # A MATE block's graph depends on its layer (scan order, window shift): one graph per layer and grad mode.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(transformer.blocks))
        transformer.compile_repeated_blocks(fullgraph=True)
        if teacher is not None:
            teacher.transformer.compile_repeated_blocks(fullgraph=True)
    attribute_head = CaptionAttributeHead(text_encoder.config.hidden_size) if cfg.caption_attribute_loss else None
    module = FlowMatchingModule(text_encoder, transformer, attribute_head)
    ema = EMAModel(module.parameters(), decay=cfg.ema_decay)
    optimizer = torch.optim.AdamW(parameter_groups(module, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    started = time.time()
    # Every process must see the same clock, or with several GPUs the learning rates (and so the weights) drift
    # apart and one process stops a step before the others and hangs them. The main process's clock is shared
    # every few steps; between shares each process uses the last shared value.
    elapsed = [0.0]

    def share_clock() -> None:
        now = torch.tensor([time.time() - started], dtype=torch.float64, device=accelerator.device)
        elapsed[0] = float(broadcast(now, from_process=0).item()) if accelerator.num_processes > 1 else now.item()

    def lr_factor(step: int) -> float:
        # With a time budget the cosine decay follows whichever runs out first, steps or minutes.
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        progress = step / max(1, cfg.steps)
        if cfg.max_minutes:
            progress = max(progress, elapsed[0] / (60 * cfg.max_minutes))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    module, optimizer, lr_schedule = accelerator.prepare(module, optimizer, lr_schedule)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    start_step = 0
    if resume:
        try:
            accelerator.load_state(resume)
        except RuntimeError as error:  # most often a model built differently from the one that saved the state
            raise RuntimeError(
                f"cannot resume from {resume}: its state does not fit this model; --transformer-config, "
                f"--text-encoder-config and --caption-attribute-loss (on or off) must match the run that saved it"
            ) from error
        start_step = int(Path(resume).name.split("-")[-1])

    generator = torch.Generator(accelerator.device).manual_seed(cfg.seed * 1000 + accelerator.process_index + start_step)
    world = next_block_batch = None
    if cfg.block:
        chunk_frames = transformer.config.chunk_frames
        if cfg.frames != transformer.window_frames:
            raise ValueError(f"block training takes windows of the model's {transformer.window_frames} frames "
                             f"(frames={cfg.frames})")
        world_options = dict(frames=cfg.long_frames, height=cfg.height, width=cfg.width, split="train",
                             two_object_prob=cfg.two_object_prob, chain_prob=cfg.chain_prob, chunk_frames=chunk_frames)
        batch_options = dict(batch_size=cfg.batch_size, window_frames=cfg.frames, chunk_frames=chunk_frames,
                             caption_dropout=cfg.caption_dropout, shift=cfg.timestep_shift,
                             history_noise=cfg.history_noise, start_share=cfg.window_start_share,
                             low=cfg.min_timestep)
        if cfg.data_workers:
            next_block_batch = worker_batches(world_options, batch_options, cfg.seed * 1000 + start_step
                                              + 100 * accelerator.process_index, cfg.data_workers, accelerator.device)
        else:
            long_world = LongVideoWorld(**world_options, device=accelerator.device)
            next_block_batch = functools.partial(block_batch, long_world, generator=generator, **batch_options)
    else:
        world = VideoWorld(cfg.frames, cfg.height, cfg.width, split="train",
                           two_object_prob=cfg.two_object_prob, device=accelerator.device)
    tokenizer = accelerator.unwrap_model(module).text_encoder
    on_policy = None
    if cfg.on_policy_share:
        on_policy = OnPolicyStates(cfg.on_policy_share, cfg.batch_size, cfg.on_policy_guidance_scale,
                                   sampling_scheduler(cfg), cfg.on_policy_steps,
                                   clips_used=cfg.batch_size // 2 if cfg.distill_guidance_scale else cfg.batch_size)
    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
                    disable=not accelerator.is_local_main_process, desc="train")
    step = start_step
    for step in progress:
        if cfg.block:
            loss = _block_step(cfg, next_block_batch(), module, tokenizer, generator, accelerator)
            attribute_loss = torch.zeros((), device=accelerator.device)
        else:
            loss, attribute_loss = _data_step(cfg, world, module, tokenizer, generator, accelerator, teacher,
                                              on_policy, attribute_head)
        accelerator.backward(loss + cfg.caption_attribute_loss * attribute_loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(module.parameters())

        if step % cfg.log_every == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_schedule.get_last_lr()[0]:.2e}")
            if accelerator.is_main_process:
                record = {"step": step, "loss": loss.item(), "seconds": time.time() - started}
                if attribute_head is not None:
                    record["attribute_loss"] = attribute_loss.item()
                with open(out / "loss.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        if cfg.max_minutes is not None and step % 10 == 0:
            share_clock()
        done = step + 1 == cfg.steps
        out_of_time = cfg.max_minutes is not None and elapsed[0] > 60 * cfg.max_minutes
        if (step + 1) % cfg.save_every == 0 or done or out_of_time:
            accelerator.save_state(str(out / f"checkpoint-{step + 1}"))
        if out_of_time:
            break

    accelerator.wait_for_everyone()
    final = out / "ema"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(module)
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
        unwrapped.text_encoder.save_pretrained(final / "text_encoder")
        unwrapped.transformer.save_pretrained(final / "transformer")
        ema.restore(unwrapped.parameters())
        (out / "trained_steps.txt").write_text(f"{step + 1}\n")
    return final


def _data_step(cfg: TrainConfig, world, module, tokenizer, generator, accelerator, teacher, on_policy,
               attribute_head):
    """One batch of noised world clips (and on-policy states, guidance pairs): (flow loss, attribute loss)."""
    videos, captions, _ = world.sample(cfg.batch_size, generator)
    drop = torch.rand(len(captions), generator=generator, device=accelerator.device) < cfg.caption_dropout
    t = sample_timesteps(len(captions), generator, accelerator.device, cfg.timestep_shift, low=cfg.min_timestep)
    noise = torch.randn(videos.shape, generator=generator, device=accelerator.device)
    if on_policy is not None:
        if on_policy.needs_refill():
            student = accelerator.unwrap_model(module)
            with accelerator.autocast():
                on_policy.refill(student.text_encoder, student.transformer,
                                 world.sample_captions(on_policy.paths, generator), generator)
        videos, captions, t, noise = on_policy.mix_into(videos, captions, t, noise)
    targets = attribute_targets(captions).to(accelerator.device) if attribute_head is not None else None
    # With guidance pairs `drop` is replaced below; drawing it anyway keeps the times and noise the same draws.
    if cfg.distill_guidance_scale:  # half the clips, each with its caption, then each without
        half = len(captions) // 2
        videos, t, noise = guidance_pairs(half, videos, t, noise)
        targets = guidance_pairs(half, targets)[0] if targets is not None else None
        captions, drop = captions[:half] * 2, torch.arange(2 * half, device=accelerator.device) >= half
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    ids, mask = tokenizer.tokenize(captions, warn_unknown=False)
    weights = foreground_weights(videos, cfg.foreground_weight) if cfg.foreground_weight != 1.0 else None
    ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
    with accelerator.autocast():
        teacher_velocity = teacher(ids, mask, videos, t, noise) if teacher is not None else None
        loss, attribute_loss = module(ids, mask, videos, t, noise, targets, (~drop).float(), weights,
                                      teacher_velocity, cfg.teacher_weight, cfg.distill_guidance_scale)
    return loss, attribute_loss


def _block_step(cfg: TrainConfig, batch, module, tokenizer, generator, accelerator):
    """One batch of long-clip windows with a noise level per chunk (block-causal model): the flow loss."""
    videos, chunk_captions, t, weights = batch
    if cfg.foreground_weight != 1.0:
        weights = weights * foreground_weights(videos, cfg.foreground_weight)
    noise = torch.randn(videos.shape, generator=generator, device=accelerator.device)
    chunks = len(chunk_captions[0])
    ids, mask = tokenizer.tokenize([c for row in chunk_captions for c in row], warn_unknown=False)
    ids = ids.to(accelerator.device).view(len(chunk_captions), chunks, -1)
    mask = mask.to(accelerator.device).view(len(chunk_captions), chunks, -1)
    with accelerator.autocast():
        loss, _ = module(ids, mask, videos, t, noise, pixel_weights=weights)
    return loss
