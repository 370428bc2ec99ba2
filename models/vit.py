"""A small Vision Transformer for small grayscale images, from Opacus-supported layers only (Conv2d
patch embedding, Embedding for the class token and positions, Linear, LayerNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import InputError


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, act: type[nn.Module]):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), act(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT; class token and positions are Embeddings so Opacus computes their per-sample grads."""

    def __init__(self, image_size: int, num_classes: int, patch: int = 8, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: int = 4, activation: str = "mish"):
        super().__init__()
        if image_size % patch:
            raise InputError(f"model vit: data.image_size {image_size} must be a multiple of the patch size {patch}")
        act = nn.Mish if activation == "mish" else nn.GELU
        self.tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Embedding(1, dim)
        self.pos_embed = nn.Embedding(self.tokens, dim)
        self.blocks = nn.Sequential(*[_EncoderBlock(dim, heads, mlp_ratio, act) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        positions = torch.arange(self.tokens, device=x.device).expand(b, -1)
        cls = self.cls_token(torch.zeros(b, 1, dtype=torch.long, device=x.device))
        h = torch.cat([cls, patches], dim=1) + self.pos_embed(positions)
        return self.fc(self.norm(self.blocks(h))[:, 0])
