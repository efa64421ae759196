"""Rollout latents -> media for the rewards that read pixels or sound: video frames in [0, 1] and stereo
waveforms, decoded exactly as diffusers 0.42.1's `LTX2Pipeline` does after its denoising loop
(../shared/research/diffusers-ltx2-datapath.md sections 2 and 6).

- Video: packed tokens (N, F*H*W, C), f-major -> (N, C, F, H, W) -> `z * std / scaling_factor + mean` with the
  VAE's per-channel statistics -> `AutoencoderKLLTX2Video.decode(z, temb)` -> `(x / 2 + 0.5).clamp(0, 1)` ->
  frames (N, 8 (F - 1) + 1, 32 H, 32 W, 3).
- Audio: packed tokens (N, T_a, C*M) -> `x * std + mean` in the packed space (the audio VAE's statistics have
  C*M entries) -> (N, C, T_a, M) -> `AutoencoderKLLTX2Audio.decode` -> mel (N, 2, 4 T_a - 3, 64) -> the vocoder
  -> waveform at `sample_rate`, in [-1, 1]: `LTX2Vocoder` (19B: x240, 24 kHz) or `LTX2VocoderWithBWE` (LTX-2.3:
  a BigVGAN v2 at 16 kHz, a log-mel STFT of its output, a bandwidth extender whose output adds to a 3x
  resampling: x480, 48 kHz; run in float32, as ltx-core does).

LTX-2.3. Same classes, other configs, read from the weights' own config (the official header's `vae` and
`vocoder` sections, in ltx-core's formats; a folder's config.json): the VAE decoder has four upsamplers (in
running order two over all axes, then time, then space; no residuals; zero padding) instead of three, and the
vocoder section has a `bwe` part. The audio VAE is 2.0's.

Timestep-conditioned decoding. A VAE whose decoder carries `last_time_embedder` weights is conditioned on a
decode timestep, and mixes noise into the normalised latents first: `z <- (1 - s) z + s * noise`. We use
ltx-core's values (`decode.decode_timestep` 0.05, `decode.decode_noise_scale` 0.025: ltx_core's VideoDecoder), not
the pipeline's defaults (timestep 0, no noise), and only for such a VAE; the formula is the pipeline's (and
ltx-core's). The noise of sample i is `engine.noise.seeded_normal((C, F, H, W), *noise_keys[i], "decode")`,
keyed by what the caller passes (e.g. its rollout's seed, iteration, prompt and sample), so a decode never
depends on batching or on how samples are spread over ranks. Whether a VAE is conditioned is read from its
keys, not from a config; the 19B release's appears to be (third-party ports of ltx-2-19b-*.safetensors load
`vae.decoder.last_time_embedder.*`, per-block `time_embedder`s and a `timestep_scale_multiplier`).

Weights come from the official single file (`vae.*`, `audio_vae.*`, `vocoder.*` beside the DiT) or a diffusers
pipeline folder (`vae/`, `audio_vae/`, `vocoder/`), through our own key maps (engine.rewards.decoder_files) and
loaded strictly: every missing, unexpected or mis-shaped tensor of the requested parts is named in one
CheckpointError. Only the decoders are built: the VAE encoders are never materialised (built on the meta device,
then dropped). The audio VAE and the vocoder load from the single file too, which diffusers' single-file loading
cannot do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from models.weights import check_finite, open_safetensors, raise_problems, shape_problems

from ..errors import CheckpointError, ConfigError
from ..fields import bounded, choice
from ..noise import seeded_normal
from .decoder_files import (
    audio_vae_kwargs,
    official_audio_vae_key,
    official_video_vae_key,
    official_vocoder_key,
    video_vae_kwargs,
    vocoder_kwargs,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class DecodeConfig:
    """`decode.*`: the VAEs and vocoder that turn rollout latents into frames and waveforms."""

    # An official LTX-2 single file or a diffusers pipeline folder (vae/, audio_vae/, vocoder/); None: model.init.
    source: str | None = None
    # Decoder weights and compute (outputs are float32); auto: bfloat16 on CUDA, float32 on a CPU (slow bf16 convs).
    dtype: str = choice("auto", *DTYPES, default="auto")
    offload: bool = False  # keep the decoders on the CPU between decodes instead of resident on the device
    batch_size: int = bounded(1, None, default=1)  # samples per decoder call
    # Timestep-conditioned VAEs only (ltx-core's values; diffusers' pipeline defaults to 0 and no noise).
    decode_timestep: float = bounded(0.0, 1.0, default=0.05)
    decode_noise_scale: float = bounded(0.0, 1.0, default=0.025)

    def __post_init__(self) -> None:
        if self.source is not None and not Path(self.source).exists():
            raise ConfigError(f"decode.source: {self.source} does not exist")


def decode_source(cfg: DecodeConfig, model_init: str | None) -> str:
    """Where the decoders' weights are: `decode.source`, else the DiT's `model.init` (the official single file
    and a diffusers pipeline folder hold the VAEs and vocoder beside the DiT)."""
    source = cfg.source if cfg.source is not None else model_init
    if source is None:
        raise ConfigError(
            "decode.source is not set and model.init is None: decoding needs an LTX-2 single file or a diffusers "
            "pipeline folder with vae/, audio_vae/ and vocoder/"
        )
    return source


# ---- loading -------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One decoder to build: its diffusers class name, constructor arguments and its tensors (diffusers
    names, encoders already dropped)."""

    sub: str  # "vae", "audio_vae" or "vocoder": the single file's prefix, the pipeline folder's subfolder
    class_name: str
    kwargs: dict
    state: dict[str, Tensor]

    @property
    def name(self) -> str:
        """For messages: "video VAE", "audio VAE", "vocoder"."""
        return _NAMES[self.sub]


