import json

import numpy as np
import pytest
import torch

from facetrain.clean.bn_finetune import finetune_bn
from facetrain.data.images import encode_image
from facetrain.data.recordio import write_rec_dataset
from facetrain.data.synthetic import make_verification_pairs
from facetrain.errors import ModelError
from facetrain.models import load_backbone


def _shift(images: np.ndarray) -> np.ndarray:
    """A domain shift: dark, low-contrast photos."""
    return (images.astype(np.float32) * 0.35 + 10).astype(np.uint8)


def test_finetune_bn_adapts_to_a_shifted_domain_and_only_moves_running_stats(noisy_data, trained_checkpoint, tmp_path):
    shifted_data = tmp_path / "shifted"
    write_rec_dataset(
        shifted_data,
        ((encode_image(_shift(img), ext=".png"), int(lab)) for img, lab in zip(noisy_data.images, noisy_data.labels)),
    )
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (ood / f"t{i}.png").write_bytes(encode_image(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), ext=".png"))
    images, issame = make_verification_pairs(100, num_identities=30, seed=3)
    report = finetune_bn(
        trained_checkpoint,
        shifted_data,
        tmp_path / "out",
        steps=20,
        save_every=5,
        batch_size=32,
        ood=ood,
        ood_share=0.05,
        noise_share=0.05,
        blur_share=0.05,
        eval_pairs={"shifted": (_shift(np.stack(images)), issame)},
        device="cpu",
    )
    acc = {r["step"]: r["shifted"] for r in report.rows}
    print("BN fine-tuning, shifted-domain accuracy by step:", acc)
    assert list(acc) == [0, 5, 10, 15, 20]
    assert max(acc.values()) >= acc[0] + 0.05  # measured 0.65 -> 0.78; refreshed BN statistics help on the new domain
    best = max(report.rows, key=lambda r: (r["mean_accuracy"], -r["step"]))
    assert report.best_step == best["step"]

    before = load_backbone(trained_checkpoint).state_dict()
    after = load_backbone(tmp_path / "out" / "step_000020.pt").state_dict()
    for key, value in before.items():
        if "running" in key or "num_batches" in key:
            continue
        assert torch.equal(value, after[key]), key  # every learnable parameter frozen
    means = [k for k in before if k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in means)
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert set(table["bn_shift"]) == {k[: -len(".running_mean")] for k in means}
    assert (tmp_path / "out" / "bn_shift.png").is_file() and (tmp_path / "out" / "best.pt").is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_finetune_bn_without_batchnorm_is_a_clear_error(noisy_data, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 4), torch.nn.Flatten(), torch.nn.Linear(4 * 28 * 28, 8))
    path = tmp_path / "nobn.pt"
    torch.jit.script(net).save(str(path))
    with pytest.raises(ModelError, match="no BatchNorm"):
        finetune_bn(path, noisy_data.path, tmp_path / "out", steps=1, device="cpu")
