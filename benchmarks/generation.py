"""Generation speed: alignkit's engine (`alignkit.rollout.generate`) vs `transformers` `model.generate()`.

    python benchmarks/generation.py            # about 4 minutes on a quiet 2-core machine
    python benchmarks/generation.py --quick    # about 1 minute: 16 new tokens, one repeat

Both generators run the same model, prompts and sampling settings (temperature 1.0, top-k off,
top-p 1.0, `min_new_tokens = max_new_tokens` so EOS never ends a row early and both produce exactly
B x N tokens), interleaved, each measured `--repeats` times; the table reports the fastest run of each
(the least disturbed by other load: timings on this shared machine drift by 10-25%, and any other
process makes 2-thread runs far slower). Before each measurement the script waits up to 30 s for the
CPU to be idle and notes in the table how busy it still was.

Models: the tiny benchmark Llama of BENCHMARK.md (`bench_llama()`, 5.2M params) with the tiny
tokenizer, and SmolLM2-135M-Instruct (`alignkit.tasks.embedded.smollm2_dir()`). Prompts are
`--prompt-tokens` long at most (lengths vary by row, so the batch is left-padded).

"% of peak" = (2 x matmul parameters x tokens processed) / time / the machine's fp32 matmul rate,
measured here with a 2048^3 `torch.mm`. Tokens processed = B x P (prompt pass) + B x (N - 1)
(decode steps); matmul parameters exclude an untied input embedding (a lookup, not a product).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from alignkit.rollout import SamplingConfig, generate, prefill_positions  # noqa: E402
from alignkit.rollout import sampling as sampling_mod  # noqa: E402


def cpu_busy(interval: float = 0.5) -> float:
    """Share of all CPUs busy over `interval` seconds (from /proc/stat; 0.0 where unavailable)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit: float = 0.15, max_wait: float = 30.0) -> float:
    start, busy = time.time(), cpu_busy()
    while busy > limit and time.time() - start < max_wait:
        busy = cpu_busy()
    return busy


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n x n torch.mm, best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_params(model) -> int:
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def make_prompts(tokenizer, batch: int, max_len: int, pad_id: int):
    """Left-padded prompts of varied length (max_len/2 .. max_len tokens) from a fixed text."""
    sentence = "Write a short review of the product number {}, mentioning its good and bad sides."
    text = " ".join(sentence.format(i) for i in range(40))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[3 * i : 3 * i + max_len - (i * 7) % (max_len // 2 + 1)] for i in range(batch)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def run_ours(model, ids, mask, n: int, eos: int, pad: int):
    cfg = SamplingConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         seed=0)
    return generate(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=pad)


def run_hf(model, ids, mask, n: int, eos: int, pad: int):
    torch.manual_seed(0)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)


def compare(name, model, ids, mask, n, eos, pad, repeats, peak):
    """Interleaved timings of both generators -> one table row per generator."""
    b, p = ids.shape
    times: dict[str, list[float]] = {"model.generate()": [], "alignkit generate": []}
    busy = []
    for _ in range(repeats):
        for label, fn in (("model.generate()", run_hf), ("alignkit generate", run_ours)):
            busy.append(wait_quiet())
            times[label].append(_timed(lambda: fn(model, ids, mask, n, eos, pad)))
    flops = 2 * matmul_params(model) * (b * p + b * (n - 1))
    rows = []
    for label, ts in times.items():
        best = min(ts)
        rows.append((name, b, p, n, label, best, b * n / best, 100 * flops / best / 1e9 / peak))
    speedup = min(times["model.generate()"]) / min(times["alignkit generate"])
    return rows, speedup, max(busy)


def print_table(rows, speedups):
    print("\n| model | batch | prompt P | new N | generator | best s | tokens/s | % of fp32 peak | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{speedups[(r[0], r[1])]:.2f}x" if r[4] == "alignkit generate" else ""
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.0f} | {r[7]:.1f}% | {sp} |")


@contextmanager
def timers(model):
    """Accumulate wall time of: every model forward (the first one is the prompt pass), the output
    layer, and token selection (sampling), via forward hooks and a wrapper on TokenChooser."""
    acc = {"forwards": [], "head": 0.0, "sampling": 0.0}
    marks = {}

    def pre(key):
        return lambda *a: marks.__setitem__(key, time.perf_counter())

    def post_model(*a):
        acc["forwards"].append(time.perf_counter() - marks["model"])

    def post_head(*a):
        acc["head"] += time.perf_counter() - marks["head"]

    head = model.get_output_embeddings()
    hooks = [model.register_forward_pre_hook(pre("model")), model.register_forward_hook(post_model),
             head.register_forward_pre_hook(pre("head")), head.register_forward_hook(post_head)]
    original = sampling_mod.TokenChooser.__call__

    def timed_call(self, logits, step):
        t = time.perf_counter()
        out = original(self, logits, step)
        acc["sampling"] += time.perf_counter() - t
        return out

    sampling_mod.TokenChooser.__call__ = timed_call
    try:
        yield acc
    finally:
        sampling_mod.TokenChooser.__call__ = original
        for h in hooks:
            h.remove()


