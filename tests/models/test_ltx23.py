"""LTX-2.3 (22B) on the one model definition: parity with diffusers' LTX2VideoTransformer3DModel configured
as 2.3 (gated attention, text cross-attention adaLN, no caption projection), the per-head gate on its own
terms, the 22B preset against the release's key list, its config read from official headers and diffusers
config.json, weights in both layouts, the backends' layer roles and FP8, pipeline stages, gradient
surgery, the V2A probe, and a LoRA export (gate logits and prompt adaLN included) that diffusers loads.
Tensor- and sequence-parallel parity runs under torchrun (tests/engine/parallel/test_parallel.py and
tests/models/test_lora.py, preset tiny-2.3)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import models
from models.backends.fp8 import Fp8Linear
from models.layouts import (
    OFFICIAL_PREFIX,
    config_from_diffusers,
    config_from_official,
    diffusers_config,
    official_config,
    to_layout,
)
from models.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    use_adapter,
)
from models.lora_files import save_lora_file
from models.stage import Stage
from models.weights import load_full_state, read_config, shape_problems, whole_shapes
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS_FILE = ROOT / "tests" / "data" / "keys-ltx2.3.txt"  # copy of ../shared/ltx2/keys-ltx2.3.txt
TINY23 = models.PRESETS["tiny-2.3"]
TOL = 1e-5
GATED = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")

# The LTX-2.3 release header's `transformer` section (ARCHITECTURE.md section 0: the 19B keys plus 2.3's).
HEADER_23 = {
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "num_layers": 48,
    "in_channels": 128,
    "out_channels": 128,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "cross_attention_dim": 4096,
    "audio_cross_attention_dim": 2048,
    "caption_channels": 3840,
    "qk_norm": "rms_norm",
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "rope_type": "split",
    "frequencies_precision": "float64",
    "positional_embedding_theta": 10000,
    "positional_embedding_max_pos": [20, 2048, 2048],
    "audio_positional_embedding_max_pos": [20],
    "use_middle_indices_grid": True,
    "causal_temporal_positioning": True,
    "timestep_scale_multiplier": 1000,
    "av_ca_timestep_scale_multiplier": 1000.0,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "av_cross_ada_norm": True,
    "apply_gated_attention": True,
    "cross_attention_adaln": True,
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "caption_projection_second_linear": False,
    "caption_proj_input_norm": False,
    "text_encoder_norm_type": "per_token_rms",
    "connector_num_layers": 8,
    "connector_num_attention_heads": 32,
    "audio_connector_num_attention_heads": 32,
    "connector_attention_head_dim": 128,
    "connector_num_learnable_registers": 128,
    "connector_positional_embedding_max_pos": [4096],
    "connector_apply_gated_attention": True,
}
# The same header at the tiny-2.3 shape.
TINY_HEADER_23 = {
    **HEADER_23,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "audio_num_attention_heads": 4,
    "audio_attention_head_dim": 8,
    "num_layers": 4,
    "in_channels": 16,
    "out_channels": 16,
    "audio_in_channels": 16,
    "audio_out_channels": 16,
    "cross_attention_dim": 64,
    "audio_cross_attention_dim": 32,
    "caption_channels": 32,
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _diffusers_23(diffusers, cfg: models.ModelConfig = TINY23, seed: int = 0, **extra):
    """diffusers' transformer configured as `cfg` (2.3 flags included), fp32, eval, with no parameter left at a
    constant init (unit norms, zero biases), so every weight's place is checked."""
    torch.manual_seed(seed)
    dm = diffusers.LTX2VideoTransformer3DModel(**{**diffusers_config(cfg), **extra}).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return dm.float()


@pytest.fixture(scope="module")
def pair(diffusers):
    dm = _diffusers_23(diffusers)
    return dm, models.from_diffusers(dm).eval()


