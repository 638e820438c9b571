"""Training throughput: the Trainer's overhead over a bare loop (CPU), and GPU step rates at arcface_torch scale.

(a) CPU, same process, same model / data / loss / optimizer: ``facetrain.engine.trainer.Trainer`` (hooks, schedule,
    finiteness check, global-norm clipping, metrics) vs a hand-written loop (DataLoader -> normalize -> backbone ->
    PartialFC -> backward -> clip -> SGD). img/s is measured between the end of a warm-up step and the end of the last
    step; the target is an overhead under 5 %. What is timed: every step with the Trainer's built-in hooks (metrics
    writer, progress bar, verification/checkpoint checks), since a user pays those; the clock hook runs last, after
    them. Periodic checkpoints and evaluation are switched off (``output.save_every_steps=0``,
    ``eval.every_steps=0``): they are work the bare loop does not do, and the final checkpoint is written after the
    last step's hooks, outside the window. The two loops run interleaved, alternating which goes first, best of 3.
(b) GPU (when CUDA is available): synthetic uint8 batches generated on the device (no data loading), bf16 autocast,
    channels_last, optional ``torch.compile``, fused SGD: img/s and peak memory for a OneFlow-style table
    (backbone x Partial FC x AMP x batch), including 2,000,000 classes at sample_rate 0.1 and a search for the largest
    class count that fits at sample_rate 0.1.

    python benchmarks/bench_train.py --quick           # CPU part only, under a minute
    python benchmarks/bench_train.py                   # CPU part, longer; plus the GPU table on a CUDA machine
    python benchmarks/bench_train.py --gpu-only --no-compile
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

# ---------------------------------------------------------------------------------------------------------------------
# (a) CPU: Trainer vs bare loop


def cpu_overrides(steps: int, width: int, batch: int) -> list[str]:
    return [
        "data.synthetic.num_identities=64",
        "data.synthetic.images_per_identity=8",
        "data.synthetic.val_identities=0",
        "data.num_workers=0",
        "data.augment=flip",
        f"model.backbone_kwargs={{width: {width}}}",
        "model.embedding_size=128",
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.log_every=10",
        "eval.every_steps=0",
        "output.save_every_steps=0",
        f"output.dir={tempfile.mkdtemp(prefix='facetrain_bench_train_')}",
    ]


class _Clock:
    """Hook: time stamp after every step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def before_train(self, trainer) -> None: ...
    def after_train(self, trainer) -> None: ...
    def write(self, record) -> None: ...
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None: ...

    def after_step(self, trainer) -> None:
        self.stamps.append(time.perf_counter())


def trainer_rate(config, warmup: int) -> float:
    from facetrain.engine.trainer import Trainer

    clock = _Clock()
    Trainer(config, extra_hooks=[clock], progress=False).train()
    steps = len(clock.stamps) - warmup
    return steps * config.train.batch_size / (clock.stamps[-1] - clock.stamps[warmup - 1])


def bare_rate(config, warmup: int) -> float:
    """The same work without the Trainer: what a user would write by hand."""
    from facetrain.data.loader import ResumableDistributedSampler, build_train_loader
    from facetrain.engine.trainer import build_dataset, build_loss_margin, build_model, normalize_images
    from facetrain.heads.partial_fc import PartialFC

    torch.manual_seed(config.train.seed)
    dataset = build_dataset(config)
    sampler = ResumableDistributedSampler(len(dataset), seed=config.train.seed)
    loader = build_train_loader(
        dataset, batch_size=config.train.batch_size, sampler=sampler, num_workers=0, augment="flip"
    )
    model = build_model(config)
    head = PartialFC(
        config.model.embedding_size, dataset.num_classes, margin=build_loss_margin(config), seed=config.train.seed
    )
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=config.optim.lr, momentum=0.9, weight_decay=config.optim.weight_decay)
    stamps: list[float] = []
    epoch = 0
    while len(stamps) < config.train.max_steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            x = normalize_images(images).contiguous(memory_format=torch.channels_last)
            loss = head(model(x), labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad_norm)
            opt.step()
            stamps.append(time.perf_counter())
            if len(stamps) == config.train.max_steps:
                break
        epoch += 1
    steps = len(stamps) - warmup
    return steps * config.train.batch_size / (stamps[-1] - stamps[warmup - 1])


