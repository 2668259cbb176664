"""The top-level API on the shared small testbed: the README's example as written, plain tuples fitting exactly
as the items they stand for, and `mllmeraser generate` answering as the API does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mllmeraser
from mllmeraser import FitSettings, PGDSettings, Prompt, QAItem, answer_items, fit_eraser, load_split_items
from mllmeraser.core import cache, models
from mllmeraser.core.inputs import as_items

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_is_importable():
    for name in mllmeraser.__all__:
        assert getattr(mllmeraser, name) is not None, name


def test_readme_example_runs(testbed_dir, tmp_path, monkeypatch, capsys):
    """The README's first Python block, unchanged but for the testbed it builds: the small one the suite shares."""
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    assert "build_testbed()" in example and "from mllmeraser import" in example
    monkeypatch.setattr(mllmeraser, "build_testbed", lambda: testbed_dir, raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(README), "exec"), {})  # its asserts: detached == before != attached
    # the directions and the gate's float16 banks (small preset: 361 KiB); the bar on the testbed is 1 MiB
    assert (tmp_path / "forget10.safetensors").stat().st_size < 1024 * 1024
    assert "of 10 answers changed" in capsys.readouterr().out


def test_plain_tuples_fit_exactly_as_their_items(testbed_model, testbed_data):
    """A tuple is a verbatim generation item (no MLLMU-Bench instruction): fitting from tuples and from those
    items gives the same eraser, bit for bit; QAItems and tuples mix in one list."""
    model, processor = testbed_model
    forget = [i for i in load_split_items(testbed_data, "forget", 10) if i.task == "generation"][:8]
    retain = [i for i in load_split_items(testbed_data, "retain", 10) if i.task == "generation"][:16]
    tuples = {name: [(i.image, i.question, i.answer) for i in items] for name, items in
              (("forget", forget), ("retain", retain[:8]), ("erasure", retain[8:]))}
    items = {name: [QAItem(str(n), "generation", "text" if image is None else "image", question, answer,
                           image=image, verbatim=True) for n, (image, question, answer) in enumerate(entries)]
             for name, entries in tuples.items()}
    assert items["forget"][0].prompt == forget[0].question != forget[0].prompt  # asked as given
    settings = FitSettings(pgd=PGDSettings(steps=2))
    from_tuples = fit_eraser(model, processor, **tuples, settings=settings, progress=False)
    from_items = fit_eraser(model, processor, **items, settings=settings, progress=False)
    mixed = fit_eraser(model, processor, forget=items["forget"][:4] + tuples["forget"][4:], retain=tuples["retain"],
                       erasure=items["erasure"], settings=settings, progress=False)
    for other in (from_items, mixed):
        assert torch.equal(from_tuples.r, other.r)
        ours, theirs = from_tuples.prompt_gate.tensors(), other.prompt_gate.tensors()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert from_tuples.header() == other.header()
    assert answer_items(model, processor, tuples["forget"], progress=False) == \
        answer_items(model, processor, items["forget"], progress=False)


def test_a_plain_tuple_is_a_neutral_prompt_keyed_and_batched_as_its_verbatim_item():
    """A tuple becomes a core Prompt (no benchmark in it), asked, capped, cached and batched as the verbatim
    generation QAItem it used to become: the model cache keeps the keys of entries made from tuples."""
    photo = Image.new("RGB", (8, 8), "red")
    entries = [(None, "Who?", "Nobody."), (photo, "Who is this?", "Ada.")]
    prompts = as_items(entries)
    items = [QAItem(str(n), "generation", "text" if image is None else "image", question, answer, image=image,
                    verbatim=True) for n, (image, question, answer) in enumerate(entries)]
    assert all(type(p) is Prompt for p in prompts) and prompts[1].image is photo
    for prompt, item in zip(prompts, items):
        assert (prompt.text, prompt.modality, prompt.max_new_tokens) == (item.text, item.modality, item.max_new_tokens)
        assert prompt.cache_fields() == item.cache_fields()
    assert cache.item_digest(prompts) == cache.item_digest(items)
    options = {"A": "x", "B": "y", "C": "z", "D": "w"}
    mixed = [items[1], QAItem("s", "classification", "text", "q", "A", options), prompts[0],
             QAItem("s", "cloze", "image", "born in __.", "Lima", image=photo), items[0], prompts[1],
             QAItem("t", "classification", "text", "p", "B", options)]
    by_task: dict = {}  # the grouping of MLLMU-Bench items by modality and task, tuples as generation items
    for index, item in enumerate(mixed):
        by_task.setdefault((item.modality, getattr(item, "task", "generation")), []).append(index)
    assert models.batches(mixed, 2) == [group[i: i + 2] for group in by_task.values() for i in range(0, len(group), 2)]
    assert items[0].prompt == "Who?" and QAItem("s", "generation", "text", "Who?", "").prompt != "Who?"


def test_fit_takes_its_lists_by_keyword_and_checks_them(testbed_model):
    model, processor = testbed_model
    question = (None, "Who is this?", "I do not know this person.")
    with pytest.raises(TypeError):
        fit_eraser(model, processor, [question], [question], [question])  # positional lists are easy to swap
    with pytest.raises(TypeError, match="input 0"):
        fit_eraser(model, processor, forget=[("Who is this?", "Nobody")], retain=[question], erasure=[question])
    with pytest.raises(mllmeraser.UserInputError, match="non-empty"):
        fit_eraser(model, processor, forget=[], retain=[question], erasure=[question])


def test_generate_command_answers_as_the_api_does(testbed_dir, testbed_model, tmp_path):
    model, processor = testbed_model
    prompt = "What is the birthplace of this person?"
    image = next(i.image for i in load_split_items(testbed_dir / "data", "forget", 10) if i.modality == "image")
    image.save(tmp_path / "person.png")
    result = subprocess.run([sys.executable, "-m", "mllmeraser.cli", "generate", "--model", str(testbed_dir / "model"),
                             "--image", str(tmp_path / "person.png"), "--prompt", prompt], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (expected,) = answer_items(model, processor, [(image, prompt, "")], progress=False)
    assert result.stdout.strip() == expected
