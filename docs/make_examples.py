"""Regenerate docs/examples/ (held-out shapes-world scenes, a model's annotated answers beside the true boxes)
and the demo page's screenshot docs/demo.png.

    make examples                                         # the default model, models/locca-tiny-shapes
    .venv/bin/python docs/make_examples.py --model runs/shapes_tiny_long/checkpoint.safetensors
    .venv/bin/python docs/make_examples.py --no-screenshot  # without Chromium

The answers come from `locca predict`'s own code (service/predict.py, in this process), drawn by
service/render.py exactly as `render=png` and `locca predict --out` draw them; docs/examples/README.md,
written here too, says which model and training step gave them and how to reproduce each one. The PNGs are
stored with a palette (at most 128 colours) to keep each under 100 KB; the inputs are saved first and the
model reads the saved files, so the commands in the README reproduce the answers exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.heldout import heldout_scenes  # noqa: E402
from model.predictor import iou  # noqa: E402
from service import images, launch, predict, render  # noqa: E402

OUT = ROOT / "docs" / "examples"
# Held-out scenes (never trained on) whose PNGs stay small: 213x279 with 3 objects, 250x292 with 4, 304x231
# with 6 (index into model.heldout.heldout_scenes).
SCENES = (7, 9, 6)


def save_small(im, path: Path, colours: int = 128) -> None:
    im.convert("RGB").quantize(colours, dither=0).save(path, optimize=True)


def examples(model: str) -> list[dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    predictor = predict.load_predictor(model)
    rows = []
    for k, index in enumerate(SCENES, start=1):
        scene = heldout_scenes(index + 1)[index]
        name = f"scene-{k}"
        save_small(scene.image, OUT / f"{name}.png", colours=64)
        image = images.decode((OUT / f"{name}.png").read_bytes(), predict.LOCAL_LIMITS)
        expression, truth_box = scene.expressions[0], list(scene.objects[0].box)
        refer = predict.answer(predictor, image, "refer", expression)
        ground = predict.answer(predictor, image, "ground")
        caption = predict.answer(predictor, image, "caption", grounded=True)
        truth = {"regions": [{"box": list(o.box), "text": e, "score": 0.0}
                             for o, e in zip(scene.objects, scene.expressions, strict=True)]}
        for task, result, suffix in [("refer", refer, "refer"), ("ground", ground, "ground"),
                                     ("caption", caption, "caption"), ("ground", truth, "truth")]:
            save_small(render.annotate(image, task, result), OUT / f"{name}-{suffix}.png")
        rows.append({"name": name, "size": image.size, "expression": expression, "truth_box": truth_box,
                     "refer": refer, "iou": iou(refer["box"], truth_box), "ground": ground, "caption": caption,
                     "true_caption": scene.caption})
    return rows


def readme(rows: list[dict], model: str, meta: dict) -> str:
    step = meta.get("step", "?")
    scores = Path(model) / "eval.json" if Path(model).is_dir() else Path(model).with_name("eval.json")
    accuracy = json.loads(scores.read_text()) if scores.is_file() else None
    lines = [
        "# Examples: the model's answers drawn on held-out shapes-world scenes",
        "",
        f"Written by `docs/make_examples.py` (`make examples`) from **`{model}`, training step {step}**, on "
        "held-out scenes (`model.heldout.heldout_scenes`, never trained on). For each scene:",
        "",
        "- `scene-N.png`: the input;",
        "- `scene-N-refer.png`: `/v1/refer` with the scene's first referring expression;",
        "- `scene-N-ground.png`: `/v1/ground` without a box (every object the model finds, docs/ground.md);",
        "- `scene-N-caption.png`: `/v1/caption` with `grounded=true` (each object phrase in its box's colour);",
        "- `scene-N-truth.png`: the true boxes and expressions of every object, drawn the same way (what a",
        "  model that localises well would return).",
        "",
        "Every box is drawn where the answer puts it (service/render.py; `tests/test_render.py` checks the",
        "pixels). Whether it is on the named object is the model's doing: compare with `-truth.png`"
        + (f"; on {accuracy['scenes']} held-out scenes this model's refer Acc@0.5 is {accuracy['refer_acc50']:.3f}"
           f", and /ground finds {accuracy['proposal_recall']:.3f} of the objects at precision "
           f"{accuracy['proposal_precision']:.3f} (`eval.json` beside it)."
           if accuracy else ".") + " Run `make examples` again with a better model (`MODEL=...`) to refresh these files.",
        "",
    ]
    for r in rows:
        n = r["name"]
        lines += [
            f"## {n} ({r['size'][0]} x {r['size'][1]})",
            "",
            "| the model's refer answer | every object it finds | its grounded caption | the truth |",
            "|---|---|---|---|",
            f"| ![]({n}-refer.png) | ![]({n}-ground.png) | ![]({n}-caption.png) | ![]({n}-truth.png) |",
            "",
            "```bash",
            f"locca predict docs/examples/{n}.png --task refer --expression \"{r['expression']}\" "
            f"--out {n}-refer.png",
            f"locca predict docs/examples/{n}.png --task ground --out {n}-ground.png",
            f"locca predict docs/examples/{n}.png --task caption --grounded --out {n}-caption.png",
            "```",
            "",
            f"- refer \"{r['expression']}\": box `{[round(v, 1) for v in r['refer']['box']]}`, true box "
            f"`{r['truth_box']}`, IoU {r['iou']:.2f}",
            "- every object: " + "; ".join(f"\"{g['text']}\"" for g in r["ground"]["regions"]),
            f"- caption: \"{r['caption']['caption']}\" (true: \"{r['true_caption']}\")",
            "",
        ]
    return "\n".join(lines)


def screenshot(model: str, path: Path, example: Path, expression: str) -> None:
    """The demo page in headless Chromium, after a refer request on `example`."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,700", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    with launch.launch("/tmp/locca-examples-serve.log", model=model, backend="torch", threads=1) as server:
        d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            d.get(server.url + "/")
            WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "model").text)
            d.find_element(By.ID, "file").send_keys(str(example))
            d.find_element(By.CSS_SELECTOR, "input[name=task][value=refer]").click()
            d.find_element(By.ID, "expression").send_keys(expression)
            d.find_element(By.ID, "run").click()
            WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.answered"))
            time.sleep(0.2)
            tmp = path.with_suffix(".raw.png")
            d.save_screenshot(str(tmp))
        finally:
            d.quit()
    save_small(Image.open(tmp), path, colours=48)
    tmp.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/locca-tiny-shapes", help="checkpoint or directory holding one")
    p.add_argument("--no-screenshot", action="store_true", help="skip docs/demo.png (needs Chromium)")
    args = p.parse_args()
    from model.checkpoint import read_header

    ckpt = args.model if args.model.endswith(".safetensors") else f"{args.model}/checkpoint.safetensors"
    meta = json.loads(read_header(ckpt).get("meta", "{}"))
    rows = examples(args.model)
    (OUT / "README.md").write_text(readme(rows, args.model, meta))
    if not args.no_screenshot:
        if shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")):
            screenshot(args.model, ROOT / "docs" / "demo.png", OUT / "scene-1.png", rows[0]["expression"])
        else:
            print("no chromium/chromedriver: docs/demo.png not refreshed", file=sys.stderr)
    for f in sorted([*OUT.glob("*.png"), ROOT / "docs" / "demo.png"]):
        if f.exists():
            print(f"{f.relative_to(ROOT)}  {f.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
