"""Temporal (frame-to-frame) attention maps of a DiT's full 3D self-attention, and attention with an edited map.

BroadWay acts on the temporal attention of UNet video models: at every spatial position each frame attends over
the frames, a (frames x frames) map per position and head. A DiT with full 3D attention has no such module, but the
same quantity is inside its attention. For a query token i (frame f, position s) let

    M[i, g] = sum over the keys j of frame g of softmax_j(q_i . k_j / sqrt(d))

the attention mass it puts on frame g. Row i is a distribution over key frames, one row per (query frame, position)
exactly like the UNet's per-position maps; its mean over the positions of frame f is the frame-to-frame map A[f, g].
`frame_mass` computes M exactly, as one attention whose values are the one-hot frame of each key.

Editing the map. To give query i the frame masses T[i, :] instead of M[i, :], scale its weights on the keys of
frame g by T[i, g] / M[i, g]: the same as adding the log-bias log(T / M) per (query, key frame) to the logits. The
masses become exactly T and the distribution over keys inside each frame (the spatial part) is kept. Then

    out_i = sum_g T[i, g] * attention of q_i over the keys of frame g alone,

which `frame_attention` computes with one attention call in which the key frames act as extra heads, together
with M itself (from each frame's log-sum-exp); no (tokens x tokens) matrix is stored. With T = M it is plain
attention again (up to rounding). A guided call costs the FLOPs of one full attention, but writes `frames`
times its output.

`TemporalMapGuidance` installs this in the chosen self-attention layers for the chosen steps, around whatever
processor is there (the model's own, or an attention method's from `attention.apply`). Calls a sparse method would
serve are left to it by default (`sparse_calls="skip"`): its kernel never forms the per-frame masses, and a pooled
key block spans several frames, so no per-frame bias can be applied inside it exactly; `sparse_calls="dense"`
computes those guided calls densely instead; guidance that has a form for the map a sparse call does have, its
pooled block scores, offers `sparse_calls="scores"`: the call stays sparse, at its own density, and its selector
ranks edited scores (`attention.methods.block_sparse.editing_block_scores`). Every call the guidance does not act in goes to the installed
processor untouched, so strength 0 (nothing installed) or a step outside `steps` is bitwise the unguided model.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from attention.adapters import find_family
from attention.adapters.wan_style import project_qkv
from attention.kernels import dense_attention, triton_usable
from attention.methods.block_sparse import editing_block_scores
from t2v.guidance.base import Guidance
from t2v.models.block_dit import BlockVideoDiT

_CONTROLLER_ATTR = "_temporal_map_controller"


def _frame_onehot(num_tokens: int, frames: int, device) -> torch.Tensor:
    if num_tokens % frames:
        raise ValueError(f"{num_tokens} tokens do not split into {frames} frames")
    frame = torch.arange(num_tokens, device=device) // (num_tokens // frames)
    return (frame[:, None] == torch.arange(frames, device=device)).float()


def frame_mass(q: torch.Tensor, k: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, H, N, frames) float32: the attention mass each query puts on each key frame (rows sum to 1).

    q, k: (B, H, N, D), tokens in row-major (frame, height, width) order. Exact, in float32 whatever the input dtype.
    """
    b, h, n, _ = q.shape
    onehot = _frame_onehot(n, frames, q.device).expand(b, h, n, frames)
    return F.scaled_dot_product_attention(q.float(), k.float(), onehot)


def frame_to_frame_map(q: torch.Tensor, k: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, H, frames, frames): A[f, g], the mean over the queries of frame f of their mass on key frame g."""
    mass = frame_mass(q, k, frames)
    b, h, n, _ = mass.shape
    return mass.view(b, h, frames, n // frames, frames).mean(3)


def frame_attention(q, k, v, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of every query over the keys of each frame alone, (B, H, frames, N, Dv) in q's dtype, and
    the frame masses (B, H, N, frames) in float32, both from one attention call.

    The key frames act as extra heads (queries repeated, keys and values only regrouped), so the cost is that of
    one full attention and no (tokens x tokens) matrix is stored. Each frame's log-sum-exp of logits gives the
    masses exactly: M[i, g] = softmax over g of lse[i, g] (where no fast kernel returns it: `frame_mass`).
    """
    b, h, n, d = q.shape
    if n % frames:
        raise ValueError(f"{n} tokens do not split into {frames} frames")
    per_frame = n // frames
    q_rep = q.unsqueeze(2).expand(b, h, frames, n, d).reshape(b, h * frames, n, d)
    k_rep, v_rep = k.reshape(b, h * frames, per_frame, d), v.reshape(b, h * frames, per_frame, -1)
    if triton_usable(q_rep, 128):
        within, lse = dense_attention(q_rep, k_rep, v_rep)
    elif q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # The kernel behind SDPA on CPU, which also returns the log-sum-exp.
        within, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_rep, k_rep, v_rep)
    else:  # no fast kernel gives the log-sum-exp here: two SDPA calls beat the plain reference
        within = F.scaled_dot_product_attention(q_rep, k_rep, v_rep)
        return within.view(b, h, frames, n, -1), frame_mass(q, k, frames)
    mass = torch.softmax(lse.float().view(b, h, frames, n), dim=2).transpose(2, 3)
    return within.view(b, h, frames, n, -1), mass


