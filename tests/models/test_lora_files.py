"""LoRA files: the interoperable export (keys, shapes, alpha folded), round trips through it and through
kohya's lora_down/lora_up/alpha format, diffusers loading our export (LTX2Pipeline.load_lora_weights and
fuse_lora give our adapted model's outputs), and the errors (unmatched keys listed at once, mixed formats,
rank mismatch)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import models
from models.errors import CheckpointError
from models.layouts import diffusers_config, to_layout
from models.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_layers, lora_state_dict, use_adapter
from models.lora_files import export_lora, load_lora_file, read_lora_file, save_lora_file
from tests.helpers import tiny_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = LoRAConfig(rank=4, alpha=8.0, targets=("attn1.to_q", "audio_to_video_attn.to_k", "ff.net.2", "patchify_proj"))


def _model(lora: LoRAConfig = LORA, randomize: bool = True) -> models.LTX2AVTransformer:
    """The tiny model (same base weights every call), adapted, with non-zero random A and B."""
    torch.manual_seed(0)
    model = models.build_model("tiny").eval()
    apply_lora(model, lora, seed=3)
    if randomize:
        g = torch.Generator().manual_seed(1)
        state = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(model).items()}
        load_lora_state_dict(model, state)
    return model


def _forward(model: models.LTX2AVTransformer) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        video, audio = model(**tiny_inputs(model.config))
    return video, audio


def _same_outputs(a: models.LTX2AVTransformer, b: models.LTX2AVTransformer, tol: float = 1e-6) -> None:
    (va, aa), (vb, ab) = _forward(a), _forward(b)
    assert (va - vb).abs().max() < tol and (aa - ab).abs().max() < tol


@pytest.fixture(scope="module")
def adapted() -> models.LTX2AVTransformer:
    return _model()


# ---------------------------------------------------------------- export


def test_export_keys_shapes_and_folded_alpha(adapted) -> None:
    exported = export_lora(adapted)
    state = lora_state_dict(adapted)
    layers = lora_layers(adapted)
    assert set(layers) >= {"patchify_proj", "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"}
    assert set(exported) == {f"diffusion_model.{k}" for k in state}
    for name, layer in layers.items():
        a, b = exported[f"diffusion_model.{name}.lora_A.weight"], exported[f"diffusion_model.{name}.lora_B.weight"]
        base = adapted.get_submodule(name).weight
        assert a.shape == (4, base.shape[1]) and b.shape == (base.shape[0], 4)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, state[f"{name}.lora_A.weight"])
        assert torch.allclose(b, 2.0 * state[f"{name}.lora_B.weight"])  # alpha / rank = 8 / 4
        assert torch.allclose(b @ a, layer.merged_delta("default"), atol=1e-6)
    assert not any("alpha" in k for k in exported)
    assert {v.dtype for v in export_lora(adapted, dtype=torch.bfloat16).values()} == {torch.bfloat16}


def test_save_round_trip_gives_identical_outputs(adapted, tmp_path) -> None:
    path = tmp_path / "lora.safetensors"
    save_lora_file(adapted, path)
    fresh = _model(LoRAConfig(rank=4, alpha=16.0, targets=LORA.targets), randomize=False)  # another scale
    load_lora_file(fresh, path)
    _same_outputs(fresh, adapted)
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary left


def test_diffusers_named_file_loads(adapted, tmp_path) -> None:
    """diffusers' own format: `transformer.<diffusers name>` (patchify_proj is proj_in there)."""
    exported = {k.removeprefix("diffusion_model."): v for k, v in export_lora(adapted).items()}
    renamed = {f"transformer.{k}": v for k, v in to_layout(exported, "diffusers").items()}
    assert "transformer.proj_in.lora_A.weight" in renamed
    save_file(renamed, str(tmp_path / "d.safetensors"))
    fresh = _model(randomize=False)
    load_lora_file(fresh, tmp_path / "d.safetensors")
    _same_outputs(fresh, adapted)


def _kohya(model: models.LTX2AVTransformer, alpha: float, underscores: bool) -> dict[str, Tensor]:
    """The adapters of `model` in kohya/ComfyUI's format: lora_down = A, lora_up = B scaled so that
    (alpha / rank) * up @ down is the model's update."""
    out = {}
    for name, layer in lora_layers(model).items():
        rank = layer.A["default"].shape[0]
        key = "lora_unet_" + name.replace(".", "_") if underscores else f"diffusion_model.{name}"
        out[f"{key}.lora_down.weight"] = layer.A["default"].detach().clone()
        out[f"{key}.lora_up.weight"] = layer.B["default"].detach() * layer.scale / (alpha / rank)
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("underscores", [False, True])
def test_kohya_file_loads(adapted, tmp_path, underscores) -> None:
    path = tmp_path / "kohya.safetensors"
    save_file(_kohya(adapted, alpha=3.0, underscores=underscores), str(path))  # alpha != rank
    fresh = _model(randomize=False)
    load_lora_file(fresh, path)
    _same_outputs(fresh, adapted)


