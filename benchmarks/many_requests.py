"""Many deletion requests behind one gate structure (core/index.py): generation overhead, gate memory, and the
time to add and to drop one request, for K = 1, 10, 100 and 1000 synthetic requests at d=4096.

Model: the random-weight LlavaForConditionalGeneration of overhead.py's wide case (LLaVA-1.5-7B's decoder
width: d=4096, 32 heads, MLP 11008, vocab 32064) with `--layers` decoder layers. Requests: knn prompt gates
deciding at layer 1 and steering layers 1..L-1, each `--rows` unit random forget rows (float16), all on one
shared `--retain`-row retain bank (float16; retain_90's scale), random directions, threshold log 2. Request 0's
forget bank also holds the benchmark prompt's own pooled feature, so on that prompt exactly one request of K
fires (the realistic case); on a second prompt of the same length none fires.

Per K it prints:
  * generation overhead: median wall time with the index attached / vanilla, batch 1, a `--prompt`-token
    prompt and `--new` new tokens; rounds of (vanilla, one fires, none fires) interleaved `--repeats` times;
    printed as the ratio of medians (as overhead.py) and as the median of each round's own ratio, which a
    change in the machine's load between rounds (other processes on a shared machine) moves less;
  * the gate decision alone (pooled feature -> decisions and fired terms), median ms, for the index and for
    the stacked Eraser (Eraser.concat) that holds the same requests;
  * gate memory (MiB of banks + directions): the index at its allocated capacity; the stacked Eraser
    attached (float16 banks + their float32 scoring copies + directions); and, by formula, the same Eraser
    before retain rows were shared (one retain copy per request);
  * add and drop, median over `--ops` operations: RequestIndex.add / remove (add with the index's own retain
    tensor, and with a request holding its own copy of the retain bank, as one loaded from its own file would:
    then the add also compares the two banks), and the stacked Eraser's concat / drop; timed with
    `--control-threads` intra-op threads (1: these are control-plane operations, and on a loaded machine each
    OpenMP parallel region of a small op can wait a scheduler tick, measured 40 ms per add at 2 threads vs
    0.3 ms at 1).
Bar: 1000 requests cost <= 3% generation overhead and add/drop in under a second.
Run: python benchmarks/many_requests.py [--layers 4] [--repeats 5] [--ks 1 10 100 1000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from mllmeraser.core import gating
from mllmeraser.core.compat import model_fingerprint
from mllmeraser.core.eraser import Eraser
from mllmeraser.core.capture import capture
from mllmeraser.core.decoder_layers import find_decoder_layers
from mllmeraser.core.prompt_steering import FixedPromptTerms
from mllmeraser.core.index import RequestIndex
from overhead import wide_llava  # the same model as overhead.py's wide case (benchmarks/ is on sys.path)

THRESHOLD = math.log(2.0)  # fires where the nearest forget row is twice as near as the nearest retained one


class Requests:
    """Synthetic requests on one model: seeded unit random forget rows, one shared retain bank (one tensor,
    one owner vector: no per-request copy), random directions."""

    def __init__(self, model, rows: int, retain: int, seed: int = 0):
        names, layers = find_decoder_layers(model)
        self.d = model.config.get_text_config().hidden_size
        self.layers_path, self.layer_indices = names[0].rsplit(".", 1)[0], list(range(1, len(layers)))
        self.rows, self.fingerprint = rows, model_fingerprint(model)
        generator = torch.Generator().manual_seed(seed)
        self.retain = gating.unit_rows(torch.randn(retain, self.d, generator=generator)).to(torch.float16)
        self.retain_owner = torch.full((retain,), gating.SHARED, dtype=torch.int64)

    def make(self, k: int, plant: torch.Tensor | None = None, own_retain: bool = False) -> Eraser:
        """Request k (seeded by k); `plant`: a pooled feature [1, d] put in its forget bank."""
        generator = torch.Generator().manual_seed(10_000 + k)
        forget = torch.randn(self.rows, self.d, generator=generator)
        if plant is not None:
            forget[0] = plant[0]
        gate = gating.PromptGate(kind="knn", pooling="mean", layer=1, threshold=[THRESHOLD], neighbours=1,
                                 forget_bank=gating.unit_rows(forget), forget_owner=torch.zeros(self.rows, dtype=torch.int64),
                                 retain_bank=self.retain.clone() if own_retain else self.retain,
                                 retain_owner=self.retain_owner)
        r = torch.randn(1, len(self.layer_indices), self.d, generator=generator) * 0.5
        return Eraser(u=None, prompt_gate=gate, r=r, alpha=1.0, layer_indices=self.layer_indices,
                      layers_path=self.layers_path, hidden_size=self.d,
                      metadata={"fingerprint": self.fingerprint, "requests": [{"name": f"request-{k}"}]})


def median_ms(operation, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        operation()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def add_drop(index: RequestIndex, stacked: Eraser, requests: Requests, k: int, ops: int) -> dict[str, float]:
    """Median ms of: index add (shared retain tensor), index add (own retain copy), index remove, Eraser.concat of
    the stack and one more request, Eraser drop; each op on a fresh request, the index and the stacked Eraser left
    as they were."""
    times: dict[str, list[float]] = {name: [] for name in ("add", "add_copy", "drop", "plus", "minus")}
    for op in range(ops):
        extra = requests.make(k + 1 + op)
        copy = requests.make(k + 1 + op, own_retain=True)
        for name, eraser in (("add", extra), ("add_copy", copy)):
            started = time.perf_counter()
            index.add("extra", eraser)
            times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            index.remove("extra")
            times["drop"].append(time.perf_counter() - started)
        started = time.perf_counter()
        grown = Eraser.concat([stacked, copy])
        times["plus"].append(time.perf_counter() - started)
        started = time.perf_counter()
        grown.drop(op % grown.num_terms)
        times["minus"].append(time.perf_counter() - started)
        del grown, copy, extra
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def eraser_mib(eraser: Eraser) -> float:
    """An attached stacked Eraser's gate: float16 banks, their float32 scoring copies, float32 directions."""
    gate = eraser.prompt_gate
    banks = gate.forget_bank.numel() + gate.retain_bank.numel()
    return (banks * (2 + 4) + eraser.r.numel() * 4) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--rows", type=int, default=10, help="forget bank rows per request")
    parser.add_argument("--retain", type=int, default=9000, help="shared retain bank rows (retain_90: ~9k)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved generation rounds per K")
    parser.add_argument("--ops", type=int, default=20, help="add / drop operations timed per K")
    parser.add_argument("--prompt", type=int, default=600, help="prompt tokens")
    parser.add_argument("--new", type=int, default=20, help="new tokens")
    parser.add_argument("--control-threads", type=int, default=1, help="intra-op threads while timing add / drop")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    model = wide_llava(args.layers)
    _, layers = find_decoder_layers(model)
    prompt_ids = torch.randint(0, 32000, (2, args.prompt), generator=torch.Generator().manual_seed(1))
    prompts = {"fires": prompt_ids[:1], "none": prompt_ids[1:]}
    _, pooled = capture(model, layers[:2], 1, "mean", input_ids=prompts["fires"])  # what the gate reads
    requests = Requests(model, args.rows, args.retain)

    def generate(ids):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False)

    generate(prompts["fires"])  # warm-up
    print(f"random LLaVA-1.5-7B-width decoder (d={requests.d}, {args.layers} layers), batch 1 x {args.prompt} prompt "
          f"+ {args.new} new tokens; requests: {args.rows} forget rows each, one shared {args.retain}-row retain "
          f"bank, knn at layer 1, steering layers {requests.layer_indices}; {args.repeats} generation rounds, "
          f"{args.ops} add/drop ops per K", flush=True)
    header = ("K", "overhead one fires (paired)", "overhead none fires (paired)", "decide ms index / Eraser", "MiB index",
              "MiB Eraser", "MiB Eraser, retain per request", "add ms index (same / own retain)", "drop ms index",
              "Eraser concat ms", "Eraser drop ms")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for K in args.ks:
        erasers = [requests.make(k, plant=pooled if k == 0 else None) for k in range(K)]
        index = RequestIndex.like(erasers[0])
        for k, eraser in enumerate(erasers):
            index.add(f"request-{k}", eraser)
        stacked = Eraser.concat(erasers)
        fired = {case: int(index.decide(capture(model, layers[:2], 1, "mean", input_ids=ids)[1]).sum())
                 for case, ids in prompts.items()}
        assert fired == {"fires": 1, "none": 0}, f"expected one request to fire on the first prompt only: {fired}"
        fixed = FixedPromptTerms(stacked.prompt_gate, stacked.r, torch.tensor(stacked.alpha))
        decide_ms = (median_ms(lambda: index.prompt_decision(pooled), 50),
                     median_ms(lambda: fixed.prompt_decision(pooled), 50))
        timings: dict[str, list[float]] = {"vanilla": [], "fires": [], "none": []}
        for _ in range(args.repeats):  # interleaved: drifts in machine load hit all three alike
            for case in ("vanilla", "fires", "none"):
                ids = prompts["fires" if case == "vanilla" else case]
                if case == "vanilla":
                    begin = time.perf_counter()
                    generate(ids)
                    timings[case].append(time.perf_counter() - begin)
                    continue
                with index.attach(model):
                    begin = time.perf_counter()
                    generate(ids)
                    timings[case].append(time.perf_counter() - begin)
        base = statistics.median(timings["vanilla"])
        ratio = {case: statistics.median(timings[case]) / base for case in ("fires", "none")}
        paired = {case: statistics.median(t / v for t, v in zip(timings[case], timings["vanilla"]))
                  for case in ("fires", "none")}
        threads = torch.get_num_threads()
        torch.set_num_threads(args.control_threads)
        try:
            ops = add_drop(index, stacked, requests, K, args.ops)
        finally:
            torch.set_num_threads(threads)
        per_request_retain = (K * args.retain + K * args.rows) * requests.d * (2 + 4) + stacked.r.numel() * 4
        row = (f"{K}", f"{ratio['fires']:.3f} ({paired['fires']:.3f})", f"{ratio['none']:.3f} ({paired['none']:.3f})",
               f"{decide_ms[0]:.1f} / {decide_ms[1]:.1f}",
               f"{index.memory_bytes() / 2**20:.0f}", f"{eraser_mib(stacked):.0f}", f"{per_request_retain / 2**20:.0f}",
               f"{ops['add']:.1f} / {ops['add_copy']:.1f}", f"{ops['drop']:.1f}", f"{ops['plus']:.0f}",
               f"{ops['minus']:.0f}")
        print("| " + " | ".join(row) + " |", flush=True)
        print(f"  (K={K}: vanilla median {base:.1f} s; generation times vanilla {_fmt(timings['vanilla'])}, one fires "
              f"{_fmt(timings['fires'])}, none fires {_fmt(timings['none'])}; index capacity {index.capacity})",
              flush=True)
        del erasers, index, stacked, fixed
    print(f"({time.perf_counter() - started:.0f}s)")
    return 0


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


if __name__ == "__main__":
    sys.exit(main())
