"""Vision Transformers for 112x112 faces, state-dict compatible with arcface_torch's ``backbones/vit.py``.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), as adapted by arcface_torch: 9x9 patches
(112 -> 12x12 = 144 tokens, the last 4 pixel rows/columns unused), learned position embeddings, no class token,
pre-norm blocks with a ReLU6 MLP, and a head that flattens all tokens: Linear(144*C -> C) -> BN1d -> Linear(C -> D)
-> BN1d (eps 2e-5). During training a ``mask_ratio`` share of tokens is dropped before the blocks and replaced by a
learned ``mask_token`` after them (PatchDrop / random masking, He et al. "MAE" style), plus stochastic depth
(DropPath, Huang et al. 2016) at a rate rising linearly to ``drop_path_rate``.
Attention logits and softmax are computed in float32 even under autocast, as arcface_torch does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from facetrain.models._common import CheckpointingMixin
from facetrain.models.registry import register_backbone, register_variant


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p``, scale survivors by ``1/(1-p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """``fc1 -> ReLU6 -> dropout -> fc2 -> dropout`` on ``(B, N, C)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, C)``; softmax(q k^T / sqrt(d)) v computed in float32."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        with _autocast_off(x.device.type):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
            )
            out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv: ``(B, 3, H, W) -> (B, (H//p) * (W//p), C)``."""

    def __init__(self, img_size: int = 112, patch_size: int = 9, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT input must be {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(CheckpointingMixin, nn.Module):
    """arcface_torch's face ViT: ``(B, 3, 112, 112) -> (B, D)``.

    Args:
        embedding_size: D (arcface_torch's ``num_classes`` argument of this class).
        embed_dim: token width C.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0).
        mask_ratio: share of tokens dropped during training (0 disables).
        gradient_checkpointing: checkpoint every block during training (arcface_torch does for vit_b / vit_l).
        patch_size, img_size: 9 and 112 as in arcface_torch.
    """

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        patch_size: int = 9,
        img_size: int = 112,
        head: str = "vit",
    ):
        super().__init__()
        if head != "vit":
            from facetrain.errors import ModelError

            raise ModelError(f"ViT backbones have their own token head; head={head!r} is not supported (use 'vit')")
        self.embedding_size = embedding_size
        self.num_features = self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate (python: meta-safe)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.set_grad_checkpointing(gradient_checkpointing)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` share of the N tokens per sample; returns kept tokens and the inverse
        permutation ``(B, N)`` that restores the original order."""
        b, n, c = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep].unsqueeze(-1).expand(-1, -1, c))
        return kept, restore

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112) -> (B, N * C)``: tokens after the final LayerNorm, flattened (masked ones restored)."""
        b = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._random_masking(x)
        x = self.norm(self._run_blocks(self.blocks, x).float())
        if masking:
            fill = self.mask_token.to(x.dtype).expand(b, restore.shape[1] - x.shape[1], -1)
            x = torch.cat([x, fill], dim=1)
            x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return x.reshape(b, self.num_patches * self.embed_dim)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N * C) -> (B, D)``."""
        return self.feature(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` normalized RGB -> ``(B, D)`` unnormalized embedding."""
        return self.forward_head(self.forward_features(x))


def _autocast_off(device_type: str):
    # torch.autocast rejects device types without autocast support (e.g. "meta" when counting parameters).
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# (embed_dim, depth, num_heads) of arcface_torch's vit_t / vit_s / vit_b / vit_l (all 8 heads, patch 9).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_t": (256, 12, 8),
    "vit_s": (512, 12, 8),
    "vit_b": (512, 24, 8),
    "vit_l": (768, 24, 8),
}


def _vit(size: str, embedding_size: int, **kwargs) -> VisionTransformer:
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return VisionTransformer(
        embedding_size=embedding_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs
    )


@register_backbone
def vit_t(embedding_size: int = 512, **kwargs) -> VisionTransformer:
    """ViT-Tiny (C=256, 12 blocks): drop_path 0.1, mask 0.1."""
    return _vit("vit_t", embedding_size, **kwargs)


@register_backbone
def vit_s(embedding_size: int = 512, **kwargs) -> VisionTransformer:
    """ViT-Small (C=512, 12 blocks): drop_path 0.1, mask 0.1."""
    return _vit("vit_s", embedding_size, **kwargs)


@register_backbone
def vit_b(embedding_size: int = 512, **kwargs) -> VisionTransformer:
    """ViT-Base (C=512, 24 blocks): drop_path 0.1, mask 0.1."""
    return _vit("vit_b", embedding_size, **kwargs)


@register_backbone
def vit_l(embedding_size: int = 512, **kwargs) -> VisionTransformer:
    """ViT-Large (C=768, 24 blocks): drop_path 0.05, mask 0.05 (arcface_torch's ``vit_l_dp005_mask_005``)."""
    kwargs.setdefault("drop_path_rate", 0.05)
    kwargs.setdefault("mask_ratio", 0.05)
    return _vit("vit_l", embedding_size, **kwargs)


# arcface_torch's WebFace42M variants: same weights layout, other regularisation.
register_variant("vit_t_dp005_mask0", "vit_t", drop_path_rate=0.05, mask_ratio=0.0)
register_variant("vit_s_dp005_mask_0", "vit_s", drop_path_rate=0.05, mask_ratio=0.0)
register_variant("vit_b_dp005_mask_005", "vit_b", drop_path_rate=0.05, mask_ratio=0.05)
register_variant("vit_l_dp005_mask_005", "vit_l", drop_path_rate=0.05, mask_ratio=0.05)
