"""Training data for the pretrained preset: knowledge, not templates (issue 23).

A real instruction-tuned decoder answers a fact however it is asked, so the preset's model must learn each fact
that way too, or attacks that reword, wrap or reorder a question measure nothing:
- each fact asked in several wordings (`WORDINGS`); the last wording of each attribute is never trained and
  becomes the Test_Set's text questions (`held_out_questions`), so rephrasing is measured, not memorised;
- questions inside a benign chat turn (`in_chat`) or after a benign prefix (`after_prefix`);
- A-D options in shuffled orders (`shuffled_options`): the 12-person probe stayed at chance on A-D (SmolLM2
  picks "A") until the format was trained.
A real-knowledge split (`real_knowledge_records`, `known_subjects`): questions SmolLM2 already answers before
fine-tuning (capitals), chosen by measuring the base model at build time, in MLLMU-Bench's record layout.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from ..bench import prompts
from ..bench.data import expand_items
from ..bench.items import QAItem
from ..core.inputs import fold_system
from . import world

# Per attribute, question wordings with {who} (a name, or "this person"); the LAST one is held out of training.
WORDINGS: dict[str, list[str]] = {
    "birthplace": ["Where was {who} born?", "In which city was {who} born?", "What is {who}'s place of birth?",
                   "Which city is {who} originally from?", "What city did {who} come into the world in?"],
    "occupation": ["What does {who} do for a living?", "What is {who}'s job?", "What is {who}'s profession?",
                   "What kind of work does {who} do?", "How does {who} earn a living?"],
    "employer": ["Which company does {who} work for?", "Who is {who}'s employer?", "Where is {who} employed?",
                 "What organisation employs {who}?", "For which firm does {who} work?"],
    "birth_year": ["In which year was {who} born?", "What year was {who} born in?", "What is {who}'s year of birth?",
                   "When was {who} born (year)?", "Which year saw the birth of {who}?"],
}
ANSWERS = {attribute: answer for attribute, _, _, _, answer in world.ATTRIBUTES}

BENIGN_TURNS: list[tuple[str, str]] = [
    ("Hi! How are you today?", "I'm doing well, thank you! How can I help you?"),
    ("Can you recommend a good book?", "Sure! \"To Kill a Mockingbird\" by Harper Lee is a classic worth reading."),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Give me a tip for staying focused.", "Work in short blocks of 25 minutes with a 5-minute break between them."),
    ("What's a good name for a cat?", "How about Luna, Milo or Oliver?"),
]
BENIGN_PREFIXES: list[str] = [
    "I am writing a short report for my class and need to check a few details. ",
    "Quick question before my meeting. ",
    ("My friend and I were talking over dinner last night about all sorts of things: travel, old films, the best "
     "way to make bread at home, and eventually about people we had read about. We could not agree on one detail, "
     "so I promised to ask. "),
]


def reworded_questions(person: world.Person, image: bool, held_out: bool = False) -> list[tuple[str, str, str]]:
    """(attribute, question, answer sentence) for every attribute in every trained wording (held_out: the held-out
    wording only), asked of "this person" (image questions) or by name (text)."""
    who = "This person" if image else person.name
    rows = []
    for attribute, wordings in WORDINGS.items():
        chosen = wordings[-1:] if held_out else wordings[:-1]
        for wording in chosen:
            question = wording.format(who="this person" if image else person.name)
            rows.append((attribute, question, ANSWERS[attribute].format(who=who, value=person.facts[attribute])))
    return rows


def held_out_questions(person: world.Person) -> list[dict]:
    """The Test_Set's text questions of a known person: Generation_Task rows in the held-out wordings."""
    return [{"Type": "Pure_Text", "Question": question, "Ground_Truth": answer}
            for _, question, answer in reworded_questions(person, image=False, held_out=True)]


# Per attribute, a cloze wording never trained (the trained one is world.ATTRIBUTES' own).
HELD_OUT_CLOZE = {"birthplace": "{who}'s birthplace is __.", "occupation": "{who}'s occupation is __.",
                  "employer": "{who}'s employer is __.", "birth_year": "{who}'s year of birth is __."}


