"""``facetrain demo``: synthetic identities -> real ``train.rec`` + verification ``.bin`` -> train -> verify.

The whole pipeline a user would run on real data, shrunk to fit a 2-core CPU in a few minutes:

1. render ``data.synthetic.num_identities x images_per_identity`` synthetic faces
   (:class:`facetrain.data.synthetic.SyntheticIdentities`) and write them as JPEGs into a RecordIO ``train.rec``;
2. render verification pairs from *held-out* identities and write them as ``synthetic_val.bin``;
3. train (:func:`facetrain.engine.trainer.train`) reading the ``.rec`` back through ``open_dataset``;
4. report the 10-fold verification accuracy on the ``.bin`` before the first step and after the last one.

Settings come from the ``demo_cpu`` preset; its backbone is ``demo_cnn`` (:mod:`facetrain.models.democnn`), a plain
4-stage CNN that is ~10x cheaper per image on a CPU than the smallest MobileFaceNet, so the demo shows real learning
within its time budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo", "QUICK_OVERRIDES"]

#: Overrides of ``--quick`` (tests): a few dozen steps on few identities.
QUICK_OVERRIDES = (
    "data.synthetic.num_identities=40",
    "data.synthetic.images_per_identity=12",
    "data.synthetic.val_identities=40",
    "data.synthetic.val_pairs=200",
    "train.batch_size=32",
    "train.max_steps=60",
)


@dataclass
class DemoResult:
    """Outcome of :func:`run_demo`; accuracies are 10-fold verification accuracy on held-out identities.

    Attributes:
        accuracy_before: accuracy of the untrained network (step 0).
        accuracy_after: accuracy after the last step.
        steps: optimizer steps.
        images_per_sec: training throughput.
        train_seconds: training loop wall time (excluding evaluation).
        total_seconds: wall time of the whole demo.
        num_identities: training identities.
        num_images: training images.
        val_pairs: verification pairs (half genuine).
        final_loss: mean training loss over the last logged steps.
        out_dir, rec_dir, bin_path, run_dir, checkpoint_path, metrics_path, config_path: where the outputs are.
    """

    accuracy_before: float
    accuracy_after: float
    steps: int
    images_per_sec: float
    train_seconds: float
    total_seconds: float
    num_identities: int
    num_images: int
    val_pairs: int
    final_loss: float
    out_dir: Path
    rec_dir: Path
    bin_path: Path
    run_dir: Path
    checkpoint_path: Path
    metrics_path: Path
    config_path: Path


def run_demo(
    out_dir: str | Path = "facetrain_demo",
    *,
    steps: int | None = None,
    quick: bool = False,
    overrides: Sequence[str] = (),
    progress: bool | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Run the demo pipeline into ``out_dir`` (``data/`` with train.rec + synthetic_val.bin, ``run/`` with outputs).

    Args:
        out_dir: output folder (created; existing demo files in it are replaced).
        steps: optimizer steps (default: the preset's ``train.max_steps``).
        quick: a few dozen steps on few identities (for tests; still shows learning).
        overrides: extra ``a.b=value`` config overrides, applied last.
        progress: tqdm bar; None = when stderr is a terminal.
        threads: torch intra-op threads while the demo runs (restored after); None = leave torch's setting. One
            thread is the robust default: on a busy machine two OpenMP threads that wait on each other's barriers
            ran this network ~5x slower than one (measured); on an idle multi-core machine more threads are faster.

    Returns:
        DemoResult.
    """
    from facetrain.config import load_config
    from facetrain.data.bins import write_bin
    from facetrain.data.images import encode_image
    from facetrain.data.recordio import write_rec_dataset
    from facetrain.data.synthetic import SyntheticIdentities, make_verification_pairs
    from facetrain.engine.trainer import SYNTHETIC_VAL_OFFSET, train

    started = time.perf_counter()
    out = Path(out_dir)
    rec_dir, run_dir = out / "data", out / "run"
    all_overrides = list(QUICK_OVERRIDES if quick else ()) + ([f"train.max_steps={steps}"] if steps else [])
    config = load_config("demo_cpu", all_overrides + list(overrides))
    syn, size = config.data.synthetic, config.data.image_size

    train_set = SyntheticIdentities(syn.num_identities, syn.images_per_identity, seed=syn.seed, image_size=size)
    samples = (
        (encode_image(train_set[i][0], ext=".jpg", quality=95), label)
        for i, label in enumerate(train_set.labels().tolist())
    )
    write_rec_dataset(rec_dir, samples, image_size=(size, size), num_classes=syn.num_identities)
    logger.info("wrote %d synthetic faces of %d identities to %s", len(train_set), syn.num_identities, rec_dir)

    images, issame = make_verification_pairs(
        syn.val_pairs - syn.val_pairs % 2,
        num_identities=syn.val_identities,
        seed=syn.seed,
        identity_offset=SYNTHETIC_VAL_OFFSET,
        image_size=size,
    )
    bin_path = rec_dir / "synthetic_val.bin"
    write_bin(bin_path, images, issame)
    logger.info(
        "wrote %d verification pairs of %d held-out identities to %s", len(issame), syn.val_identities, bin_path
    )

    config.data.path = str(rec_dir)
    config.data.val_bins = [str(bin_path)]
    config.output.dir = str(run_dir)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(config, evaluate_at_start=True, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    name = bin_path.stem
    return DemoResult(
        accuracy_before=float(result.evaluations[0][name]),
        accuracy_after=float(result.evaluations[-1][name]),
        steps=result.steps,
        images_per_sec=result.images_per_sec,
        train_seconds=result.seconds,
        total_seconds=time.perf_counter() - started,
        num_identities=result.num_classes,
        num_images=result.num_images,
        val_pairs=len(issame),
        final_loss=result.final_loss,
        out_dir=out,
        rec_dir=rec_dir,
        bin_path=bin_path,
        run_dir=run_dir,
        checkpoint_path=result.checkpoint_path,
        metrics_path=result.metrics_path,
        config_path=run_dir / "config.yaml",
    )