def _inputs(cfg, b: int, grid, ta: int, seed: int, t_vctx: int = 7, t_actx: int = 6) -> dict[str, Tensor]:
    """Forward arguments; the contexts at the widths the model takes (its streams' without caption projection)."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return dict(
        video=torch.randn(b, f * h * w, cfg.in_channels, generator=g),
        audio=torch.randn(b, ta, cfg.audio_in_channels, generator=g),
        sigma=torch.rand(b, generator=g) * 0.9 + 0.05,
        video_context=torch.randn(b, t_vctx, cfg.video_context_dim, generator=g),
        audio_context=torch.randn(b, t_actx, cfg.audio_context_dim, generator=g),
    )


def _ours(model, x: dict[str, Tensor], grid, **kw) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model(x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid, 24.0, **kw)


def _theirs(dm, x, grid, video_t=None, audio_t=None, vmask=None, amask=None, **kw) -> tuple[Tensor, Tensor]:
    """diffusers' forward as its pipelines call it: per-token timesteps (default: every token at sigma) and the
    per-sample `sigma` (x 1000) that LTX-2.3's prompt adaLN reads."""
    f, h, w = grid
    b, t = x["sigma"].shape[0], x["sigma"] * 1000
    with torch.no_grad():
        out = dm(
            x["video"],
            x["audio"],
            x["video_context"],
            x["audio_context"],
            timestep=t[:, None].expand(b, f * h * w) if video_t is None else video_t,
            audio_timestep=t[:, None].expand(b, x["audio"].shape[1]) if audio_t is None else audio_t,
            sigma=t,
            encoder_attention_mask=None if vmask is None else vmask.float(),
            audio_encoder_attention_mask=None if amask is None else amask.float(),
            num_frames=f,
            height=h,
            width=w,
            fps=24.0,
            audio_num_frames=x["audio"].shape[1],
            return_dict=False,
            **kw,
        )
    return out[0], out[1]


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- 1. parity with diffusers


def test_the_diffusers_model_is_the_2_3_topology(pair) -> None:
    dm, ours = pair
    assert dm.config.gated_attn and dm.config.audio_gated_attn and dm.config.cross_attn_mod
    assert dm.config.audio_cross_attn_mod and not dm.config.use_prompt_embeddings
    keys = set(dm.state_dict())
    assert "prompt_adaln.linear.weight" in keys and "transformer_blocks.0.attn2.to_gate_logits.weight" in keys
    assert not any(k.startswith("caption_projection") for k in keys)
    assert ours.config == TINY23


@pytest.mark.parametrize("grid", [(3, 2, 2), (4, 3, 5), (1, 2, 3)])
def test_parity_with_diffusers_per_sample_sigma(pair, grid) -> None:
    dm, ours = pair
    x = _inputs(ours.config, 2, grid, 13, seed=sum(grid))
    ref_v, ref_a = _theirs(dm, x, grid)
    v, a = _ours(ours, x, grid)
    assert ref_v.abs().max() > 0.1 and ref_a.abs().max() > 0.1  # not a degenerate comparison
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL


def test_parity_with_diffusers_text_masks(pair) -> None:
    dm, ours = pair
    grid = (4, 3, 5)
    x = _inputs(ours.config, 2, grid, 13, seed=11)
    vmask = torch.ones(2, 7, dtype=torch.bool)
    vmask[0, 4:], vmask[1, 0] = False, False
    amask = torch.ones(2, 6, dtype=torch.bool)
    amask[1, 2:], amask[0, 5] = False, False
    ref_v, ref_a = _theirs(dm, x, grid, vmask=vmask, amask=amask)
    v, a = _ours(ours, x, grid, video_context_mask=vmask, audio_context_mask=amask)
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL
    v0, a0 = _ours(ours, x, grid)
    assert _diff(v, v0) > 1e-3 and _diff(a, a0) > 1e-3  # the masks matter


def test_parity_with_diffusers_per_token_sigma(pair) -> None:
    """Per-token sigmas drive the block modulations; the prompt adaLN reads the per-sample sigma (diffusers'
    `sigma`), so conditioning tokens at 0 leave the text modulation alone."""
    dm, ours = pair
    b, grid, ta = 2, (3, 2, 2), 13
    x = _inputs(ours.config, b, grid, ta, seed=5)
    g = torch.Generator().manual_seed(99)
    video_sigma = torch.rand(b, 12, generator=g)
    video_sigma[:, :4] = 0.0  # conditioning tokens of the first latent frame
    audio_sigma = torch.rand(b, ta, generator=g)
    ref_v, ref_a = _theirs(dm, x, grid, video_sigma * 1000, audio_sigma * 1000)
    v, a = _ours(ours, x, grid, video_sigma=video_sigma, audio_sigma=audio_sigma)
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL
    v1, a1 = _ours(ours, x, grid)
    assert _diff(v, v1) > 1e-3 and _diff(a, a1) > 1e-3


