"""A readable report of a whole run, in one file to read or share: OUT_DIR/report.md, with
the loss curves of pretraining and SFT on one page in OUT_DIR/loss_curves.png.

    python report.py out --pretrain-data 'data/pretrain/*.bin'
    python report.py out/demo --pretrain-data data/demo/pretrain/demo.bin   # what demo.py runs

OUT_DIR holds the stages' out dirs: pretrain/, sft/, dpo/ (when preference tuning ran),
eval/ and cmmlu/ (when eval.py --task cmmlu ran; --pretrain, --sft, --dpo, --eval and --cmmlu
name others). Every number comes from what the stages wrote: checkpoints (settings, steps,
wall-clock), metrics.jsonl (losses), eval's metrics.json and predictions.jsonl, and the
data's meta files. A stage that is missing gets a line saying so, not a failure.

Sections: data; model and training settings; loss curves; final validation losses beside
the unigram entropy (the loss of the best model that knows only how often each token
occurs: a trained model must get well below it); DPO's validation scores before and after;
evaluation scores with 95% confidence
intervals and the baselines; CMMLU accuracy per subject beside chance; sample answers; wall-clock per stage; hardware.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import cli
from atomic import write_text_atomic
from checkpoint import load_checkpoint, tokenizer_for_checkpoint
from corpus import iter_records, stop_at_bad
from dataset import find_bin_files, read_meta
from dataset_sft import build_example, read_sft_examples
from logbook import plot_loss_curves, read_metrics
from model import IGNORE_INDEX, ModelArgs, Transformer
from refusal import Refusal, one_line_refusals

N_SAMPLES = 5  # sample answers shown
TEXT_CHARS = 200  # longest question/answer text shown


# -----------------------------------------------------------------------------
# reading what the stages wrote

def read_jsonl(path):
    """Every record of a JSONL file that a stage wrote; a damaged line is refused, naming it."""
    return [record for _, record in iter_records(Path(path), stop_at_bad)]


def load_stage(out_dir):
    """A training stage's latest checkpoint (without weights) and its metrics rows, or None
    when out_dir holds no checkpoint. The settings are the run's config.json where it wrote
    one: every flag and the values resolved at run time (device, dtype, steps)."""
    if not any(Path(out_dir).glob("*.pt")):
        return None
    ckpt = load_checkpoint(out_dir, prefer="latest")
    for heavy in ("model", "optimizers", "scaler", "rng", "data"):
        ckpt.pop(heavy, None)
    ckpt["rows"] = read_metrics(Path(out_dir) / "metrics.jsonl", up_to_step=ckpt["step"])
    config_path = Path(out_dir) / "config.json"
    if config_path.is_file():
        try:
            ckpt["config"] = {**ckpt.get("config", {}), **json.loads(config_path.read_text(encoding="utf-8"))}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Refusal(f"{config_path} is damaged ({e}); remove it to report from the checkpoint's settings") from None
    return ckpt


def last_val_loss(rows, key="val_loss"):
    """The last logged validation value (val_loss, or key="val_bpc"), None where none was logged."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def unigram_entropy(counts):
    """Entropy in nats of token frequencies: the loss of the best model that ignores context."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def bin_token_counts(bin_paths, block=1 << 24):
    """How often each token id occurs in uint16 .bin files (read a block at a time)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for path in bin_paths:
        ids = np.memmap(path, dtype=np.uint16, mode="r")
        for start in range(0, len(ids), block):
            counts += np.bincount(ids[start:start + block], minlength=1 << 16)
    return counts


def answer_token_counts(jsonl_path, tokenizer, max_seq_len):
    """How often each token id occurs among the SFT loss targets of a file: answer ids + eos,
    cut to the context as training cuts them."""
    ids = []
    for prompt, answer, _ in read_sft_examples(jsonl_path):
        _, y = build_example(tokenizer.encode(prompt), tokenizer.encode(answer), tokenizer.bos_id, tokenizer.eos_id, max_seq_len)
        ids += [i for i in y if i != IGNORE_INDEX]
    return np.bincount(np.array(ids, dtype=np.int64))