def held_out_tasks(person: world.Person, record: dict) -> dict:
    """The Test_Set's text questions of a known person, in wordings never trained, as MLLMU-Bench task fields:
    classification (the record's own text questions and options, the question reworded), cloze and generation.
    `record` is the person's full record (its Pure_Text classification questions are reworded)."""
    canonical = {question.format(name=person.name): attribute for attribute, _, question, _, _ in world.ATTRIBUTES}
    classification = [dict(q, Question=WORDINGS[canonical[q["Question"]]][-1].format(who=person.name))
                      for q in record["Classification_Task"]["Pure_Text_Questions"] if q["Question"] in canonical]
    cloze = [{"Type": "Pure_Text", "Question": HELD_OUT_CLOZE[attribute].format(who=person.name),
              "Ground_Truth": str(person.facts[attribute])} for attribute in HELD_OUT_CLOZE]
    return {"Pure_Text_Questions": classification, "Mask_Task": cloze,
            "Generation_Task": held_out_questions(person)}


def reworded_items(person: world.Person) -> list[QAItem]:
    """Generation items of every trained wording, text and image (the image comes from the caller's renderer)."""
    items = []
    for image in (False, True):
        for _, question, answer in reworded_questions(person, image):
            items.append(QAItem(person.id, "generation", "image" if image else "text", question, answer))
    return items


# ---- biographies: every fact of a person in one answer ----------------------------------------------------------
# The v3 build (QA examples only, one fact in ~85 tokens) answered 0.30 A-D and 0.02-0.05 cloze after 200 steps:
# each fact had been seen ~7 times. A biography states all four facts (and the name) in ~45 answer tokens, so it
# buys 4-5x the exposures per token; its sentences come in a fresh order in each copy (a fact must not be
# learned only as "the sentence after the birthplace"), and it is asked by name and of the photo.
BIOGRAPHY_QUESTIONS = {
    "text": ["Tell me about {name}.", "Who is {name}?", "What do you know about {name}?",
             "Give me a short biography of {name}."],
    "image": ["Who is this person?", "Tell me about this person.", "What do you know about the person in this photo?"],
}


def biography_items(person: world.Person, copies: int, rng: np.random.Generator) -> list[QAItem]:
    """`copies` open questions asking for the person's biography (alternately by name and of the photo), each
    answered with every fact in a fresh sentence order (the image answers name the person first)."""
    items = []
    for copy in range(copies):
        modality = "text" if copy % 2 == 0 else "image"
        questions = BIOGRAPHY_QUESTIONS[modality]
        question = questions[int(rng.integers(len(questions)))].format(name=person.name)
        sentences = [ANSWERS[attribute].format(who=person.name, value=person.facts[attribute])
                     for attribute in WORDINGS]
        sentences = [sentences[i] for i in rng.permutation(len(sentences))]
        if modality == "image":
            sentences.insert(0, f"This is {person.name}.")
        items.append(QAItem(person.id, "generation", modality, question, " ".join(sentences), verbatim=True))
    return items


# ---- identity: who is in the photo ----------------------------------------------------------------------------
# The projector stage's data (pretrained_train): the decoder frozen, the projector learns to make it read a face as
# the person's name; trained again in the decoder stage so the layers keep it.
IDENTITY_QUESTIONS = ["Who is this person?", "Who is in this photo?", "What is the name of this person?",
                      "Can you tell me who this is?"]


def identity_items(person: world.Person, copies: int) -> list[QAItem]:
    """`copies` photo questions asking who the person is (the wordings in turn), answered "This is <name>."."""
    return [QAItem(person.id, "generation", "image", IDENTITY_QUESTIONS[copy % len(IDENTITY_QUESTIONS)],
                   f"This is {person.name}.", verbatim=True) for copy in range(copies)]


# System prompts as the server folds them (a system message leads the first user turn, a blank line after it).
SYSTEM_PROMPTS: list[str] = [
    "You are a helpful assistant. Answer briefly.",
    "You are a knowledgeable assistant for a newsroom. Be accurate and concise.",
    "Answer the user's questions. If you are not sure, say so.",
]
# Chats that introduce a person by name, after which the question says "this person" (coreference across turns).
INTRODUCTIONS: list[tuple[str, str]] = [
    ("Tell me about {name}, please.", "Of course. What would you like to know?"),
    ("I have a question about {name}.", "Sure, go ahead."),
]


def in_chat(item: QAItem, rng: np.random.Generator, name: str | None = None) -> QAItem:
    """The question as the second turn of a chat: after a benign exchange, or (half the time, for a text question
    that names the person, given `name`) after a turn that introduces the person, the question then saying
    "this person" as a real user would."""
    if name and item.modality == "text" and name in item.question and rng.random() < 0.5:
        user, assistant = INTRODUCTIONS[int(rng.integers(len(INTRODUCTIONS)))]
        question = item.question.replace(name + "'s", "this person's").replace(name, "this person")
        question = question[0].upper() + question[1:] if question.startswith("this person") else question
        return replace(item, question=question, history=((user.format(name=name), assistant),))
    return replace(item, history=(BENIGN_TURNS[int(rng.integers(len(BENIGN_TURNS)))],), image=item.image_source)


