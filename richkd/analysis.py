"""Frozen-teacher analysis: teacher vs fused teacher vs CLIP zero-shot, on the validation or the test split.

The paper's Fig. 1 quantities (docs/method.md#two-frozen-teachers) plus accuracy and ECE of each, so a sweep
shows what fusion does to the targets before the student is involved; confidence is the temperature-1 softmax
maximum. Trials report them on the validation split, final runs also on the test split.
"""
from __future__ import annotations

import torch

from richkd.data import make_loader, normalize
from richkd.metrics import ClassificationMeter


@torch.no_grad()
def teacher_analysis(cfg, data, teachers, objective, device, split: str = "val") -> dict:
    """Metrics of the teachers on `split` (val or test); `teachers` must serve that split's rows."""
    dataset = {"val": data.val, "test": data.test}[split]
    if len(dataset) == 0:
        return {}
    threshold = cfg.loss.confidence_threshold
    meters = {name: ClassificationMeter(confidence_threshold=threshold)
              for name in ("teacher", "fused", "clip")}
    for batch in make_loader(dataset, cfg.data.eval_batch_size, shuffle=False, seed=0):
        batch = batch.to(device)
        out = teachers(batch, normalize(batch.image, data.mean, data.std))
        meters["teacher"].update(out.logits, batch.target)
        if cfg.loss.fused_teacher:
            meters["fused"].update(objective.teacher_logits(out), batch.target)
        if out.clip_cosine is not None:
            meters["clip"].update(out.clip_cosine, batch.target)
    metrics: dict = {}
    share = "" if split == "val" else f"{split}_"   # the validation names predate the test analysis
    for name in ("teacher", "fused"):
        if meters[name].n:
            m = meters[name].compute()
            metrics.update({f"{name}_{split}_top1": m["top1"], f"{name}_{split}_ece": m["ece"],
                            f"{name}_{share}confident_correct_pct": m["confident_correct_pct"],
                            f"{name}_{share}confidently_wrong_pct": m["confidently_wrong_pct"]})
    if meters["clip"].n:
        metrics[f"clip_zeroshot_{split}_top1"] = meters["clip"].compute()["top1"]
    return metrics
