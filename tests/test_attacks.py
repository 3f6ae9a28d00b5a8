"""Attacks checked against mathematics: the exact minimal perturbation of a linear model, the
budget ball and [0, 1] box, the 8-bit grid, and the threat-model check the audit relies on."""

from __future__ import annotations

import pytest
import torch
from attack_helpers import linear_model, targeted_optimum, tiny_cnn

from advshield.attacks.boundary_projection import bp
from advshield.attacks.deepfool import deepfool
from advshield.attacks.gradient import pgd
from advshield.attacks.primitives import (
    Counted,
    decision_logits,
    l2,
    linf,
    margin,
    normalize,
    quantize,
    value_and_grad,
)
from advshield.attacks.registry import ATTACKS, get_attack, run_attack
from advshield.attacks.threat import (
    NOT_FINITE,
    OFF_GRID,
    OUTSIDE_BUDGET,
    VALID,
    ThreatModel,
    check_adversarial,
    judge,
)
from advshield.core.errors import ConfigError, InputError

# (attack, hyper-parameters, grey levels of the check, bound on distortion / optimum).
# C&W ends exactly on the boundary and is not quantization-aware (rounding flips some of its
# points back, as the thesis's Table 5.2 shows): it is held to the optimum before rounding.
MINIMAL = [
    ("deepfool", {}, 256, 1.05),  # one exact projection, times 1 + overshoot (0.02)
    ("cw_l2", {"binary_search_steps": 5, "steps": 50, "lr": 0.05, "initial_const": 0.1}, 0, 1.05),
    ("ddn", {"steps": 100}, 256, 1.06),
    ("bp", {"steps": 100, "out_fallback": "shrink"}, 256, 1.08),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lin():
    return linear_model(n=12)


def _grid(x: torch.Tensor) -> bool:
    return bool(((x * 255 - torch.round(x * 255)).abs() < 1e-4).all())


# --- minimal attacks against the known optimum ---------------------------------------------------

@pytest.mark.parametrize(("name", "hyper", "levels", "bound"), MINIMAL, ids=[m[0] for m in MINIMAL])
def test_minimal_attack_lands_near_the_exact_optimum_of_a_linear_model(lin, name, hyper, levels, bound):
    optimum = lin.minimal_l2()
    assert float(optimum.min()) > 0.9 and float(optimum.max()) < 1.3  # far from the box, far above 1/255
    adv = run_attack(name, lin, lin.x, lin.y, **hyper)
    checked = check_adversarial(lin.x, adv, ThreatModel(levels=levels))  # clipped (and rounded)
    assert bool((lin(checked.adversarial).argmax(1) != lin.y).all()), "every sample must be broken"
    ratio = checked.l2 / optimum
    assert float(ratio.min()) >= 1 - 1e-4, "no adversarial example can beat the exact optimum"
    assert float(ratio.max()) <= bound, f"{name}: distortion / optimum up to {float(ratio.max()):.3f}"


@pytest.mark.parametrize(("name", "hyper", "levels", "bound"), MINIMAL, ids=[m[0] for m in MINIMAL])
def test_targeted_minimal_attack_matches_the_quadratic_programming_optimum(name, hyper, levels, bound):
    small = linear_model(n=6, shape=(1, 8, 8), depth=0.5, seed=1)
    targets = (small.y + torch.tensor([1, 3, 5, 7, 2, 4])) % 10
    optimum = torch.tensor([targeted_optimum(small, i, int(t)) for i, t in enumerate(targets)])
    adv = run_attack(name, small, small.x, targets, targeted=True, **hyper)
    checked = check_adversarial(small.x, adv, ThreatModel(levels=levels))
    assert bool((small(checked.adversarial).argmax(1) == targets).all())
    ratio = checked.l2 / optimum
    assert float(ratio.min()) >= 1 - 1e-3
    assert float(ratio.max()) <= bound + 0.02, f"{name}: distortion / optimum up to {float(ratio.max()):.3f}"


def test_thesis_bp_keeps_its_first_adversarial_point_on_a_binary_linear_model():
    """Algorithm 2 on a two-class linear model: Stage 1 moves along the constant gradient, so r
    and g are collinear, v* = x + rho g = y and OUT cannot move (thesis: "v* = y_i if r_i, g are
    collinear"). The output is the first adversarial Stage-1 iterate, computed here independently
    (without rounding, which would add a small non-collinear part)."""
    lin = linear_model(n=8, classes=2, depth=1.0)
    alpha, gmin, steps = 2.0, 0.7, 30
    y = lin.x.clone()
    first = torch.full((len(y),), -1)
    for i in range(steps):
        adv = lin(y).argmax(1) != lin.y
        first[adv & (first < 0)] = i
        _, g, _ = value_and_grad(lin, y, lin.y, False, "margin")
        gamma = gmin + i / (steps + 1) * (1 - gmin)
        step = (y - alpha * gamma * normalize(g)).clamp(0, 1)
        y = torch.where((first >= 0).view(-1, 1, 1, 1), y, step)
    out = bp(lin, lin.x, lin.y, steps=steps, levels=None)
    assert bool((first >= 0).all())
    assert torch.allclose(out, y, atol=1e-5)
    assert float((l2(out - lin.x) / lin.minimal_l2()).max()) > 1.1  # hence 'shrink' for audits


def test_bp_out_step_lies_on_the_tangent_hyperplane_and_the_sphere():
    """One OUT step without rounding (eq. 5.4): ||z - x|| = gamma ||r|| and <z - y, g> = 0."""
    from advshield.attacks.boundary_projection import _unit_or_zero

    g0 = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 1, 6, 6, generator=g0), torch.rand(4, 1, 6, 6, generator=g0)
    g = normalize(torch.randn(4, 1, 6, 6, generator=g0))
    r = y - x
    rho = (r * g).flatten(1).sum(1).view(-1, 1, 1, 1)
    eps = 0.9 * l2(r).view(-1, 1, 1, 1)
    v = x + rho * g
    z = v + _unit_or_zero(y - v) * torch.sqrt((eps**2 - rho**2).clamp_min(0))
    ok = (eps.flatten() > rho.abs().flatten())
    assert bool(ok.any())
    assert torch.allclose(l2(z - x)[ok], eps.flatten()[ok], atol=1e-5)
    assert torch.allclose(((z - y) * g).flatten(1).sum(1), torch.zeros(4), atol=1e-5)


