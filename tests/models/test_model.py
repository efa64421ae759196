"""The LTX-2 DiT: parity with diffusers' reference implementation, the 19B shapes, the backend spec,
A2V gradient surgery, input validation, the V2A probe and STG's perturbed rows."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

import models
from models.layouts import OFFICIAL_PREFIX, diffusers_config, to_layout
from models.stage import Stage
from tests.helpers import ROOT

diffusers = pytest.importorskip("diffusers")

KEYS_FILE = ROOT / "tests" / "data" / "keys-ltx2-19b.txt"  # copy of ../shared/ltx2/keys-ltx2-19b.txt
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- helpers


def _perturbed_diffusers_model(seed: int = 0):
    """diffusers' LTX-2 transformer at the tiny shape, fp32, eval, with no identity-initialised parameter left."""
    torch.manual_seed(seed)
    dm = diffusers.LTX2VideoTransformer3DModel(**diffusers_config(models.PRESETS["tiny"])).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            constant = bool((p == p.flatten()[0]).all())
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif constant:  # anything diffusers zero- (or constant-) initialises
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    for name, p in dm.named_parameters():
        assert p.numel() == 1 or not bool((p == p.flatten()[0]).all()), f"{name} is still constant"
    return dm.float()


@pytest.fixture(scope="module")
def pair():
    dm = _perturbed_diffusers_model()
    ours = models.from_diffusers(dm).eval()
    return dm, ours


