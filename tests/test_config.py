import pytest

from advshield.core.errors import ArtifactError, ConfigError
from advshield.plugin.config import load_pipeline, loads_pipeline

BASE = """
[model]
path = "m.onnx"
"""


def test_default_pipeline_loads_and_hashes(pipeline_path, model_path):
    cfg = load_pipeline(pipeline_path)
    assert cfg.model_path == model_path.resolve()
    assert cfg.input.shape == (1, 28, 28)
    sums = cfg.checksums()
    assert set(sums) == {"model", "surrogate"} and all(len(v) == 64 for v in sums.values())


def test_round_trip(pipeline_path):
    cfg = load_pipeline(pipeline_path)
    again = loads_pipeline(cfg.dumps(), root=cfg.root)
    assert again.to_dict() == cfg.to_dict()
    assert again.model == cfg.model and again.input == cfg.input and again.gate == cfg.gate


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (BASE + "\n[input]\nchanels = 1\n", r"input: unknown key 'chanels'; allowed: .*channels"),
        (BASE + "\n[input]\nchannels = 2\n", r"input.channels: must be 1 or 3, got 2"),
        (BASE + "\n[input]\nheight = 'big'\n", r"input.height: expected an integer, got 'big'"),
        (BASE + "\n[input]\nresize = 'stretch'\n", r"input.resize: expected 'exact' or 'resize' or 'crop', got 'stretch'"),
        (BASE + "\n[gate]\nmin_clean_accuracy = 1.5\n", r"gate.min_clean_accuracy: must be within \[0, 1\], got 1.5"),
        (BASE + "\n[modle]\nx = 1\n", r"unknown section 'modle'"),
        ("[input]\nchannels = 1\n", r"missing required section \[model\]"),
        ("[model]\nsha256 = 'abc'\npath='m.onnx'\n", r"model.sha256: 'abc' is not a lowercase hex sha256"),
        (BASE + "\n[[defenses]]\ntype = 'no_such_defense'\n", r"defenses\[0\].type: unknown defense type 'no_such_defense'"),
        (BASE + "\n[[defenses]]\nbits = 3\n", r"defenses\[0\]: missing required key 'type'"),
        (BASE + "\n[model\n", r"invalid TOML"),
        (BASE + "\n[artifacts.cb]\nsha = 'x'\n", r"artifacts.cb: unknown key 'sha'"),
    ],
)
def test_bad_values_are_named(text, match):
    with pytest.raises(ConfigError, match=match):
        loads_pipeline(text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.toml")


def test_sha256_mismatch_is_an_error(tmp_path, model_path):
    (tmp_path / "p.toml").write_text(f'[model]\npath = "{model_path.as_posix()}"\nsha256 = "{"0" * 64}"\n')
    cfg = load_pipeline(tmp_path / "p.toml")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        cfg.checksums()
    (tmp_path / "q.toml").write_text('[model]\npath = "missing.onnx"\n')
    with pytest.raises(ArtifactError, match="file not found"):
        load_pipeline(tmp_path / "q.toml").checksums()


def test_relative_paths_resolve_against_the_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "p.toml").write_text('[model]\npath = "../models/m.onnx"\n')
    assert load_pipeline(sub / "p.toml").model_path == (tmp_path / "models" / "m.onnx").resolve()