def val_path(train_path):
    """data/sft/NAME.jsonl -> data/sft/NAME_val.jsonl (the held-out file data_process.py writes beside it)."""
    p = Path(train_path)
    return p.with_name(p.stem + "_val" + p.suffix)


def param_count(model_args):
    """Unique parameters of the model a checkpoint describes, built without memory for weights."""
    with torch.device("meta"):
        return Transformer(ModelArgs.from_dict(model_args)).num_params()


# -----------------------------------------------------------------------------
# the sections, each a list of markdown lines

def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def bin_row(path):
    """A table row describing one pretraining .bin from its meta file."""
    try:
        meta = read_meta(path)
    except Refusal as e:
        return [path, str(e), "", "", ""]
    s = meta.get("summary", {})
    dropped = (f"{s.get('dropped_short', 0):,} short, {s.get('dropped_duplicate', 0):,} duplicate, "
               f"{s.get('skipped_bad', 0):,} bad" if s else "")
    return [path, meta.get("split", ""), f"{meta['n_documents']:,}", f"{meta['n_tokens']:,}", dropped]


def section_data(pretrain_bins, sft, evaluation):
    lines = ["## Data", ""]
    if pretrain_bins[0]:
        rows = [bin_row(path) for path in pretrain_bins[0] + pretrain_bins[1]]
        lines += ["Pretraining:", ""] + table(["file", "split", "documents", "tokens", "dropped"], rows) + [""]
    else:
        lines += ["Pretraining: not described (a pretraining checkpoint does not record its data files; "
                  "pass --pretrain-data).", ""]
    if sft is not None and sft["config"].get("data"):
        data = Path(sft["config"]["data"])
        counts = [[p, f"{len(read_jsonl(p)):,}"] for p in (data, val_path(data)) if p.is_file()]
        lines += ["SFT examples (drop counts are printed by data_process.py sft, not recorded):", ""]
        lines += table(["file", "examples"], counts) + [""]
    if evaluation is not None:
        lines += [f"Evaluation: {evaluation['n']:,} questions of `{evaluation['data']}`.", ""]
    return lines


def section_model(stages):
    keys = ("step", "tokens")
    settings = ("optimizer", "lr", "min_lr", "muon_lr", "warmup_steps", "batch_size", "grad_accum",
                "weight_decay", "dtype", "device", "compile", "seed")
    rows = []
    for name, s in stages.items():
        if s is None:
            continue
        a = s["model_args"]
        shape = (f"dim {a['dim']}, {a['n_layers']} layers, {a['n_heads']} heads ({a.get('n_kv_heads') or a['n_heads']} kv), "
                 f"context {a['max_seq_len']}, vocab {a['vocab_size']}, {param_count(a) / 1e6:.2f}M parameters")
        run = ", ".join(f"{k} {s.get(k):,}" for k in keys if s.get(k) is not None)
        muon = s["config"].get("optimizer") == "muon"
        cfg = ", ".join(f"{k} {s['config'][k]}" for k in settings
                        if k in s["config"] and (muon or not k.startswith("muon")))
        rows.append([name, shape, run, cfg + (f", init `{s['init']}`" if s.get("init") else "")])
    if not rows:
        return ["## Model and training", "", "No training checkpoints found.", ""]
    tokenizer = next(s["tokenizer"]["name"] for s in stages.values() if s is not None)
    return ["## Model and training", ""] + table(["stage", "model", "trained", "settings"], rows) + \
           ["", f"Tokenizer: {tokenizer}.", ""]


