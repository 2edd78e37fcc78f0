"""A notebook's own check of its floating-point results against committed reference values.

nbval compares a notebook's printed outputs exactly, which suits counts, configurations and
data checks. Numbers from training, probes and attribution are exact only where the numeric
code paths are the same: pinned numerics (:mod:`sm_utils.numerics`) on x86-64 with the same
library versions and BLAS. So a notebook hands those numbers to :func:`check_notebook`, which
compares them with ``data/reference/notebooks/<notebook>.json``:

- bit for bit where this process's numerics fingerprint equals the reference's;
- elsewhere (another BLAS, another architecture, ``SM_NUMERICS=native``) within each value's
  tolerance. A few epochs of training turn another CPU's last bits into another trained model,
  so the tolerance comes from the spread of the value over training seeds
  (:func:`seed_spread`, a normal prediction interval) and is never below 1.5 x the largest
  difference measured under other CPUs' kernels (``benchmarks/notebook_spread.py`` writes
  both beside the values; a value those runs left undefined on one side, NaN or absent, may be
  so here too);
- not at all when the notebook ran with other parameters than the reference's (a grid, or
  a user's own settings): the check says so.

The one line :attr:`RegressionCheck.summary` is the same on every machine where the check
passes (nbval compares it); :attr:`RegressionCheck.details` says how it compared. A failed
check never raises (a user's demo goes on): its summary line differs, and a warning lists the
largest differences. ``SM_RECORD_REFERENCE=1`` writes the values as the new reference instead, and
``SM_REGRESSION_OUT=FOLDER`` writes them there as well (what the spread benchmark reads).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import numerics
from .io import atomic_write_json
from .paths import resolve

RECORD_ENV = "SM_RECORD_REFERENCE"
OUT_ENV = "SM_REGRESSION_OUT"  # a folder: each check also writes the values it saw there
REFERENCE_DIR = "data/reference/notebooks"
# Versions of the libraries whose arithmetic reaches the notebooks' numbers.
FINGERPRINT_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "timm", "pillow",
                        "scikit-image", "captum", "pandas")


# The seed spread's rule: a notebook whose every value is a fresh draw from its distribution
# over training seeds fails its check with probability at most this (Bonferroni over the
# values that moved; exact for each value under normality).
NOTEBOOK_FAILURE_RATE = 0.01
MIN_SEEDS = 10


class RegressionError(ValueError):
    """Values that cannot be compared with a reference (malformed input or reference)."""


def fingerprint() -> dict[str, Any]:
    """Everything that decides the bits of a float result on this machine's CPU."""
    from importlib.metadata import PackageNotFoundError, version

    state = numerics.describe()
    versions = {}
    for name in FINGERPRINT_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"pinned": state["pinned"], "profile": state["profile"], "machine": state["machine"],
            "aten_capability": state["aten_capability"], "numpy_dispatch": state["numpy_dispatch"],
            "blas": state["blas"],
            "env": {k: v for k, v in state["env"].items() if k in numerics.PINNED_VARIABLES},
            "versions": versions}


SEPARATOR = " | "  # between a key's table, index entries and column (names may hold "/")


def flatten(tables: dict[str, pd.DataFrame | pd.Series | dict]) -> dict[str, float]:
    """``{"table | index=value | ... | column": number}`` for every numeric cell of each table.
    Tables are indexed by their keys (``frame.set_index([...])``); a dict or Series is one row.
    A tolerance is given per quantity, a table's column (:func:`quantity`)."""
    values: dict[str, float] = {}
    for table, data in tables.items():
        if isinstance(data, dict):
            data = pd.Series(data)
        frame = data.to_frame().T if isinstance(data, pd.Series) else data
        if frame.index.has_duplicates:
            raise RegressionError(f"table {table!r} has duplicate index entries; index it by "
                                  "the columns that identify a row (set_index).")
        names = [n or "row" for n in frame.index.names]
        for index, row in frame.iterrows():
            index = index if isinstance(index, tuple) else (index,)
            prefix = SEPARATOR.join([table, *(f"{n}={_label(v)}" for n, v in zip(names, index))])
            for column, value in row.items():
                number = _number(value)
                if number is not None:
                    values[f"{prefix}{SEPARATOR}{column}"] = number
    return values


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def quantity(key: str) -> str:
    """The table and column of a key: what one tolerance covers."""
    parts = key.split(SEPARATOR)
    return f"{parts[0]}{SEPARATOR}{parts[-1]}"