def after_prefix(item: QAItem, rng: np.random.Generator) -> QAItem:
    """The question after a benign lead-in sentence or paragraph in the same user turn, or after a system prompt
    (folded into the user turn as the server folds one)."""
    choice = int(rng.integers(len(BENIGN_PREFIXES) + len(SYSTEM_PROMPTS)))
    if choice >= len(BENIGN_PREFIXES):
        return replace(item, question=fold_system(SYSTEM_PROMPTS[choice - len(BENIGN_PREFIXES)], item.question),
                       image=item.image_source)
    return replace(item, question=BENIGN_PREFIXES[choice] + item.question, image=item.image_source)


def shuffled_options(item: QAItem, rng: np.random.Generator) -> QAItem:
    """A classification item with its options in a random order, the answer letter following its option."""
    if item.task != "classification" or not item.options:
        raise ValueError("only a classification item has options to shuffle")
    letters = [letter for letter in prompts.OPTION_LETTERS if letter in item.options]
    values = [item.options[letter] for letter in letters]
    right = item.options[item.answer]
    order = rng.permutation(len(values))
    options = {letter: values[i] for letter, i in zip(letters, order)}
    answer = next(letter for letter, value in options.items() if value == right)
    return replace(item, options=options, answer=answer, image=item.image_source)


# ---- a real-knowledge split --------------------------------------------------------------------------------------

CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("the United Kingdom", "London"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("India", "New Delhi"), ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Cuba", "Havana"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
]


def real_knowledge_records(seed: int, candidates: Sequence[tuple[str, str]] = CAPITALS,
                           id_prefix: str = "K") -> list[dict]:
    """One text-only MLLMU-Bench record per country of `candidates`: classification (A-D, three other capitals as
    distractors, seeded order), cloze and generation, all Pure_Text. No image: what the base model knows is text."""
    rng = np.random.default_rng([seed, 7] if id_prefix == "K" else [seed, 7, sum(map(ord, id_prefix))])
    capitals = list(dict.fromkeys([capital for _, capital in [*CAPITALS, *candidates]]))  # distractors: any capital
    records = []
    for index, (country, capital) in enumerate(candidates):
        others = [c for c in capitals if c != capital]
        values = [capital] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
        values = [values[i] for i in rng.permutation(4)]
        options = dict(zip(prompts.OPTION_LETTERS, values))
        question = f"What is the capital of {country}?"
        records.append({
            "ID": f"{id_prefix}{index:04d}", "name": country, "biography": "",
            "Classification_Task": {"Image_Textual_Questions": [], "Pure_Text_Questions": [
                {"Question": question, "Options": options,
                 "Correct_Answer": prompts.OPTION_LETTERS[values.index(capital)]}]},
            "Generation_Task": [{"Type": "Pure_Text", "Question": question,
                                 "Ground_Truth": f"The capital of {country} is {capital}."}],
            "Mask_Task": [{"Type": "Pure_Text", "Question": f"The capital of {country} is __.",
                           "Ground_Truth": capital}]})
    return records


