"""Frozen-teacher analysis: teacher vs fused teacher vs CLIP zero-shot, on the validation or the test split.

These are the paper's Fig. 1 quantities (confident-correct / confidently-wrong shares of the conventional
teacher and of the fused teacher; docs/method.md#two-frozen-teachers) plus accuracy and ECE of each, so a sweep
shows what fusion does to the targets before the student is involved. Confidence is the temperature-1 softmax
maximum. Trials report them on the validation split (`teacher_val_top1`, `teacher_confident_correct_pct`, ...);
final runs also on the test split (`teacher_test_top1`, `teacher_test_confident_correct_pct`, ...).
"""
from __future__ import annotations

import torch

from richkd.data import make_loader, normalize
from richkd.metrics import confidence_categories, expected_calibration_error


@torch.no_grad()
def teacher_analysis(cfg, data, teachers, objective, device, split: str = "val") -> dict:
    """Metrics of the teachers on `split` (val or test); `teachers` must serve that split's rows."""
    dataset = {"val": data.val, "test": data.test}[split]
    loader = make_loader(dataset, cfg.data.eval_batch_size, shuffle=False, seed=0)
    collected: dict[str, list[torch.Tensor]] = {"teacher": [], "fused": [], "clip": [], "target": []}
    for batch in loader:
        batch = batch.to(device)
        out = teachers(batch, normalize(batch.image, data.mean, data.std))
        collected["teacher"].append(out.logits.float().cpu())
        if cfg.loss.fused_teacher:
            collected["fused"].append(objective.teacher_logits(out).cpu())
        if out.clip_cosine is not None:
            collected["clip"].append(out.clip_cosine.float().cpu())
        collected["target"].append(batch.target.cpu())
    if not collected["target"]:
        return {}
    target = torch.cat(collected["target"])
    metrics: dict = {}
    threshold = cfg.loss.confidence_threshold
    share = "" if split == "val" else f"{split}_"   # the validation names predate the test analysis
    for name, parts in (("teacher", collected["teacher"]), ("fused", collected["fused"])):
        if not parts:
            continue
        probs = torch.cat(parts).softmax(dim=1)
        n = len(target)
        metrics[f"{name}_{split}_top1"] = 100.0 * float((probs.argmax(1) == target).float().mean())
        metrics[f"{name}_{split}_ece"] = float(expected_calibration_error(probs, target))
        cats = confidence_categories(probs, target, threshold)
        metrics[f"{name}_{share}confident_correct_pct"] = 100.0 * cats["confident_correct"] / n
        metrics[f"{name}_{share}confidently_wrong_pct"] = 100.0 * cats["confidently_wrong"] / n
    if collected["clip"]:
        cosine = torch.cat(collected["clip"])
        metrics[f"clip_zeroshot_{split}_top1"] = 100.0 * float((cosine.argmax(1) == target).float().mean())
    return metrics
