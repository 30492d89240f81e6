"""Corruption scores: mean corruption accuracy, corruption error (CE), mCE and relative mCE against a reference.

Following Hendrycks & Dietterich (ICLR 2019, §4): for a model f and a reference model (AlexNet in the paper;
here any earlier `richkd evaluate` run, e.g. the teacher or a supervised student),

    CE_c          = sum_s E_{s,c}(f) / sum_s E_{s,c}(ref)
    relative CE_c = sum_s (E_{s,c}(f) - E_clean(f)) / sum_s (E_{s,c}(ref) - E_clean(ref))

and mCE / relative mCE are the means over corruptions c. Errors are top-1 error rates in percent; CE values
are reported in percent too (100 = as robust as the reference, lower is better), as in the paper's tables.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

ErrorTable = Mapping[str, Mapping[int, float]]   # corruption -> severity -> top-1 error in %


class ReferenceFileError(ValueError):
    """The reference file cannot be used (missing, not a robustness.json, nothing in common)."""


def corruption_errors(errors: ErrorTable, ref_errors: ErrorTable, clean_error: float = 0.0,
                      ref_clean_error: float = 0.0) -> dict[str, Optional[float]]:
    """CE_c in percent per corruption, over the severities both tables have (a corruption with none in common is
    left out); given the clean errors, the relative CE_c. None when the reference's summed error (increase) is
    <= 0: the reference made no error, or the corruption did not hurt it, and the ratio means nothing."""
    out: dict[str, Optional[float]] = {}
    for name, by_sev in errors.items():
        sevs = sorted(set(by_sev) & set(ref_errors.get(name, {})))
        if sevs:
            den = sum(ref_errors[name][s] - ref_clean_error for s in sevs)
            out[name] = 100.0 * sum(by_sev[s] - clean_error for s in sevs) / den if den > 0 else None
    return out


def mean_ce(ces: Mapping[str, Optional[float]]) -> Optional[float]:
    """Mean of the defined CE values (None if none is defined)."""
    vals = [v for v in ces.values() if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def load_reference(path: str | Path) -> dict:
    """Read a robustness.json of an earlier run: its error table, clean error, path, checkpoint, split and dataset."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceFileError(f"reference file {str(p)!r} does not exist; pass the robustness.json written by "
                                 "an earlier `richkd evaluate --suite corruptions` run")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReferenceFileError(f"{p}: not valid JSON ({exc})") from None
    try:
        table = data["corruptions"]["error"]
        errors = {str(c): {int(s): float(v) for s, v in sevs.items()} for c, sevs in table.items()}
        clean_error = 100.0 - float(data["clean"]["top1"])
    except (KeyError, TypeError, ValueError, AttributeError):
        errors = None
    if not errors:
        raise ReferenceFileError(f"{p}: no corruption error table (corruptions.error: corruption -> severity -> "
                                 "error); the reference must be a robustness.json of a `richkd evaluate` run with "
                                 "--suite corruptions or robustness")
    return {"errors": errors, "clean_error": clean_error, "path": str(p),
            **{k: data.get(k) for k in ("checkpoint", "split", "dataset")}}


def compare_to_reference(errors: ErrorTable, clean_error: float, reference: Mapping) -> dict:
    """CE / relative CE per corruption and their means against a reference from `load_reference`."""
    ce = corruption_errors(errors, reference["errors"])
    if not ce:
        raise ReferenceFileError(f"reference {reference['path']} shares no corruption and severity with this "
                                 f"evaluation (reference has {sorted(reference['errors'])}, this run "
                                 f"{sorted(errors)}); evaluate with the same --corruptions / --severities")
    skipped = sorted(set(errors) - set(ce))
    if skipped:
        log.warning("reference %s lacks corruptions %s; mCE uses the other %d", reference["path"], skipped, len(ce))
    rel = corruption_errors(errors, reference["errors"], clean_error, reference["clean_error"])
    return {"reference": reference["path"], "reference_checkpoint": reference.get("checkpoint"),
            "ce": ce, "relative_ce": rel, "mce": mean_ce(ce), "relative_mce": mean_ce(rel)}
