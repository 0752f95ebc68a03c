import pytest

from sparse_ops.pruning.schedule import CubicSchedule


def test_cubic_formula_at_known_points():
    s = CubicSchedule(t_i=10, t_e=110, s_i=0.5, s_f=0.9)
    assert s.sparsity(0) == 0.0 and s.sparsity(9) == 0.0
    assert s.sparsity(10) == pytest.approx(0.5)  # the jump to s_i
    assert s.sparsity(60) == pytest.approx(0.9 + (0.5 - 0.9) * 0.5**3)
    assert s.sparsity(110) == 0.9 and s.sparsity(10_000) == 0.9
    values = [s.sparsity(t) for t in range(10, 111)]
    assert values == sorted(values)


def test_prune_count_is_exact_and_keeps_one():
    s = CubicSchedule(t_i=0, t_e=10, s_f=0.999)
    assert s.prune_count(10, 1000) == 999
    assert s.prune_count(10, 1) == 0
    assert CubicSchedule(t_i=0, t_e=10, s_f=0.9).prune_count(10, 37) == round(0.9 * 37)


@pytest.mark.parametrize("kwargs,match", [
    (dict(t_i=5, t_e=5, s_f=0.9), "t_e must be > t_i"),
    (dict(t_i=-1, t_e=5, s_f=0.9), "t_i must be a non-negative int"),
    (dict(t_i=0, t_e=5, s_f=1.0), r"s_f must lie in \[0, 1\)"),
    (dict(t_i=0, t_e=5, s_f=0.5, s_i=0.7), "s_i must be <= s_f"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CubicSchedule(**kwargs)
