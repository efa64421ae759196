"""Synchformer (Iashin, Xie, Rahtu and Zisserman, "Synchformer: Efficient Synchronization from Sparse Cues",
ICASSP 2024): predicts the audio-visual offset of a clip as one of 21 classes over [-2, 2] s. Our own
implementation of the architecture of the released AudioSet checkpoint (`synchformer_state_dict.pth`, MMAudio's
v0.1 release asset, the one av-benchmark, JavisBench and OmniNFT's authors load), whose 513 tensor names and
shapes it reproduces exactly so the file loads strictly (`load_synchformer`). Three parts:

- `vfeat_extractor` (MotionFormer, a ViT-B/16 video transformer with divided space-time attention): a 16-frame
  224 px segment in [-1, 1] is cut into 2x16x16 tubelets (8 x 14 x 14 tokens + CLS) with a spatial position
  embedding shared by the frames plus a temporal one; each of 12 blocks attends over time (each patch position
  across the 8 tubelet frames), then over space (the patches of one tubelet frame), then an MLP; the CLS token
  takes part in both as a key and attends to every token. Each tubelet frame's patches are then pooled by a
  transformer encoder layer with its own CLS token (`spatial_attn_agg`): (segments, 8, 768).
- `afeat_extractor` (AST, the Audio Spectrogram Transformer): a segment's 128 x 66 log-mel spectrogram is cut
  into 16x16 patches with stride 10 (12 frequency x 6 time patches, + CLS and distillation tokens) and run through
  12 pre-norm ViT layers; each time column's 12 frequency patches are pooled the same way (`freq_attn_agg`):
  (segments, 6, 768).
- `transformer`: both projected (`vproj`, `aproj`), 14 segments of each joined as [OFF, video, MOD, audio] (198
  tokens with a learned position embedding) through 3 GPT-style blocks; the OFF token's output is the 21 offset
  logits (`off_head`).

The reference's MotionFormer also holds an unused 2D patch embedding (`patch_embed`): it is in the checkpoint, so
it is kept here. Dropout is absent (inference only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SynchformerConfig:
    """The architecture; the defaults are the released checkpoint's. Tests build tiny ones."""

    dim: int = 768
    mlp_ratio: int = 4
    # Video: MotionFormer on `segment_frames` frames of image_size^2 px, tubelets of tubelet x patch x patch.
    image_size: int = 224
    patch: int = 16
    tubelet: int = 2
    segment_frames: int = 16
    video_depth: int = 12
    video_heads: int = 12
    # Audio: AST on n_mels x mel_frames log-mel patches of audio_patch^2 with stride audio_stride.
    n_mels: int = 128
    mel_frames: int = 66
    audio_patch: int = 16
    audio_stride: int = 10
    audio_depth: int = 12
    audio_heads: int = 12
    # The sync transformer over window_segments segments of each; offset classes spread over +-max_offset s.
    sync_depth: int = 3
    sync_heads: int = 8
    window_segments: int = 14
    offset_classes: int = 21
    max_offset: float = 2.0

    @property
    def video_tokens(self) -> int:
        """Feature vectors per video segment (tubelet frames): 8."""
        return self.segment_frames // self.tubelet

    @property
    def audio_grid(self) -> tuple[int, int]:
        """AST patches of one segment's spectrogram (frequency, time): (12, 6)."""
        f = (self.n_mels - self.audio_patch) // self.audio_stride + 1
        t = (self.mel_frames - self.audio_patch) // self.audio_stride + 1
        return f, t

    @property
    def sync_tokens(self) -> int:
        """The sync transformer's sequence: OFF + video + MOD + audio tokens of a window (198)."""
        return 2 + self.window_segments * (self.video_tokens + self.audio_grid[1])


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head scaled dot-product attention of (B, L, D) queries over (B, S, D) keys and values."""
    b, length, d = q.shape

    def split(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, d // heads)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, length, d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ClsPool(nn.TransformerEncoderLayer):
    """One pre-norm transformer encoder layer (GELU, LayerNorm eps 1e-6) over a learned CLS token followed by
    the tokens to pool; returns the CLS output: (B, L, D) -> (B, D)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__(
            dim, heads, hidden, dropout=0.0, activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return super().forward(x)[:, 0]


class Proj(nn.Module):
    """A holder of one `proj` layer (the checkpoint's `patch_embed.proj`, `patch_embed_3d.proj`)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


# ---- video: MotionFormer ----------------------------------------------------------------------------------


class DividedAttention(nn.Module):
    """Self-attention of each patch token within one axis of the (frames, patches) token grid: over time (the same
    patch position in every frame) or over space (all patches of its frame). The CLS token (token 0) is an extra
    key and value of every group, and its own query attends to all tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, frames: int, over_time: bool) -> Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (n, h, L, e)
        cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (n, h, 1, e)
        groups = []
        for t in (q, k, v):
            grid = t[:, :, 1:].unflatten(2, (frames, -1))  # (n, h, frames, patches, e)
            groups.append(grid.transpose(2, 3) if over_time else grid)  # a sequence per patch or per frame
        qg, kg, vg = groups
        count = qg.shape[2]
        kg = torch.cat([k[:, :, None, :1].expand(-1, -1, count, -1, -1), kg], dim=3)
        vg = torch.cat([v[:, :, None, :1].expand(-1, -1, count, -1, -1), vg], dim=3)
        out = F.scaled_dot_product_attention(qg, kg, vg)
        out = (out.transpose(2, 3) if over_time else out).flatten(2, 3)  # (n, h, frames * patches, e)
        out = torch.cat([cls, out], dim=2).transpose(1, 2).reshape(n, length, d)
        return self.proj(out)


