"""Contrastive representation distillation (CRD) between the student and the fused teacher.

See docs/method.md#feature-fusion-and-crd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.config import ConfigError
from richkd.fusion import fuse_features

__all__ = ["EmbedHead", "ContrastMemory", "nce_loss", "FusedCRD"]

_SCORE_MODES = ("auto", "dense", "gather")
_SAMPLINGS = ("other_class", "uniform")
# other_class draws keep at most this many random keys (B_chunk x N) in memory at once
_KEYS_PER_CHUNK = 1 << 24
# other_class draws switch from ranking keys over every other-class row (O(B N) per step) to rejection sampling
# (O(B K log K) per round) when every class's other-class rows outnumber K this many times (full ImageNet: ~78x)
_REJECTION_RATIO = 32
# the gather score path holds at most this many bytes of gathered memory rows at once, forward and backward
_GATHER_BYTES = 1 << 28


def _per_chunk(memory: torch.Tensor, index: torch.Tensor, other: torch.Tensor, fn) -> torch.Tensor:
    """torch.cat of fn(memory[index[lo:hi]] (b, K+1, d), other[lo:hi]) over batch chunks whose gathered rows take at
    most _GATHER_BYTES; one chunk's rows exist at a time."""
    step = max(1, _GATHER_BYTES // max(1, index.shape[1] * memory.shape[1] * memory.element_size()))
    return torch.cat([fn(memory.index_select(0, index[lo:lo + step].reshape(-1)).view(
        *index[lo:lo + step].shape, -1), other[lo:lo + step]) for lo in range(0, index.shape[0], step)])


class _GatheredDots(torch.autograd.Function):
    """dots[b, j] = memory[index[b, j]] . v[b] for a constant memory bank, chunk by chunk; backward gathers the
    rows again instead of keeping the whole (B, K+1, d) gather alive until then (at full ImageNet, B 512 and
    K 16384, that gather is 4.3 GB per side). The gradient w.r.t. v is a bmm, so it is deterministic too."""

    @staticmethod
    def forward(ctx, memory: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(memory, index)
        return _per_chunk(memory, index, v, lambda w, vb: torch.bmm(w, vb.unsqueeze(2)).squeeze(2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        memory, index = ctx.saved_tensors
        return None, _per_chunk(memory, index, grad, lambda w, g: torch.bmm(g.unsqueeze(1), w).squeeze(1)), None


class EmbedHead(nn.Module):
    """Linear projection to the CRD space followed by L2 normalisation: (B, d_in) -> (B, d_out) unit rows.

    Same as mdistiller's ``Embed`` (Linear + ``Normalize(2)``); inputs with more than two dims are flattened.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def nce_loss(log_p: torch.Tensor, num_data: int) -> torch.Tensor:
    """CRD's NCE loss (mdistiller ``ContrastLoss``) from log scores, a scalar.

    Args:
        log_p: (B, K+1) ``log P`` with ``P = exp(v . m / tau) / Z``; column 0 is the positive pair and
            columns 1..K are the K negatives.
        num_data: N, size of the memory bank; the noise distribution is uniform, ``Pn = 1/N``.

    Value: ``-[sum_i log(P_pos/(P_pos + K Pn)) + sum_i sum_neg log(K Pn/(P_neg + K Pn))] / B``.
    Written with softplus in log space (``log(P/(P+c)) = -softplus(log c - log P)``), which cannot overflow
    for a small NCE temperature. The official code adds ``eps = 1e-7`` to each denominator ``P + K/N``. Both
    terms of that sum scale as 1/N (``P = exp(score)/Z`` with ``Z = mean(exp) * N``, and ``K Pn = K/N``), so
    the constant eps is an offset of relative size about ``eps * N / (K + N P)``: it grows with the number of
    rows N, not with K (about 3e-7 for CIFAR-100 and 1e-5 for ImageNet at K = 16384). It is left out here.
    """
    batch, cols = log_p.shape
    k = cols - 1
    log_c = math.log(k / float(num_data))           # log(K * Pn)
    pos = F.softplus(log_c - log_p[:, 0]).sum()      # -log(P_pos / (P_pos + K Pn))
    neg = F.softplus(log_p[:, 1:] - log_c).sum()     # -log(K Pn / (P_neg + K Pn))
    return (pos + neg) / batch


def check_negatives(train_targets: torch.Tensor, nce_k: int) -> None:
    """ConfigError unless every class of the training rows has more than `nce_k` rows of other classes.

    CRD draws K negatives from other classes for each positive; a run on a small subset
    (data.max_train_samples) can have fewer. Cheap (a bincount), so `richkd.validate` runs it before any cache
    is built, and ContrastMemory again when it is built.
    """
    targets = torch.as_tensor(train_targets).long()
    nce_k = int(nce_k)
    if nce_k < 1:
        raise ConfigError(f"loss.nce_k: {nce_k} must be at least 1")
    n = targets.numel()
    counts = torch.bincount(targets)
    present = counts > 0
    if int(present.sum()) < 2:
        raise ConfigError("loss.feat_weight: CRD needs negatives from other classes, but the training set "
                          "has a single class; set loss.feat_weight=0")
    available = n - counts
    worst_class = int(torch.where(present, available, torch.full_like(available, n + 1)).argmin())
    worst = int(available[worst_class])
    if nce_k >= worst:
        raise ConfigError(
            f"loss.nce_k={nce_k} exceeds the {worst} samples of other classes available for class "
            f"{worst_class} (training set of {n} rows); lower loss.nce_k below {worst} or raise "
            "data.max_train_samples")


class ContrastMemory(nn.Module):
    """Memory banks of student and fused-teacher embeddings with class-aware negative sampling.

    Buffers (persistent, they belong in checkpoints): ``memory_student`` and ``memory_teacher`` (N, feat_dim),
    initialised uniformly in ``±1/sqrt(feat_dim/3)`` (rows have unit norm in expectation, as in CRD);
    ``log_z_student`` and ``log_z_teacher``: log of the normalisation constants Z, NaN until the first
    batch fixes them to ``log(mean(exp(scores)) * N)`` (CRD stores Z itself; its log cannot overflow).

    Non-persistent buffers (rebuilt from ``train_targets``, never saved): ``class_of`` (N,),
    ``class_order`` (N, dataset rows sorted by class), ``class_start`` and ``class_count`` (C,).

    Negatives reproduce CRD's ``"exact"`` mode (K negatives from OTHER classes,
    docs/method.md#feature-fusion-and-crd), sampled here on the memory's device instead of by the dataset.
    ``sampling="other_class"`` (default) draws K distinct other-class rows per sample, i.e. without replacement,
    as the official CRD dataset does (by ranking random keys, or, when the other-class rows outnumber K 32 times
    or more as on full ImageNet, by rejection sampling: the same distribution, far fewer random numbers);
    ``"uniform"`` draws them i.i.d. WITH replacement over the other-class rows
    (the noise distribution the NCE loss assumes, like mdistiller's ``AliasMethod`` draw restricted to other
    classes), which is cheaper. The draw uses the global RNG of the buffers' device, so runs are reproducible
    under ``torch.manual_seed``.
    """

    def __init__(self, feat_dim: int, train_targets: torch.Tensor, nce_k: int,
                 temperature: float = 0.07, momentum: float = 0.5, score_mode: str = "auto",
                 sampling: str = "other_class") -> None:
        super().__init__()
        targets = torch.as_tensor(train_targets).detach().to("cpu")
        if targets.dim() != 1 or targets.numel() == 0 or targets.is_floating_point() or targets.is_complex():
            raise ValueError("ContrastMemory: train_targets must be a non-empty 1-D integer tensor with one "
                             f"class per training row, got dtype {targets.dtype} and shape {tuple(targets.shape)}")
        targets = targets.long()
        if int(targets.min()) < 0:
            raise ValueError("ContrastMemory: train_targets contains negative class ids")
        if score_mode not in _SCORE_MODES:
            raise ValueError(f"ContrastMemory: score_mode={score_mode!r} is not one of {', '.join(_SCORE_MODES)}")
        if sampling not in _SAMPLINGS:
            raise ConfigError(f"loss.nce_sampling: {sampling!r} is not one of {', '.join(_SAMPLINGS)}")
        nce_k = int(nce_k)
        check_negatives(targets, nce_k)
        n = targets.numel()
        counts = torch.bincount(targets)

        self.num_data = n
        self.feat_dim = int(feat_dim)
        self.nce_k = nce_k
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.sampling = sampling
        # Scores from the full bank (one (B, N) matmul) avoid materialising the (B, K+1, d) gather, which is
        # 0.5 GB per side for CIFAR (B=64, K=16384, d=128); the gather wins when N >> K (e.g. ImageNet).
        self.score_mode = score_mode
        # Random bits per draw so that (bits) * (N) still fits in int64 (see sample()).
        self._bits = 62 - max(1, (n - 1).bit_length())
        if self._bits < 30:
            raise ValueError(f"ContrastMemory: {n} training rows is too many for the negative sampler")
        # sampler constants as Python numbers, so that a draw never waits for the device to answer
        present = counts[counts > 0]
        self._width = n - int(present.min())                 # the most other-class rows any class has
        self._uneven = bool((present != present.max()).any())
        self._rejection = n - int(present.max()) >= _REJECTION_RATIO * nce_k   # every class: M_c >= 32 K

        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_teacher", torch.rand(n, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("log_z_student", torch.tensor(float("nan")))
        self.register_buffer("log_z_teacher", torch.tensor(float("nan")))

        self.register_buffer("class_of", targets, persistent=False)
        self.register_buffer("class_order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def extra_repr(self) -> str:
        return (f"num_data={self.num_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, "
                f"temperature={self.temperature}, momentum={self.momentum}, score_mode={self.score_mode}, "
                f"sampling={self.sampling}")

    @property
    def _dense(self) -> bool:
        if self.score_mode == "auto":
            return self.num_data <= 8 * (self.nce_k + 1)
        return self.score_mode == "dense"

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """Contrast indices (B, K+1): column 0 is ``index`` (the positive), then K rows of other classes."""
        index = index.to(self.class_of.device).long()
        if self.sampling == "uniform":
            negatives = self._sample_iid(index)
        elif self._rejection:
            negatives = self._sample_rejection(index)
        else:
            negatives = self._sample_distinct(index)
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def _sample_distinct(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) distinct other-class rows per sample: the K smallest of uniform keys over the other classes.

        Ranking i.i.d. uniform keys gives a uniformly random K-subset (the first K of a random permutation).
        Sample b with class c ranks keys for the M_c = N - count_c other-class positions of the class-sorted
        rows, mapped as in `_sample_iid` (a key column r >= start_c skips class c's block); columns past M_c
        (classes larger than the smallest) get key 2, above every draw. K < M_c is checked at construction.
        Keys are drawn for a chunk of the batch at a time, at most 2^24 of them (64 MB).
        """
        y = self.class_of[index]
        count = self.class_count[y].unsqueeze(1)
        start = self.class_start[y].unsqueeze(1)
        width = self._width
        columns = torch.arange(width, device=index.device)
        chunk = max(1, _KEYS_PER_CHUNK // width)
        parts = []
        for lo in range(0, index.numel(), chunk):
            hi = min(lo + chunk, index.numel())
            keys = torch.rand(hi - lo, width, device=index.device)
            if self._uneven:
                keys.masked_fill_(columns >= (self.num_data - count[lo:hi]), 2.0)
            parts.append(torch.topk(keys, self.nce_k, dim=1, largest=False, sorted=False).indices)
        return self._rows_of(torch.cat(parts), start, count)

    def _sample_rejection(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) distinct other-class rows per sample by rejection, for N >> K (e.g. full ImageNet).

        K i.i.d. draws as `_sample_iid`, then every repeat within a sample is drawn again until none is left.
        The procedure treats all rows alike, so the final K-subset is uniformly distributed, as in
        `_sample_distinct`, at O(B K log K) per round instead of ranking B x N keys. A round leaves about
        K^2 / 2M repeats per sample (M other-class rows), so with M >= 32 K a handful of rounds finish; each asks
        the device whether repeats are left (one host sync per round).
        """
        y = self.class_of[index]
        start = self.class_start[y].unsqueeze(1)
        count = self.class_count[y].unsqueeze(1)
        r = self._draw(self.num_data - count, index.numel())
        while True:
            r = r.sort(dim=1).values
            repeat = torch.zeros_like(r, dtype=torch.bool)
            repeat[:, 1:] = r[:, 1:] == r[:, :-1]
            if not bool(repeat.any()):
                return self._rows_of(r, start, count)
            r = torch.where(repeat, self._draw(self.num_data - count, index.numel()), r)

    def _sample_iid(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) other-class rows drawn uniformly with replacement."""
        y = self.class_of[index]
        start = self.class_start[y].unsqueeze(1)
        count = self.class_count[y].unsqueeze(1)
        return self._rows_of(self._draw(self.num_data - count, index.numel()), start, count)

    def _draw(self, others: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, K) uniform positions r in [0, others_b) by multiply-shift: r = (u * others) >> bits with u uniform
        on [0, 2^bits) (no integer division; the non-uniformity is below n / 2^bits <= 2^-30 relative)."""
        u = torch.randint(0, 2 ** self._bits, (batch, self.nce_k), device=others.device)
        return u.mul_(others).bitwise_right_shift_(self._bits)

    def _rows_of(self, r: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Positions among the other-class rows -> dataset rows. With rows sorted by class, class c occupies
        [start_c, start_c + count_c), so position r maps to ``r + count_c * (r >= start_c)`` of the sorted rows."""
        r.add_((r >= start).long().mul_(count))
        return self.class_order.index_select(0, r.view(-1)).view_as(r)

    def _logits(self, memory: torch.Tensor, v: torch.Tensor, contrast_index: torch.Tensor) -> torch.Tensor:
        """(B, K+1) ``memory[contrast_index[b, j]] . v[b] / tau``; gradients reach v, never the memory."""
        if self._dense:
            if torch.is_grad_enabled() and v.requires_grad:
                # The matmul saves the bank for backward; snapshot it because forward() updates it in place.
                memory = memory.clone()
            dots = (v @ memory.t()).gather(1, contrast_index)
        else:
            if torch.is_grad_enabled() and v.requires_grad:
                memory = memory.clone()   # backward gathers from the bank again; forward() updates it in place
            dots = _GatheredDots.apply(memory, v, contrast_index)
        return dots / self.temperature

    @staticmethod
    def _fix_log_z(log_z: torch.Tensor, logits: torch.Tensor, num_data: int) -> torch.Tensor:
        """Set Z on the first batch, ``Z = mean(exp(logits)) * N`` (CRD); sync-free after that."""
        with torch.no_grad():
            first = torch.logsumexp(logits.detach().reshape(-1), 0) - math.log(logits.numel()) + math.log(num_data)
            log_z.copy_(torch.where(torch.isnan(log_z), first, log_z))
        return log_z.clone()

    def forward(self, v_student: torch.Tensor, v_teacher: torch.Tensor, index: torch.Tensor,
                contrast_index: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log scores ``(log P_student, log P_teacher)``, each (B, K+1), then update both banks at ``index``.

        Args:
            v_student: (B, d) unit student embeddings.
            v_teacher: (B, d) unit (fused-)teacher embeddings.
            index: (B,) dataset rows of the batch (positives).
            contrast_index: optional (B, K+1) precomputed indices (column 0 = index); sampled when None.

        Pairing as in mdistiller ``ContrastMemory`` (v1 = student, v2 = teacher): ``out_v1`` scores the
        STUDENT embedding against the TEACHER memory and ``out_v2`` scores the TEACHER embedding against the
        STUDENT memory, i.e. each side is contrasted with the other modality's bank. So the student head gets
        gradients from ``log P_student`` and the teacher/CLIP heads from ``log P_teacher``; the banks are
        constants. Scores are computed before the momentum update ``m <- normalize(mom*m + (1-mom)*v)``.
        """
        index = index.long()
        if contrast_index is None:
            contrast_index = self.sample(index)
        elif contrast_index.shape != (index.numel(), self.nce_k + 1):
            raise ValueError(f"contrast_index must have shape ({index.numel()}, {self.nce_k + 1}), "
                             f"got {tuple(contrast_index.shape)}")
        contrast_index = contrast_index.long()

        logits_s = self._logits(self.memory_teacher, v_student, contrast_index)   # CRD out_v1
        logits_t = self._logits(self.memory_student, v_teacher, contrast_index)   # CRD out_v2
        log_p_s = logits_s - self._fix_log_z(self.log_z_student, logits_s, self.num_data)
        log_p_t = logits_t - self._fix_log_z(self.log_z_teacher, logits_t, self.num_data)

        with torch.no_grad():
            for memory, v in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
                rows = memory.index_select(0, index).mul_(self.momentum)
                rows.add_(v.detach().to(memory.dtype), alpha=1.0 - self.momentum)
                memory.index_copy_(0, index, F.normalize(rows, dim=1))
        return log_p_s, log_p_t


class FusedCRD(nn.Module):
    """RichKD feature term: CRD between the student and ``normalize(lam*e_T + (1-lam)*e_C)``.

    See docs/method.md#feature-fusion-and-crd.

    Heads (all trainable, all belong in the optimiser as in the official ``get_learnable_parameters``):
    ``embed_student`` (student_dim -> feat_dim), ``embed_teacher`` (teacher_dim -> feat_dim) and
    ``embed_clip`` (clip_dim -> feat_dim, only when ``clip_dim`` is given). ``contrast`` holds the banks.
    """

    def __init__(self, student_dim: int, teacher_dim: int, clip_dim: Optional[int], feat_dim: int,
                 train_targets: torch.Tensor, nce_k: int, nce_temperature: float = 0.07,
                 nce_momentum: float = 0.5, nce_sampling: str = "other_class") -> None:
        super().__init__()
        self.embed_student = EmbedHead(student_dim, feat_dim)
        self.embed_teacher = EmbedHead(teacher_dim, feat_dim)
        self.embed_clip = EmbedHead(clip_dim, feat_dim) if clip_dim is not None else None
        self.contrast = ContrastMemory(feat_dim, train_targets, nce_k, nce_temperature, nce_momentum,
                                       sampling=nce_sampling)

    @property
    def num_data(self) -> int:
        return self.contrast.num_data

    def forward(self, h_s: torch.Tensor, h_t: torch.Tensor, e_clip: Optional[torch.Tensor], lam: float,
                index: torch.Tensor) -> torch.Tensor:
        """CRD loss scalar = NCE(student side) + NCE(fused-teacher side), unweighted.

        Args:
            h_s: (B, student_dim) pooled student feature (gradients flow into the student).
            h_t: (B, teacher_dim) pooled feature of the frozen teacher (detached here).
            e_clip: (B, clip_dim) CLIP image embedding (detached here), or None when ``lam == 1``.
            lam: fusion weight of the teacher; ``lam == 1`` uses the teacher embedding alone.
            index: (B,) training-set rows of the batch.

        Runs in float32 with autocast off: ``exp(score/0.07)`` reaches 1.6e6, beyond fp16's range.
        """
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            v_s = self.embed_student(h_s.float())
            v_t = self.embed_teacher(h_t.detach().float())
            if lam < 1:
                if self.embed_clip is None:
                    raise ValueError(f"FusedCRD: lam={lam} < 1 mixes in CLIP features, but this module was built "
                                     "without a CLIP head (clip_dim=None); pass clip_dim or use lam=1")
                if e_clip is None:
                    raise ValueError(f"FusedCRD: lam={lam} < 1 needs the CLIP image embeddings e_clip, got None")
                v_t = fuse_features(v_t, self.embed_clip(e_clip.detach().float()), lam)
            log_p_s, log_p_t = self.contrast(v_s, v_t, index)
            return nce_loss(log_p_s, self.num_data) + nce_loss(log_p_t, self.num_data)
