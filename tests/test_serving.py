"""`mllmeraser serve` through the official OpenAI client, on loopback, on the small testbed with two erasers
fitted for it here (one forget person each, on reduced sets: a few seconds each):

- an image question about a forget person gets the answer `mllmeraser generate --eraser` gives (models.generate
  with the eraser attached, same image and prompt), streamed or not, and another one than vanilla;
- 60 concurrent requests from two tenants bound to different eraser sets each get exactly their single-request
  answer, and the server did batch them;
- bad input gets a 4xx with OpenAI's error body, and the next request is answered;
- the admin endpoints refuse requests without the token; a hot add or remove changes the next answer; an eraser
  fitted for another model, or one that cannot be stacked with the loaded ones, is refused naming why.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from mllmeraser import cli, serve  # noqa: E402
from mllmeraser.bench import data  # noqa: E402
from mllmeraser.core import models  # noqa: E402
from mllmeraser.core.eraser import Eraser  # noqa: E402
from mllmeraser.core.eraser_fitter import fit_eraser  # noqa: E402
from mllmeraser.core.settings import FitSettings, PGDSettings  # noqa: E402
from mllmeraser.core.inputs import as_items  # noqa: E402


PEOPLE = {"p1": "F0001", "p2": "F0006"}  # eraser name -> the forget person it erases
TENANTS = {"key-a": ["p1"], "key-b": ["p1", "p2"]}
ADMIN = "admin-secret"
MODEL = "testbed"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def erasers(testbed_model, testbed_data, tmp_path_factory):
    """Two one-person erasers, saved as <name>.safetensors in one directory: (directory, {name: Eraser})."""
    model, processor = testbed_model
    rng = random.Random(0)
    forget = data.load_split_items(testbed_data, "forget", 10)
    retain = rng.sample(list(data.retained_inputs(testbed_data, 10)), 300)
    erasure = rng.sample(list(data.default_erasure_items(testbed_data)), 60)
    calibration = rng.sample(list(data.validation_items(testbed_data, 10)), 80)
    directory = tmp_path_factory.mktemp("erasers")
    fitted = {}
    for name, person in PEOPLE.items():
        torch.manual_seed(0)
        fitted[name] = fit_eraser(model, processor, forget=[i for i in forget if i.subject_id == person],
                                  retain=retain, erasure=erasure, calibration=calibration, request=person,
                                  settings=FitSettings(pgd=PGDSettings(steps=2)), progress=False)
        fitted[name].save(directory / f"{name}.safetensors")
    return directory, fitted


@pytest.fixture(scope="module")
def questions(testbed_data):
    """(image or None, prompt) pairs: each forget person's image and text generation questions, and a retain
    person's image question."""
    forget = data.load_split_items(testbed_data, "forget", 10)
    retain = data.load_split_items(testbed_data, "retain", 10)
    chosen = []
    for person in PEOPLE.values():
        mine = [i for i in forget if i.subject_id == person and i.task == "generation"]
        chosen += [next(i for i in mine if i.modality == "image"), next(i for i in mine if i.modality == "text")]
    chosen.append(next(i for i in retain if i.task == "generation" and i.modality == "image"))
    return [(item.image if item.modality == "image" else None, item.prompt) for item in chosen]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(image, prompt: str) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else [])
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def reference(testbed_model, eraser: Eraser | None, image, prompt: str) -> str:
    """What `mllmeraser generate [--eraser]` answers: models.generate on the plain input, alone."""
    model, processor = testbed_model
    with cli.attached(model, eraser):
        (answer,) = models.generate(model, processor, as_items([(image, prompt, "")]), MAX_TOKENS)
    return answer


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(base: str, key: str, image, prompt: str, **options) -> str:
    response = client(base, key).chat.completions.create(model=MODEL, messages=messages(image, prompt),
                                                         max_tokens=MAX_TOKENS, **options)
    return response.choices[0].message.content


