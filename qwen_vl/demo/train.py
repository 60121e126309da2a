"""Train the demo model on this machine's CPU, from a seed.

    python -m qwen_vl.demo.train OUT_FILE [--steps 2400] [--batch 12] [--seed 0] [--threads N]
        [--start FILE [--freeze-vit | --freeze-visual]] [--vit-steps N]

Each step draws fresh examples (qwen_vl.demo.scenes.training_scene, one random stream per run):
a scene and up to eight single-turn questions about it in Qwen-VL-Chat's chat format, built by
the same prompt builder as the server (so the ids are exactly what a request produces), packed
into one row that encodes the picture once (qwen_vl.demo.network: each question sees the picture
and itself, not the others); or two scenes and "Which picture shows a ...?". Questions are
single-turn because that is how they are asked: in a conversation an earlier answer often gives
the next one away ("Where is the blue square?" before "What colour is the square?": a third of the
colour questions about several shapes, measured), and the model learns to copy it from the text
instead of reading the picture. The loss is the answers' tokens. Words are spelled one letter
per token: the tokenizer splits random capitals into arbitrary pieces, and letters decode to the
same text.

Same seed, same steps, same torch: the same weights (torch's CPU kernels are deterministic in
this setup; a different CPU may round matmuls differently). It computes in bfloat16 (autocast)
where the CPU multiplies in it, in float32 on x86 CPUs without AVX-512 (`native_bfloat16_products`;
on a 2-core Zen 3 `tests/test_demo.py`'s trainings took 93 s in bfloat16 and 17 s in float32).
The result is one file (qwen_vl.demo.weights): every tensor in bfloat16, the vocabulary rows it
uses and their ids; `python -m qwen_vl.demo.weights FILE DIR` expands it into a checkpoint to serve.
"""

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from qwen_vl.demo import weights
from qwen_vl.demo.network import TrainableQwenVL
from qwen_vl.demo.scenes import COLOURS, LETTERS, SHAPES, Scene, Shape, training_scene
from qwen_vl.demo.tasks import Question, left_to_right, paraphrase, questions, which_question, zh_name
from qwen_vl.model_executor.chat_prompt import ChatMessage, ChatPromptBuilder
from qwen_vl.model_executor.cpu_products import native_bfloat16_products
from qwen_vl.model_executor.processor import preprocess_image
from qwen_vl.model_executor.tokenizer import IM_END_ID, IMG_PAD_ID, cached_backend_file, qwen_tiktoken_path
from qwen_vl.testing.checkpoint import config_dict, sincos_table

# How often each kind of question is asked (of those a scene supports); the ones that bind a
# colour to a shape and a place (colour, boxes) and the word are the hardest and get the most practice.
KIND_WEIGHTS = {"name": 1.0, "count": 0.6, "colour": 1.6, "where": 1.6, "text": 1.2, "name_zh": 0.6,
                "count_zh": 0.4, "where_zh": 0.9}
KINDS = (*KIND_WEIGHTS, "which")
TWO_PICTURE_SHARE = 0.12
PROBE_WEIGHT = 0.5  # of the grid-cell probe's loss beside the answers'
LETTER_PROBE_WEIGHT = 0.25  # of its reading of the letter on each cell of the word
QUESTIONS_PER_PICTURE = 8
VOCAB_CONVERSATIONS = 20000
# Where to look, taught directly (training only). Asked the colour of the square, the decoder
# learned to look at the shapes but not at the square: its attention from the answer gave the
# asked shape's cells no more than their share of all shapes' cells, and the answer was another
# shape's colour (2-4 shapes) for thousands of steps (docs/demo.md). So for the questions about
# one shape, one head of one middle layer is told, at each position that predicts an answer
# token, to put its weight on that shape's cells; in a naming answer, at the positions that
# predict a shape's colour and name, on that shape's; reading the word, at the position that
# predicts its k-th letter, on that letter's: the loss is -log of the weight it puts there.
FOCUS_KINDS = ("colour", "where", "where_zh", "which")
FOCUS_LAYER, FOCUS_HEAD = 2, 0
FOCUS_WEIGHT = 0.3


