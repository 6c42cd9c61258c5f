"""States on the student's own sampling path, for distillation on the inputs it meets when it generates.

Distillation regresses the student onto the teacher at noisy clips built from data, but a sampler feeds the model
its own earlier outputs, guided by classifier-free guidance, which push off the data's path. A small error there moves
the next input, and the error grows along the path: a clip can end far from the teacher's. Training on the states
the student reaches, with the teacher's velocity there as target, teaches it to steer back (as DAgger does for
imitation learning).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class OnPolicyStates:
    """A shuffled store of states from the student's guided sampling paths, refilled by sampling when it runs low.

    Each state is handed to the trainer as a point of its usual path x_t = (1 - t) * video + t * noise: the video is
    the clip its path ended at, and the noise is whatever puts the state at time t on the line to it. The paths are
    sampled with the weights being trained (not their EMA) in the training's precision, so they follow the exported
    pipeline's paths closely, not exactly.
    """

    def __init__(self, share: float, batch_size: int, guidance_scale: float,
                 scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, clips_used: int | None = None):
        """`clips_used`: the clips at the head of each batch that the loss sees (default: all `batch_size`);
        guidance pairs use the first half twice."""
        if not 0 < share <= 1:
            raise ValueError(f"on-policy share must lie in (0, 1], got {share}")
        if scheduler.config.get("stochastic_sampling"):
            raise ValueError("on-policy states follow the deterministic Euler sampler; the scheduler samples "
                             "stochastically")
        self.states_per_batch = max(1, round(share * (clips_used or batch_size)))
        # Captioned and uncaptioned passes go through the model together, so one forward has the training batch's
        # shape, which a compiled model is specialised to.
        self.paths = max(1, batch_size // 2)
        if self.states_per_batch > self.paths * num_steps:
            raise ValueError(f"one refill gives {self.paths * num_steps} states ({self.paths} paths of {num_steps} "
                             f"steps), fewer than the {self.states_per_batch} each batch takes")
        self.guidance_scale = guidance_scale
        scheduler.set_timesteps(num_steps)
        self.sigmas = scheduler.sigmas.float().cpu()  # num_steps times from 1 toward 0, then 0
        if not (self.sigmas[:-1] > 0).all():  # a state at time 0 has no noise to solve for
            raise ValueError("on-policy states need a scheduler whose sampling times run from 1 down toward 0")
        self.store: dict | None = None
        self.taken = 0

    @torch.no_grad()
    def sample_paths(self, text_encoder, transformer, captions: list[str], generator: torch.Generator):
        """Runs the guided Euler sampler from fresh noise for `captions`; returns every step's input, its time, the
        clip each path ended at and the index of its path."""
        device = generator.device
        ids, mask = text_encoder.tokenize(list(captions) + [""] * len(captions), warn_unknown=False)
        ids, mask = ids.to(device), mask.to(device)
        text = text_encoder(ids, mask)
        config = transformer.config
        shape = (len(captions), config.in_channels, config.sample_frames, config.sample_height, config.sample_width)
        x = torch.randn(shape, generator=generator, device=device)
        states, times = [], []
        for sigma, sigma_next in zip(self.sigmas[:-1].tolist(), self.sigmas[1:].tolist()):
            states.append(x)
            times.append(torch.full((len(captions),), sigma, device=device))
            t = torch.full((2 * len(captions),), 1000 * sigma, device=device)
            captioned, uncaptioned = transformer(torch.cat([x, x]), t, text, mask).sample.float().chunk(2)
            x = x + (sigma_next - sigma) * (uncaptioned + self.guidance_scale * (captioned - uncaptioned))
        path = torch.arange(len(captions), device=device).repeat(len(states))
        return torch.cat(states), torch.cat(times), x, path

    def refill(self, text_encoder, transformer, captions: list[str], generator: torch.Generator) -> None:
        states, times, ends, path = self.sample_paths(text_encoder, transformer, captions[: self.paths], generator)
        order = torch.randperm(len(states), generator=generator, device=states.device)
        # Each path's end is kept once; a state's video and noise are worked out when it is handed over.
        self.store = {"states": states[order], "t": times[order], "path": path[order], "ends": ends,
                      "captions": [captions[i] for i in path[order].tolist()]}
        self.taken = 0

    def needs_refill(self) -> bool:
        return self.store is None or self.taken + self.states_per_batch > len(self.store["t"])

    def mix_into(self, videos, captions: list[str], t, noise):
        """The batch with its first clips replaced by stored states (call `refill` first when `needs_refill`)."""
        n = self.states_per_batch
        take = slice(self.taken, self.taken + n)
        self.taken += n
        state_t = self.store["t"][take]
        tt = state_t.view(-1, 1, 1, 1, 1)
        state_videos = self.store["ends"][self.store["path"][take]]
        state_noise = (self.store["states"][take] - (1 - tt) * state_videos) / tt
        videos = torch.cat([state_videos, videos[n:]])
        t = torch.cat([state_t, t[n:]])
        noise = torch.cat([state_noise, noise[n:]])
        return videos, self.store["captions"][take] + list(captions[n:]), t, noise