def _inputs(
    cfg: models.ModelConfig, b: int, grid: tuple[int, int, int], ta: int, seed: int, t_vctx: int = 7, t_actx: int = 6
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return dict(
        video=torch.randn(b, f * h * w, cfg.in_channels, generator=g),
        audio=torch.randn(b, ta, cfg.audio_in_channels, generator=g),
        sigma=torch.rand(b, generator=g) * 0.9 + 0.05,
        video_context=torch.randn(b, t_vctx, cfg.caption_channels, generator=g),
        audio_context=torch.randn(b, t_actx, cfg.caption_channels, generator=g),
    )


def _diffusers_forward(
    dm,
    x: dict[str, Tensor],
    grid,
    video_t: Tensor,
    audio_t: Tensor,
    vmask: Tensor | None = None,
    amask: Tensor | None = None,
    **kw,
) -> tuple[Tensor, Tensor]:
    f, h, w = grid
    with torch.no_grad():
        out = dm(
            x["video"],
            x["audio"],
            x["video_context"],
            x["audio_context"],
            timestep=video_t,
            audio_timestep=audio_t,
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


def _ours_forward(model, x: dict[str, Tensor], grid, **kw) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model(x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid, 24.0, **kw)


def _max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- 1. parity with diffusers


@pytest.mark.parametrize("grid", [(3, 2, 2), (4, 3, 5), (1, 2, 3)])
def test_parity_with_diffusers_per_sample_sigma(pair, grid) -> None:
    dm, ours = pair
    b, ta = 2, 13
    x = _inputs(ours.config, b, grid, ta, seed=sum(grid))
    assert x["sigma"][0] != x["sigma"][1]
    tv = grid[0] * grid[1] * grid[2]
    ref_v, ref_a = _diffusers_forward(
        dm, x, grid, (x["sigma"][:, None] * 1000).expand(b, tv), (x["sigma"][:, None] * 1000).expand(b, ta)
    )
    v, a = _ours_forward(ours, x, grid)
    assert ref_v.abs().max() > 0.1 and ref_a.abs().max() > 0.1  # not a degenerate comparison
    assert _max_diff(v, ref_v) < TOL
    assert _max_diff(a, ref_a) < TOL


def test_parity_with_diffusers_text_masks(pair) -> None:
    dm, ours = pair
    b, ta, grid = 2, 13, (4, 3, 5)
    x = _inputs(ours.config, b, grid, ta, seed=11, t_vctx=7, t_actx=6)
    vmask = torch.ones(b, 7, dtype=torch.bool)
    vmask[0, 4:] = False
    vmask[1, 0] = False
    amask = torch.ones(b, 6, dtype=torch.bool)
    amask[1, 2:] = False
    amask[0, 5] = False
    tv = grid[0] * grid[1] * grid[2]
    ref_v, ref_a = _diffusers_forward(
        dm,
        x,
        grid,
        (x["sigma"][:, None] * 1000).expand(b, tv),
        (x["sigma"][:, None] * 1000).expand(b, ta),
        vmask,
        amask,
    )
    v, a = _ours_forward(ours, x, grid, video_context_mask=vmask, audio_context_mask=amask)
    assert _max_diff(v, ref_v) < TOL
    assert _max_diff(a, ref_a) < TOL
    # The masks matter: unmasked outputs differ.
    v_nomask, a_nomask = _ours_forward(ours, x, grid)
    assert _max_diff(v, v_nomask) > 1e-3
    assert _max_diff(a, a_nomask) > 1e-3


def test_parity_with_diffusers_per_token_sigma(pair) -> None:
    dm, ours = pair
    b, ta, grid = 2, 13, (3, 2, 2)
    tv = 12
    x = _inputs(ours.config, b, grid, ta, seed=5)
    g = torch.Generator().manual_seed(99)
    video_sigma = torch.rand(b, tv, generator=g)
    video_sigma[:, :4] = 0.0  # conditioning tokens of the first latent frame
    audio_sigma = torch.rand(b, ta, generator=g)
    ref_v, ref_a = _diffusers_forward(dm, x, grid, video_sigma * 1000, audio_sigma * 1000)
    v, a = _ours_forward(ours, x, grid, video_sigma=video_sigma, audio_sigma=audio_sigma)
    assert _max_diff(v, ref_v) < TOL
    assert _max_diff(a, ref_a) < TOL
    # Per-token sigmas are actually used (differs from the shared sigma).
    v_shared, a_shared = _ours_forward(ours, x, grid)
    assert _max_diff(v, v_shared) > 1e-3 and _max_diff(a, a_shared) > 1e-3


def test_constant_per_token_sigma_equals_shared_sigma(pair) -> None:
    _, ours = pair
    b, ta, grid = 2, 13, (3, 2, 2)
    x = _inputs(ours.config, b, grid, ta, seed=8)
    v0, a0 = _ours_forward(ours, x, grid)
    v1, a1 = _ours_forward(
        ours,
        x,
        grid,
        video_sigma=x["sigma"][:, None].expand(b, 12).clone(),
        audio_sigma=x["sigma"][:, None].expand(b, ta).clone(),
    )
    assert _max_diff(v0, v1) < 1e-6 and _max_diff(a0, a1) < 1e-6


def test_from_diffusers_copies_weights(pair) -> None:
    dm, ours = pair
    ref = dm.state_dict()
    mine = to_layout(ours.state_dict(), "diffusers")
    assert set(mine) == set(ref)
    for k in ref:
        assert torch.equal(mine[k], ref[k]), k


# ---------------------------------------------------------------- 2. 19B shapes


def _parse_keys_file() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], int]:
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    total = None
    for line in KEYS_FILE.read_text().splitlines():
        line = line.strip()
        if line.startswith("TOTAL"):
            total = int(line.split()[1])
        if line.startswith("----"):
            current = line.strip("- ").strip()
            sections[current] = {}
            continue
        if current is None or not line:
            continue
        m = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line)
        assert m, f"unparsed line {line!r}"
        sections[current][m.group(1)] = tuple(int(s) for s in m.group(2).replace(" ", "").split(",") if s)
    return sections["block 0 keys"], sections["non-block keys"], total


@pytest.fixture(scope="module")
def model_19b():
    return models.build_model("ltx2-19b", device="meta")


def test_19b_parameter_count(model_19b) -> None:
    _, _, total = _parse_keys_file()
    assert total == 18_876_174_592
    assert sum(p.numel() for p in model_19b.parameters()) == 18_876_174_592


def test_19b_keys_and_shapes(model_19b) -> None:
    block0, nonblock, _ = _parse_keys_file()
    assert len(block0) == 72 and len(nonblock) == 54
    state = to_layout(model_19b.state_dict(), "official")
    assert all(k.startswith(OFFICIAL_PREFIX) for k in state)
    shapes = {k[len(OFFICIAL_PREFIX) :]: tuple(v.shape) for k, v in state.items()}
    ours_block0 = {k: s for k, s in shapes.items() if k.startswith("transformer_blocks.0.")}
    ours_nonblock = {k: s for k, s in shapes.items() if not k.startswith("transformer_blocks.")}
    assert ours_block0 == block0
    assert ours_nonblock == nonblock
    # Every block has block 0's keys and shapes, and there are exactly 48 of them.
    for i in range(48):
        bi = {
            k.replace(f"transformer_blocks.{i}.", "transformer_blocks.0.", 1): s
            for k, s in shapes.items()
            if k.startswith(f"transformer_blocks.{i}.")
        }
        assert bi == block0, i
    assert len(shapes) == 48 * len(block0) + len(nonblock)