def test_parity_with_the_pipelines_cross_timestep_when_streams_share_sigma(pair) -> None:
    """diffusers' LTX-2.3 pipelines pass use_cross_timestep=True (the cross-modal modulation from the other
    stream's sigma); with one sigma per sample for both streams, as our sampler and trainer use, it is the
    same model."""
    dm, ours = pair
    grid = (3, 2, 2)
    x = _inputs(ours.config, 2, grid, 9, seed=6)
    ref_v, ref_a = _theirs(dm, x, grid, use_cross_timestep=True)
    v, a = _ours(ours, x, grid)
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL


@pytest.mark.parametrize("perturbed,blocks", [([False, True, False, True], [1, 3]), ([True] * 4, [2])])
def test_stg_parity_with_diffusers(diffusers, pair, perturbed, blocks) -> None:
    """STG's perturbed rows: the gate scales the values that replace the skipped self-attention (diffusers'
    LTX2PerturbedAttnProcessor); the other rows are bit-identical to an unperturbed call."""
    dm, ours = pair
    ref = diffusers.LTX2VideoTransformer3DModel(**{**diffusers_config(TINY23), "perturbed_attn": True})
    ref.load_state_dict(dm.state_dict())
    ref = ref.float().eval()
    grid = (3, 2, 2)
    x = _inputs(ours.config, 4, grid, 13, seed=21)
    rows = torch.tensor(perturbed)
    ref_v, ref_a = _theirs(
        ref, x, grid, spatio_temporal_guidance_blocks=blocks, perturbation_mask=(~rows).float()
    )  # diffusers: 0 = perturbed
    v, a = _ours(ours, x, grid, perturbed=rows, stg_blocks=set(blocks))
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL
    v0, a0 = _ours(ours, x, grid)
    assert torch.equal(v[~rows], v0[~rows]) and torch.equal(a[~rows], a0[~rows])
    assert (v - v0)[rows].abs().amax() > 1e-3


def test_weights_come_from_diffusers_under_their_names(pair) -> None:
    """from_diffusers reads diffusers' state dict through our layout map (prompt_adaln <-> prompt_adaln_single)."""
    dm, ours = pair
    ref, mine = dm.state_dict(), to_layout(ours.state_dict(), "diffusers")
    assert set(mine) == set(ref)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    official = to_layout(ours.state_dict(), "official")
    assert OFFICIAL_PREFIX + "prompt_adaln_single.linear.weight" in official
    assert OFFICIAL_PREFIX + "audio_prompt_adaln_single.linear.weight" in official


# ---------------------------------------------------------------- 2. the 2.3 features on their own terms


def test_gates_scale_each_heads_output_by_twice_the_sigmoid_of_its_logit() -> None:
    """With zero logit weights and per-head biases b, a gated attention equals the ungated one whose `to_out`
    input columns of head h are multiplied by 2 sigmoid(b_h): the gate is per head, before `to_out`."""
    torch.manual_seed(0)
    gated = models.build_model(TINY23).eval()
    plain = models.build_model(dataclasses.replace(TINY23, gated_attention=False)).eval()
    state = gated.state_dict()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, module in gated.named_modules():
            if name.endswith(GATED) and module.to_gate_logits is not None:
                module.to_gate_logits.weight.zero_()
                module.to_gate_logits.bias.copy_(2 * torch.randn(TINY23.num_heads, generator=g))
        state = gated.state_dict()
        gates = {
            k[: -len(".to_gate_logits.bias")]: 2 * torch.sigmoid(v) for k, v in state.items() if "gate_logits.b" in k
        }
        plain_state = {k: v.clone() for k, v in state.items() if "to_gate_logits" not in k}
        for attn, gate in gates.items():
            w = plain_state[attn + ".to_out.0.weight"]
            plain_state[attn + ".to_out.0.weight"] = (w.unflatten(1, (TINY23.num_heads, -1)) * gate[:, None]).flatten(1)
    assert len(gates) == 6 * TINY23.num_layers
    plain.load_state_dict(plain_state)
    grid = (3, 2, 2)
    x = _inputs(TINY23, 2, grid, 9, seed=3)
    (v, a), (pv, pa) = _ours(gated, x, grid), _ours(plain, x, grid)
    assert _diff(v, pv) < TOL and _diff(a, pa) < TOL
    plain.load_state_dict({k: v for k, v in state.items() if "to_gate_logits" not in k})  # gates of 1
    uv, ua = _ours(plain, x, grid)
    assert _diff(v, uv) > 1e-3 and _diff(a, ua) > 1e-3  # the gates did something


