"""What the adapters of models with joint video-text self-attention share (HunyuanVideo, CogVideoX).

In these models the text tokens join the video tokens in one self-attention. A method only knows video tokens, so
the attention is cut in four: video queries over video keys go through the method; video queries over text keys,
and text queries over every key, are dense. Each query's parts are merged by log-sum-exp, which is exactly the
attention over the union of its keys. Text is a few hundred tokens, so the dense parts cost little next to the
video-video part. Padded text keys (a key-padding mask) are left out of every part.

A method must therefore return its log-sum-exp (`return_lse`); all built-in methods do. One that cannot is refused
when it is applied: running it alone would drop the text, and recovering its log-sum-exp would cost dense attention.
"""

from __future__ import annotations

import torch

from attention.kernels import dense_attention, merge_attention
from attention.adapters.method_processor import MethodProcessor
from attention.layout import VideoLayout
from attention.methods import autocast_dtype


def forward_argument(args: tuple, kwargs: dict, name: str, position: int):
    """An argument of the transformer's forward, given by keyword or by position (None when absent)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, N, D) on interleaved pairs (x[2i], x[2i+1]) with cos, sin (N, D) repeated per
    pair, computed in float32 and cast back, as both models' processors do."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-imag, real), dim=-1).flatten(-2)
    cos, sin = cos.to(x.device), sin.to(x.device)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def text_key_mask(attention_mask, num_video: int, num_text: int, text_first: bool):
    """Reads a joint-attention mask as a key-padding mask of the text.

    Returns (servable, kept): kept is None when no key is masked, else a (B or 1, num_text) bool of the text keys
    each sample keeps. servable is False for any other mask (not a boolean (B, 1, 1, N) mask over keys, or one that
    masks video keys): those calls go to the model's own processor.
    Inside a compiled graph the mask's values are not read (a Python bool of them would break the graph): a
    boolean (B, 1, 1, N) mask is taken as the key-padding mask of the text that HunyuanVideo's forward builds (every
    video key kept) and goes to `masked_text_attention`, which gives the same result when nothing is masked.
    """
    if attention_mask is None:
        return True, None
    total = num_video + num_text
    if (attention_mask.dtype != torch.bool or attention_mask.ndim != 4
            or tuple(attention_mask.shape[1:]) != (1, 1, total)):
        return False, None
    keys = attention_mask[:, 0, 0]
    video, text = (keys[:, num_text:], keys[:, :num_text]) if text_first else (keys[:, :num_video], keys[:, num_video:])
    if torch.compiler.is_compiling():
        return True, text
    if not bool(video.all()):
        return False, None
    return True, None if bool(text.all()) else text


# Query rows per step of the masked text attention: bounds its float32 scores (rows x heads x text keys).
_MASKED_ROWS = 8192


def _attend_text(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor | None):
    """(out, lse) of q over the text keys, each sample over its kept keys only; no kept key gives 0 and -inf.

    Eagerly each sample attends over its kept keys with the fused kernels; inside a compiled graph, where that
    per-sample branch would break the graph, `masked_text_attention` computes the same."""
    if kept is None:
        return dense_attention(q, k, v)
    if torch.compiler.is_compiling():
        return masked_text_attention(q, k, v, kept)
    outs, lses = [], []
    for b in range(q.shape[0]):
        keep = kept[b if kept.shape[0] > 1 else 0]
        if not bool(keep.any()):
            outs.append(torch.zeros_like(q[b:b + 1]))
            lses.append(torch.full(q.shape[1:3], float("-inf"), device=q.device).unsqueeze(0))
            continue
        out, lse = dense_attention(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def masked_text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor):
    """`_attend_text` with a mask, from the scores (text is a few hundred keys), in steps of query rows, with no
    branch on the mask's values."""
    scale = q.shape[-1] ** -0.5
    bias = torch.zeros(kept.shape, dtype=torch.float32, device=q.device).masked_fill(~kept, float("-inf"))
    bias = bias[:, None, None, :]
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], _MASKED_ROWS):
        scores = torch.matmul(q[:, :, start:start + _MASKED_ROWS].float(), kf.transpose(-1, -2)) * scale + bias
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # a row with no kept key: -inf - -inf
        outs.append(torch.matmul(weights, vf).to(v.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def joint_attention(method, layout: VideoLayout, step: int, video: tuple, text: tuple, kept_text=None):
    """Attention over video and text tokens together, the video-video part by `method`.

    video, text: (q, k, v) each (B, H, N, D). kept_text: None, or the text keys each sample keeps (see
    `text_key_mask`). Returns the outputs of the video queries and of the text queries.
    """
    dtype = autocast_dtype(video[0].device.type)
    if dtype is not None:
        # What the model's own attention call would compute in under autocast; the kernels take one dtype.
        video, text = tuple(x.to(dtype) for x in video), tuple(x.to(dtype) for x in text)
    (video_q, video_k, video_v), (text_q, text_k, text_v) = video, text
    video_to_video = method(video_q, video_k, video_v, layout, step, return_lse=True)
    video_to_text = _attend_text(video_q, text_k, text_v, kept_text)
    text_to_video = dense_attention(text_q, video_k, video_v)
    text_to_text = _attend_text(text_q, text_k, text_v, kept_text)
    video_out = merge_attention(*video_to_video, *video_to_text)[0]
    text_out = merge_attention(*text_to_video, *text_to_text)[0]
    return video_out, text_out


class JointTextProcessor(MethodProcessor):
    """Base of the processors: which calls the method serves. Subclasses compute q, k, v as their model does."""

    def serves(self, num_video: int, num_text: int) -> bool:
        """Whether this call runs the method: not a dense layer or warm-up step, a known layout, text present.

        A call whose token counts disagree with the layout is an error, as for the other adapters."""
        state, layout = self.state, self.state.layout
        if self._parallel_config is not None:
            # Under context parallelism a rank holds a share of the tokens: only the original (dense) attention
            # knows how to gather them here.
            if state.method != "dense":
                raise ValueError(f"attention method {state.method!r} does not run under context parallelism on "
                                 "HunyuanVideo or CogVideoX; only dense attention does")
            return False
        if layout is None or self.dense or state.dense_now or num_text == 0:
            return False
        if (num_video, num_text) != (layout.num_video_tokens, layout.text_tokens):
            f, h, w = layout.grid
            raise ValueError(f"layout expects {f}*{h}*{w} video and {layout.text_tokens} text tokens, got "
                             f"{num_video} and {num_text}; the attention layout does not match this call")
        return True

    def attend(self, video: tuple, text: tuple, kept_text=None):
        return joint_attention(self.method, self.state.layout, self.state.step, video, text, kept_text)


def check_method_returns_lse(method) -> None:
    if not getattr(method, "takes_lse", False):
        raise ValueError("on a model whose self-attention joins text tokens (HunyuanVideo, CogVideoX) an attention "
                         "method must return its log-sum-exp (take a `return_lse` option), to be merged with the "
                         "dense attention to the text")
