"""How often the claims' checks say "holds" on synthetic grids (sm_utils.analysis.claims).

The synthetic results tables are the calibration tests' (tests/test_claims.py): each source's
o.o.d. AUC curve over the paper's prevalences, plus a shared fold effect and independent noise
per fold. Prints the rate of "holds" where it should be at most alpha (claim 2 when the two
sources do not differ; claim 1 with the in-domain source exactly the margin better when clean)
and where it should be high (claim 2 with the paper's tag curves, 5 folds), and what 3 folds
give. Usage: python benchmarks/claims_calibration.py [--grids 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import sm_utils  # noqa: F401  (pins the numerics before numpy is imported)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_claims import PAPER_TAG_OOD, synthetic_table, verdicts

from sm_utils.analysis.claims import ALPHA, HOLDS, MARGIN


def rate(n: int, curves: dict, claim: str, **kwargs) -> tuple[int, Counter]:
    counts = Counter(verdicts(synthetic_table(seed, curves, **kwargs), claim)[0]
                     for seed in range(n))
    return counts[HOLDS], counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, default=1000, help="synthetic grids per setting")
    n = parser.parse_args().grids
    same = {"imagenet": PAPER_TAG_OOD["radimagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    margin = {"imagenet": PAPER_TAG_OOD["radimagenet"],
              "radimagenet": [v + MARGIN for v in PAPER_TAG_OOD["radimagenet"]]}
    paper = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    settings = [
        ("claim 2, sources alike, 5 folds (should be <= alpha; exact 1/32)", same, "2", {}),
        (f"claim 1, in-domain {MARGIN} better when clean, 5 folds (<= alpha)", margin, "1",
         {"noise": 0.01}),
        ("claim 2, the paper's tag curves, 5 folds (power)", paper, "2", {}),
        ("claim 2, the paper's tag curves, 3 folds (cannot tell)", paper, "2", {"n_folds": 3}),
    ]
    print(f"alpha {ALPHA}; {n} synthetic grids per setting")
    for label, curves, claim, kwargs in settings:
        started = time.perf_counter()
        holds, counts = rate(n, curves, claim, **kwargs)
        print(f"{label}: holds {holds}/{n} = {holds / n:.3f}  {dict(counts)}  "
              f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