_CLASSES = {
    "vae": ("AutoencoderKLLTX2Video",),
    "audio_vae": ("AutoencoderKLLTX2Audio",),
    "vocoder": ("LTX2Vocoder", "LTX2VocoderWithBWE"),  # LTX-2.0's; LTX-2.3's, with bandwidth extension
}
_NAMES = {"vae": "video VAE", "audio_vae": "audio VAE", "vocoder": "vocoder"}
_OFFICIAL_MAPS = {"vae": official_video_vae_key, "audio_vae": official_audio_vae_key, "vocoder": official_vocoder_key}


def _official_parts(path: Path, subs: Sequence[str]) -> list[_Part]:
    """The requested parts of an official single file: tensors by prefix through our key maps, configs from the
    header's `config` sections when present (else the 19B conversion configs), timestep conditioning from the
    presence of `vae.decoder.last_time_embedder.*`, the vocoder's class from its section (a `bwe` section:
    LTX-2.3's LTX2VocoderWithBWE)."""
    with open_safetensors(path) as f:
        try:
            header = json.loads((f.metadata() or {}).get("config", "{}"))
        except ValueError as e:
            raise CheckpointError(f"{path}: the header's config is not JSON ({e})") from e
        header = header if isinstance(header, dict) else {}
        states: dict[str, dict[str, Tensor]] = {sub: {} for sub in subs}
        for key in f.keys():
            sub, _, rest = key.partition(".")
            if sub in states and (name := _OFFICIAL_MAPS[sub](rest)) is not None:
                states[sub][name] = f.get_tensor(key)
    for sub, state in states.items():
        if not state:
            raise CheckpointError(
                f"{path} holds no {_NAMES[sub]} ({sub}.* tensors); decode.source must be an LTX-2 single file with "
                f"its VAEs and vocoder, or a diffusers pipeline folder"
            )
    kwargs = {}
    try:
        if "vae" in subs:
            timed = any(k.startswith("decoder.time_embedder.") for k in states["vae"])
            kwargs["vae"] = (_CLASSES["vae"][0], video_vae_kwargs(header.get("vae"), timestep_conditioning=timed))
        if "audio_vae" in subs:
            audio = audio_vae_kwargs(header.get("audio_vae"))
            kwargs["audio_vae"] = (_CLASSES["audio_vae"][0], audio)
            kwargs["vocoder"] = vocoder_kwargs(header.get("vocoder"), audio)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot use the decoder config in its header: {e!r}") from e
    return [_Part(sub, *kwargs[sub], states[sub]) for sub in subs]


def _folder_part(root: Path, sub: str) -> _Part:
    """`root/sub/` of a diffusers pipeline folder: config.json (its `_class_name` one of ours: for the vocoder
    LTX2Vocoder, or LTX2VocoderWithBWE for LTX-2.3) and the safetensors beside it (one file or shards);
    encoder tensors are dropped."""
    folder = root / sub
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise CheckpointError(
            f"{root} is not a diffusers LTX-2 pipeline folder with the {_NAMES[sub]}: expected {sub}/config.json "
            f"and {sub}/diffusion_pytorch_model.safetensors"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not JSON ({e})") from e
    class_name = config.get("_class_name", _CLASSES[sub][0])
    if class_name not in _CLASSES[sub]:
        raise CheckpointError(
            f"{folder / 'config.json'}: _class_name is {class_name!r}; the {_NAMES[sub]} must be "
            f"{' or '.join(_CLASSES[sub])} (LTX-2.0 or 2.3; other variants are not supported)"
        )
    state = {}
    for file in files:
        with open_safetensors(file) as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith("encoder.")})
    return _Part(sub, class_name, {k: v for k, v in config.items() if not k.startswith("_")}, state)


