"""Temporal self-guidance (BroadWay): pull the temporal attention maps of several layers toward a reference layer's.

BroadWay observed that clips with structural artifacts and flicker are those whose decoder blocks disagree about
the temporal attention map, and that blending each block's map toward the map of an early decoder block,
A <- A + alpha * (A_ref - A), makes the blocks agree and the clip steadier. In a DiT every layer works at the same
resolution, so the reference is simply an earlier layer and the maps need no interpolation: each query token's
frame masses (see `temporal_maps`) are blended toward the same token's masses in the reference layer. The
reference is averaged over its heads, since head h of one layer has nothing to do with head h of another.

A sparse call forms no per-frame masses, only its selector's pooled block scores, and a later layer's scores may
be over other chunks than the reference layer's (VMoBA changes its partition by layer). With
`sparse_calls="scores"` the reference of those calls is the map's own temporal window instead: each query block's
scores are blended toward their mean over the query blocks at the same place in the neighbouring tiles in time, so
consecutive tiles rank the same key blocks first (and each other's), at the call's own density.
"""

from __future__ import annotations

import torch

from t2v.guidance.temporal_maps import TemporalMapGuidance


class TemporalSelfGuidance(TemporalMapGuidance):
    """strength: alpha in [0, 1] (0: off, 1: the reference's map). reference: "layer" (BroadWay: the map of
    `reference_layer`, which `layers`, all after it, follow; default every later layer) or "window" (each query's
    own masses kept to the `span` key frames around its frame, the length the model was trained at by default:
    for clips longer than trained, a map of the kind the model knows; default layers: all). steps: the share of
    steps it acts in, from the first (or step indices). sparse_calls: "skip", "dense" (see `temporal_maps`) or
    "scores" (the module docstring)."""

    name = "temporal-self-guidance"
    order = 0
    sparse_modes = ("skip", "dense", "scores")

    def __init__(self, strength: float = 0.6, reference_layer: int = 1, layers=None, steps=0.2,
                 reference: str = "layer", span: int | None = None, sparse_calls: str = "skip"):
        if strength > 1:
            raise ValueError(f"{self.name}: strength must be in [0, 1], got {strength}")
        if reference not in ("layer", "window"):
            raise ValueError(f"{self.name}: reference must be 'layer' or 'window', got {reference!r}")
        if span is not None and int(span) < 1:
            raise ValueError(f"{self.name}: span must be at least 1 frame, got {span}")
        super().__init__(strength, layers, steps, sparse_calls)
        self.reference = reference
        self.reference_layer = int(reference_layer) if reference == "layer" else None
        self.span = None if span is None else int(span)

    def configure(self, transformer) -> None:
        if self.span is None:  # the frames the model was trained at, in latent frames
            config = transformer.config
            self.span = max(1, config.get("sample_frames", 16) // config.get("patch_size", (1,))[0])

    def default_layers(self, num_layers: int) -> list[int]:
        if self.reference == "window":
            return list(range(num_layers))
        return list(range(self.reference_layer % num_layers + 1, num_layers))

    def resolve(self, num_layers: int, num_inference_steps: int) -> None:
        super().resolve(num_layers, num_inference_steps)
        if self.reference != "layer":
            return
        self.reference_layer %= num_layers
        # The reference map is read in the same forward pass, so it must already have been computed.
        early = sorted(i for i in self.acting_layers if i <= self.reference_layer)
        if early:
            raise ValueError(f"{self.name}: layers {early} do not come after the reference layer "
                             f"{self.reference_layer}; only later layers can follow it")

    def edit_scores(self, scores: torch.Tensor, query_tiles: torch.Tensor) -> torch.Tensor:
        """A sparse call's (B, H, NQB, K) block scores blended toward their temporal neighbours' (module docstring)."""
        mean = torch.einsum("ij,bhjk->bhik", temporal_neighbour_mean(query_tiles), scores.float())
        return (scores + self.strength * (mean - scores)).to(scores.dtype)

    def edit(self, layer: int, target: torch.Tensor, original: torch.Tensor, maps: dict) -> torch.Tensor:
        if self.reference == "window":
            return target + self.strength * (windowed(target, self.span) - target)
        reference = maps.get(self.reference_layer)
        if reference is None:  # the reference call was left to a sparse method: nothing exact to follow
            return target
        return target + self.strength * (reference.mean(1, keepdim=True) - target)


def temporal_neighbour_mean(query_tiles: torch.Tensor) -> torch.Tensor:
    """(NQB, NQB) float32: row i averages the query blocks at block i's tile place (h, w) whose tile frame index is
    within one of its own (itself included)."""
    frame, place = query_tiles[:, 0], query_tiles[:, 1:]
    near = ((place[:, None] == place[None]).all(-1) & ((frame[:, None] - frame[None]).abs() <= 1)).float()
    return near / near.sum(1, keepdim=True)


def windowed(masses: torch.Tensor, span: int) -> torch.Tensor:
    """Frame masses (B, H, N, frames) kept to the `span` key frames around each query's frame (a window slid
    along the clip and stopped at its ends) and renormalised; tokens in frame-major order."""
    frames = masses.shape[-1]
    if span >= frames:
        return masses
    query_frame = torch.arange(masses.shape[2], device=masses.device) // (masses.shape[2] // frames)
    start = (query_frame - span // 2).clamp(0, frames - span)
    key_frame = torch.arange(frames, device=masses.device)
    inside = (key_frame >= start[:, None]) & (key_frame < start[:, None] + span)
    kept = masses * inside
    return kept / kept.sum(-1, keepdim=True).clamp(min=1e-12)