def test_bp_in_step_with_rounding_never_stalls():
    """Q_IN (eq. 5.10): a step shorter than beta_min is stretched, so rounding cannot cancel it."""
    from advshield.attacks.boundary_projection import q_in

    y = quantize(torch.full((3, 1, 28, 28), 0.5))
    z = y + 1e-4 * normalize(torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(quantize(z), y)  # plain rounding would cancel the step
    out = q_in(z, y, 256, beta_min=0.1)
    assert bool((l2(out - y) > 0.05).all()) and _grid(out)


# --- budget attacks: the ball and the box --------------------------------------------------------

BUDGET = [("fgsm", 8 / 255), ("bim", 8 / 255), ("pgd_linf", 0.03), ("fgsm_l2", 0.5), ("pgd_l2", 1.0)]


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize(("name", "eps"), BUDGET, ids=[b[0] for b in BUDGET])
def test_budget_attack_stays_in_its_ball_and_in_the_box(fashion_test, name, eps, batch):
    model = tiny_cnn()
    x = torch.from_numpy(fashion_test.as_float(100, 100 + batch))  # real images: many 0 pixels
    y = torch.from_numpy(fashion_test.labels[100 : 100 + batch])
    spec = get_attack(name)
    extra = {"steps": 3} if "steps" in spec.hyper_names else {}
    adv = run_attack(name, model, x, y, eps=eps, **extra)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    dist = linf(adv - x) if spec.norm == "linf" else l2(adv - x)
    assert float(dist.max()) <= eps + 1e-6
    assert float(dist.max()) > 0.5 * eps  # it did move


def test_pgd_breaks_the_real_model(twin, test_batch):
    x, y = test_batch[0][:24], test_batch[1][:24]
    adv = pgd(twin, x, y, eps=0.1, steps=5)
    with torch.no_grad():
        acc_clean = float((twin(x).argmax(1) == y).float().mean())
        acc_adv = float((twin(adv).argmax(1) == y).float().mean())
    assert acc_clean > 0.8 and acc_adv < 0.1


def test_pgd_restarts_rerun_only_the_samples_still_robust(lin):
    n, steps = len(lin.x), 4
    easy, hard = Counted(lin), Counted(lin)
    pgd(easy, lin.x, lin.y, norm="l2", eps=5.0, steps=steps, restarts=3)  # all broken at once
    pgd(hard, lin.x, lin.y, norm="l2", eps=0.01, steps=steps, restarts=3)  # none ever broken
    assert easy.gradients == steps * n
    assert hard.gradients == 3 * steps * n


def test_targeted_pgd_reaches_the_target(lin):
    targets = (lin.y + 1) % 10
    adv = pgd(lin, lin.x, targets, targeted=True, norm="l2", eps=4.0, steps=30)
    assert bool((lin(adv).argmax(1) == targets).all())
    assert float(l2(adv - lin.x).max()) <= 4.0 + 1e-6


def test_fgsm_is_one_signed_step(lin):
    adv = run_attack("fgsm", lin, lin.x, lin.y, eps=0.01)
    _, g, _ = value_and_grad(lin, lin.x, lin.y, False, "ce")
    assert torch.allclose(adv, (lin.x - 0.01 * g.sign()).clamp(0, 1))


def test_quantized_attacks_return_points_on_the_8_bit_grid(lin):
    x = quantize(lin.x)
    for name in ("ddn", "bp", "deepfool"):
        adv = run_attack(name, lin, x, lin.y, steps=20)
        assert _grid(adv), name


def test_attacks_count_their_gradients(lin):
    for name, per_image in (("ddn", 20), ("bp", 20), ("bim", 20)):
        counted = Counted(lin)
        hyper = {"eps": 0.05} if get_attack(name).kind == "budget" else {}
        run_attack(name, counted, lin.x, lin.y, steps=20, **hyper)
        assert counted.gradients == per_image * len(lin.x), name


# --- the registry and validation -----------------------------------------------------------------

def test_registry_names_every_attack_with_its_kind():
    kinds = {name: spec.kind for name, spec in ATTACKS.items()}
    assert kinds == {"fgsm": "budget", "fgsm_l2": "budget", "bim": "budget", "pgd_linf": "budget", "pgd_l2": "budget",
                     "apgd_ce_linf": "budget", "apgd_ce_l2": "budget", "apgd_dlr_linf": "budget",
                     "apgd_dlr_l2": "budget", "apgd_t_linf": "budget", "apgd_t_l2": "budget",
                     "opgd_linf": "budget", "opgd_l2": "budget", "detector_sweep_linf": "budget",
                     "detector_sweep_l2": "budget",
                     "cw_l2": "minimal", "deepfool": "minimal", "ddn": "minimal", "bp": "minimal",
                     "scw_l2": "minimal", "qpgd2": "minimal", "qpgd_l2": "budget",
                     "square_linf": "budget", "square_l2": "budget", "hsj_l2": "minimal", "hsj_linf": "minimal"}
    assert {n for n, s in ATTACKS.items() if s.black_box} == {"square_linf", "square_l2", "hsj_l2", "hsj_linf"}
    assert get_attack("ddn").defaults["gamma"] == 0.05 and get_attack("ddn").defaults["init_eps"] == 1.0
    assert get_attack("bp").defaults["alpha"] == 2.0 and get_attack("bp").defaults["gamma_min"] == 0.7


def test_registry_rejects_bad_hyper_parameters(lin):
    with pytest.raises(ConfigError, match=r"attack 'ddn': unknown hyper-parameter 'epsilon'; allowed: .*init_eps"):
        run_attack("ddn", lin, lin.x, lin.y, epsilon=1.0)
    with pytest.raises(ConfigError, match="budget attack: it needs eps"):
        run_attack("pgd_linf", lin, lin.x, lin.y)
    with pytest.raises(ConfigError, match="is an linf attack; norm='l2'"):
        run_attack("pgd_linf", lin, lin.x, lin.y, eps=0.1, norm="l2")
    with pytest.raises(ConfigError, match=r"unknown attack 'pgd'; known: apgd_ce_l2, .*, bim, bp"):
        get_attack("pgd")


@pytest.mark.parametrize(
    ("inputs", "labels", "match"),
    [
        (torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), "float32"),
        (torch.full((2, 1, 4, 4), 1.5), torch.zeros(2, dtype=torch.int64), r"\[0, 1\], got range \[1.5, 1.5\]"),
        (torch.full((2, 1, 4, 4), float("nan")), torch.zeros(2, dtype=torch.int64), "NaN"),
        (torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), r"labels must have shape \[2\], got \[3\]"),
        (torch.zeros(2, 1, 4, 4), torch.zeros(2), "integer class indices"),
        (torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64), "non-empty batch"),
    ],
)
def test_attacks_validate_their_inputs(inputs, labels, match):
    model = lambda v: v.flatten(1)[:, :3]  # noqa: E731
    for name in ("fgsm", "ddn", "bp", "cw_l2", "deepfool"):
        hyper = {"eps": 0.1} if get_attack(name).kind == "budget" else {}
        with pytest.raises(InputError, match=match):
            run_attack(name, model, inputs, labels, **hyper)