def unigram_entropies(stages, pretrain_bins, tokenizer_path):
    """The unigram entropy of each stage's validation targets -> ({stage: entropy or None}, note).
    Pretraining: the tokens of the NAME_val.bin files; SFT: the answer tokens and eos of
    NAME_val.jsonl, which are what the SFT loss scores."""
    result, note = {"pretrain": None, "sft": None}, ""
    if pretrain_bins[1]:
        result["pretrain"] = unigram_entropy(bin_token_counts(pretrain_bins[1]))
    sft = stages["sft"]
    if sft is not None and sft["config"].get("data") and val_path(sft["config"]["data"]).is_file():
        try:
            tokenizer = tokenizer_for_checkpoint(sft, tokenizer_path)
            counts = answer_token_counts(val_path(sft["config"]["data"]), tokenizer, sft["model_args"]["max_seq_len"])
            result["sft"] = unigram_entropy(counts)
        except (Refusal, OSError) as e:
            note = f"SFT entropy not computed: {e}"
    return result, note


def section_losses(stages, entropies, note):
    rows = []
    for name, label in (("pretrain", "pretrain (validation tokens)"), ("sft", "SFT (validation answer tokens + eos)")):
        loss = last_val_loss(stages[name]["rows"]) if stages[name] is not None else None
        bpc = last_val_loss(stages[name]["rows"], "val_bpc") if stages[name] is not None else None
        entropy = entropies[name]
        rows.append([label, "n/a" if loss is None else f"{loss:.3f}", "" if bpc is None else f"{bpc:.3f}",
                     "n/a" if entropy is None else f"{entropy:.3f}",
                     "" if loss is None or entropy is None else f"{1 - loss / entropy:.1%}"])
    return ["## Loss curves", "", "![loss curves: pretraining and SFT](loss_curves.png)", "",
            "## Final validation loss vs unigram entropy", "",
            "Both in nats per token. The unigram entropy of the same tokens is the loss of a model that "
            "knows only how often each token occurs; 'below' is how far under it the model got. "
            "Bits per character (val_bpc, pretraining) compare across vocabularies.", ""] + \
        table(["stage", "final val loss", "val bits per character", "unigram entropy", "below"], rows) + ([""] + [note] if note else []) + [""]


DPO_SCORES = (("val_loss", "DPO loss"), ("val_reward_acc", "reward accuracy"), ("val_margin", "reward margin"),
              ("val_chosen_logp", "chosen answers' log-prob"), ("val_rejected_logp", "rejected answers' log-prob"))


def section_dpo(dpo):
    """DPO's validation scores for the --init model (before) and the last evaluation (after)."""
    if dpo is None:
        return []
    before = dpo["config"].get("before_dpo") or {}
    after = next((r for r in reversed(dpo["rows"]) if "val_reward_acc" in r), {})
    rows = [[label, "" if before.get(k) is None else f"{before[k]:.3f}", "" if after.get(k) is None else f"{after[k]:.3f}"]
            for k, label in DPO_SCORES]
    return ["## Preference tuning (DPO)", "",
            f"Validation pairs, before DPO (the `--init` model, its own reference: every pair ties, so the "
            f"reward accuracy is 0.5) and after step {after.get('step', '?')}. Reward accuracy above 0.5 means the "
            f"preference learned carries over to pairs never trained on.", ""] + \
        table(["score", "before", "after"], rows) + [""]