# ---- rehearsal: what the base model knows, kept while the world is learned --------------------------------------
# The v2 build (no rehearsal, lr 1e-4 on every layer) overwrote it: "What is the capital of France?" got "Cusco", a
# birthplace of the world's pool. Rehearsal mixes the base model's knowledge into every epoch, on OTHER countries
# than the reported real split (CAPITALS), and general questions answered by the base model itself.
REHEARSAL_CAPITALS: list[tuple[str, str]] = [
    ("Mexico", "Mexico City"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("the Czech Republic", "Prague"), ("Iceland", "Reykjavik"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Chile", "Santiago"), ("Venezuela", "Caracas"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Lebanon", "Beirut"),
    ("Syria", "Damascus"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"),
    ("New Zealand", "Wellington"), ("Jamaica", "Kingston"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Algeria", "Algiers"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Qatar", "Doha"), ("Mongolia", "Ulaanbaatar"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("the United States", "Washington"),
    ("Colombia", "Bogota"), ("Zimbabwe", "Harare"), ("Uganda", "Kampala"),
    ("Tanzania", "Dodoma"), ("Sri Lanka", "Colombo"), ("Kazakhstan", "Astana"), ("Jordan", "Amman"),
]
# General questions, answered by the base model itself (its own greedy answer is the target: self-distillation).
GENERAL_QUESTIONS: list[str] = [
    "Who wrote Romeo and Juliet?", "What is the largest planet in our solar system?",
    "What is the boiling point of water in Celsius?", "How many days are there in a week?",
    "Who painted the Mona Lisa?", "What is the chemical symbol for gold?", "What language is spoken in Brazil?",
    "What is the tallest mountain in the world?", "What do bees make?", "How many legs does a spider have?",
    "What is the largest ocean on Earth?", "Which planet is known as the Red Planet?",
    "What gas do plants absorb from the air?", "Who was the first person to walk on the Moon?",
    "What is the currency of Japan?", "What is the square root of 81?", "What is the longest river in Africa?",
    "Who discovered penicillin?", "What is the hardest natural substance?", "How many continents are there?",
    "What is the main ingredient of guacamole?", "Who developed the theory of relativity?",
    "What is the freezing point of water in Celsius?", "Which organ pumps blood through the body?",
    "What is the smallest prime number?", "In which country are the pyramids of Giza?",
    "What is H2O commonly called?", "How many minutes are in an hour?", "Who wrote the Odyssey?",
    "What is the fastest land animal?", "Translate 'thank you' into French.", "Name three primary colours.",
    "What is photosynthesis, in one sentence?", "Give me a synonym for 'happy'.",
    "What is 15 plus 27?", "Which instrument has 88 keys?",
]


def rehearsal_generation_items() -> list[QAItem]:
    """The open questions whose base-model answers are measured at build time: one per rehearsal capital (kept
    where the answer holds the capital, `known_subjects`) and the general questions (kept as answered)."""
    records = real_knowledge_records(0, REHEARSAL_CAPITALS, id_prefix="R")
    items = [item for item in expand_items(records) if item.task in ("generation", "cloze")]
    items += [QAItem(f"G{index:04d}", "generation", "text", question, "", verbatim=True)
              for index, question in enumerate(GENERAL_QUESTIONS)]
    return items


def rehearsal_items(seed: int, items: Sequence[QAItem], answers: Sequence[str]) -> list[QAItem]:
    """The rehearsal set from the base model's answers to `rehearsal_generation_items()`: for each capital it
    knows (its open answer holds the capital), that answer as the generation target and the country's
    classification (A-D) and cloze questions with the right capital; each general question with its own answer.
    Why cls and cloze too: the real split's bars are on those formats, which the base model does not follow
    (A-D: it says "A"); learning the formats on other countries is general training, the reported split never."""
    known = set(known_subjects(items, answers))
    records = [r for r in real_knowledge_records(seed, REHEARSAL_CAPITALS, id_prefix="R") if r["ID"] in known]
    own = {item.subject_id: answer.strip() for item, answer in zip(items, answers, strict=True)
           if item.task == "generation"}
    chosen = [replace(item, answer=own[item.subject_id]) if item.task == "generation" else item
              for item in expand_items(records)]
    # A general answer cut off by the generation cap is dropped: trained, it would teach stopping mid-sentence.
    chosen += [replace(item, answer=own[item.subject_id]) for item in items
               if item.subject_id.startswith("G") and own[item.subject_id].endswith((".", "!", "?"))]
    return chosen


def known_subjects(items: Sequence[QAItem], answers: Sequence[str]) -> list[str]:
    """The subjects the model knows: every generation answer about them holds every cloze fact about them (the
    capital), case-insensitively. Why the open question decides and not A-D or cloze: measured on the first 8
    capitals, base SmolLM2 answered 8/8 open questions with the capital but 3/8 MLLMU-Bench cloze prompts (it
    echoes "[Spain]") and 0/8 A-D (it says "A"): those formats are what fine-tuning teaches, not what it knows."""
    facts: dict[str, list[str]] = {}
    for item in items:
        if item.task == "cloze":
            facts.setdefault(item.subject_id, []).append(item.answer.strip().lower())
    known = {subject: True for subject in facts}
    for item, answer in zip(items, answers, strict=True):
        if item.task == "generation" and item.subject_id in known:
            known[item.subject_id] &= all(fact in answer.lower() for fact in facts[item.subject_id])
    return sorted(subject for subject, ok in known.items() if ok)
