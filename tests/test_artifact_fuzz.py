"""Mutated eraser files: every mutant is refused by Eraser.load with a one-line UserInputError naming the file
and the field (never another exception, never loaded), by the server's upload as a 400, and by
`mllmeraser generate --eraser` with exit status 2, one line on stderr and no traceback.

The mutants come from three real artifacts (a knn prompt gate with shared and owned retain rows, a ridge prompt
gate, the paper's per-layer gate) and are each made to be invalid: non-finite header numbers and tensor values,
wrong types for every header field, unknown and missing fields and tensors, wrong dtypes and shapes,
truncations at many offsets, inflated and deflated header lengths, lists where objects belong. Seeded.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from mllmeraser.core import gating
from mllmeraser.core.eraser import FORMAT_VERSION, METADATA_KEY, Eraser
from mllmeraser.errors import UserInputError

D, LAYERS = 64, [1, 2]  # tiny_families.build_llava: hidden size 64, three decoder layers
TRUNCATIONS, CLI_SAMPLE = 40, 6


def knn_eraser() -> Eraser:
    generator = torch.Generator().manual_seed(0)
    retain = gating.unit_rows(torch.randn(13, D, generator=generator))
    gate = gating.PromptGate(kind="knn", pooling="mean", layer=1, threshold=[0.4, 0.7], neighbours=2,
                             forget_bank=gating.unit_rows(torch.randn(6, D, generator=generator)),
                             forget_owner=torch.tensor([0, 0, 0, 1, 1, 1]), retain_bank=retain,
                             retain_owner=torch.tensor([gating.SHARED] * 12 + [1]))
    return Eraser(u=None, prompt_gate=gate, r=torch.randn(2, 2, D, generator=generator), alpha=[2.0, 3.0],
                  layer_indices=LAYERS, layers_path="model.language_model.layers", hidden_size=D,
                  metadata={"fingerprint": {"model_type": "llava", "hidden_size": D},
                            "requests": [{"name": "a", "counts": {"forget": 3}}, {"name": "b", "counts": {"forget": 3}}],
                            "fit": {"beta": 1.0}})


def ridge_eraser() -> Eraser:
    generator = torch.Generator().manual_seed(1)
    gate = gating.PromptGate(kind="ridge", pooling="last", layer=1, threshold=[0.5],
                             u=torch.randn(1, D, generator=generator))
    return Eraser(u=None, prompt_gate=gate, r=torch.randn(1, 2, D, generator=generator), alpha=1.5,
                  layer_indices=LAYERS, layers_path="model.language_model.layers", hidden_size=D,
                  metadata={"requests": [{"name": "c"}]})


def paper_eraser() -> Eraser:
    generator = torch.Generator().manual_seed(2)
    return Eraser(u=torch.randn(2, 2, D, generator=generator), r=torch.randn(2, 2, D, generator=generator),
                  alpha=[0.5, 1.0], layer_indices=LAYERS, layers_path="model.language_model.layers", hidden_size=D,
                  floor=[0.25, -float("inf")], cap=[float("inf"), 1.5], metadata={"fit": {"solver": "ridge"}})


BASES = {"knn": knn_eraser, "ridge": ridge_eraser, "paper": paper_eraser}


# ---- the safetensors layout: 8 bytes little-endian header length, the JSON header, the data ---------------


def split(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8: 8 + length]), data[8 + length:]


def assemble(layout: dict, body: bytes) -> bytes:
    text = json.dumps(layout).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def with_header_text(good: bytes, text: str) -> bytes:
    """The good file with its mllmeraser header replaced by `text` (any JSON, or none)."""
    layout, body = split(good)
    layout["__metadata__"][METADATA_KEY] = text
    return assemble(layout, body)


def with_header(good: bytes, change) -> bytes:
    """The good file with `change(header)` applied to its parsed mllmeraser header (NaN written as NaN)."""
    header = json.loads(split(good)[0]["__metadata__"][METADATA_KEY])
    change(header)
    return with_header_text(good, json.dumps(header))


def with_tensors(good: bytes, change) -> bytes:
    tensors = safetensors.torch.load(good)
    change(tensors)
    return safetensors.torch.save(tensors, metadata=split(good)[0]["__metadata__"])


def setter(path: tuple, value):
    def change(header: dict) -> None:
        *parents, last = path
        target = header
        for key in parents:
            target = target[key]
        target[last] = value
    return change


def deleter(field: str):
    return lambda header: header.pop(field)


# ---- the mutants -----------------------------------------------------------------------------------------

NOT_INT = [None, True, "2", 2.0, [2], {"n": 2}]
NOT_LIST = [None, 1.0, "x", {"0": 1.0}, True]


def header_mutants(kind: str, good: bytes, header: dict) -> list[tuple[str, bytes, str]]:
    K = header["num_terms"]
    mutants = []

    def add(name: str, change, needle: str) -> None:
        mutants.append((f"{kind}/{name}", with_header(good, change), needle))

    # wrong types and values for every field
    for value in [0, -1, True, "3", 3.0, None, [3]]:
        add(f"format_version={value!r}", setter(("format_version",), value), "format_version")
    newer = FORMAT_VERSION + 1
    add(f"format_version={newer}", setter(("format_version",), newer), "newer than this mllmeraser")
    for value in [None, 3, "", ["model"], {"p": 1}]:
        add(f"layers_path={value!r}", setter(("layers_path",), value), "'layers_path'")
    for value in [None, "1,2", [], [-1, 2], [1.0, 2.0], [True, 2], {"0": 1}, [[1], 2], [1, "2"]]:
        add(f"layer_indices={value!r}", setter(("layer_indices",), value), "'layer_indices'")
    add("layer_indices=[1,1]", setter(("layer_indices",), [1, 1]), "distinct")
    add("layer_indices=[0,1,2]", setter(("layer_indices",), [0, 1, 2]), "shape")
    for field in ("hidden_size", "num_terms"):
        for value in NOT_INT + [0, -5]:
            add(f"{field}={value!r}", setter((field,), value), f"'{field}'")
    add("hidden_size=32", setter(("hidden_size",), 32), "shape")
    add("num_terms+1", setter(("num_terms",), K + 1), "'alpha'")
    for value in [None, "float16", 32, ["float32"]]:
        add(f"dtype={value!r}", setter(("dtype",), value), "'dtype'")
    for value in [None, "decode", 1, ["prefill"], ""]:
        add(f"mode={value!r}", setter(("mode",), value), "'mode'")
    for field in ("alpha", "gate_floor", "gate_cap"):
        for value in NOT_LIST + [[1.0] * (K + 1), [True] * K, ["1"] * K, [[1.0]] * K]:
            add(f"{field}={value!r}", setter((field,), value), f"'{field}'")
    add("alpha=[null]", setter(("alpha",), [None] * K), "'alpha'")
    for value in [None, [], "x", 3, [["fingerprint", {}]]]:
        add(f"metadata={value!r}", setter(("metadata",), value), "'metadata'")
    for value in [{}, [{}] * (K + 1), ["a"] * K, "x", [[]] * K]:
        add(f"metadata.requests={value!r}", setter(("metadata", "requests"), value), "'metadata.requests'")
    for value in [[], "llava", 3]:
        add(f"metadata.fingerprint={value!r}", setter(("metadata", "fingerprint"), value), "'metadata.fingerprint'")
    for field in ("extra", "u", "Alpha"):
        add(f"unknown field {field}", setter((field,), 1), "unknown header field")
    for field in header:
        if field == "gate" and header["gate"] is None:
            continue
        needle = ("no format_version" if field == "format_version" else "tensor" if field == "gate"
                  else f"no field '{field}'")
        add(f"missing {field}", deleter(field), needle)

    # non-finite numbers anywhere in the header
    for value in [float("nan"), float("inf"), -float("inf")]:
        add(f"alpha[0]={value}", setter(("alpha", 0), value), "non-finite")
        add(f"gate_floor[0]={value}", setter(("gate_floor", 0), value), "non-finite")
        add(f"gate_cap[-1]={value}", setter(("gate_cap", K - 1), value), "non-finite")
        add(f"metadata nested {value}", setter(("metadata", "deep"), {"x": [1, {"y": value}]}), "non-finite")
    add("format_version=NaN", setter(("format_version",), float("nan")), "non-finite")
    add("hidden_size=Infinity", setter(("hidden_size",), float("inf")), "non-finite")
    text = json.dumps(header)
    for literal in ("1e999", "-1e400", "2E+999"):  # json parses these to +-inf unless told otherwise
        mutants.append((f"{kind}/alpha literal {literal}",
                        with_header_text(good, text.replace('"alpha": [', f'"alpha": [{literal}, ', 1)), "non-finite"))
    # text-level mutants: not an object, not JSON, repeated keys, ints json cannot hold
    version = f'"format_version": {FORMAT_VERSION}'
    repeated = text.replace(version, f'{version}, "format_version": 1')
    assert repeated != text
    for raw, needle in [*((raw, "format_version") for raw in ["[]", "[1, 2]", "null", "3", '"x"', "true"]),
                        *((raw, "not valid JSON") for raw in ["", "{", "not json", text[:-1], text + "}"]),
                        ('{"format_version": 3}', "no field"), (repeated, "repeated key 'format_version'")]:
        mutants.append((f"{kind}/header text {raw[:20]!r}...{raw[-20:]!r} ({len(raw)})", with_header_text(good, raw),
                        needle))
    mutants.append((f"{kind}/huge int", with_header_text(good, text.replace(f'"hidden_size": {D}',
                                                                           '"hidden_size": ' + "9" * 5000)), "JSON"))
    mutants.append((f"{kind}/deep nesting", with_header_text(
        good, text.replace('"metadata": {', '"metadata": {"deep": ' + "[" * 100000 + "]" * 100000 + ", ", 1)), "JSON"))
    return mutants


def gate_mutants(kind: str, good: bytes, header: dict) -> list[tuple[str, bytes, str]]:
    K = header["num_terms"]
    mutants = []

    def add(name: str, change, needle: str) -> None:
        mutants.append((f"{kind}/{name}", with_header(good, change), needle))

    if header["gate"] is None:  # a per-layer eraser given a gate: the tensors do not match it
        add("gate={}", setter(("gate",), {}), "'gate'")
        add("gate=knn", setter(("gate",), knn_eraser().prompt_gate.header()), "tensor")
        return mutants
    for value in [[], "knn", 1, True, list(header["gate"].values())]:
        add(f"gate={value!r}", setter(("gate",), value), "'gate'")
    add("gate extra field", setter(("gate", "_device_cache"), {}), "'gate'")
    add("gate missing neighbours", lambda h: h["gate"].pop("neighbours"), "'gate'")
    for value in [None, "svm", 1, ["knn"]]:
        add(f"gate.kind={value!r}", setter(("gate", "kind"), value), "'gate.kind'")
    other = "ridge" if header["gate"]["kind"] == "knn" else "knn"
    add(f"gate.kind={other}", setter(("gate", "kind"), other), "tensor")
    for value in [None, "max", 0]:
        add(f"gate.pooling={value!r}", setter(("gate", "pooling"), value), "'gate.pooling'")
    for value in NOT_INT + [-1]:
        add(f"gate.layer={value!r}", setter(("gate", "layer"), value), "'gate.layer'")
    add("gate.layer after the steered layers", setter(("gate", "layer"), 2), "decides at layer 2")
    for value in NOT_INT + [0, -1]:
        add(f"gate.neighbours={value!r}", setter(("gate", "neighbours"), value), "'gate.neighbours'")
    for value in NOT_LIST + [[0.5] * (K + 1), [None] * K, ["0.5"] * K, [True] * K]:
        add(f"gate.threshold={value!r}", setter(("gate", "threshold"), value), "'gate.threshold'")
    for value in [float("nan"), float("inf"), -float("inf")]:
        add(f"gate.threshold[0]={value}", setter(("gate", "threshold", 0), value), "non-finite")
    return mutants


def tensor_mutants(kind: str, good: bytes, rng: random.Random) -> list[tuple[str, bytes, str]]:
    stored = safetensors.torch.load(good)
    mutants = []

    def add(name: str, change, needle: str) -> None:
        mutants.append((f"{kind}/{name}", with_tensors(good, change), needle))

    def put(name: str, value):
        def change(tensors):
            flat = tensors[name].view(-1)
            flat[rng.randrange(flat.numel())] = value
        return change

    floats = [name for name, t in stored.items() if t.is_floating_point()]
    for name in floats:
        for value in [float("nan"), float("inf"), -float("inf")]:
            for copy in range(2):
                add(f"{name} holds {value} ({copy})", put(name, value), f"tensor '{name}' holds non-finite")
    for name in ["gate._device_cache", "gate.u" if kind == "knn" else "gate.forget_bank", "u" if kind != "paper"
                 else "gate.u", "extra", "r2", "gate.", "gate.__class__"]:
        add(f"unknown tensor {name}", lambda tensors, name=name: tensors.update({name: torch.zeros(1)}),
            f"unknown tensor '{name}'")
    add("r renamed R", lambda tensors: tensors.update(R=tensors.pop("r")), "unknown tensor 'R'")
    for name in stored:
        add(f"missing {name}", lambda tensors, name=name: tensors.pop(name), f"missing tensor '{name}'")
    for name, t in stored.items():
        wrong = [torch.float64, torch.int32] + ([torch.float16] if t.dtype == torch.float32 and "bank" not in name
                                                else [torch.float32] if t.dtype == torch.int64 else [])
        for dtype in wrong:
            add(f"{name} as {dtype}", lambda tensors, name=name, dtype=dtype: tensors.update(
                {name: tensors[name].to(dtype)}), f"tensor '{name}' is {dtype}")
        shapes = [t[..., :-1], t[:-1], t.reshape(-1), t[None]] if t.ndim > 1 else [t[:-1], t[:, None], t.repeat(2)]
        for index, shaped in enumerate(shapes):
            add(f"{name} shape {list(shaped.shape)} ({index})",
                lambda tensors, name=name, shaped=shaped: tensors.update({name: shaped.contiguous()}), name)
    if kind == "knn":
        for name, value in [("gate.forget_owner", 2), ("gate.forget_owner", -1), ("gate.retain_owner", -2),
                            ("gate.retain_owner", 5)]:
            add(f"{name} value {value}", put(name, value), "owner")
    return mutants


def byte_mutants(kind: str, good: bytes, rng: random.Random) -> list[tuple[str, bytes, str]]:
    length = struct.unpack("<Q", good[:8])[0]
    needle = "not a safetensors file"
    cuts = sorted({0, 1, 7, 8, 9, 8 + length - 1, 8 + length, 8 + length + 1, len(good) - 1,
                   *(rng.randrange(len(good)) for _ in range(TRUNCATIONS))})
    mutants = [(f"{kind}/truncated at {cut}", good[:cut], needle) for cut in cuts]
    for new in [length + 1, length + 8, length + 4096, length - 1, length - 8, 0, 2, len(good), 2**31, 2**63 - 1,
                2**64 - 1]:
        mutants.append((f"{kind}/header length {new}", struct.pack("<Q", new) + good[8:], needle))
    mutants.append((f"{kind}/trailing bytes", good + b"\0" * 8, needle))
    mutants.append((f"{kind}/header doubled", good[:8 + length] + good, needle))
    layout, body = split(good)
    for dtype in ("F64", "F16", "I64", "BOOL", "XX"):
        changed = {**layout, "r": {**layout["r"], "dtype": dtype}}
        mutants.append((f"{kind}/layout r dtype {dtype}", assemble(changed, body), ""))
    for metadata, why in [({}, "not an mllmeraser eraser"), ({"other": "x"}, "not an mllmeraser eraser"),
                          ({METADATA_KEY: {"format_version": 3}}, ""), ({METADATA_KEY: 3}, "")]:
        mutants.append((f"{kind}/layout metadata {metadata!r}"[:60], assemble({**layout, "__metadata__": metadata}, body),
                        why))
    no_metadata = {name: entry for name, entry in layout.items() if name != "__metadata__"}
    mutants.append((f"{kind}/no __metadata__", assemble(no_metadata, body), "not an mllmeraser eraser"))
    mutants.append((f"{kind}/layout is a list", assemble([1, 2], body), needle))
    return mutants


def all_mutants(directory: Path) -> tuple[dict[str, Path], list[tuple[str, bytes, str]]]:
    rng = random.Random(25)
    goods, mutants = {}, []
    for kind, make in BASES.items():
        goods[kind] = make().save(directory / f"{kind}.safetensors")
        good = goods[kind].read_bytes()
        header = json.loads(split(good)[0]["__metadata__"][METADATA_KEY])
        mutants += header_mutants(kind, good, header) + gate_mutants(kind, good, header)
        mutants += tensor_mutants(kind, good, rng) + byte_mutants(kind, good, rng)
    return goods, mutants


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    goods, mutants = all_mutants(directory)
    assert len({name for name, _, _ in mutants}) == len(mutants)  # every mutant named once
    paths = []
    for index, (name, data, needle) in enumerate(mutants):
        path = directory / f"mutant-{index:04d}.safetensors"
        path.write_bytes(data)
        paths.append((name, path, needle))
    return goods, paths


def test_the_unmutated_files_load(fuzz):
    goods, _ = fuzz
    for kind, path in goods.items():
        loaded, made = Eraser.load(path), BASES[kind]()
        assert loaded.header() == made.header() and torch.equal(loaded.r, made.r)
        # the fuzz's own re-assembly is not what makes a mutant fail
        again = path.with_name(f"{kind}-reassembled.safetensors")
        again.write_bytes(assemble(*split(path.read_bytes())))
        assert Eraser.load(again).header() == made.header()


def test_every_mutant_is_refused_with_one_line_naming_the_file_and_the_field(fuzz):
    _, mutants = fuzz
    assert len(mutants) >= 200
    wrong = []
    for name, path, needle in mutants:
        try:
            Eraser.load(path)
        except UserInputError as error:
            message = str(error)
            if error.path != str(path) or "\n" in message or needle not in error.problem:
                wrong.append(f"{name}: {message!r} (wanted {needle!r})")
        except Exception as error:  # anything else is a bug: a traceback for the user
            wrong.append(f"{name}: {type(error).__name__}: {error}")
        else:
            wrong.append(f"{name}: loaded")
    assert wrong == [], f"{len(wrong)} of {len(mutants)} mutants:\n" + "\n".join(wrong)


def test_no_tensor_is_read_before_the_header_and_the_names_pass(fuzz, monkeypatch):
    from mllmeraser.core import artifact

    reads = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.reader = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.reader.__enter__()
            return self

        def __exit__(self, *exc):
            return self.reader.__exit__(*exc)

        def metadata(self):
            return self.inner.metadata()

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            reads.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(artifact.safetensors, "safe_open", Counting)
    goods, mutants = fuzz
    Eraser.load(goods["knn"])
    assert sorted(reads) == ["gate.forget_bank", "gate.forget_owner", "gate.retain_bank", "gate.retain_owner", "r"]
    named = {name: path for name, path, _ in mutants}
    for name in ["knn/metadata=[]", "knn/alpha[0]=nan", "knn/unknown tensor gate._device_cache", "knn/missing r",
                 "paper/gate=knn", "ridge/header text 'null'...'null' (4)"]:
        reads.clear()
        with pytest.raises(UserInputError):
            Eraser.load(named[name])
        assert reads == [], name


def test_the_server_upload_refuses_every_mutant_with_a_400(fuzz, tmp_path):
    """Every mutant through the live admin endpoint (multipart upload into a state store): a 400 with one line,
    nothing saved, and the server still answering and accepting the good file afterwards."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient
    from test_serve_store import TOKEN, stand_in_app

    from mllmeraser.serve.store import Store

    goods, mutants = fuzz
    admin = {"Authorization": f"Bearer {TOKEN}"}
    store = Store.open(tmp_path / "state")
    statuses = []
    with TestClient(stand_in_app(store)) as client:
        for index, (name, path, _) in enumerate(mutants):
            response = client.post("/admin/erasers", files={"file": ("m.safetensors", path.read_bytes())},
                                   data={"name": f"m{index}"}, headers=admin)
            error = response.json()["error"]
            statuses.append((response.status_code, error["code"], "\n" in error["message"]))
        assert client.get("/health").status_code == 200
        good = client.post("/admin/erasers", files={"file": ("k.safetensors", goods["knn"].read_bytes())},
                           data={"name": "good"}, headers=admin)
        assert good.status_code == 201 and good.json()["terms"] == 2
    assert set(statuses) == {(400, "invalid_eraser", False)} and len(statuses) == len(mutants)
    assert store.state()["erasers"] == ["good"]
    assert sorted(p.name for p in (tmp_path / "state").glob("*.safetensors")) == ["good.safetensors"]


