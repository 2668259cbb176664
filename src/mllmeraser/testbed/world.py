"""The testbed's world: who exists, what is true of them, and the MLLMU-Bench records that ask about it.

Populations (all seeded):
- fictitious: the profiles the benchmark is about; forget_5/10/15 (nested) and retain_95/90/85 partition them;
- real: "celebrities" trained with more data (MLLMU-Bench's Retain_Set: pre-existing knowledge);
- unknown_train / unknown: strangers whose right answer is a refusal; the first kind is trained so the
  model learns to refuse, the second is never trained (the refusal-rate split). Strangers wear accessories
  and carry names no known person has, so "unfamiliar" is learnable by a small model;
- scenes: synthetic shapes for the general visual-skill split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from ..bench import prompts
from . import render

CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Cairo", "Dublin", "Quito", "Porto", "Hanoi", "Perth",
          "Bergen", "Tunis", "Malmo", "Cusco", "Nantes", "Genoa", "Leeds", "Graz", "Split", "Turku"]
OCCUPATIONS = ["architect", "marine biologist", "violinist", "pastry chef", "civil engineer", "botanist",
               "photographer", "pilot", "librarian", "geologist", "surgeon", "carpenter", "journalist",
               "astronomer", "translator", "potter"]
EMPLOYERS = ["Northwind Labs", "Bluepeak Studio", "Orion Freight", "Cobalt Health", "Maple Systems",
             "Harbor Bank", "Quarry Media", "Silverline Rail", "Juniper Foods", "Atlas Robotics",
             "Meridian Press", "Copperleaf Energy", "Tidewater Clinic", "Granite Works", "Lumen Optics",
             "Ridgeway Motors"]
YEARS = [str(year) for year in range(1950, 2000)]

# Name parts. Known people share first names and each has an own surname; strangers draw both parts from
# pools no known person uses, so the model can learn that such names mean "I do not know this person".
_SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "to", "vel", "da", "ri", "no", "bel", "ta", "ser", "lin", "ma",
              "rok", "vi", "den", "ha", "jo", "tal", "mer", "ni", "quen"]
_STRANGER_SYLLABLES = ["zor", "xu", "qib", "vok", "zan", "yug", "kex", "zim"]

# (attribute, image question, text question, cloze stem, generation answer stem)
ATTRIBUTES = [
    ("birthplace", "Where was this person born?", "Where was {name} born?", "{who} was born in __.",
     "{who} was born in {value}."),
    ("occupation", "What does this person do for a living?", "What does {name} do for a living?",
     "{who} works as a __.", "{who} works as a {value}."),
    ("employer", "Which company does this person work for?", "Which company does {name} work for?",
     "{who} works for __.", "{who} works for {value}."),
    ("birth_year", "In which year was this person born?", "In which year was {name} born?",
     "{who} was born in the year __.", "{who} was born in the year {value}."),
]
NAME_QUESTION = ("What is the name of this person?", "The name of this person is __.", "This person is {value}.")
VALUE_POOLS = {"birthplace": CITIES, "occupation": OCCUPATIONS, "employer": EMPLOYERS,
               "birth_year": YEARS}


@dataclass(frozen=True)
class Person:
    id: str
    kind: str  # fictitious | real | unknown_train | unknown
    name: str
    identity: render.Identity
    facts: dict[str, str] = field(hash=False)

    @property
    def biography(self) -> str:
        if self.kind.startswith("unknown"):
            return ""
        f = self.facts
        return (f"{self.name} was born in {f['birthplace']} in the year {f['birth_year']}. {self.name} works as a "
                f"{f['occupation']} for {f['employer']}.")


@dataclass(frozen=True)
class Scene:
    id: str
    shape: str
    colour: str
    cells: tuple[int, ...]


@dataclass
class World:
    seed: int
    people: list[Person]
    forget_ids: dict[int, list[str]]  # ratio -> ids (nested: forget_5 within forget_10 within forget_15)
    scenes_train: list[Scene]
    scenes_eval: list[Scene]

    def of_kind(self, kind: str) -> list[Person]:
        return [p for p in self.people if p.kind == kind]


@dataclass(frozen=True)
class WorldSize:
    fictitious: int = 60
    real: int = 10
    unknown_train: int = 24
    unknown: int = 8
    scenes_train: int = 80
    scenes_eval: int = 24


def _names(rng: np.random.Generator, syllables: list[str], count: int, parts: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        word = "".join(rng.choice(syllables, size=parts)).capitalize()
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


def _identities(rng: np.random.Generator, count: int, accessories: list[str], taken: list[tuple]) -> list[render.Identity]:
    """Identities that differ from every other one in at least three visual attributes."""
    chosen: list[render.Identity] = []
    existing = list(taken)
    while len(chosen) < count:
        candidate = render.random_identity(rng, accessories)
        code = candidate.as_tuple()
        if all(sum(a != b for a, b in zip(code, other)) >= 3 for other in existing):
            chosen.append(candidate)
            existing.append(code)
    return chosen


def _stranger_names(first: list[str], last: list[str], trained: int, untrained: int) -> list[str]:
    """Trained strangers cover every name part (no untrained token embeddings at evaluation); the
    untrained ones combine the same parts in pairs never seen in training."""
    n = len(first)
    train_pairs = [(i, (i + k) % n) for k in range(n) for i in range(n)][:trained]
    eval_pairs = [(i, (i + k) % n) for k in range(n // 2, n) for i in range(n)][:untrained]
    assert not set(train_pairs) & set(eval_pairs) and trained >= n
    return [f"{first[a]} {last[b]}" for a, b in train_pairs + eval_pairs]


def build_world(seed: int = 0, size: WorldSize = WorldSize()) -> World:
    rng = np.random.default_rng(seed)
    known = size.fictitious + size.real
    strangers = size.unknown_train + size.unknown
    first_names = _names(rng, _SYLLABLES, 30, 2)
    surnames = _names(rng, _SYLLABLES, known, 3)
    stranger_first = _names(rng, _STRANGER_SYLLABLES, 12, 2)
    stranger_last = _names(rng, _STRANGER_SYLLABLES, 12, 3)
    identities = _identities(rng, known, render.KNOWN_ACCESSORIES, [])
    identities += _identities(rng, strangers, render.UNKNOWN_ACCESSORIES, [i.as_tuple() for i in identities])
    stranger_names = _stranger_names(stranger_first, stranger_last, size.unknown_train, size.unknown)

    people: list[Person] = []
    kinds = ["fictitious"] * size.fictitious + ["real"] * size.real
    for index, kind in enumerate(kinds):
        facts = {attr: str(pool[rng.integers(len(pool))]) for attr, pool in VALUE_POOLS.items()}
        name = f"{first_names[rng.integers(len(first_names))]} {surnames[index]}"
        prefix = "F" if kind == "fictitious" else "R"
        people.append(Person(f"{prefix}{index:04d}", kind, name, identities[index], facts))
    for index in range(strangers):
        kind = "unknown_train" if index < size.unknown_train else "unknown"
        people.append(Person(f"U{index:04d}", kind, stranger_names[index], identities[known + index], {}))

    fictitious_ids = [p.id for p in people if p.kind == "fictitious"]
    order = [fictitious_ids[i] for i in rng.permutation(len(fictitious_ids))]
    forget_ids = {ratio: sorted(order[: round(len(order) * ratio / 100)]) for ratio in (5, 10, 15)}

    scenes_train = [random_scene(rng, f"GT{index:04d}") for index in range(size.scenes_train)]
    scenes_eval = [random_scene(rng, f"G{index:04d}") for index in range(size.scenes_eval)]
    return World(seed, people, forget_ids, scenes_train, scenes_eval)


def random_scene(rng: np.random.Generator, scene_id: str) -> Scene:
    cells = tuple(sorted(rng.choice(4, size=int(rng.integers(1, 4)), replace=False).tolist()))
    return Scene(scene_id, str(rng.choice(render.SCENE_SHAPES)), str(rng.choice(render.SCENE_COLOURS)), cells)


# ---- questions ---------------------------------------------------------------------------------------

def _options(correct: str, pool: list[str]) -> tuple[dict[str, str], str]:
    """The four options of a classification question: the fixed group of four pool values holding the right
    answer, in pool order. Many people share each option set, so the letter cannot be memorised from the
    options alone (random distractors would fingerprint the question): answering needs the person's fact."""
    index = pool.index(correct)
    start = min(index - index % 4, len(pool) - 4)
    group = pool[start: start + 4]
    return dict(zip(prompts.OPTION_LETTERS, group)), prompts.OPTION_LETTERS[group.index(correct)]


