"""Tiny randomly initialised models the tests share."""

import torch
from diffusers import WanTransformer3DModel

from t2v.models import VideoDiT


# A VideoDiT of 4 x 16 x 16 clips and a text encoder for it, small enough to train a few steps in a test.
TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=48, text_dim=16, freq_dim=16,
                max_frames=8, max_height=16, max_width=16, sample_frames=4, sample_height=16, sample_width=16)
TINY_TEXT = dict(hidden_size=16, num_layers=1, num_heads=2)


def randomised(model):
    # VideoDiT starts as the identity (zero gates, zero output): random weights make attention and comparisons matter.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def tiny_models() -> dict:
    """A VideoDiT and a WanTransformer3DModel of the same tiny shape: 4 channels, patch (1, 2, 2), 2 heads of 12."""
    dit = VideoDiT(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_attention_heads=2,
                   attention_head_dim=12, num_layers=2, ffn_dim=32, text_dim=16, freq_dim=16, max_frames=4,
                   max_height=8, max_width=8)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, patch_size=(1, 2, 2),
                                rope_max_seq_len=32)
    return {"video-dit": randomised(dit), "wan": randomised(wan)}
