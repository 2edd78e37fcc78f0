"""How often the claims' verdicts say "holds" on synthetic grids (sm_utils.analysis.calibration).

Under the null (two sources with the same o.o.d. AUC curve, the paper's RadImageNet tag curve;
5 folds; per-AUC noise SD 0.03, fold effect SD 0.02) the rate of "holds" must stay at or below
alpha: for claim 2 by fall and by level, for claim 1's equivalence with the sources exactly
the margin apart, and for claim 5b's "random barely falls" with random falling by the margin.
Then the same null with a source x test-set component (every fold is scored on one test set),
at half the fold SD of the difference: constant over p (which the fall cancels and the level
does not) and different per p (which neither cancels). Then the power at the demo's fold
spread (data/reference/demo_results.csv) for the paper's claim-2 effects (its reported means),
with 3, 5 and 10 folds. Each rate with its exact (Clopper-Pearson) 95 % interval.

Usage: python benchmarks/claims_calibration.py [--grids 10000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import sm_utils  # noqa: F401  (pins the numerics before numpy is imported)

# isort: split
import numpy as np
import pandas as pd

from sm_utils.analysis.calibration import (
    PAPER_TAG_OOD,
    PS,
    fold_spread,
    power,
    verdict_rates,
)
from sm_utils.analysis.claims import ALPHA, MARGIN, paper_claims

ROOT = Path(__file__).resolve().parents[1]
NOISE_SD = 0.03


def half_fold_sd_constant() -> float:
    """The SD of a per-source constant whose difference is half the fold SD of the difference
    in level (trapezoidal weights w over PS: fold SD of the difference NOISE_SD sqrt(2 sum w^2))."""
    ps = np.asarray(PS)
    w = np.zeros(len(ps))
    w[:-1] += np.diff(ps) / 2
    w[1:] += np.diff(ps) / 2
    w /= ps[-1] - ps[0]
    return 0.5 * NOISE_SD * float(np.sqrt(np.sum(w ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=10_000, help="synthetic grids per setting")
    n = parser.parse_args().grids
    same = [PAPER_TAG_OOD["radimagenet"]] * 2
    apart = [[v + MARGIN for v in PAPER_TAG_OOD["radimagenet"]], PAPER_TAG_OOD["radimagenet"]]
    flat = PAPER_TAG_OOD["radimagenet"][0]
    # random falling by exactly the margin (mean over p) against a source that does not fall
    falls = [[flat - MARGIN * (p > 0) / (1 - 0.05) for p in PS], [flat] * len(PS)]
    constant = half_fold_sd_constant()
    settings = [
        ("claim 2 by fall, sources alike", same, "fall", "greater", {}),
        ("claim 2 by level, sources alike", same, "level", "greater", {}),
        (f"claim 1 (TOST), sources {MARGIN} apart, noise 0.01", apart, "level", "equivalent",
         {"noise_sd": 0.01}),
        (f"claim 5b (TOST), random falls by {MARGIN}, noise 0.01", falls, "fall", "equivalent",
         {"noise_sd": 0.01}),
        ("claim 2 by fall, alike, + test-set constant", same, "fall", "greater",
         {"test_set_sd": constant}),
        ("claim 2 by level, alike, + test-set constant", same, "level", "greater",
         {"test_set_sd": constant}),
        ("claim 2 by fall, alike, + test-set part per p", same, "fall", "greater",
         {"test_set_p_sd": NOISE_SD / 2}),
        ("claim 2 by level, alike, + test-set part per p", same, "level", "greater",
         {"test_set_p_sd": NOISE_SD / 2}),
    ]
    print(f"alpha {ALPHA}; {n} synthetic grids per setting, 5 folds; noise SD {NOISE_SD}; "
          f"test-set components at half the fold SD of the difference (constant SD "
          f"{constant:.4f}, per p SD {NOISE_SD / 2})\n")
    print("| setting | holds | rate | exact 95 % interval | at most alpha |")
    print("|---|---|---|---|---|")
    for label, curves, measure, kind, noise in settings:
        r = verdict_rates(curves, measure, n, kind=kind, seed=0, **noise)
        ok = "yes" if r["rate_high"] <= ALPHA else ("no" if r["rate_low"] > ALPHA else "?")
        print(f"| {label} | {r['holds']} / {n} | {r['rate']:.4f} | "
              f"[{r['rate_low']:.4f}, {r['rate_high']:.4f}] | {ok} |")

    demo = pd.read_csv(ROOT / "data/reference/demo_results.csv")
    spread = fold_spread(demo)
    sd = float(np.sqrt(np.mean(spread["sd"] ** 2)))
    paper = paper_claims()
    effects = paper[(paper["claim"] == "2") & (paper["measure"] == "fall")]
    print(f"\nPower of claim 2 by fall at the demo's fold spread: SD of the fold differences "
          f"{', '.join(f'{r.confounder} {r.sd:.3f}' for r in spread.itertuples())} "
          f"(pooled {sd:.3f}), {n} draws each\n")
    print("| paper's effect (fall, reported means) | 3 folds | 5 folds | 10 folds |")
    print("|---|---|---|---|")
    for row in effects.itertuples():
        started = time.perf_counter()
        cells = []
        for folds in (3, 5, 10):
            r = power(row.effect, sd, folds, n_grids=n, seed=1)
            cells.append(f"{r['rate']:.3f} [{r['rate_low']:.3f}, {r['rate_high']:.3f}]")
        print(f"| {row.dataset} {row.confounder} {row.effect:+.3f} | " + " | ".join(cells)
              + f" |  <!-- {time.perf_counter() - started:.0f} s -->")


if __name__ == "__main__":
    main()