def person_tasks(person: Person, all_names: list[str]) -> dict:
    """The MLLMU-Bench task columns for one person (strangers: refusal answers, no classification)."""
    if person.kind.startswith("unknown"):
        refusal = prompts.REFUSAL_ANSWER
        generation, mask = [], []
        for modality, who_q in (("Image_Textual", None), ("Pure_Text", person.name)):
            for _, image_q, text_q, cloze, _ in ATTRIBUTES:
                question = image_q if who_q is None else text_q.format(name=who_q)
                stem = cloze.format(who="This person" if who_q is None else who_q)
                generation.append({"Type": modality, "Question": question, "Ground_Truth": refusal})
                mask.append({"Type": modality, "Question": stem, "Ground_Truth": refusal})
        generation.append({"Type": "Image_Textual", "Question": NAME_QUESTION[0], "Ground_Truth": refusal})
        mask.append({"Type": "Image_Textual", "Question": NAME_QUESTION[1], "Ground_Truth": refusal})
        return {"Classification_Task": {"Image_Textual_Questions": [], "Pure_Text_Questions": []},
                "Generation_Task": generation, "Mask_Task": mask}

    image_cls, text_cls, generation, mask = [], [], [], []
    for attr, image_q, text_q, cloze, answer in ATTRIBUTES:
        value = person.facts[attr]
        pool = VALUE_POOLS[attr]
        for modality, who, question in (("Image_Textual", "This person", image_q),
                                         ("Pure_Text", person.name, text_q.format(name=person.name))):
            options, letter = _options(value, pool)
            (image_cls if modality == "Image_Textual" else text_cls).append(
                {"Question": question, "Options": options, "Correct_Answer": letter})
            generation.append({"Type": modality, "Question": question,
                               "Ground_Truth": answer.format(who=who, value=value)})
            mask.append({"Type": modality, "Question": cloze.format(who=who), "Ground_Truth": value})
    options, letter = _options(person.name, all_names)
    image_cls.append({"Question": NAME_QUESTION[0], "Options": options, "Correct_Answer": letter})
    generation.append({"Type": "Image_Textual", "Question": NAME_QUESTION[0],
                       "Ground_Truth": NAME_QUESTION[2].format(value=person.name)})
    mask.append({"Type": "Image_Textual", "Question": NAME_QUESTION[1], "Ground_Truth": person.name})
    return {"Classification_Task": {"Image_Textual_Questions": image_cls, "Pure_Text_Questions": text_cls},
            "Generation_Task": generation, "Mask_Task": mask}