# ---------------------------------------------------------------- 3. backend spec


class CountingLinear(nn.Linear):
    def __init__(self, *args, role: str = "replicated", **kw):
        super().__init__(*args, **kw)
        self.role = role


class RecordingBackend(models.TorchBackend):
    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.role_counts: dict[str, int] = {}
        self.kv_grad_scales: list[float] = []

    def linear(self, in_features, out_features, *, bias=True, role="replicated"):
        self.role_counts[role] = self.role_counts.get(role, 0) + 1
        return CountingLinear(in_features, out_features, bias=bias, role=role)

    def attention(self, q, k, v, *, key_mask=None, kv_grad_scale=1.0, with_lse=False):
        self.kv_grad_scales.append(kv_grad_scale)
        return super().attention(q, k, v, key_mask=key_mask, kv_grad_scale=kv_grad_scale, with_lse=with_lse)


def _expected_role(name: str) -> str:
    leaf = name.split(".")
    if leaf[-1] in ("to_q", "to_k", "to_v") or name.endswith("ff.net.0.proj"):
        return "column"
    if name.endswith("to_out.0") or name.endswith("ff.net.2"):
        return "row"
    return "replicated"


def test_backend_builds_every_linear() -> None:
    backend = RecordingBackend()
    torch.manual_seed(0)
    model = models.build_model("tiny", backend=backend)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears and all(type(m) is CountingLinear for m in linears.values()), [
        n for n, m in linears.items() if type(m) is not CountingLinear
    ]
    assert sum(backend.role_counts.values()) == len(linears)
    for name, m in linears.items():
        assert m.role == _expected_role(name), name
    n_layers = model.config.num_layers
    # 6 attentions x (q, k, v) + 2 FFN-in per block are column; 6 to_out + 2 FFN-out per block are row.
    assert backend.role_counts["column"] == n_layers * (6 * 3 + 2)
    assert backend.role_counts["row"] == n_layers * (6 + 2)
    roles = {n: m.role for n, m in linears.items()}
    assert roles["transformer_blocks.0.audio_to_video_attn.to_k"] == "column"
    assert roles["transformer_blocks.0.ff.net.0.proj"] == "column"
    assert roles["transformer_blocks.0.audio_ff.net.2"] == "row"
    assert roles["transformer_blocks.1.video_to_audio_attn.to_out.0"] == "row"
    assert roles["patchify_proj"] == "replicated"
    assert model.backend is backend


def test_backend_attention_sees_kv_grad_scales() -> None:
    backend = RecordingBackend()
    torch.manual_seed(0)
    model = models.build_model("tiny", backend=backend)
    scales = [0.5, 1.0, 0.25, 0.0]
    model.set_a2v_grad_scales(scales)
    x = _inputs(model.config, 2, (2, 2, 2), 5, seed=3)
    v, a = _ours_forward(model, x, (2, 2, 2))
    # Six attentions per block; the A2V one (5th in forward order) carries the block's scale.
    assert len(backend.kv_grad_scales) == 6 * model.config.num_layers
    per_block = [backend.kv_grad_scales[6 * i : 6 * i + 6] for i in range(model.config.num_layers)]
    for i, calls in enumerate(per_block):
        assert sorted(calls) == sorted([1.0] * 5 + [scales[i]])
        assert calls[4] == scales[i]
    # A custom backend that only delegates gives the same numbers as the default backend.
    plain = models.build_model("tiny")
    plain.load_state_dict(model.state_dict())
    v0, a0 = _ours_forward(plain, x, (2, 2, 2))
    assert torch.equal(v, v0) and torch.equal(a, a0)


def test_backend_by_name_and_unknown_name() -> None:
    assert isinstance(models.build_model("tiny", backend="torch").backend, models.TorchBackend)
    with pytest.raises(ValueError, match="backend"):
        models.build_model("tiny", backend="no-such-backend")


# ---------------------------------------------------------------- 4. gradient surgery


