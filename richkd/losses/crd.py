"""Contrastive representation distillation (CRD) between the student and the fused teacher: projection heads,
memory banks with class-aware negatives, the NCE loss. docs/method.md#feature-fusion-and-crd explains each part
and where it differs from the official code."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.config import ConfigError
from richkd.fusion import fuse_features

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
    """mdistiller's ``Embed``: Linear to the CRD space, then L2 normalisation; (B, ...) -> (B, d_out) unit rows."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def nce_loss(log_p: torch.Tensor, num_data: int) -> torch.Tensor:
    """CRD's NCE loss (mdistiller ``ContrastLoss``), a scalar, from ``log_p`` (B, K+1): ``log P`` of the positive
    (column 0) and the K negatives, against the uniform noise ``Pn = 1/N`` of an N-row bank (``num_data``).
    In log space with softplus (``log(P/(P+c)) = -softplus(log c - log P)``), which cannot overflow, and without
    the official eps (docs/method.md#feature-fusion-and-crd says why)."""
    batch, cols = log_p.shape
    k = cols - 1
    log_c = math.log(k / float(num_data))           # log(K * Pn)
    pos = F.softplus(log_c - log_p[:, 0]).sum()      # -log(P_pos / (P_pos + K Pn))
    neg = F.softplus(log_p[:, 1:] - log_c).sum()     # -log(K Pn / (P_neg + K Pn))
    return (pos + neg) / batch


