"""APGD and APGD-T (Croce & Hein, ICML 2020) checked against mathematics: the budget ball and the
box, the exact minimal perturbation of a linear model, the paper's checkpoints, Algorithm 1 re-run
step by step, and the best-iterate rule it shares with PGD (a success found at any step is kept)."""

from __future__ import annotations

import math

import pytest
import torch
from attack_helpers import Linear, linear_model, targeted_optimum, tiny_cnn

from advshield.attacks.gradient import (
    _apgd_run,
    _project,
    _random_start,
    _step,
    apgd,
    apgd_t,
    checkpoints,
    dlr,
    dlr_targeted,
    pgd,
)
from advshield.attacks.primitives import (
    Counted,
    attack_loss,
    generator_for,
    l2,
    linf,
    predict,
    value_and_grad,
)
from advshield.attacks.registry import ATTACKS, get_attack, run_attack
from advshield.core.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")

APGD_NAMES = ["apgd_ce_linf", "apgd_ce_l2", "apgd_dlr_linf", "apgd_dlr_l2", "apgd_t_linf", "apgd_t_l2"]


def spread_linear(n: int = 40, classes: int = 10, seed: int = 0) -> Linear:
    """The helpers' linear model with each x moved along its own direction to a depth in
    [0.6, 1.8]: minimal L2 distances spread over ~0.45-1.25 (L-inf ~0.02-0.056), inside the box."""
    base = linear_model(n=n, classes=classes, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    depth = torch.linspace(0.6, 1.8, n)[torch.randperm(n, generator=g)]
    center = torch.full_like(base.x, 0.5)
    x = center + (base.x - center) * (depth / 1.5).view(-1, 1, 1, 1)
    model = Linear(base.W, base.b, x, base.y)
    model.y = model(x).argmax(1)
    return model


def minimal_linf(model: Linear) -> torch.Tensor:
    """The L-inf distance to the nearest facet, min_{j != y} (z_y - z_j) / ||w_y - w_j||_1 (the
    dual norm); exact while x +- that distance stays inside [0, 1]."""
    z = model(model.x)
    zy = z.gather(1, model.y[:, None])
    w1 = (model.W[None] - model.W[model.y][:, None]).abs().sum(2)
    dist = (zy - z) / w1
    dist[torch.arange(len(model.y)), model.y] = float("inf")
    return dist.min(1).values


@pytest.fixture(scope="module")
def spread():
    return spread_linear()


# --- the schedule ---------------------------------------------------------------------------------

def test_checkpoints_follow_the_papers_recurrence():
    assert checkpoints(100) == (0, 22, 41, 57, 70, 80, 87, 93, 99)
    for steps in (10, 30, 77, 100, 250, 1000):
        p = [0.0, 0.22]
        while p[-1] <= 1:
            p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        expected = sorted({math.ceil(round(q * steps, 9)) for q in p if round(q * steps, 9) <= steps})
        assert list(checkpoints(steps)) == expected, steps


def reference_apgd(model, x, y, eps, norm, steps, seed, rho=0.75, alpha=0.75):
    """Algorithm 1 of the paper with APGD-CE's loss, the checkpoint decisions taken per sample in
    plain Python over the recorded loss values; the tensor pieces (start, step, projection) are the
    library's. Returns the iterates x^(0) ... x^(steps), the best point per sample (adversarial
    first, then the highest CE) and, per sample, the iterations where the step was halved."""
    n = len(x)
    w = list(checkpoints(steps))
    delta = _random_start(x, eps, norm, generator_for(x.device, seed))
    f, g, z = value_and_grad(model, x + delta, y, False, "ce")  # f = -CE, to minimise
    fs = [[float(v)] for v in f]
    advs = [[bool(v)] for v in z.argmax(1) != y]
    iterates = [x + delta]
    etas = [2.0 * eps] * n
    fmax, dmax, gmax = [float(v) for v in f], delta.clone(), g.clone()
    fmax_at_w, halved_at_w = list(fmax), [False] * n
    halvings: list[list[int]] = [[] for _ in range(n)]
    prev = delta
    for k in range(steps):
        if k in w[1:]:
            w0 = w[w.index(k) - 1]
            delta, g = delta.clone(), g.clone()
            for i in range(n):
                ups = sum(fs[i][t + 1] < fs[i][t] for t in range(w0, k))
                cond1 = ups < rho * (k - w0)
                cond2 = not halved_at_w[i] and not fmax[i] < fmax_at_w[i]
                halved_at_w[i], fmax_at_w[i] = cond1 or cond2, fmax[i]
                if cond1 or cond2:
                    etas[i] /= 2
                    halvings[i].append(k)
                    delta[i], g[i], fs[i][k] = dmax[i], gmax[i], fmax[i]
        a = 1.0 if k == 0 else alpha
        eta = torch.tensor(etas).view(-1, 1, 1, 1)
        zk = _project(delta - eta * _step(g, norm), x, eps, norm)
        prev, delta = delta, _project(delta + a * (zk - delta) + (1 - a) * (delta - prev), x, eps, norm)
        iterates.append(x + delta)
        if k + 1 < steps:
            f, g, z = value_and_grad(model, x + delta, y, False, "ce")
        else:
            z = predict(model, x + delta, y, False)
            f = attack_loss(z, y, False, "ce")
        for i in range(n):
            fs[i].append(float(f[i]))
            advs[i].append(bool(z[i].argmax() != y[i]))
            if f[i] < fmax[i]:
                fmax[i] = float(f[i])
                dmax[i], gmax[i] = delta[i], g[i]
    first = [min(range(steps + 1), key=lambda t: (not advs[i][t], fs[i][t])) for i in range(n)]
    best = torch.stack([iterates[t][i] for i, t in enumerate(first)])
    return iterates, best, halvings


class Recorder:
    """The model, recording every batch it is given."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, v):
        self.inputs.append(v.detach().clone())
        return self.model(v)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.03), ("l2", 0.6)])
def test_apgd_retraces_algorithm_1_step_by_step(fashion_test, norm, eps):
    """Every point APGD queries is the reference's iterate: momentum, step halving at the
    checkpoints (conditions 1 and 2) and the restarts from the best point, per sample."""
    net = tiny_cnn()
    x = torch.from_numpy(fashion_test.as_float(0, 16))
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample correct at the clean input: all of them are attacked
    steps = 30
    iterates, best, halvings = reference_apgd(net, x, y, eps, norm, steps, seed=5)
    rec = Recorder(net)
    out = apgd(rec, x, y, eps=eps, norm=norm, steps=steps, seed=5)
    queried = rec.inputs[1:]  # the first call is the clean prediction
    assert len(queried) == steps + 1
    for k, (mine, ref) in enumerate(zip(queried, iterates)):
        assert torch.equal(mine, ref), f"iterate {k} differs"
    assert torch.equal(out, best)
    counts = [len(h) for h in halvings]
    assert sum(counts) > 0 and min(counts) < max(counts)  # the schedule was exercised, per sample


class ScriptedCE:
    """A 10-class model whose cross-entropy at the k-th iterate follows ``script`` (the true
    logit 0, the nine others equal), never adversarial (CE < log 10), plus a negligible linear
    term, new at each iterate, for a gradient whose direction changes (so that every step size
    shows in the trajectory). ``skip``: calls before x^(0) (APGD's clean prediction)."""

    def __init__(self, labels, script, skip=0):
        self.labels, self.script, self.skip, self.calls, self.seen = labels, script, skip, 0, []

    def __call__(self, v):
        self.calls += 1
        self.seen.append(v.detach().clone())
        k = min(max(self.calls - 1 - self.skip, 0), len(self.script) - 1)
        d = v[0].numel()
        R = torch.randn(d, 10, generator=torch.Generator().manual_seed(k)) * 1e-5 / d**0.5
        z = torch.full((len(self.labels), 10), math.log((math.exp(self.script[k]) - 1) / 9))
        z[torch.arange(len(self.labels)), self.labels] = 0.0
        return z + v.flatten(1) @ R


def test_the_step_halves_exactly_where_the_papers_conditions_say(fashion_test):
    """A scripted loss (CE per iterate) against the 100-step checkpoints 22, 41, 57, 70, 80, 87,
    93, 99: halved at 22 (condition 2: 21 of 22 steps rose but never above x^(0); AutoAttack's code
    skips condition 2 at the first checkpoint, the paper does not), not at 41 (rising to a new
    best), not at 57 (exactly 12 = rho * 16 rises: condition 1 is strict), at 70 (condition 1: no
    rise), not at 80 (no new best, but halved at 70), at 87 (condition 2), at 93 (condition 1), not
    at 99. The trajectory equals the reference's (which restarts from x_max at each halving)."""
    ce = [2.0, 0.5] + [0.6 + 0.05 * i for i in range(21)]           # x^(0) .. x^(22)
    ce += [2.0 + 0.01 * (k - 22) for k in range(23, 42)]              # .. x^(41): 2.19, a new best
    ce += [2.18, 2.17, 2.16, 2.15] + [2.16 + 0.01 * i for i in range(12)]  # .. x^(57): 2.27
    ce += [2.26 - 0.02 * (k - 57) for k in range(58, 71)]             # .. x^(70): falling
    ce += [1.0] + [1.1 + 0.1 * i for i in range(9)]                   # .. x^(80): rising, below 2.27
    ce += [1.91 + 0.01 * (k - 81) for k in range(81, 88)]             # .. x^(87): rising, below 2.27
    ce += [1.9 - 0.01 * (k - 88) for k in range(88, 94)]              # .. x^(93): falling
    ce += [2.275, 2.28, 2.285, 2.29, 2.292, 2.294, 2.0]               # .. x^(100)
    assert len(ce) == 101
    x = torch.from_numpy(fashion_test.as_float(0, 2))
    y = torch.from_numpy(fashion_test.labels[:2])
    iterates, best, halvings = reference_apgd(ScriptedCE(y, ce), x, y, 0.05, "linf", 100, seed=0)
    assert halvings == [[22, 70, 87, 93]] * 2
    model = ScriptedCE(y, ce, skip=1)
    out = apgd(model, x, y, eps=0.05, steps=100, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.seen[1:], iterates, strict=True))
    assert torch.equal(out, best) and torch.equal(out, iterates[99])  # the highest CE: x^(99)


# --- the ball, the box and the exact linear optimum -----------------------------------------------

@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", APGD_NAMES)
def test_apgd_stays_in_its_ball_and_in_the_box(fashion_test, name, batch):
    model = tiny_cnn()
    x = torch.from_numpy(fashion_test.as_float(100, 100 + batch))  # real images: many 0 pixels
    y = torch.from_numpy(fashion_test.labels[100 : 100 + batch])
    spec = get_attack(name)
    eps = 0.03 if spec.norm == "linf" else 1.0
    extra = {"top_k": 2} if "top_k" in spec.hyper_names else {}
    adv = run_attack(name, model, x, y, eps=eps, steps=5, **extra)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    dist = linf(adv - x) if spec.norm == "linf" else l2(adv - x)
    assert float(dist.max()) <= eps + 1e-6
    with torch.no_grad():
        attacked = model(x).argmax(1) == y
    if bool(attacked.any()):
        assert float(dist[attacked].max()) > 0.5 * eps  # it did move


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize(("attack", "hyper"), [(apgd, {}), (apgd, {"loss": "dlr"}), (apgd_t, {})],
                         ids=["apgd_ce", "apgd_dlr", "apgd_t"])
def test_apgd_succeeds_exactly_where_the_minimal_distance_is_below_eps(spread, norm, attack, hyper):
    dist = spread.minimal_l2() if norm == "l2" else minimal_linf(spread)
    eps = 1.0 if norm == "l2" else 0.045
    assert float(dist.min()) < 0.7 * eps and float(dist.max()) > 1.2 * eps
    adv = attack(spread, spread.x, spread.y, eps=eps, norm=norm, **hyper)
    fooled = spread(adv).argmax(1) != spread.y
    assert torch.equal(fooled, dist < eps), f"ratios missed: {(dist / eps)[fooled != (dist < eps)].tolist()}"


def test_apgd_t_finds_the_nearest_class_where_cross_entropy_does_not():
    """The helpers' model: 40 minimal distances within 1.05-1.12, eps at their median. The CE
    maximiser can miss the nearest facet; one targeted run per class cannot (only the sample
    within 1 % of eps is left out), and APGD-CE still beats PGD-40."""
    model = linear_model(n=40)
    dist = model.minimal_l2()
    eps = float(dist.median())
    clear = (dist / eps - 1).abs() > 0.01
    fooled_t = model(apgd_t(model, model.x, model.y, eps=eps, norm="l2")).argmax(1) != model.y
    assert torch.equal(fooled_t[clear], (dist < eps)[clear])
    fooled_ce = model(apgd(model, model.x, model.y, eps=eps, norm="l2")).argmax(1) != model.y
    fooled_pgd = model(pgd(model, model.x, model.y, eps=eps, norm="l2", steps=40)).argmax(1) != model.y
    assert int(fooled_ce.sum()) > int(fooled_pgd.sum())
    assert not bool((fooled_ce & ~(dist < eps)).any())


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_apgd_reaches_the_target(loss):
    small = linear_model(n=6, shape=(1, 8, 8), depth=0.5, seed=1)
    targets = (small.y + torch.tensor([1, 3, 5, 7, 2, 4])) % 10
    optimum = torch.tensor([targeted_optimum(small, i, int(t)) for i, t in enumerate(targets)])
    eps = 1.05 * float(optimum.max())
    adv = apgd(small, small.x, targets, targeted=True, norm="l2", eps=eps, loss=loss)
    assert bool((small(adv).argmax(1) == targets).all())
    assert float(l2(adv - small.x).max()) <= eps + 1e-6
    near = apgd(small, small.x, targets, targeted=True, norm="l2", eps=0.95 * float(optimum.min()), loss=loss)
    assert not bool((small(near).argmax(1) == targets).any())  # no adversarial exists below the optimum


def test_apgd_t_with_one_target_is_the_targeted_run_towards_the_runner_up(spread):
    """top_k=1: the target is the class of the second highest clean logit; the run is APGD with
    the targeted DLR loss (its first success, else its best point)."""
    eps = 0.045
    out = apgd_t(spread, spread.x, spread.y, eps=eps, top_k=1, seed=3)
    z = spread(spread.x)
    runner_up = z.scatter(1, spread.y[:, None], float("-inf")).argmax(1)
    rec = Recorder(spread)
    apgd_t(rec, spread.x, spread.y, eps=eps, top_k=1, seed=3)
    rec_t = Recorder(spread)
    ref, _, _, _ = _apgd_run(rec_t, spread.x, spread.y, lambda v: dlr_targeted(v, spread.y, runner_up), False,
                             eps, "linf", 100, 0.75, 0.75, generator_for(spread.x.device, 3))
    assert all(torch.equal(a, b) for a, b in zip(rec.inputs[1:], rec_t.inputs))
    assert torch.equal(out, ref)


# --- the best iterate ------------------------------------------------------------------------------

class TimeBomb:
    """A 10-class model whose verdict depends only on the call number. On the calls in ``fooled``
    the true class loses narrowly to one other (adversarial, CE ~ 0.74); on every other call it
    wins narrowly among ten near-equal logits (not adversarial, CE ~ 2.2: a *better* attack loss).
    A tiny linear term keeps the gradient alive. So the last iterate and the highest-CE iterate
    are both not adversarial, while the iterates of the ``fooled`` calls were."""

    def __init__(self, labels, fooled, d=784):
        self.labels, self.fooled, self.calls, self.seen = labels, set(fooled), 0, []
        self.R = torch.randn(d, 10, generator=torch.Generator().manual_seed(0)) * 1e-3 / d**0.5

    def __call__(self, v):
        assert v.shape[0] == len(self.labels)
        self.calls += 1
        self.seen.append(v.detach().clone())
        y = self.labels
        if self.calls in self.fooled:
            z = torch.full((len(y), 10), -20.0)
            z[torch.arange(len(y)), y] = 0.0
            z[torch.arange(len(y)), (y + 1) % 10] = 0.1
        else:
            z = torch.zeros(len(y), 10)
            z[torch.arange(len(y)), y] = 0.1
        return z + v.flatten(1) @ self.R


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_a_success_found_at_any_step_is_kept(fashion_test, attack):
    """Neither the last iterate nor the highest-loss one: the adversarial iterate."""
    x = torch.from_numpy(fashion_test.as_float(0, 6))
    y = torch.from_numpy(fashion_test.labels[:6])
    model = TimeBomb(y, fooled=range(4, 8))  # a few early iterates (APGD's call 1: the clean prediction)
    out = (pgd if attack == "pgd" else apgd)(model, x, y, eps=0.05, steps=20)
    assert model.calls == 21 + (attack == "apgd")
    for i in range(len(y)):
        assert any(torch.equal(out[i], model.seen[k - 1][i]) for k in model.fooled), i
    assert float(linf(out - x).max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_returned_points_are_adversarial_whenever_any_iterate_was(fashion_test, attack):
    net = tiny_cnn()
    x = torch.from_numpy(fashion_test.as_float(200, 232))
    with torch.no_grad():
        y = net(x).argmax(1)
    rec = Recorder(net)
    if attack == "pgd":
        out = pgd(rec, x, y, eps=0.02, steps=20, step_size=0.02)  # a large step: it oscillates
    else:
        out = apgd(rec, x, y, eps=0.02, steps=20)
    with torch.no_grad():
        ever = torch.stack([net(v).argmax(1) != y for v in rec.inputs]).any(0)
        fooled = net(out).argmax(1) != y
    assert bool(ever.any()) and not bool(ever.all())
    assert torch.equal(fooled, ever)


# --- counting, restarts, seeds ----------------------------------------------------------------------

def test_apgd_counts_its_gradients_and_restarts_only_the_robust_samples():
    lin = linear_model(n=12)
    n, steps = len(lin.x), 10
    easy, hard = Counted(lin), Counted(lin)
    apgd(easy, lin.x, lin.y, norm="l2", eps=5.0, steps=steps, restarts=3)  # all broken in the first run
    apgd(hard, lin.x, lin.y, norm="l2", eps=0.01, steps=steps, restarts=3)  # none ever broken
    assert easy.gradients == steps * n
    assert hard.gradients == 3 * steps * n
    wrong = lin.y.clone()
    wrong[:5] = (wrong[:5] + 1) % 10  # misclassified at the clean input: returned unchanged, no gradient
    counted = Counted(lin)
    out = apgd(counted, lin.x, wrong, norm="l2", eps=0.01, steps=steps)
    assert counted.gradients == steps * (n - 5)
    assert torch.equal(out[:5], lin.x[:5])


def test_apgd_t_counts_one_run_per_target_class():
    lin = linear_model(n=8, classes=5)
    steps = 10
    counted = Counted(lin)
    apgd_t(counted, lin.x, lin.y, norm="l2", eps=0.01, steps=steps, restarts=2)  # top_k 9 -> 4 classes
    assert counted.gradients == 4 * 2 * steps * len(lin.x)
    counted.reset()
    apgd_t(counted, lin.x, lin.y, norm="l2", eps=5.0, steps=steps, top_k=3)
    assert counted.gradients == steps * len(lin.x)  # all fooled by the first target


@pytest.mark.parametrize("name", ["apgd_ce_linf", "apgd_t_l2"])
def test_apgd_is_reproducible_from_its_seed(fashion_test, name):
    net = tiny_cnn()
    x = torch.from_numpy(fashion_test.as_float(0, 8))
    y = torch.from_numpy(fashion_test.labels[:8])
    eps = 0.03 if get_attack(name).norm == "linf" else 0.5
    a = run_attack(name, net, x, y, eps=eps, steps=5, seed=11)
    b = run_attack(name, net, x, y, eps=eps, steps=5, seed=11)
    c = run_attack(name, net, x, y, eps=eps, steps=5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- the real model ----------------------------------------------------------------------------------

def test_apgd_is_at_least_as_strong_as_pgd_40_on_the_fashion_cnn(twin, test_batch):
    x, y = test_batch
    adv_pgd = run_attack("pgd_linf", twin, x, y, eps=0.1, steps=40)
    adv_apgd = run_attack("apgd_ce_linf", twin, x, y, eps=0.1)
    with torch.no_grad():
        clean = float((twin(x).argmax(1) == y).float().mean())
        acc_pgd = float((twin(adv_pgd).argmax(1) == y).float().mean())
        acc_apgd = float((twin(adv_apgd).argmax(1) == y).float().mean())
    assert float(linf(adv_apgd - x).max()) <= 0.1 + 1e-6
    assert clean > 0.8
    assert acc_apgd <= acc_pgd


# --- the losses, the registry, validation -------------------------------------------------------------

def test_dlr_losses_match_the_papers_formulas_and_invariances():
    z = torch.tensor([[3.0, 1.0, 0.5, -2.0, 0.0], [0.0, 4.0, 2.0, 1.0, 3.0]])
    y = torch.tensor([0, 2])
    t = torch.tensor([3, 1])
    # untargeted: (z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    assert torch.allclose(dlr(z, y), torch.tensor([(3 - 1) / (3 - 0.5), (2 - 4) / (4 - 2)]))
    # APGD-T: (z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    assert torch.allclose(dlr_targeted(z, y, t), torch.tensor([(3 + 2) / (3 - 0.25), (2 - 4) / (4 - 1.5)]))
    # targeted towards t, no true class: (max_{i != t} z_i - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    assert torch.allclose(dlr(z, t, targeted=True), torch.tensor([(3 + 2) / (3 - 0.25), (3 - 4) / (4 - 1.5)]))
    for fn in (lambda v: dlr(v, y), lambda v: dlr_targeted(v, y, t)):
        assert torch.allclose(fn(3.0 * z + 7.0), fn(z), atol=1e-6)


def test_registry_names_the_apgd_attacks_with_their_norm_and_defaults():
    for name in APGD_NAMES:
        spec = ATTACKS[name]
        assert spec.kind == "budget" and spec.norm == name.rsplit("_", 1)[1]
        assert spec.defaults["steps"] == 100 and spec.defaults["restarts"] == 1
        assert spec.defaults.get("norm", "linf") == spec.norm
        assert spec.gradients.startswith("steps * restarts")
    assert ATTACKS["apgd_ce_l2"].defaults["loss"] == "ce" and ATTACKS["apgd_dlr_linf"].defaults["loss"] == "dlr"
    assert ATTACKS["apgd_t_linf"].defaults["top_k"] == 9 and ATTACKS["apgd_t_linf"].fn is apgd_t
    lin = linear_model(n=2)
    with pytest.raises(ConfigError, match="is an linf attack; norm='l2'"):
        run_attack("apgd_t_linf", lin, lin.x, lin.y, eps=0.1, norm="l2")
    with pytest.raises(ConfigError, match="budget attack: it needs eps"):
        run_attack("apgd_ce_l2", lin, lin.x, lin.y)


def test_apgd_validates_its_hyper_parameters():
    lin = linear_model(n=2)
    x, y = lin.x, lin.y
    with pytest.raises(InputError, match=r"apgd: eps must be > 0, got 0"):
        apgd(lin, x, y, eps=0)
    with pytest.raises(InputError, match=r"apgd: steps and restarts must be >= 1, got steps=0"):
        apgd(lin, x, y, eps=0.1, steps=0)
    with pytest.raises(InputError, match=r"apgd: rho must be in \(0, 1\], got 1.5"):
        apgd(lin, x, y, eps=0.1, rho=1.5)
    with pytest.raises(InputError, match=r"apgd: momentum must be in \(0, 1\], got 0"):
        apgd(lin, x, y, eps=0.1, momentum=0)
    with pytest.raises(InputError, match=r"apgd: loss must be one of \('ce', 'dlr', 'margin'\), got 'l1'"):
        apgd(lin, x, y, eps=0.1, loss="l1")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="apgd_t: norm must be one of"):
        apgd_t(lin, x, y, eps=0.1, norm="l1")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="apgd_t: top_k must be >= 1, got 0"):
        apgd_t(lin, x, y, eps=0.1, top_k=0)
    with pytest.raises(InputError, match=r"apgd_t: an untargeted attack .* apgd\(targeted=True\)"):
        apgd_t(lin, x, y, eps=0.1, targeted=True)
    three = linear_model(n=3, classes=3)
    with pytest.raises(InputError, match=r"apgd_t \(targeted DLR loss\) needs at least 4 classes, the model has 3"):
        apgd_t(three, three.x, three.y, eps=0.1)
    two = linear_model(n=2, classes=2)
    with pytest.raises(InputError, match="the DLR loss needs at least 3 classes, the model has 2"):
        apgd(two, two.x, two.y, eps=0.1, loss="dlr")
    with pytest.raises(InputError, match="float32"):
        apgd(lin, x.double(), y, eps=0.1)