def test_each_2_3_part_changes_the_output() -> None:
    """Gate logits, the query rows 6-8, the prompt tables and the prompt adaLN all enter the forward."""
    torch.manual_seed(0)
    model = models.build_model(TINY23).eval()
    grid = (3, 2, 2)
    x = _inputs(TINY23, 2, grid, 9, seed=8)
    v0, a0 = _ours(model, x, grid)
    params = dict(model.named_parameters())
    for name in (
        "transformer_blocks.1.audio_attn2.to_gate_logits.bias",
        "transformer_blocks.2.video_to_audio_attn.to_gate_logits.weight",
        "transformer_blocks.0.prompt_scale_shift_table",
        "transformer_blocks.3.audio_prompt_scale_shift_table",
        "prompt_adaln_single.linear.bias",
        "audio_prompt_adaln_single.emb.timestep_embedder.linear_2.weight",
    ):
        with torch.no_grad():
            saved = params[name].clone()
            params[name].add_(0.5)
            v, a = _ours(model, x, grid)
            params[name].copy_(saved)
        assert max(_diff(v, v0), _diff(a, a0)) > 1e-4, name
    with torch.no_grad():  # rows 6-8 of a block's table: the text cross-attention's query shift, scale, gate
        for row in (6, 7, 8):
            table = params["transformer_blocks.1.scale_shift_table"]
            saved = table.clone()
            table[row] += 0.5
            v, _ = _ours(model, x, grid)
            table.copy_(saved)
            assert _diff(v, v0) > 1e-4, row


def test_contexts_enter_at_the_stream_widths() -> None:
    model = models.build_model("tiny-2.3")
    assert not hasattr(model, "caption_projection") and not hasattr(model, "audio_caption_projection")
    assert (TINY23.video_context_dim, TINY23.audio_context_dim) == (TINY23.video_dim, TINY23.audio_dim)
    x = _inputs(TINY23, 2, (2, 2, 2), 5, seed=0)
    _ours(model, x, (2, 2, 2))
    # caption_channels (32) wide text features are the wrong width for the video stream (64).
    with pytest.raises(ValueError, match=r"^video_context has shape \(2, 7, 32\), expected \(2, \*, 64\)"):
        _ours(model, {**x, "video_context": torch.randn(2, 7, TINY23.caption_channels)}, (2, 2, 2))
    with pytest.raises(ValueError, match=r"^audio_context has shape \(2, 6, 64\), expected \(2, \*, 32\)"):
        _ours(model, {**x, "audio_context": torch.randn(2, 6, 64)}, (2, 2, 2))


# ---------------------------------------------------------------- 3. the 22B preset against the release's keys


