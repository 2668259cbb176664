"""The testbed's world in CLEAR's layout (`mllmeraser testbed export --layout clear`): a miniature CLEAR, read
from a finished build's MLLMU-Bench data and written beside it; the build itself is not touched.

What each config holds (bench/clear.py reads them; docs/clear_protocol.md, "The testbed in CLEAR's layout"):
- person configs (`full`, `forget01|05|10`, `retain99|95|90`): a row per image of each fictitious person, the
  portrait and the person's Test_Set renderings; `caption` is the person's biography (the facts the testbed
  model learned), `name` the person's name. forget05 and forget10 are the build's forget_5 and forget_10,
  forget01 the first person of forget_5; each retain config is every other fictitious person.
- `forgetNN_perturbed` and `retain_perturbed` (the people outside forget10, as CLEAR's one retain_perturbed
  serves every forget size) add `paraphrased_caption` (the same facts in the text questions' answers),
  `perturbed_captions` (three other people's biographies told of this person) and `perturbed_names`.
- `+tofu` configs: the image rows, plus a text row (question, answer) per text generation question.
- `real_faces`: the real people (Retain_Set), their portrait, name and four names to choose from.
- `real_world`: the visual-skill scenes (General_Set), each image question with its options.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..bench import clear, data
from ..errors import UserInputError

WRONG_ANSWERS = 3  # perturbed captions and names per row


def write_config(out: str | Path, config: str, rows: Sequence[dict], shards: int = 1) -> list[Path]:
    """A config as CLEAR's Hub layout has it: `<out>/<config>/train-0000i-of-0000N.parquet`, rows split over
    `shards` files in order. Images are `{bytes, path}` structs, as the Hub's image feature stores them."""
    directory = Path(out) / config
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    paths = []
    for index in range(shards):
        path = directory / f"train-{index:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(list(rows[index * size: (index + 1) * size])), path)
        paths.append(path)
    return paths


def _image(field) -> dict:
    return {"bytes": data.image_bytes(field), "path": None}


def _people(data_dir: Path) -> dict[str, dict]:
    """Every fictitious person's record (forget_15 + retain_85 hold them all), by ID, in ID order."""
    records = {}
    for split in ("forget_15", "retain_85"):
        for record in data.read_split_records(data_dir, split) or []:
            records[str(record["ID"])] = record
    if not records:
        raise UserInputError(data_dir, "no forget_15/retain_85 splits here: not a testbed build's data directory")
    return dict(sorted(records.items()))


def _text_answers(record: dict) -> list[tuple[str, str]]:
    return [(q["Question"], q["Ground_Truth"]) for q in record.get("Generation_Task") or []
            if str(q["Type"]).lower() not in data.IMAGE_TYPES]


def _person_rows(people: dict[str, dict], renderings: dict[str, list], seed: int) -> dict[str, list[dict]]:
    """Each person's rows (one per image), with the perturbed columns."""
    out = {}
    ids = list(people)
    for person_id, record in people.items():
        rng = random.Random(f"{seed}:{person_id}")
        others = rng.sample([i for i in ids if i != person_id], WRONG_ANSWERS)
        name = record["name"]
        perturbed_captions = [people[o]["biography"].replace(people[o]["name"], name) for o in others]
        base = {"caption": record["biography"], "name": name,
                "paraphrased_caption": " ".join(answer for _, answer in _text_answers(record)),
                "perturbed_captions": perturbed_captions, "perturbed_names": [people[o]["name"] for o in others]}
        images = [record["image"]] + renderings.get(person_id, [])
        out[person_id] = [{"image": _image(image), **base} for image in images]
    return out


def _plain(rows: list[dict]) -> list[dict]:
    return [{key: row[key] for key in clear.PERSON_COLUMNS} for row in rows]


def _tofu(rows: list[dict], records: list[dict]) -> list[dict]:
    image_rows = [{"image": row["image"], "caption": row["caption"], "question": None, "answer": None} for row in rows]
    text_rows = [{"image": None, "caption": None, "question": question, "answer": answer}
                 for record in records for question, answer in _text_answers(record)]
    return image_rows + text_rows


def _real_faces(data_dir: Path, seed: int) -> list[dict]:
    records = data.read_split_records(data_dir, data.SPLIT_DIRS["real"]) or []
    names = [record["name"] for record in records]
    rows = []
    for record in records:
        rng = random.Random(f"{seed}:real:{record['ID']}")
        options = rng.sample([n for n in names if n != record["name"]], WRONG_ANSWERS) + [record["name"]]
        rng.shuffle(options)  # a multiple-choice list that holds the answer (the reader leaves it out of the wrong ones)
        rows.append({"image": _image(record["image"]), "answer": record["name"], "options": options})
    return rows


def _real_world(data_dir: Path) -> list[dict]:
    rows = []
    for record in data.read_split_records(data_dir, data.SPLIT_DIRS["general"]) or []:
        for q in (record.get("Classification_Task") or {}).get("Image_Textual_Questions") or []:
            options = {k: v for k, v in q["Options"].items() if v is not None}
            rows.append({"image": _image(record["image"]), "question": q["Question"],
                         "answer": options[q["Correct_Answer"]], "options": list(options.values())})
    return rows


def write_clear_layout(data_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write the testbed data at `data_dir` (a build's `data/`) in CLEAR's layout at `out`, which must not exist
    yet (written to a temporary sibling, then renamed: whole or absent). Returns `out`."""
    data_dir, out = Path(data_dir), Path(out)
    if out.exists():
        raise UserInputError(out, "already exists; choose a new --out directory")
    people = _people(data_dir)
    test_set = data.read_split_records(data_dir, data.SPLIT_DIRS["test"]) or []
    renderings = {str(r["ID"]): list(r.get("images") or []) for r in test_set}
    rows = _person_rows(people, renderings, seed)
    forget_ids = {ratio: [str(r["ID"]) for r in data.read_split_records(data_dir, f"forget_{ratio}") or []]
                  for ratio in (5, 10)}
    forget_ids = {1: sorted(forget_ids[5])[:1], 5: forget_ids[5], 10: forget_ids[10]}
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        everyone = [row for person in people for row in rows[person]]
        write_config(tmp, "full", _plain(everyone))
        write_config(tmp, "full" + clear.TOFU_SUFFIX, _tofu(everyone, list(people.values())))
        for ratio, ids in forget_ids.items():
            kept = [person for person in people if person not in ids]
            for config, chosen in ((clear.forget_config(ratio), ids), (clear.retain_config(ratio), kept)):
                chosen_rows = [row for person in chosen for row in rows[person]]
                write_config(tmp, config, _plain(chosen_rows))
                write_config(tmp, config + clear.TOFU_SUFFIX, _tofu(chosen_rows, [people[p] for p in chosen]))
            write_config(tmp, clear.forget_config(ratio) + clear.PERTURBED_SUFFIX,
                         [row for person in ids for row in rows[person]])
        write_config(tmp, clear.RETAIN_PERTURBED,
                     [row for person in people if person not in forget_ids[10] for row in rows[person]])
        write_config(tmp, clear.REAL_FACES, _real_faces(data_dir, seed))
        write_config(tmp, clear.REAL_WORLD, _real_world(data_dir))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
