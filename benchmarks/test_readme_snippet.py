"""The README's "In one screen" snippet without any XLA flag, beside the flagged run.

See `readme_snippet.py`: fresh processes, alternating, the snippet's code block
as README.md has it. Target: no flag / flag <= 1.05 (the library's programs
compile with the fast XLA:CPU options by themselves). `--benchmark-disable`
runs one tiny round of each.
"""

from __future__ import annotations

import readme_snippet


def test_readme_snippet_without_flag(benchmark, quick):
    sizes = readme_snippet.QUICK if quick else readme_snippet.FULL
    repeats, steps = (1, 4) if quick else (3, 12)
    results = []
    benchmark.group = "readme-snippet"
    benchmark.pedantic(
        lambda: results.append(readme_snippet.compare(repeats, steps, sizes)),
        rounds=1,
    )
    result = results[-1]
    benchmark.extra_info.update(
        workload="readme-snippet",
        sizes=sizes,
        no_flag_s=result["no_flag_s"],
        flag_s=result["flag_s"],
        ratio=result["ratio"],
        load=result["load"],
    )
    assert all(r["median_s"] > 0 for r in result["runs"])
    assert {r["xla_flags"] for r in result["runs"]} == {None, readme_snippet.FLAG}
