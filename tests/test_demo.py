"""The demo model's training (qwen_vl.demo): it trains the function the plugin serves, on the full
vocabulary's softmax, and writes a checkpoint in the original layout."""

import random

import numpy
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from qwen_vl.demo.network import TrainableQwenVL, packed_layout
from qwen_vl.demo.scenes import Scene, Shape, training_scene
from qwen_vl.demo.tasks import questions, which_question
from qwen_vl.demo.train import CELL_COLOURS, CELL_SHAPES, FOCUS_LAYER, Batcher, Conversations, cell_labels, letter_cells, train
from qwen_vl.model_executor.tokenizer import IMG_PAD_ID
from qwen_vl.testing.checkpoint import config_dict, write_checkpoint
from qwen_vl.testing.demo_checkpoint import training_metadata, write_trained_checkpoint
from qwen_vl.testing.reference import ReferenceQwenVL, read_checkpoint

DEMO = config_dict("demo")


@pytest.fixture(scope="module")
def demo_random(tmp_path_factory):
    """A random checkpoint of the demo's sizes (float32), one training example (several questions
    about one picture, packed), and the reference on that checkpoint."""
    path = write_checkpoint(tmp_path_factory.mktemp("demo-random"), preset="demo", seed=1, dtype="float32")
    example = next(e for e in Conversations("test") if len(e.single_turns()) >= 3)
    return path, example, ReferenceQwenVL.from_pretrained(path)


def one_batch(example, vocab):
    return Batcher(iter([example]), vocab, DEMO["vocab_size"], DEMO["visual"]["image_size"]).batch(1)


def test_the_trained_network_computes_what_the_original_code_computes(demo_random):
    """Packed, each question's positions give the logits of its own single-turn conversation run
    by the original code; unpacked (one conversation per row), the same."""
    path, example, reference = demo_random
    vocab = sorted(set(example.ids))
    model = TrainableQwenVL(DEMO, vocab)
    model.load_checkpoint_state(read_checkpoint(path))
    b = one_batch(example, vocab)
    segments = b.segments[0]
    shared = int((segments == 0).sum())
    assert (torch.tensor(example.ids[:shared]) == IMG_PAD_ID).sum() == 256 * len(example.images)
    with torch.no_grad():
        image_tokens = model.transformer.visual(b.pixels)
        packed = model.lm_head(model.hidden_states(b.ids, b.image_positions, image_tokens, b.segments))[0]
        turns = example.single_turns()
        for k, (ids, _) in enumerate(turns, start=1):
            expected = reference.logits(ids, example.images)[:, vocab]
            rows = torch.cat((torch.arange(shared), (segments == k).nonzero().flatten()))
            torch.testing.assert_close(packed[rows], expected, atol=1e-4, rtol=1e-4)
        alone = model.lm_head(model.hidden_states(torch.tensor([vocab.index(i) for i in turns[0][0]])[None],
                                                  torch.tensor(turns[0][0])[None] == IMG_PAD_ID, image_tokens))[0]
        torch.testing.assert_close(alone, reference.logits(turns[0][0], example.images)[:, vocab], atol=1e-4, rtol=1e-4)


def test_the_training_loss_is_the_full_vocabulary_softmax(demo_random):
    """With every row outside the vocabulary zero, the loss equals the served model's
    151,936-way cross-entropy on the answer tokens of every packed question."""
    path, example, reference = demo_random
    vocab = sorted(set(example.ids))
    state = read_checkpoint(path)
    outside = torch.ones(state["lm_head.weight"].shape[0], dtype=torch.bool)
    outside[vocab] = False
    state["lm_head.weight"][outside] = 0
    model = TrainableQwenVL(DEMO, vocab)
    model.load_checkpoint_state(state)
    b = one_batch(example, vocab)
    with torch.no_grad():
        loss = model.answer_loss(model.hidden_states(b.ids, b.image_positions, model.transformer.visual(b.pixels),
                                                     b.segments), b.targets)
    expected = []
    for ids, answer in example.single_turns():
        logits = reference.logits(ids, example.images).masked_fill(outside, 0)  # what a zero LM-head row gives
        positions = torch.tensor(answer)[1:].nonzero().flatten()
        expected.append(F.cross_entropy(logits[positions], torch.tensor(ids)[positions + 1], reduction="none"))
    expected = torch.cat(expected)
    assert len(expected) >= 6 and len(expected) == int((b.targets >= 0).sum())
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)


