"""The server's state store (serve/store.py), its audit log (serve/audit.py), /health, /metrics, and crashes.

- the store: add, delete and bind round-trip through a fresh open; a directory without a manifest is adopted; a
  file the manifest does not name is never served; a damaged manifest is one line naming the file;
- the admin API on a stand-in model writes every acknowledged change through (an upload, a binding, a delete
  survive a restart; an eraser the registry refuses leaves nothing behind);
- the audit log: one fsynced JSON line per event, digests and never tokens or facts; `mllmeraser serve-log`;
- /health is 503 when the batcher thread has died; /metrics is Prometheus text;
- chaos: 50 rounds of a process changing the store at random, SIGKILLed at a random moment, then a fresh open
  must equal the last acknowledged state (or that state with the change in flight applied: a change nobody was
  told about may have landed or not, never half); and a few rounds of the real `mllmeraser serve` (fit, upload,
  bind, delete over HTTP) killed and restarted on the same directory (slow: needs the testbed).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mllmeraser import cli
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.errors import UserInputError
from mllmeraser.serve import audit as audit_log
from mllmeraser.serve.store import DELETED_DIR, MANIFEST_FILE, Store

TOKEN = "admin-secret"


def small_eraser(seed: int, layers=(0, 1), hidden: int = 8, terms: int = 1) -> Eraser:
    """A paper-gated eraser for an 8-wide, 2-layer stand-in model: enough for the store and the registry."""
    generator = torch.Generator().manual_seed(seed)
    u, r = (torch.randn(terms, len(layers), hidden, generator=generator) for _ in range(2))
    return Eraser(u=u, r=r, alpha=1.0, layer_indices=list(layers), layers_path="model.layers", hidden_size=hidden,
                  metadata={"requests": [{"request": f"r{seed}"}] * terms})


def tenants_file(path: Path, tenants: dict) -> Path:
    path.write_text(json.dumps(tenants))
    return path


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


# ---- the store ---------------------------------------------------------------------------------------------

def test_add_delete_and_bind_round_trip_through_a_fresh_open(tmp_path):
    directory = tmp_path / "state"
    store = Store.open(directory, tenants_file(tmp_path / "t.json", {"k1": [], "k2": []}))
    store.add("a", small_eraser(0), "uploaded", ["k1"], TOKEN)
    store.add("b", b"not parsed by the store", "added", [], TOKEN)
    store.add("c", small_eraser(2), "fitted", ["k1", "k2"], TOKEN, forget_sha256="f" * 64)
    store.bind("k2", ["a"], ["c"], TOKEN)
    store.bind("k3", ["b"], [], TOKEN)  # a new key
    store.delete("c", TOKEN)
    expected = {"erasers": ["a", "b"], "tenants": {"k1": ["a"], "k2": ["a"], "k3": ["b"]}}
    assert store.state() == expected
    again = Store.open(directory)
    assert again.state() == expected and not again.adopted and again.strays == []
    assert files_in(directory) == ["a.safetensors", "b.safetensors"]
    (moved,) = (directory / DELETED_DIR).iterdir()  # withdrawn: moved aside, never loaded again
    assert moved.name.startswith("c.deleted-")
    loaded = Store.open(directory)
    loaded.delete("b")  # not an eraser file: load_erasers would refuse it; the rest loads with Eraser.load
    assert torch.equal(loaded.load_erasers()["a"].r, small_eraser(0).r)
    with pytest.raises(ValueError):
        loaded.add("a", b"x", "uploaded")  # a name in the manifest is never overwritten
    assert Store.open(directory).state()["erasers"] == ["a"]


def test_a_directory_without_a_manifest_is_adopted_once(tmp_path):
    directory = tmp_path / "legacy"
    directory.mkdir()
    for seed, name in enumerate(["zed", "alpha"]):
        small_eraser(seed).save(directory / f"{name}.safetensors")
    store = Store.open(directory, tenants_file(tmp_path / "t.json", {"k": ["zed"]}))
    assert store.adopted and store.state() == {"erasers": ["alpha", "zed"], "tenants": {"k": ["zed"]}}
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert [entry["source"] for entry in manifest["erasers"].values()] == ["adopted", "adopted"]
    assert list(store.load_erasers()) == ["alpha", "zed"]
    events = audit_log.read_audit(directory)
    assert [(e["event"], e["name"]) for e in events] == [("added", "alpha"), ("added", "zed"), ("bound", None)]
    # a file dropped in later is not adopted: the manifest is the truth, and the file is moved aside
    small_eraser(5).save(directory / "late.safetensors")
    again = Store.open(directory, tmp_path / "t.json")
    assert not again.adopted and again.strays == ["late.safetensors"] and again.names() == ["alpha", "zed"]
    assert files_in(directory) == ["alpha.safetensors", "zed.safetensors"]
    assert len(audit_log.read_audit(directory)) == 3  # nothing new happened


def test_the_tenants_file_adds_new_keys_and_keeps_the_manifests_bindings(tmp_path):
    directory = tmp_path / "state"
    file = tenants_file(tmp_path / "t.json", {"k1": ["a"]})
    (directory).mkdir()
    small_eraser(0).save(directory / "a.safetensors")
    store = Store.open(directory, file)
    store.delete("a")  # unbinds k1; the file still names "a" for k1: the manifest's binding wins, no error
    tenants_file(file, {"k1": ["a"], "k2": []})
    assert Store.open(directory, file).state() == {"erasers": [], "tenants": {"k1": [], "k2": []}}
    tenants_file(file, {"k3": ["a"]})  # a new key bound to an eraser the manifest does not have
    with pytest.raises(UserInputError, match=re.escape(str(file)) + r".*\['a'\]"):
        Store.open(directory, file)


def test_a_tenants_file_error_writes_nothing(tmp_path):
    directory = tmp_path / "legacy"
    directory.mkdir()
    small_eraser(0).save(directory / "a.safetensors")
    with pytest.raises(UserInputError, match="missing"):
        Store.open(directory, tenants_file(tmp_path / "t.json", {"k": ["a", "missing"]}))
    assert sorted(p.name for p in directory.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize("damage", ["torn", "not_json_object", "wrong_format", "missing_file", "changed_file",
                                    "bad_entry", "unknown_bound_name", "escaping_file"])
def test_a_damaged_manifest_is_one_line_naming_the_file(damage, tmp_path, capsys):
    directory = tmp_path / "state"
    store = Store.open(directory)
    store.add("a", small_eraser(0), "uploaded")
    manifest_path = directory / MANIFEST_FILE
    text = manifest_path.read_text()
    manifest = json.loads(text)
    if damage == "torn":
        manifest_path.write_text(text[: len(text) // 2])
    elif damage == "not_json_object":
        manifest_path.write_text("[]")
    elif damage == "wrong_format":
        manifest_path.write_text(json.dumps({**manifest, "format": "other"}))
    elif damage == "missing_file":
        (directory / "a.safetensors").unlink()
    elif damage == "changed_file":
        small_eraser(1).save(directory / "a.safetensors")
    elif damage == "bad_entry":
        manifest_path.write_text(json.dumps({**manifest, "erasers": {"a": {"file": 3}}}))
    elif damage == "unknown_bound_name":
        manifest_path.write_text(json.dumps({**manifest, "tenants": {"k": ["ghost"]}}))
    else:
        manifest["erasers"]["a"]["file"] = "../a.safetensors"
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserInputError) as caught:
        Store.open(directory)
    assert caught.value.path == str(manifest_path) and "\n" not in str(caught.value)
    # the serve command stops before loading any model, with exit status 2 and that one line
    code = cli.main(["serve", "--model", str(tmp_path / "no-model-here"), "--erasers", str(directory)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and str(manifest_path) in error


def test_a_write_that_fails_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    from mllmeraser.serve import store as store_module

    directory = tmp_path / "state"
    store = Store.open(directory, tenants_file(tmp_path / "t.json", {"k": []}))
    store.add("a", small_eraser(0), "uploaded", ["k"])
    before = store.state()

    def full(path, data):
        if Path(path).name == MANIFEST_FILE:
            raise OSError(28, "No space left on device")
        return original(path, data)

    original = store_module.atomic_write_bytes
    monkeypatch.setattr(store_module, "atomic_write_bytes", full)
    for change in (lambda: store.add("b", small_eraser(1), "uploaded", ["k"]), lambda: store.delete("a"),
                   lambda: store.bind("k", [], ["a"])):
        with pytest.raises(OSError):
            change()
        assert store.state() == before
    monkeypatch.undo()
    assert Store.open(directory).state() == before and files_in(directory) == ["a.safetensors"]
    assert [e["event"] for e in audit_log.read_audit(directory)] == ["bound", "uploaded"]


def test_changes_from_many_threads_are_serialised_and_all_kept(tmp_path):
    """The admin endpoints run in a thread pool: concurrent changes must not tear the manifest (the atomic
    writer names its temp file per process, so two unserialised writers would share it) or lose one."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store.open(tmp_path / "state", tenants_file(tmp_path / "t.json", {"k": []}))

    def worker(thread: int) -> None:
        for n in range(8):
            store.add(f"t{thread}-{n}", bytes([thread, n]) * 50, "uploaded", ["k"])
            if n % 2:
                store.delete(f"t{thread}-{n - 1}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    kept = sorted(f"t{t}-{n}" for t in range(4) for n in range(1, 8, 2))
    state = Store.open(tmp_path / "state").state()
    assert sorted(state["erasers"]) == kept and sorted(state["tenants"]["k"]) == kept
    assert files_in(tmp_path / "state") == [f"{name}.safetensors" for name in kept]
    assert len(audit_log.read_audit(tmp_path / "state")) == 1 + 32 + 16


# ---- the audit log ----------------------------------------------------------------------------------------

def test_the_audit_log_holds_digests_never_tokens_or_facts(tmp_path, capsys):
    from mllmeraser.core.inputs import as_items
    from PIL import Image

    directory = tmp_path / "state"
    store = Store.open(directory)
    secret_fact = "lives at 12 Hidden Lane"
    items = as_items([(Image.new("RGB", (4, 4), "red"), "Where does F0001 live?", secret_fact),
                      (None, "Who is F0001?", "a person")])
    digest = audit_log.forget_digest(items)
    assert digest == audit_log.forget_digest(list(items))  # canonical: the same set, the same digest
    other_image = as_items([(Image.new("RGB", (4, 4), "blue"), "Where does F0001 live?", secret_fact),
                            (None, "Who is F0001?", "a person")])
    assert audit_log.forget_digest(other_image) != digest  # the photo is part of the digest
    store.add("r1", small_eraser(0), "fitted", [], TOKEN, forget_sha256=digest, model="m" * 16)
    store.add("u1", small_eraser(1), "uploaded", [], "another-token")
    store.delete("r1", TOKEN)
    raw = (directory / "audit.jsonl").read_text()
    assert TOKEN not in raw and secret_fact not in raw and "F0001" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]  # what jq reads: one object a line
    assert [(e["event"], e["name"]) for e in lines] == [("fitted", "r1"), ("uploaded", "u1"), ("deleted", "r1")]
    fitted, uploaded, deleted = lines
    assert fitted["token"] == audit_log.short_digest(TOKEN) != uploaded["token"]
    assert fitted["forget_sha256"] == digest and fitted["model"] == "m" * 16
    assert fitted["file_sha256"] == deleted["file_sha256"] and deleted["withdrawn"] >= fitted["time"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in lines)
    # serve-log: a table, one request's events, the raw lines
    assert cli.main(["serve-log", str(directory)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["time", "event", "name"] and len(table) == 4
    assert "withdrawn" in table[3] and digest[:12] in table[1]
    assert cli.main(["serve-log", str(directory), "--name", "r1", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [fitted, deleted]
    # a line cut short by a crash is dropped at the next open, so every line parses and the next one is whole
    with open(directory / "audit.jsonl", "a") as fh:
        fh.write('{"time": "2026-')
    Store.open(directory).add("u2", small_eraser(2), "uploaded")
    assert [e["name"] for e in audit_log.read_audit(directory)] == ["r1", "u1", "r1", "u2"]
    assert cli.main(["serve-log", str(tmp_path / "nowhere")]) == 2


# ---- the admin API on a stand-in model: writes through, /health, /metrics ---------------------------------

def stand_in_app(store: Store | None = None, **registry_tenants):
    """create_app over a model that is never run (no batch is sent): the admin endpoints, /health, /metrics."""
    from mllmeraser import serve

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    processor = SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=2))
    erasers = store.load_erasers() if store is not None else {}
    registry = serve.Registry(erasers, None, store.tenants if store is not None else None)
    return serve.create_app(model, processor, registry, serve.ServeSettings(admin_token=TOKEN), store=store)


def test_admin_changes_are_written_through_and_survive_a_restart(tmp_path):
    from starlette.testclient import TestClient

    directory = tmp_path / "state"
    small_eraser(0).save(tmp_path / "a.safetensors")
    admin = {"Authorization": f"Bearer {TOKEN}"}
    store = Store.open(directory, tenants_file(tmp_path / "t.json", {"k1": []}))
    with TestClient(stand_in_app(store)) as client:
        upload = small_eraser(1)
        upload.save(tmp_path / "upload.safetensors")
        response = client.post("/admin/erasers", files={"file": ("u.safetensors",
                                                                  (tmp_path / "upload.safetensors").read_bytes())},
                               data={"name": "up", "tenants": "k1"}, headers=admin)
        assert response.status_code == 201 and response.json()["saved"] == str(directory / "up.safetensors")
        assert client.post("/admin/erasers", json={"name": "a", "path": str(tmp_path / "a.safetensors")},
                           headers=admin).status_code == 201
        bound = client.post("/admin/bindings", json={"tenant": "k2", "bind": ["a", "up"]}, headers=admin)
        assert bound.status_code == 200 and bound.json() == {"tenant": audit_log.short_digest("k2"),
                                                             "erasers": ["a", "up"]}
        assert client.post("/admin/bindings", json={"tenant": "k2", "bind": ["ghost"]},
                           headers=admin).json()["error"]["code"] == "unknown_eraser"
        assert client.post("/admin/bindings", json={"tenant": "k2", "unbind": ["a"]}).status_code == 401
        # refused by the registry (other layers: cannot share the attachment): 400, and nothing saved
        other = small_eraser(2, layers=(0,))
        other.save(tmp_path / "other.safetensors")
        refused = client.post("/admin/erasers", json={"name": "other", "path": str(tmp_path / "other.safetensors")},
                              headers=admin)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "incompatible_eraser"
        assert client.delete("/admin/erasers/up", headers=admin).status_code == 200
        assert client.delete("/admin/erasers/up", headers=admin).status_code == 404
        listed = [e["name"] for e in client.get("/admin/erasers", headers=admin).json()["erasers"]]
    assert listed == ["a"]
    restarted = Store.open(directory)
    assert restarted.state() == {"erasers": ["a"], "tenants": {"k1": [], "k2": ["a"]}}
    assert files_in(directory) == ["a.safetensors"] and "other" not in str(list(directory.rglob("*")))
    assert torch.equal(restarted.load_erasers()["a"].u, small_eraser(0).u)
    events = [(e["event"], e["name"]) for e in audit_log.read_audit(directory)]
    assert events == [("bound", None), ("uploaded", "up"), ("added", "a"), ("bound", None), ("deleted", "up")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_batcher_thread_has_died(tmp_path):
    from starlette.testclient import TestClient

    app = stand_in_app()
    with TestClient(app) as client:
        healthy = client.get("/health")
        assert healthy.status_code == 200 and healthy.json()["batcher"] == "alive"
        engine = app.state.engine

        def crash():
            raise RuntimeError("a bug in the batcher")

        engine._tasks.append((crash, None))  # the next _take returns it; _run_task then fails outside its try
        with engine._cond:
            engine._cond.notify_all()
        engine._thread.join(timeout=30)
        assert not engine.alive
        dead = client.get("/health")
        assert dead.status_code == 503
        assert dead.json()["status"] == "unavailable" and dead.json()["batcher"] == "dead"
        with pytest.raises(RuntimeError, match="died"):
            engine.call(lambda: None)  # nothing would ever run it: refused at once, not left hanging
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        assert "\nmllmeraser_batcher_up 0\n" in metrics


def test_the_batch_log_is_bounded_and_sliceable():
    from mllmeraser.serve.engine import BATCH_LOG, BatchLog

    log = BatchLog(4)
    for size in range(10):
        log.append(size)
    assert list(log) == [6, 7, 8, 9] and log[2:] == [8, 9] and log[-1] == 9
    assert stand_in_app().state.engine.batches.maxlen == BATCH_LOG


def test_metrics_is_prometheus_text(tmp_path):
    from starlette.testclient import TestClient

    store = Store.open(tmp_path / "state")
    store.add("a", small_eraser(0), "uploaded")
    app = stand_in_app(store)
    app.state.engine.gate_fires.update({"a": 3, "withdrawn-long-ago": 5})
    app.state.metrics.count_fit(0.25)
    app.state.metrics.count_fit(0.5)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401  # series are labelled with eraser names
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    samples, typed = {}, set()
    for line in text.splitlines():  # the exposition format: HELP and TYPE comments, then `name{labels} value`
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        match = re.fullmatch(r'([a-z_]+)(\{[a-z_]+="[^"]*"\})? (-?[0-9.e+]+)', line)
        assert match, line
        assert match.group(1) in typed or match.group(1).rsplit("_", 1)[0] in typed, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    assert samples["mllmeraser_batcher_up"] == 1 and samples["mllmeraser_erasers_loaded"] == 1
    assert samples['mllmeraser_gate_fires_total{eraser="a"}'] == 3
    assert not any("withdrawn-long-ago" in key for key in samples)  # only loaded erasers are named
    assert samples["mllmeraser_fit_seconds_sum"] == 0.75 and samples["mllmeraser_fit_seconds_count"] == 2
    assert samples['mllmeraser_chat_requests_total{outcome="ok"}'] == 0
    assert samples["mllmeraser_batches_total"] == 0


# ---- chaos: SIGKILL at random moments ------------------------------------------------------------------

NAMES = ["r0", "r1", "r2", "r3", "r4", "r5"]
KEYS = ["k1", "k2", "k3"]


def apply_change(state: dict, change: dict) -> dict:
    """What a change does to {"erasers", "tenants"}: the model the store must match."""
    erasers, tenants = list(state["erasers"]), {k: list(v) for k, v in state["tenants"].items()}
    if change["op"] == "add":
        erasers.append(change["name"])
        for key in change["tenants"]:
            tenants[key].append(change["name"])
    elif change["op"] == "delete":
        erasers.remove(change["name"])
        tenants = {k: [n for n in v if n != change["name"]] for k, v in tenants.items()}
    else:
        bound = [n for n in tenants.setdefault(change["key"], []) if n not in change["unbind"]]
        tenants[change["key"]] = bound + [n for n in change["bind"] if n not in bound]
    return {"erasers": erasers, "tenants": tenants}


def churn(directory: Path, tenants: Path, seed: int, out: int) -> None:
    """The child: open the store (recovering from the last kill), then random changes until killed; it writes
    "B <change>" before each change and "A <state>" once it has returned (what a 201 would acknowledge)."""
    rng = random.Random(seed)

    def say(tag: str, value) -> None:
        os.write(out, f"{tag} {json.dumps(value)}\n".encode())  # < PIPE_BUF: one write arrives whole

    store = Store.open(directory, tenants)
    say("A", store.state())
    for _ in range(10_000):
        state = store.state()
        loaded = state["erasers"]
        free = [n for n in NAMES if n not in loaded]
        op = rng.choice(["add"] * 3 + ["delete"] * 2 + ["bind"]) if free and loaded else "add" if free else "delete"
        if op == "add":
            change = {"op": "add", "name": rng.choice(free), "tenants": rng.sample(KEYS, rng.randint(0, 2))}
        elif op == "delete":
            change = {"op": "delete", "name": rng.choice(loaded)}
        else:
            change = {"op": "bind", "key": rng.choice(KEYS + ["k4"]), "bind": rng.sample(loaded, 1),
                      "unbind": rng.sample(loaded, 1)}
        say("B", change)
        if op == "add":
            store.add(change["name"], rng.randbytes(rng.randint(1, 200_000)), "uploaded", change["tenants"], "t")
        elif op == "delete":
            store.delete(change["name"], "t")
        else:
            store.bind(change["key"], change["bind"], change["unbind"], "t")
        say("A", store.state())


def test_fifty_sigkills_at_random_moments_never_lose_or_resurrect_a_change(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    for name in ("r0", "r1"):  # a legacy directory: the first open adopts it (and may itself be killed)
        (directory / f"{name}.safetensors").write_bytes(name.encode() * 100)
    tenants = tenants_file(tmp_path / "t.json", {key: [] for key in KEYS})
    acknowledged = {"erasers": ["r0", "r1"], "tenants": {key: [] for key in KEYS}}
    rng = random.Random(0)
    landed = torn = 0
    for round_ in range(50):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only the store's own code runs here (no torch), then it is killed
            os.close(read_end)
            try:
                churn(directory, tenants, 1000 + round_, write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        lines, buffer = [], b""
        try:
            wanted, deadline = rng.randint(1, 8), time.monotonic() + 60
            while sum(line.startswith("A ") for line in lines) < wanted and time.monotonic() < deadline:
                if select.select([read_end], [], [], 1.0)[0]:
                    chunk = os.read(read_end, 65536)
                    if not chunk:
                        break
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    lines += [line.decode() for line in complete]
            time.sleep(rng.uniform(0, 0.004))  # then a random moment: in a change, between two, or in an fsync
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        while chunk := os.read(read_end, 65536):
            buffer += chunk
        os.close(read_end)
        lines += [line.decode() for line in buffer.split(b"\n") if line]
        in_flight = None
        for line in lines:
            tag, value = line[0], json.loads(line[2:])
            if tag == "A":
                acknowledged, in_flight = value, None
            else:
                in_flight = value
        recovered = Store.open(directory, tenants).state()
        if in_flight is None:
            assert recovered == acknowledged, f"round {round_}"
        else:
            assert recovered in (acknowledged, apply_change(acknowledged, in_flight)), f"round {round_}: {in_flight}"
            landed += recovered != acknowledged
            torn += 1
            acknowledged = recovered
        assert files_in(directory) == sorted(f"{name}.safetensors" for name in recovered["erasers"])
    print(f"store chaos: 50 rounds, {torn} killed inside a change ({landed} of them had landed)")


# ---- chaos on the real server ------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as probe:  # free a moment ago (a race no other test here runs against)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(testbed_dir: Path, directory: Path, tenants: Path, port: int, extra=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mllmeraser.cli", "serve", "--model", str(testbed_dir / "model"),
                             "--erasers", str(directory), "--tenants", str(tenants), "--port", str(port),
                             "--model-name", "testbed", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "MLLMERASER_ADMIN_TOKEN": TOKEN})


def wait_up(process: subprocess.Popen, base: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


SERVER_ROUNDS = 4  # each costs a server start (~15 s here: imports, model, model cache)


@pytest.mark.slow
def test_sigkilled_servers_restart_serving_exactly_what_was_acknowledged(testbed_dir, testbed_data, tmp_path):
    """The real `mllmeraser serve --data`, fitting, uploading, binding and deleting over HTTP; SIGKILL at a
    random moment (seeded), often while a call is in flight; after each restart GET /admin/erasers and the
    bindings equal the last acknowledged state (or it with the in-flight call applied), and the audit log
    agrees. Each round costs a server start; SERVER_ROUNDS keeps the test near a minute and a half (the 50-round
    bar is met at the store level above, where a kill costs milliseconds)."""
    import threading

    import httpx

    pytest.importorskip("fastapi")
    from mllmeraser.bench import data

    forget = [i for i in data.load_split_items(testbed_data, "forget", 10)
              if i.subject_id == "F0023" and i.task == "generation" and i.modality == "text"][:2]
    body = [{"question": i.prompt, "answer": i.answer, "image": None} for i in forget]
    directory, upload = tmp_path / "state", tmp_path / "upload.safetensors"
    tenants = tenants_file(tmp_path / "t.json", {key: [] for key in KEYS})
    admin = {"Authorization": f"Bearer {TOKEN}"}
    extra = ("--data", str(testbed_data), "--cache-dir", str(tmp_path / "cache"))
    rng = random.Random(0)
    acknowledged = {"erasers": [], "tenants": {key: [] for key in KEYS}}
    counter = 0
    for round_ in range(SERVER_ROUNDS + 1):  # the last start only checks what the last kill left
        started = time.monotonic()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        process = start_server(testbed_dir, directory, tenants, port, extra)
        in_flight, results = None, []
        try:
            wait_up(process, base)
            up = time.monotonic() - started
            served = [e["name"] for e in httpx.get(base + "/admin/erasers", headers=admin).json()["erasers"]]
            assert served == acknowledged["erasers"], f"round {round_}"
            if round_ == SERVER_ROUNDS:
                break
            if round_ == 0:  # an upload's bytes: the first fitted request, as a client would send a file
                fitted = httpx.post(base + "/admin/requests", json={"name": "seed", "forget": body}, headers=admin,
                                    timeout=300)
                assert fitted.status_code == 201, fitted.text
                upload.write_bytes(Path(fitted.json()["saved"]).read_bytes())
                acknowledged = apply_change(acknowledged, {"op": "add", "name": "seed", "tenants": []})
            calls = rng.randint(1, 3)
            for number in range(calls):  # acknowledged changes, then one that the kill may cut
                loaded = acknowledged["erasers"]
                counter += 1
                op = rng.choice(["fit", "upload", "bind", "delete"] if loaded else ["fit", "upload"])
                if op in ("fit", "upload"):
                    change = {"op": "add", "name": f"{op}{counter}", "tenants": rng.sample(KEYS, rng.randint(0, 1))}
                    if op == "fit":
                        call = lambda c=change: httpx.post(base + "/admin/requests", headers=admin, timeout=300,
                                                           json={"name": c["name"], "forget": body,
                                                                 "tenants": c["tenants"]})
                    else:
                        call = lambda c=change: httpx.post(base + "/admin/erasers", headers=admin, timeout=300,
                                                           files={"file": ("u.safetensors", upload.read_bytes())},
                                                           data={"name": c["name"], "tenants": ",".join(c["tenants"])})
                elif op == "bind":
                    change = {"op": "bind", "key": rng.choice(KEYS), "bind": rng.sample(loaded, 1), "unbind": []}
                    call = lambda c=change: httpx.post(base + "/admin/bindings", headers=admin, timeout=300,
                                                       json={"tenant": c["key"], "bind": c["bind"]})
                else:
                    change = {"op": "delete", "name": rng.choice(loaded)}
                    call = lambda c=change: httpx.delete(base + f"/admin/erasers/{c['name']}", headers=admin,
                                                         timeout=300)
                in_flight = change
                thread = threading.Thread(target=lambda: results.append(_try(call)), daemon=True)
                thread.start()
                # the last call: killed at a random moment, mid-call or just after (a call takes 0.02-0.5 s here)
                thread.join(timeout=rng.uniform(0.0, 0.3) if number == calls - 1 else 300)
                if thread.is_alive():
                    break
                response = results.pop()
                assert response is not None and response.status_code in (200, 201), response and response.text
                acknowledged, in_flight = apply_change(acknowledged, change), None
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        print(f"server round {round_}: up in {up:.1f}s, round {time.monotonic() - started:.1f}s, "
              f"killed {'mid-call' if in_flight else 'between calls'}")
        if round_ == SERVER_ROUNDS:
            break
        if in_flight is not None:  # a call the kill cut: landed whole or not at all; learn which from the store
            recovered = Store.open(directory).state()
            assert recovered in (acknowledged, apply_change(acknowledged, in_flight)), f"round {round_}"
            acknowledged = recovered
        else:
            assert Store.open(directory).state() == acknowledged
    names = {e["name"] for e in audit_log.read_audit(directory) if e["event"] != "bound"}
    assert set(acknowledged["erasers"]) <= names


def _try(call):
    import httpx

    try:
        return call()
    except httpx.TransportError:  # the server was killed under the call
        return None


@pytest.mark.slow
def test_metrics_count_the_gate_fires_of_a_served_request(testbed_dir, testbed_data, tmp_path):
    """On the testbed: a forget person's question fires that request's gate once, a retained person's does not;
    both are counted as answered requests in one batch each."""
    import httpx

    from mllmeraser import serve
    from mllmeraser.bench import data
    from mllmeraser.core import models
    from mllmeraser.core.settings import FitSettings, PGDSettings

    model, processor = models.load_model(testbed_dir / "model")
    rng = random.Random(0)
    forget = [i for i in data.load_split_items(testbed_data, "forget", 10) if i.subject_id == "F0001"]
    retain = data.load_split_items(testbed_data, "retain", 10)
    torch.manual_seed(0)
    eraser = fit_eraser(model, processor, forget=forget, retain=rng.sample(list(data.retained_inputs(testbed_data, 10)),
                                                                           300),
                        erasure=rng.sample(list(data.default_erasure_items(testbed_data)), 60),
                        calibration=rng.sample(list(data.validation_items(testbed_data, 10)), 80), request="F0001",
                        settings=FitSettings(pgd=PGDSettings(steps=2)), progress=False)
    store = Store.open(tmp_path / "state")
    store.add("p1", eraser, "uploaded")
    registry = serve.Registry(store.load_erasers(), model)
    app = serve.create_app(model, processor, registry, serve.ServeSettings(model_name="testbed", admin_token=TOKEN),
                           store=store)
    asked = {"forget": next(i for i in forget if i.task == "generation" and i.modality == "text"),
             "retain": next(i for i in retain if i.task == "generation" and i.modality == "text")}
    admin = {"Authorization": f"Bearer {TOKEN}"}

    def sample(text: str, series: str) -> float:
        (line,) = [line for line in text.splitlines() if line.startswith(series + " ")]
        return float(line.rsplit(" ", 1)[1])

    with serve.serving(app) as base:
        counts = []
        for which in ("forget", "retain"):
            answer = httpx.post(base + "/v1/chat/completions", timeout=120, json={
                "model": "testbed", "max_tokens": 4, "messages": [{"role": "user", "content": asked[which].prompt}]})
            assert answer.status_code == 200, answer.text
            text = httpx.get(base + "/metrics", headers=admin).text
            counts.append((sample(text, 'mllmeraser_gate_fires_total{eraser="p1"}'),
                           sample(text, 'mllmeraser_chat_requests_total{outcome="ok"}'),
                           sample(text, "mllmeraser_batches_total")))
    assert counts == [(1, 1, 1), (1, 2, 2)]
