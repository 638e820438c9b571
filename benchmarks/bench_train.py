"""Training throughput: the Trainer's overhead over a bare loop (CPU), and GPU step rates at arcface_torch scale.

(a) CPU, same process, same model / data / loss / optimizer: ``facetrain.engine.trainer.Trainer`` (hooks, schedule,
    finiteness check, global-norm clipping, metrics) vs a hand-written loop (DataLoader -> normalize -> backbone ->
    PartialFC -> backward -> clip -> SGD). img/s is measured between the end of a warm-up step and the end of the last
    step; the target is an overhead under 5 %. What is timed: every step with the Trainer's built-in hooks (metrics
    writer, progress bar, verification/checkpoint checks), since a user pays those; the clock hook runs last, after
    them. Periodic checkpoints and evaluation are switched off (``output.save_every_steps=0``,
    ``eval.every_steps=0``): they are work the bare loop does not do, and the final checkpoint is written after the
    last step's hooks, outside the window. The two loops run interleaved, alternating which goes first, best of 3.
(b) GPU: ``Trainer.run_step`` itself (the arcface_torch ms1mv2_r50 recipe: ArcFace, SGD, clipping at 5; channels_last,
    fused SGD on CUDA, autocast) on uint8 batches already on the device, so no data loading is timed:
    1. the reference rows against arcface_torch's figures from issue #5 (one H100, iresnet50, batch 128, bf16:
       ~1,450 img/s at 93,431 classes, ~1,000 img/s at 2,000,000 classes with sample_rate 0.1; targets 2x: >= 2,900
       and >= 2,000 img/s), eager and with ``train.compile``, with peak GPU memory;
    2. the largest class count that trains at sample_rate 0.1 (doubling, then bisection to 250k; at most 120 s; memory
       capped at 80 GiB so a bigger card compares with the target of >= 10,000,000 classes on one 80 GB GPU);
    3. the data pipeline alone: a JPEG .rec (generated, or ``--rec``) -> workers decode + flip -> pinned uint8 batches
       on the device, img/s per worker count and the workers 2,900 img/s needs;
    4. a OneFlow-style grid, backbone (r50, r100, mbf) x Partial FC sample_rate (1.0, 0.1) x AMP (bf16, fp16, none)
       x batch (128, 256) at 93,431 classes -> img/s and peak GPU memory.
    Sections stop being started after ``--budget-s`` (500 s): the whole of (b) fits in one 10-minute command.
    ``--dry-run`` runs every path of (b) at toy sizes (batch 2, 1,000-20,000 classes, one timed step, a 1 GiB
    simulated memory cap for the search), on the CPU or a GPU, to catch bugs before spending GPU time.

    python benchmarks/bench_train.py --quick                              # (a) only, under a minute
    python benchmarks/bench_train.py                                      # (a), then (b) when CUDA is available
    python benchmarks/bench_train.py --gpu-only --device cpu --dry-run --no-compile   # (b)'s paths on a CPU, ~3 min
    python benchmarks/bench_train.py --gpu-only --device cpu --dry-run    # plus compiling r50 on the CPU: ~8 min
    python benchmarks/bench_train.py --gpu-only --dry-run                 # on a GPU: check the paths first, ~1 min

The one command for a GPU session (H100; it stops starting work after 500 s, so it ends within 10 minutes):

    python benchmarks/bench_train.py --gpu-only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

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
# (b) GPU: the Trainer's own step at arcface_torch scale

# arcface_torch on one H100, iresnet50, batch 128, bf16 (issue #5): img/s, and the targets facetrain must reach.
REFERENCE_ROWS = [
    # (Scale attribute with the class count: 93,431 (MS1MV3) / 2,000,000 on a GPU, sample_rate, arcface_torch img/s,
    #  target img/s = 2x)
    ("classes", 1.0, 1_450, 2_900),
    ("many_classes", 0.1, 1_000, 2_000),
]
TARGET_LARGEST_CLASSES = 10_000_000  # at sample_rate 0.1 on one 80 GB GPU
TARGET_PIPELINE_RATE = 2_900  # img/s the data pipeline must feed one GPU
GIB = 2**30


@dataclass(frozen=True)
class Scale:
    """Sizes of part (b). ``gpu()`` is the real benchmark; ``dry_run()`` runs every code path at toy sizes."""

    classes: int  # the MS1MV3-sized head
    many_classes: int  # the 2M head
    batch: int  # batch of the reference rows and the class-count search
    grid_backbones: tuple[str, ...]
    grid_sample_rates: tuple[float, ...]
    grid_amps: tuple[str, ...]
    grid_batches: tuple[int, ...]
    steps: int  # timed steps per row
    warmup: int  # untimed steps first (compilation, cuDNN autotuning, allocator warm-up)
    scaler_warmup: int  # fp16: at most this many more, until GradScaler stops skipping steps
    search_start: int  # class-count search: first probe, doubled until a probe runs out of memory
    search_limit: int  # never probe above this
    search_tolerance: int  # bisection stops when the bracket is this narrow
    search_seconds: float  # and when this much time went into the search
    pipeline_images: int  # records in the generated JPEG .rec
    pipeline_unique: int  # distinct rendered faces among them (rendering is slow; decoding cost is per record)
    pipeline_workers: tuple[int, ...]
    pipeline_seconds: float  # timed window per worker count

    @staticmethod
    def gpu() -> Scale:
        workers = sorted({1, 2, 4, 8, max(1, min(16, (os.cpu_count() or 2) - 2))})
        return Scale(
            classes=93_431,
            many_classes=2_000_000,
            batch=128,
            grid_backbones=("r50", "r100", "mbf"),
            grid_sample_rates=(1.0, 0.1),
            grid_amps=("bf16", "fp16", "none"),
            grid_batches=(128, 256),
            steps=20,
            warmup=3,
            scaler_warmup=30,
            search_start=2_000_000,
            search_limit=64_000_000,
            search_tolerance=250_000,
            search_seconds=120.0,
            pipeline_images=12_800,
            pipeline_unique=2_000,
            pipeline_workers=tuple(workers),
            pipeline_seconds=4.0,
        )

    @staticmethod
    def dry_run() -> Scale:
        return Scale(
            classes=1_000,
            many_classes=20_000,
            batch=2,
            grid_backbones=("r50", "mbf"),  # r100 is r50's code with more blocks
            grid_sample_rates=(1.0, 0.1),
            grid_amps=("bf16", "fp16", "none"),
            grid_batches=(2,),
            steps=1,
            warmup=1,
            scaler_warmup=1,  # fp16 on a CPU runs at well under 1 img/s
            search_start=10_000,
            search_limit=1_000_000,
            search_tolerance=10_000,
            search_seconds=60.0,
            pipeline_images=256,
            pipeline_unique=32,
            pipeline_workers=(0, 1, 2),
            pipeline_seconds=1.0,
        )


@dataclass
class StepRate:
    images_per_sec: float
    peak_gib: float  # CUDA: max_memory_allocated; CPU: parameters + gradients + optimizer state (no allocator stats)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def bench_config(
    device: torch.device,
    backbone: str,
    classes: int,
    sample_rate: float,
    amp: str,
    batch: int,
    *,
    compile_model: bool,
    out_dir: str,
):
    """The arcface_torch ms1mv2_r50 recipe (ArcFace s=64 m=0.5, SGD 0.1 momentum 0.9, clip 5) on synthetic labels."""
    from facetrain.config import load_config

    return load_config(
        "ms1mv2_r50",
        [
            "data.path=null",
            "data.val_bins=[]",
            f"data.synthetic.num_identities={classes}",
            "data.synthetic.images_per_identity=1",
            "data.synthetic.val_identities=0",
            "data.num_workers=0",
            f"model.backbone={backbone}",
            "model.channels_last=true",
            f"loss.sample_rate={sample_rate}",
            f"train.amp={amp}",
            f"train.batch_size={batch}",
            f"train.compile={str(compile_model).lower()}",
            f"train.device={device}",
            "train.max_steps=100000",
            "eval.every_steps=0",
            "output.save_every_steps=0",
            f"output.dir={out_dir}",
        ],
    )


@contextlib.contextmanager
def centres_drawn_on(device: torch.device):
    """Partial FC draws its initial centres on the CPU in seeded blocks (~3.5 s and 2 GiB of host memory per million
    classes at D=512), then copies them over: too slow for a search that builds heads of 10M+ classes several times.
    Here they are drawn on the device (other values, same distribution, same training cost)."""
    from facetrain.heads import partial_fc

    def on_device(class_ids: torch.Tensor, k: int, d: int, std: float, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        out = torch.empty((class_ids.numel() * k, d), dtype=torch.get_default_dtype(), device=device)
        return out.normal_(0.0, std, generator=generator)

    with mock.patch.object(partial_fc, "_initial_centres", on_device):
        yield


def measure_steps(
    config, *, steps: int, warmup: int, scaler_warmup: int = 30, memory_limit: float | None = None
) -> StepRate:
    """img/s of ``Trainer.run_step`` (the exact training step: schedule, autocast, backbone, Partial FC, backward,
    finiteness check, global clipping, fused optimizer) on uint8 batches already on the device (no data loading).

    Raises:
        torch.OutOfMemoryError: the device ran out of memory; on a CPU dry run, the training state outgrew
            ``memory_limit`` bytes (a CPU has no allocator limit to hit, so the search's OOM path is simulated).
    """
    from facetrain.engine.trainer import Trainer

    device = torch.device(config.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with centres_drawn_on(device):
        trainer = Trainer(config, progress=False)
    batch, classes = trainer.batch_size, trainer.num_classes
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        (
            torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, device=device, generator=generator),
            torch.randint(0, classes, (batch,), device=device, generator=generator),
        )
        for _ in range(4)
    ]
    stream = itertools.cycle(batches)
    trainer.raw_backbone.train()
    trainer.head.train()

    def run(n: int) -> None:
        for _ in range(n):
            trainer.run_step(stream)
            trainer.step += 1

    run(warmup)
    # fp16: GradScaler starts at 2^16 and skips the optimizer step while it halves the scale after overflows; time
    # the steady state (steps that update the weights), not those skipped steps.
    for _ in range(scaler_warmup if trainer.scaler.is_enabled() else 0):
        scale = trainer.scaler.get_scale()
        run(1)
        if trainer.scaler.get_scale() >= scale:
            break
    _synchronize(device)
    started = time.perf_counter()
    run(steps)
    _synchronize(device)
    rate = steps * batch / (time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _state_bytes(trainer)
        if memory_limit is not None and peak > memory_limit:
            raise torch.OutOfMemoryError(f"simulated on CPU: {peak / GIB:.2f} GiB > {memory_limit / GIB:.2f} GiB")
    return StepRate(rate, peak / GIB)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(trainer) -> int:
    """Bytes of parameters, gradients and optimizer state (what grows with the class count)."""
    tensors: dict[int, torch.Tensor] = {}
    for p in [*trainer.raw_backbone.parameters(), *trainer.head.parameters()]:
        tensors[id(p)] = p
        if p.grad is not None:
            tensors[id(p.grad)] = p.grad
    for state in trainer.optimizer.state.values():
        tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _is_oom(exc: BaseException) -> bool:
    # cuBLAS/cuDNN workspace failures surface as plain RuntimeErrors, not torch.OutOfMemoryError.
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "ALLOC_FAILED" in str(exc))
    )


def _release(device: torch.device) -> None:
    """Free what the last row left (its Trainer, an OOM traceback's frames) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_measure(config, **kwargs) -> StepRate | None:
    """:func:`measure_steps`, or None when it ran out of memory (memory released either way)."""
    device = torch.device(config.train.device)
    try:
        return measure_steps(config, **kwargs)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        return None
    finally:
        _release(device)


@dataclass
class SearchResult:
    largest_fit: int  # 0 when even the first probe failed
    smallest_oom: int | None  # None when nothing ran out of memory up to the limit
    probes: list[tuple[int, str]]
    stopped: str  # why the search ended


def largest_class_count(probe, *, start: int, limit: int, tolerance: int, seconds: float) -> SearchResult:
    """Largest class count for which ``probe(classes) -> bool`` holds (a training step fits in memory): doubling
    from ``start`` until a probe fails or ``limit``, then bisection to ``tolerance``; never longer than ``seconds``
    (checked before each probe: one probe may overrun it)."""
    deadline = _Deadline(seconds)
    fit, oom = 0, None
    probes: list[tuple[int, str]] = []
    classes = start
    while True:
        if deadline.left() <= 0:
            return SearchResult(fit, oom, probes, "time limit")
        ok = probe(classes)
        probes.append((classes, "fits" if ok else "OOM"))
        if ok:
            fit = classes
        else:
            oom = classes
        if oom is None:
            if classes >= limit:
                return SearchResult(fit, oom, probes, f"reached the search limit {limit:,}")
            classes = min(2 * classes, limit)
        elif oom - fit <= tolerance:
            return SearchResult(fit, oom, probes, f"bracket within {tolerance:,}")
        else:
            classes = (fit + oom) // 2


def run_gpu_part(
    device: torch.device,
    scale: Scale,
    *,
    compile_model: bool,
    budget_s: float,
    rec: str | None,
    search_gib: float | None,
) -> None:
    """Part (b): reference rows vs arcface_torch, the class-count search, the data pipeline, the OneFlow-style grid.
    Sections past ``budget_s`` are skipped (and say so), so one command fits the device's time limit."""
    deadline = _Deadline(budget_s)
    out_dir = tempfile.mkdtemp(prefix="facetrain_bench_gpu_")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, dry run)"
    total = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    memory = f", {total:.0f} GiB" if total else ""
    peak_label = "peak GiB" if device.type == "cuda" else "state GiB"
    print(f"\n### (b) {name}{memory}: Trainer.run_step on on-device uint8 batches, channels_last, fused SGD on CUDA\n")

    def config(backbone, classes, rate, amp, batch, compiled=False):
        return bench_config(device, backbone, classes, rate, amp, batch, compile_model=compiled, out_dir=out_dir)

    timing = {"steps": scale.steps, "warmup": scale.warmup, "scaler_warmup": scale.scaler_warmup}

    # 1. The figures to beat.
    print(
        f"| setting (bf16, batch {scale.batch}) | arcface_torch img/s (H100) | target | facetrain eager | "
        f"facetrain compile | {peak_label} | best vs arcface_torch | target met |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for key, rate, reference, target in REFERENCE_ROWS:
        classes = getattr(scale, key)
        eager = try_measure(config("r50", classes, rate, "bf16", scale.batch), **timing)
        compiled = None
        if compile_model and deadline.left() > 0:
            compiled = try_measure(config("r50", classes, rate, "bf16", scale.batch, compiled=True), **timing)
        best = max((r for r in (eager, compiled) if r is not None), key=lambda r: r.images_per_sec, default=None)
        cells = [_rate(eager), _rate(compiled) if compile_model else "off", f"{best.peak_gib:.1f}" if best else "-"]
        speedup = f"{best.images_per_sec / reference:.2f}x" if best else "-"
        met = ("yes" if best.images_per_sec >= target else "no") if best else "-"
        if device.type != "cuda":
            speedup, met = f"({speedup}: dry run)", "-"
        print(
            f"| r50, {classes:,} classes, sample_rate {rate} | {reference:,} | >= {target:,} | {' | '.join(cells)} "
            f"| {speedup} | {met} |"
        )

    torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the memory search

    # 2. The largest class count that trains (sample_rate 0.1, r50, bf16), compared at 80 GB.
    limit = None
    if device.type == "cuda":
        cap = (search_gib or 80.0) * GIB  # the target is stated for an 80 GB card: a larger one is capped to it
        if cap < torch.cuda.get_device_properties(device).total_memory:
            torch.cuda.set_per_process_memory_fraction(
                cap / torch.cuda.get_device_properties(device).total_memory, device
            )
    else:
        limit = (search_gib or 1.0) * GIB

    def fits(classes: int) -> bool:
        result = try_measure(config("r50", classes, 0.1, "bf16", scale.batch), steps=1, warmup=1, memory_limit=limit)
        return result is not None

    seconds = min(scale.search_seconds, max(0.0, deadline.left() - 60))
    search = largest_class_count(
        fits, start=scale.search_start, limit=scale.search_limit, tolerance=scale.search_tolerance, seconds=seconds
    )
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    cap_text = f"{search_gib or 80:.0f} GiB" if device.type == "cuda" else f"a simulated {limit / GIB:.1f} GiB"
    print(
        f"\nLargest class count that trains (r50, batch {scale.batch}, bf16, sample_rate 0.1, {cap_text}): "
        f"{search.largest_fit:,}"
        + (f" (OOM at {search.smallest_oom:,})" if search.smallest_oom else "")
        + f"; target >= {TARGET_LARGEST_CLASSES:,}: "
        + ("-" if device.type != "cuda" else "met" if search.largest_fit >= TARGET_LARGEST_CLASSES else "not met")
        + f". Search stopped: {search.stopped}; probes: "
        + ", ".join(f"{c:,} {r}" for c, r in search.probes)
    )

    # 3. The data pipeline alone: JPEG .rec -> decode -> flip -> uint8 batches on the device.
    if deadline.left() > 0:
        run_pipeline(device, scale, rec)
    else:
        print("\n(data pipeline skipped: time budget)")

    # 4. OneFlow-style grid (eager; rows past the time budget are listed as skipped).
    print(f"\n| backbone | classes | Partial FC sample_rate | AMP | batch | img/s | {peak_label} |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for backbone, rate, amp, batch in itertools.product(
        scale.grid_backbones, scale.grid_sample_rates, scale.grid_amps, scale.grid_batches
    ):
        row = f"| {backbone} | {scale.classes:,} | {rate} | {amp} | {batch} |"
        if deadline.left() <= 0:
            print(f"{row} skipped (time budget) | - |")
            continue
        result = try_measure(config(backbone, scale.classes, rate, amp, batch), **timing)
        print(f"{row} {_rate(result)} | {f'{result.peak_gib:.1f}' if result else '-'} |")


def _rate(result: StepRate | None) -> str:
    return "OOM" if result is None else f"{result.images_per_sec:,.0f}"


def run_pipeline(device: torch.device, scale: Scale, rec: str | None) -> None:
    """img/s of ``build_train_loader`` (flip, batch 128, pinned memory on CUDA) from a JPEG .rec into device memory,
    per worker count: the rate one GPU can be fed at, and how many workers ``TARGET_PIPELINE_RATE`` needs."""
    import cv2

    from facetrain.data import open_dataset
    from facetrain.data.loader import ResumableDistributedSampler, build_train_loader

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="facetrain_bench_rec_") as tmp:
        source = rec or _write_jpeg_rec(Path(tmp) / "rec", scale.pipeline_images, scale.pipeline_unique)
        dataset = open_dataset(source)
        batch = min(128, len(dataset) // 4)
        what = rec or f"{len(dataset):,} synthetic 112x112 JPEG q95 faces (pass --rec for a real dataset)"
        print(f"\n| data pipeline ({what}, flip, batch {batch}) | img/s | img/s per worker |")
        print("|---|---:|---:|")
        per_worker = []
        for workers in scale.pipeline_workers:
            sampler = ResumableDistributedSampler(len(dataset), seed=0)
            loader = build_train_loader(
                dataset,
                batch_size=batch,
                sampler=sampler,
                num_workers=workers,
                augment="flip",
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
                seed=0,
            )
            images, started, epoch = 0, None, 0
            while started is None or time.perf_counter() - started < scale.pipeline_seconds:
                sampler.set_epoch(epoch)
                for images_batch, _labels in loader:
                    images_batch.to(device, non_blocking=True)
                    if started is None:  # worker start-up excluded
                        _synchronize(device)
                        started = time.perf_counter()
                        continue
                    images += len(images_batch)
                    if time.perf_counter() - started >= scale.pipeline_seconds:
                        break
                epoch += 1
            _synchronize(device)
            rate = images / (time.perf_counter() - started)
            per_worker.append(rate / max(workers, 1))
            print(f"| {workers} worker(s) | {rate:,.0f} | {rate / max(workers, 1):,.0f} |")
            del loader
        need = math.ceil(TARGET_PIPELINE_RATE / max(per_worker[-1], 1e-9))
        print(
            f"\nFeeding {TARGET_PIPELINE_RATE:,} img/s takes about {need} workers at the per-worker rate of the last "
            f"row ({os.cpu_count()} CPUs here)."
        )


def _write_jpeg_rec(folder: Path, count: int, unique: int) -> str:
    from facetrain.data.images import encode_image
    from facetrain.data.recordio import write_rec_dataset
    from facetrain.data.synthetic import SyntheticIdentities

    faces = SyntheticIdentities(max(unique // 4, 1), 4, seed=0)
    encoded = [encode_image(faces[i][0], ext=".jpg", quality=95) for i in range(min(unique, len(faces)))]
    # Labels grouped (insightface layout); a record's decode cost does not depend on its label.
    per_class = 16
    write_rec_dataset(folder, ((encoded[i % len(encoded)], i // per_class) for i in range(count)))
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU part (a) only, few steps (under a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for part (a)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU part (a)")
    parser.add_argument("--device", default="auto", help="part (b) device: auto (cuda when available), cuda, cpu")
    parser.add_argument("--dry-run", action="store_true", help="part (b) at toy sizes: every code path in minutes")
    parser.add_argument("--no-compile", action="store_true", help="part (b) without the torch.compile column")
    parser.add_argument("--budget-s", type=float, default=500.0, help="part (b) stops starting work after this")
    parser.add_argument("--rec", default=None, help="data pipeline: a real train.rec folder instead of a generated one")
    parser.add_argument(
        "--search-gib",
        type=float,
        default=None,
        help="class-count search memory cap (default: 80 GiB on CUDA, as the target; 1 GiB simulated on a CPU dry run)",
    )
    args = parser.parse_args()
    print("## bench_train")
    if not args.gpu_only:
        run_cpu(args.quick, args.threads)
    if args.quick:
        return
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if device.type == "cpu" and not args.dry_run:
        print("\n(no CUDA device: part (b) skipped; --device cpu --dry-run runs its code paths at toy sizes)")
        return
    scale = Scale.dry_run() if args.dry_run else Scale.gpu()
    run_gpu_part(
        device,
        scale,
        compile_model=not args.no_compile,
        budget_s=args.budget_s,
        rec=args.rec,
        search_gib=args.search_gib,
    )


if __name__ == "__main__":
    main()
