"""Registry-parametrized checks: every registered backbone is tested the moment it is registered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facetrain.errors import DependencyError, ModelError
from facetrain.models import build_backbone
from facetrain.models.registry import backbone_factory, list_backbones

# Too slow for the default run on 2 CPU cores: built on the meta device by default, fully tested under -m slow.
HEAVY = {"iresnet100", "iresnet200", "vit_b", "vit_l", "vit_s", "mobilefacenet_large", "iresnet50", "iresnet34"}
D = 128  # a smaller embedding keeps the heads cheap


def _ours() -> list[str]:
    """Backbones registered by facetrain.models itself (user code may register others in the same process; which of
    them are present depends on import order, so they are left out)."""
    return [n for n in list_backbones() if backbone_factory(n).__module__.startswith("facetrain.models.")]


def _params() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in _ours()]


def _batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def _calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Set BatchNorm running statistics from one batch (momentum 1), like a trained model, and switch to eval.

    arcface_torch's init (conv weights N(0, 0.1)) makes a fresh deep IResNet's activations explode in eval mode
    (running var 1); a trained model's statistics keep them O(1).
    """
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(2)).to(device))
    return model.eval()


def test_registry_lists_arcface_names():
    names = set(list_backbones(include_aliases=True))
    assert {"r18", "r34", "r50", "r100", "r200", "mbf", "vit_t", "vit_s", "vit_b", "vit_l"} <= names
    assert {"iresnet18", "mobilefacenet"} <= set(list_backbones())


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ModelError) as info:
        build_backbone("iresnet51")
    msg = str(info.value)
    assert "Did you mean 'iresnet50'" in msg and "mobilefacenet" in msg and "\n" not in msg


def test_bad_kwarg_is_model_error():
    with pytest.raises(ModelError, match="bad keyword"):
        build_backbone("mbf", not_a_kwarg=3)


@pytest.mark.parametrize("name", _ours())
def test_meta_build_every_backbone(name):
    """Every backbone (large ones included) builds on the meta device and maps (B,3,112,112) -> (B,D)."""
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=D).eval()
        out = model(torch.empty(2, 3, 112, 112))
    assert out.shape == (2, D)
    assert hasattr(model, "forward_features") and hasattr(model, "set_grad_checkpointing")


@pytest.mark.parametrize("name", _params())
def test_forward_channels_last_and_bf16(name):
    model = _calibrated(build_backbone(name, embedding_size=D))
    x = _batch()
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (2, D) and ref.dtype == torch.float32
        assert torch.isfinite(ref).all()
        feats = model.forward_features(x)
        assert feats.shape[0] == 2 and torch.isfinite(feats).all()
        cl_model = build_backbone(name, embedding_size=D).eval()
        cl_model.load_state_dict(model.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        out_cl = cl_model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x)
    scale = ref.abs().max().item()
    diff = (out_cl - ref).abs().max().item()
    assert diff <= 1e-5 * max(scale, 1.0), f"channels_last max abs diff {diff:.3g} (output scale {scale:.3g})"
    assert torch.isfinite(out_bf16).all() and out_bf16.shape == (2, D)
    cos = F.cosine_similarity(out_bf16.float(), ref, dim=1)
    assert cos.min() > 0.9, f"bf16 autocast embeddings drift: cosine {cos.tolist()}"


@pytest.mark.parametrize("name", _params())
def test_gradient_checkpointing_same_gradients(name):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_backbone(name, embedding_size=D, gradient_checkpointing=ckpt).train()
        assert model.grad_checkpointing is ckpt
        torch.manual_seed(5)  # same masking / drop-path draws in both runs
        out = model(_batch(4))
        (out.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-6, msg=f"grad of {key}")


def test_set_grad_checkpointing_is_per_instance():
    a, b = build_backbone("mbf", blocks=(1, 1, 1, 1), scale=1), build_backbone("mbf", blocks=(1, 1, 1, 1), scale=1)
    a.set_grad_checkpointing()
    assert a.grad_checkpointing and not b.grad_checkpointing


def test_heads_selectable():
    x = _batch()
    for name, head in (("r18", "gdc"), ("mbf", "e")):
        model = build_backbone(name, embedding_size=64, head=head, scale=1) if name == "mbf" else None
        model = model or build_backbone(name, embedding_size=64, head=head)
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 64)
    e = build_backbone("mbf", embedding_size=64, head="e", scale=1)
    assert e.features.weight.requires_grad is False and torch.all(e.features.weight == 1)
    with pytest.raises(ModelError, match="unknown head"):
        build_backbone("r18", head="fc")


def test_iresnet_feature_scale_frozen_like_arcface():
    model = build_backbone("r18")
    assert model.features.weight.requires_grad is False
    assert torch.all(model.features.weight == 1.0)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["features.weight"]


def test_small_mbf_variant():
    small = build_backbone("mbf", blocks=(1, 2, 2, 1), scale=1)
    full = build_backbone("mbf")
    n_small, n_full = (sum(p.numel() for p in m.parameters()) for m in (small, full))
    assert n_small < 0.5 * n_full
    with torch.no_grad():
        assert small.eval()(_batch()).shape == (2, 512)


def test_vit_masking_restores_mask_token():
    """In training, int(N * (1 - r)) tokens are kept and the rest are the learned mask token, in place."""
    model = build_backbone("vit_t", embedding_size=D, mask_ratio=0.25, drop_path_rate=0.0).train()
    with torch.no_grad():
        tokens = model.forward_features(_batch()).reshape(2, model.num_patches, model.embed_dim)
    is_mask = (tokens == model.mask_token[0]).all(dim=-1)
    assert is_mask.sum(dim=1).tolist() == [144 - int(144 * 0.75)] * 2
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(_batch()).reshape(2, 144, -1)
    assert not (tokens == model.mask_token[0]).all(dim=-1).any()


def test_timm_backbone_needs_extra():
    try:
        model = build_backbone("timm:resnet18", embedding_size=D)
    except DependencyError as exc:
        assert "torchvision" in str(exc) or "timm" in str(exc)
        pytest.skip(f"timm extra unavailable: {exc}")
    with torch.no_grad():
        assert model.eval()(_batch()).shape == (2, D)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", _ours())
def test_cuda_channels_last_autocast(name, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = _calibrated(build_backbone(name, embedding_size=D).cuda().to(memory_format=torch.channels_last))
    x = _batch(4).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.float(), ref, dim=1).min() > 0.99
    model.train()
    with torch.autocast("cuda", dtype=dtype):
        loss = model(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