def _grads(model, x, grid, names):
    model.zero_grad(set_to_none=True)
    v, a = model(x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid, 24.0)
    g = torch.Generator().manual_seed(123)
    loss = (v * torch.randn(v.shape, generator=g)).sum() + (a * torch.randn(a.shape, generator=g)).sum()
    loss.backward()
    params = dict(model.named_parameters())
    return (v.detach(), a.detach()), {n: params[n].grad.clone() for n in names}


@pytest.mark.parametrize("g", [0.5, 0.25, 0.0])
def test_a2v_grad_scale_only_scales_kv_grads(g: float) -> None:
    torch.manual_seed(0)
    model = models.build_model("tiny")
    grid = (3, 2, 2)
    x = _inputs(model.config, 2, grid, 9, seed=4)
    pre = "transformer_blocks.0.audio_to_video_attn."
    names = [
        pre + "to_k.weight",
        pre + "to_k.bias",
        pre + "to_v.weight",
        pre + "to_v.bias",
        pre + "to_q.weight",
        pre + "to_out.0.weight",
        "transformer_blocks.1.audio_to_video_attn.to_k.weight",
        "patchify_proj.weight",
        "audio_patchify_proj.weight",
    ]
    n = model.config.num_layers
    model.set_a2v_grad_scales([1.0] * n)
    out1, g1 = _grads(model, x, grid, names)
    model.set_a2v_grad_scales([g] + [1.0] * (n - 1))
    out2, g2 = _grads(model, x, grid, names)
    # Forward is untouched.
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    # K/V projections of block 0's A2V get exactly g times the gradient (powers of two scale exactly).
    for k in (pre + "to_k.weight", pre + "to_k.bias", pre + "to_v.weight", pre + "to_v.bias"):
        assert g1[k].abs().max() > 0
        assert torch.equal(g2[k], g * g1[k]), k
    # Q, the output projection, other blocks' A2V and the video stream are untouched.
    for k in (pre + "to_q.weight", pre + "to_out.0.weight", "transformer_blocks.1.audio_to_video_attn.to_k.weight"):
        assert torch.equal(g2[k], g1[k]), k
    torch.testing.assert_close(g2["patchify_proj.weight"], g1["patchify_proj.weight"], rtol=0, atol=0)
    # Upstream of the audio keys the gradient does change (so the surgery reaches the audio stream).
    assert not torch.allclose(g2["audio_patchify_proj.weight"], g1["audio_patchify_proj.weight"])