def run_cpu(quick: bool, threads: int) -> None:
    from facetrain.config import load_config

    torch.set_num_threads(threads)
    steps, warmup, width, batch = (12, 2, 8, 32) if quick else (60, 5, 16, 64)
    config = load_config("demo_cpu", cpu_overrides(steps, width, batch))
    rates: dict[str, list[float]] = {"bare loop": [], "Trainer": []}
    runners = {"bare loop": bare_rate, "Trainer": trainer_rate}
    for repeat in range(1 if quick else 3):  # interleaved repeats; best of each (a shared machine only slows runs down)
        for name in sorted(runners, reverse=repeat % 2 == 1):  # alternate which loop goes first
            rates[name].append(runners[name](config, warmup))
    bare = max(rates["bare loop"])
    print(f"\n### (a) CPU: Trainer vs bare loop (demo_cnn width {width}, batch {batch}, {threads} thread(s))\n")
    print("| loop | img/s | overhead |")
    print("|---|---:|---:|")
    for name, values in rates.items():
        best = max(values)
        print(f"| {name} | {best:.1f} | {100 * (bare / best - 1):+.1f} % |")


# ---------------------------------------------------------------------------------------------------------------------
# (b) GPU


def gpu_measure(
    backbone: str, num_classes: int, sample_rate: float, batch: int, amp: str, compile_model: bool, steps: int
) -> tuple[float, float]:
    """img/s and peak GiB of full training steps on synthetic on-device batches."""
    from facetrain.engine.trainer import clip_global_grad_norm, normalize_images
    from facetrain.heads import build_margin
    from facetrain.heads.partial_fc import PartialFC
    from facetrain.models import build_backbone

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_backbone(backbone, embedding_size=512).to(device, memory_format=torch.channels_last)
    head = PartialFC(512, num_classes, margin=build_margin("arcface"), sample_rate=sample_rate).to(device)
    optimizer = torch.optim.SGD(
        [*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    )
    forward = torch.compile(model) if compile_model else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        x = normalize_images(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            emb = forward(x)
        loss = head(emb.float(), labels).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_global_grad_norm(list(model.parameters()), [head.weight], 5.0)
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return rate, peak


def largest_fitting_classes(backbone: str, batch: int, amp: str, sample_rate: float = 0.1) -> int:
    """Doubling then bisection on the class count until a training step runs out of memory."""

    def fits(classes: int) -> bool:
        try:
            gpu_measure(backbone, classes, sample_rate, batch, amp, False, steps=1)
            return True
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    low, high = 1_000_000, 2_000_000
    while fits(high):
        low, high = high, high * 2
    while high - low > 250_000:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def run_gpu(compile_model: bool, steps: int) -> None:
    name = torch.cuda.get_device_name()
    print(f"\n### (b) GPU: {name}, synthetic on-device batches, fused SGD, channels_last, compile={compile_model}\n")
    print("| backbone | classes | Partial FC sample_rate | AMP | batch | img/s | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    rows = [
        ("r50", 93_431, 1.0, "bf16", 128),
        ("r50", 93_431, 1.0, "none", 128),
        ("r50", 93_431, 0.1, "bf16", 128),
        ("r50", 2_000_000, 0.1, "bf16", 128),
        ("r100", 93_431, 1.0, "bf16", 128),
        ("mbf", 93_431, 1.0, "bf16", 512),
    ]
    for backbone, classes, rate, amp, batch in rows:
        try:
            speed, peak = gpu_measure(backbone, classes, rate, batch, amp, compile_model, steps)
            print(f"| {backbone} | {classes:,} | {rate} | {amp} | {batch} | {speed:.0f} | {peak:.1f} |")
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| {backbone} | {classes:,} | {rate} | {amp} | {batch} | OOM | - |")
    largest = largest_fitting_classes("r50", 128, "bf16")
    print(f"\nLargest class count that trains with r50, batch 128, bf16, sample_rate 0.1: about {largest:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU part only, few steps (under a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for part (a)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    parser.add_argument("--no-compile", action="store_true", help="GPU part without torch.compile")
    parser.add_argument("--gpu-steps", type=int, default=30, help="timed steps per GPU row")
    args = parser.parse_args()
    print("## bench_train")
    if not args.gpu_only:
        run_cpu(args.quick, args.threads)
    if torch.cuda.is_available() and not args.quick:
        run_gpu(not args.no_compile, args.gpu_steps)
    elif not args.quick:
        print("\n(no CUDA device: GPU table skipped)")


if __name__ == "__main__":
    main()