def test_training_writes_a_checkpoint_in_the_original_layout(tmp_path):
    """Two steps of the real training loop; the file expands into a checkpoint the reference loads
    strictly (no tensor missing or unused), with the trained rows in place and zeros elsewhere."""
    shipped = tmp_path / "weights.safetensors"
    train(shipped, steps=2, batch=2, seed=0, vocab_conversations=200)
    checkpoint = write_trained_checkpoint(tmp_path / "checkpoint", shipped)
    state = read_checkpoint(checkpoint)
    ReferenceQwenVL.from_pretrained(checkpoint)
    assert training_metadata(shipped)["steps"] == 2
    used = state["lm_head.weight"].abs().sum(dim=1) > 0
    assert 50 < int(used.sum()) < 1000 and state["lm_head.weight"].shape[0] == 151936


def vit_names(state: dict) -> list[str]:
    """The ViT's tensors: the visual encoder's, less the adapter's (attn_pool, ln_post, proj)."""
    adapter = ("transformer.visual.attn_pool.", "transformer.visual.ln_post.", "transformer.visual.proj")
    return [name for name in state if name.startswith("transformer.visual.") and not name.startswith(adapter)]


@pytest.mark.parametrize("freeze", ["visual", "vit"])
def test_training_continues_from_a_file_and_can_freeze_the_visual_encoder(tmp_path, freeze):
    """--start loads every tensor of an earlier run's file; what --freeze-visual (the ViT and the
    adapter) or --freeze-vit (the ViT alone) freezes comes out bit for bit as it went in, while the
    rest learns."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    train(first, steps=2, batch=2, seed=0, vocab_conversations=200)
    train(second, steps=2, batch=2, seed=1, vocab_conversations=200, start=first, freeze=freeze)
    before, after = load_file(first), load_file(second)
    assert before.keys() == after.keys()
    vit = vit_names(before)
    assert len(vit) > 50 and all(torch.equal(before[name], after[name]) for name in vit)
    adapter_same = torch.equal(before["transformer.visual.attn_pool.kv_proj.weight"], after["transformer.visual.attn_pool.kv_proj.weight"])
    assert adapter_same == (freeze == "visual")
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    metadata = training_metadata(second)
    assert (metadata["start"], metadata["freeze"]) == ("first.safetensors", freeze)


def test_one_run_can_freeze_its_vit_after_some_steps_and_is_repeatable(tmp_path):
    """--vit-steps 1: after the first step the ViT comes out bit for bit as the first step left
    it (a 1-step run from the same seed), while the adapter and the decoder go on learning; the
    same command twice writes the same bytes."""
    one, three, again = (tmp_path / f"{name}.safetensors" for name in ("one", "three", "again"))
    train(one, steps=1, batch=2, seed=0, vocab_conversations=200)
    train(three, steps=3, batch=2, seed=0, vocab_conversations=200, vit_steps=1)
    train(again, steps=3, batch=2, seed=0, vocab_conversations=200, vit_steps=1)
    assert three.read_bytes() == again.read_bytes()
    after_one, after_three = load_file(one), load_file(three)
    vit = vit_names(after_one)
    assert len(vit) > 50 and all(torch.equal(after_one[name], after_three[name]) for name in vit)
    for learning in ("transformer.visual.attn_pool.kv_proj.weight", "transformer.h.0.attn.c_attn.weight"):
        assert not torch.equal(after_one[learning], after_three[learning]), learning
    assert training_metadata(three)["vit_steps"] == 1


def test_a_file_of_another_vocabulary_is_refused(tmp_path):
    """Rows of the embedding and LM head are stored by vocabulary position: a file whose ids differ
    from this run's would load every row into the wrong token."""
    first, other = tmp_path / "first.safetensors", tmp_path / "other.safetensors"
    train(first, steps=1, batch=2, seed=0, vocab_conversations=200)
    tensors = load_file(first)
    tensors["vocab_ids"][-1] += 1
    save_file(tensors, other)
    with pytest.raises(ValueError, match="another vocabulary"):
        train(tmp_path / "second.safetensors", steps=1, batch=2, seed=0, vocab_conversations=200, start=other)