def app_for(testbed_dir, erasers, tenants=None, names=None, **settings):
    """A fresh app on its own copy of the testbed model (the shared fixture stays free for the references)."""
    model, processor = models.load_model(testbed_dir / "model")
    chosen = {name: e for name, e in erasers[1].items() if names is None or name in names}
    registry = serve.Registry(chosen, model, tenants)
    return serve.create_app(model, processor, registry, serve.ServeSettings(model_name=MODEL, admin_token=ADMIN,
                                                                            **settings))


@pytest.fixture(scope="module")
def tenant_server(testbed_dir, erasers):
    app = app_for(testbed_dir, erasers, TENANTS, max_batch=16, max_wait=0.05)
    with serve.serving(app) as base:
        yield base, app


@pytest.mark.slow
def test_an_image_question_is_answered_as_generate_with_the_eraser(testbed_model, erasers, questions, tenant_server):
    base, _ = tenant_server
    image, prompt = questions[2]  # p2's person, image question
    with_eraser = reference(testbed_model, erasers[1]["p2"], image, prompt)
    vanilla = reference(testbed_model, None, image, prompt)
    assert with_eraser != vanilla
    assert ask(base, "key-b", image, prompt) == with_eraser  # key-b is bound to p1 and p2
    assert ask(base, "key-a", image, prompt) == vanilla  # key-a only to p1: this person is not erased for it
    stream = client(base, "key-b").chat.completions.create(model=MODEL, messages=messages(image, prompt),
                                                           max_tokens=MAX_TOKENS, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == with_eraser
    # a request may add an eraser its key is not bound to, never drop one
    assert ask(base, "key-a", image, prompt, extra_body={"erasers": ["p2"]}) == with_eraser


@pytest.mark.slow
def test_sixty_concurrent_requests_each_get_their_single_request_answer(testbed_model, erasers, questions,
                                                                         tenant_server):
    base, app = tenant_server
    sets = {key: [erasers[1][name] for name in names] for key, names in TENANTS.items()}
    expected = {(key, index): reference(testbed_model, serve.policy.combine(sets[key]), *questions[index])
                for key in TENANTS for index in range(len(questions))}
    assert expected["key-a", 2] != expected["key-b", 2]  # the two sets answer p2's person differently
    jobs = [(("key-a", "key-b")[n % 2], (n // 2) % len(questions)) for n in range(60)]
    before = len(app.state.engine.batches)
    with ThreadPoolExecutor(max_workers=60) as pool:
        answers = list(pool.map(lambda job: ask(base, job[0], *questions[job[1]]), jobs))
    assert answers == [expected[job] for job in jobs]
    assert max(app.state.engine.batches[before:]) > 1  # rows of both tenants shared forward passes


def _error_of(exc: openai.APIStatusError) -> dict:
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.slow
def test_bad_input_is_a_4xx_and_the_server_stays_up(questions, tenant_server):
    base, _ = tenant_server
    image, prompt = questions[0]
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()}},
        {"type": "text", "text": prompt}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client(base, "key-a").chat.completions.create(model=MODEL, messages=bad, max_tokens=MAX_TOKENS)
    assert _error_of(caught.value)["code"] == "invalid_image"
    cases = [  # (request options, status, code)
        ({"messages": messages(image, prompt), "max_tokens": 0}, 400, "invalid_value"),
        ({"messages": messages(image, prompt), "max_tokens": 10**6}, 400, "invalid_value"),
        ({"messages": messages(None, "x" * 40_000)}, 400, "prompt_too_long"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "http://example.com/a.png"}}]}]}, 400, "unsupported_image_url"),
        ({"messages": messages(None, prompt), "extra_body": {"erasers": ["nope"]}}, 400, "unknown_eraser"),
    ]
    for options, status, code in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            client(base, "key-a").chat.completions.create(model=MODEL, **options)
        assert caught.value.status_code == status and _error_of(caught.value)["code"] == code, options
    with pytest.raises(openai.AuthenticationError) as caught:
        client(base, "key-unknown").chat.completions.create(model=MODEL, messages=messages(None, prompt))
    assert _error_of(caught.value)["code"] == "invalid_api_key"
    raw = httpx.post(base + "/v1/chat/completions", content=b'{"model": "testbed", "messages": [',
                     headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    too_big = httpx.post(base + "/v1/chat/completions", content=b"{" + b" " * (serve.Limits().max_body_bytes + 1) + b"}",
                         headers={"Authorization": "Bearer key-a", "Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert [m.id for m in client(base).models.list()] == [MODEL]
    assert ask(base, "key-a", image, prompt)  # still answering


@pytest.mark.slow
def test_sampling_is_seeded_per_request(questions, tenant_server):
    base, _ = tenant_server
    image, prompt = questions[4]
    first = ask(base, "key-a", image, prompt, temperature=1.5, seed=7)
    assert ask(base, "key-a", image, prompt, temperature=1.5, seed=7) == first
    assert {ask(base, "key-a", image, prompt, temperature=1.5, seed=s) for s in range(4)} != {first}


@pytest.mark.slow
def test_admin_needs_the_token_and_hot_changes_apply_to_the_next_request(testbed_model, testbed_dir, erasers,
                                                                         questions, tmp_path):
    directory, fitted = erasers
    image, prompt = questions[2]  # p2's person
    vanilla = reference(testbed_model, None, image, prompt)
    erased = reference(testbed_model, fitted["p2"], image, prompt)
    with serve.serving(app_for(testbed_dir, erasers, names={"p1"})) as base:  # no tenants: every eraser applies
        upload = (directory / "p2.safetensors").read_bytes()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            post = httpx.post(base + "/admin/erasers", files={"file": ("p2.safetensors", upload)}, headers=headers)
            delete = httpx.delete(base + "/admin/erasers/p1", headers=headers)
            assert post.status_code == delete.status_code == 401
            assert post.json()["error"]["code"] == "invalid_admin_token"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert ask(base, "any", image, prompt) == vanilla
        added = httpx.post(base + "/admin/erasers", files={"file": ("upload.safetensors", upload)},
                           data={"name": "p2"}, headers=admin)
        assert added.status_code == 201, added.text
        assert ask(base, "any", image, prompt) == erased
        assert httpx.delete(base + "/admin/erasers/p2", headers=admin).status_code == 200
        assert ask(base, "any", image, prompt) == vanilla
        assert httpx.post(base + "/admin/erasers", json={"name": "p2", "path": str(directory / "p2.safetensors")},
                          headers=admin).status_code == 201  # a server-side path
        assert ask(base, "any", image, prompt) == erased
        # another model's eraser: refused, naming the fingerprint key that differs
        other = dataclasses.replace(fitted["p2"], metadata={**fitted["p2"].metadata, "fingerprint": {
            **fitted["p2"].fingerprint, "weights_sha256": "0" * 16}})
        other.save(tmp_path / "other.safetensors")
        refused = httpx.post(base + "/admin/erasers", json={"name": "other", "path": str(tmp_path / "other.safetensors")},
                             headers=admin)
        assert refused.status_code == 400 and "weights_sha256" in refused.json()["error"]["message"]
        # a paper-gated eraser cannot share the attachment with prompt-gated ones
        base_eraser = fitted["p2"]
        paper = Eraser(u=torch.randn_like(base_eraser.r), r=base_eraser.r, alpha=1.0,
                       layer_indices=base_eraser.layer_indices, layers_path=base_eraser.layers_path,
                       hidden_size=base_eraser.hidden_size, metadata={"fingerprint": base_eraser.fingerprint})
        paper.save(tmp_path / "paper.safetensors")
        mixed = httpx.post(base + "/admin/erasers", files={"file": ("paper.safetensors",
                                                                     (tmp_path / "paper.safetensors").read_bytes())},
                           headers=admin)
        assert mixed.status_code == 400 and mixed.json()["error"]["code"] == "incompatible_eraser"
        garbage = httpx.post(base + "/admin/erasers", files={"file": ("x.safetensors", b"\x00" * 64)}, headers=admin)
        assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_eraser"
        assert [e["name"] for e in httpx.get(base + "/admin/erasers", headers=admin).json()["erasers"]] == ["p1", "p2"]
        assert httpx.get(base + "/health").json()["erasers"] == 2  # a count: names stay with the admin
        assert ask(base, "any", image, prompt) == erased


@pytest.mark.slow
def test_a_tenants_file_naming_an_unknown_eraser_stops_the_server_before_it_loads(erasers, tmp_path, capsys):
    directory, _ = erasers
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"key-a": ["p1", "missing"]}))
    code = cli.main(["serve", "--model", str(tmp_path / "no-model-here"), "--erasers", str(directory),
                     "--tenants", str(tenants)])
    error = capsys.readouterr().err
    assert code == 2 and str(tenants) in error and "missing" in error


