"""benchmarks/ab_builds.py: one build against itself, tiny points, one round (a smoke run: it times,
it does not judge speed)."""

import os
import sys

import pytest

from sparse_ops.ops import has_cpu_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ab_builds  # noqa: E402


KERNEL = has_cpu_kernel("sparse_ops::csr_linear_cpu")


@pytest.mark.skipif(not KERNEL and os.environ.get("SPARSE_OPS_REQUIRE_EXT") != "1",
                    reason="sparse_ops._C was not built")
@pytest.mark.parametrize("fmt", ["csr", "bsr16"])
def test_one_build_against_itself(fmt):
    out = ab_builds.main(["--builds", f"{ROOT},{ROOT}", "--shapes", "40x24:gelu,24x40", "--tokens", "1,17",
                          "--rounds", "1", "--budget-s", "0.01", "--format", fmt])
    assert out["format"] == fmt
    assert [(r["shape"], r["act"], r["tokens"]) for r in out["rows"]] == [
        ("40x24", "gelu", 1), ("40x24", "gelu", 17), ("24x40", "none", 1), ("24x40", "none", 17)]
    assert all(r["old_us"] > 0 and r["new_us"] > 0 and r["old_over_new"] > 0 for r in out["rows"])


def test_builds_and_shapes_are_checked():
    with pytest.raises(SystemExit, match="--builds must name two folders"):
        ab_builds.main(["--builds", ROOT])
    with pytest.raises(SystemExit, match="--format must be csr or bsrB"):
        ab_builds.main(["--builds", f"{ROOT},{ROOT}", "--format", "bsr0"])
    assert ab_builds.parse_shapes("8x4:gelu,3x5") == [(8, 4, "gelu"), (3, 5, "none")]