@dataclass
class Example:
    """Single-turn conversations about the same pictures, packed: the ids they share, then each
    question's own ids and answer (segment k)."""
    ids: list[int]  # real token ids
    answer: list[bool]  # whether each id is part of an answer (predicted, counted in the loss)
    segments: list[int]  # 0: shared by every question; k: the k-th question and its answer
    kinds: list[str | None]  # the question kind of each answer id (None elsewhere)
    images: list[Image.Image]
    cells: list[torch.Tensor]  # per image: [256, 3] shape, colour and letter class of each grid cell (cell_labels)
    focus: dict[int, torch.Tensor]  # index of an answer id -> [images * 256] bool: the image tokens its prediction should look at

    def single_turns(self) -> list[tuple[list[int], list[bool]]]:
        """Each question's conversation as the server would run it alone: ids and answer mask."""
        shared = self.segments.count(0)
        out = []
        for k in range(1, max(self.segments) + 1):
            own = [i for i, segment in enumerate(self.segments) if segment == k]
            out.append((self.ids[:shared] + [self.ids[i] for i in own],
                        self.answer[:shared] + [self.answer[i] for i in own]))
        return out


# What the grid cells of a scene hold: a shape (or the word) and its colour; the probe below
# learns to read these from the image tokens.
CELL_SHAPES = ("background", *SHAPES, "word")
CELL_COLOURS = ("background", *COLOURS)
GRID = 16