@dataclass
class RegressionCheck:
    notebook: str
    path: Path
    status: str                        # "recorded", "exact", "tolerance", "skipped", "failed"
    n_values: int = 0
    reason: str = ""
    largest: list[tuple[str, float, float, float]] = field(default_factory=list)
    # (key, value, reference value, allowed difference), largest difference first
    likelihood: dict[str, float] = field(default_factory=dict)
    # key -> how likely a difference this size is under the seed spread (prediction_p)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @property
    def summary(self) -> str:
        where = _shown(self.path)
        if self.status == "skipped":
            return f"{self.notebook}: not compared with {where} ({self.reason})"
        if self.ok:
            return f"{self.notebook}: {self.n_values} values as in {where}"
        return (f"{self.notebook}: {len(self.largest)} of {self.n_values} values DIFFER from "
                f"{where} ({self.reason})")

    @property
    def details(self) -> str:
        how = {"recorded": "recorded as the new reference (SM_RECORD_REFERENCE)",
               "exact": "compared bit for bit: the numerics fingerprint equals the reference's",
               "tolerance": "compared within the measured tolerances: " + self.reason,
               "skipped": "not compared: " + self.reason,
               "failed": "FAILED: " + self.reason}[self.status]
        lines = [how]
        if self.largest and self.status in ("tolerance", "failed"):
            lines.append("largest differences (value, reference, allowed"
                         + ("; how likely a value this far from the seeds' mean is)"
                            if self.likelihood else ")") + ":")
            lines += [f"  {key}: {value:.6g} vs {ref:.6g} (allowed {allowed:.3g}"
                      + (f"; p = {self.likelihood[key]:.2g}" if key in self.likelihood else "")
                      + ")" for key, value, ref, allowed in self.largest[:10]]
        return "\n".join(lines)


