"""The top-level API on the shared small testbed: the README's example as written, plain tuples fitting exactly
as the items they stand for, and `mllmeraser generate` answering as the API does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mllmeraser
from mllmeraser import Eraser, FitSettings, PGDSettings, QAItem, answer_items, load_split_items

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
    from_tuples = Eraser.fit(model, processor, **tuples, settings=settings, progress=False)
    from_items = Eraser.fit(model, processor, **items, settings=settings, progress=False)
    mixed = Eraser.fit(model, processor, forget=items["forget"][:4] + tuples["forget"][4:], retain=tuples["retain"],
                       erasure=items["erasure"], settings=settings, progress=False)
    for other in (from_items, mixed):
        assert torch.equal(from_tuples.r, other.r)
        ours, theirs = from_tuples.prompt_gate.tensors(), other.prompt_gate.tensors()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert from_tuples.header() == other.header()
    assert answer_items(model, processor, tuples["forget"], progress=False) == \
        answer_items(model, processor, items["forget"], progress=False)


def test_fit_takes_its_lists_by_keyword_and_checks_them(testbed_model):
    model, processor = testbed_model
    question = (None, "Who is this?", "I do not know this person.")
    with pytest.raises(TypeError):
        Eraser.fit(model, processor, [question], [question], [question])  # positional lists are easy to swap
    with pytest.raises(TypeError, match="input 0"):
        Eraser.fit(model, processor, forget=[("Who is this?", "Nobody")], retain=[question], erasure=[question])
    with pytest.raises(mllmeraser.UserInputError, match="non-empty"):
        Eraser.fit(model, processor, forget=[], retain=[question], erasure=[question])


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