class DividedBlock(nn.Module):
    """Time attention, then space attention, then the MLP, each pre-norm (eps 1e-6) with a residual."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, heads)
        self.timeattn = DividedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        x = x + self.timeattn(self.norm3(x), frames, over_time=True)
        x = x + self.attn(self.norm1(x), frames, over_time=False)
        return x + self.mlp(self.norm2(x))


class MotionFormer(nn.Module):
    """(n, 3, segment_frames, image_size, image_size) in [-1, 1] -> (n, video_tokens, dim)."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        d, side = cfg.dim, cfg.image_size // cfg.patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + 1, d))
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.video_tokens, d))
        self.patch_embed = Proj(nn.Conv2d(3, d, cfg.patch, stride=cfg.patch))  # unused, as in the reference
        tubelet = (cfg.tubelet, cfg.patch, cfg.patch)
        self.patch_embed_3d = Proj(nn.Conv3d(3, d, tubelet, stride=tubelet))
        self.blocks = nn.ModuleList(DividedBlock(d, cfg.video_heads, cfg.mlp_ratio * d) for _ in range(cfg.video_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.spatial_attn_agg = ClsPool(d, cfg.video_heads, cfg.mlp_ratio * d)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed_3d.proj(x)  # (n, D, frames, h, w)
        n, d, frames, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (n, frames * h * w, D), frame-major
        position = self.pos_embed[:, 1:].repeat(1, frames, 1) + self.temp_embed.repeat_interleave(h * w, dim=1)
        x = torch.cat([self.cls_token.expand(n, -1, -1) + self.pos_embed[:, :1], x + position], dim=1)
        for block in self.blocks:
            x = block(x, frames)
        x = self.norm(x[:, 1:]).reshape(n * frames, h * w, d)  # each frame's patches
        return self.spatial_attn_agg(x).view(n, frames, d)


# ---- audio: AST -------------------------------------------------------------------------------------------


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class QKV(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class ASTAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = QKV(dim)
        self.output = Dense(dim, dim)


class ASTLayer(nn.Module):
    """A pre-norm ViT layer (LayerNorm eps 1e-12, GELU MLP)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention = ASTAttention(dim)
        self.intermediate = Dense(dim, hidden)
        self.output = Dense(hidden, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        h, qkv = self.layernorm_before(x), self.attention.attention
        x = x + self.attention.output.dense(attention(qkv.query(h), qkv.key(h), qkv.value(h), self.heads))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ASTEmbeddings(nn.Module):
    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        f, t = cfg.audio_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, f * t + 2, cfg.dim))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(1, cfg.dim, cfg.audio_patch, stride=cfg.audio_stride)


class ASTEncoder(nn.Module):
    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            ASTLayer(cfg.dim, cfg.audio_heads, cfg.mlp_ratio * cfg.dim) for _ in range(cfg.audio_depth)
        )


class AST(nn.Module):
    """(n, n_mels, mel_frames) -> (n, 2 + f * t, dim): CLS, distillation, then the patches frequency-major."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        self.embeddings = ASTEmbeddings(cfg)
        self.encoder = ASTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.dim, eps=1e-12)

    def forward(self, mel: Tensor) -> Tensor:
        emb = self.embeddings
        x = emb.patch_embeddings.projection(mel[:, None]).flatten(2).transpose(1, 2)  # (n, f * t, D)
        n = x.shape[0]
        x = torch.cat([emb.cls_token.expand(n, -1, -1), emb.distillation_token.expand(n, -1, -1), x], dim=1)
        x = x + emb.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class AudioEncoder(nn.Module):
    """(n, n_mels, mel_frames) normalised log-mel -> (n, t, dim): AST, then each time column's frequency patches
    pooled."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        self.grid = cfg.audio_grid
        self.ast = AST(cfg)
        self.freq_attn_agg = ClsPool(cfg.dim, cfg.audio_heads, cfg.mlp_ratio * cfg.dim)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.ast(mel)[:, 2:]  # the patches, without CLS and distillation tokens
        n, _, d = x.shape
        f, t = self.grid
        x = x.reshape(n, f, t, d).transpose(1, 2).reshape(n * t, f, d)  # each time column's frequency patches
        return self.freq_attn_agg(x).view(n, t, d)


# ---- the sync transformer ---------------------------------------------------------------------------------


class SyncAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(attention(self.query(x), self.key(x), self.value(x), self.heads))


class SyncBlock(nn.Module):
    """A GPT-style pre-norm block (LayerNorm eps 1e-5), unmasked."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = SyncAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SyncTransformer(nn.Module):
    """(B, window * video_tokens, dim) video and (B, window * t, dim) audio features -> (B, offset_classes)."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, d))
        self.vis_in_lnorm = nn.LayerNorm(d)
        self.aud_in_lnorm = nn.LayerNorm(d)
        self.pos_emb_cfg = nn.Module()  # the checkpoint's name for the holder of the position embedding
        self.pos_emb_cfg.pos_emb = nn.Parameter(torch.zeros(1, cfg.sync_tokens, d))
        self.blocks = nn.Sequential(*(SyncBlock(d, cfg.sync_heads, cfg.mlp_ratio * d) for _ in range(cfg.sync_depth)))
        self.ln_f = nn.LayerNorm(d)
        self.off_head = nn.Linear(d, cfg.offset_classes)

    def forward(self, video: Tensor, audio: Tensor) -> Tensor:
        b = video.shape[0]
        parts = [self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(video)]
        parts += [self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(audio)]
        x = torch.cat(parts, dim=1) + self.pos_emb_cfg.pos_emb
        return self.off_head(self.ln_f(self.blocks(x))[:, 0])


class Synchformer(nn.Module):
    """The three parts; `offset_logits` of a window of segment features."""

    def __init__(self, cfg: SynchformerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SynchformerConfig()
        self.vfeat_extractor = MotionFormer(cfg)
        self.afeat_extractor = AudioEncoder(cfg)
        self.vproj = nn.Linear(cfg.dim, cfg.dim)
        self.aproj = nn.Linear(cfg.dim, cfg.dim)
        self.transformer = SyncTransformer(cfg)

    def video_features(self, segments: Tensor) -> Tensor:
        """(n, 3, segment_frames, H, W) in [-1, 1] -> (n, video_tokens, dim)."""
        return self.vfeat_extractor(segments)

    def audio_features(self, mels: Tensor) -> Tensor:
        """(n, n_mels, mel_frames) normalised log-mel -> (n, audio_grid[1], dim)."""
        return self.afeat_extractor(mels)

    def offset_logits(self, video: Tensor, audio: Tensor) -> Tensor:
        """(B, window_segments, video_tokens, dim) and (B, window_segments, t, dim) features -> (B, classes)."""
        return self.transformer(self.vproj(video).flatten(1, 2), self.aproj(audio).flatten(1, 2))

    def offset_grid(self) -> Tensor:
        """(offset_classes,) float64: each class's offset in seconds, -max_offset to max_offset evenly."""
        return torch.linspace(-self.cfg.max_offset, self.cfg.max_offset, self.cfg.offset_classes, dtype=torch.float64)


@torch.no_grad()
def randomize(model: Synchformer, seed: int = 0, std: float = 0.02) -> Synchformer:
    """Random weights, the same for a seed on every device: LayerNorms 1 and 0, every other tensor normal(0,
    std), drawn on the CPU in state-dict order. For tests and benchmarks; the real weights come from the file."""
    generator = torch.Generator().manual_seed(seed)
    norms = {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")
    }
    for name, tensor in model.state_dict().items():
        if name in norms:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return model


def parameter_count(cfg: SynchformerConfig) -> int:
    """Parameters of a model of `cfg`, counted on the meta device (237,460,245 for the released one)."""
    with torch.device("meta"):
        model = Synchformer(cfg)
    return sum(math.prod(t.shape) for t in model.state_dict().values())