def test_alpha_must_be_finite_in_memory_too():
    eraser = paper_eraser()
    for value in [float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ValueError, match="alpha must be finite"):
            eraser.with_alpha(value)
        with pytest.raises(ValueError, match="alpha must be finite"):
            eraser.with_alpha([1.0, value])
    with pytest.raises(ValueError, match="must not be NaN"):
        Eraser(u=eraser.u, r=eraser.r, alpha=1.0, layer_indices=LAYERS, layers_path="x", hidden_size=D,
               floor=float("nan"))
    assert eraser.with_alpha(0.0).alpha == (0.0, 0.0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllmeraser.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_refuses_a_sample_of_mutants_with_exit_2_and_one_line(fuzz, tmp_path):
    from tiny_families import build_llava

    goods, mutants = fuzz
    model = build_llava(tmp_path / "model")
    named = {name: (path, needle) for name, path, needle in mutants}
    chosen = ["knn/alpha[0]=nan", "knn/unknown tensor gate._device_cache", "knn/metadata=[]",
              "knn/gate.forget_bank holds nan (0)", "knn/header length 2147483648"]
    chosen += random.Random(0).sample(sorted(set(named) - set(chosen)), CLI_SAMPLE - len(chosen))
    arguments = ["generate", "--model", str(model), "--prompt", "Who is Alma Reyes?", "--max-new-tokens", "2"]
    control = run_cli(*arguments, "--eraser", str(goods["knn"]))
    assert control.returncode == 0, control.stderr  # the arguments are right: the eraser is what fails below
    for name in chosen:
        path, needle = named[name]
        result = run_cli(*arguments, "--eraser", str(path))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (name, result.stderr)
        assert str(path) in lines[0] and needle in lines[0], (name, lines[0])
    for strength in ("nan", "inf"):  # argparse's float() takes both; the good file with a bad --alpha
        result = run_cli(*arguments, "--eraser", str(goods["knn"]), "--alpha", strength)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"mllmeraser: error: --alpha must be a finite number, got {float(strength)}"], result.stderr
