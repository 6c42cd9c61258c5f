"""A word-level text encoder small enough to ship, trained together with the video model.

Its vocabulary lives in its config, so a saved encoder carries its own tokenizer. Words it has never seen map to
one unknown token and are named in a warning; generation goes on.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from t2v.data import tokenize_words

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"


class TextEncoder(ModelMixin, ConfigMixin):
    """Embeds word ids with learned positions and a few transformer layers; returns (B, L, hidden_size)."""

    @register_to_config
    def __init__(
        self,
        vocab: list[str] | tuple[str, ...] = (),
        max_length: int = 24,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        self.tokens = [PAD, UNK, CLS] + [w for w in vocab if w not in (PAD, UNK, CLS)]
        self.token_ids = {w: i for i, w in enumerate(self.tokens)}
        self.word_embedding = nn.Embedding(len(self.tokens), hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, dim_feedforward=4 * hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)

    def tokenize(
        self, prompts: str | list[str], warn_unknown: bool = True, pad_to_max_length: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Word ids (B, L) with a leading <cls> and padding, and the boolean mask of real tokens.

        Padding goes to the full `max_length` by default, as in training: the transformer's cross-attention also
        attends to (zeroed) padding tokens, so their number must not change between training and generation.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        max_words = self.config.max_length - 1
        rows, unknown, truncated = [], set(), False
        for prompt in prompts:
            words = tokenize_words(prompt)
            unknown.update(w for w in words if w not in self.token_ids)
            truncated |= len(words) > max_words
            rows.append([self.token_ids[CLS]] + [self.token_ids.get(w, 1) for w in words[:max_words]])
        if warn_unknown and unknown:
            warnings.warn(f"words outside the model's vocabulary are ignored: {', '.join(sorted(unknown))}")
        if truncated:
            warnings.warn(f"prompt longer than {max_words} words: the rest is cut off")
        length = self.config.max_length if pad_to_max_length else max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = input_ids != 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.word_embedding(input_ids) + self.position_embedding(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=~attention_mask.bool())
        return self.final_norm(hidden)

    @torch.no_grad()
    def encode(self, prompts: str | list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, mask) for a list of prompts, on `device` (default: the encoder's own)."""
        device = device or self.device
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask
