"""Load on `mllmeraser serve`: concurrent clients with mixed eraser sets against the small testbed, on loopback.

1. The small testbed (built or reused from the cache) and two one-person erasers fitted on it (reduced sets, as
   in tests/test_serving.py), or the erasers in `--erasers DIR`.
2. A workload of `--requests` chat completions (image and text generation questions about two forget people and
   two retain people), each sent with one of two tenant keys: key-a bound to one eraser, key-b to both.
3. Three runs of that workload, each bounded by `--max-seconds`:
   - sequential: `models.generate` on one request at a time with its tenant's erasers attached (what a loop over
     `mllmeraser generate` does, without the start-ups);
   - the eraser server: `--clients` concurrent OpenAI clients against the server with both tenants;
   - the vanilla server: the same clients against a server with no eraser (the per-row gate's cost).
Prints throughput (requests/s), the batched/sequential ratio, p50/p99 latency, the eraser/vanilla server ratio,
and how many server answers differ from their single-request answer (0 expected).
Run: python benchmarks/serve_load.py [--clients 16] [--requests 256] [--repeats 5] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from openai import OpenAI

from mllmeraser import serve
from mllmeraser.bench import data
from mllmeraser.core import models
from mllmeraser.core.eraser_fitter import fit_eraser
from mllmeraser.core.settings import FitSettings, PGDSettings
from mllmeraser.core.inputs import as_items
from mllmeraser.testbed.preset_build import build

PEOPLE = {"p1": "F0001", "p2": "F0006"}
TENANTS = {"key-a": ["p1"], "key-b": ["p1", "p2"]}


def person_erasers(model, processor, data_dir: Path, out: Path) -> None:
    """One eraser per person in PEOPLE, fitted on reduced retain/erasure/calibration samples, saved under `out`."""
    rng = random.Random(0)
    forget = data.load_split_items(data_dir, "forget", 10)
    samples = [rng.sample(list(items), k) for items, k in ((data.retained_inputs(data_dir, 10), 300),
                                                          (data.default_erasure_items(data_dir), 60),
                                                          (data.validation_items(data_dir, 10), 80))]
    for name, person in PEOPLE.items():
        torch.manual_seed(0)
        mine = [item for item in forget if item.subject_id == person]
        fit_eraser(model, processor, forget=mine, retain=samples[0], erasure=samples[1], calibration=samples[2],
                   settings=FitSettings(pgd=PGDSettings(steps=2)), request=person, progress=False
                   ).save(out / f"{name}.safetensors")


def workload(data_dir: Path, count: int) -> list[tuple[str, object, str]]:
    """(tenant key, image or None, prompt) for `count` requests, tenants alternating."""
    people = ("forget", ["F0001", "F0006"]), ("retain", None)
    questions = []
    for split, wanted in people:
        items = [i for i in data.load_split_items(data_dir, split, 10) if i.task == "generation"]
        subjects = wanted or sorted({i.subject_id for i in items})[:2]
        questions += [(i.image if i.modality == "image" else None, i.prompt) for i in items if i.subject_id in subjects]
    rng = random.Random(0)
    return [(("key-a", "key-b")[n % 2], *rng.choice(questions)) for n in range(count)]


def messages(image, prompt: str) -> list[dict]:
    parts = []
    if image is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                         + base64.b64encode(buffer.getvalue()).decode()}})
    return [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]


def sequential(model, processor, erasers: dict, requests, max_tokens: int, deadline: float) -> tuple[list[str], float]:
    """One request at a time, its tenant's erasers attached around it (stacked once per tenant beforehand, the
    fingerprint checked once), as a loop over `mllmeraser generate` would without its start-ups."""
    stacked = {key: serve.policy.combine(erasers[name] for name in names) for key, names in TENANTS.items()}
    for eraser in stacked.values():
        eraser.attach(model).remove()  # the fingerprint check, once
    answers, started = [], time.perf_counter()
    for key, image, prompt in requests:
        if time.perf_counter() > deadline:
            break
        with stacked[key].attach(model, check_fingerprint=False):
            answers += models.generate(model, processor, as_items([(image, prompt, "")]), max_tokens)
    return answers, time.perf_counter() - started


def load(base: str, requests, clients: int, max_tokens: int, deadline: float):
    """(answers, latencies, wall seconds) of `requests` sent by `clients` concurrent OpenAI clients."""
    pool = {key: OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600) for key in TENANTS}

    def one(request):
        key, image, prompt = request
        if time.perf_counter() > deadline:
            return None
        sent = time.perf_counter()
        response = pool[key].chat.completions.create(model="testbed", messages=messages(image, prompt),
                                                     max_tokens=max_tokens)
        return response.choices[0].message.content, time.perf_counter() - sent

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as executor:
        results = [r for r in executor.map(one, requests) if r is not None]
    return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound on each of the three runs")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each server (the median is reported)")
    parser.add_argument("--erasers", type=Path, default=None, help="a directory with p1.safetensors, p2.safetensors")
    args = parser.parse_args()

    testbed = build(seed=0, preset="small", progress=False)
    model, processor = models.load_model(testbed / "model")
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.erasers
        if directory is None:
            started = time.perf_counter()
            directory = Path(tmp)
            person_erasers(model, processor, testbed / "data", directory)
            print(f"fitted 2 one-person erasers in {time.perf_counter() - started:.1f}s")
        erasers = serve.load_erasers(directory)
    requests = workload(testbed / "data", args.requests)
    settings = serve.ServeSettings(model_name="testbed", max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000)

    singles, seq_wall = sequential(model, processor, erasers, requests, args.max_tokens,
                                   time.perf_counter() + args.max_seconds)
    rows = [("sequential generate", len(singles), seq_wall, None)]
    runs: dict[str, list] = {"server, 2 tenants": [], "server, vanilla": []}
    for repeat in range(args.repeats):  # the two servers alternate, so drifts in machine load hit both
        for label, chosen, tenants in (("server, 2 tenants", erasers, TENANTS), ("server, vanilla", {}, None)):
            app = serve.create_app(model, processor, serve.Registry(chosen, model, tenants), settings)
            with serve.serving(app) as base:
                load(base, requests[: args.clients], args.clients, args.max_tokens, time.perf_counter() + 60)  # warm-up
                warm = len(app.state.engine.batches)
                answers, latencies, wall = load(base, requests, args.clients, args.max_tokens,
                                                time.perf_counter() + args.max_seconds)
            runs[label].append((len(answers) / wall, len(answers), wall, latencies, app.state.engine.batches[warm:]))
            if tenants is not None:
                differ = sum(a != b for a, b in zip(answers, singles))
                print(f"run {repeat + 1}: answers differing from their single-request answer: {differ} of "
                      f"{min(len(answers), len(singles))}")
    for label, results in runs.items():
        _, done, wall, latencies, batches = sorted(results, key=lambda r: r[0])[len(results) // 2]  # the median run
        rows.append((label, done, wall, latencies))
        print(f"{label} (median of {len(results)} runs): {len(batches)} batches, mean {statistics.mean(batches):.1f} "
              f"rows; req/s of every run: {', '.join(f'{r[0]:.1f}' for r in results)}")

    print(f"\n{len(requests)} requests, {args.clients} clients, max_tokens {args.max_tokens}, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, {torch.get_num_threads()} threads")
    print("| run | requests | wall s | req/s | p50 latency s | p99 latency s |\n|---|---|---|---|---|---|")
    for label, done, wall, latencies in rows:
        lat = ("-", "-") if latencies is None else (f"{percentile(latencies, 0.5):.2f}", f"{percentile(latencies, 0.99):.2f}")
        print(f"| {label} | {done} | {wall:.1f} | {done / wall:.2f} | {lat[0]} | {lat[1]} |")
    paired = [eraser[0] / vanilla[0] for eraser, vanilla in zip(runs["server, 2 tenants"], runs["server, vanilla"])]
    print("eraser / vanilla server throughput, run by run: " + ", ".join(f"{ratio:.2f}x" for ratio in paired))
    throughput = {label: done / wall for label, done, wall, _ in rows}
    print(f"\nbatched server / sequential generate: {throughput['server, 2 tenants'] / throughput['sequential generate']:.2f}x "
          f"throughput; eraser server / vanilla server: {throughput['server, 2 tenants'] / throughput['server, vanilla']:.3f}x")


if __name__ == "__main__":
    main()