def _parse_keys_file():
    """(block 0 shapes, non-block shapes, per-group counts, TOTAL) of keys-ltx2.3.txt (official names)."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    groups: dict[str, int] = {}
    current, total = None, None
    for line in KEYS_FILE.read_text().splitlines():
        line = line.strip()
        if line.startswith("TOTAL"):
            total = int(line.split()[1])
        elif line.startswith("----"):
            current = line.strip("- ").strip()
            sections[current] = {}
        elif current is None and re.fullmatch(r"(block|top)\.\S+\s+[\d,]+", line):
            name, count = line.split()
            groups[name] = int(count.replace(",", ""))
        elif current is not None and line:
            m = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line)
            assert m, f"unparsed line {line!r}"
            sections[current][m.group(1)] = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
    return sections["block 0 keys"], sections["non-block keys"], groups, total


@pytest.fixture(scope="module")
def model_22b():
    return models.build_model("ltx2.3-22b", device="meta")


def test_22b_parameter_count(model_22b) -> None:
    *_, total = _parse_keys_file()
    assert total == 18_988_838_144
    assert sum(p.numel() for p in model_22b.parameters()) == total


def test_22b_keys_and_shapes(model_22b) -> None:
    block0, nonblock, groups, _ = _parse_keys_file()
    assert len(block0) == 86 and len(nonblock) == 58  # 19B: 72 and 54
    state = to_layout(model_22b.state_dict(), "official")
    shapes = {k[len(OFFICIAL_PREFIX) :]: tuple(v.shape) for k, v in state.items()}
    assert {k: s for k, s in shapes.items() if not k.startswith("transformer_blocks.")} == nonblock
    for i in range(48):
        prefix = f"transformer_blocks.{i}."
        bi = {k.replace(prefix, "transformer_blocks.0.", 1): s for k, s in shapes.items() if k.startswith(prefix)}
        assert bi == block0, i
    assert len(shapes) == 48 * len(block0) + len(nonblock)
    # The per-module counts of the key list: 48 blocks' worth of each block module, each top-level module once.
    params = {n: p.numel() for n, p in model_22b.named_parameters()}
    for group, count in groups.items():
        kind, *_, module = group.split(".")
        if kind == "block":
            ours = sum(
                n for k, n in params.items() if k.startswith("transformer_blocks.") and k.split(".")[2] == module
            )
        else:
            ours = sum(n for k, n in params.items() if k.split(".")[0] == module)
        assert ours == count, group


# ---------------------------------------------------------------- 4. config from headers and config.json


def test_the_release_header_is_the_22b_preset() -> None:
    assert config_from_official(HEADER_23) == models.PRESETS["ltx2.3-22b"]
    cfg = config_from_official({k: v for k, v in HEADER_23.items() if k != "caption_proj_before_connector"})
    assert cfg.caption_projection and cfg.gated_attention and cfg.cross_attention_adaln  # each switch on its own


def test_our_header_describes_2_3_in_the_official_names() -> None:
    header = official_config(models.PRESETS["ltx2.3-22b"])
    for key in ("apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector"):
        assert header[key] is True, key
    for key in ("caption_projection_first_linear", "caption_projection_second_linear", "caption_proj_input_norm"):
        assert header[key] is False, key  # ltx-core's text encoder reads these four together
    for key in HEADER_23:
        if not key.startswith(("connector_", "audio_connector_", "text_encoder_")):
            assert header[key] == HEADER_23[key], key
    old = official_config(models.PRESETS["ltx2-19b"])
    assert old["apply_gated_attention"] is False and old["caption_proj_before_connector"] is False
    assert "caption_projection_first_linear" not in old


@pytest.mark.parametrize(
    "key,value",
    [("use_prompt_adaln_single", False), ("apply_gated_attention", "yes"), ("cross_attention_adaln", 1)],
)
def test_official_2_3_switches_refuse_what_they_cannot_mean(key, value) -> None:
    with pytest.raises(ValueError, match=key):
        config_from_official({**HEADER_23, key: value})


def test_diffusers_config_of_2_3(diffusers) -> None:
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(TINY23))
    assert config_from_diffusers(dm.config) == TINY23
    assert config_from_diffusers({**diffusers_config(TINY23), "cross_attn_mod": False, "audio_cross_attn_mod": False})


@pytest.mark.parametrize(
    "change,key",
    [
        ({"gated_attn": False}, "gated_attn"),  # one stream only: the official layout has one flag for both
        ({"audio_cross_attn_mod": False}, "audio_cross_attn_mod"),
        ({"use_prompt_adaln_single": False}, "use_prompt_adaln_single"),  # LTX-2.5
        ({"use_prompt_embeddings": "no"}, "use_prompt_embeddings"),
    ],
)
def test_diffusers_2_3_config_refuses_what_we_do_not_build(change, key) -> None:
    with pytest.raises(ValueError, match=key):
        config_from_diffusers({**diffusers_config(TINY23), **change})


def _official_file(path, state: dict[str, Tensor], header: dict) -> None:
    """A release-like single file: the DiT under its prefix beside a connector and the 2.3 feature projections."""
    tensors = {OFFICIAL_PREFIX + k: v.contiguous() for k, v in state.items()}
    tensors[OFFICIAL_PREFIX + "video_embeddings_connector.learnable_registers"] = torch.zeros(8, 64)
    tensors["text_embedding_projection.video_aggregate_embed.weight"] = torch.zeros(64, 49 * 32)
    tensors["text_embedding_projection.audio_aggregate_embed.weight"] = torch.zeros(32, 49 * 32)
    save_file(tensors, str(path), {"config": json.dumps({"transformer": header})})


def test_2_3_weights_sources_read_their_config_and_load(diffusers, pair, tmp_path) -> None:
    """An official 2.3 file (release header), a diffusers 2.3 folder and our own files in both layouts: each
    carries the tiny-2.3 config and loads the same weights (diffusers' and official names)."""
    dm, ours = pair
    dm.save_pretrained(tmp_path / "pipe" / "transformer")
    _official_file(tmp_path / "official.safetensors", ours.state_dict(), TINY_HEADER_23)
    models.save_model(ours, tmp_path / "ours-official.safetensors", "official")
    models.save_model(ours, tmp_path / "ours-diffusers.safetensors", "diffusers")
    for name in ("pipe", "official.safetensors", "ours-official.safetensors", "ours-diffusers.safetensors"):
        path = tmp_path / name
        assert read_config(path) == TINY23, name
        loaded = models.build_model(read_config(path), dtype=torch.float32)
        models.load_model_weights(loaded, path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items()), name


def test_2_3_conversion_round_trip(pair, tmp_path) -> None:
    _, ours = pair
    src, mid, dst = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
    models.save_model(ours, src, "official")
    n = models.convert_file(src, mid, "diffusers")
    assert n == len(ours.state_dict()) and read_config(mid) == TINY23
    assert models.convert_file(mid, dst, "official") == n and read_config(dst) == TINY23
    back = models.build_model(TINY23)
    models.load_model_weights(back, dst)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_a_19b_checkpoint_in_a_2_3_model_names_what_differs(tmp_path) -> None:
    path = tmp_path / "tiny.safetensors"
    models.save_model(models.build_model("tiny"), path)
    with pytest.raises(models.CheckpointError) as info:
        models.load_model_weights(models.build_model("tiny-2.3"), path)
    # 68 missing (48 gate logits, 8 prompt tables, 12 prompt adaLN), 8 unexpected (caption projections) and
    # 12 mis-shaped (the 9-row tables and adaLN outputs) tensors, the first dozen listed.
    assert "does not fit the model (88 problem(s))" in str(info.value)
    problems = shape_problems(whole_shapes(TINY23), whole_shapes(models.PRESETS["tiny"]))
    assert len(problems) == 88
    assert "missing: transformer_blocks.0.attn1.to_gate_logits.bias (4,)" in problems
    assert "unexpected: audio_caption_projection.linear_1.bias (32,)" in problems
    assert "shape: adaln_single.linear.bias is (384,), expected (576,)" in problems
    assert "shape: transformer_blocks.3.audio_scale_shift_table is (6, 32), expected (9, 32)" in problems


# ---------------------------------------------------------------- 5. backends, stages, surgery, probe


def test_backends_build_the_gate_logits_column_split() -> None:
    roles = {
        n: m.parallel_role for n, m in models.build_model("tiny-2.3").named_modules() if hasattr(m, "parallel_role")
    }
    gates = {n: r for n, r in roles.items() if n.endswith("to_gate_logits")}
    assert len(gates) == 6 * TINY23.num_layers and set(gates.values()) == {"column"}
    assert sum(r == "column" for r in roles.values()) == TINY23.num_layers * (6 * 4 + 2)
    assert roles["prompt_adaln_single.linear"] == "replicated"


def test_fp8_backend_on_2_3() -> None:
    """FP8 GEMMs for every block linear whose shape allows it; 4-head gate logits stay plain (Fp8Linear's
    fallback), 16-head ones run in FP8; outputs within FP8 rounding of fp32 (the bound of tests/models/test_fp8)."""
    cfg = dataclasses.replace(TINY23, num_heads=16, video_head_dim=8, audio_head_dim=4)
    for config in (TINY23, cfg):
        torch.manual_seed(0)
        ref = models.build_model(config)
        fp8 = models.build_model(config, backend="fp8")
        fp8.load_state_dict(ref.state_dict())
        gate = fp8.transformer_blocks["0"].attn1.to_gate_logits
        assert isinstance(gate, Fp8Linear) and gate.fp8 == (config.num_heads % 16 == 0)
        grid = (3, 2, 2)
        x = _inputs(config, 2, grid, 9, seed=1)
        for out, out_ref in zip(_ours(fp8, x, grid), _ours(ref, x, grid)):
            rel = ((out - out_ref).norm() / out_ref.norm()).item()
            assert 1e-5 < rel < 0.08


@pytest.mark.parametrize("count", [2, 4])
def test_pipeline_stages_equal_the_whole_model(count) -> None:
    """Stages chained in one process (the carry with its prompt rows handed on): outputs and every gradient
    equal the whole model's, with per-token sigmas and masks."""
    torch.manual_seed(0)
    whole = models.build_model("tiny-2.3")
    stages = [models.build_model("tiny-2.3", stage=Stage(index=i, count=count)) for i in range(count)]
    for s in stages:
        load_full_state(s, whole.state_dict())
    assert hasattr(stages[0], "prompt_adaln_single") and not hasattr(stages[-1], "prompt_adaln_single")
    b, grid, ta = 2, (3, 2, 2), 9
    x = _inputs(TINY23, b, grid, ta, seed=2)
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[1, 3:] = False
    kw = dict(video_context_mask=mask, video_sigma=torch.rand(b, 12), audio_sigma=torch.rand(b, ta))
    args = (x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid)
    shapes = stages[0].carry_shapes(b, 12, ta, 7, 6, True, True)
    assert shapes["mod_prompt_video"] == (b, 1, 2 * TINY23.video_dim) and shapes["mod_video"][-1] == 9 * 64
    carry = None
    for s in stages:
        s.set_input_tensor(carry)
        carry = s(*args, **kw)
        if not s.stage.last:
            assert carry.shape == (sum(torch.Size(v[1:]).numel() for v in shapes.values()), b, 1)
    v, a = carry
    rv, ra = whole(*args, **kw)
    assert _diff(v, rv) < 1e-6 and _diff(a, ra) < 1e-6
    (v.square().mean() + a.square().mean()).backward()
    (rv.square().mean() + ra.square().mean()).backward()
    ref = dict(whole.named_parameters())
    seen = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(seen) == sorted(ref)
    for s in stages:
        for n, p in s.named_parameters():
            torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("g", [0.5, 0.0])
def test_a2v_surgery_scales_only_the_audio_kv_gradients(g) -> None:
    torch.manual_seed(0)
    model = models.build_model("tiny-2.3")
    grid = (3, 2, 2)
    x = _inputs(TINY23, 2, grid, 9, seed=4)
    pre = "transformer_blocks.0.audio_to_video_attn."
    names = [pre + s for s in ("to_k.weight", "to_v.bias", "to_q.weight", "to_gate_logits.weight", "to_out.0.weight")]
    names += ["audio_patchify_proj.weight"]
    grads = []
    for scale in (1.0, g):
        model.zero_grad(set_to_none=True)
        model.set_a2v_grad_scales([scale, 1.0, 1.0, 1.0])
        v, a = model(x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid)
        (v.square().sum() + a.square().sum()).backward()
        params = dict(model.named_parameters())
        grads.append({n: params[n].grad.clone() for n in names})
    for k in names[:2]:
        assert grads[0][k].abs().max() > 0 and torch.equal(grads[1][k], g * grads[0][k]), k
    for k in names[2:5]:  # the queries, the gates (read from the video queries) and the output: untouched
        assert torch.equal(grads[1][k], grads[0][k]), k
    assert not torch.allclose(grads[1]["audio_patchify_proj.weight"], grads[0]["audio_patchify_proj.weight"])


class _Probe:
    def __init__(self):
        self.seen = []

    def wants(self, block: int) -> bool:
        return True

    def record(self, block, q, k, lse):
        self.seen.append((block, q, k, lse))


def test_v2a_probe_and_activation_checkpointing_on_2_3() -> None:
    """Region-wise reweighting's probe sees each block's V2A logits' LSE (the gate comes after the
    attention and leaves it alone); recomputing blocks gives the same gradients."""
    torch.manual_seed(0)
    model = models.build_model("tiny-2.3")
    grid, ta = (3, 2, 2), 9
    x = _inputs(TINY23, 2, grid, ta, seed=5)
    probe = _Probe()
    v0, a0 = _ours(model, x, grid)
    v, a = _ours(model, x, grid, v2a_probe=probe)
    assert torch.equal(v, v0) and torch.equal(a, a0)
    assert [s[0] for s in probe.seen] == list(range(TINY23.num_layers))
    for _, q, k, lse in probe.seen:
        logits = (q.double() @ k.double().transpose(-1, -2)) / TINY23.audio_head_dim**0.5
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    args = (x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        v, a = model(*args)
        (v.square().mean() + a.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- 6. LoRA on 2.3

LORA_23 = LoRAConfig(rank=4, alpha=8.0, targets=(*DEFAULT_TARGETS, "*.to_gate_logits", "prompt_adaln_single.linear"))


def test_lora_on_2_3_merges_and_diffusers_loads_the_export(diffusers, tmp_path) -> None:
    """Adapters on the gate logits and the prompt adaLN as well: the adapted forward equals the merged model,
    and the exported file loads in LTX2Pipeline.load_lora_weights with our outputs."""
    pytest.importorskip("peft")  # diffusers' LoRA loader needs it
    dm = _diffusers_23(diffusers, seed=3)
    ours = models.from_diffusers(dm).eval()
    names = apply_lora(ours, LORA_23, seed=3)
    assert len(names) == (28 + 6) * TINY23.num_layers + 1
    g = torch.Generator().manual_seed(1)
    load_lora_state_dict(ours, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(ours).items()})
    path = tmp_path / "lora.safetensors"
    save_lora_file(ours, path)
    grid = (3, 2, 2)
    x = _inputs(TINY23, 2, grid, 9, seed=7)
    v, a = _ours(ours, x, grid)
    with use_adapter(ours, None):
        v0, a0 = _ours(ours, x, grid)
    assert _diff(v, v0) > 1e-3 and _diff(a, a0) > 1e-3  # the adapters change the outputs

    before = {k: p.clone() for k, p in dm.state_dict().items()}
    deltas = {
        to_layout({f"{n}.weight": torch.empty(0)}, "diffusers").popitem()[0]: layer.merged_delta("default")
        for n, layer in lora_layers(ours).items()
    }
    assert "prompt_adaln.linear.weight" in deltas and "transformer_blocks.0.attn1.to_gate_logits.weight" in deltas
    pipe = diffusers.LTX2Pipeline(
        scheduler=None,
        vae=None,
        audio_vae=None,
        text_encoder=None,
        tokenizer=None,
        connectors=None,
        transformer=dm,
        vocoder=None,
    )
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    for key, value in dm.state_dict().items():
        expected = before[key] + deltas[key] if key in deltas else before[key]
        assert (value - expected).abs().max() < 1e-5, key
    ref_v, ref_a = _theirs(dm, x, grid)
    assert _diff(v, ref_v) < TOL and _diff(a, ref_a) < TOL

    merge_lora(ours)  # the plain model with the adapters folded in
    assert not lora_layers(ours)
    mv, ma = _ours(ours, x, grid)
    assert _diff(mv, v) < TOL and _diff(ma, a) < TOL


# ---------------------------------------------------------------- 7. the run config


def test_the_22b_config_has_the_19b_rollout_shape() -> None:
    from engine.config import load_config, to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    old = flat(to_dict(load_config(ROOT / "configs" / "ltx2-19b.yaml")))
    new = flat(to_dict(load_config(ROOT / "configs" / "ltx2.3-22b.yaml")))
    differ = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
    assert differ == {
        "model.preset": ("ltx2-19b", "ltx2.3-22b"),
        "run_dir": ("runs/ltx2-19b", "runs/ltx2.3-22b"),
        "sampler.stg_blocks": ([29], [28]),  # LTX-2.3's STG block (ARCHITECTURE.md section 8)
    }
    assert set(new) == set(old)
