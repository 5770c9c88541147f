"""Conformance: every tshark-oracle direction of the corpus is reproduced exactly, or listed in
conformance_expected.tsv with a category from the documented policies (README "Policies").

The test fails on an unlisted difference, on a listed direction that no longer differs (the
list must shrink when streamtap improves), and on an unknown category.
"""

from __future__ import annotations

from pathlib import Path

from conformance import CATEGORIES, all_differences, load_expected


def test_tshark_oracle_directions(corpus_dir: Path) -> None:
    total, diffs = all_differences(corpus_dir)
    expected = load_expected()
    found = {(d.file, d.stream, d.side): why for d, why in diffs}
    unlisted = {k: v for k, v in found.items() if k not in expected}
    fixed = [k for k in expected if k not in found]
    bad_cat = {k: v[0] for k, v in expected.items() if v[0] not in CATEGORIES}
    exact = total - len(found)
    print(f"\nconformance: {exact}/{total} tshark directions exact "
          f"({100.0 * exact / total:.2f}%), {len(found)} differ, all categorized: "
          f"{not unlisted}")
    assert not bad_cat, f"unknown categories: {bad_cat}"
    assert not unlisted, "differences not in conformance_expected.tsv:\n" + "\n".join(
        f"{f}\t{s}\t{side}\t{why}" for (f, s, side), why in sorted(unlisted.items()))
    assert not fixed, "listed as different but now exact (remove them):\n" + "\n".join(
        f"{f}\t{s}\t{side}" for f, s, side in sorted(fixed))
    assert total > 2400, "oracle file looks incomplete"
