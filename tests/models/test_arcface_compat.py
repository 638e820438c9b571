"""arcface_torch compatibility: key layout as checked-in data, and an independent re-derivation of the block math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from facetrain.models import build_backbone, load_backbone
from facetrain.models.iresnet import IBasicBlock

DATA = Path(__file__).parent / "data"


def _read_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",") if s)))
    return rows


LAYOUTS = [("iresnet50_keys.txt", "r50", {}), ("mbf_keys.txt", "mbf", {})]


@pytest.mark.parametrize(("data_file", "name", "kwargs"), LAYOUTS)
def test_state_dict_layout_equals_arcface(data_file, name, kwargs):
    expected = _read_layout(data_file)
    with torch.device("meta"):
        model = build_backbone(name, **kwargs)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == expected  # same keys, same shapes, same registration order


@pytest.mark.parametrize(("data_file", "name", "kwargs"), LAYOUTS)
def test_synthetic_arcface_state_dict_loads_strict(data_file, name, kwargs, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _read_layout(data_file):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    model = build_backbone(name, **kwargs)
    model.load_state_dict(state, strict=True)
    # The same dict saved as arcface_torch does (bare state dict, DDP prefix) loads with the architecture inferred.
    path = tmp_path / "backbone.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = load_backbone(path)
    assert type(loaded) is type(model)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def _reference_block(x, p, stride, eps, training):
    """IBasicBlock forward from the paper / arcface_torch description, in functional ops:
    BN1 -> conv3x3 -> BN2 -> PReLU -> conv3x3(stride) -> BN3, plus identity or conv1x1(stride)+BN."""

    def bn(t, prefix):
        return F.batch_norm(
            t, p[f"{prefix}.running_mean"].clone(), p[f"{prefix}.running_var"].clone(),
            p[f"{prefix}.weight"], p[f"{prefix}.bias"], training=training, eps=eps,
        )  # fmt: skip

    out = bn(x, "bn1")
    out = F.conv2d(out, p["conv1.weight"], padding=1)
    out = bn(out, "bn2")
    out = torch.where(out >= 0, out, p["prelu.weight"].view(1, -1, 1, 1) * out)
    out = F.conv2d(out, p["conv2.weight"], stride=stride, padding=1)
    out = bn(out, "bn3")
    if "downsample.0.weight" in p:
        shortcut = bn(F.conv2d(x, p["downsample.0.weight"], stride=stride), "downsample.1")
    else:
        shortcut = x
    return out + shortcut


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(16, 16, 1), (8, 16, 2)])
def test_ibasicblock_matches_independent_formula(cin, cout, stride, training):
    torch.manual_seed(0)
    downsample = None
    if stride != 1 or cin != cout:
        downsample = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(cout, eps=1e-5)
        )
    block = IBasicBlock(cin, cout, stride, downsample).double()
    with torch.no_grad():  # non-trivial BN affine / statistics and PReLU slopes
        for name, t in block.state_dict().items():
            if name.endswith(("weight", "bias", "running_mean")) and t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.3 + (1.0 if name.endswith("bn1.weight") else 0.0))
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
    params = {k: v.clone() for k, v in block.state_dict().items()}
    block.train(training)
    x = torch.randn(3, cin, 10, 10, dtype=torch.float64)
    expected = _reference_block(x, params, stride, 1e-5, training)
    actual = block(x)
    assert actual.shape == (3, cout, 10 // stride, 10 // stride)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
