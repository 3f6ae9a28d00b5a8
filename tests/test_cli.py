import json

import numpy as np

from advshield.cli import main
from advshield.plugin.decode import encode_png


def test_info_shows_checksums(pipeline_path, capsys):
    assert main(["info", str(pipeline_path), "--json", "--parity"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["files"]) == {"model", "surrogate"}
    assert out["twin_parity_max_abs_diff"] < 1e-3


def test_predict_json_and_table(tmp_path, pipeline_path, fashion_test, capsys):
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(encode_png(fashion_test.as_float(i, i + 1)[0]))
        paths.append(str(p))
    assert main(["predict", str(pipeline_path), *paths, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert sum(r["label"] == int(fashion_test.labels[i]) for i, r in enumerate(rows)) >= 2
    for r in rows:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
    assert main(["predict", str(pipeline_path), paths[0], "--top", "2"]) == 0
    assert "img0.png" in capsys.readouterr().out


def test_predict_reports_bad_files_and_keeps_going(tmp_path, pipeline_path, fashion_test, capsys):
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(fashion_test.as_float(0, 1)[0]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["predict", str(pipeline_path), str(bad), str(good), str(tmp_path / "missing.png"), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "error" in rows[0] and "cannot read file" in rows[1]["error"]
    assert rows[2]["image"] == str(good) and "label" in rows[2]


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "p.toml").write_text("[model]\npath = 'x.onnx'\n[input]\nsize = 3\n")
    assert main(["info", str(tmp_path / "p.toml")]) == 2
    assert "unknown key 'size'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_png_helper_quantizes():
    x = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(1, 28, 28)
    assert len(encode_png(x)) > 50
