"""What the demo model is asked about a scene, what it answers, and how an answer is scored.

Questions and answers are Qwen-VL-Chat's: plain chat turns, boxes as
`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` on the 0..1000 grid, pictures numbered as the
chat format numbers them ("Picture 2."). Lists name shapes left to right, colour before shape.
"""

import random
import re
from dataclasses import dataclass

from qwen_vl.api.grounding import GRID, parse_grounding
from qwen_vl.demo.scenes import SHAPES, Scene, Shape

ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色", "purple": "紫色",
              "black": "黑色", "white": "白色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}

# Each kind of question, as evaluation asks it (training also sees a few paraphrases).
QUESTIONS = {
    "name": "What is in this picture?",
    "count": "How many shapes are there?",
    "colour": "What colour is the {shape}?",
    "where": "Where is the {name}?",
    "text": "What does the text say?",
    "name_zh": "图中有什么？",
    "count_zh": "图中有几个形状？",
    "where_zh": "{name_zh}在哪里？",
    "which": "Which picture shows {a_name}?",
}
PARAPHRASES = {
    "name": ["What is in the picture?", "What is in this image?", "Describe the picture.",
             "What shapes are in this picture?"],
    "count": ["How many shapes are in the picture?", "How many objects are there?"],
    "colour": ["What color is the {shape}?", "Which colour is the {shape}?"],
    "where": ["Where is the {name} in the picture?", "Find the {name}."],
    "text": ["What word is written?", "Read the text."],
    "name_zh": ["这张图里有什么？"],
    "count_zh": ["图里有多少个形状？"],
    "where_zh": ["找到{name_zh}。"],
    "which": ["Which picture has {a_name}?"],
}


@dataclass
class Question:
    kind: str
    text: str
    answer: str
    target: object  # what scoring compares with: a set of names, a count, a colour, a box, a word, a number
    subject: Shape | None = None  # the shape it asks about, if one


def zh_name(shape: Shape) -> str:
    return f"{ZH_COLOURS[shape.colour]}的{ZH_SHAPES[shape.shape]}"


def grid_box(scene: Scene, shape: Shape) -> tuple[int, int, int, int]:
    """The shape's box on Qwen-VL's grid: pixel / side * 1000, rounded down, as the original writes boxes."""
    x1, y1, x2, y2 = shape.box
    return (x1 * GRID // scene.width, y1 * GRID // scene.height, x2 * GRID // scene.width, y2 * GRID // scene.height)


def box_text(box: tuple[int, int, int, int]) -> str:
    return f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"


def _english_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _chinese_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def left_to_right(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1]))


def a_name(shape: Shape) -> str:
    """"a red circle", "an orange square"."""
    return f"{'an' if shape.colour == 'orange' else 'a'} {shape.name}"


def questions(scene: Scene) -> list[Question]:
    """Every question of the evaluation's kinds that this scene supports, with its answer."""
    shapes = left_to_right(scene)
    names = [a_name(s) for s in shapes]
    count = len(shapes)
    found = [
        Question("name", QUESTIONS["name"], _english_list(names).capitalize() + ".", {s.name for s in shapes}),
        Question("count", QUESTIONS["count"], f"There {'is' if count == 1 else 'are'} {count} "
                 f"shape{'' if count == 1 else 's'}.", count),
        Question("name_zh", QUESTIONS["name_zh"], "图中有" + _chinese_list([f"一个{zh_name(s)}" for s in shapes]) + "。",
                 {s.name for s in shapes}),
        Question("count_zh", QUESTIONS["count_zh"], f"图中有{count}个形状。", count),
    ]
    for shape in SHAPES:
        alike = scene.with_shape(shape)
        if len(alike) == 1:
            colour = alike[0].colour
            found.append(Question("colour", QUESTIONS["colour"].format(shape=shape), colour.capitalize() + ".", colour,
                                  alike[0]))
    for s in shapes:
        box = grid_box(scene, s)
        found.append(Question("where", QUESTIONS["where"].format(name=s.name),
                              f"<ref>the {s.name}</ref>{box_text(box)}", box, s))
        found.append(Question("where_zh", QUESTIONS["where_zh"].format(name_zh=zh_name(s)),
                              f"<ref>{zh_name(s)}</ref>{box_text(box)}", box, s))
    if scene.word:
        found.append(Question("text", QUESTIONS["text"], scene.word, scene.word))
    return found


def which_question(first: Scene, second: Scene, rng: random.Random) -> Question | None:
    """"Which picture shows a red circle?" for a shape in exactly one of the two scenes."""
    only = [(s, 1) for s in first.shapes if s.name not in {o.name for o in second.shapes}]
    only += [(s, 2) for s in second.shapes if s.name not in {o.name for o in first.shapes}]
    if not only:
        return None
    shape, picture = rng.choice(only)
    return Question("which", QUESTIONS["which"].format(a_name=a_name(shape)), f"Picture {picture}.", picture, shape)


def paraphrase(question: Question, rng: random.Random) -> str:
    """The question as asked, or (three times in ten) in one of its other wordings (training only)."""
    options = PARAPHRASES.get(question.kind, [])
    if not options or rng.random() < 0.7:
        return question.text
    s = question.subject
    values = {"shape": s.shape, "name": s.name, "a_name": a_name(s), "name_zh": zh_name(s)} if s else {}
    return rng.choice(options).format(**values)


# -- scoring ------------------------------------------------------------------------------------

_EN_PAIR = re.compile(r"\b(" + "|".join(ZH_COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)
_ZH_PAIR = re.compile("(" + "|".join(ZH_COLOURS.values()) + ")的?(" + "|".join(ZH_SHAPES.values()) + ")")
_ZH_TO_EN = {**{v: k for k, v in ZH_COLOURS.items()}, **{v: k for k, v in ZH_SHAPES.items()}}


def named_pairs(answer: str) -> set[str]:
    pairs = {f"{c.lower()} {s.lower()}" for c, s in _EN_PAIR.findall(answer)}
    return pairs | {f"{_ZH_TO_EN[c]} {_ZH_TO_EN[s]}" for c, s in _ZH_PAIR.findall(answer)}


def iou(a, b) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def correct(question: Question, answer: str) -> bool:
    """Whether `answer` (the model's text) answers `question`: the same set of colour-shape pairs;
    the same number (digits); the colour; a first box with IoU >= 0.5; the word exactly; the
    picture's number."""
    kind = question.kind.removesuffix("_zh")
    if kind == "name":
        return named_pairs(answer) == question.target
    if kind in ("count", "which"):
        numbers = re.findall(r"\d+", answer)
        return len(numbers) == 1 and int(numbers[0]) == question.target
    if kind == "colour":
        words = set(re.findall(r"[a-z]+", answer.lower())) | {_ZH_TO_EN.get(w) for w in ZH_COLOURS.values() if w in answer}
        return question.target in words and len(words & set(ZH_COLOURS)) == 1
    if kind == "where":
        boxes = parse_grounding(answer)
        return bool(boxes) and iou(boxes[0].box, question.target) >= 0.5
    if kind == "text":
        return answer.strip().strip(".").strip('"') == question.target
    raise ValueError(f"unknown question kind {question.kind!r}")