def cell_labels(scene: Scene) -> torch.Tensor:
    """[256, 3]: for each cell of the 16x16 grid the image is resized to (row by row, as the
    adapter's queries), the class of what covers its centre, of its colour (-1: the word's colour,
    not asked) and, on the word, of the letter there (0-25; -1 elsewhere)."""
    labels = torch.zeros(GRID * GRID, 3, dtype=torch.long)
    labels[:, 2] = -1
    for cell in range(GRID * GRID):
        x = (cell % GRID + 0.5) / GRID * scene.width
        y = (cell // GRID + 0.5) / GRID * scene.height
        for shape in scene.shapes:
            if _inside(shape, x, y):
                labels[cell, :2] = torch.tensor([CELL_SHAPES.index(shape.shape), CELL_COLOURS.index(shape.colour)])
        if scene.word_box and scene.word_box[0] <= x < scene.word_box[2] and scene.word_box[1] <= y < scene.word_box[3]:
            letter = next(k for k, (a, b) in enumerate(scene.letters) if x < b or k == len(scene.letters) - 1)
            labels[cell] = torch.tensor([CELL_SHAPES.index("word"), -1, LETTERS.index(scene.word[letter])])
    return labels


def letter_cells(scene: Scene, k: int) -> torch.Tensor:
    """[256] bool: the grid cells on the word's k-th letter: those that share at least 40% of the
    narrower of the two (cell, letter) in each direction (a letter at 224 pixels is 6-43 wide, a
    cell 14, so a narrow letter may cover no cell's centre)."""
    (a, b), (_, top, _, bottom) = scene.letters[k], scene.word_box
    cell_w, cell_h = scene.width / GRID, scene.height / GRID
    edges = torch.arange(GRID + 1, dtype=torch.float)
    across = ((edges[1:] * cell_w).clamp(max=b) - (edges[:-1] * cell_w).clamp(min=a)) >= 0.4 * min(cell_w, b - a)
    down = ((edges[1:] * cell_h).clamp(max=bottom) - (edges[:-1] * cell_h).clamp(min=top)) >= 0.4 * min(cell_h, bottom - top)
    return (down[:, None] & across[None, :]).flatten()


def _inside(shape: Shape, x: float, y: float) -> bool:
    x1, y1, x2, y2 = shape.box
    if not (x1 <= x < x2 and y1 <= y < y2):
        return False
    if shape.shape == "circle":
        return (x - (x1 + x2) / 2) ** 2 + (y - (y1 + y2) / 2) ** 2 <= ((x2 - x1) / 2) ** 2
    if shape.shape == "triangle":  # apex at the top centre: the half-width grows linearly downwards
        return abs(x - (x1 + x2) / 2) <= (y - y1) / (y2 - y1) * (x2 - x1) / 2
    return True


class Conversations:
    """Random training conversations, token ids built as the server builds a request's."""

    def __init__(self, seed: int | str):
        self.rng = random.Random(seed)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(cached_backend_file(qwen_tiktoken_path())))
        self.builder = ChatPromptBuilder(self.tokenizer)

    def answer_ids(self, question: Question) -> list[int]:
        if question.kind == "text":  # one token per letter
            return [self.tokenizer.token_to_id(letter) for letter in question.answer]
        return self.builder.encode_text(question.answer)

    def _questions(self, scene) -> list[Question]:
        """Up to eight different questions about one picture: the picture costs 258 positions and a
        pass through the encoder, a question and its answer about 25, so more teach more per step."""
        available = questions(scene)
        kinds = sorted({q.kind for q in available})
        asked: list[Question] = []
        for _ in range(QUESTIONS_PER_PICTURE):
            kind = self.rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0]
            question = self.rng.choice([q for q in available if q.kind == kind])
            if all(question is not other for other in asked):
                asked.append(question)
        return asked

    def __next__(self) -> Example:
        scene = training_scene(self.rng)
        scenes = [scene]
        asked = None
        if self.rng.random() < TWO_PICTURE_SHARE:
            other = training_scene(self.rng)
            # Up to four questions about the pair (each shape that only one of them shows).
            found = {q.text: q for q in (which_question(scene, other, self.rng) for _ in range(4)) if q is not None}
            if found:
                scenes.append(other)
                asked = list(found.values())
        if asked is None:
            asked = self._questions(scene)
        return self.example(scenes, asked)

    def example(self, scenes: list[Scene], asked: list[Question]) -> Example:
        """`asked` about `scenes` (one picture, or two for "which picture"), packed."""
        images = [s.image for s in scenes]
        prompts = [self.builder.build([ChatMessage("user", paraphrase(q, self.rng), images)]).token_ids for q in asked]
        shared = len(prompts[0])
        for prompt in prompts[1:]:  # the longest prefix every prompt shares (the pictures and more)
            agree = (i for i, (a, b) in enumerate(zip(prompt, prompts[0], strict=False)) if a != b)
            shared = min(shared, next(agree, min(len(prompt), len(prompts[0]))))
        ids, answer, segments, kinds = prompts[0][:shared], [False] * shared, [0] * shared, [None] * shared
        cells = [cell_labels(s) for s in scenes]
        focus = {}
        for k, (question, prompt) in enumerate(zip(asked, prompts, strict=True), start=1):
            own, reply = prompt[shared:], self.answer_ids(question) + [IM_END_ID]
            assert own or len(asked) == 1, "two questions with the same prompt"
            ids += own + reply
            answer += [False] * len(own) + [True] * len(reply)
            segments += [k] * (len(own) + len(reply))
            kinds += [None] * len(own) + [question.kind] * len(reply)
            first = len(ids) - len(reply)
            picture = question.target - 1 if question.kind == "which" else 0
            for token, cells_there in self._looking_at(question, scenes[picture], cells[picture], reply):
                if cells_there.any():  # a cell's centre is inside every shape of this size, but be sure
                    where = torch.zeros(len(scenes), GRID * GRID, dtype=torch.bool)
                    where[picture] = cells_there
                    focus[first + token] = where.flatten()
        return Example(ids, answer, segments, kinds, images, cells, focus)

    def _looking_at(self, question: Question, scene: Scene, cells: torch.Tensor,
                    reply: list[int]) -> list[tuple[int, torch.Tensor]]:
        """(token of `reply`, the grid cells of `scene` its prediction should look at): every token
        of the answer to a question about one shape (and the `<|im_end|>` after it) that shape's;
        in a naming answer, the tokens that say each shape's colour and name that shape's; in
        the word, each letter its letter's."""
        def on(shape: Shape) -> torch.Tensor:
            return (cells[:, 0] == CELL_SHAPES.index(shape.shape)) & (cells[:, 1] == CELL_COLOURS.index(shape.colour))
        if question.kind in FOCUS_KINDS:
            return [(token, on(question.subject)) for token in range(len(reply))]
        if question.kind == "text":
            return [(k, letter_cells(scene, k)) for k in range(len(scene.word))]
        if question.kind not in ("name", "name_zh"):
            return []
        encoding = self.tokenizer.encode(question.answer, add_special_tokens=False)
        assert encoding.ids == reply[:-1], "the answer's ids are not its plain encoding"
        text, looking, start = question.answer.lower(), [], 0
        for shape in left_to_right(scene):  # the order the answer names them in
            name = zh_name(shape) if question.kind == "name_zh" else shape.name
            begin = text.index(name, start)
            start = begin + len(name)
            looking += [(token, on(shape)) for token, (a, b) in enumerate(encoding.offsets) if a < start and b > begin]
        return looking

    def __iter__(self):
        return self


def build_vocab(conversations_seen: int = VOCAB_CONVERSATIONS, seed: int | str = "vocab") -> list[int]:
    """Every token id the conversations use (sampled widely), plus every capital letter and digit."""
    conversations = Conversations(seed)
    found = {conversations.tokenizer.token_to_id(c) for c in LETTERS + "0123456789"}
    for _ in tqdm(range(conversations_seen), desc="vocabulary", leave=False):
        found.update(next(conversations).ids)
    return sorted(found)


