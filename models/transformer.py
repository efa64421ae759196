"""The LTX-2 audio-video transformer: one definition for every backend.

Per block (ARCHITECTURE.md section 2): video and audio self-attention, text cross-attention, then
the two cross-modal attentions on the pre-A2V snapshots of both streams (A2V: video queries, audio
keys/values; V2A: audio queries, video keys/values, both in the audio head layout), then the FFNs.
Every sub-layer is modulated by adaLN-single rows plus the block's own table.

LTX-2.3 is the same definition with three ModelConfig flags (models.config): gated attentions, adaLN on
the text cross-attention (rows 6-8 of the 9-row tables modulate and gate its queries; the prompt
adaLN-single, fed the per-sample sigma, plus the blocks' 2-row prompt tables shift and scale its
contexts) and no caption projections (the contexts arrive at the stream widths).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backends import TorchBackend
from .config import ModelConfig
from .layers import AdaLNSingle, Attention, AttentionProbe, CaptionProjection, FeedForward, rms_norm
from .rope import Rope, audio_positions, split_rope, video_positions
from .stage import Stage, pack, stage_layers, unpack


class V2AProbe(Protocol):
    """What the model calls around each block's V2A attention (audio queries, video keys): the hook
    through which region-wise reweighting records the attention mass (engine.algorithm.reweighting)."""

    def wants(self, block: int) -> bool:
        """Whether `block`'s V2A attention is recorded now; only then does the attention return its LSE."""

    def record(self, block: int, q: Tensor, k: Tensor, lse: Tensor) -> None:
        """After the attention of `block`: post-RoPE queries (B, H, N_a, D) and keys (B, H, N_v, D) of
        this rank's heads and the real tokens only, and the attention's row log-sum-exp (B, H, N_a)."""


def _rows(table: Tensor, mod: Tensor, start: int, stop: int) -> list[Tensor]:
    """Modulation rows start..stop-1: the block's table plus the global (B, T, k*D) adaLN output."""
    k = table.shape[0]
    values = table[None, None] + mod.unflatten(-1, (k, -1))
    return list(values[:, :, start:stop].unbind(dim=2))


class AVBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: TorchBackend):
        super().__init__()
        dv, da, h, eps, gated = cfg.video_dim, cfg.audio_dim, cfg.num_heads, cfg.norm_eps, cfg.gated_attention
        self.eps, self.text_adaln = eps, cfg.cross_attention_adaln
        self.attn1 = Attention(backend, dv, dv, h, cfg.video_head_dim, eps, gated)
        self.attn2 = Attention(backend, dv, dv, h, cfg.video_head_dim, eps, gated)
        self.audio_attn1 = Attention(backend, da, da, h, cfg.audio_head_dim, eps, gated)
        self.audio_attn2 = Attention(backend, da, da, h, cfg.audio_head_dim, eps, gated)
        self.audio_to_video_attn = Attention(backend, dv, da, h, cfg.audio_head_dim, eps, gated)
        self.video_to_audio_attn = Attention(backend, da, dv, h, cfg.audio_head_dim, eps, gated)
        self.ff = FeedForward(backend, dv)
        self.audio_ff = FeedForward(backend, da)
        k = cfg.modulation_rows
        self.scale_shift_table = nn.Parameter(torch.randn(k, dv) / dv**0.5)
        self.audio_scale_shift_table = nn.Parameter(torch.randn(k, da) / da**0.5)
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.randn(5, dv) / dv**0.5)
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.randn(5, da) / da**0.5)
        if self.text_adaln:  # shift and scale of the text contexts (LTX-2.3)
            self.prompt_scale_shift_table = nn.Parameter(torch.randn(2, dv) / dv**0.5)
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.randn(2, da) / da**0.5)
        # Layer-wise gradient surgery: dK, dV of the A2V audio keys/values are multiplied by this.
        self.a2v_kv_grad_scale = 1.0

    def forward(
        self,
        vx: Tensor,
        ax: Tensor,
        ctx: tuple[Tensor, Tensor],
        masks: dict[str, Tensor | None],
        mod: dict[str, Tensor],
        rope: dict[str, Rope],
        v2a_probe: AttentionProbe | None,
        perturbed: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """`masks`: key masks (B, T) by key sequence ('video', 'audio', 'video_ctx', 'audio_ctx'); None = all real.
        `perturbed` (B,) bool: rows whose video and audio self-attention this block skips (STG, see
        Attention); None: no row."""
        eps = self.eps
        # Self-attention, then text cross-attention (no AdaLN, no gate on the latter in the 19B release;
        # LTX-2.3: queries modulated and gated by rows 6-8, contexts shifted and scaled by the prompt rows).
        sh, sc, g = _rows(self.scale_shift_table, mod["video"], 0, 3)
        x = rms_norm(vx, eps) * (1 + sc) + sh
        vx = vx + self.attn1(x, q_rope=rope["video"], key_mask=masks["video"], skip_rows=perturbed) * g
        sh, sc, g = _rows(self.audio_scale_shift_table, mod["audio"], 0, 3)
        x = rms_norm(ax, eps) * (1 + sc) + sh
        ax = ax + self.audio_attn1(x, q_rope=rope["audio"], key_mask=masks["audio"], skip_rows=perturbed) * g
        if self.text_adaln:
            sh, sc, g = _rows(self.scale_shift_table, mod["video"], 6, 9)
            sh_kv, sc_kv = _rows(self.prompt_scale_shift_table, mod["prompt_video"], 0, 2)
            x = rms_norm(vx, eps) * (1 + sc) + sh
            vx = vx + self.attn2(x, ctx[0] * (1 + sc_kv) + sh_kv, key_mask=masks["video_ctx"]) * g
            sh, sc, g = _rows(self.audio_scale_shift_table, mod["audio"], 6, 9)
            sh_kv, sc_kv = _rows(self.audio_prompt_scale_shift_table, mod["prompt_audio"], 0, 2)
            x = rms_norm(ax, eps) * (1 + sc) + sh
            ax = ax + self.audio_attn2(x, ctx[1] * (1 + sc_kv) + sh_kv, key_mask=masks["audio_ctx"]) * g
        else:
            vx = vx + self.attn2(rms_norm(vx, eps), ctx[0], key_mask=masks["video_ctx"])
            ax = ax + self.audio_attn2(rms_norm(ax, eps), ctx[1], key_mask=masks["audio_ctx"])

        # Cross-modal attentions, both reading the same pre-A2V snapshots. AV tables are scale-then-shift.
        vn, an = rms_norm(vx, eps), rms_norm(ax, eps)
        sc_v_a2v, sh_v_a2v, sc_v_v2a, sh_v_v2a = _rows(self.scale_shift_table_a2v_ca_video[:4], mod["video_ca"], 0, 4)
        sc_a_a2v, sh_a_a2v, sc_a_v2a, sh_a_v2a = _rows(self.scale_shift_table_a2v_ca_audio[:4], mod["audio_ca"], 0, 4)
        (g_a2v,) = _rows(self.scale_shift_table_a2v_ca_video[4:], mod["a2v_gate"], 0, 1)
        (g_v2a,) = _rows(self.scale_shift_table_a2v_ca_audio[4:], mod["v2a_gate"], 0, 1)
        a2v = self.audio_to_video_attn(
            vn * (1 + sc_v_a2v) + sh_v_a2v,
            an * (1 + sc_a_a2v) + sh_a_a2v,
            q_rope=rope["video_ca"],
            k_rope=rope["audio_ca"],
            key_mask=masks["audio"],
            kv_grad_scale=self.a2v_kv_grad_scale,
        )
        v2a = self.video_to_audio_attn(
            an * (1 + sc_a_v2a) + sh_a_v2a,
            vn * (1 + sc_v_v2a) + sh_v_v2a,
            q_rope=rope["audio_ca"],
            k_rope=rope["video_ca"],
            key_mask=masks["video"],
            probe=v2a_probe,
        )
        vx = vx + g_a2v * a2v
        ax = ax + g_v2a * v2a

        sh, sc, g = _rows(self.scale_shift_table, mod["video"], 3, 6)
        vx = vx + self.ff(rms_norm(vx, eps) * (1 + sc) + sh) * g
        sh, sc, g = _rows(self.audio_scale_shift_table, mod["audio"], 3, 6)
        ax = ax + self.audio_ff(rms_norm(ax, eps) * (1 + sc) + sh) * g
        return vx, ax


def _check(name: str, x: Tensor, shape: tuple[int | None, ...]) -> None:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")


class LTX2AVTransformer(nn.Module):
    """Joint audio-video DiT; returns the velocity v = eps - x0 for both streams.

    Built as pipeline stage `stage` (default: the whole model), it holds only that stage's modules,
    under their single-process names. A stage other than the first reads the packed carry set by
    `set_input_tensor` (megatron's schedule calls it) instead of embedding the inputs; a stage other
    than the last returns the packed carry instead of the velocities (see models.stage).
    """

    def __init__(self, cfg: ModelConfig, backend: TorchBackend | None = None, stage: Stage | None = None):
        super().__init__()
        backend = backend or TorchBackend()
        stage = stage or Stage()
        if stage.layers is None:
            stage = replace(stage, layers=stage_layers(cfg.num_layers, stage.count, stage.index))
        self.config, self.backend, self.stage, self.sharding = cfg, backend, stage, backend.sharding
        dv, da, f, k = cfg.video_dim, cfg.audio_dim, cfg.timestep_embed_dim, cfg.modulation_rows
        if stage.first:
            self.patchify_proj = backend.linear(cfg.in_channels, dv)
            self.audio_patchify_proj = backend.linear(cfg.audio_in_channels, da)
            if cfg.caption_projection:
                self.caption_projection = CaptionProjection(backend, cfg.caption_channels, dv)
                self.audio_caption_projection = CaptionProjection(backend, cfg.caption_channels, da)
            self.adaln_single = AdaLNSingle(backend, dv, k, f)
            self.audio_adaln_single = AdaLNSingle(backend, da, k, f)
            if cfg.cross_attention_adaln:  # the text contexts' shift and scale, from the per-sample sigma
                self.prompt_adaln_single = AdaLNSingle(backend, dv, 2, f)
                self.audio_prompt_adaln_single = AdaLNSingle(backend, da, 2, f)
            self.av_ca_video_scale_shift_adaln_single = AdaLNSingle(backend, dv, 4, f)
            self.av_ca_audio_scale_shift_adaln_single = AdaLNSingle(backend, da, 4, f)
            self.av_ca_a2v_gate_adaln_single = AdaLNSingle(backend, dv, 1, f)
            self.av_ca_v2a_gate_adaln_single = AdaLNSingle(backend, da, 1, f)
        # Keyed by global block index, so every stage keeps the single-process parameter names.
        self.transformer_blocks = nn.ModuleDict({str(i): AVBlock(cfg, backend) for i in stage.layers})
        if stage.last:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dv) / dv**0.5)
            self.audio_scale_shift_table = nn.Parameter(torch.randn(2, da) / da**0.5)
            self.proj_out = backend.linear(dv, cfg.in_channels)
            self.audio_proj_out = backend.linear(da, cfg.audio_in_channels)
        # Recompute each block in backward instead of keeping its activations (memory for time).
        self.activation_checkpointing = False
        self.input_tensor: Tensor | None = None

    def set_input_tensor(self, tensor: Tensor | list[Tensor] | None) -> None:
        """The packed carry from the previous stage (megatron's schedule passes a one-element list)."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def set_a2v_grad_scales(self, scales: Sequence[float]) -> None:
        """Per-block gradient scales on the A2V audio keys/values (layer-wise gradient surgery), one per
        block of the whole model; a stage keeps its own blocks' values."""
        if len(scales) != self.config.num_layers:
            raise ValueError(f"a2v grad scales: need {self.config.num_layers} values, got {len(scales)}")
        for i, block in self.transformer_blocks.items():
            block.a2v_kv_grad_scale = float(scales[int(i)])

    def rope(
        self, video_grid: tuple[int, int, int], num_audio: int, fps: float, device: torch.device
    ) -> dict[str, Rope]:
        """cos/sin tables of the four RoPE uses, cut to this rank's heads (each head has its own frequencies)."""
        cfg, h = self.config, self.config.num_heads
        pv = video_positions(cfg, video_grid, fps, device)
        pa = audio_positions(cfg, num_audio, device)
        ca_max = (max(cfg.rope_max_pos[0], cfg.audio_rope_max_pos),)
        tables = {
            "video": split_rope(pv, cfg.rope_max_pos, cfg.video_dim, h, cfg.rope_theta),
            "audio": split_rope(pa, (cfg.audio_rope_max_pos,), cfg.audio_dim, h, cfg.rope_theta),
            "video_ca": split_rope(pv[:, :1], ca_max, cfg.audio_dim, h, cfg.rope_theta),
            "audio_ca": split_rope(pa, ca_max, cfg.audio_dim, h, cfg.rope_theta),
        }
        heads = self.sharding.head_slice(h)
        return {name: (cos[:, heads], sin[:, heads]) for name, (cos, sin) in tables.items()}

    def carry_shapes(
        self,
        b: int,
        n_video: int,
        n_audio: int,
        n_video_ctx: int,
        n_audio_ctx: int,
        per_token_video: bool,
        per_token_audio: bool,
    ) -> dict[str, tuple[int, ...]]:
        """Shape of each part of the carry on this rank (this rank's tokens under sequence parallelism)."""
        cfg, local = self.config, self.sharding.local_length
        dv, da, k = cfg.video_dim, cfg.audio_dim, cfg.modulation_rows
        tv = local(n_video) if per_token_video else 1
        ta = local(n_audio) if per_token_audio else 1
        shapes = {
            "video": (b, local(n_video), dv),
            "audio": (b, local(n_audio), da),
            "video_ctx": (b, local(n_video_ctx), dv),
            "audio_ctx": (b, local(n_audio_ctx), da),
            "mod_video": (b, tv, k * dv),
            "mod_audio": (b, ta, k * da),
            "mod_video_ca": (b, tv, 4 * dv),
            "mod_audio_ca": (b, ta, 4 * da),
            "mod_a2v_gate": (b, tv, dv),
            "mod_v2a_gate": (b, ta, da),
            "emb_video": (b, tv, dv),
            "emb_audio": (b, ta, da),
        }
        if cfg.cross_attention_adaln:  # one row per sample: the prompt adaLN reads the per-sample sigma
            shapes.update(mod_prompt_video=(b, 1, 2 * dv), mod_prompt_audio=(b, 1, 2 * da))
        return shapes

    def forward(
        self,
        video: Tensor,
        audio: Tensor,
        sigma: Tensor,
        video_context: Tensor,
        audio_context: Tensor,
        video_grid: tuple[int, int, int],
        fps: float = 24.0,
        *,
        video_context_mask: Tensor | None = None,
        audio_context_mask: Tensor | None = None,
        video_sigma: Tensor | None = None,
        audio_sigma: Tensor | None = None,
        v2a_probe: V2AProbe | None = None,
        perturbed: Tensor | None = None,
        stg_blocks: Collection[int] = (),
    ) -> tuple[Tensor, Tensor] | Tensor:
        """video (B, F*H*W, C) f-major, audio (B, T_a, C), sigma (B,); contexts (B, T_ctx, video_context_dim) and
        (B, T_ctx, audio_context_dim) (caption_channels, or the stream widths without caption projection) with
        optional bool masks (B, T_ctx) (True = real token). `video_sigma`/`audio_sigma` (B, T) give
        per-token noise levels (conditioning tokens at 0); otherwise every token has `sigma`. The prompt
        adaLN of LTX-2.3 always reads the per-sample `sigma`.
        `v2a_probe` sees the V2A attention of the blocks it wants (see V2AProbe).
        `perturbed` (B,) bool and `stg_blocks` (global block indices) go together: the perturbed rows
        skip the video and audio self-attention of those blocks (STG's perturbed pass: the attention
        output is replaced by the values, see layers.Attention); the other rows are unaffected, so one
        call can batch them with conditional and unconditional rows.
        Every stage takes the same arguments; a stage other than the last returns the packed carry."""
        cfg = self.config
        b = video.shape[0]
        f, hh, ww = video_grid
        _check("video", video, (b, f * hh * ww, cfg.in_channels))
        _check("audio", audio, (b, None, cfg.audio_in_channels))
        _check("sigma", sigma, (b,))
        _check("video_context", video_context, (b, None, cfg.video_context_dim))
        _check("audio_context", audio_context, (b, None, cfg.audio_context_dim))
        for name, mask, ctx in (
            ("video_context_mask", video_context_mask, video_context),
            ("audio_context_mask", audio_context_mask, audio_context),
        ):
            if mask is not None:
                _check(name, mask, (b, ctx.shape[1]))
                if mask.dtype != torch.bool or not bool(mask.any(dim=-1).all()):
                    raise ValueError(f"{name} must be bool with at least one real (True) token per sample")
        if video_sigma is not None:
            _check("video_sigma", video_sigma, (b, video.shape[1]))
        if audio_sigma is not None:
            _check("audio_sigma", audio_sigma, (b, audio.shape[1]))
        self._check_stg(perturbed, stg_blocks, b)
        n_video, n_audio = video.shape[1], audio.shape[1]

        if self.stage.first:
            carry = self.embed(video, audio, sigma, video_context, audio_context, video_sigma, audio_sigma)
        else:
            if self.input_tensor is None:
                raise RuntimeError(f"pipeline stage {self.stage.index} has no input tensor (set_input_tensor)")
            carry = unpack(
                self.input_tensor,
                self.carry_shapes(
                    b,
                    n_video,
                    n_audio,
                    video_context.shape[1],
                    audio_context.shape[1],
                    video_sigma is not None,
                    audio_sigma is not None,
                ),
            )
        shard = self.sharding
        rope = {
            name: shard.pad_rope(table, n_audio if name.startswith("audio") else n_video)
            for name, table in self.rope(video_grid, n_audio, fps, video.device).items()
        }
        masks = {
            "video": shard.key_mask(None, b, n_video, video.device),
            "audio": shard.key_mask(None, b, n_audio, video.device),
            "video_ctx": shard.key_mask(video_context_mask, b, video_context.shape[1], video.device),
            "audio_ctx": shard.key_mask(audio_context_mask, b, audio_context.shape[1], video.device),
        }
        mod = {name[len("mod_") :]: part for name, part in carry.items() if name.startswith("mod_")}
        ctx = (carry["video_ctx"], carry["audio_ctx"])
        vx, ax = carry["video"], carry["audio"]
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        with self.backend.forward_context():
            for name, block in self.transformer_blocks.items():
                # The probe sees real tokens only (padded keys are masked, so the LSE is the real tokens').
                probe = (
                    None
                    if v2a_probe is None or not v2a_probe.wants(int(name))
                    else (
                        lambda q, k, lse, i=int(name): v2a_probe.record(
                            i, q[:, :, :n_audio], k[:, :, :n_video], lse[:, :, :n_audio]
                        )
                    )
                )
                skip = perturbed if int(name) in stg_blocks else None
                if recompute:
                    vx, ax = checkpoint(block, vx, ax, ctx, masks, mod, rope, probe, skip, use_reentrant=False)
                else:
                    vx, ax = block(vx, ax, ctx, masks, mod, rope, probe, skip)
        if not self.stage.last:
            return pack({**carry, "video": vx, "audio": ax})

        shift, scale = (self.scale_shift_table[None, None] + carry["emb_video"][:, :, None]).unbind(dim=2)
        v_video = self.proj_out(nn.functional.layer_norm(vx, (cfg.video_dim,), eps=1e-6) * (1 + scale) + shift)
        v_video = self.sharding.gather(v_video, n_video)
        shift, scale = (self.audio_scale_shift_table[None, None] + carry["emb_audio"][:, :, None]).unbind(dim=2)
        v_audio = self.audio_proj_out(nn.functional.layer_norm(ax, (cfg.audio_dim,), eps=1e-6) * (1 + scale) + shift)
        return v_video, self.sharding.gather(v_audio, n_audio)

    def _check_stg(self, perturbed: Tensor | None, stg_blocks: Collection[int], b: int) -> None:
        """`perturbed` is a (B,) bool mask given together with `stg_blocks`, which name blocks of the
        whole model (every stage checks all of them, so a bad index fails on every rank alike)."""
        if (perturbed is None) != (not stg_blocks):
            raise ValueError("perturbed (the STG rows) and stg_blocks (the blocks they skip) go together")
        if perturbed is None:
            return
        _check("perturbed", perturbed, (b,))
        if perturbed.dtype != torch.bool:
            raise ValueError(f"perturbed must be a bool mask, got {perturbed.dtype}")
        n = self.config.num_layers
        bad = sorted(i for i in stg_blocks if not 0 <= i < n)
        if bad:
            raise ValueError(f"stg_blocks {bad} are outside the model's blocks 0..{n - 1} ({n} blocks)")

    def embed(
        self,
        video: Tensor,
        audio: Tensor,
        sigma: Tensor,
        video_context: Tensor,
        audio_context: Tensor,
        video_sigma: Tensor | None,
        audio_sigma: Tensor | None,
    ) -> dict[str, Tensor]:
        """First stage: patchified streams, projected contexts and adaLN outputs (this rank's tokens), all
        in the parameter dtype, which is what crosses stage boundaries (autocast still runs the linears
        in its own dtype)."""
        cfg = self.config
        # Shared sigma: one modulation row per sample, broadcast over tokens (identical to per-token, far cheaper).
        t_video = (sigma[:, None] if video_sigma is None else video_sigma) * cfg.timestep_scale_multiplier
        t_audio = (sigma[:, None] if audio_sigma is None else audio_sigma) * cfg.timestep_scale_multiplier
        gate_scale = cfg.av_ca_timestep_scale_multiplier / cfg.timestep_scale_multiplier
        # Sequence parallelism: each rank carries a share of the tokens between the parallel linears.
        split = self.sharding.scatter
        if video_sigma is not None:
            t_video = split(t_video[..., None])[..., 0]
        if audio_sigma is not None:
            t_audio = split(t_audio[..., None])[..., 0]
        dtype = self.patchify_proj.weight.dtype
        mod_video, emb_video = self.adaln_single(t_video, dtype)
        mod_audio, emb_audio = self.audio_adaln_single(t_audio, dtype)
        video_ctx, audio_ctx = split(video_context), split(audio_context)
        if cfg.caption_projection:
            video_ctx, audio_ctx = self.caption_projection(video_ctx), self.audio_caption_projection(audio_ctx)
        carry = {
            "video": self.patchify_proj(split(video)),
            "audio": self.audio_patchify_proj(split(audio)),
            "video_ctx": video_ctx,
            "audio_ctx": audio_ctx,
            "mod_video": mod_video,
            "mod_audio": mod_audio,
            "mod_video_ca": self.av_ca_video_scale_shift_adaln_single(t_video, dtype)[0],
            "mod_audio_ca": self.av_ca_audio_scale_shift_adaln_single(t_audio, dtype)[0],
            "mod_a2v_gate": self.av_ca_a2v_gate_adaln_single(t_video * gate_scale, dtype)[0],
            "mod_v2a_gate": self.av_ca_v2a_gate_adaln_single(t_audio * gate_scale, dtype)[0],
            "emb_video": emb_video,
            "emb_audio": emb_audio,
        }
        if cfg.cross_attention_adaln:
            t_prompt = sigma[:, None] * cfg.timestep_scale_multiplier
            carry["mod_prompt_video"] = self.prompt_adaln_single(t_prompt, dtype)[0]
            carry["mod_prompt_audio"] = self.audio_prompt_adaln_single(t_prompt, dtype)[0]
        return {name: t.to(dtype) for name, t in carry.items()}