def _scene_with_a_word() -> Scene:
    """320x160 (grid cells 20x10 px): a red circle top left, a blue triangle bottom right, and the
    word ABC at the top right, each letter two columns (8-9, 10-11, 12-13) by three rows wide."""
    return Scene(320, 160, ("white", "white"), [Shape("red", "circle", (0, 0, 80, 80)),
                                                Shape("blue", "triangle", (160, 80, 320, 160))],
                 word="ABC", word_box=(160, 0, 280, 30), letters=[(160, 200), (200, 240), (240, 280)],
                 image=Image.new("RGB", (320, 160), "white"))


def test_the_probe_labels_each_grid_cell_with_what_covers_it():
    """The training-only probe's targets: row by row over the 16x16 grid the image is resized to."""
    labels = cell_labels(_scene_with_a_word()).view(16, 16, 3)
    circle, triangle = [CELL_SHAPES.index("circle"), CELL_COLOURS.index("red")], [CELL_SHAPES.index("triangle"), CELL_COLOURS.index("blue")]
    assert labels[4, 2].tolist() == [*circle, -1]  # the circle's centre
    assert labels[0, 0].tolist() == [0, 0, -1]  # the circle's bounding box corner is background
    assert labels[15, 12].tolist() == [*triangle, -1]  # the base
    assert labels[8, 8].tolist() == [0, 0, -1]  # beside the apex, outside the triangle
    assert labels[9, 12].tolist() == [*triangle, -1]
    word = CELL_SHAPES.index("word")
    assert [labels[1, column].tolist() for column in range(7, 15)] == [
        [0, 0, -1], [word, -1, 0], [word, -1, 0], [word, -1, 1], [word, -1, 1], [word, -1, 2], [word, -1, 2], [0, 0, -1]]
    assert labels[3, 9].tolist() == [0, 0, -1]  # below the word


def test_a_letter_is_the_cells_it_covers_as_drawn():
    """Each letter's extent as the scene drew it (DejaVu Sans Bold and Pillow's own font), and the
    grid cells the reading focus sends each letter of the answer to."""
    for seed in range(12):
        scene = training_scene(random.Random(seed))
        if not scene.word:
            continue
        assert len(scene.letters) == len(scene.word)
        assert scene.letters[0][0] == scene.word_box[0] and scene.letters[-1][1] == scene.word_box[2]
        assert all(a < b for a, b in scene.letters) and all(b == c for (_, b), (c, _) in zip(scene.letters, scene.letters[1:]))
        pixels = numpy.asarray(scene.image.convert("L"), dtype=numpy.int16)
        background = pixels[scene.word_box[1]:scene.word_box[3], scene.word_box[0] - 1]
        for a, b in scene.letters:  # ink in every letter's extent
            assert (abs(pixels[scene.word_box[1]:scene.word_box[3], a:b] - background[:, None]) > 40).any()
    scene = _scene_with_a_word()
    for k in range(3):
        expected = torch.zeros(16, 16, dtype=torch.bool)
        expected[0:3, 8 + 2 * k:10 + 2 * k] = True
        assert torch.equal(letter_cells(scene, k), expected.flatten())


def test_the_plugin_serves_a_224_pixel_checkpoint_as_the_original_computes_it(demo_random):
    """The demo's sizes through vLLM and the plugin (float32): the reference's greedy tokens, with
    images resized to config.visual["image_size"] as the original's transform does."""
    from vllm import LLM, SamplingParams

    path, example, reference = demo_random
    prompt = example.ids[:example.answer.index(True)]  # the conversation up to its first answer
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, seed=0)
    try:
        output = llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"image": example.images}}],
                              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    expected, _ = reference.generate_greedy(prompt, example.images, max_new_tokens=8)
    assert list(output[0].outputs[0].token_ids) == expected