def score_cell(scores, key):
    if scores is None or "skipped" in scores or key not in scores:
        return ""
    ci = scores.get(f"{key}_ci95")
    return f"{scores[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def section_eval(m):
    if m is None:
        return ["## Evaluation", "", "No eval/metrics.json.", ""]
    if "baselines" not in m:
        return ["## Evaluation", "", "eval/metrics.json was written by an older eval.py; run eval.py again.", ""]
    copy, common = m["baselines"]["copy_question"], m["baselines"]["most_common_train_answer"]
    names = [("bleu4", "sacreBLEU (BLEU-4)"), ("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"),
             ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("distinct1", "Distinct-1"),
             ("distinct2", "Distinct-2"), ("length_ratio", "length ratio")]
    rows = [[label, score_cell(m, key), score_cell(copy, key), score_cell(common, key)] for key, label in names]
    ppl = f"{m['answer_ppl']:.2f}" if m.get("answer_ppl") is not None else "inf"
    rows += [["sentence BLEU, nltk (upstream's score)", f"{m['bleu_sentence_avg']:.2f}", "", ""],
             ["answer perplexity (nll)", f"{ppl} ({m['answer_nll']:.3f})", "", ""]]
    g = m["generation"]
    decoding = "greedy" if not g["temperature"] else f"temperature {g['temperature']}"
    lines = ["## Evaluation", "",
             f"{m['n']} questions; checkpoint `{m['checkpoint']}` (step {m['step']}); {decoding}, at most "
             f"{g['max_new_tokens']} new tokens, repetition penalty {g['repetition_penalty']}, n-gram blocking "
             f"{g.get('no_repeat_ngram_size') or 'off'}. Scores are 0-100 over "
             f"characters, with [95% bootstrap intervals] from {m['bootstrap']['samples']} resamples of the questions. "
             f"sacreBLEU signature `{m['sacrebleu_signature']}`.", ""]
    lines += table(["metric", "model", "copy the question", "most common training answer"], rows) + [""]
    if "skipped" in common:
        lines += [f"Most common training answer: skipped ({common['skipped']}).", ""]
    else:
        unique = " (every training answer occurs once: this is the first)" if common["count"] == 1 else ""
        lines += [f"The most common training answer ({common['count']:,} of {common['n_train']:,} training examples"
                  f"{unique}): \"{one_line(common['answer'])}\"", ""]
    return lines


def one_line(text, limit=TEXT_CHARS):
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def section_samples(predictions_path):
    if not predictions_path.is_file():
        return []
    lines = ["## Sample answers", ""]
    for p in read_jsonl(predictions_path)[:N_SAMPLES]:
        lines += [f"**Q{p['index'] + 1}.** {one_line(p['question'])}", "",
                  f"- model: {one_line(p['prediction']) or '(empty)'}", f"- reference: {one_line(p['reference'])}", ""]
    return lines


def section_time(stages, evaluation, summary):
    """Wall-clock per stage: the demo's own timing when it left one, else what the stages recorded."""
    if summary and summary.get("stage_seconds"):
        rows = [[name, f"{s:,.0f} s"] for name, s in summary["stage_seconds"].items()]
    else:
        rows = [[name, f"{s['elapsed_s']:,.0f} s (training)"] for name, s in stages.items()
                if s is not None and s.get("elapsed_s") is not None]
        if evaluation is not None:
            rows.append(["eval", f"{evaluation['seconds']:,.0f} s ({evaluation['generate_seconds']:,.0f} s generating, "
                                 f"{evaluation['questions_per_s']:.2f} questions/s)"])
    return ["## Wall-clock per stage", ""] + table(["stage", "wall-clock"], rows) + [""]