@dataclass
class Batch:
    ids: torch.Tensor  # [n, seq] compact ids
    image_positions: torch.Tensor  # [n, seq] bool
    pixels: torch.Tensor  # [images, 3, size, size]
    targets: torch.Tensor  # [n, seq] the compact id each position predicts (-1: not an answer)
    segments: torch.Tensor  # [n, seq] (network.packed_layout; -1: padding)
    kinds: torch.Tensor  # [n, seq] index in KINDS of the answer each target belongs to (-1: none)
    cells: torch.Tensor  # [images, 256, 3] the probe's labels (cell_labels)
    focus: torch.Tensor  # [n, seq, seq] bool: the image tokens a position predicting an answer should look at


class Batcher:
    """Examples -> padded batches."""

    def __init__(self, conversations: Iterator[Example], vocab: list[int], vocab_size: int, image_size: int):
        self.conversations = conversations
        self.image_size = image_size
        self.compact = torch.full((vocab_size,), -1, dtype=torch.long)
        self.compact[torch.tensor(vocab)] = torch.arange(len(vocab))
        self.unknown = 0

    def batch(self, size: int) -> Batch:
        """`size` examples with the same number of pictures (so padding stays short)."""
        examples = []
        pictures = None
        while len(examples) < size:
            example = next(self.conversations)
            pictures = pictures or len(example.images)
            if len(example.images) != pictures:
                continue
            if (self.compact[torch.tensor(example.ids)] < 0).any():
                self.unknown += 1  # a token the vocabulary sample never saw: skip the conversation
                continue
            examples.append(example)
        length = max(len(e.ids) for e in examples)
        ids = torch.full((size, length), IMG_PAD_ID - 1, dtype=torch.long)
        targets = torch.full((size, length), -1, dtype=torch.long)
        segments = torch.full((size, length), -1, dtype=torch.long)
        kinds = torch.full((size, length), -1, dtype=torch.long)
        focus = torch.zeros(size, length, length, dtype=torch.bool)
        for row, example in enumerate(examples):
            real = torch.tensor(example.ids)
            ids[row, :len(real)] = real
            answer = torch.tensor(example.answer)
            targets[row, :len(real) - 1] = torch.where(answer[1:], self.compact[real[1:]], -1)
            segments[row, :len(real)] = torch.tensor(example.segments)
            kinds[row, :len(real) - 1] = torch.tensor([KINDS.index(k) if k else -1 for k in example.kinds[1:]])
            image_tokens = (real == IMG_PAD_ID).nonzero().flatten()
            for index, where in example.focus.items():
                focus[row, index - 1, image_tokens[where]] = True  # the position that predicts ids[index]
        image_positions = ids == IMG_PAD_ID
        ids = self.compact[ids].clamp(min=0)
        pixels = torch.stack([preprocess_image(image, self.image_size) for e in examples for image in e.images])
        cells = torch.stack([c for e in examples for c in e.cells])
        return Batch(ids, image_positions, pixels, targets, segments, kinds, cells, focus)