def _shown(path: Path) -> str:
    from .paths import project_root

    try:
        return str(path.resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def check_notebook(notebook: str, tables: dict[str, Any], parameters: dict[str, Any], *,
                   identities: dict[str, str] | None = None,
                   reference_dir: str | os.PathLike | None = None) -> RegressionCheck:
    """Compare a notebook's numbers (``tables``, see :func:`flatten`) with its reference,
    made with ``parameters`` (the notebook's parameters that decide the numbers).
    ``identities`` (e.g. a weights file's sha256) are compared only bit for bit, where the
    numerics are the reference's."""
    path = resolve(reference_dir or REFERENCE_DIR) / f"{notebook}.json"
    values = flatten(tables)
    identities = dict(identities or {})
    if os.environ.get(OUT_ENV):  # benchmarks/notebook_spread.py reads what each notebook saw
        atomic_write_json(Path(os.environ[OUT_ENV]) / f"{notebook}.json",
                          {"notebook": notebook, "values": values, "numerics": fingerprint()})
    parameters = json.loads(json.dumps(parameters, default=str))
    here = fingerprint()
    stored = json.loads(path.read_text()) if path.exists() else {}
    if os.environ.get(RECORD_ENV, "") not in ("", "0"):
        atomic_write_json(path, {"notebook": notebook, "parameters": parameters,
                                 "numerics": here, "values": values, "identities": identities,
                                 "tolerances": stored.get("tolerances", {}),
                                 **{k: stored[k] for k in ("spread", "spread_rule", "spread_measured")
                                    if k in stored}})
        return RegressionCheck(notebook, path, "recorded", len(values))
    if not stored:
        return RegressionCheck(notebook, path, "skipped", reason=f"no reference: write one with "
                               f"{RECORD_ENV}=1")
    changed = sorted(k for k in set(parameters) | set(stored["parameters"])
                     if parameters.get(k) != stored["parameters"].get(k))
    if changed:
        return RegressionCheck(notebook, path, "skipped",
                               reason="other parameters than the reference's: "
                                      + ", ".join(changed))
    reference = stored["values"]
    exact = here == stored["numerics"]
    tolerances = {} if exact else stored.get("tolerances", {})
    spread = {} if exact else stored.get("spread", {})
    missing, extra = sorted(set(reference) - set(values)), sorted(set(values) - set(reference))
    if not exact:  # an undefined value (NaN) may be absent from a table: compared as NaN below
        missing, extra = ([k for k in keys if not _may_be_undefined(tolerances, spread, k)]
                          for keys in (missing, extra))
    if missing or extra:
        reason = "; ".join(part for part in (
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"not in the reference: {', '.join(extra[:5])}" if extra else "") if part)
        return _failed(RegressionCheck(notebook, path, "failed", len(values), reason=reason))
    rows = []
    if exact:
        for key, ref in stored.get("identities", {}).items():
            if identities.get(key) != ref:
                return _failed(RegressionCheck(
                    notebook, path, "failed", len(values),
                    reason=f"{key} is {identities.get(key)}, not {ref}, though the numerics are "
                           "the reference's"))
    for key in sorted(set(reference) | set(values)):
        ref, value = reference.get(key, math.nan), values.get(key, math.nan)
        allowed = 0.0 if exact else allowed_difference(tolerances, spread, key, ref)
        difference = 0.0 if _same(value, ref) else abs(value - ref)
        if math.isnan(difference):  # defined on one side only
            if not exact and _may_be_undefined(tolerances, spread, key):
                continue
            difference = math.inf
        if difference > 0:
            rows.append((key, value, ref, allowed, difference))
    rows.sort(key=lambda r: r[4] - r[3], reverse=True)
    failing = [r for r in rows if r[4] > r[3]]
    if exact:
        reason = ""
    else:
        differing = sorted(k for k in ("pinned", "profile", "machine", "aten_capability",
                                       "numpy_dispatch", "blas", "env", "versions")
                           if here.get(k) != stored["numerics"].get(k))
        reason = "this machine's numerics differ from the reference's in " + ", ".join(differing)
        if spread:
            reason += f"; {stored.get('spread_rule', '')}"
    likelihood = {k: prediction_p(spread[k], v) for k, v, *_ in rows if k in spread}
    largest = [(k, v, r, a) for k, v, r, a, _ in (failing or rows)]
    if failing:
        quantities = sorted({quantity(r[0]) for r in failing})
        spread_quantities = {quantity(k) for k in spread}
        untolerated = [q for q in quantities if q not in tolerances and q not in spread_quantities]
        reason = ("not bit for bit, though the numerics are the reference's" if exact else
                  f"beyond the tolerance of {', '.join(quantities)}"
                  + (f" (no tolerance measured for {', '.join(untolerated)})"
                     if untolerated else ""))
        return _failed(RegressionCheck(notebook, path, "failed", len(values), reason=reason,
                                       largest=[(k, v, r, a) for k, v, r, a, _ in failing],
                                       likelihood=likelihood))
    # the reference's count: a tolerated absent value must not change the line nbval compares
    return RegressionCheck(notebook, path, "exact" if exact else "tolerance", len(reference),
                           reason=reason, largest=largest, likelihood=likelihood)


def _may_be_undefined(tolerances: dict, spread: dict, key: str) -> bool:
    """Whether other seeds or other CPUs' kernels were seen to leave this value (or its
    quantity) undefined on one side."""
    return (spread.get(key, {}).get("undefined_on_one_side", 0) > 0
            or tolerances.get(quantity(key), {}).get("undefined_on_one_side", 0) > 0)


def allowed_difference(tolerances: dict, spread: dict, key: str, reference: float) -> float:
    """How far this value may be from ``reference``: the seed spread's prediction interval
    around the seeds' mean, widened to every seed seen, measured from the reference; never
    below its quantity's tolerance from other CPUs' kernels."""
    kernels = float(tolerances.get(quantity(key), {}).get("tolerance", 0.0))
    entry = spread.get(key)
    if not entry or entry["n"] == 0 or math.isnan(reference):
        return kernels
    seeds = max(abs(entry["mean"] - reference) + entry["half_width"],
                abs(entry["min"] - reference), abs(entry["max"] - reference))
    return max(kernels, seeds)


def seed_spread(reference: dict[str, float], draws: list[dict[str, float]], *,
                failure_rate: float = NOTEBOOK_FAILURE_RATE) -> dict[str, dict]:
    """Per value of ``reference``: its distribution over training seeds (``draws``, one
    :func:`flatten`-ed dict per seed) and the half width of the normal prediction interval a
    new draw falls in with probability 1 - ``failure_rate`` / (values that moved):
    t(n - 1) x sd x sqrt(1 + 1/n), sd the largest over the values of its quantity. A quantity
    none of whose values moved over the seeds gets width 0."""
    from scipy import stats

    if len(draws) < 2:
        raise RegressionError(f"a seed spread needs at least 2 seeds' values, got {len(draws)}")
    entries = {}
    for key, ref in reference.items():
        seen = [d.get(key, math.nan) for d in draws]
        xs = [x for x in seen if not math.isnan(x)]
        undefined = sum(math.isnan(x) != math.isnan(ref) for x in seen)
        n = len(xs)
        mean = math.fsum(xs) / n if n else math.nan
        sd = (0.0 if min(xs) == max(xs) else math.sqrt(math.fsum((x - mean) ** 2 for x in xs)
                                                       / (n - 1))) if n > 1 else math.nan
        entries[key] = {"seeds": len(draws), "n": n, "mean": mean, "sd": sd, "min": min(xs, default=math.nan),
                        "max": max(xs, default=math.nan), "undefined_on_one_side": undefined}
    # The scale of a quantity (one column of one table: every test set's AUC, every probe's
    # AUC) is shared by its values: a value that moved in no seed, or in one, would otherwise
    # get a width of 0 from a rare event the seeds happened to miss.
    pooled: dict[str, float] = {}
    for key, entry in entries.items():
        if entry["n"] > 1:
            pooled[quantity(key)] = max(pooled.get(quantity(key), 0.0), entry["sd"])
    moved = [e for e in entries.values() if e["n"] > 1 and e["sd"] > 0]
    alpha = failure_rate / max(1, len(moved))
    for key, entry in entries.items():
        n, sd = entry["n"], pooled.get(quantity(key), 0.0)
        entry["sd_quantity"] = sd
        if n < 2:  # too few defined draws to bound it: no spread beyond what was seen
            entry["half_width"] = 0.0
        else:
            entry["half_width"] = (float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd
                                   * math.sqrt(1 + 1 / n)) if sd > 0 else 0.0
        entry["alpha"] = alpha
    return entries


def prediction_p(entry: dict, value: float) -> float:
    """How likely a draw differs from the seeds' mean at least as much as ``value`` does
    (two-sided, the prediction distribution of :func:`seed_spread`)."""
    from scipy import stats

    if entry["n"] < 2 or math.isnan(value):
        return math.nan
    distance = abs(value - entry["mean"])
    sd = entry.get("sd_quantity", entry["sd"])
    if sd == 0:
        return 1.0 if distance == 0 else 0.0
    scale = sd * math.sqrt(1 + 1 / entry["n"])
    return float(2 * stats.t.sf(distance / scale, entry["n"] - 1))


def _failed(check: RegressionCheck) -> RegressionCheck:
    warnings.warn(f"{check.summary}\n{check.details}\nIf the change is intended, record the new "
                  f"values: {RECORD_ENV}=1 sm notebook notebooks/{check.notebook}.ipynb "
                  f"notebooks/{check.notebook}.ipynb", RuntimeWarning, stacklevel=3)
    return check