def test_attacks_validate_their_hyper_parameters(lin):
    with pytest.raises(InputError, match=r"pgd: eps must be > 0, got -0\.1"):
        pgd(lin, lin.x, lin.y, eps=-0.1)
    with pytest.raises(InputError, match="pgd: norm must be one of"):
        pgd(lin, lin.x, lin.y, eps=0.1, norm="l1")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="0 < gamma_min < 1"):
        bp(lin, lin.x, lin.y, gamma_min=1.5)
    with pytest.raises(InputError, match="candidates >= 2"):
        deepfool(lin, lin.x, lin.y, candidates=1)


def test_decision_logits_count_the_detector_class_as_a_failure():
    z = torch.tensor([[5.0, 1.0, 0.0, 9.0], [5.0, 1.0, 0.0, -9.0], [0.0, 3.0, 0.0, 9.0]])  # last: flagged
    y = torch.tensor([1, 1, 2])
    d = decision_logits(z, y, targeted=False, reject_class=True)
    assert d.shape == (3, 3)
    assert d.argmax(1).tolist() == [1, 0, 2]  # flagged -> counted as the true class
    assert margin(d, y, False).tolist() == [4.0, -4.0, 6.0]
    assert torch.equal(decision_logits(z, y, targeted=True, reject_class=True), z)  # the target must beat it