# ---------------------------------------------------------------- errors


def test_unmatched_keys_are_one_error(adapted, tmp_path) -> None:
    tensors = export_lora(adapted)
    tensors["diffusion_model.transformer_blocks.0.attn2.to_v.lora_A.weight"] = torch.zeros(4, 32)  # not adapted
    tensors["diffusion_model.transformer_blocks.0.attn2.to_v.lora_B.weight"] = torch.zeros(32, 4)
    tensors["diffusion_model.nonexistent.lora_A.weight"] = torch.zeros(4, 3)
    tensors["diffusion_model.nonexistent.lora_B.weight"] = torch.zeros(3, 4)
    tensors["some.other.tensor"] = torch.zeros(2)
    del tensors["diffusion_model.patchify_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_lora_file(_model(randomize=False), tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "not a LoRA key: some.other.tensor" in msg and "incomplete: patchify_proj" in msg
    del tensors["some.other.tensor"], tensors["diffusion_model.patchify_proj.lora_A.weight"]
    save_file(tensors, str(tmp_path / "bad2.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_lora_file(_model(randomize=False), tmp_path / "bad2.safetensors")
    msg = str(e.value)
    for text in (
        "unexpected: transformer_blocks.0.attn2.to_v.lora_A",
        "unexpected: nonexistent.lora_B",
        "missing: patchify_proj.lora_A",
    ):
        assert text in msg, msg


def test_mixed_formats_refused(adapted, tmp_path) -> None:
    tensors = export_lora(adapted)
    kohya = _kohya(adapted, alpha=3.0, underscores=False)
    b_key = "diffusion_model.patchify_proj.lora_B.weight"
    del tensors[b_key]
    tensors["diffusion_model.patchify_proj.lora_up.weight"] = kohya["diffusion_model.patchify_proj.lora_up.weight"]
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match="mixed formats: lora_A/lora_B"):
        read_lora_file(tmp_path / "mixed.safetensors")
    tensors = export_lora(adapted)
    tensors[f"transformer.{b_key.removeprefix('diffusion_model.')}"] = tensors.pop(b_key)
    save_file(tensors, str(tmp_path / "mixed2.safetensors"))
    with pytest.raises(CheckpointError, match=r"mixed formats: diffusion_model\. .*transformer\."):
        read_lora_file(tmp_path / "mixed2.safetensors")


def test_rank_mismatch_named(adapted, tmp_path) -> None:
    path = tmp_path / "lora.safetensors"
    save_lora_file(adapted, path)
    other = _model(LoRAConfig(rank=2, alpha=8.0, targets=LORA.targets), randomize=False)
    with pytest.raises(CheckpointError, match="rank: patchify_proj has rank 4 in the file, the model's adapter 2"):
        load_lora_file(other, path)


# ---------------------------------------------------------------- diffusers loads our export


def test_diffusers_loads_export_with_identical_outputs(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers' LoRA loader needs it
    torch.manual_seed(0)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"])).float().eval()
    with torch.no_grad():  # no zero-initialised parameter (proj_out, gates) hiding a difference
        for p in dm.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    ours = models.from_diffusers(dm).eval()
    apply_lora(ours, LORA, seed=3)
    g = torch.Generator().manual_seed(1)
    load_lora_state_dict(ours, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(ours).items()})
    path = tmp_path / "lora.safetensors"
    save_lora_file(ours, path)

    before = {k: v.clone() for k, v in dm.state_dict().items()}
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
    fused = dm.state_dict()
    deltas = {
        to_layout({f"{n}.weight": torch.empty(0)}, "diffusers").popitem()[0]: l.merged_delta("default")
        for n, l in lora_layers(ours).items()
    }
    for key, value in fused.items():
        expected = before[key] + deltas[key] if key in deltas else before[key]
        assert (value - expected).abs().max() < 1e-5, key

    x = tiny_inputs(ours.config)
    f, h, w = x["video_grid"]
    with torch.no_grad():
        ref_v, ref_a = dm(
            x["video"],
            x["audio"],
            x["video_context"],
            x["audio_context"],
            timestep=(x["sigma"][:, None] * 1000).expand(2, f * h * w),
            audio_timestep=(x["sigma"][:, None] * 1000).expand(2, 9),
            num_frames=f,
            height=h,
            width=w,
            fps=24.0,
            audio_num_frames=9,
            return_dict=False,
        )[:2]
    v, a = _forward(ours)
    assert (v - ref_v).abs().max() < 1e-5 and (a - ref_a).abs().max() < 1e-5
    with use_adapter(ours, None):  # not a degenerate comparison: the adapters change the outputs
        v0, a0 = _forward(ours)
    assert (v - v0).abs().max() > 1e-3 and (a - a0).abs().max() > 1e-3
