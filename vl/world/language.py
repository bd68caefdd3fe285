"""The generated world's language: captions, corpus descriptions and VQA questions, all true of their scene.

Captions (5 per image) come from varied templates: object lists, counts, colour groups, sizes, spatial relations,
extremes (leftmost, topmost...) and a single focused object. Every statement is computed from the scene.

Questions cover colour, shape, size, counting, existence and spatial relations, with the VQA answer types
``yes/no``, ``number`` and ``other`` and question types named like VQA's (``what color is the``, ``how many``,
``is there a``...). A question names an object only through a description that fits exactly one object of the
scene, so every question has one answer. Yes/no answers are balanced per family (existence, size, spatial) within
a split by ``YesNoBalancer``. Each question gets 10 annotator answers of which 0-2 are plausible mistakes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vl.world.scene import COLORS, SHAPES, SIZES, Scene, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATION_TEXT = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
CLEAR_MARGIN = 0.1  # two centres further apart than this fraction of the image side are clearly left/right/...
# Families of questions and how often each is drawn.
QUESTION_FAMILIES = {"color": 0.18, "shape": 0.14, "size": 0.07, "size_yes_no": 0.05, "count": 0.19,
                     "exist": 0.14, "spatial_yes_no": 0.11, "spatial_choice": 0.12}
# How many of the 10 annotators answer wrongly, and with what probability.
NOISY_ANSWERS_PROBS = (0.6, 0.3, 0.1)


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_words(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def count_phrase(count: int, noun: str, noun_plural: str | None = None) -> str:
    """``a red circle`` / ``two red circles``."""
    if count == 1:
        return with_article(noun)
    words = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return f"{words} {noun_plural or plural(noun)}"


def sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?")) else ".")


# ----------------------------------------------------------------------------------------------------------------
# Descriptions that pick out objects


def describe(obj: SceneObject, attrs: Sequence[str], generic: str = "object") -> str:
    """The phrase for ``obj`` using only ``attrs`` (a subset of size, color, shape): ``large red circle``,
    ``red object``..."""
    words = [obj.size] if "size" in attrs else []
    if "color" in attrs:
        words.append(obj.color)
    words.append(obj.shape if "shape" in attrs else generic)
    return " ".join(words)


def matches(obj: SceneObject, reference: SceneObject, attrs: Sequence[str]) -> bool:
    return all(getattr(obj, attr) == getattr(reference, attr) for attr in attrs)


def unique_descriptions(obj: SceneObject, objects: Sequence[SceneObject],
                        options: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The attribute sets among ``options`` whose description fits ``obj`` and no other object."""
    return [attrs for attrs in options if sum(matches(other, obj, attrs) for other in objects) == 1]