# --- the threat-model check: the audit never trusts an attack ------------------------------------

def test_a_cheating_attack_is_counted_as_a_failure(lin):
    eps = 0.5
    honest = pgd(lin, lin.x, lin.y, norm="l2", eps=eps, steps=10)
    cheat = pgd(lin, lin.x, lin.y, norm="l2", eps=4 * eps, steps=10)  # claims the eps=0.5 budget
    threat = ThreatModel(norm="l2", eps=eps)
    for adv, expect_valid in ((honest, True), (cheat, False)):
        checked = check_adversarial(lin.x, adv, threat)
        predicted = lin(checked.adversarial).argmax(1)
        success = judge(checked, predicted, lin.y)
        assert bool(checked.valid.all()) is expect_valid
        if not expect_valid:
            fooled = predicted != lin.y
            assert int(fooled.sum()) >= len(lin.y) // 2, "the cheat does fool the model..."
            assert not success.any(), "...and still counts as a failure"
            assert set(checked.reason.tolist()) == {OUTSIDE_BUDGET}


def test_check_clips_rounds_and_keeps_honest_points_within_budget():
    g = torch.Generator().manual_seed(0)
    x = quantize(torch.rand(32, 1, 28, 28, generator=g))
    d = torch.randn(32, 1, 28, 28, generator=g)
    eps = 0.7
    adv = x + d * (eps / l2(d)).view(-1, 1, 1, 1)  # exactly on the L2 sphere, then out of the box
    checked = check_adversarial(x, adv, ThreatModel(norm="l2", eps=eps))
    assert bool(checked.valid.all())  # rounding towards x where nearest rounding broke the budget
    assert _grid(checked.adversarial)
    assert float(checked.adversarial.min()) >= 0 and float(checked.adversarial.max()) <= 1
    assert float(checked.l2.max()) <= eps + 1e-6
    assert torch.allclose(checked.l2, l2(checked.adversarial - x))


def test_check_flags_non_finite_and_off_grid_points():
    x = torch.full((3, 1, 4, 4), 0.5)  # 127.5 / 255: not on the grid
    x[2] = 128 / 255
    adv = x.clone()
    adv[0, 0, 0, 0] = float("nan")
    adv[1] += 0.0008  # inside an L-inf budget of 0.001, but no grid point is
    adv[2] += 0.0008
    checked = check_adversarial(x, adv, ThreatModel(norm="linf", eps=0.001))
    assert checked.reason.tolist() == [NOT_FINITE, OFF_GRID, VALID]
    assert checked.valid.tolist() == [False, False, True]
    assert torch.equal(checked.adversarial[2], x[2])  # rounded back onto the clean pixel
    with pytest.raises(InputError, match=r"adversarial batch has shape \[2, 1, 4, 4\]"):
        check_adversarial(x, adv[:2], ThreatModel())


def test_judge_counts_flagged_inputs_as_failures():
    x = torch.zeros(3, 1, 2, 2)
    checked = check_adversarial(x, x, ThreatModel())
    ok = judge(checked, torch.tensor([1, 0, 2]), torch.tensor([0, 0, 0]), flagged=[False, False, True])
    assert ok.tolist() == [True, False, False]
    assert judge(checked, [1, 0, 2], [1, 1, 2], targeted=True).tolist() == [True, False, True]


def test_threat_model_validates():
    with pytest.raises(ConfigError, match=r"threat\.eps: must be > 0"):
        ThreatModel(eps=0.0)
    with pytest.raises(ConfigError, match=r"threat\.norm: must be 'l2' or 'linf', got 'l1'"):
        ThreatModel(norm="l1")  # type: ignore[arg-type]
