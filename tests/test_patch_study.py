"""The patch-replacement study (thesis ch. 6): its configuration grids, one small real run on the
embedded Fashion-MNIST model (an identity configuration must measure exactly like no defense;
codebooks shared across strategies are fitted once), and ``advshield study patches``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advshield.attacks.patch_study import (
    Configuration,
    StudySettings,
    build_configuration,
    default_configurations,
    grid_configurations,
    markdown_table,
    patch_table,
    patches,
    run_patch_study,
    squeezers,
)
from advshield.cli import main
from advshield.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_points_cover_every_axis_and_validate():
    st = StudySettings()
    confs = default_configurations(st)
    labels = [c.label for c in confs]
    assert len(labels) == len(set(labels))
    tables = [t for c in confs for t in c.defenses if t["type"] == "patch_replacement"]
    assert {t["codewords"] for t in tables} >= {64, 256, 4096}
    assert {t["radius"] for t in tables} == {1, 2} and {t["stride"] for t in tables} >= {1, 2, 3}
    assert {t["strategy"] for t in tables} == {"plain", "l2", "linf", "linear"}
    assert {t["layer"] for t in tables} == {"image", "relu"}
    assert any(len(c.defenses) == 2 for c in confs)  # both layers stacked
    assert {c.family for c in confs} == {"none", "patches", "bit_depth", "median", "jpeg"}
    for c in confs:
        build_configuration(c)  # every table passes the pipeline file's validation


def test_the_full_grid_is_larger_and_valid():
    st = StudySettings()
    confs = grid_configurations(st)
    labels = [c.label for c in confs]
    assert len(labels) == len(set(labels)) and len(confs) > 4 * len(default_configurations(st))
    for c in confs[::7]:
        build_configuration(c)
    with pytest.raises(ConfigError, match="must be within"):
        build_configuration(patches("bad", patch_table(st, radius=1, stride=4)))


@pytest.fixture(scope="module")
def small_run(fashion_test, model_path):
    from advshield.core.data import load_fashion_mnist

    st = StudySettings(samples=8, clean=200, attack_steps=10, smooth=True, smooth_steps=5, sample=8192,
                       fit_images=1000, iterations=5, batch=8)
    identity = patch_table(st, codewords=64, strategy="linf", eps=0.0)
    confs = [Configuration("undefended", "none"),
             patches("identity", identity),
             patches("plain64", patch_table(st, codewords=64)),
             patches("linf64", patch_table(st, codewords=64, strategy="linf", eps=0.1)),
             squeezers()[0]]
    train = load_fashion_mnist("train").as_float(0, 1000)
    rows = run_patch_study(model_path, train, (fashion_test.as_float(0, 200), fashion_test.labels[:200]), confs, st,
                           progress=False)
    return {r["label"]: r for r in rows}


def test_an_identity_configuration_measures_exactly_like_no_defense(small_run):
    """linf with eps = 0 returns every patch unchanged (section 6.3.3): same predictions, and BPDA's
    identity backward pass is then exact, so the attacks must find the same examples."""
    none, ident = small_run["undefended"], small_run["identity"]
    for key in ("clean_accuracy", "bpda_p_suc", "bpda_mean_l2", "scw_adaptive_p_suc", "ddn_transfer_p_suc",
                "scw_transfer_p_suc"):
        assert ident[key] == pytest.approx(none[key], abs=1e-6), key


def test_rows_are_consistent(small_run):
    none = small_run["undefended"]
    assert none["fit_seconds"] == 0 and none["bpda_p_suc"] == 1.0 and 0.85 <= none["clean_accuracy"] <= 1
    # crafted on the undefended twin and scored on the undefended serving path, transfer is the
    # white-box attack itself: the same examples as the adaptive runs
    assert none["ddn_transfer_p_suc"] == none["bpda_ddn_p_suc"] == 1.0
    assert none["scw_transfer_p_suc"] == none["scw_adaptive_p_suc"] > 0.5
    assert none["scw_transfer_mean_l2"] == pytest.approx(none["scw_adaptive_mean_l2"])
    plain, linf = small_run["plain64"], small_run["linf64"]
    assert plain["fit_seconds"] > 0 and linf["fit_seconds"] == plain["fit_seconds"]  # one codebook, fitted once
    assert plain["images_per_second"] > 0 and plain["correct"] <= plain["attacked"] == 8
    for r in small_run.values():
        assert 0 <= r["bpda_p_suc"] <= 1 and (np.isnan(r["bpda_mean_l2"]) or r["bpda_mean_l2"] > 0)
    assert plain["nearest_squeezer"] == "bit1"
    text = markdown_table(list(small_run.values()), smooth=True)
    assert "| plain64 |" in text and "sC&W transfer P_suc" in text


def test_the_command_writes_table_json_and_plot(pipeline_path, tmp_path, capsys):
    code = main(["study", "patches", str(pipeline_path), "--samples", "4", "--clean", "100", "--steps", "5",
                 "--fit-images", "500", "--sample", "4096", "--iterations", "3", "--only", "undefended",
                 "--only", "img K64 3x3 c2 plain", "--only", "bit1", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| img K64 3x3 c2 plain |" in out and "study.png" in out
    data = json.loads((tmp_path / "study.json").read_text())  # strict JSON (no NaN / Infinity)
    assert [r["label"] for r in data["rows"]] == ["undefended", "img K64 3x3 c2 plain", "bit1"]
    assert data["feature_layer"] == "relu"
    assert (tmp_path / "study.png").stat().st_size > 1000
    assert main(["study", "patches", str(pipeline_path), "--only", "nope", "--out", str(tmp_path), "--quiet"]) == 2


@pytest.mark.slow
def test_the_documented_rows_reproduce(pipeline_path, tmp_path):
    """docs/thesis.md's Fashion-MNIST table: the study is seeded end to end (codebooks, attacks),
    so rerunning its command for two rows gives the documented figures (about 60 s)."""
    from advshield.studies import study_patches

    rows = {r["label"]: r for r in study_patches(pipeline_path, out=tmp_path, only=("img K4096 3x3 c2 plain", "bit2"),
                                                 progress=False)["rows"]}
    assert rows["img K4096 3x3 c2 plain"]["clean_accuracy"] == pytest.approx(0.923, abs=1e-3)
    assert rows["img K4096 3x3 c2 plain"]["bpda_mean_l2"] == pytest.approx(0.532, abs=2e-3)
    assert rows["bit2"]["clean_accuracy"] == pytest.approx(0.904, abs=1e-3)
    assert rows["bit2"]["bpda_mean_l2"] == pytest.approx(0.746, abs=2e-3)


def test_comparable_squeezers_are_those_at_least_as_accurate():
    from advshield.attacks.patch_study import mark_comparable

    row = lambda label, family, acc, d: {"label": label, "family": family, "clean_accuracy": acc,  # noqa: E731
                                         "bpda_mean_l2": d}
    rows = mark_comparable([row("p", "patches", 0.920, 0.60), row("b1", "bit_depth", 0.800, 1.50),
                            row("b2", "bit_depth", 0.916, 0.50), row("m", "median", 0.930, 0.30),
                            row("j", "jpeg", 0.914, 0.90)])
    p = rows[0]
    assert p["nearest_squeezer"] == "b2"  # |0.916 - 0.920| is the smallest gap
    # b1 (12 points less accurate) and j (0.6 point less) are not comparable; b2 (0.4 less) is
    assert p["best_comparable_squeezer"] == "b2" and p["ratio_to_best_comparable_squeezer"] == pytest.approx(1.2)