@pytest.mark.parametrize("gate", ["paper", "prompt"])
def test_row_terms_give_each_row_its_own_terms_in_one_forward(gate, testbed_model, erasers, questions):
    """SteeringHandle.row_terms on a 2-term eraser: each row of one batch (and each of generate's expanded rows)
    gets what it gets alone with only its own term attached; the paper gate on a random-weight LLaVA, the
    prompt gate on the testbed."""
    if gate == "paper":
        import tiny_families
        from mllmeraser.core.decoder_layers import find_decoder_layers

        model = tiny_families.random_llava()
        names, layers = find_decoder_layers(model)
        generator = torch.Generator().manual_seed(0)
        u, r = (torch.randn(2, len(layers), 64, generator=generator) * 5 for _ in range(2))
        both = Eraser(u=u, r=r, alpha=10.0, layer_indices=range(len(layers)), layers_path=names[0].rsplit(".", 1)[0],
                      hidden_size=64)
        batch = {"input_ids": torch.tensor([[5, 17, 33, 9, 41, 77, 12], [0, 0, 0, 8, 60, 23, 90]])}
        batch["attention_mask"] = (batch["input_ids"] != 0).long()
        rows = [{k: v[i: i + 1, v.shape[1] - int(batch["attention_mask"][i].sum()):] for k, v in batch.items()}
                for i in range(2)]
    else:
        model, processor = testbed_model
        both = Eraser.concat([erasers[1]["p1"], erasers[1]["p2"]])
        items = as_items([(None, questions[1][1], ""), (None, questions[3][1], "")])  # p1's, then p2's person
        batch = models.to_device(models.encode_prompts(processor, items), model)
        rows = [models.to_device(models.encode_prompts(processor, [item]), model) for item in items]
    # paper: row 0 gets term 0, row 1 term 1; prompt: each person's row gets the *other* person's eraser, so a
    # mask that did nothing (both terms on every row) would erase both rows and differ from alone
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]] if gate == "paper" else [[0.0, 1.0], [1.0, 0.0]])
    beams = {"do_sample": False, "num_beams": 2, "num_return_sequences": 2}  # generate expands each prompt's rows
    with torch.no_grad():
        handle = both.attach(model, check_fingerprint=False)
        try:
            handle.row_terms = mask
            batched = model(**models.forward_inputs(model, dict(batch))).logits[:, -1]
            tokens = model.generate(**batch, max_new_tokens=4, **beams)[:, -4:]
        finally:
            handle.remove()
        for row in range(2):
            with both.drop(int(mask[row].argmin())).attach(model, check_fingerprint=False):
                alone = model(**models.forward_inputs(model, dict(rows[row]))).logits[:, -1]
                alone_tokens = model.generate(**rows[row], max_new_tokens=4, **beams)[:, -4:]
            torch.testing.assert_close(batched[row: row + 1], alone, rtol=0, atol=1e-4)
            assert torch.equal(tokens[2 * row: 2 * row + 2], alone_tokens)