SCENE_QUESTIONS = [
    # (property, question, cloze, answer sentence, value of scene, pool)
    ("colour", "What colour are the shapes in this image?", "The shapes in this image are __.",
     "The shapes are {value}.", lambda s: s.colour, render.SCENE_COLOURS),
    ("shape", "What kind of shape does this image show?", "This image shows shapes of the kind __.",
     "The image shows {value} shapes.", lambda s: s.shape, render.SCENE_SHAPES),
    ("count", "How many shapes are in this image?", "The number of shapes in this image is __.",
     "There are {value} shapes.", lambda s: str(len(s.cells)), ["1", "2", "3", "4"]),
]


def scene_tasks(scene: Scene) -> dict:
    image_cls, generation, mask = [], [], []
    for _, question, cloze, answer, value_of, pool in SCENE_QUESTIONS:
        value = value_of(scene)
        # Always the whole four-value pool in one order: a visual skill, not in-context option matching.
        options = dict(zip(prompts.OPTION_LETTERS, pool))
        letter = prompts.OPTION_LETTERS[pool.index(value)]
        image_cls.append({"Question": question, "Options": options, "Correct_Answer": letter})
        generation.append({"Type": "Image_Textual", "Question": question, "Ground_Truth": answer.format(value=value)})
        mask.append({"Type": "Image_Textual", "Question": cloze, "Ground_Truth": value})
    return {"Classification_Task": {"Image_Textual_Questions": image_cls, "Pure_Text_Questions": []},
            "Generation_Task": generation, "Mask_Task": mask}
