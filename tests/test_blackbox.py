"""Black-box attacks (Square: scores; HopSkipJump: decisions) held to their mathematics on
analytic models, then run through the audit's runner and against a live ``advshield serve``."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from attack_helpers import Linear, linear_model
from server_helpers import free_port, start_server

from advshield.attacks.audit import Auditor, AuditSpec
from advshield.attacks.hopskipjump import hop_skip_jump
from advshield.attacks.oracle import FLAG_PENALTY, Oracle
from advshield.attacks.registry import get_attack, run_attack
from advshield.attacks.square import bump, on_grid, p_schedule, square, two_signed_bump
from advshield.core.errors import ConfigError, InputError
from advshield.core.validation import from_mapping
from advshield.plugin.client import RateLimit, RemoteClassifier, RemoteError
from advshield.plugin.config import load_pipeline
from advshield.plugin.pipeline import DefendedClassifier, Prediction

pytestmark = pytest.mark.usefixtures("one_thread")


class Served:
    """A serving path around an analytic model: ``predict`` answers labels and probabilities,
    optionally a detector flag (``flag(x)``) and a served label of -1 where it rejects."""

    random = False

    def __init__(self, model, flag=None, reject: bool = False) -> None:
        self.model, self.flag, self.reject = model, flag, reject
        self.calls: list[tuple[int, int | None]] = []

    def predict(self, x: torch.Tensor, seed: int | None = None) -> Prediction:
        self.calls.append((len(x), seed))
        probs = torch.softmax(self.model(torch.as_tensor(x).float()), 1).numpy()
        labels = probs.argmax(1).astype(np.int64)
        flagged = None
        if self.flag is not None:
            flagged = self.flag(torch.as_tensor(x)).numpy().astype(bool)
            if self.reject:
                labels[flagged] = -1
        return Prediction(labels, probs, None if flagged is None else flagged.astype(np.float32), flagged)


def on_8bit(m: Linear) -> Linear:
    m.x = torch.round(m.x * 255) / 255
    m.y = m(m.x).argmax(1)
    return m


def minimal_linf(m: Linear) -> torch.Tensor:
    """Least L-inf distance to another class of a linear model (the box is far): per facet j,
    (z_y - z_j) / ||w_y - w_j||_1."""
    z = m(m.x)
    zy = z.gather(1, m.y[:, None])
    w1 = (m.W[None] - m.W[m.y][:, None]).abs().sum(2)
    d = (zy - z) / w1.clamp_min(1e-12)
    d[torch.arange(len(m.y)), m.y] = float("inf")
    return d.min(1).values


# --- the oracle ---------------------------------------------------------------------------------------

def test_the_oracle_counts_queries_per_sample_and_draws_a_fresh_seed_per_call():
    m = linear_model(4)
    served = Served(m)
    o = Oracle(served, 4, seed=7, chunk=3)
    o(m.x[[0, 0, 2, 3, 3, 3]], [0, 0, 2, 3, 3, 3])
    o(m.x[[1]], np.array([1]))
    assert o.queries.tolist() == [2, 1, 1, 3]
    assert [n for n, _ in served.calls] == [3, 3, 1]  # chunks of 3
    seeds = [s for _, s in served.calls]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**62 for s in seeds)
    # the same seed gives the same stream: an audit is reproducible
    again = Served(m)
    o2 = Oracle(again, 4, seed=7, chunk=3)
    o2(m.x[[0, 0, 2, 3, 3, 3]], [0, 0, 2, 3, 3, 3])
    assert [s for _, s in again.calls] == seeds[:2]
    with pytest.raises(InputError, match="2 queries but 1 sample indices"):
        o(m.x[:2], [0])
    with pytest.raises(InputError, match="out of range"):
        o(m.x[:1], [4])


def test_every_query_to_a_random_pipeline_is_a_fresh_draw(fashion_test):
    random = DefendedClassifier.from_config(load_pipeline(Path(__file__).resolve().parents[1] / "advshield"
                                                          / "pipelines" / "fashion_mnist_random.toml"))
    x = torch.from_numpy(fashion_test.as_float(0, 4))
    o = Oracle(random, 4, seed=0)
    assert o.random
    a, b = o(x, np.arange(4)), o(x, np.arange(4))  # the same images, asked twice
    assert float((a.probs - b.probs).abs().max()) > 1e-3
    again = Oracle(random, 4, seed=0)  # and the audit stays reproducible: the same seed, the same stream
    assert torch.equal(again(x, np.arange(4)).probs, a.probs)


@pytest.mark.parametrize("flagged_is_failure", [True, False])
def test_a_flagged_or_rejected_answer_is_what_the_attacker_sees(flagged_is_failure):
    m = linear_model(10)
    wrong = (m.y + 1) % 10
    flag = lambda x: torch.arange(len(x)) % 2 == 0  # noqa: E731 - flags every other query
    for reject in (False, True):
        o = Oracle(Served(m, flag, reject), 10, flagged_is_failure=flagged_is_failure)
        ans = o(m.x, np.arange(10))
        adv = o.adversarial(ans, wrong)  # every answer is misclassified with respect to `wrong`
        flagged = np.arange(10) % 2 == 0
        if reject:  # label -1 is never a success, whatever flagged_is_failure says
            expect = ~flagged
        else:
            expect = ~flagged if flagged_is_failure else np.ones(10, bool)
        assert adv.numpy().tolist() == expect.tolist()
        margin = o.margin(ans, wrong)
        assert bool((margin[torch.from_numpy(flagged)] >= FLAG_PENALTY).all()) is flagged_is_failure


# --- Square ---------------------------------------------------------------------------------------------

def test_square_helpers():
    assert p_schedule(0.8, 0, 1000) == 0.8 and p_schedule(0.8, 5, 1000) == 0.4  # at 0.5%: halved once
    assert p_schedule(0.8, 999, 1000) == pytest.approx(0.8 / 2**9)
    b = bump(5, 5)
    assert b.norm() == pytest.approx(1.0) and b[2, 2] == b.max() and b[0, 0] == b.min() > 0
    t = two_signed_bump(7)
    assert t.norm() == pytest.approx(1.0) and float(t[:3].min()) > 0 > float(t[3:].max())
    x = torch.full((2, 1, 4, 4), 100 / 255)
    adv = x + torch.tensor([0.3, -0.3]).view(2, 1, 1, 1) / 255 * torch.ones_like(x)
    q = on_grid(x, adv, "l2", 0.3 / 255 * 4, 256)  # rounding up would leave the ball: towards x
    assert torch.equal(q, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_stays_in_budget_on_the_8bit_grid_and_succeeds_where_success_is_certain(norm):
    m = on_8bit(linear_model(12))
    need = minimal_linf(m) if norm == "linf" else m.minimal_l2()
    eps = 3 * float(need.max())
    o = Oracle(Served(m), 12)
    adv = square(o, m.x, m.y, eps=eps, norm=norm, queries=1000, seed=1)
    d = (adv - m.x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(dist.max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert torch.equal(adv, torch.round(adv * 255) / 255)  # every query and the result on the grid
    assert bool((m(adv).argmax(1) != m.y).all())  # success is certain at this budget
    assert o.queries.max() <= 1000 and o.queries.min() >= 1
    # an image stops as soon as it is broken: the first query breaks none here, some need more
    assert 1 < np.median(o.queries) < 1000


def test_square_budget_below_one_grey_level_moves_nothing_and_targeted_is_refused():
    m = on_8bit(linear_model(3))
    o = Oracle(Served(m), 3)
    assert torch.equal(square(o, m.x, m.y, eps=0.5 / 255), m.x) and o.queries.sum() == 0
    with pytest.raises(InputError, match="targeted attacks are not supported"):
        square(o, m.x, m.y, eps=0.1, targeted=True)


def test_square_evades_a_detector_and_never_returns_a_flagged_success():
    """The detector flags every image the model puts in class c, where plain Square sends the
    most samples: detector-aware, Square must break every sample into another class."""
    m = on_8bit(linear_model(10))
    z = m(m.x)
    w1 = (m.W[None] - m.W[m.y][:, None]).abs().sum(2)
    d = (z.gather(1, m.y[:, None]) - z) / w1
    d[torch.arange(10), m.y] = float("inf")
    eps = 3 * float(d.min(1).values.max())
    plain = m(square(Oracle(Served(m), 10), m.x, m.y, eps=eps, queries=1000, seed=0)).argmax(1)
    assert bool((plain != m.y).all())
    c = int(torch.bincount(plain, minlength=10).argmax())
    d[:, c] = float("inf")  # the least L-inf distance to a class other than y and c
    eps = max(eps, 3 * float(d.min(1).values.max()))
    flag = lambda x: m(x.float()).argmax(1) == c  # noqa: E731
    o = Oracle(Served(m, flag), 10)
    adv = square(o, m.x, m.y, eps=eps, queries=1000, seed=0)
    pred = m(adv).argmax(1)
    assert bool((pred != c).all())  # never a flagged success (nor a flagged point kept)
    # most samples evade; the margin loss still counts c as the class to beat, so a few stall
    assert int((pred != m.y).sum()) >= 6, pred
    assert int((plain == c).sum()) >= 2  # so the detector did change what Square returned


# --- HopSkipJump ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,median_ratio,max_ratio", [("l2", 1.6, 2.5), ("linf", 2.0, 3.0)])
def test_hopskipjump_comes_near_the_exact_minimal_perturbation_of_a_linear_model(norm, median_ratio, max_ratio):
    """Within 2,000 decisions per image on 784 pixels: L2 median at most 1.6x the exact optimum
    (max 2.5x); L-inf median 2x (max 3x). Rounding is off: the optimum is off the grid."""
    m = linear_model(16)
    opt = m.minimal_l2() if norm == "l2" else minimal_linf(m)
    o = Oracle(Served(m), 16, seed=3)
    adv = hop_skip_jump(o, m.x, m.y, norm=norm, queries=2000, levels=0, seed=3)
    assert bool((m(adv).argmax(1) != m.y).all())
    d = (adv - m.x).flatten(1)
    ratio = (d.norm(dim=1) if norm == "l2" else d.abs().amax(1)) / opt
    assert float(ratio.min()) >= 1 - 1e-4  # never below the optimum (it is one)
    assert float(ratio.median()) <= median_ratio and float(ratio.max()) <= max_ratio, ratio
    assert o.queries.max() <= 2000


def test_hopskipjump_on_the_grid_returns_adversarial_8bit_images():
    m = on_8bit(linear_model(10))
    o = Oracle(Served(m), 10, seed=1)
    adv = hop_skip_jump(o, m.x, m.y, queries=500, seed=1)
    assert torch.equal(adv, torch.round(adv * 255) / 255)
    assert bool((m(adv).argmax(1) != m.y).all()) and o.queries.max() <= 500


def test_black_box_attacks_are_registered_with_their_access():
    assert get_attack("square_linf").access == "scores" and get_attack("square_l2").kind == "budget"
    assert get_attack("hsj_l2").access == "decisions" and get_attack("hsj_linf").kind == "minimal"
    assert not get_attack("pgd_linf").black_box
    m = on_8bit(linear_model(2))
    adv = run_attack("square_l2", Oracle(Served(m), 2), m.x, m.y, eps=2.0, queries=50)
    assert float((adv - m.x).flatten(1).norm(dim=1).max()) <= 2.0 + 1e-6
    with pytest.raises(ConfigError, match="black-box attack"):
        from_mapping(AuditSpec, {"attacks": [{"name": "square_linf", "transfer": True}]}, "audit")


# --- in the audit ---------------------------------------------------------------------------------------

def spec_of(**table) -> AuditSpec:
    base = {"samples": 30, "batch_size": 15, "sanity_samples": 0, "eps_linf": [8 / 255, 0.1], "eps_l2": [1.0]}
    return from_mapping(AuditSpec, {**base, **table}, "audit")


@pytest.fixture(scope="module")
def data(fashion_test):
    return fashion_test.as_float(0, 30), np.asarray(fashion_test.labels[:30], np.int64)


@pytest.fixture(scope="module")
def setup(pipeline_path):
    from advshield.attacks.audit import build_setup

    cfg = load_pipeline(pipeline_path)
    return build_setup(cfg, spec_of(), torch.zeros(4, 1, 28, 28))


ATTACKS = [{"name": "fgsm"}, {"name": "square_linf", "queries": 200}, {"name": "hsj_l2", "queries": 300}]


def test_the_black_box_stage_runs_after_the_gradient_attacks_on_what_they_left(setup, data, tmp_path):
    spec = spec_of(attacks=ATTACKS)
    auditor = Auditor(setup, spec, *data, tmp_path, progress=False)
    units = auditor.units()
    order = [u.attack for u in units]
    assert order.index("square_linf") > max(i for i, a in enumerate(order) if a == "fgsm")
    assert {u.source for u in units if u.attack in ("square_linf", "hsj_l2")} == {"black-box"}
    records = auditor.run()
    fgsm = {(r["sample"], r["eps"]): r for r in records if r["attack"] == "fgsm"}
    sq = [r for r in records if r["attack"] == "square_linf"]
    hsj = [r for r in records if r["attack"] == "hsj_l2"]
    correct = {r["sample"] for r in records if r["attack"] == "clean" and r["correct"]}
    assert sq and {r["sample"] for r in hsj} == correct  # minimal: every correct sample
    for r in sq:  # the cascade: only what FGSM left robust at that eps, within budget, counted in queries
        assert not fgsm[(r["sample"], r["eps"])]["success"]
        assert r["linf"] <= r["eps"] + 1e-6 and 1 <= r["queries"] <= 200 and r["gradients"] == 0
    assert all(1 <= r["queries"] <= 300 for r in hsj) and all(r["queries"] == 0 for r in fgsm.values())
    assert sum(r["success"] for r in sq) > 0 and np.mean([r["success"] for r in hsj]) > 0.9
    from advshield.attacks.report import compute_metrics

    bb = compute_metrics(records, spec)["black_box"]
    assert bb["attacks"] == ["hsj_l2", "square_linf"] or bb["attacks"] == ["square_linf", "hsj_l2"]
    assert bb["queries_total"] == sum(r["queries"] for r in sq + hsj) and bb["queries_per_second"] > 0


def test_an_interrupted_black_box_stage_resumes_without_losing_or_duplicating_a_record(setup, data, tmp_path):
    spec = spec_of(attacks=ATTACKS)
    full = Auditor(setup, spec, *data, tmp_path / "full", progress=False).run()

    class Stop(Exception):
        pass

    seen = []

    def stop_in_black_box(key):
        seen.append(key)
        if key[0] == "square_linf":
            raise Stop

    with pytest.raises(Stop):
        Auditor(setup, spec, *data, tmp_path / "cut", progress=False, on_commit=stop_in_black_box).run()
    resumed = Auditor(setup, spec, *data, tmp_path / "cut", progress=False).run()
    key = lambda r: (r["sample"], r["attack"], r["eps"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, full))
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(strip, resumed), key=key) == sorted(map(strip, full), key=key)


# --- against a live advshield serve -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(pipeline_path, tmp_path_factory):
    s = start_server(pipeline_path, tmp_path_factory.mktemp("bb") / "serve.log", "--max-batch-size", "256")
    yield s
    s.stop()


def test_black_box_attacks_through_grpc_match_in_process(server, pipeline_path, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 8))
    y = torch.from_numpy(np.asarray(fashion_test.labels[:8], np.int64))
    local = DefendedClassifier.from_config(load_pipeline(pipeline_path))
    with RemoteClassifier(server.url) as remote:
        sent = 0
        for name, hyper in (("square_linf", {"eps": 0.1, "queries": 100}), ("hsj_l2", {"queries": 200})):
            o_remote, o_local = Oracle(remote, 8, seed=5), Oracle(local, 8, seed=5)
            a = run_attack(name, o_remote, x, y, **hyper, seed=5)
            b = run_attack(name, o_local, x, y, **hyper, seed=5)
            # the same answers over the wire: the same search, query for query
            assert torch.allclose(a, b, atol=1e-6) and o_remote.queries.tolist() == o_local.queries.tolist()
            assert bool((local.predict(a).labels != y.numpy()).any())
            sent += int(o_remote.queries.sum())
        stats = remote.stats()
        assert stats["images"] == sent and stats["requests"] >= 100 and stats["retries"] == 0


def test_the_client_rate_limit_holds_and_is_reported(server, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 20))
    with RemoteClassifier(server.url, rate=400.0, batch_size=10, concurrency=2) as remote:
        t0 = time.perf_counter()
        for _ in range(20):  # 400 images at 400 per second, two requests in flight
            remote.predict(x)
        elapsed = time.perf_counter() - t0
        stats = remote.stats()
    assert elapsed >= 0.95, elapsed  # a fresh client has no burst to spend: never faster than the limit
    assert stats["images"] == 400 and stats["requests"] == 40 and stats["rate_limit"] == 400.0
    assert stats["rate_limit_wait_seconds"] > 0.5 and stats["images_per_second"] <= 400 * 1.05
    with RemoteClassifier(server.url, batch_size=10) as free:
        t0 = time.perf_counter()
        for _ in range(20):
            free.predict(x)
        assert time.perf_counter() - t0 < elapsed  # the limit, not the server, set the pace
    with pytest.raises(ConfigError, match="rate limit"):
        RateLimit(-1)


class FlakyProxy(grpc.GenericRpcHandler):
    """A real gRPC server in front of the real one: forwards every call (bytes, metadata) and
    answers the first ``fail`` ModelInfer calls UNAVAILABLE."""

    def __init__(self, upstream: str, fail: int) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.fail = fail
        self.failed = 0
        self.lock = threading.Lock()

    def service(self, details):
        method = details.method
        call = self.channel.unary_unary(method)

        def handle(request: bytes, context):
            if method.endswith("/ModelInfer"):
                with self.lock:
                    if self.failed < self.fail:
                        self.failed += 1
                        context.abort(grpc.StatusCode.UNAVAILABLE, "flaky proxy: try again")
            return call(request, metadata=context.invocation_metadata())

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.mark.parametrize("retries,fail", [(3, 2), (1, 2)])
def test_requests_answered_unavailable_are_retried_with_back_off(server, fashion_test, retries, fail):
    proxy = FlakyProxy(server.url, fail)
    srv = grpc.server(futures.ThreadPoolExecutor(4), handlers=[proxy])
    port = free_port()
    srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    try:
        with RemoteClassifier(f"127.0.0.1:{port}", "fashion_mnist", retries=retries, backoff=0.01) as remote:
            x = torch.from_numpy(fashion_test.as_float(0, 4))
            if retries >= fail:
                pred = remote.predict(x)
                assert len(pred) == 4 and remote.stats()["retries"] == fail
            else:
                with pytest.raises(RemoteError) as e:
                    remote.predict(x)
                assert e.value.code == "UNAVAILABLE" and remote.stats()["retries"] == retries
    finally:
        srv.stop(0)
        proxy.channel.close()


def test_an_audit_of_a_live_server_runs_the_black_box_stage_against_it(server, pipeline_path, tmp_path):
    from advshield.attacks.audit_pipeline import audit_pipeline

    text = Path(pipeline_path).read_text()
    cfg_path = tmp_path / "pipelines" / "bb.toml"
    cfg_path.parent.mkdir()
    head = text.split("[audit]")[0].replace('"../models/', f'"{Path(pipeline_path).parent.parent / "models"}/')
    cfg_path.write_text(head + """[audit]
samples = 12
batch_size = 12
eps_linf = [0.1]
eps_l2 = [1.0]
sanity_samples = 0
probe_samples = 0
query_rate = 2000
attacks = [{ name = "fgsm" }, { name = "square_linf", queries = 100 }, { name = "hsj_l2", queries = 200 }]
""")
    result = audit_pipeline(load_pipeline(cfg_path), out=tmp_path / "audit", target=f"grpc://{server.url}",
                            certify=False, progress=False)
    bb = result.metrics["black_box"]
    assert bb["endpoint"] == f"grpc://{server.url}" and bb["rate_limit"] == 2000
    client = result.probes["client"]
    queries = sum(r["queries"] for r in result.records)
    assert queries == bb["queries_total"] > 0 and client["images"] >= queries
    md = result.paths["report_md"].read_text()
    assert "## Black-box stage" in md and "queries/s" in md and "2000 images/s" in md