def initialise(model: TrainableQwenVL, generator: torch.Generator) -> None:
    """GPT-2 style: normal(0, 0.02), residual outputs scaled by depth; norms at one; the ViT's
    position table from the 2-D sin-cos table; the adapter's fixed table as the original's."""
    config = model.config
    depth = config["num_hidden_layers"] + config["visual"]["layers"]
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
        elif name.endswith(("c_proj.weight", "out_proj.weight")):
            p.data.normal_(0, 0.02 / math.sqrt(2 * depth), generator=generator)
        else:
            p.data.normal_(0, 0.02, generator=generator)
    visual = model.transformer.visual
    visual.positional_embedding.data = sincos_table(config["visual"]["width"], 16) * 0.5
    visual.attn_pool.pos_embed.copy_(sincos_table(config["hidden_size"], 16))
    visual.proj.data.normal_(0, config["hidden_size"] ** -0.5, generator=generator)
    # The adapter starts as local pooling: with small random query and key weights its attention
    # is uniform, every one of the 256 image tokens the same average of the patches, and training
    # collapses the image to a constant (measured: a first run's image tokens differed by 2e-5 of
    # their size after 1000 steps). Queries and keys share one random projection per head, which
    # keeps inner products (scaled by 1.5: attention over about ten patches at the start), so each
    # query attends where the 2-D sin-cos tables agree: its own patch and its neighbours; values
    # and output pass the features through.
    pool, dim = visual.attn_pool, config["hidden_size"]
    head_dim = dim // (dim // 128)
    shared = torch.randn(dim, dim, generator=generator) * 1.5 / math.sqrt(head_dim)
    pool.attn.in_proj_weight.data = torch.cat((shared, shared, torch.eye(dim)))
    pool.attn.in_proj_bias.data.zero_()
    pool.attn.out_proj.weight.data = torch.eye(dim)
    pool.attn.out_proj.bias.data.zero_()
    pool.ln_q.weight.data.fill_(0.1)  # the learned queries' content starts small beside the positions
    # Text embeddings at the image features' scale (about 0.8 per dimension), so neither kind of
    # position drowns the other in the residual stream.
    model.transformer.wte.weight.data.normal_(0, 0.5, generator=generator)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_weights_file(model: TrainableQwenVL, path: Path) -> None:
    """`model`'s parameters from a weights file an earlier run wrote (the same vocabulary)."""
    with safe_open(path, "pt") as f:
        if not torch.equal(f.get_tensor("vocab_ids"), model.vocab):
            raise ValueError(f"{path} was trained on another vocabulary (its vocab_ids differ)")
        model.load_state_dict({name: f.get_tensor(name).float() for name in model.state_dict()}, strict=True)


FREEZE = {"vit": "the ViT: the adapter and the decoder learn, the probe stays on the adapter's output",
          "visual": "the ViT and the adapter: only the decoder learns, the probe (which only serves them) is off"}


def freeze_vit(visual: torch.nn.Module) -> None:
    """Stops the ViT learning (it then runs without gradients); the adapter (attn_pool, ln_post,
    proj) goes on learning."""
    visual.requires_grad_(False)
    for adapter in (visual.attn_pool, visual.ln_post):
        adapter.requires_grad_(True)
    visual.proj.requires_grad_(True)