def check_negatives(train_targets: torch.Tensor, nce_k: int) -> None:
    """ConfigError unless every class of the training rows has more than `nce_k` rows of other classes (a small
    data.max_train_samples may not); a bincount, so `richkd.validate` runs it before any cache is built."""
    targets = torch.as_tensor(train_targets).long()
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
    """Memory banks of student and fused-teacher embeddings with class-aware negative sampling
    (docs/method.md#feature-fusion-and-crd).

    Persistent buffers (in checkpoints): ``memory_student`` and ``memory_teacher`` (N, feat_dim), initialised
    uniformly in ``±1/sqrt(feat_dim/3)`` as in CRD; ``log_z_student`` and ``log_z_teacher``, log Z, NaN until
    the first batch fixes them. Rebuilt from ``train_targets``, never saved: ``class_of`` (N,), ``class_order``
    (dataset rows sorted by class), ``class_start`` and ``class_count`` (C,). Negatives (loss.nce_sampling) are
    drawn from OTHER classes on the buffers' device with its global RNG (reproducible under torch.manual_seed).
    """

    def __init__(self, feat_dim: int, train_targets: torch.Tensor, nce_k: int,
                 temperature: float = 0.07, momentum: float = 0.5, score_mode: str = "auto",
                 sampling: str = "other_class") -> None:
        super().__init__()
        targets = torch.as_tensor(train_targets).detach().to("cpu").long()
        check_negatives(targets, nce_k)
        n = targets.numel()
        counts = torch.bincount(targets)

        self.num_data = n
        self.nce_k = int(nce_k)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.sampling = sampling
        # Scores from the full bank (one (B, N) matmul, score_mode dense) avoid materialising the (B, K+1, d)
        # gather, which is 0.5 GB per side for CIFAR (B=64, K=16384, d=128); the gather wins when N >> K (ImageNet).
        self._dense = n <= 8 * (nce_k + 1) if score_mode == "auto" else score_mode == "dense"
        # Random bits per draw so that (bits) * (N) still fits in int64 (see _draw()).
        self._bits = 62 - max(1, (n - 1).bit_length())
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

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """Contrast indices (B, K+1): column 0 is ``index`` (the positive), then K rows of other classes."""
        index = index.to(self.class_of.device).long()
        y = self.class_of[index]
        start, count = self.class_start[y].unsqueeze(1), self.class_count[y].unsqueeze(1)
        if self.sampling == "uniform":      # i.i.d. with replacement
            r = self._draw(self.num_data - count, index.numel())
        elif self._rejection:
            r = self._sample_rejection(count, index.numel())
        else:
            r = self._sample_distinct(count, index.numel())
        return torch.cat([index.unsqueeze(1), self._rows_of(r, start, count)], dim=1)

    def _sample_distinct(self, count: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, K) distinct positions r < M_b = N - count_b per sample: the K smallest of uniform keys (a uniformly
        random K-subset). Columns past M_b (classes larger than the smallest) get key 2, above every draw; keys
        are drawn for a chunk of the batch at a time, at most 2^24 of them (64 MB)."""
        width = self._width
        columns = torch.arange(width, device=count.device)
        chunk = max(1, _KEYS_PER_CHUNK // width)
        parts = []
        for lo in range(0, batch, chunk):
            hi = min(lo + chunk, batch)
            keys = torch.rand(hi - lo, width, device=count.device)
            if self._uneven:
                keys.masked_fill_(columns >= (self.num_data - count[lo:hi]), 2.0)
            parts.append(torch.topk(keys, self.nce_k, dim=1, largest=False, sorted=False).indices)
        return torch.cat(parts)

    def _sample_rejection(self, count: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, K) distinct positions per sample by rejection, for N >> K (e.g. full ImageNet): K i.i.d. draws, then
        every repeat within a sample is drawn again until none is left; all rows are treated alike, so the
        K-subset is as uniform as `_sample_distinct`'s. A round leaves about K^2 / 2M repeats (M other-class
        rows), so with M >= 32 K a handful of rounds finish, one host sync each."""
        r = self._draw(self.num_data - count, batch)
        while True:
            r = r.sort(dim=1).values
            repeat = torch.zeros_like(r, dtype=torch.bool)
            repeat[:, 1:] = r[:, 1:] == r[:, :-1]
            if not bool(repeat.any()):
                return r
            r = torch.where(repeat, self._draw(self.num_data - count, batch), r)

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
        if torch.is_grad_enabled() and v.requires_grad:
            # backward reads the bank (the matmul saves it; the gather path gathers again), and forward() then
            # updates it in place: score against a snapshot
            memory = memory.clone()
        if self._dense:
            dots = (v @ memory.t()).gather(1, contrast_index)
        else:
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
        """Log scores ``(log P_student, log P_teacher)``, each (B, K+1), of the unit embeddings (B, d) of the batch's
        rows ``index``, then the momentum update of both banks at ``index``. As in mdistiller's ContrastMemory,
        each side is scored against the other side's bank (the student against the teacher bank: CRD's out_v1).
        ``contrast_index`` (B, K+1), column 0 = index, is sampled when None."""
        index = index.long()
        contrast_index = self.sample(index) if contrast_index is None else contrast_index.long()

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
    """RichKD feature term: CRD between the student and ``normalize(lam*e_T + (1-lam)*e_C)``
    (docs/method.md#feature-fusion-and-crd). The heads ``embed_student``, ``embed_teacher`` and ``embed_clip``
    (only with ``clip_dim``) are trainable and belong in the optimiser; ``contrast`` holds the banks."""

    def __init__(self, student_dim: int, teacher_dim: int, clip_dim: Optional[int], feat_dim: int,
                 train_targets: torch.Tensor, nce_k: int, nce_temperature: float = 0.07,
                 nce_momentum: float = 0.5, nce_sampling: str = "other_class") -> None:
        super().__init__()
        self.embed_student = EmbedHead(student_dim, feat_dim)
        self.embed_teacher = EmbedHead(teacher_dim, feat_dim)
        self.embed_clip = EmbedHead(clip_dim, feat_dim) if clip_dim is not None else None
        self.contrast = ContrastMemory(feat_dim, train_targets, nce_k, nce_temperature, nce_momentum,
                                       sampling=nce_sampling)

    def forward(self, h_s: torch.Tensor, h_t: torch.Tensor, e_clip: Optional[torch.Tensor], lam: float,
                index: torch.Tensor) -> torch.Tensor:
        """NCE(student side) + NCE(fused-teacher side), unweighted, from the pooled student feature ``h_s``, the
        frozen teacher's ``h_t`` and CLIP's ``e_clip`` (both detached here; None when ``lam == 1``) of the batch's
        training rows ``index``. In float32 with autocast off: ``exp(score/0.07)`` reaches 1.6e6, beyond fp16."""
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
            return nce_loss(log_p_s, self.contrast.num_data) + nce_loss(log_p_t, self.contrast.num_data)