def cpu_description():
    """CPU model and whether it has AVX-512 and native bf16 (avx512_bf16), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{model} (AVX-512: {'yes' if 'avx512f' in flags else 'no'}, avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'})"


def section_hardware(stages, evaluation):
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 if hasattr(os, "sysconf") else 0
    used = {name: s["config"].get("device") for name, s in stages.items() if s is not None}
    if evaluation is not None:
        used["eval"] = evaluation.get("device")
    return ["## Hardware", "",
            f"The machine that wrote this report: {cpu_description()}, {os.cpu_count()} logical CPUs, "
            f"{memory:.0f} GiB memory, GPUs: {', '.join(gpus) or 'none'}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}.", "",
            "Devices the stages asked for: " + ", ".join(f"{k} {v}" for k, v in used.items()) + ".", ""]


# -----------------------------------------------------------------------------

def section_cmmlu(m):
    """CMMLU multiple choice (eval.py --task cmmlu); nothing when it did not run."""
    if m is None:
        return []
    ci = m.get("accuracy_ci95")
    overall = f"{m['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    common = m["baselines"]["most_common_answer"]
    rows = [[name, str(s["n"]), f"{s['accuracy']:.3f}"] for name, s in m["subjects"].items()]
    rows.append(["**all**", str(m["n"]), f"**{overall}**"])
    return (["## CMMLU (multiple choice)", "",
             f"{m['shots']}-shot, scored as lm-evaluation-harness scores CMMLU (cmmlu.py); accuracy with its 95% "
             f"bootstrap interval. Chance {m['baselines']['chance']:.3f}; always answering '{common['letter']}' "
             f"{common['accuracy']:.3f}.", ""]
            + table(["subject", "questions", "accuracy"], rows) + [""])


def write_report(out_dir, pretrain_dir=None, sft_dir=None, eval_dir=None, pretrain_data=(), tokenizer=None,
                 dpo_dir=None, cmmlu_dir=None):
    """Write out_dir/report.md and out_dir/loss_curves.png; returns the report's path."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise Refusal(f"{out_dir} is not a directory")
    stages = {"pretrain": load_stage(pretrain_dir or out_dir / "pretrain"), "sft": load_stage(sft_dir or out_dir / "sft"),
              "dpo": load_stage(dpo_dir or out_dir / "dpo")}
    eval_dir = Path(eval_dir or out_dir / "eval")
    evaluation = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8")) \
        if (eval_dir / "metrics.json").is_file() else None
    cmmlu_metrics = Path(cmmlu_dir or out_dir / "cmmlu") / "metrics.json"
    cmmlu = json.loads(cmmlu_metrics.read_text(encoding="utf-8")) if cmmlu_metrics.is_file() else None
    if all(s is None for s in stages.values()) and evaluation is None:
        raise Refusal(f"{out_dir}: no checkpoints in pretrain/ or sft/ and no eval/metrics.json")
    pretrain_bins = find_bin_files(pretrain_data) if pretrain_data else ([], [])  # (train, val)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    entropies, note = unigram_entropies(stages, pretrain_bins, tokenizer)
    plot_loss_curves({name: (stage["rows"] if stage else [], entropies.get(name)) for name, stage in stages.items()
                      if stage or name != "dpo"}, out_dir / "loss_curves.png")
    lines = [f"# Run report: {out_dir}", "", f"Written {time.strftime('%Y-%m-%d %H:%M')} by `report.py`.", ""]
    lines += section_data(pretrain_bins, stages["sft"], evaluation)
    lines += section_model(stages)
    lines += section_losses(stages, entropies, note)
    lines += section_dpo(stages["dpo"])
    lines += section_eval(evaluation)
    lines += section_cmmlu(cmmlu)
    lines += section_samples(eval_dir / "predictions.jsonl")
    lines += section_time(stages, evaluation, summary)
    lines += section_hardware(stages, evaluation)
    write_text_atomic(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("out_dir", help="the run's out dir, holding pretrain/, sft/ and eval/")
    parser.add_argument("--pretrain", default=None, help="pretraining out dir (default OUT_DIR/pretrain)")
    parser.add_argument("--sft", default=None, help="SFT out dir (default OUT_DIR/sft)")
    parser.add_argument("--dpo", default=None, help="DPO out dir (default OUT_DIR/dpo; left out when it holds no checkpoint)")
    parser.add_argument("--eval", default=None, help="eval out dir (default OUT_DIR/eval)")
    parser.add_argument("--cmmlu", default=None, help="eval.py --task cmmlu out dir (default OUT_DIR/cmmlu; left out when absent)")
    parser.add_argument("--pretrain-data", nargs="*", default=[],
                        help="pretrain.py's --data: .bin files, globs or directories (NAME_val.bin beside each)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model, if not where the checkpoints recorded it")
    cfg = parser.parse_args(argv)
    with one_line_refusals("report.py"):
        path = write_report(cfg.out_dir, cfg.pretrain, cfg.sft, cfg.eval, cfg.pretrain_data, cfg.tokenizer, cfg.dpo,
                            cfg.cmmlu)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
