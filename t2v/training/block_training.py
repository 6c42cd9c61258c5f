"""Batches for training a block-causal model (BlockVideoDiT) with diffusion forcing on windows of long clips.

A window of the model's length (context window plus one chunk) is cut from a long clip of the world, starting at
the clip's first frame or part-way through it. Each chunk gets its own noise level: the first `history` chunks are
clean or lightly noised (what the model will see as finished context when it generates) and take no loss; every
later chunk has its own independent noise level and is learned. A window cut part-way always keeps at least its
first chunk as history, since in generation a chunk that starts a window part-way through a clip is never made
from nothing: only the clip's first chunk is.
"""

from __future__ import annotations

import torch

from t2v.training.flow_path import sample_timesteps


def chunk_timesteps(offsets: list[int], chunks: int, generator: torch.Generator, device, shift: float,
                    history_noise: float = 0.05, low: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, chunks) times in [0, 1) (1 = pure noise) and (B, chunks) bool: the chunks that take the loss."""
    batch = len(offsets)
    part_way = torch.tensor([o > 0 for o in offsets], device=device)
    # History length: 0 .. chunks-1 from the clip's start, 1 .. chunks-1 part-way through it.
    lowest = part_way.long()
    history = lowest + (torch.rand(batch, generator=generator, device=device) * (chunks - lowest)).long()
    index = torch.arange(chunks, device=device)
    learned = index[None, :] >= history[:, None]
    noisy = sample_timesteps(batch * chunks, generator, device, shift, low=low).view(batch, chunks)
    light = torch.rand(batch, chunks, generator=generator, device=device) * history_noise
    return torch.where(learned, noisy, light), learned


def block_batch(world, batch_size: int, window_frames: int, chunk_frames: int, generator: torch.Generator,
                caption_dropout: float, shift: float, history_noise: float, start_share: float, low: float = 0.0):
    """One training batch: videos (B, 3, F, H, W), chunk captions (B lists of chunks, dropped ones empty), per-frame
    times (B, F) and loss weights (B, 1, F, 1, 1) that keep the loss to the learned chunks (mean 1 over them)."""
    videos, chunk_captions, offsets = world.sample_windows(batch_size, generator, window_frames, start_share)
    device = videos.device
    chunks = window_frames // chunk_frames
    t, learned = chunk_timesteps(offsets, chunks, generator, device, shift, history_noise, low)
    # Dropout takes a clip's captions away for every chunk at once, as unconditional generation has none.
    drop = (torch.rand(batch_size, generator=generator, device=device) < caption_dropout).tolist()
    chunk_captions = [["" for _ in row] if d else list(row) for row, d in zip(chunk_captions, drop)]
    frames_t = t.repeat_interleave(chunk_frames, dim=1)
    weights = learned.float().repeat_interleave(chunk_frames, dim=1)
    weights = weights / weights.mean().clamp(min=1e-6)
    return videos, chunk_captions, frames_t, weights[:, None, :, None, None]


class _WindowBatches(torch.utils.data.IterableDataset):
    """An endless stream of `block_batch` batches drawn on the CPU, each worker with its own generator."""

    def __init__(self, world_options: dict, batch_options: dict, seed: int):
        super().__init__()
        self.world_options, self.batch_options, self.seed = world_options, batch_options, seed

    def __iter__(self):
        from t2v.data.long_clips import LongVideoWorld

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)  # the workers share the host's cores
        world = LongVideoWorld(**self.world_options, device="cpu")
        generator = torch.Generator().manual_seed(self.seed * 1009 + worker)
        while True:
            yield block_batch(world, generator=generator, **self.batch_options)


def worker_batches(world_options: dict, batch_options: dict, seed: int, workers: int, device):
    """A function returning the next `block_batch` batch on `device`, drawn ahead by `workers` processes.
    world_options: LongVideoWorld's arguments but device; batch_options: block_batch's but world and generator."""
    loader = torch.utils.data.DataLoader(_WindowBatches(world_options, batch_options, seed), batch_size=None,
                                         num_workers=workers, prefetch_factor=4, persistent_workers=True,
                                         pin_memory=torch.device(device).type == "cuda")
    batches = iter(loader)

    def next_batch():
        videos, chunk_captions, t, weights = next(batches)
        return (videos.to(device, non_blocking=True), chunk_captions, t.to(device, non_blocking=True),
                weights.to(device, non_blocking=True))

    return next_batch
