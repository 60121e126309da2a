"""The shipped demo model (qwen_vl/testing/demo_checkpoint.py), served as a user gets it: `python -m
qwen_vl.server` with no --model. It expands into the same bytes on every machine, a damaged file
is refused naming it, and it answers about fresh scenes (drawn by the evaluation generator, which
training never used) at least as well as ASSERTED says, so a broken image path, resize or prompt
fails here; and the README's first examples show what it answers."""

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageChops

from qwen_vl.benchmarks.demo_accuracy import CHINESE_GAP, TARGETS, accuracy, evaluate, report
from qwen_vl.demo.tasks import iou
from qwen_vl.server.demo import sample_image
from qwen_vl.testing import demo_checkpoint as shipped
from tests.helpers import API_KEY, AUTH, data_url

README = (Path(__file__).parents[1] / "README.md").read_text()

# What the test asserts (share of right answers on SCENES, greedy and at the checkpoint's default
# sampling), against the targets (TARGETS; docs/demo.md reports them on 100 scenes).
# Where the shipped weights reach a target, a little below it; where they do not yet, a little
# below what they answer here (2026-12-07, run 17: name 33/40, where 35/40, the word 0/13), so a
# broken image path, resize or prompt still fails. 40 scenes give about 40 questions of a kind:
# one answer is 2.5 points. The word is not asserted: the demo does not read yet (docs/demo.md).
ASSERTED = {"name": 0.70, "count": 0.90, "colour": 0.90, "where": 0.80, "which": 0.85}
ASSERTED_CHINESE_GAP = 0.10
SCENES = range(5000, 5040)  # seeds that neither training nor BENCHMARKS.md's figures used


def test_the_shipped_weights_expand_byte_identically_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_VL_CACHE", str(tmp_path))
    assert shipped.file_sha256(shipped.WEIGHTS) == shipped.WEIGHTS_SHA256
    assert shipped.WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    path = shipped.demo_checkpoint()
    assert path.parent == tmp_path and shipped.checkpoint_sha256(path) == shipped.CHECKPOINT_SHA256
    mtime = (path / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    assert shipped.demo_checkpoint() == path and (path / "model-00001-of-00001.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left


def test_a_damaged_weights_file_is_refused_naming_it(tmp_path, monkeypatch):
    damaged = tmp_path / "qwen-vl-demo.safetensors"
    shutil.copyfile(shipped.WEIGHTS, damaged)
    with damaged.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setenv("QWEN_VL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shipped, "WEIGHTS", damaged)
    with pytest.raises(RuntimeError, match=f"{damaged}.*sha256"):
        shipped.demo_checkpoint()


@pytest.mark.parametrize("sampling", ["greedy", "default"])
def test_the_demo_answers_about_fresh_scenes(demo_server, sampling):
    results = asyncio.run(evaluate(demo_server, SCENES, "qwen-vl-demo", sampling, API_KEY))
    print(f"{len(SCENES)} scenes, sampling {sampling}\n{report(results)}")
    shares = {kind: right / total for kind, (right, total) in accuracy(results).items()}
    assert set(shares) == {*TARGETS, "name_zh", "count_zh", "where_zh"}
    missed = {kind: f"{share:.0%} < {ASSERTED[kind]:.0%} (target {TARGETS[kind]:.0%})"
              for kind, share in shares.items() if kind in ASSERTED and share < ASSERTED[kind]}
    missed |= {kind: f"{share:.0%}, English {shares[kind[:-3]]:.0%} (target gap {CHINESE_GAP:.0%})"
               for kind, share in shares.items()
               if kind.endswith("_zh") and share < shares[kind[:-3]] - ASSERTED_CHINESE_GAP}
    assert not missed, missed


def readme_picture(directory: Path) -> Path:
    """The picture the README draws, by running its command (with this interpreter)."""
    command = re.search(r'`python (-c "from PIL import .*?")`', README).group(1)
    subprocess.run(f"{sys.executable} {command}", shell=True, cwd=directory, check=True)
    return directory / "picture.png"


def test_the_readme_shows_what_the_demo_answers(demo_server, tmp_path):
    """The README's first examples, asked as it asks them (its picture, its questions, the
    checkpoint's default sampling), answer what the README says: the naming word for word; the box
    within the digits that sampling varies (IoU >= 0.8 with the README's, on the grid and in
    pixels), and on the circle the picture draws (IoU >= 0.5). The offline demo's default picture
    is the same picture."""
    picture = readme_picture(tmp_path)
    assert ImageChops.difference(Image.open(picture).convert("RGB"), sample_image()).getbbox() is None

    def ask(question: str, max_tokens: int) -> dict:
        body = {"model": "qwen-vl-demo", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(picture.read_bytes())}},
            {"type": "text", "text": question}]}]}
        response = httpx.post(f"{demo_server}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]

    shown = re.search(r'# \.\.\. "content": "(.*)" \.\.\.', README).group(1)
    assert ask("What is in this picture?", 32)["content"] == shown
    grid_shown = numbers(re.search(r"print\(answer\.choices\[0\]\.message\.content\) +# (.*)", README).group(1))
    pixels_shown = numbers(re.search(r'print\(answer\.choices\[0\]\.message\.model_extra\["boxes"\]\[0\]\["box_pixels"\]\) +# (.*)',
                                     README).group(1))
    answer = ask("Where is the red circle?", 48)
    assert re.fullmatch(r"<ref>the red circle</ref><box>\(\d+,\d+\),\(\d+,\d+\)</box>", answer["content"]), answer
    [box] = answer["boxes"]
    assert iou(numbers(answer["content"]), grid_shown) >= 0.8 and iou(box["box_pixels"], pixels_shown) >= 0.8, answer
    circle = numbers(re.search(r"d\.ellipse\(\((.*?)\), fill='red'\)", README).group(1))
    assert iou(box["box_pixels"], circle) >= 0.5, (box, circle)


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]