def _build(part: _Part, source: str) -> tuple[nn.Module, list[str]]:
    """The part's diffusers module without its encoder, on the meta device (nothing allocated), and the problems
    its tensors have against it ("missing: ...", "unexpected: ...", "shape: ..."). LTX-2.3's vocoder is built on
    the CPU instead: its resampler's filter is a buffer the weights do not hold (the constructor computes it)."""
    try:
        import diffusers
        from diffusers.pipelines import ltx2
    except ImportError as e:
        raise ConfigError(
            f'decoding needs diffusers ({e.name} is missing): pip install -c .ci/constraints.txt -e ".[text]"'
        ) from e

    cls = getattr(ltx2 if part.sub == "vocoder" else diffusers, part.class_name)
    try:
        with torch.device("cpu" if part.class_name == "LTX2VocoderWithBWE" else "meta"):
            module = cls(**part.kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: the {part.name} config does not fit {part.class_name} ({e})") from e
    if hasattr(module, "encoder"):
        del module.encoder
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return module, shape_problems(expected, {k: tuple(v.shape) for k, v in part.state.items()}, f"{part.name} ")


def load_decoders(
    source: str | os.PathLike, dtype: torch.dtype, *, video: bool, audio: bool
) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
    """(video VAE, audio VAE, vocoder) from an official single file or a diffusers pipeline folder, each None when
    not asked for, on the CPU in `dtype`, eval, without gradients and without encoders. LTX-2.3's vocoder
    (LTX2VocoderWithBWE) is float32 whatever `dtype`, as ltx-core runs it (108 sequential convolutions: bf16
    degrades its output). Every missing, unexpected or mis-shaped tensor of the requested parts is listed in
    one CheckpointError."""
    path = Path(source)
    subs = (["vae"] if video else []) + (["audio_vae", "vocoder"] if audio else [])
    if path.is_dir():
        parts = [_folder_part(path, sub) for sub in subs]
    elif path.is_file():
        parts = _official_parts(path, subs)
    else:
        raise CheckpointError(f"{path}: no such file or folder (expected an LTX-2 single file or pipeline folder)")
    built = [_build(part, str(path)) for part in parts]
    raise_problems(str(path), [p for _, ps in built for p in ps], "the decoders")
    modules = {}
    for part, (module, _) in zip(parts, built):
        check_finite(part.state, f"{path} ({part.name})")
        part_dtype = torch.float32 if part.class_name == "LTX2VocoderWithBWE" else dtype
        state = {k: v.to(part_dtype) if v.is_floating_point() else v for k, v in part.state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        nn.Module.to(module, part_dtype)  # what the weights do not hold (LTX-2.3's resampler filter)
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), part.name
        modules[part.sub] = module.eval().requires_grad_(False)
    return modules.get("vae"), modules.get("audio_vae"), modules.get("vocoder")


# ---- decoding ------------------------------------------------------------------------------------------------


class Decoders:
    """The frozen decoders a run's rewards need: `frames` (video VAE) and `waveforms` (audio VAE + vocoder).

    Built from `decode.*`, the resolved weights source (`decode_source`), the device and which parts to load
    (`video`, `audio`: a run whose rewards read only frames never loads the audio side). Decoding runs under
    torch.no_grad in `decode.batch_size` samples per call; outputs are float32 on the CPU. With `decode.offload`
    the decoders wait on the CPU and visit the device only while they decode."""

    def __init__(
        self,
        cfg: DecodeConfig,
        source: str | os.PathLike,
        device: torch.device | str = "cpu",
        *,
        video: bool = True,
        audio: bool = True,
    ) -> None:
        if not (video or audio):
            raise ValueError("Decoders needs at least one of video, audio")
        self.cfg, self.device = cfg, torch.device(device)
        auto = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = DTYPES[auto if cfg.dtype == "auto" else cfg.dtype]
        self.vae, self.audio_vae, self.vocoder = load_decoders(source, self.dtype, video=video, audio=audio)
        # Statistics in float32 (the denormalisation runs there, before the cast to the decoders' dtype).
        if self.vae is not None:
            self._video_stats = (self.vae.latents_mean.float(), self.vae.latents_std.float())
        if self.audio_vae is not None:
            self._audio_stats = (self.audio_vae.latents_mean.float(), self.audio_vae.latents_std.float())
        if not cfg.offload:
            for module in (self.vae, self.audio_vae, self.vocoder):
                if module is not None:
                    nn.Module.to(module, self.device)  # nn.Module's: diffusers' .to warns about pinned dtypes

    @property
    def timestep_conditioned(self) -> bool:
        """Whether the video VAE decodes at `decode.decode_timestep` after mixing in `decode_noise_scale` noise."""
        return bool(self._require(self.vae, "video").config.timestep_conditioning)

    @property
    def sample_rate(self) -> int:
        """Samples per second of `waveforms`: the vocoder's output rate (24000 for the 19B release, 48000 for
        LTX-2.3's bandwidth-extended output)."""
        return int(self._require(self.vocoder, "audio").config.output_sampling_rate)

    @staticmethod
    def _require(module: nn.Module | None, part: str) -> nn.Module:
        if module is None:
            raise RuntimeError(f"the {part} decoders were not loaded (Decoders(..., {part}=True))")
        return module

    @contextlib.contextmanager
    def _resident(self, *modules: nn.Module) -> Iterator[None]:
        """The modules on the device for the block; with `decode.offload`, back on the CPU after it."""
        if self.cfg.offload:
            for module in modules:
                nn.Module.to(module, self.device)
        try:
            yield
        finally:
            if self.cfg.offload:
                for module in modules:
                    nn.Module.to(module, "cpu")

    @torch.no_grad()
    def frames(
        self,
        video_latents: Tensor,
        video_grid: tuple[int, int, int],
        noise_keys: Sequence[Sequence[object]] | None = None,
    ) -> Tensor:
        """Video latent tokens (N, F*H*W, C), f-major, of a (F, H, W) latent grid -> frames
        (N, 8 (F - 1) + 1, 32 H, 32 W, 3) float32 in [0, 1] on the CPU.

        `noise_keys[i]` (seed parts, one sequence per sample) keys sample i's decode noise; a timestep-conditioned
        VAE with `decode_noise_scale` > 0 needs them, other VAEs ignore them."""
        vae = self._require(self.vae, "video")
        n, tokens, channels = video_latents.shape if video_latents.ndim == 3 else (0, -1, -1)
        f, h, w = video_grid
        if tokens != f * h * w or channels != vae.config.latent_channels:
            raise ValueError(
                f"video latents {tuple(video_latents.shape)} do not fit grid {tuple(video_grid)} with "
                f"{vae.config.latent_channels} channels"
            )
        timed, scale = self.timestep_conditioned, self.cfg.decode_noise_scale
        if timed and scale > 0 and (noise_keys is None or len(noise_keys) != n):
            raise ValueError(f"a timestep-conditioned VAE with decode noise needs one noise key per sample ({n})")
        mean, std = (s.to(self.device).view(1, -1, 1, 1, 1) for s in self._video_stats)
        out = []
        with self._resident(vae):
            for start in range(0, n, self.cfg.batch_size):
                chunk = video_latents[start : start + self.cfg.batch_size].to(self.device, torch.float32)
                z = chunk.reshape(-1, f, h, w, channels).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
                temb = None
                if timed:
                    if scale > 0:
                        keys = noise_keys[start : start + self.cfg.batch_size]
                        noise = torch.stack([seeded_normal(z.shape[1:], *key, "decode") for key in keys])
                        z = (1 - scale) * z + scale * noise.to(self.device)
                    temb = torch.full((z.shape[0],), self.cfg.decode_timestep, device=self.device)
                z = z * std / vae.config.scaling_factor + mean
                x = vae.decode(z.to(self.dtype), temb, return_dict=False)[0]  # (B, 3, F_px, H_px, W_px)
                out.append((x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def waveforms(self, audio_latents: Tensor) -> Tensor:
        """Audio latent tokens (N, T_a, C*M), packed `c * M + m` -> waveforms (N, 2, (4 T_a - 3) mel frames x
        `sample_rate` / 100: 240 per frame at 24 kHz for LTX-2.0, 480 at 48 kHz for 2.3) float32 in [-1, 1] on the
        CPU, at `sample_rate`."""
        audio_vae, vocoder = self._require(self.audio_vae, "audio"), self._require(self.vocoder, "audio")
        channels = audio_vae.config.latent_channels
        mel_bins = audio_vae.config.mel_bins // audio_vae.mel_compression_ratio
        mean, std = (s.to(self.device) for s in self._audio_stats)
        if (
            audio_latents.ndim != 3
            or audio_latents.shape[-1] != channels * mel_bins
            or mean.numel() != channels * mel_bins
        ):
            raise ValueError(
                f"audio latents {tuple(audio_latents.shape)} do not fit the audio VAE: {channels} channels x "
                f"{mel_bins} mel bins per token, statistics of {mean.numel()}"
            )
        out = []
        with self._resident(audio_vae, vocoder):
            for start in range(0, audio_latents.shape[0], self.cfg.batch_size):
                chunk = audio_latents[start : start + self.cfg.batch_size].to(self.device, torch.float32)
                z = (chunk * std + mean).unflatten(2, (channels, mel_bins)).transpose(1, 2)  # (B, C, T_a, M)
                mel = audio_vae.decode(z.to(self.dtype), return_dict=False)[0]  # (B, 2, 4 T_a - 3, mel bins)
                out.append(vocoder(mel.to(next(vocoder.parameters()).dtype)).float().cpu())
        return torch.cat(out)
