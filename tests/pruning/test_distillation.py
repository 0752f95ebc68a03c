"""sparse_ops.distillation_loss against the §3.6 formula written out by hand in float64 (explicit exp, sum
and log; KL as Σ p_t (log p_t − log p_s)), on fresh random inputs: shapes, temperatures, alphas, 16-bit
logits, ignored rows, gradients (gradcheck in float64) and every bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import one_thread  # noqa: F401  (module-scoped fixture: one thread)

import sparse_ops
from sparse_ops import distillation_loss


def log_softmax64(z):
    """log softmax by hand in float64: z − max − log Σ exp(z − max)."""
    z = z.double()
    shifted = z - z.max(dim=-1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def reference(student, teacher, labels, temperature, alpha):
    """The loss of docs/design.md §2.7 in float64, row by row, then the mean over rows whose label is not -100."""
    classes = student.shape[-1]
    s = student.detach().double().reshape(-1, classes)
    t = teacher.detach().double().reshape(-1, classes)
    y = labels.reshape(-1)
    total, rows = 0.0, 0
    for i in range(len(y)):
        if int(y[i]) == -100:
            continue
        ce = -log_softmax64(s[i])[int(y[i])]
        log_ps, log_pt = log_softmax64(s[i] / temperature), log_softmax64(t[i] / temperature)
        kl = (torch.exp(log_pt) * (log_pt - log_ps)).sum()
        total += float((1 - alpha) * ce + alpha * temperature ** 2 * kl)
        rows += 1
    return total / rows


def random_case(shape, classes, seed, ignore=0.0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*shape, classes, generator=g)).to(dtype)
    teacher = (scale * torch.randn(*shape, classes, generator=g)).to(dtype)
    labels = torch.randint(0, classes, shape, generator=g)
    if ignore:
        drop = torch.rand(shape, generator=g) < ignore
        drop.view(-1)[0] = False  # at least one row keeps its label
        labels[drop] = -100
    return student, teacher, labels


def test_exported_from_the_package():
    assert sparse_ops.distillation_loss is distillation_loss


@pytest.mark.parametrize("shape,classes", [((1,), 2), ((8,), 2), ((16,), 7), ((3, 5), 11), ((2, 3, 4), 5), ((), 4)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_matches_the_formula_in_float64(shape, classes, temperature, alpha):
    seed = hash((shape, classes, temperature, alpha)) % 2 ** 31
    student, teacher, labels = random_case(shape, classes, seed)
    got = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert float(got) == pytest.approx(reference(student, teacher, labels, temperature, alpha), rel=1e-5, abs=1e-6)


def test_defaults_are_temperature_2_and_alpha_half():
    student, teacher, labels = random_case((6,), 4, seed=1)
    assert float(distillation_loss(student, teacher, labels)) == pytest.approx(
        reference(student, teacher, labels, 2.0, 0.5), rel=1e-5)


@pytest.mark.parametrize("shape,classes", [((9,), 3), ((4, 6), 13)])
def test_alpha_0_is_cross_entropy_and_alpha_1_is_pure_distillation(shape, classes):
    student, teacher, labels = random_case(shape, classes, seed=2, ignore=0.3)
    ce = F.cross_entropy(student.reshape(-1, classes), labels.reshape(-1))  # ignore_index=-100 by default
    torch.testing.assert_close(distillation_loss(student, teacher, labels, alpha=0.0), ce)
    # alpha = 0 never looks at the teacher's logits
    assert torch.equal(distillation_loss(student, torch.full_like(teacher, math.nan), labels, alpha=0.0),
                       distillation_loss(student, teacher, labels, alpha=0.0))
    # alpha = 1: the T²-scaled KL alone, which does not depend on the labels (only on which rows are kept)
    t = 3.0
    keep = labels.reshape(-1) != -100
    log_ps = F.log_softmax(student.reshape(-1, classes)[keep].double() / t, -1)
    log_pt = F.log_softmax(teacher.reshape(-1, classes)[keep].double() / t, -1)
    kd = t * t * F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
    got = distillation_loss(student, teacher, labels, temperature=t, alpha=1.0)
    assert float(got) == pytest.approx(float(kd), rel=1e-5)
    other = torch.where(labels == -100, labels, (labels + 1) % classes)
    assert float(distillation_loss(student, teacher, other, temperature=t, alpha=1.0)) == pytest.approx(float(got))


def test_identical_logits_leave_only_the_cross_entropy():
    student, _, labels = random_case((10,), 5, seed=3)
    got = distillation_loss(student, student.clone(), labels, alpha=0.25)
    assert float(got) == pytest.approx(0.75 * float(F.cross_entropy(student, labels)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (2.0, 0.0)])
def test_16_bit_logits_are_computed_in_float32(dtype, temperature, alpha):
    student, teacher, labels = random_case((4, 8), 9, seed=4, ignore=0.2, scale=8.0, dtype=dtype)
    got = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert got.dtype == torch.float32 and got.dim() == 0
    # the 16-bit values themselves are exact inputs; only float32 rounding separates the result from float64
    assert float(got) == pytest.approx(reference(student, teacher, labels, temperature, alpha), rel=1e-5, abs=1e-6)


def test_mixed_dtypes_and_large_logits_do_not_overflow():
    student, teacher, labels = random_case((6,), 4, seed=5)
    student, teacher = (student * 2e3).half().float(), (teacher * 1e4).to(torch.bfloat16)  # |z| ~ 1e4
    got = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(reference(student, teacher, labels, 2.0, 0.5), rel=1e-5)


def test_float64_logits_stay_float64():
    student, teacher, labels = random_case((5,), 3, seed=6, dtype=torch.float64)
    got = distillation_loss(student, teacher, labels, temperature=1.5, alpha=0.4)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(reference(student, teacher, labels, 1.5, 0.4), rel=1e-12)


@pytest.mark.parametrize("ignore", [0.2, 0.6, 0.9])
def test_ignored_rows_are_left_out_of_both_terms(ignore):
    student, teacher, labels = random_case((5, 7), 6, seed=7, ignore=ignore)
    keep = labels != -100
    got = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.6)
    assert float(got) == pytest.approx(reference(student, teacher, labels, 2.0, 0.6), rel=1e-5)
    # the same as passing only the kept rows; garbage in the ignored rows changes nothing
    kept = distillation_loss(student[keep], teacher[keep], labels[keep], temperature=2.0, alpha=0.6)
    torch.testing.assert_close(got, kept)
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[~keep], noisy_t[~keep] = 1e6, math.nan
    torch.testing.assert_close(distillation_loss(noisy_s, noisy_t, labels, temperature=2.0, alpha=0.6), got)


def test_teacher_probability_zero_counts_as_zero():
    student = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    teacher = torch.tensor([[2.0, -math.inf, 1.0]])
    got = distillation_loss(student, teacher, torch.tensor([0]), temperature=1.0, alpha=1.0)
    log_ps = F.log_softmax(student.detach().double(), -1)[0]
    log_pt = F.log_softmax(teacher.double(), -1)[0]
    want = sum(float(log_pt[c].exp() * (log_pt[c] - log_ps[c])) for c in (0, 2))
    assert float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.backward()
    assert torch.isfinite(student.grad).all()


def test_gradient_reaches_the_student_only():
    student, teacher, labels = random_case((4, 3), 5, seed=8, ignore=0.3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert (student.grad[labels == -100] == 0).all()
    assert teacher.grad is None


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradcheck_in_float64(alpha, temperature):
    student, teacher, labels = random_case((3, 4), 5, seed=9, ignore=0.25, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, labels, temperature, alpha), (student,))
    assert torch.autograd.gradgradcheck(lambda s: distillation_loss(s, teacher, labels, temperature, alpha),
                                        (student,))


def test_gradient_matches_the_closed_form():
    """d loss / d z_s = [(1 − α)(softmax(z_s) − onehot(y)) + α·T·(softmax(z_s/T) − softmax(z_t/T))] / rows."""
    student, teacher, labels = random_case((6,), 4, seed=10, dtype=torch.float64)
    student.requires_grad_(True)
    t, a = 2.5, 0.4
    distillation_loss(student, teacher, labels, temperature=t, alpha=a).backward()
    s = student.detach()
    want = ((1 - a) * (torch.exp(log_softmax64(s)) - F.one_hot(labels, 4))
            + a * t * (torch.exp(log_softmax64(s / t)) - torch.exp(log_softmax64(teacher / t)))) / len(labels)
    torch.testing.assert_close(student.grad, want)


GOOD = dict(student_logits=torch.zeros(4, 3), teacher_logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("change,error,name", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=math.nan), ValueError, "alpha"),
    (dict(alpha=None), TypeError, "alpha"),
    (dict(teacher_logits=torch.zeros(4, 5)), ValueError, "teacher_logits must have the shape of student_logits"),
    (dict(teacher_logits=torch.zeros(2, 4, 3)), ValueError, "teacher_logits must have the shape of student_logits"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels"),
    (dict(labels=torch.zeros(4)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1, 3, 0])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, -1, 1, 0])), ValueError, "labels"),
    (dict(labels=torch.full((4,), -100)), ValueError, "labels"),
    (dict(student_logits=torch.zeros(0, 3), teacher_logits=torch.zeros(0, 3), labels=torch.zeros(0, dtype=torch.long)),
     ValueError, "student_logits"),
    (dict(student_logits=torch.zeros(4, 3, dtype=torch.long)), TypeError, "student_logits"),
    (dict(teacher_logits=torch.zeros(4, 3, dtype=torch.long)), TypeError, "teacher_logits"),
    (dict(student_logits=[[0.0] * 3] * 4), TypeError, "student_logits"),
    (dict(labels=[0, 0, 0, 0]), TypeError, "labels"),
    (dict(student_logits=torch.zeros(()), teacher_logits=torch.zeros(()), labels=torch.zeros((), dtype=torch.long)),
     ValueError, "student_logits"),
    (dict(student_logits=torch.zeros(4, 0), teacher_logits=torch.zeros(4, 0)), ValueError, "student_logits"),
    (dict(teacher_logits=torch.zeros(4, 3, device="meta")), ValueError, "teacher_logits"),
    (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "labels"),
])
def test_bad_input_names_the_argument(change, error, name):
    with pytest.raises(error, match=name):
        distillation_loss(**{**GOOD, **change})


def test_int32_labels_are_accepted():
    student, teacher, labels = random_case((6,), 4, seed=11)
    torch.testing.assert_close(distillation_loss(student, teacher, labels.int()),
                               distillation_loss(student, teacher, labels))