def train(out: Path, steps: int, batch: int, seed: int, peak_lr: float = 1e-3, warmup: int = 200,
          vocab_conversations: int = VOCAB_CONVERSATIONS, start: Path | None = None,
          freeze: str | None = None, focus_weight: float = FOCUS_WEIGHT, vit_steps: int | None = None) -> None:
    """`steps` steps from a seeded initialisation, or from the weights file `start`; `freeze`
    (a key of FREEZE) keeps part of the visual encoder as it is (it runs without gradients);
    `vit_steps`: the ViT learns for that many steps, then stays as it is (the whole recipe in one
    run: the image tokens settle, and the decoder learns to read them at 12% less per step);
    `focus_weight` weighs the attention's focus loss (FOCUS_KINDS; 0: off)."""
    if vit_steps is not None and freeze is not None:
        raise ValueError("vit_steps is for a run whose ViT learns at first: not with freeze")
    torch.manual_seed(seed)
    config = config_dict("demo")
    vocab = build_vocab(vocab_conversations)
    model = TrainableQwenVL(config, vocab)
    initialise(model, torch.Generator().manual_seed(seed))
    if start is not None:
        load_weights_file(model, start)
    visual = model.transformer.visual
    visual.requires_grad_(freeze is None)
    if freeze == "vit":
        freeze_vit(visual)
    probe_weight = 0.0 if freeze == "visual" else PROBE_WEIGHT
    # Training only, not shipped: reads from each image token the decoder receives what covers
    # its grid cell (shape, colour) and which cell it is (row, column), so the visual encoder
    # keeps what and where from the first step (without it, image tokens collapse to a constant:
    # see initialise).
    # and, on the word, which letter (the decoder reads the word letter by letter from these tokens).
    heads = [len(CELL_SHAPES), len(CELL_COLOURS), GRID, GRID, len(LETTERS)]  # shape, colour, row, column, letter
    probe = torch.nn.Linear(config["hidden_size"], sum(heads))
    rows, columns = torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if probe_weight:
        trained |= {f"probe.{n}": p for n, p in probe.named_parameters()}
    decays = {n: p.dim() >= 2 and "wte" not in n and "positional" not in n for n, p in trained.items()}
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trained.items() if decays[n]], "weight_decay": 0.05},
                                   {"params": [p for n, p in trained.items() if not decays[n]], "weight_decay": 0.0}],
                                  lr=peak_lr, betas=(0.9, 0.95))
    batcher = Batcher(Conversations(f"train-{seed}"), vocab, config["vocab_size"], config["visual"]["image_size"])
    log = out.with_suffix(".log.jsonl")
    started = time.perf_counter()
    in_bfloat16 = native_bfloat16_products()
    with tqdm(range(steps), desc=f"training in {'bfloat16' if in_bfloat16 else 'float32'}", unit="step") as bar, \
            log.open("w") as log_file:
        for step in bar:
            if step == vit_steps:
                freeze_vit(visual)  # AdamW leaves alone the parameters that no longer get gradients
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, peak_lr, warmup)
            b = batcher.batch(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=in_bfloat16):
                with torch.set_grad_enabled(freeze != "visual"):
                    image_tokens = visual(b.pixels)
                hidden, attention = model.hidden_states_and_attention(b.ids, b.image_positions, image_tokens, b.segments,
                                                                      FOCUS_LAYER if focus_weight else None)
                each = model.answer_losses(hidden, b.targets)
                loss = answers = each.mean()
                losses = {"answers": answers}
                asking = b.focus.any(dim=-1)
                if focus_weight and asking.any():
                    on_subject = (attention[:, FOCUS_HEAD] * b.focus).sum(dim=-1)[asking]
                    losses["focus"] = -torch.log(on_subject + 1e-6).mean()
                    loss = loss + focus_weight * losses["focus"]
                if probe_weight:
                    guesses = probe(image_tokens).float().flatten(0, 1)
                    shape_guess, colour_guess, row_guess, column_guess, letter_guess = guesses.split(heads, dim=-1)
                    images = len(image_tokens)
                    losses["cells"] = (F.cross_entropy(shape_guess, b.cells[..., 0].flatten())
                                       + F.cross_entropy(colour_guess, b.cells[..., 1].flatten(), ignore_index=-1)
                                       + F.cross_entropy(row_guess, rows.repeat(images))
                                       + F.cross_entropy(column_guess, columns.repeat(images)))
                    loss = loss + probe_weight * losses["cells"]
                    letters = b.cells[..., 2].flatten()
                    if (letters >= 0).any():
                        losses["letters"] = F.cross_entropy(letter_guess, letters, ignore_index=-1)
                        loss = loss + LETTER_PROBE_WEIGHT * losses["letters"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
            optimizer.step()
            figures = {name: round(value.item(), 4) for name, value in losses.items()}
            bar.set_postfix({name: f"{value:.3f}" for name, value in figures.items()})
            kinds = b.kinds[b.targets >= 0]  # the kind of each answer token, in `each`'s order
            by_kind = {kind: round(each[kinds == i].mean().item(), 4) for i, kind in enumerate(KINDS) if (kinds == i).any()}
            log_file.write(json.dumps({"step": step, **figures, "kinds": by_kind,
                                       "seconds": round(time.perf_counter() - started, 1)}) + "\n")
            if (step + 1) % 500 == 0 or step + 1 == steps:
                log_file.flush()
                weights.save(model, out, {"seed": seed, "steps": step + 1, "batch": batch, "peak_lr": peak_lr,
                                          "start": start.name if start else None, "freeze": freeze,
                                          "vit_steps": vit_steps, "focus_weight": focus_weight})
    print(f"{out}: {steps} steps in {time.perf_counter() - started:.0f} s; {batcher.unknown} conversations skipped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.demo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the weights file to write (qwen_vl.demo.weights expands it)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=12, help="conversations per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--focus-weight", type=float, default=FOCUS_WEIGHT,
                        help="weight of the loss that points one head at the shape a question asks about (0: off)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--start", type=Path, help="continue from this weights file (an earlier run's OUT_FILE)")
    frozen = parser.add_mutually_exclusive_group()
    frozen.add_argument("--freeze-vit", dest="freeze", action="store_const", const="vit", help="freeze " + FREEZE["vit"])
    frozen.add_argument("--freeze-visual", dest="freeze", action="store_const", const="visual",
                        help="freeze " + FREEZE["visual"])
    parser.add_argument("--vit-steps", type=int,
                        help="the ViT learns for this many steps, then is frozen (default: every step)")
    args = parser.parse_args(argv)
    if args.vit_steps is not None and args.freeze:
        parser.error("--vit-steps is for a run whose ViT learns at first: not with --freeze-vit/--freeze-visual")
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch, args.seed, args.lr, args.warmup, start=args.start, freeze=args.freeze,
          focus_weight=args.focus_weight, vit_steps=args.vit_steps)


if __name__ == "__main__":
    main()