def test_a2v_grad_scale_non_power_of_two() -> None:
    torch.manual_seed(1)
    model = models.build_model("tiny")
    grid = (2, 2, 3)
    x = _inputs(model.config, 2, grid, 7, seed=6)
    k = "transformer_blocks.2.audio_to_video_attn.to_k.weight"
    n = model.config.num_layers
    model.set_a2v_grad_scales([1.0] * n)
    _, g1 = _grads(model, x, grid, [k])
    model.set_a2v_grad_scales([1.0, 1.0, 0.3, 1.0])
    _, g2 = _grads(model, x, grid, [k])
    scale = g1[k].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(g2[k], 0.3 * g1[k], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("scales", [[], [1.0] * 3, [1.0] * 5])
def test_a2v_grad_scales_wrong_length(scales) -> None:
    model = models.build_model("tiny")
    with pytest.raises(ValueError):
        model.set_a2v_grad_scales(scales)


# ---------------------------------------------------------------- 5. shape errors


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.build_model("tiny").eval()


def _call(model, x, grid=(2, 2, 2), **kw):
    return model(x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid, 24.0, **kw)


@pytest.mark.parametrize(
    "field,bad,name",
    [
        ("video", lambda x: x[:, :-1], "video"),  # token count does not match the grid
        ("video", lambda x: torch.cat([x, x[..., :1]], -1), "video"),  # channel count
        ("audio", lambda x: x[..., :-2], "audio"),
        ("audio", lambda x: x[0], "audio"),
        ("sigma", lambda x: x[:, None], "sigma"),
        ("sigma", lambda x: x[:1], "sigma"),
        ("video_context", lambda x: x[..., :-1], "video_context"),
        ("audio_context", lambda x: x[:1], "audio_context"),
    ],
)
def test_shape_errors_name_the_tensor(tiny, field, bad, name) -> None:
    x = _inputs(tiny.config, 2, (2, 2, 2), 5, seed=0)
    x[field] = bad(x[field])
    with pytest.raises(ValueError, match=rf"^{name} has shape"):
        _call(tiny, x)


def test_grid_mismatch_is_an_error(tiny) -> None:
    x = _inputs(tiny.config, 2, (2, 2, 2), 5, seed=0)
    with pytest.raises(ValueError, match=r"^video has shape"):
        _call(tiny, x, grid=(2, 2, 3))


def test_mask_and_per_token_sigma_shape_errors(tiny) -> None:
    x = _inputs(tiny.config, 2, (2, 2, 2), 5, seed=0)
    with pytest.raises(ValueError, match=r"^video_context_mask"):
        _call(tiny, x, video_context_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^video_sigma"):
        _call(tiny, x, video_sigma=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"^audio_sigma"):
        _call(tiny, x, audio_sigma=torch.ones(2, 5, 1))


def test_a_context_mask_without_real_tokens_is_an_error(tiny) -> None:
    """Checked once at the model's entry (the attention kernels skip the check on GPUs)."""
    x = _inputs(tiny.config, 2, (2, 2, 2), 5, seed=0)
    mask = torch.ones(2, x["audio_context"].shape[1], dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"^audio_context_mask must be bool with at least one real"):
        _call(tiny, x, audio_context_mask=mask)


# ---------------------------------------------------------------- 6. V2A probe


class _SeeAll:
    """A V2A probe that wants every block but `skip` and keeps what it sees."""

    def __init__(self, skip: int | None = None):
        self.skip, self.seen = skip, []

    def wants(self, block: int) -> bool:
        return block != self.skip

    def record(self, block, q, k, lse):
        self.seen.append((block, q.clone(), k.clone(), lse.clone()))


def test_v2a_probe_sees_every_block(tiny) -> None:
    cfg = tiny.config
    b, grid, ta = 2, (3, 2, 2), 9
    x = _inputs(cfg, b, grid, ta, seed=2)
    probe, some = _SeeAll(), _SeeAll(skip=1)
    with torch.no_grad():
        v, a = _call(tiny, x, grid, v2a_probe=probe)
        _call(tiny, x, grid, v2a_probe=some)
        v0, a0 = _call(tiny, x, grid)
    seen = probe.seen
    assert [s[0] for s in seen] == list(range(cfg.num_layers))
    assert [s[0] for s in some.seen] == [i for i in range(cfg.num_layers) if i != 1]  # only the blocks it wants
    for _, q, k, lse in seen:
        assert q.shape == (b, cfg.num_heads, ta, cfg.audio_head_dim)
        assert k.shape == (b, cfg.num_heads, 12, cfg.audio_head_dim)
        assert not q.requires_grad and not k.requires_grad and not lse.requires_grad
        # The attention's own log-sum-exp of the scaled logits, which the mass then reuses.
        logits = (q.double() @ k.double().transpose(-1, -2)) / cfg.audio_head_dim**0.5
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    # Each block's queries/keys differ (they are that block's own), and probing changes nothing.
    assert not torch.allclose(seen[0][1], seen[1][1])
    assert torch.equal(v, v0) and torch.equal(a, a0)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = models.build_model("tiny")
    model.set_a2v_grad_scales([0.5, 1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    args = (
        torch.randn(2, 12, cfg.in_channels, generator=g),
        torch.randn(2, 9, cfg.audio_in_channels, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 5, cfg.caption_channels, generator=g),
        torch.randn(2, 5, cfg.caption_channels, generator=g),
        (3, 2, 2),
    )
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        v, a = model(*args)
        (v.square().mean() + a.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- 7. STG (spatio-temporal guidance)


@pytest.fixture(scope="module")
def stg_reference(pair):
    """diffusers' transformer with `perturbed_attn=True` (LTX2PerturbedAttnProcessor on the self-attentions;
    the flag adds no weights) and the weights of `pair`: the reference for STG's perturbed rows."""
    dm, _ = pair
    ref = diffusers.LTX2VideoTransformer3DModel(**{**diffusers_config(models.PRESETS["tiny"]), "perturbed_attn": True})
    ref.load_state_dict(dm.state_dict())
    return ref.float().eval()


@pytest.mark.parametrize(
    "perturbed,blocks",
    [([False, True, False, True], [1, 3]), ([True, True, True, True], [2])],
    ids=["mixed-rows", "all-rows"],  # with every row perturbed diffusers skips the attention call (all_perturbed)
)
def test_stg_parity_with_diffusers(pair, stg_reference, perturbed, blocks) -> None:
    """Perturbed rows skip the video and audio self-attention of the STG blocks exactly as diffusers does;
    the other rows of the same batch are bit-identical to an unperturbed call."""
    _, ours = pair
    b, ta, grid = 4, 13, (3, 2, 2)
    x = _inputs(ours.config, b, grid, ta, seed=21)
    rows = torch.tensor(perturbed)
    t = x["sigma"][:, None] * 1000
    ref_v, ref_a = _diffusers_forward(
        stg_reference,
        x,
        grid,
        t.expand(b, 12),
        t.expand(b, ta),
        spatio_temporal_guidance_blocks=blocks,
        perturbation_mask=(~rows).float(),  # diffusers: 0 = perturbed
    )
    v, a = _ours_forward(ours, x, grid, perturbed=rows, stg_blocks=set(blocks))
    assert _max_diff(v, ref_v) < TOL
    assert _max_diff(a, ref_a) < TOL
    v0, a0 = _ours_forward(ours, x, grid)
    assert torch.equal(v[~rows], v0[~rows]) and torch.equal(a[~rows], a0[~rows])
    assert (v - v0)[rows].abs().amax() > 1e-3 and (a - a0)[rows].abs().amax() > 1e-3


def test_stg_each_block_perturbs_differently(pair) -> None:
    """The block index is honoured: skipping each single block gives its own output."""
    _, ours = pair
    b, ta, grid = 2, 9, (3, 2, 2)
    x = _inputs(ours.config, b, grid, ta, seed=22)
    rows = torch.tensor([True, True])
    outs = [_ours_forward(ours, x, grid, perturbed=rows, stg_blocks={i})[0] for i in range(ours.config.num_layers)]
    for i in range(len(outs)):
        for j in range(i):
            assert _max_diff(outs[i], outs[j]) > 1e-3, (i, j)


def test_stg_across_pipeline_stages_and_with_recompute() -> None:
    """Each stage perturbs the STG blocks it holds (ModuleDict keyed by global index), the mask being an
    argument of every stage; activation checkpointing recomputes the perturbed blocks alike."""
    torch.manual_seed(0)
    whole = models.build_model("tiny")
    stages = [models.build_model("tiny", stage=Stage(index=i, count=2)) for i in range(2)]
    for s in stages:
        models.weights.load_full_state(s, whole.state_dict())
    b, grid, ta = 3, (3, 2, 2), 5
    x = _inputs(whole.config, b, grid, ta, seed=23)
    kw = {"perturbed": torch.tensor([False, True, True]), "stg_blocks": {1, 2}}  # one block on each stage
    ref = _ours_forward(whole, x, grid, **kw)
    stages[1].set_input_tensor(_ours_forward(stages[0], x, grid, **kw))
    out = _ours_forward(stages[1], x, grid, **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    whole.activation_checkpointing = True
    args = (x["video"], x["audio"], x["sigma"], x["video_context"], x["audio_context"], grid)
    v, a = whole(*args, **kw)  # with gradients: the recomputing path
    assert v.requires_grad and torch.equal(v.detach(), ref[0]) and torch.equal(a.detach(), ref[1])


def test_stg_argument_errors(tiny) -> None:
    x = _inputs(tiny.config, 2, (2, 2, 2), 5, seed=0)
    rows = torch.tensor([False, True])
    with pytest.raises(ValueError, match=r"^stg_blocks \[4, 7\] are outside the model's blocks 0..3"):
        _call(tiny, x, perturbed=rows, stg_blocks=[1, 4, 7])
    with pytest.raises(ValueError, match=r"^stg_blocks \[-1\]"):
        _call(tiny, x, perturbed=rows, stg_blocks=[-1])
    with pytest.raises(ValueError, match="go together"):
        _call(tiny, x, perturbed=rows)
    with pytest.raises(ValueError, match="go together"):
        _call(tiny, x, stg_blocks=[1])
    with pytest.raises(ValueError, match=r"^perturbed has shape"):
        _call(tiny, x, perturbed=rows[:1], stg_blocks=[1])
    with pytest.raises(ValueError, match=r"^perturbed must be a bool mask"):
        _call(tiny, x, perturbed=rows.float(), stg_blocks=[1])