def _pick_description(rng: np.random.Generator, candidates: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Mostly the shortest fitting description, sometimes a longer one."""
    if len(candidates) == 1 or rng.random() < 0.7:
        return candidates[0]
    return candidates[int(rng.integers(1, len(candidates)))]


def clear_relations(a: SceneObject, b: SceneObject, side: int) -> list[str]:
    """The relations (``left``, ``right``, ``above``, ``below``) that clearly hold for ``a`` relative to ``b``."""
    margin = CLEAR_MARGIN * side
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    relations = []
    if dx < -margin:
        relations.append("left")
    if dx > margin:
        relations.append("right")
    if dy < -margin:
        relations.append("above")
    if dy > margin:
        relations.append("below")
    return relations


def _dominant_relation(a: SceneObject, b: SceneObject, side: int) -> str | None:
    relations = clear_relations(a, b, side)
    if not relations:
        return None
    dx = abs(a.center[0] - b.center[0])
    dy = abs(a.center[1] - b.center[1])
    horizontal = [r for r in relations if r in ("left", "right")]
    vertical = [r for r in relations if r in ("above", "below")]
    if horizontal and (dx >= dy or not vertical):
        return horizontal[0]
    return vertical[0]


# ----------------------------------------------------------------------------------------------------------------
# Captions


def _full_phrase(obj: SceneObject, with_size: bool) -> str:
    return describe(obj, ("size", "color", "shape") if with_size else ("color", "shape"))


def _caption_list(scene: Scene, rng: np.random.Generator) -> str | None:
    objects = sorted(scene.objects, key=lambda o: o.center[0])
    with_size = rng.random() < 0.5
    items = [with_article(_full_phrase(obj, with_size)) for obj in objects]
    xs = [obj.center[0] for obj in objects]
    ordered = all(b - a > 0.05 * scene.width for a, b in zip(xs, xs[1:]))
    if ordered and rng.random() < 0.4:
        return sentence(f"from left to right: {join_words(items)}")
    prefix = ["", "there is ", "an image of ", "a picture showing ", "a textured background with "]
    return sentence(prefix[int(rng.integers(len(prefix)))] + join_words(items))


def _shape_counts(objects: Sequence[SceneObject]) -> list[str]:
    counts = Counter(obj.shape for obj in objects)
    return [count_phrase(n, shape) for shape, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _caption_count(scene: Scene, rng: np.random.Generator) -> str | None:
    total = len(scene.objects)
    groups = join_words(_shape_counts(scene.objects))
    variant = int(rng.integers(3))
    if variant == 0:
        return sentence(f"{NUMBER_WORDS[total]} shapes: {groups}")
    if variant == 1:
        return sentence(f"there are {NUMBER_WORDS[total]} objects in the image: {groups}")
    return sentence(groups)


def _caption_colors(scene: Scene, rng: np.random.Generator) -> str | None:
    by_color: dict[str, list[SceneObject]] = defaultdict(list)
    for obj in scene.objects:
        by_color[obj.color].append(obj)
    colors = sorted(by_color, key=lambda c: (-len(by_color[c]), c))
    if rng.random() < 0.5:
        return sentence(join_words([count_phrase(len(by_color[c]), f"{c} object") for c in colors]))
    parts = []
    for color in colors:
        group = by_color[color]
        verb = "shape is" if len(group) == 1 else "shapes are"
        parts.append(f"the {color} {verb} {join_words(_shape_counts(group))}")
    return sentence("; ".join(parts))


def _caption_sizes(scene: Scene, rng: np.random.Generator) -> str | None:
    large = [obj for obj in scene.objects if obj.size == "large"]
    small = [obj for obj in scene.objects if obj.size == "small"]
    if not large:
        return sentence(f"{count_phrase(len(small), 'small shape')}: "
                        f"{join_words([with_article(_full_phrase(o, False)) for o in small])}")
    if not small:
        listed = join_words([with_article(_full_phrase(o, False)) for o in large])
        return sentence(f"{listed}, all of them large")
    listed = join_words([with_article(_full_phrase(o, True)) for o in large])
    return sentence(f"{listed} with {count_phrase(len(small), 'small shape')}")


def _caption_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b
             for rel in [_dominant_relation(a, b, scene.width)] if rel in ("left", "above")
             and _full_phrase(a, True) != _full_phrase(b, True)]
    if not pairs:
        return None
    a, b, relation = pairs[int(rng.integers(len(pairs)))]
    # Name both with their sizes when colour and shape alone would read the same ("a red circle ... a red circle").
    with_size = rng.random() < 0.3 or _full_phrase(a, False) == _full_phrase(b, False)
    first, second = with_article(_full_phrase(a, with_size)), with_article(_full_phrase(b, with_size))
    variant = int(rng.integers(3))
    if relation == "left" and variant == 0:
        return sentence(f"{first} on the left and {second} on the right")
    if relation == "above" and variant == 0:
        return sentence(f"{first} at the top and {second} below it")
    if variant == 1:
        return sentence(f"{first} is {RELATION_TEXT[relation]} {second}")
    return sentence(f"{first} {RELATION_TEXT[relation]} {second}")


def _extreme(objects: Sequence[SceneObject], key, margin: float) -> SceneObject | None:
    ordered = sorted(objects, key=key)
    if len(ordered) >= 2 and key(ordered[1]) - key(ordered[0]) > margin:
        return ordered[0]
    return None


def _caption_extremes(scene: Scene, rng: np.random.Generator) -> str | None:
    margin = 0.05 * scene.width
    axes = [("leftmost", "rightmost", lambda o: o.center[0], lambda o: -o.center[0]),
            ("topmost", "lowest", lambda o: o.center[1], lambda o: -o.center[1])]
    name_first, name_last, key_first, key_last = axes[int(rng.integers(2))]
    first = _extreme(scene.objects, key_first, margin)
    last = _extreme(scene.objects, key_last, margin)
    if first is None or last is None or _full_phrase(first, False) == _full_phrase(last, False):
        return None
    return sentence(f"the {name_first} shape is {with_article(_full_phrase(first, False))} "
                    f"and the {name_last} one is {with_article(_full_phrase(last, False))}")


def _caption_focus(scene: Scene, rng: np.random.Generator) -> str | None:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    others = len(scene.objects) - 1
    rest = "one other shape" if others == 1 else f"{NUMBER_WORDS[others]} other shapes"
    linker = " and " if rng.random() < 0.5 else " among "
    return sentence(with_article(_full_phrase(obj, rng.random() < 0.5)) + linker + rest)


CAPTION_TEMPLATES = (_caption_list, _caption_count, _caption_colors, _caption_sizes, _caption_relation,
                     _caption_extremes, _caption_focus)


def make_captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` captions of ``scene`` from distinct templates, in random order."""
    order = rng.permutation(len(CAPTION_TEMPLATES))
    captions: list[str] = []
    for index in order:
        caption = CAPTION_TEMPLATES[index](scene, rng)
        if caption is not None and caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    # Fewer templates applied than asked for: add object lists (they vary with their random prefix).
    while len(captions) < count:
        captions.append(_caption_list(scene, rng))
    return captions


def _region(obj: SceneObject, scene: Scene) -> str:
    column = ("left", "middle", "right")[min(2, int(3 * obj.center[0] / scene.width))]
    row = ("top", "middle", "bottom")[min(2, int(3 * obj.center[1] / scene.height))]
    if row == "middle" and column == "middle":
        return "in the center"
    if row == "middle":
        return f"on the {column}"
    if column == "middle":
        return f"at the {row}"
    return f"in the {row} {column} corner"


def describe_scene(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Plain sentences about a scene for the text corpus: a count, where each object is, and a few relations."""
    sentences = [sentence(f"there are {NUMBER_WORDS[len(scene.objects)]} shapes in the picture")]
    for index in rng.permutation(len(scene.objects)):
        obj = scene.objects[int(index)]
        sentences.append(sentence(f"{with_article(_full_phrase(obj, True))} is {_region(obj, scene)}"))
    pairs = [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b
             for rel in [_dominant_relation(a, b, scene.width)] if rel is not None
             and _full_phrase(a, True) != _full_phrase(b, True)]
    for index in rng.permutation(len(pairs))[:2]:
        a, b, relation = pairs[int(index)]
        with_size = _full_phrase(a, False) == _full_phrase(b, False)
        sentences.append(sentence(f"{with_article(_full_phrase(a, with_size))} is {RELATION_TEXT[relation]} "
                                  f"{with_article(_full_phrase(b, with_size))}"))
    return sentences


# ----------------------------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class WorldQuestion:
    """One VQA question: its text, canonical answer, VQA answer/question types, our family name and the 10
    annotator ``(answer, answer_confidence)`` pairs."""

    text: str
    answer: str
    answer_type: str
    question_type: str
    family: str
    annotator_answers: tuple[tuple[str, str], ...]


class YesNoBalancer:
    """Keeps yes and no answers level per question family: the next target is the rarer answer so far, and a coin
    flip on a tie. ``record`` counts an answer once its question is kept."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def target(self, family: str, rng: np.random.Generator) -> bool:
        yes, no = self.counts[family]
        if yes != no:
            return yes < no
        return bool(rng.random() < 0.5)

    def record(self, family: str, answer_is_yes: bool) -> None:
        self.counts[family][0 if answer_is_yes else 1] += 1


_ANY_DESCRIPTION = (("shape",), ("color", "shape"), ("size", "shape"), ("color",), ("size", "color", "shape"),
                    ("size", "color"))


def _answer_pool(answer_type: str, answer: str, family: str) -> list[str]:
    if answer_type == "yes/no":
        return ["yes", "no"]
    if answer_type == "number":
        value = int(answer)
        return [str(v) for v in (value - 1, value + 1) if v >= 0]
    if family == "color":
        return list(COLORS)
    if family == "shape":
        return list(SHAPES)
    if family == "size":
        return list(SIZES)
    if answer in ("left", "right"):
        return ["left", "right"]
    return ["above", "below"]


def _annotate(rng: np.random.Generator, answer: str, answer_type: str, family: str) -> tuple[tuple[str, str], ...]:
    """10 annotator answers: the right one, except for 0-2 plausible mistakes at random positions."""
    num_noisy = int(rng.choice(len(NOISY_ANSWERS_PROBS), p=NOISY_ANSWERS_PROBS))
    wrong = [a for a in _answer_pool(answer_type, answer, family) if a != answer]
    noisy_positions = set(rng.choice(10, size=num_noisy, replace=False).tolist()) if num_noisy else set()
    answers = []
    for position in range(10):
        if position in noisy_positions:
            confidence = ("maybe", "yes", "no")[int(rng.integers(3))]
            answers.append((wrong[int(rng.integers(len(wrong)))], confidence))
        else:
            answers.append((answer, "yes" if rng.random() < 0.9 else "maybe"))
    return tuple(answers)


def _q_color(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    candidates = unique_descriptions(obj, scene.objects, (("shape",), ("size", "shape")))
    if not candidates:
        return None
    ref = describe(obj, _pick_description(rng, candidates))
    if rng.random() < 0.8:
        return f"What color is the {ref}?", obj.color, "other", "what color is the"
    return f"What is the color of the {ref}?", obj.color, "other", "what is the color of the"


def _q_shape(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    candidates = unique_descriptions(obj, scene.objects, (("color",), ("size", "color"), ("size",)))
    if not candidates:
        return None
    ref = describe(obj, _pick_description(rng, candidates), generic="object" if rng.random() < 0.7 else "shape")
    return f"What shape is the {ref}?", obj.shape, "other", "what shape is the"


def _size_reference(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, str] | None:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    candidates = unique_descriptions(obj, scene.objects, (("shape",), ("color", "shape"), ("color",)))
    if not candidates:
        return None
    return obj, describe(obj, _pick_description(rng, candidates))


def _q_size(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    found = _size_reference(scene, rng)
    if found is None:
        return None
    obj, ref = found
    return f"What size is the {ref}?", obj.size, "other", "what size is the"


def _q_size_yes_no(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    found = _size_reference(scene, rng)
    if found is None:
        return None
    obj, ref = found
    want_yes = balancer.target("size_yes_no", rng)
    asked = obj.size if want_yes else ("small" if obj.size == "large" else "large")
    return f"Is the {ref} {asked}?", "yes" if want_yes else "no", "yes/no", "is the"


def _q_count(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    options = ((), ("shape",), ("color",), ("color", "shape"), ("size",), ("size", "shape"))
    attrs = options[int(rng.integers(len(options)))]
    reference = scene.objects[int(rng.integers(len(scene.objects)))]
    values = {attr: getattr(reference, attr) for attr in attrs}
    if attrs and rng.random() < 0.15:  # sometimes ask about values that may be absent (answer 0)
        pools = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
        values = {attr: str(pools[attr][int(rng.integers(len(pools[attr])))]) for attr in attrs}
    count = sum(all(getattr(obj, a) == v for a, v in values.items()) for obj in scene.objects)
    words = [values[a] for a in ("size", "color") if a in values]
    words.append(plural(values["shape"]) if "shape" in values else ("shapes" if rng.random() < 0.5 else "objects"))
    tail = ("are there", "are in the image", "can you see")[int(rng.integers(3))]
    return f"How many {' '.join(words)} {tail}?", str(count), "number", "how many"


def _q_exist(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    options = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",))
    attrs = options[int(rng.integers(len(options)))]
    want_yes = balancer.target("exist", rng)
    reference = scene.objects[int(rng.integers(len(scene.objects)))]
    values = {attr: getattr(reference, attr) for attr in attrs}
    if not want_yes:
        # A near miss: change one attribute of an existing object so that nothing in the scene fits any more.
        pools = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
        for _ in range(30):
            changed = str(attrs[int(rng.integers(len(attrs)))])
            values[changed] = str(pools[changed][int(rng.integers(len(pools[changed])))])
            if not any(all(getattr(obj, a) == v for a, v in values.items()) for obj in scene.objects):
                break
        else:
            return None
    words = [values[a] for a in ("size", "color") if a in values]
    answer = "yes" if want_yes else "no"
    if rng.random() < 0.25:
        words.append(plural(values["shape"]) if "shape" in values else "shapes")
        return f"Are there any {' '.join(words)}?", answer, "yes/no", "are there any"
    words.append(values.get("shape", "object"))
    return f"Is there {with_article(' '.join(words))}?", answer, "yes/no", "is there a"


def _referable_pairs(scene: Scene, rng: np.random.Generator):
    references = {}
    for obj in scene.objects:
        candidates = unique_descriptions(obj, scene.objects, _ANY_DESCRIPTION)
        if candidates:
            references[id(obj)] = describe(obj, _pick_description(rng, candidates))
    return [(a, b) for a in scene.objects for b in scene.objects
            if a is not b and id(a) in references and id(b) in references
            and clear_relations(a, b, scene.width)], references


def _q_spatial_yes_no(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    pairs, references = _referable_pairs(scene, rng)
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    relations = clear_relations(a, b, scene.width)
    relation = relations[int(rng.integers(len(relations)))]
    want_yes = balancer.target("spatial_yes_no", rng)
    asked = relation if want_yes else OPPOSITE[relation]
    text = f"Is the {references[id(a)]} {RELATION_TEXT[asked]} the {references[id(b)]}?"
    return text, "yes" if want_yes else "no", "yes/no", "is the"


def _q_spatial_choice(scene: Scene, rng: np.random.Generator, balancer: YesNoBalancer):
    pairs, references = _referable_pairs(scene, rng)
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    relations = clear_relations(a, b, scene.width)
    relation = relations[int(rng.integers(len(relations)))]
    ref_a, ref_b = references[id(a)], references[id(b)]
    if relation in ("left", "right"):
        return f"Is the {ref_a} to the left or to the right of the {ref_b}?", relation, "other", "is the"
    return f"Is the {ref_a} above or below the {ref_b}?", relation, "other", "is the"


_FAMILY_MAKERS = {"color": _q_color, "shape": _q_shape, "size": _q_size, "size_yes_no": _q_size_yes_no,
                  "count": _q_count, "exist": _q_exist, "spatial_yes_no": _q_spatial_yes_no,
                  "spatial_choice": _q_spatial_choice}


def make_questions(scene: Scene, rng: np.random.Generator, count: int, balancer: YesNoBalancer) -> list[WorldQuestion]:
    """Up to ``count`` distinct questions about ``scene`` (fewer only if the scene cannot support more)."""
    families = list(QUESTION_FAMILIES)
    probs = np.array([QUESTION_FAMILIES[f] for f in families])
    probs = probs / probs.sum()
    questions: list[WorldQuestion] = []
    seen: set[str] = set()
    for _attempt in range(count * 8):
        if len(questions) == count:
            break
        family = families[int(rng.choice(len(families), p=probs))]
        made = _FAMILY_MAKERS[family](scene, rng, balancer)
        if made is None or made[0] in seen:
            continue
        text, answer, answer_type, question_type = made
        seen.add(text)
        if answer_type == "yes/no":
            balancer.record(family, answer == "yes")
        questions.append(WorldQuestion(text, answer, answer_type, question_type, family,
                                       _annotate(rng, answer, answer_type, family)))
    return questions
