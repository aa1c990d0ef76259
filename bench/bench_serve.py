"""Serving throughput of serve.py, one client beside many at once, in one run:
  1. one client: streamed greedy answers of NEW_TOKENS tokens, one request after another;
  2. CLIENTS clients at once, each streaming the same kind of answer to its own question.
  3. closed loop: CLIENTS clients, each sending its next question as soon as its answer ends,
     for --loop-seconds, against one client doing the same (the tokens/s is the server's own
     count of tokens generated in that window, so the last answers' tail does not count).
Reports tokens/s in all for each, their ratio, the time to first token (p50 and p95, from
sending the request to its first event, which serve.py sends with the first generated token)
and the requests that failed. Each phase
runs ROUNDS times; the median round counts.

The model is the demo's size (dim 128, 4 layers, 4 heads, context 256) over a 4096-piece
vocabulary trained here on ../shared/data text, with random weights: speed does not depend
on what the weights say, and greedy decoding makes every round do the same work. With --ckpt,
a trained model instead (e.g. the demo's out/demo/sft): its answers end at eos at their own
lengths, which is where a closed loop, keeping every row of the batch busy, differs from
clients that ask once. serve.py runs in a child process on 127.0.0.1, started as a user starts it.

    python bench/bench_serve.py [--clients 16] [--new-tokens 128] [--threads 2] [--ckpt out/demo/sft]

Targets on a 2-core CPU: in a closed loop CLIENTS clients >= 6x the tokens/s of one client; with
the random model (every answer NEW_TOKENS long) also CLIENTS clients asking at once >= 5x; and
no request fails. A trained model's one-shot clients fall short of that by design: their short
answers leave the batch early, so it runs part-empty for the rest of the round.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve  # noqa: E402
from chatglm_tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, tokenizer_for_checkpoint  # noqa: E402
from eval import read_qa  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from prompt import sft_prompt_ids  # noqa: E402

# -----------------------------------------------------------------------------
# defaults (flags override)
CLIENTS = 16
NEW_TOKENS = 128
ROUNDS = 3
MODEL = dict(dim=128, n_layers=4, n_heads=4, max_seq_len=256)  # the demo's model
VOCAB_SIZE = 4096
TEXT = ROOT / "../shared/data/pretrain/medical_texts.jsonl"  # the vocabulary's training text
N_TEXTS = 5000
QA_DATA = ROOT / "../shared/data/medical_qa/huatuo26m_test_eval.jsonl"
OUT_DIR = ROOT / "out/bench_serve"
LOOP_SECONDS = 30.0
LOOP_QUESTIONS = 8  # questions per client in the closed loop (asked again in turn if it runs out)
# -----------------------------------------------------------------------------


def demo_sized_checkpoint(out_dir):
    """A 4096-piece vocabulary (trained once, then reused) and a random demo-sized SFT checkpoint."""
    tok_path = out_dir / "tokenizer.model"
    if not tok_path.is_file():
        with open(TEXT, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for _, line in zip(range(N_TEXTS), f)]
        train_sentencepiece(texts, VOCAB_SIZE, tok_path, character_coverage=0.99)
    tokenizer = Tokenizer(tok_path)
    torch.manual_seed(0)
    model_args = ModelArgs(vocab_size=tokenizer.vocab_size, **MODEL)
    path = out_dir / "model.pt"
    save_checkpoint(path, {"kind": "sft", "model_args": model_args.to_dict(), "tokenizer": tokenizer.identity(),
                           "model": Transformer(model_args).state_dict(), "step": 0})
    return path, tokenizer


def ttft_percentiles(ttft):
    """p50 and p95 of sorted times to first token (None without any)."""
    return {"ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))] if ttft else None}


async def one_stream(http, url, question, new_tokens):
    """-> (seconds to the first text, seconds in all, tokens generated); raises on a failure."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": new_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage = None, None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(event["error"]["message"])
            if first is None:  # serve.py sends its first event with the first token
                first = time.perf_counter() - t0
            usage = event.get("usage") or usage
    return first, time.perf_counter() - t0, usage["completion_tokens"]


async def phase(url, questions, new_tokens, together):
    """Every question streamed, all at once (together) or one after another. -> result dict."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(questions))) as http:
        t0 = time.perf_counter()
        if together:
            results = await asyncio.gather(*(one_stream(http, url, q, new_tokens) for q in questions),
                                           return_exceptions=True)
        else:
            results = [await one_stream(http, url, q, new_tokens) for q in questions]
        wall = time.perf_counter() - t0
    done = [r for r in results if not isinstance(r, BaseException)]
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    ttft = sorted(r[0] for r in done if r[0] is not None)
    tokens = sum(r[2] for r in done)
    return {"requests": len(questions), "failed": len(failed), "failures": failed[:3], "tokens": tokens,
            "short_answers": sum(r[2] < new_tokens for r in done), "wall_s": wall, "tokens_per_s": tokens / wall,
            **ttft_percentiles(ttft)}


async def closed_loop(url, queues, new_tokens, seconds):
    """Each queue is one client asking its questions one after another, the next as soon as an
    answer ends, until `seconds` have passed. -> result dict; tokens/s from the server's count."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=len(queues))) as http:
        before = (await http.get(url + "/health")).json()["tokens_generated"]
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def client(queue):
            done = []
            while time.perf_counter() < deadline:
                done.append(await one_stream(http, url, queue[len(done) % len(queue)], new_tokens))
            return done

        window = asyncio.ensure_future(asyncio.sleep(seconds))
        clients = asyncio.gather(*(client(q) for q in queues), return_exceptions=True)
        await window
        in_window = (await http.get(url + "/health")).json()["tokens_generated"] - before
        results = await clients  # the answers under way finish, outside the window
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    answers = [a for r in results if not isinstance(r, BaseException) for a in r]
    ttft = sorted(a[0] for a in answers if a[0] is not None)
    return {"clients": len(queues), "failed": len(failed), "failures": failed[:3], "answers": len(answers),
            "mean_answer_tokens": statistics.mean(a[2] for a in answers) if answers else None,
            "window_s": seconds, "tokens_in_window": in_window, "tokens_per_s": in_window / seconds,
            **ttft_percentiles(ttft)}


