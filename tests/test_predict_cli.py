"""`locca predict` (locca/predict.py): the model in this process and a real server (--url) give the same
answer, printed as the REST contract's JSON, and the annotated PNG has the answer's boxes on their pixels."""

import json

import pytest
from PIL import Image

from locca.cli import main
from model.shapes import generate_scene
from service import images, render
from service import predict as predict_cli

MODEL = "models/locca-tiny-shapes"


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    scene = generate_scene(0)  # 365 x 313, four objects
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene.image.save(path)
    return scene, path


def predict(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_local_every_task_and_the_drawing(capsys, scene_png, tmp_path):
    scene, path = scene_png
    expression = scene.expressions[0]
    code, refer, _ = predict(capsys, path, "--task", "refer", "--expression", expression, "--model", MODEL,
                             "--out", tmp_path / "refer.png")
    assert code == 0 and set(refer) == {"expression", "box", "score"} and refer["expression"] == expression
    x0, y0, x1, y1 = refer["box"]
    assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
    drawn = Image.open(tmp_path / "refer.png")
    assert drawn.size == scene.image.size and json.loads(drawn.text["locca:result"]) == refer
    c0, r0, c1, r1 = render.pixel_box(refer["box"], *drawn.size)
    rgb = drawn.convert("RGB")
    assert rgb.getpixel((c0, (r0 + r1) // 2)) == rgb.getpixel((c1, (r0 + r1) // 2)) == render.PALETTE[0]

    code, caption, _ = predict(capsys, path, "--task", "caption", "--model", MODEL, "--max-new-tokens", 24)
    assert code == 0 and set(caption) == {"caption", "score"} and caption["caption"]

    code, ground, _ = predict(capsys, path, "--task", "ground", "--box", "10,20,80,90", "--model", MODEL,
                              "--out", tmp_path / "ground.png")
    assert code == 0 and len(ground["regions"]) == 1 and ground["regions"][0]["box"] == [10, 20, 80, 90]
    assert Image.open(tmp_path / "ground.png").convert("RGB").getpixel((10, 55)) == render.PALETTE[0]



def test_usage_errors(capsys, scene_png, tmp_path):
    _, path = scene_png
    code, _, err = predict(capsys, path, "--task", "refer", "--model", MODEL)
    assert code == 2 and "--expression" in err
    code, _, err = predict(capsys, path, "--task", "ground", "--box", "1,2,3", "--model", MODEL)
    assert code == 2 and "four numbers" in err
    code, _, err = predict(capsys, tmp_path / "missing.png", "--model", MODEL)
    assert code == 2 and "missing.png" in err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    code, _, err = predict(capsys, tmp_path / "junk.png", "--model", MODEL)
    assert code == 2 and "not an image" in err
    code, _, err = predict(capsys, path, "--url", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert code == 2 and "no answer from" in err
    with pytest.raises(SystemExit):
        main(["predict", str(path), "--task", "segment"])


def test_url_mode_gives_the_local_answer(capsys, scene_png, tmp_path, bundled_server):
    scene, path = scene_png
    image = images.decode(path.read_bytes(), predict_cli.LOCAL_LIMITS)
    here = predict_cli.load_predictor(MODEL)  # what the local mode runs (locca/predict.py's local)
    asks = [("refer", ("--expression", scene.expressions[1]), {"expression": scene.expressions[1]}),
            ("caption", (), {}), ("ground", ("--max-regions", 2), {"max_regions": 2}),
            ("caption", ("--grounded",), {"grounded": True})]
    for task, flags, kw in asks:
        code, there, err = predict(capsys, path, "--task", task, *flags, "--url", bundled_server.url,
                                   "--out", tmp_path / f"{task}.png")
        assert code == 0, err
        local = predict_cli.answer(here, image, task, **kw)
        if task == "refer":
            assert there["box"] == pytest.approx(local["box"]) and there["expression"] == local["expression"]
        elif task == "caption":
            assert there["caption"] == local["caption"] and there["score"] == pytest.approx(local["score"], abs=1e-3)
            assert ("phrases" in there) == ("phrases" in local) == bool(kw)
            for a, b in zip(there.get("phrases", []), local.get("phrases", []), strict=True):
                assert a["text"] == b["text"] and a["span"] == b["span"] and a["box"] == pytest.approx(b["box"])
        else:
            assert len(there["regions"]) == len(local["regions"]) and there["regions"]
            assert [r["text"] for r in there["regions"]] == [r["text"] for r in local["regions"]]
            for a, b in zip(there["regions"], local["regions"], strict=True):
                assert a["box"] == pytest.approx(b["box"])
        drawn = Image.open(tmp_path / f"{task}.png")  # drawn from the server's answer (the last of a task)
        assert json.loads(drawn.text["locca:result"]) == there
    code, _, err = predict(capsys, path, "--task", "ground", "--box", "0,0,0,0", "--url", bundled_server.url)
    assert code == 2 and "bad_box" in err  # the server's error, passed on


def test_eval_over_rest_scores_what_the_model_answers_in_process(bundled_server, tmp_path):
    """`locca eval --url`: the same scenes through the server's REST API score as `locca eval CHECKPOINT`."""
    from locca.cli import main
    from model.evaluate import evaluate, evaluate_crowded
    from model.heldout import heldout_scenes

    out = tmp_path / "rest.json"
    assert main(["eval", "--url", bundled_server.url, "--scenes", "3", "--offset", "5000", "--crowded", "2",
                 "--json", str(out)]) == 0
    rest = json.loads(out.read_text())
    here = predict_cli.load_predictor(MODEL)
    local = evaluate(here.inference, here.tasks, heldout_scenes(3, 5000), progress=False)
    local |= evaluate_crowded(here.inference, here.tasks, heldout_scenes(2, 5000, count=8), progress=False)
    for k in ("refer_acc50", "caption_exact", "describe_exact", "proposal_precision", "proposal_recall",
              "proposals_per_scene", "phrase_acc", "crowded_proposal_recall", "crowded_proposal_precision"):
        assert rest[k] == local[k], k
    assert rest["refer_miou"] == pytest.approx(local["refer_miou"], abs=1e-3) and rest["scenes"] == 3
    assert rest["refer_acc50"] > 0.5  # the bundled model localises: a broken path would score near 0