def test_questions_and_answers_say_an_before_orange():
    orange, red = Shape("orange", "square", (10, 10, 60, 60)), Shape("red", "circle", (100, 100, 150, 150))
    plain = ("white", "white")
    first, second = Scene(224, 224, plain, [orange]), Scene(224, 224, plain, [red])
    asked = {which_question(first, second, random.Random(seed)).text for seed in range(20)}
    assert asked == {"Which picture shows an orange square?", "Which picture shows a red circle?"}
    naming = next(q for q in questions(Scene(224, 224, plain, [orange, red])) if q.kind == "name")
    assert naming.answer == "An orange square and a red circle."


def test_the_attention_kept_for_the_focus_loss_is_the_attention_computed(demo_random):
    """The explicit path that keeps a layer's weights computes the same hidden states as the
    fused one; each position's weights sum to one over what it may see, and are zero elsewhere."""
    path, example, _ = demo_random
    vocab = sorted(set(example.ids))
    model = TrainableQwenVL(DEMO, vocab)
    model.load_checkpoint_state(read_checkpoint(path))
    b = one_batch(example, vocab)
    with torch.no_grad():
        image_tokens = model.transformer.visual(b.pixels)
        fused = model.hidden_states(b.ids, b.image_positions, image_tokens, b.segments)
        kept, weights = model.hidden_states_and_attention(b.ids, b.image_positions, image_tokens, b.segments, FOCUS_LAYER)
    torch.testing.assert_close(kept, fused, atol=1e-4, rtol=1e-4)
    _, visible = packed_layout(b.segments)
    seq = b.ids.shape[1]
    assert weights.shape == (1, DEMO["num_attention_heads"], seq, seq)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]))
    assert (weights.masked_select(~visible) == 0).all() and (~visible).any()


def test_the_focus_points_each_answer_of_a_one_shape_question_at_that_shape():
    """Every position that predicts an answer token of a colour or where question is told to look
    at the image tokens of the shape asked about; in a naming answer, the positions that predict
    each shape's colour and name at that shape's; reading the word, each letter at its letter's;
    a count question's, nowhere."""
    scene = _scene_with_a_word()
    by_text = {q.text: q for q in questions(scene)}
    asked = [by_text[text] for text in ("How many shapes are there?", "What colour is the triangle?",
                                        "Where is the red circle?", "What is in this picture?", "图中有什么？",
                                        "What does the text say?")]
    conversations = Conversations("focus")
    example = conversations.example([scene], asked)
    b = one_batch(example, sorted(set(example.ids)))
    segments, targets, focus = b.segments[0], b.targets[0], b.focus[0]
    image_tokens = (torch.tensor(example.ids) == IMG_PAD_ID).nonzero().flatten()
    labels = cell_labels(scene)
    looks = {shape.name: image_tokens[(labels[:, 0] == CELL_SHAPES.index(shape.shape))
                                      & (labels[:, 1] == CELL_COLOURS.index(shape.colour))] for shape in scene.shapes}
    decode = conversations.tokenizer.decode
    for k, question in enumerate(asked, start=1):
        answering = ((segments == k) & (targets >= 0)).nonzero().flatten()
        said = [(decode([example.ids[row + 1]]).strip(), focus[row].nonzero().flatten()) for row in answering]
        if question.kind == "count":
            assert not focus[segments == k].any()
        elif question.kind in ("colour", "where"):
            assert all(torch.equal(looked, looks[question.subject.name]) for _, looked in said)
        elif question.kind == "text":  # A, B, C, then <|im_end|> nowhere
            assert [word for word, _ in said] == ["A", "B", "C", ""]  # decode drops the special token
            for k, (_, looked) in enumerate(said[:3]):
                assert torch.equal(looked, image_tokens[letter_cells(scene, k)]) and len(looked) == 6
            assert len(said[3][1]) == 0
        else:  # the words of a shape's name look at it, and nothing else looks anywhere
            colours = {"red": "red circle", "红色": "red circle", "blue": "blue triangle", "蓝色": "blue triangle"}
            naming = {*colours, "circle", "triangle", "圆形", "三角", "形", "的"}  # 三角形 is two tokens
            current = None
            for word, looked in said:
                current = colours.get(word, current)
                expected = looks[current] if word in naming else torch.tensor([], dtype=torch.long)
                assert torch.equal(looked, expected), (question.answer, word)
            assert sum(len(looked) > 0 for _, looked in said) >= 4
    assert not focus[segments == 0].any()
