"""Partial FC: class centres sharded across ranks, sampled negatives, distributed softmax cross-entropy.

Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021; v2 as in
arcface_torch's ``partial_fc_v2.py``). Each of the W ranks owns the centres of about C/W classes. One step:

1. every rank all-gathers the embeddings (gradient-correct) and labels: the global batch, B_global rows;
2. each rank keeps every class of its shard that is a label of the global batch (a "positive") plus uniformly
   sampled other classes, ``num_sample = int(sample_rate * num_local)`` in all (only the positives if there are more);
3. cosine logits ``clamp(normalize(x) @ normalize(W_sampled).T, -1, 1)``, (B_global, C_sampled) per rank, with a
   max over the K sub-centres of a class when K > 1;
4. the margin turns them into logits (labels of rows whose class lives on another rank are -1);
5. softmax cross-entropy over the classes of ALL ranks: ``loss = -mean_i log p_{i,y_i}``,
   ``p_ij = exp(z_ij - m_i) / sum_over_ranks_and_columns exp(z_ik - m_i)`` with ``m_i`` the global row maximum
   (two all-reduces, MAX then SUM, and one SUM to collect p_{i,y_i} from the rank that holds column y_i).
   The backward pass is the analytic ``dL/dz = (p - onehot(y)) / B_global`` on each rank's own columns.

With ``sample_rate=1`` W ranks give the loss and gradients of one process holding all centres (tested to 1e-6).
Cost per step grows with the sampled classes: only sampled rows of the centres are gathered, normalized and
multiplied; the (B, C_local) logits are never formed when ``sample_rate < 1``. The centre gradient is a dense
(C_local*K, D) tensor like the parameter itself (the optimizer needs that), non-zero on the sampled rows only.

The module also holds the collectives it needs (they are re-exported by :mod:`facetrain.engine.comm`, their public
home; ``heads`` must not import ``engine``). Without a process group everything runs in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facetrain.errors import ModelError, closest
from facetrain.heads.margins import subcenter_max

__all__ = [
    "PartialFC",
    "PartialFCOutput",
    "cosine_logits",
    "distributed_softmax_cross_entropy",
    "sample_centres",
    "shard_class_ids",
    "unit_rows",
]

logger = logging.getLogger(__name__)

SHARDINGS = ("block", "mod")
_INIT_CHUNK = 4096  # classes per independently seeded block of the initial centres


@dataclass
class PartialFCOutput:
    """What :meth:`PartialFC.forward` returns.

    Attributes:
        loss: scalar to back-propagate: distributed cross-entropy + ``aux_loss`` (when the margin has one).
            Identical on every rank.
        logits: (B_global, C_sampled) this rank's margin logits when ``return_logits=True``, else None.
        aux_loss: the margin's auxiliary loss (MagFace's regularizer), already included in ``loss``, or None.
        num_sampled: number of classes of this rank's shard used this step (C_sampled).
        sampled_classes: (C_sampled,) their global class ids, ascending (the logits' column order).
    """

    loss: Tensor
    logits: Tensor | None
    aux_loss: Tensor | None
    num_sampled: int
    sampled_classes: Tensor


class PartialFC(nn.Module):
    """Margin softmax classifier whose class centres are sharded across the ranks of a process group.

    Sharding of the C classes over W ranks (``sharding``):

    - ``"block"``: contiguous blocks as in arcface_torch: rank r holds ``num_local = C//W + (r < C%W)`` classes
      starting at ``class_start = r*(C//W) + min(r, C%W)``;
    - ``"mod"``: class c lives on rank ``c % W`` at local index ``c // W`` (same counts as ``"block"``).

    ``weight`` is this rank's (num_local*K, D) Parameter, row ``local_class*K + k`` (class-major, as
    :func:`~facetrain.heads.margins.subcenter_max` expects), so optimizer state for the centres lives with the shard.
    The initial centres are ``init_std * N(0, 1)`` drawn per block of 4096 global classes from ``seed``: the same
    for any world size and sharding. :meth:`gather_full_weight` / :meth:`load_full_weight` convert to and from
    the (C*K, D) tensor in global class order, so a checkpoint written by W ranks resumes on any other number;
    :meth:`gather_full` / :meth:`local_rows` do the same for any per-centre tensor (optimizer momentum).

    Sampling happens in training mode with ``sample_rate < 1``; in eval mode every local centre is used. The random
    numbers of step t on rank r come from a generator seeded with (seed, r, t), so runs are reproducible; the step
    counter is saved in ``state_dict`` (extra state). The sampled set depends on the world size.

    Gradients: the loss is the mean over the global batch; each rank's embeddings receive their exact gradient of it
    (see :func:`facetrain.engine.comm.all_gather_with_grad`) and each centre shard its exact gradient. A margin's
    auxiliary loss is computed identically on every rank from the global batch; its gradient is split so that the
    sum over ranks is counted once.

    Args:
        embedding_size: D.
        num_classes: C, the number of identities (all ranks together).
        margin: a margin module from :func:`~facetrain.heads.margins.build_margin`. With K > 1 it may reduce the
            sub-centres itself (built with the same ``subcenter_k``) or not at all (``subcenter_k=1``: Partial FC
            takes the max). CurricularFace needs ``shared_rows=True`` on more than one rank. Stateful margins
            all-reduce over the default process group, so use the default group with them.
        sample_rate: fraction of this shard's classes used per training step, in (0, 1] (arcface_torch: 0.1-0.3
            for very large C; 1.0 = full softmax).
        subcenter_k: K sub-centres per class (Sub-center ArcFace, Deng et al. 2020).
        sharding: ``"block"`` (default, arcface_torch's layout) or ``"mod"``.
        process_group: group whose ranks share the classes (default group when None; none initialized = one
            process holding every class). Read at construction.
        init_std: standard deviation of the initial centres (arcface_torch: 0.01).
        seed: seed of the initial centres and of the sampling.

    Raises:
        ModelError: invalid argument or incompatible margin.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        margin: nn.Module,
        sample_rate: float = 1.0,
        subcenter_k: int = 1,
        sharding: str = "block",
        process_group: dist.ProcessGroup | None = None,
        init_std: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(embedding_size) < 1:
            raise ModelError(f"PartialFC: embedding_size must be >= 1, got {embedding_size}")
        if int(num_classes) < 1:
            raise ModelError(f"PartialFC: num_classes must be >= 1, got {num_classes}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ModelError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate}")
        if int(subcenter_k) < 1:
            raise ModelError(f"PartialFC: subcenter_k must be >= 1, got {subcenter_k}")
        if sharding not in SHARDINGS:
            hint = closest(str(sharding), SHARDINGS)
            raise ModelError(
                f"PartialFC: unknown sharding '{sharding}'"
                + (f" (did you mean '{hint}'?)" if hint else "")
                + f"; known: {', '.join(SHARDINGS)}"
            )
        if not float(init_std) > 0:
            raise ModelError(f"PartialFC: init_std must be > 0, got {init_std}")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.subcenter_k = int(subcenter_k)
        self.sharding = sharding
        self.process_group = process_group
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.world_size = _world(process_group)
        self.rank = _rank(process_group)
        if self.num_classes < self.world_size:
            raise ModelError(
                f"PartialFC: {self.num_classes} classes cannot be sharded over {self.world_size} ranks; "
                "use fewer ranks or no process group"
            )
        self.margin = margin
        self._margin_reduces_subcentres = self._check_margin(margin)

        ids = shard_class_ids(self.num_classes, self.rank, self.world_size, sharding)
        self.num_local = int(ids.numel())
        self.num_sample = int(self.sample_rate * self.num_local)
        self.class_start = int(ids[0]) if self.num_local else 0
        self.register_buffer("local_class_ids", ids, persistent=False)
        self.weight = nn.Parameter(
            _initial_centres(ids, self.subcenter_k, self.embedding_size, self.init_std, self.seed)
        )
        self._sample_step = 0

    def _check_margin(self, margin: nn.Module) -> bool:
        """Whether ``margin`` takes the sub-centre max itself; raise on a margin Partial FC cannot serve."""
        if not isinstance(margin, nn.Module):
            raise ModelError(f"PartialFC: margin must be an nn.Module from build_margin, got {type(margin).__name__}")
        margin_k = int(getattr(margin, "subcenter_k", 1))
        if margin_k not in (1, self.subcenter_k):
            raise ModelError(
                f"PartialFC: margin has subcenter_k={margin_k} but PartialFC has subcenter_k={self.subcenter_k}; "
                "build both with the same value"
            )
        if self.world_size > 1 and getattr(margin, "shared_rows", True) is False:
            raise ModelError(
                f"PartialFC on {self.world_size} ranks: build the {type(margin).__name__} margin with "
                "shared_rows=True so rows whose class lives on another rank are treated as in one process"
            )
        return margin_k > 1

    # ----------------------------------------------------------------------------------------------------------------

    def forward(
        self, local_embeddings: Tensor, local_labels: Tensor, *, return_logits: bool = False
    ) -> PartialFCOutput:
        """Loss of this rank's embeddings against the class centres of every rank.

        Every rank of the group must call it in the same step (it runs collectives).

        Args:
            local_embeddings: (B, D) unnormalized backbone output of this rank (B may differ between ranks).
            local_labels: (B,) or (B, 1) integer class ids in [0, num_classes).
            return_logits: also return this rank's (B_global, C_sampled) margin logits.

        Returns:
            :class:`PartialFCOutput`; back-propagate ``out.loss``.

        Raises:
            ModelError: wrong shapes or a label outside [0, num_classes).
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ModelError(
                f"PartialFC: embeddings must be (B, {self.embedding_size}), got {tuple(local_embeddings.shape)}"
            )
        local_labels = local_labels.reshape(-1)
        if local_labels.numel() != local_embeddings.shape[0]:
            raise ModelError(f"PartialFC: {local_labels.numel()} labels for {local_embeddings.shape[0]} embeddings")
        group = self.process_group
        sizes = gather_sizes(local_embeddings.shape[0], local_embeddings.device, group) if self.world_size > 1 else None
        embeddings = all_gather_with_grad(local_embeddings, group, sizes)
        labels = all_gather_tensor(local_labels.to(device=local_embeddings.device, dtype=torch.long), group, sizes)
        self._check_labels(labels)

        labels = self._to_local(labels)
        if self.training and self.num_sample < self.num_local:
            generator = torch.Generator(device=self.weight.device)
            generator.manual_seed(_step_seed(self.seed, self.rank, self._sample_step))
            self._sample_step += 1
            index, labels = sample_centres(labels, self.num_local, self.num_sample, generator)
            rows = index.unsqueeze(1) * self.subcenter_k + torch.arange(self.subcenter_k, device=index.device)
            centres = self.weight.index_select(0, rows.reshape(-1))
            sampled_classes = self.local_class_ids[index]
        else:
            centres = self.weight
            sampled_classes = self.local_class_ids

        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            embeddings = embeddings.to(dtype)
            norms = embeddings.norm(dim=1)
            cos = cosine_logits(unit_rows(embeddings), centres.to(dtype)).clamp(-1.0, 1.0)
            if self.subcenter_k > 1 and not self._margin_reduces_subcentres:
                cos = subcenter_max(cos, self.subcenter_k)
            out = self.margin(cos, labels, norms)
            loss = distributed_softmax_cross_entropy(out.logits, labels, group)
        aux = out.aux_loss
        if aux is not None:
            # Every rank holds the same aux value, and the embedding gather sums gradients over ranks: let each rank
            # send 1/W of it so the gradient counts once, while the value stays whole.
            share = aux / self.world_size
            loss = loss + share + (aux - share).detach()
        return PartialFCOutput(
            loss=loss,
            logits=out.logits if return_logits else None,
            aux_loss=aux,
            num_sampled=int(sampled_classes.numel()),
            sampled_classes=sampled_classes,
        )

    def _check_labels(self, labels: Tensor) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ModelError(
                f"PartialFC: label {value} is outside [0, {self.num_classes}); set num_classes to the dataset's "
                "class count (its 'property' file or folder count)"
            )

    def _to_local(self, labels: Tensor) -> Tensor:
        """(B,) global class ids -> index into this shard's classes, -1 where the class lives on another rank."""
        if self.sharding == "block":
            local = labels - self.class_start
            mine = (local >= 0) & (local < self.num_local)
        else:
            local = torch.div(labels, self.world_size, rounding_mode="floor")
            mine = torch.remainder(labels, self.world_size) == self.rank
        return torch.where(mine, local, torch.full_like(local, -1))

    # ----------------------------------------------------------------------------------------------------------------
    # World-size independent centres

    def gather_full(self, local: Tensor, dst: int | None = None, device: torch.device | str = "cpu") -> Tensor | None:
        """Assemble a per-centre tensor of every rank in global class order (collective: all ranks call it).

        Args:
            local: (num_local*K, ...) this rank's rows, e.g. ``weight`` or its optimizer momentum.
            dst: rank (of the group) that receives the result; None = every rank.
            device: where the full tensor is built (one shard at a time is broadcast, so each rank's accelerator
                only ever holds one extra shard).

        Returns:
            (C*K, ...) tensor on ``device``, or None on ranks other than ``dst``.
        """
        if local.shape[0] != self.num_local * self.subcenter_k:
            raise ModelError(
                f"PartialFC.gather_full: expected {self.num_local * self.subcenter_k} rows (this rank's centres), "
                f"got {local.shape[0]}"
            )
        keep = dst is None or dst == self.rank
        tail = tuple(local.shape[1:])
        full = (
            torch.empty((self.num_classes, self.subcenter_k, *tail), dtype=local.dtype, device=device) if keep else None
        )
        for r in range(self.world_size):
            ids = shard_class_ids(self.num_classes, r, self.world_size, self.sharding)
            if ids.numel() == 0:
                continue
            if self.world_size == 1:
                shard = local.detach()
            else:
                if r == self.rank:
                    shard = local.detach().contiguous()
                else:
                    shard = local.new_empty((ids.numel() * self.subcenter_k, *tail))
                src = r if self.process_group is None else dist.get_global_rank(self.process_group, r)
                dist.broadcast(shard, src=src, group=self.process_group)
            if keep:
                full[ids.to(full.device)] = shard.reshape(ids.numel(), self.subcenter_k, *tail).to(full.device)
        return None if full is None else full.reshape(self.num_classes * self.subcenter_k, *tail)

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a (C*K, ...) per-centre tensor in global class order (no communication).

        Args:
            full: (C*K, ...) tensor, e.g. from :meth:`gather_full` on any world size.

        Returns:
            (num_local*K, ...) rows for this rank's classes, on ``full``'s device.
        """
        expected = self.num_classes * self.subcenter_k
        if full.dim() < 1 or full.shape[0] != expected:
            raise ModelError(
                f"PartialFC: full tensor must have {expected} rows (num_classes={self.num_classes} x "
                f"subcenter_k={self.subcenter_k}), got shape {tuple(full.shape)}"
            )
        tail = tuple(full.shape[1:])
        ids = self.local_class_ids.to(full.device)
        return full.reshape(self.num_classes, self.subcenter_k, *tail)[ids].reshape(-1, *tail)

    def gather_full_weight(self, dst: int | None = None, device: torch.device | str = "cpu") -> Tensor | None:
        """All class centres, (C*K, D) in global class order (row ``c*K + k``); see :meth:`gather_full`."""
        return self.gather_full(self.weight.detach(), dst=dst, device=device)

    @torch.no_grad()
    def load_full_weight(self, full: Tensor) -> None:
        """Set this rank's centres from a (C*K, D) tensor in global class order (written by any world size)."""
        if full.dim() != 2 or full.shape[1] != self.embedding_size:
            raise ModelError(
                f"PartialFC: full weight must be (C*K, {self.embedding_size}), got shape {tuple(full.shape)}"
            )
        self.weight.copy_(self.local_rows(full).to(device=self.weight.device, dtype=self.weight.dtype))

    def full_state_dict(self, dst: int | None = None) -> dict[str, Any] | None:
        """World-size independent state: ``weight`` (C*K, D) on CPU, the margin's buffers, the sampling step.

        Collective; returns None on ranks other than ``dst`` (every rank when ``dst`` is None).
        """
        weight = self.gather_full_weight(dst=dst)
        if weight is None:
            return None
        margin = {k: v.detach().cpu() for k, v in self.margin.state_dict().items()}
        return {"weight": weight, "margin": margin, "sample_step": self._sample_step}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`full_state_dict` returned (any world size wrote it)."""
        missing = {"weight", "margin", "sample_step"} - set(state)
        if missing:
            raise ModelError(f"PartialFC: state is missing {', '.join(sorted(missing))}")
        self.load_full_weight(state["weight"])
        self.margin.load_state_dict(state["margin"])
        self._sample_step = int(state["sample_step"])

    def get_extra_state(self) -> dict[str, int]:
        return {"sample_step": self._sample_step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._sample_step = int(state.get("sample_step", 0))

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, subcenter_k={self.subcenter_k}, sharding={self.sharding!r}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Sharding, initialization, sampling


def shard_class_ids(num_classes: int, rank: int, world_size: int, sharding: str = "block") -> Tensor:
    """Global class ids held by ``rank``, ascending (int64, CPU).

    ``"block"``: ``[start, start + num_local)`` with ``num_local = C//W + (rank < C%W)``; ``"mod"``: ``rank, rank + W,
    rank + 2W, ...``.
    """
    if sharding == "block":
        base, extra = divmod(num_classes, world_size)
        start = rank * base + min(rank, extra)
        return torch.arange(start, start + base + int(rank < extra), dtype=torch.long)
    if sharding == "mod":
        return torch.arange(min(rank, num_classes), num_classes, world_size, dtype=torch.long)
    raise ModelError(f"unknown sharding '{sharding}'; known: {', '.join(SHARDINGS)}")


def _initial_centres(class_ids: Tensor, k: int, d: int, std: float, seed: int) -> Tensor:
    """(len(class_ids)*K, D) ``std * N(0, 1)`` centres, drawn per block of global classes so any shard of the
    same class gets the same values (world-size independent initialization)."""
    dtype = torch.get_default_dtype()
    out = torch.empty((class_ids.numel(), k, d), dtype=dtype)
    if class_ids.numel():
        blocks = torch.div(class_ids, _INIT_CHUNK, rounding_mode="floor")
        for block in torch.unique(blocks).tolist():
            lo = int(torch.searchsorted(class_ids, block * _INIT_CHUNK))
            hi = int(torch.searchsorted(class_ids, (block + 1) * _INIT_CHUNK))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
            values = torch.randn((_INIT_CHUNK, k, d), generator=generator, dtype=dtype)
            out[lo:hi] = values[class_ids[lo:hi] - block * _INIT_CHUNK]
    return out.mul_(std).reshape(-1, d)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * (1 << 32) + step) % (1 << 63)


def sample_centres(
    local_labels: Tensor, num_local: int, num_sample: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Partial FC v2 sampling of one shard: every positive class plus uniformly drawn negatives.

    Positives get the key 2.0, every other class a uniform key in [0, 1); the ``num_sample`` largest keys are kept
    (arcface_torch's rule), so every positive is kept and exactly ``num_sample`` classes are used, unless there are
    more positives than that: then only the positives.

    Args:
        local_labels: (B,) index into the shard's classes, -1 where the class lives on another rank.
        num_local: classes in the shard.
        num_sample: classes to keep.
        generator: random generator on the labels' device (reproducibility).

    Returns:
        ``(index, labels)``: (C_sampled,) ascending shard indices of the kept classes, and (B,) labels remapped to
        columns of the sampled set (-1 kept).
    """
    positive = local_labels != -1
    positives = torch.unique(local_labels[positive], sorted=True)
    if num_sample >= positives.numel():
        keys = torch.rand(num_local, generator=generator, device=local_labels.device)
        keys[positives] = 2.0
        index = torch.topk(keys, k=num_sample, sorted=False)[1].sort()[0]
    else:
        index = positives
    labels = local_labels.clone()
    labels[positive] = torch.searchsorted(index, local_labels[positive])
    return index, labels


# --------------------------------------------------------------------------------------------------------------------
# Row normalization with a lean backward


class _UnitRows(torch.autograd.Function):
    """``w / max(|w|, 1e-12)`` per row; backward ``(g - u <u, g>) / |w|`` with one (N, D) temporary.

    Same values and gradient as ``F.normalize`` (for rows with norm above 1e-12), but autograd's version of the
    backward allocates several (N, D) tensors, which for C class centres costs more than the matmul itself.
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12)
        unit = rows / norms
        ctx.save_for_backward(unit, norms)
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        unit, norms = ctx.saved_tensors
        along = torch.linalg.vecdot(unit, grad, dim=1).unsqueeze(1)
        return torch.addcmul(grad, unit, along, value=-1).div_(norms)


def unit_rows(rows: Tensor) -> Tensor:
    """(N, D) rows scaled to unit L2 norm (differentiable; see :class:`_UnitRows`)."""
    return _UnitRows.apply(rows)


class _CosineLogits(torch.autograd.Function):
    """``cos_ij = <u_i, w_j> / |w_j|`` without forming the normalized centres.

    Backward, with ``g' = g / |w_j|`` (B, N): ``du = g' W`` and
    ``dw_j = sum_i g'_ij u_i - w_j sum_i g'_ij cos_ij / |w_j|``: one (N, D) allocation (the gradient itself, as
    for a plain linear layer) instead of the normalized copy, its gradient and the normalization's temporaries.
    """

    @staticmethod
    def forward(ctx, unit: Tensor, centres: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(centres, dim=1).clamp_min_(1e-12)
        cos = (unit @ centres.T).div_(norms)
        ctx.save_for_backward(unit, centres, norms, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        unit, centres, norms, cos = ctx.saved_tensors
        scaled = grad / norms
        grad_unit = scaled @ centres if ctx.needs_input_grad[0] else None
        grad_centres = None
        if ctx.needs_input_grad[1]:
            grad_centres = scaled.T @ unit
            radial = torch.linalg.vecdot(scaled, cos, dim=0).div_(norms)
            grad_centres.addcmul_(centres, radial.unsqueeze(1), value=-1)
        return grad_unit, grad_centres


def cosine_logits(unit_embeddings: Tensor, centres: Tensor) -> Tensor:
    """(B, N) cosines between unit-norm embeddings (B, D) and the directions of ``centres`` (N, D).

    Equals ``unit_embeddings @ F.normalize(centres).T`` with its exact gradient (see :class:`_CosineLogits`).
    """
    return _CosineLogits.apply(unit_embeddings, centres)


# --------------------------------------------------------------------------------------------------------------------
# Distributed softmax cross-entropy


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy whose columns are spread over ranks; analytic backward ``(p - onehot) / B``."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        world = _world(group)
        batch = logits.shape[0]
        z = logits.detach()
        if z.shape[1]:
            row_max = z.amax(dim=1)
        else:
            row_max = z.new_full((batch,), float("-inf"))
        if world > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (z - row_max.unsqueeze(1)).exp_()
        denom = probs.sum(dim=1)
        if world > 1:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=group)
        probs.div_(denom.unsqueeze(1))
        rows = torch.nonzero(labels != -1, as_tuple=True)[0]
        cols = labels[rows].long()
        p_target = probs.new_zeros(batch)
        p_target[rows] = probs[rows, cols]
        if world > 1:
            dist.all_reduce(p_target, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(probs, rows, cols)
        ctx.batch = batch
        return -p_target.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        probs, rows, cols = ctx.saved_tensors
        scale = grad_loss / ctx.batch
        grad = probs * scale
        grad[rows, cols] -= scale
        return grad, None, None


def distributed_softmax_cross_entropy(logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean softmax cross-entropy when each rank holds some of the classes' logits (Partial FC v2).

    ``loss = -mean_i log(max(p_{i,y_i}, 1e-30))`` with the softmax taken over the columns of every rank of
    ``group`` (global max and sum all-reduced). Without a process group it is ``F.cross_entropy`` (up to the clamp).

    Args:
        logits: (B, C_local) this rank's logits; every rank has the same B rows.
        labels: (B,) column of the target on this rank, -1 where the target is on another rank.
        group: process group (default group when None).

    Returns:
        Scalar loss, identical on every rank; gradient ``(p - onehot(y)) / B`` on this rank's columns.
    """
    return _DistSoftmaxCrossEntropy.apply(logits, labels.reshape(-1), group)


# --------------------------------------------------------------------------------------------------------------------
# Collectives (public in facetrain.engine.comm)


def _world(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(size: int, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's ``size`` in rank order; ``[size]`` at world size 1 (see :mod:`facetrain.engine.comm`)."""
    world = _world(group)
    if world == 1:
        return [int(size)]
    mine = torch.tensor([int(size)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def all_gather_tensor(tensor: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None) -> Tensor:
    """Rows of every rank concatenated in rank order, no gradient (see :mod:`facetrain.engine.comm`)."""
    if _world(group) == 1:
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device, group)
    return _gather_padded(tensor.detach().contiguous(), sizes, group)


def all_gather_with_grad(
    tensor: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> Tensor:
    """Differentiable all-gather of rows; backward = this rank's rows of the gradients summed over ranks."""
    if _world(group) == 1:
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device, group)
    return _AllGatherWithGrad.apply(tensor, list(sizes), group)


def _gather_padded(tensor: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """all_gather of rows with unequal counts: pad to the largest count, gather, drop the padding."""
    if tensor.shape[0] != sizes[_rank(group)]:
        raise ModelError(f"all_gather: this rank has {tensor.shape[0]} rows but sizes say {sizes[_rank(group)]}")
    largest = max(sizes)
    if tensor.shape[0] < largest:
        tensor = torch.cat([tensor, tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))])
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor, group=group)
    if all(s == largest for s in sizes):
        return torch.cat(parts)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate all ranks' rows. Backward: sum the incoming gradients over ranks, keep this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
        rank = _rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return _gather_padded(tensor.detach().contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # Gloo has no reduce_scatter; an all-reduce of the (B_global, D) gradient is portable, same order of traffic.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None