@pytest.mark.slow
def test_the_serve_command_answers_and_shuts_down_cleanly(testbed_model, testbed_dir, testbed_data, erasers, questions,
                                                         tmp_path):
    """`mllmeraser serve` as a user starts it: a subprocess on a free loopback port; an answer as generate gives; with
    --data it builds the model cache at start-up and fits a request, saved to --erasers; SIGINT stops it with exit
    status 0."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    directory = shutil.copytree(erasers[0], tmp_path / "erasers")  # the server writes the fitted request here

    with socket.socket() as probe:  # a port free a moment ago (the in-process tests bind theirs race-free)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps(TENANTS))
    process = subprocess.Popen([sys.executable, "-m", "mllmeraser.cli", "serve", "--model", str(testbed_dir / "model"),
                                "--erasers", str(directory), "--tenants", str(tenants), "--port", str(port),
                                "--model-name", MODEL, "--data", str(testbed_data), "--cache-dir",
                                str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MLLMERASER_ADMIN_TOKEN": ADMIN})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        image, prompt = questions[2]
        assert ask(base, "key-b", image, prompt) == reference(testbed_model, erasers[1]["p2"], image, prompt)
        assert httpx.get(base + "/admin/erasers", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        fitted = httpx.post(base + "/admin/requests", json={"name": "p4", "forget": "forget", "tenants": ["key-a"]},
                            headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
        assert fitted.status_code == 201, fitted.text
        assert fitted.json()["model_cache"] == "built" and fitted.json()["saved"] == str(directory / "p4.safetensors")
        assert Eraser.load(directory / "p4.safetensors").requests()[0]["name"] == "p4"
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    output = process.stdout.read()
    assert code == 0, process.stderr.read()
    assert "fitting deletion requests (POST /admin/requests); model cache: built at" in output


# ---- one index over every request, and requests fitted by the server ------------------------------------------

def test_steering_holds_every_knn_request_in_one_index_and_changes_only_what_changed(testbed_model, erasers):
    """Erasers fitted on one retain bank join one RequestIndex, attached once: adding one leaves the others'
    slots as they were, removing one frees its slots for the next; a gate of another kind stacks instead."""
    model, _ = testbed_model
    fitted = erasers[1]
    steering = serve.Steering(model)
    try:
        steering.apply(serve.policy.Snapshot(1, {"p1": fitted["p1"]}))
        assert steering.kind == "index" and steering.terms == {"p1": (0,)}
        index, handle = steering.index, steering.handle
        steering.apply(serve.policy.Snapshot(2, {"p1": fitted["p1"], "p2": fitted["p2"]}))
        assert steering.index is index and steering.handle is handle  # no rebuild, no re-attach
        assert steering.terms == {"p1": (0,), "p2": (1,)} and index.names() == ["p1", "p2"]
        steering.apply(serve.policy.Snapshot(3, {"p2": fitted["p2"]}))
        assert index.names() == ["p2"] and steering.terms == {"p2": (1,)}
        steering.apply(serve.policy.Snapshot(4, {"p2": fitted["p2"], "p3": fitted["p1"]}))
        assert steering.terms == {"p2": (1,), "p3": (0,)} and steering.width == index.capacity["slots"]
        # the index's decisions are the stacked eraser's, term by term
        z = torch.randn(5, fitted["p1"].hidden_size)
        stacked = Eraser.concat([fitted["p2"], fitted["p1"]]).prompt_gate
        torch.testing.assert_close(index.decide(z)[:, [1, 0]], stacked.decide(z))
        base = fitted["p2"]
        paper = Eraser(u=torch.randn_like(base.r), r=base.r, alpha=1.0, layer_indices=base.layer_indices,
                       layers_path=base.layers_path, hidden_size=base.hidden_size)
        steering.apply(serve.policy.Snapshot(5, {"a": paper, "b": paper}))
        assert steering.kind == "stacked" and steering.terms == {"a": (0,), "b": (1,)} and steering.width == 2
        steering.apply(serve.policy.Snapshot(6, {}))
        assert steering.kind == "none" and steering.handle is None
    finally:
        steering.detach()


@pytest.mark.slow
def test_the_server_fits_a_request_from_the_model_cache(testbed_model, testbed_dir, testbed_data, erasers, tmp_path):
    """POST /admin/requests fits on the served model with the model cache's statistics: the eraser is the one
    fit_eraser gives with the same cache, bit for bit; it is saved to --erasers, joins the index, and the next
    answer about that person is the eraser's. A second server finds the cache on disk."""
    person = "F0023"  # a forget person neither fixture eraser erases
    forget = [i for i in data.load_split_items(testbed_data, "forget", 10)
              if i.subject_id == person and i.task == "generation"]
    body = [{"question": i.prompt, "answer": i.answer, "image": data_url(i.image) if i.modality == "image" else None}
            for i in forget]
    plain = [(i.image if i.modality == "image" else None, i.prompt, i.answer) for i in forget]
    model, processor = models.load_model(testbed_dir / "model")
    cache_dir, save_dir = tmp_path / "cache", tmp_path / "erasers"
    save_dir.mkdir()
    fitter = serve.RequestFitter.from_data(model, processor, testbed_data, cache_dir=cache_dir, save_dir=save_dir,
                                           progress=False)
    assert fitter.shared.status == "built"
    app = serve.create_app(model, processor, serve.Registry(dict(erasers[1]), model),
                           serve.ServeSettings(model_name=MODEL, admin_token=ADMIN), fitter)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    image, prompt = plain[0][0], plain[0][1]
    vanilla = reference(testbed_model, None, image, prompt)
    with serve.serving(app) as base:
        assert ask(base, "any", image, prompt) == vanilla
        fitted = httpx.post(base + "/admin/requests", json={"name": "p3", "forget": body}, headers=admin, timeout=300)
        assert fitted.status_code == 201, fitted.text
        record = fitted.json()
        assert record["terms"] == 1 and record["model_cache"] == "built" and record["forget_questions"] == len(body)
        assert "forget (PGD recall, gate features)" in record["stages"] and record["erasers"] == ["p1", "p2", "p3"]
        assert app.state.engine.steering.kind == "index"
        served = Eraser.load(record["saved"])
        expected = fit_eraser(testbed_model[0], testbed_model[1], forget=plain, settings=fitter.settings,
                              shared=fitter.shared, request="p3", progress=False)
        assert torch.equal(served.r, expected.r)
        assert all(torch.equal(a, b) for a, b in zip(served.prompt_gate.tensors().values(),
                                                      expected.prompt_gate.tensors().values()))
        erased = reference(testbed_model, expected, image, prompt)
        assert erased != vanilla and ask(base, "any", image, prompt) == erased
        # refused before any fit: a taken name, a missing split, a malformed entry
        taken = httpx.post(base + "/admin/requests", json={"name": "p3", "forget": body}, headers=admin)
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
        missing = httpx.post(base + "/admin/requests", json={"name": "p4", "forget": "no_such_split"}, headers=admin)
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_forget"
        malformed = httpx.post(base + "/admin/requests", json={"name": "p4", "forget": [{"question": "q"}]},
                               headers=admin)
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "forget[0]"
        assert httpx.post(base + "/admin/requests", json={"name": "p4", "forget": body}).status_code == 401
        assert [e["name"] for e in httpx.get(base + "/admin/erasers", headers=admin).json()["erasers"]] == \
            ["p1", "p2", "p3"]
    again = serve.RequestFitter.from_data(model, processor, testbed_data, cache_dir=cache_dir, progress=False)
    assert again.shared.status == "loaded" and again.shared.key == fitter.shared.key
    with serve.serving(serve.create_app(model, processor, serve.Registry({}, model),
                                        serve.ServeSettings(model_name=MODEL, admin_token=ADMIN))) as base:
        off = httpx.post(base + "/admin/requests", json={"name": "p3", "forget": body}, headers=admin)
        assert off.status_code == 400 and off.json()["error"]["code"] == "fitting_disabled"
