"""Generation speed, in one run so that both comparisons share the machine's state:
  1. decode tokens/s with the KV cache beside recomputing the whole sequence for every new
     token (upstream's way), NEW_TOKENS after a PROMPT_LEN-token prompt, greedy;
  2. eval questions/s (eval.py's generation: the engine with at most --batch-size rows) at
     batch 16 beside batch 1, on real medical questions encoded with the ChatGLM2 tokenizer.
Random weights in the default config (upstream's: dim 512, 8 layers, 8 heads, vocab 64793): speed does not
depend on what the weights say, and greedy decoding makes both sides do the same work.

    python bench/bench_generate.py [--threads 2] [--n-questions 32]

Targets on a 2-core CPU: the cache >= 15x recompute; batch 16 >= 3x the questions/s of batch 1.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm_tokenizer import load_tokenizer  # noqa: E402
import kernels  # noqa: E402
from eval import read_qa  # noqa: E402
from engine import BatchEngine, answer_all, generate  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from prompt import sft_prompt_ids  # noqa: E402

# -----------------------------------------------------------------------------
# defaults (flags override)
PROMPT_LEN = 64
NEW_TOKENS = 256
QA_DATA = ROOT / "../shared/data/medical_qa/huatuo26m_test_eval.jsonl"
TOKENIZER = ROOT / "../shared/data/tokenizer/chatglm2/tokenizer.model"
N_QUESTIONS = 32
EVAL_NEW_TOKENS = 64
BATCH_SIZES = (1, 16)
SEED = 0
# -----------------------------------------------------------------------------


@torch.inference_mode()
def greedy_recompute(model, prompt, new_tokens):
    """The baseline: the whole sequence through the model again for every new token."""
    seq = torch.tensor([prompt])
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq).argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


def weight_read_seconds(model, repeats=5):
    """A cached decode step reads every weight once: the time that takes at the read bandwidth
    of this machine (a sum over a tensor of the weights' size), the step's floor."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block = torch.ones(n_bytes // 4)
    block.sum()
    seconds = min(timed(block.sum)[1] for _ in range(repeats))
    return n_bytes, seconds


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def eval_speed(model, cfg):
    """eval.py's generation (the engine, driven to the end) at each of BATCH_SIZES ->
    ({batch size: questions/s}, the gain of the largest over the smallest)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    rows = read_qa(cfg.data, limit=cfg.n_questions)
    prompts = [sft_prompt_ids(tokenizer, r["question"])[-(model.args.max_seq_len - cfg.eval_new_tokens):] for r in rows]
    q_per_s, answers = {}, {}
    for batch_size in BATCH_SIZES:
        engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=batch_size)
        answers[batch_size], seconds = timed(lambda: answer_all(engine, prompts, cfg.eval_new_tokens))
        q_per_s[batch_size] = len(prompts) / seconds
        print(f"eval batch {batch_size:>2}: {q_per_s[batch_size]:.2f} questions/s "
              f"({len(prompts)} questions, up to {cfg.eval_new_tokens} new tokens)")
    small, large = BATCH_SIZES
    batch_gain = q_per_s[large] / q_per_s[small]
    print(f"eval batch {large} / batch {small}: {batch_gain:.1f}x (target >= 3x); "
          f"same answers: {answers[small] == answers[large]}")
    return q_per_s, batch_gain


def main():
    p = argparse.ArgumentParser(description="Decode speed with and without the KV cache; eval speed by batch size.")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens decoded per side")
    p.add_argument("--data", default=str(QA_DATA), help="QA set whose questions the eval part answers")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="ChatGLM2 tokenizer.model")
    p.add_argument("--n-questions", type=int, default=N_QUESTIONS, help="questions answered at each batch size")
    p.add_argument("--eval-new-tokens", type=int, default=EVAL_NEW_TOKENS, help="max new tokens per answer")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    cfg = p.parse_args()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(SEED)
    model = Transformer(ModelArgs()).to(cfg.device).eval()
    speed = kernels.speed_up(model, cfg.device)
    print(f"default config, {model.num_params() / 1e6:.1f}M params, {cfg.device}, {torch.get_num_threads()} threads; {speed}")

    prompt = torch.randint(3, model.args.vocab_size, (cfg.prompt_len,)).tolist()
    generate(model, [prompt], 4)  # warm-up
    cached, t_cache = timed(lambda: generate(model, [prompt], cfg.new_tokens)[0])
    recomputed, t_full = timed(lambda: greedy_recompute(model, prompt, cfg.new_tokens))
    speedup = t_full / t_cache
    print(f"decode {cfg.new_tokens} after {cfg.prompt_len}: cache {cfg.new_tokens / t_cache:.1f} tok/s, "
          f"recompute {cfg.new_tokens / t_full:.2f} tok/s -> {speedup:.1f}x (target >= 15x); "
          f"same tokens: {cached == recomputed}")
    n_bytes, floor = weight_read_seconds(model)
    print(f"  a cached step reads {n_bytes / 1e6:.0f} MB of weights: at {n_bytes / floor / 1e9:.0f} GB/s "
          f"(this machine's read bandwidth) at least {1e3 * floor:.1f} ms, so the cache can be at most "
          f"{t_full / cfg.new_tokens / floor:.1f}x recompute here ({1e3 * t_cache / cfg.new_tokens:.1f} ms measured)")
    q_per_s, batch_gain = eval_speed(model, cfg)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps({
            "threads": torch.get_num_threads(), "device": cfg.device,
            "decode_cache_tok_s": cfg.new_tokens / t_cache, "decode_recompute_tok_s": cfg.new_tokens / t_full,
            "decode_speedup": speedup, "decode_speedup_ceiling": t_full / cfg.new_tokens / floor,
            "eval_q_per_s": q_per_s, "eval_batch_gain": batch_gain}, indent=2))


if __name__ == "__main__":
    main()