def breakdown(model, ids, mask, n, eos, pad):
    """Where one alignkit generate call's wall time goes."""
    wait_quiet()
    with timers(model) as acc:
        wall = _timed(lambda: run_ours(model, ids, mask, n, eos, pad))
    forwards = sum(acc["forwards"])
    decode_head = acc["head"] * (1 - 1 / len(acc["forwards"]))  # one head call of equal size per forward
    parts = [
        ("prompt pass (1 forward, incl. its output layer)", acc["forwards"][0]),
        ("decode forwards: transformer body", forwards - acc["forwards"][0] - decode_head),
        ("decode forwards: output layer (lm_head)", decode_head),
        ("token selection (sampling, log-probs)", acc["sampling"]),
        ("other (weight packing, cache, loop)", wall - forwards - acc["sampling"]),
    ]
    print(f"\nBreakdown of one alignkit generate call, batch {ids.shape[0]}, P {ids.shape[1]}, N {n}: {wall:.2f} s")
    print("| part | s | share |\n|---|---|---|")
    for label, s in parts:
        print(f"| {label} | {s:.2f} | {100 * s / wall:.0f}% |")
    steps = len(acc["forwards"]) - 1
    print(f"per decode step: {1000 * (forwards - acc['forwards'][0]) / max(1, steps):.0f} ms forward, "
          f"{1000 * acc['sampling'] / (steps + 1):.1f} ms sampling")


def micro(model, batch: int, repeats: int = 10):
    """The two hot spots of model.generate() on this CPU, at decode shape: output layer and sampling."""
    head = model.get_output_embeddings()
    w = head.weight.detach()
    x = torch.randn(batch, w.shape[1])
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    wn, xn = w.numpy(), x.numpy()
    logits = torch.randn(batch, w.shape[0])
    gen = torch.Generator().manual_seed(0)

    def best(fn):
        fn()
        return 1000 * min(_timed(fn) for _ in range(repeats))

    with torch.inference_mode():
        rows = [
            (f"output layer {batch}x{w.shape[1]} @ {w.shape[1]}x{w.shape[0]}: torch F.linear",
             best(lambda: torch.nn.functional.linear(x, w))),
            ("  same through numpy (OpenBLAS)", best(lambda: xn @ wn.T)),
            ("  same through oneDNN, prepacked weight (used)",
             best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))),
            (f"sampling {batch}x{w.shape[0]}: softmax + torch.multinomial (as model.generate)",
             best(lambda: torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))),
            ("  softmax + inverse-CDF draw (used)",
             best(lambda: sampling_mod.inverse_cdf_sample(torch.softmax(logits, -1), gen))),
        ]
    print("\nDecode-shape micro-benchmarks (best of %d, ms):" % repeats)
    print("| operation | ms |\n|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.1f} |")


def exactness(model, ids, mask, n, eos, pad) -> float:
    """max |log-prob from generate - log-prob from one teacher-forced forward| over generated tokens."""
    gen = run_ours(model, ids, mask, n, eos, pad)
    full = torch.cat([ids, gen.response_ids], 1)
    fmask = torch.cat([mask, gen.response_mask.long()], 1)
    with torch.inference_mode():
        logits = model(input_ids=full, attention_mask=fmask, position_ids=prefill_positions(fmask)).logits
    logits = logits[:, ids.shape[1] - 1 : -1].float()
    tf = torch.log_softmax(logits, -1).gather(-1, gen.response_ids.unsqueeze(-1)).squeeze(-1)
    return float((tf - gen.logps).abs().masked_fill(~gen.response_mask, 0).max())


def load_models(which: list[str]):
    out = []
    if "tiny" in which:
        from alignkit.models.tiny import bench_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        out.append(("tiny Llama 5.2M", bench_llama().eval(), tok))
    if "smollm2" in which:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from alignkit.tasks.embedded import smollm2_dir

        path = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out.append(("SmolLM2-135M", model, AutoTokenizer.from_pretrained(path)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one repeat, smaller breakdown")
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (16 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    n = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs")
    wait_quiet()
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 torch.mm, best of 5): {peak:.1f} GFLOP/s")
    print(f"sampling: temperature 1.0, top_k 0, top_p 1.0, max_new_tokens = min_new_tokens = {n} (EOS ignored), "
          f"prompts up to {args.prompt_tokens} tokens, left-padded; best of {repeats} interleaved runs")
    rows, speedups, busiest = [], {}, 0.0
    models = load_models(args.models.split(","))
    for name, model, tok in models:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for b in (int(x) for x in args.batch_sizes.split(",")):
            ids, mask = make_prompts(tok, b, args.prompt_tokens, pad)
            run_ours(model, ids[:, -4:], mask[:, -4:], 2, tok.eos_token_id, pad)  # warm-up
            r, speedup, busy = compare(name, model, ids, mask, n, tok.eos_token_id, pad, repeats, peak)
            rows += r
            speedups[(name, b)] = speedup
            busiest = max(busiest, busy)
            print(f"  {name} batch {b}: {speedup:.2f}x", file=sys.stderr)
    print_table(rows, speedups)
    print(f"(CPU busy before a measurement, worst case: {100 * busiest:.0f}% of all cores"
          f"{'; other load was present, timings are pessimistic and noisy' if busiest > 0.2 else ''})")
    for name, model, tok in models:
        if name.startswith("SmolLM2"):
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids, mask = make_prompts(tok, 8, args.prompt_tokens, pad)
            err = exactness(model, ids, mask, 16, tok.eos_token_id, pad)
            print(f"\n{name}: max |logp(generate) - logp(teacher forcing)| = {err:.2e} (8 x 16 sampled tokens)")
            micro(model, 32)
            ids, mask = make_prompts(tok, 32, args.prompt_tokens, pad)
            breakdown(model, ids, mask, n, tok.eos_token_id, pad)


if __name__ == "__main__":
    main()