def mix_frames(within: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dv): each query's per-frame outputs weighted by its target frame masses (B, H, N, frames)."""
    return (within * target.transpose(2, 3).unsqueeze(-1).to(within.dtype)).sum(2)


def attention_with_frame_mass(q, k, v, frames: int, target: torch.Tensor) -> torch.Tensor:
    """Attention whose per-(query, key frame) masses are `target` (B, H, N, frames), with the within-frame
    distributions of plain attention; same shape and dtype as q."""
    return mix_frames(frame_attention(q, k, v, frames)[0], target)


def frame_bias(target: torch.Tensor, mass: torch.Tensor, frames: int) -> torch.Tensor:
    """The same edit as an additive logit mask (B, H, N, N) for `scaled_dot_product_attention` (tests, reference)."""
    bias = torch.log(target) - torch.log(mass)
    return bias.repeat_interleave(mass.shape[2] // frames, dim=-1)


def _runs_sparse(processor) -> bool:
    """Whether an attention adapter's processor would hand this call to a method other than dense attention."""
    state = getattr(processor, "state", None)
    if state is None or not hasattr(processor, "method"):
        return False  # the model's own processor
    return not (processor.dense or state.dense_now or state.layout is None or state.method == "dense")


class TemporalMapGuidance(Guidance):
    """Base of guidance that edits the frame masses of chosen layers in chosen steps (see the module docstring).

    strength: 0 installs nothing. layers: self-attention layer indices (negative from the end); None for the
    subclass's default. steps: a fraction of the steps, counted from the first (0.2: the first 20%, as in
    BroadWay), or explicit step indices. sparse_calls: "skip" or "dense" (module docstring).
    Subclasses implement `edit`; `order` sorts the edits of one layer (self-guidance before motion enhancement).
    """

    order = 0
    reference_layer: int | None = None
    sparse_modes = ("skip", "dense")  # a subclass with an `edit_scores` adds "scores"

    def __init__(self, strength: float, layers=None, steps=0.2, sparse_calls: str = "skip"):
        if not math.isfinite(float(strength)) or strength < 0:
            raise ValueError(f"{self.name}: strength must be a finite number >= 0, got {strength}")
        if sparse_calls not in self.sparse_modes:
            raise ValueError(f"{self.name}: sparse_calls must be one of {', '.join(map(repr, self.sparse_modes))}, "
                             f"got {sparse_calls!r}")
        if isinstance(steps, (int, float)) and not 0 < steps <= 1:
            raise ValueError(f"{self.name}: a fraction of steps must be in (0, 1], got {steps}")
        self.strength, self.layers, self.steps, self.sparse_calls = float(strength), layers, steps, sparse_calls
        self.acting_layers: set[int] = set()
        self.acting_steps: set[int] = set()
        self._controller = None

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def resolve(self, num_layers: int, num_inference_steps: int) -> None:
        """Turns `layers` and `steps` into index sets for this model and this many steps."""
        layers = self.default_layers(num_layers) if self.layers is None else self.layers
        layers = [layers] if isinstance(layers, int) else list(layers)
        for i in [*layers, *([] if self.reference_layer is None else [self.reference_layer])]:
            if not -num_layers <= int(i) < num_layers:
                raise ValueError(f"{self.name}: layer {i} is out of range for {num_layers} self-attention layers")
        self.acting_layers = {int(i) % num_layers for i in layers}
        if isinstance(self.steps, (int, float)):
            self.acting_steps = set(range(math.ceil(self.steps * num_inference_steps - 1e-9)))
        else:
            self.acting_steps = {int(s) for s in self.steps}

    def configure(self, transformer) -> None:
        """Reads what the settings' defaults depend on from the model (before `resolve`)."""

    def edit(self, layer: int, target: torch.Tensor, original: torch.Tensor, maps: dict) -> torch.Tensor:
        """New frame masses for `layer` from `target` (the edits so far; `original` before any). `maps` holds the
        unedited masses of the reference layers of this call."""
        raise NotImplementedError

    def attach(self, transformer, num_inference_steps: int) -> None:
        """Installs the guided processors in `transformer` for a generation of `num_inference_steps` steps
        (strength 0: nothing)."""
        if self.strength == 0 or self._controller is not None:
            return
        family = find_family(transformer)
        if isinstance(transformer, BlockVideoDiT):
            # Its layers attend over a KV cache of earlier chunks that a guided call here would not see.
            raise ValueError(f"{self.name} does not support chunk-by-chunk (block-causal) models")
        # Settings are checked before anything is installed, so a mistake leaves the model as it was.
        self.configure(transformer)
        self.resolve(len(family.self_attention_modules(transformer)), num_inference_steps)
        self._controller = _Controller.attach(transformer)
        self._controller.add(self)

    def set_step(self, step: int) -> None:
        if self._controller is not None:
            self._controller.step = step

    def detach(self, transformer) -> None:
        """Puts back the processors `attach` wrapped (those another guidance still uses stay wrapped)."""
        if self._controller is not None:
            self._controller.discard(self, transformer)
            self._controller = None

    def begin(self, pipeline, num_inference_steps: int) -> None:
        self.attach(pipeline.transformer, num_inference_steps)

    def before_model(self, pipeline, step: int, timestep) -> None:
        self.set_step(step)

    def end(self, pipeline) -> None:
        self.detach(pipeline.transformer)


class _Controller:
    """One per transformer while some guidance acts on it: wraps every self-attention processor, reads the grid of
    each call, and keeps the reference maps of the current call."""

    def __init__(self, transformer):
        family = find_family(transformer)
        self.modules = family.self_attention_modules(transformer)
        self.guidance: list[TemporalMapGuidance] = []
        self.step: int | None = None
        self.frames: int | None = None
        self.tokens: int | None = None
        self.acting: list[TemporalMapGuidance] = []
        self.maps: dict[int, torch.Tensor] = {}
        self.wrappers = []
        for i, module in enumerate(self.modules):
            wrapper = _GuidedProcessor(self, module.processor, i)
            self.wrappers.append(wrapper)
            _set_processor(module, wrapper)
        self.hook = transformer.register_forward_pre_hook(functools.partial(self._pre_forward, family),
                                                          with_kwargs=True)

    @classmethod
    def attach(cls, transformer) -> "_Controller":
        controller = getattr(transformer, _CONTROLLER_ATTR, None)
        if controller is None:
            controller = cls(transformer)
            setattr(transformer, _CONTROLLER_ATTR, controller)
        return controller

    def add(self, guidance: TemporalMapGuidance) -> None:
        if guidance not in self.guidance:
            self.guidance.append(guidance)

    def discard(self, guidance: TemporalMapGuidance, transformer) -> None:
        if guidance in self.guidance:
            self.guidance.remove(guidance)
        if self.guidance:
            return
        for module, wrapper in zip(self.modules, self.wrappers):
            if module.processor is wrapper:  # leave a processor someone else installed since
                _set_processor(module, wrapper.inner)
        self.hook.remove()
        if getattr(transformer, _CONTROLLER_ATTR, None) is self:
            delattr(transformer, _CONTROLLER_ATTR)

    def _pre_forward(self, family, module, args, kwargs):
        layout = family.layout(module, args, kwargs, 64)
        video = layout is not None and layout.is_video_only
        self.frames, self.tokens = (layout.grid[0], layout.num_video_tokens) if video else (None, None)
        self.maps = {}  # reference maps belong to one transformer call (conditional and unconditional apart)
        self.acting = sorted((g for g in self.guidance if self.step in g.acting_steps), key=lambda g: g.order)
        return None


class _GuidedProcessor:
    """Wraps a self-attention processor: guided calls are computed here, all others go to `inner` unchanged."""

    def __init__(self, controller: _Controller, inner, layer: int):
        self.controller, self.inner, self.layer = controller, inner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        c = self.controller
        editors = [g for g in c.acting if self.layer in g.acting_layers]
        recorders = [g for g in c.acting if g.reference_layer == self.layer]
        plain = (encoder_hidden_states is None and attention_mask is None and not kwargs
                 and not attn.is_cross_attention and getattr(attn, "add_k_proj", None) is None)
        if (editors or recorders) and _runs_sparse(self.inner):
            scorers = [g for g in editors if g.sparse_calls == "scores"]
            editors = [g for g in editors if g.sparse_calls == "dense"]
            recorders = [g for g in recorders if g.sparse_calls == "dense"]
            if scorers and not (editors or recorders):  # the call stays sparse; its selector ranks edited scores
                with editing_block_scores(functools.partial(_edit_scores, scorers)):
                    return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                      **kwargs)
        if not (editors or recorders) or not plain or c.frames is None or hidden_states.shape[1] != c.tokens:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        q, k, v = project_qkv(attn, hidden_states, rotary_emb)
        within, mass = frame_attention(q, k, v, c.frames)
        if recorders:
            c.maps[self.layer] = mass
        target = mass
        for guidance in editors:
            target = guidance.edit(self.layer, target, mass, c.maps)
        out = mix_frames(within, target).transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def _edit_scores(guidance: list, scores: torch.Tensor, query_tiles: torch.Tensor) -> torch.Tensor:
    for g in guidance:
        scores = g.edit_scores(scores, query_tiles)
    return scores


def _set_processor(module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor
