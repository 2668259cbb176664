"""The attack suite on the small testbed: each transformation does what it says, the table's numbers are a
direct evaluation of the transformed questions, and the eraser is measured under rephrasing and photo attacks."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from mllmeraser import FitSettings, KnnGate, cli, fit_eraser
from mllmeraser.bench import attack_scoring, attack_set, attack_summary, attacks, data, evaluate
from mllmeraser.core import models
from mllmeraser.bench.items import QAItem
from mllmeraser.core.inputs import EDGES, EncodedImage, OccludedImage, occluded_copies


@pytest.fixture(scope="module")
def attacked(testbed_data):
    return attack_set.attack_set(testbed_data, 10, retain_people=2)


@pytest.fixture(scope="module")
def sources(testbed_data):
    return evaluate.report_items(testbed_data, 10, ("forget", "test"))


def _pairs(attacked, sources, name):
    """(original, attacked) pairs: the attack re-applied to its source questions, None dropped."""
    attack = attacks.BY_NAME[name]
    return [(item, new) for item in sources["test" if attack.new_photos else "forget"]
            if (new := attack.transform(item, attacked.context)) is not None]


def test_every_attack_has_forget_and_retain_questions(attacked):
    assert set(attacked.items) == set(attacks.BY_NAME)
    for name, splits in attacked.items.items():
        assert splits["forget"] and splits["retain"], name


def test_rephrasing_rewords_every_question_it_applies_to(attacked, sources):
    pairs = _pairs(attacked, sources, "rephrase")
    assert len(pairs) >= 0.9 * len(sources["forget"])
    for item, new in pairs:
        assert new.question != item.question and new.answer == item.answer and new.task == item.task
    assert {new.question for _, new in pairs} & {"In which city was this person born?", "Who is this person?"}


def test_paraphrase_map_replaces_the_templates():
    item = QAItem("F1", "generation", "text", "Where was Ada born?", "Ada was born in Lima.")
    ctx = attacks.Context({"F1": "Ada"}, {}, paraphrases={"Where was Ada born?": "What is Ada's birthplace?"})
    assert attacks.rephrase(item, ctx).question == "What is Ada's birthplace?"
    assert attacks.rephrase(item, attacks.Context({}, {}, paraphrases={})) is None


def test_photo_attacks_perturb_the_new_photos(attacked, sources):
    test_items = sources["test"]
    forget_ids = {i.subject_id for i in attacked.items["rephrase"]["forget"]}
    for item, new in _pairs(attacked, sources, "photo-as-is")[:3]:
        assert new is item and item.subject_id in forget_ids
    for kind in ("blur", "rotate", "jpeg", "lighting", "crop"):
        item, new = _pairs(attacked, sources, f"photo-{kind}")[0]
        before, after = np.asarray(item.image, dtype=float), np.asarray(new.image, dtype=float)
        assert before.shape == after.shape and np.abs(before - after).mean() > 0.5, kind
    assert len(attacked.items["photo-blur"]["forget"]) == len([i for i in test_items if i.subject_id in forget_ids
                                                              and i.modality == "image"])


def test_cross_modal_attacks(attacked, sources):
    names = attacked.context.names
    for item, new in _pairs(attacked, sources, "name-text-only"):
        assert item.modality == "image" and new.modality == "text" and new.image is None
        assert names[item.subject_id] in new.question and "this person" not in new.question.lower()
    for item, new in _pairs(attacked, sources, "name-with-image")[:5]:
        assert new.modality == "image" and new.image is not None and names[item.subject_id] in new.question
    for item, new in _pairs(attacked, sources, "unrelated-image")[:5]:
        assert item.modality == "text" and new.modality == "image" and new.question == item.question


def test_multi_turn_names_the_person_only_in_the_earlier_turn(attacked, sources, testbed_model):
    _, processor = testbed_model
    pairs = _pairs(attacked, sources, "multi-turn")
    assert pairs
    for item, new in pairs:
        name = attacked.context.names[item.subject_id]
        assert name in item.question and name not in new.question and "this person" in new.question.lower()
        text = models.chat_text(processor, new.prompt, False, new.history, new.prefill)
        earlier, last = text.rsplit("USER:", 1)
        assert name in earlier and name not in last


def test_prefill_ends_the_prompt_with_the_answers_first_words(attacked, sources, testbed_model):
    _, processor = testbed_model
    for item, new in _pairs(attacked, sources, "prefill"):
        text = models.chat_text(processor, new.prompt, new.modality == "image", new.history, new.prefill)
        assert text.endswith(new.prefill) and text.removesuffix(new.prefill).rstrip().endswith("ASSISTANT:")
        if item.task == "generation":
            assert new.prefill.split()[0] == item.answer.split()[0] and item.answer.startswith(new.prefill)
            assert new.prefill != item.answer
    assert attack_scoring.shown_answer(new, "Lima.").startswith(new.prefill) or new.task == "classification"


def test_context_and_prompt_attacks_keep_the_question(attacked, sources):
    for name, marker in (("long-prefix", attacks.BENIGN_PREFIX), ("role-play", attacks.ROLE_PLAY),
                         ("ignore-instructions", attacks.IGNORE), ("other-format", attacks.OTHER_FORMAT)):
        for item, new in _pairs(attacked, sources, name)[:5]:
            assert new.verbatim and item.prompt in new.prompt and marker in new.prompt, name
    for item, new in _pairs(attacked, sources, "mixed-prompt")[:5]:
        assert new.prompt.endswith(item.prompt) and new.prompt.count("?") >= item.prompt.count("?") + 2
    for item, new in _pairs(attacked, sources, "fact-in-context"):
        stated = new.prompt[: -len(item.prompt)]
        answer = item.options[item.answer] if item.task == "classification" else item.answer
        assert stated.strip() and answer.split()[-1].strip(".") not in stated


def test_typographic_images_hold_rendered_text(attacked, sources):
    for item, new in _pairs(attacked, sources, "typo-name")[:3]:
        after = np.asarray(new.image)
        before = np.asarray(item.image.resize(new.image.size, Image.BICUBIC))
        band = after[:24].sum(axis=2)
        assert (band < 150).sum() > 30 and (band > 700).sum() > 1000  # black text on a white band
        assert np.array_equal(before[60:], after[60:])  # the face below the band is untouched
    item, new = _pairs(attacked, sources, "typo-question")[0]
    pixels = np.asarray(new.image).sum(axis=2)
    assert item.modality == "text" and new.modality == "image" and new.question == attacks.TYPO_QUESTION
    assert (pixels < 150).sum() > 30
    assert np.asarray(attacks.draw_text(None, "")).min() == 255  # no text, no dark pixels


def test_table_equals_a_direct_evaluation(attacked, sources, testbed_model):
    model, processor = testbed_model
    chosen = {"rephrase": {s: [i for i in v if i.task == "classification"][:12]
                           for s, v in attacked.items["rephrase"].items()},
              "prefill": {s: v[-6:] for s, v in attacked.items["prefill"].items()}}
    table = attack_scoring.score_attacks(model, processor, chosen)
    items = chosen["rephrase"]["forget"]
    direct = evaluate.score_items(model, processor, items, progress=False)
    values = [direct[k] * sum(i.modality == k.split("_")[1] for i in items)
              for k in ("classification_image", "classification_text") if k in direct]
    assert table["rephrase"]["forget"]["classification"] == pytest.approx(sum(values) / len(items))
    assert table["rephrase"]["forget"]["n"] == len(items)
    gen = chosen["prefill"]["forget"]
    answers = models.answer_items(model, processor, gen, progress=False)
    shown = [f"{i.prefill} {a}" for i, a in zip(gen, answers)]
    expected = evaluate.aggregate({k.rsplit("_", 1)[0]: v for k, v in evaluate.item_scores(i, s).items()
                                   if k.startswith("rougeL")} for i, s in zip(gen, shown))
    assert table["prefill"]["forget"]["rougeL"] == pytest.approx(expected["rougeL"])


def test_eraser_under_rephrasing_and_photo_attacks(attacked, sources, testbed_model, default_eraser, bar):
    model, processor = testbed_model
    chosen = {name: attacked.items[name] for name in ("rephrase", "photo-as-is", "photo-blur", "photo-jpeg")}
    vanilla = attack_scoring.score_attacks(model, processor, chosen)
    with default_eraser.attach(model):
        erased = attack_scoring.score_attacks(model, processor, chosen)
    rows = attack_scoring.verdicts(vanilla, erased)
    for name in chosen:
        assert vanilla[name]["forget"]["classification"] >= erased[name]["forget"]["classification"], name
        if vanilla[name]["retain"]["classification"]:
            bar(f"{name}: erased/vanilla retain classification",
                erased[name]["retain"]["classification"] / vanilla[name]["retain"]["classification"], at_least=0.95)
    bar("photo-as-is: vanilla forget classification", vanilla["photo-as-is"]["forget"]["classification"], at_least=0.8)
    # 0.00-0.25 over the builds measured: the new photos the gate misses (see the Test_Set bar)
    bar("photo-as-is: erased forget classification", erased["photo-as-is"]["forget"]["classification"], at_most=0.3)
    assert rows["photo-as-is"]["counted"] == (vanilla["photo-as-is"]["forget"]["classification"] >= 0.8)
    assert rows["photo-as-is"]["forget_met"] == (erased["photo-as-is"]["forget"]["classification"] <= 0.2)
    assert attack_scoring.worst_recovered(rows)[1] == max(r["recovered"] for r in rows.values() if r["counted"])


def test_occluded_copies_cover_one_edge_each_and_stay_encoded():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 200, size=(40, 32, 3), dtype=np.uint8))  # no white pixel anywhere
    encoded = io.BytesIO()
    photo.save(encoded, format="PNG")
    held = EncodedImage(encoded.getvalue(), "photo.png", "item 0")
    items = [QAItem("a", "cloze", "image", "Q?", "A", image=held), QAItem("a", "cloze", "text", "Q?", "A"),
             QAItem("b", "cloze", "image", "Q?", "A", image=photo)]
    copies = occluded_copies(items, 0.15)
    assert len(copies) == 2 * len(EDGES) and occluded_copies(items, 0.0) == []
    assert isinstance(copies[0].image_source, OccludedImage) and copies[0].image_source.source is held
    before = np.asarray(photo)
    for copy, edge in zip(copies[:4], EDGES):
        after = np.asarray(copy.image)
        white = (after == 255).all(axis=2)
        rows, cols = round(40 * 0.15), round(32 * 0.15)  # 6 of 40 rows, 5 of 32 columns
        band = {"top": np.s_[:rows], "bottom": np.s_[-rows:], "left": np.s_[:, :cols], "right": np.s_[:, -cols:]}[edge]
        assert white[band].all() and white.sum() == white[band].size, edge
        untouched = ~white
        assert np.array_equal(after[untouched], before[untouched]), edge
    assert np.array_equal(np.asarray(copies[4].image), np.asarray(copies[0].image))  # PIL and encoded alike
    with pytest.raises(ValueError, match="edge"):
        OccludedImage(photo, "middle", 0.1)


def test_occluded_copies_in_the_banks_keep_the_gate_on_over_covered_photos(testbed_model, testbed_data, default_eraser,
                                                                         bar):
    """Photos with an edge covered by a band wider than the banks' copies (0.20 of the side, not 0.15; each
    photo one edge, in turn): the copies make the gate fire on far more of the forget people's, and on the validation people's (covered, in no bank) it stays within max_fpr either way. (The
    typographic attack itself is measured on the full testbed, where vanilla still knows the covered faces;
    the small model does not: typo-name forget classification 0.45.)"""
    model, processor = testbed_model
    forget, validation = data.load_split_items(testbed_data, "forget", 10), data.validation_items(testbed_data, 10)
    occluded = fit_eraser(model, processor, forget=forget, retain=data.retained_inputs(testbed_data, 10),
                          erasure=data.default_erasure_items(testbed_data), calibration=validation,
                          settings=FitSettings(occlusion=0.15), progress=False)
    plain = default_eraser  # the default: occlusion off
    counts = occluded.requests()[0]["counts"]
    assert counts["forget_occluded"] == len(EDGES) * sum(i.modality == "image" for i in forget)
    assert "forget_occluded" not in plain.requests()[0]["counts"] and FitSettings().occlusion == 0.0

    def covered(items):
        photos = [i for i in items if i.modality == "image"]
        return [replace(i, image=OccludedImage(i.image_source, EDGES[n % len(EDGES)], 0.2))
                for n, i in enumerate(photos)]

    rates = {}
    for name, fitted in (("plain", plain), ("occluded", occluded)):
        scores = evaluate.gate_scores(model, processor, fitted, {"forget": covered(forget),
                                                                  "validation": covered(validation)})
        rates[name] = {split: evaluate.fire_rate(s, fitted) for split, s in scores.items()}
    # What the copies add is the claim; the absolute rates are the build's (plain 0.37-0.62, with the copies
    # 0.68-1.00 over the builds measured)
    bar("covered photos: fire rate gain from the copies", rates["occluded"]["forget"] - rates["plain"]["forget"],
        at_least=0.25)
    bar("covered photos: occluded gate fire rate, forget", rates["occluded"]["forget"], at_least=0.6)
    for name, rate in rates.items():
        bar(f"covered photos: {name} gate fire rate, validation", rate["validation"], at_most=KnnGate().max_fpr)


def test_report_attack_table_and_plot(tmp_path):
    from mllmeraser.bench import compare, report
    assert compare.CompareSettings().attacks is False  # off by default: demo's time is unchanged
    metrics = lambda f, r: {"forget": {"classification": f, "n": 4.0}, "retain": {"classification": r, "n": 4.0}}  # noqa: E731
    results = {"vanilla": {"rephrase": metrics(0.9, 1.0), "long-prefix": metrics(0.5, 1.0)},
               "eraser": {"rephrase": metrics(0.25, 0.9), "long-prefix": metrics(0.5, 1.0)},
               "ga": {"rephrase": metrics(0.75, 1.0), "long-prefix": metrics(0.25, 1.0)}}
    suite = attack_scoring.judge(results)
    assert suite["verdicts"]["eraser"]["rephrase"] == {"counted": True, "recovered": 0.25, "retain_ratio": 0.9,
                                                       "forget_met": False, "retain_met": False}
    assert suite["verdicts"]["eraser"]["long-prefix"]["counted"] is False
    assert suite["worst"] == {"eraser": ("rephrase", 0.25), "ga": ("rephrase", 0.75)}
    header, rows = report.attack_rows({"attacks": suite})
    assert header[:3] == ["attack", "vanilla forget cls", "vanilla retain cls"]
    assert rows == [["rephrase", "0.900", "1.000", "0.250", "0.900", "0.750", "1.000"],
                    ["long-prefix (not counted)", "0.500", "1.000", "0.500", "1.000", "0.250", "1.000"]]
    report._plot_attacks({"attacks": suite}, tmp_path / report.ATTACK_PLOT)
    assert (tmp_path / report.ATTACK_PLOT).stat().st_size > 1000
    table = attack_summary.format_table(results)
    assert "rephrase" in table and "(not counted)" in table


def test_tasks_keep_only_those_questions_and_the_same_ones(testbed_data, attacked):
    """attack_set(tasks=...) attacks exactly the questions of those tasks that the whole suite attacks (the
    context, made from every question, is unchanged), so a cheaper run on a large model measures the same cells."""
    narrowed = attack_set.attack_set(testbed_data, 10, retain_people=2, tasks=("classification", "cloze"))
    assert narrowed.context == attacked.context and set(narrowed.items) == set(attacked.items)
    for name, splits in attacked.items.items():
        for split, items in splits.items():
            kept = narrowed.items[name][split]
            assert {i.task for i in kept} <= {"classification", "cloze"}
            assert kept == [i for i in items if i.task in ("classification", "cloze")], (name, split)
    assert sum(len(s["forget"]) for s in narrowed.items.values()) < sum(len(s["forget"]) for s in attacked.items.values())


def test_count_by_cloze_reads_the_verdicts_on_cloze(testbed_dir, default_eraser, tmp_path, capsys):
    """`attack --count-by cloze`: an attack counts where vanilla's forget cloze under it is >= 0.8, and the
    eraser's recovered score is its forget cloze (for a model that knows its facts but not A-D)."""
    eraser = default_eraser.save(tmp_path / "eraser.safetensors")
    out = tmp_path / "attack.json"
    common = ["attack", "--model", str(testbed_dir / "model"), "--data", str(testbed_dir / "data"),
              "--eraser", str(eraser), "--attacks", "rephrase,name-text-only", "--retain-people", "2"]
    assert cli.main(common + ["--tasks", "cloze", "--count-by", "cloze", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["headline"] == "cloze" and summary["label"] == "cloze"
    vanilla, erased = summary["attacks"]["vanilla"], summary["attacks"]["eraser"]
    rows = summary["verdicts"]["eraser"]
    assert set(rows) == {"rephrase", "name-text-only"}
    for name, row in rows.items():
        assert "classification" not in vanilla[name]["forget"]  # only cloze questions were asked
        assert row["counted"] == (vanilla[name]["forget"]["cloze"] >= attack_scoring.COUNTED_FROM), name
        assert row["recovered"] == erased[name]["forget"]["cloze"], name
        assert row["forget_met"] == ((row["recovered"] <= attack_scoring.FORGET_BAR) if row["counted"] else None)
    # the small testbed (seed 0, the AVX-512 build: 0.875 and 0.028) fills the blanks asked by name, not reworded
    assert not rows["rephrase"]["counted"]
    assert f"attacks counted (vanilla forget cloze >= {attack_scoring.COUNTED_FROM})" in printed
    # a flag that reads questions --tasks leaves out, or that CLEAR and --adaptive do not use: one line, exit 2
    assert cli.main(common + ["--tasks", "classification", "--count-by", "cloze"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("mllmeraser: error: --count-by cloze reads cloze questions, which --tasks classification "
                           "leaves out")
    assert cli.main(common + ["--adaptive", "--count-by", "rougeL"]) == 2
    assert "--count-by is the suite's" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one of classification, cloze, rougeL"):
        attack_scoring.mllmu_scoring("bleu")