def median_round(rounds):
    return sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]


def main():
    p = argparse.ArgumentParser(description="serve.py tokens/s: many concurrent streaming clients vs one.")
    p.add_argument("--clients", type=int, default=CLIENTS, help="clients streaming at once")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens per answer (greedy)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="times each phase runs (the median counts)")
    p.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads (default: torch's choice)")
    p.add_argument("--loop-seconds", type=float, default=LOOP_SECONDS, help="length of each closed-loop window")
    p.add_argument("--ckpt", default=None, help="a trained SFT checkpoint or out dir (default: a random demo-sized model)")
    p.add_argument("--out-dir", default=str(OUT_DIR), help="tokenizer, checkpoint and summary.json go here")
    cfg = p.parse_args()
    for path in (TEXT, QA_DATA):
        if not path.is_file():
            sys.exit(f"bench_serve.py: error: {path} is missing (the repository's ../shared/data)")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.ckpt:
        ckpt = resolve_checkpoint(cfg.ckpt)
        meta = load_checkpoint(ckpt)
        tokenizer, model = tokenizer_for_checkpoint(meta, None), meta["model_args"]
    else:
        (ckpt, tokenizer), model = demo_sized_checkpoint(out_dir), {**MODEL, "vocab_size": VOCAB_SIZE}
    room = model["max_seq_len"] - cfg.new_tokens  # questions whose whole answer fits the context
    pool = [r["question"] for r in read_qa(QA_DATA, limit=40 * cfg.clients)
            if len(sft_prompt_ids(tokenizer, r["question"])) <= room][:LOOP_QUESTIONS * cfg.clients]
    questions = pool[:cfg.clients]
    flags = ["--ckpt", str(ckpt), "--device", "cpu", "--max-batch", str(cfg.clients)]
    process, url = serve.start_subprocess(flags + (["--threads", str(cfg.threads)] if cfg.threads else []))
    try:
        asyncio.run(phase(url, questions[:2], cfg.new_tokens, together=False))  # warm-up
        single = [asyncio.run(phase(url, questions[:1], cfg.new_tokens, False)) for _ in range(cfg.rounds)]
        many = [asyncio.run(phase(url, questions, cfg.new_tokens, True)) for _ in range(cfg.rounds)]
        loop_one = [asyncio.run(closed_loop(url, [pool], cfg.new_tokens, cfg.loop_seconds))
                    for _ in range(cfg.rounds)]
        queues = [pool[i::cfg.clients] for i in range(cfg.clients)]  # each client its own questions
        loop_many = [asyncio.run(closed_loop(url, queues, cfg.new_tokens, cfg.loop_seconds))
                     for _ in range(cfg.rounds)]
        peak_batch = httpx.get(url + "/health").json()["peak_batch"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    one, together = median_round(single), median_round(many)
    ratio = together["tokens_per_s"] / one["tokens_per_s"]
    loop1, loop16 = median_round(loop_one), median_round(loop_many)
    loop_ratio = loop16["tokens_per_s"] / loop1["tokens_per_s"]
    failed = sum(r["failed"] for r in single + many + loop_one + loop_many)
    summary = {"model": model, "checkpoint": str(cfg.ckpt or ckpt), "clients": cfg.clients,
               "new_tokens": cfg.new_tokens, "threads": cfg.threads or torch.get_num_threads(),
               "one_client": one, "many_clients": together, "speedup": ratio,
               "closed_loop_one_client": loop1, "closed_loop_many_clients": loop16, "closed_loop_speedup": loop_ratio,
               "failed_requests": failed, "peak_batch": peak_batch,
               "rounds": {"one_client": single, "many_clients": many, "closed_loop_one_client": loop_one,
                          "closed_loop_many_clients": loop_many}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"one client:  {one['tokens_per_s']:7.1f} tokens/s  (time to first token {one['ttft_p50_s'] * 1000:.0f} ms)")
    print(f"{cfg.clients} clients: {together['tokens_per_s']:7.1f} tokens/s in all, {ratio:.2f}x one client"
          f"{'' if cfg.ckpt else ' (target >= 5x)'}; time to first token p50 {together['ttft_p50_s'] * 1000:.0f} ms, "
          f"p95 {together['ttft_p95_s'] * 1000:.0f} ms; peak batch {peak_batch}")
    print(f"closed loop, {cfg.loop_seconds:.0f} s windows: one client {loop1['tokens_per_s']:7.1f} tokens/s "
          f"({loop1['mean_answer_tokens']:.0f} tokens per answer); {cfg.clients} clients {loop16['tokens_per_s']:7.1f} "
          f"tokens/s in all ({loop16['mean_answer_tokens']:.0f} per answer), {loop_ratio:.2f}x one client (target >= 6x)")
    print(f"failed requests: {failed}; answers that ended at eos before {cfg.new_tokens} tokens: "
          f"{sum(r['short_answers'] for r in single + many)} of {sum(r['requests'] for r in single + many)} asked once"
          f"  -> {out_dir / 'summary.json'}")
    if failed or loop_ratio < 6 or (ratio < 5 and not cfg.ckpt):
        sys.exit(1)


if __name__ == "__main__":
    main()
