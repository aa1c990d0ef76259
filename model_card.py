"""The model card and license notice that export.py writes beside the weights (README.md and
LICENSE.md of the Hugging Face directory, as the Hub shows them): what the model is, what it
was trained on and how, its decoding defaults and prompt, its scores when an eval.py
metrics.json is given, and which licenses bind it.

Everything comes from the checkpoints themselves (each records its kind, steps, tokens,
training files and the checkpoint it started from), so the card cannot drift from the run.
"""
import json
from pathlib import Path

from chatglm_tokenizer import CHATGLM2_SHA256
from checkpoint import CheckpointError, load_checkpoint
from prompt import context_prompt
from refusal import Refusal

MAX_STAGES = 4  # dpo <- sft <- pretrain: how far back the card follows "init"


def training_stages(ckpt):
    """[(kind, step, tokens, [(file, tokens)], path)] from this checkpoint back through the ones
    it started from; a start no longer on disk ends the list with (None, ..., path)."""
    stages, current = [], ckpt
    while current is not None and len(stages) < MAX_STAGES:
        stages.append((current.get("kind"), current.get("step"), current.get("tokens"),
                       current.get("train_data") or [], current.get("path")))
        start = current.get("init")
        if not start:
            break
        try:
            current = load_checkpoint(start)
        except (CheckpointError, OSError):
            stages.append((None, None, None, [], start))
            current = None
    return stages


def read_scores(path, ckpt):
    """An eval.py metrics.json of this very checkpoint (else refused: a card must not show
    another model's scores)."""
    try:
        scores = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Refusal(f"--scores {path}: cannot read it as eval.py's metrics.json ({e})") from None
    if Path(scores.get("checkpoint", "")).resolve() != Path(ckpt["path"]).resolve():
        raise Refusal(f"--scores {path} scores {scores.get('checkpoint')}, not {ckpt['path']}: "
                      f"give the metrics.json of eval.py --ckpt {ckpt['path']}")
    return scores


def model_card(ckpt, tokenizer, n_params, decoding, scores=None):
    """README.md of the export, as Markdown."""
    a = ckpt["model_args"]
    chatglm2 = tokenizer.sha256 == CHATGLM2_SHA256
    lines = ["# baby-llama2-chinese", "",
             f"A small Chinese Llama ({n_params / 1e6:.1f}M parameters) trained from scratch with the "
             f"baby-llama2-chinese scripts: a `{ckpt.get('kind')}` checkpoint, step {ckpt.get('step')}.", "",
             "## Model", "",
             f"Llama architecture (`LlamaForCausalLM`): {a['n_layers']} layers, width {a['dim']}, {a['n_heads']} heads "
             f"({a['n_kv_heads']} key/value), context {a['max_seq_len']} tokens, vocabulary {a['vocab_size']} "
             f"({'the ChatGLM2 tokenizer' if chatglm2 else f'its own SentencePiece tokenizer, {tokenizer.name}'}).", "",
             "## Training", "", "| stage | step | tokens seen | training data |", "| --- | --- | --- | --- |"]
    for kind, step, tokens, data, path in training_stages(ckpt):
        if kind is None:
            lines.append(f"| (started from {path}, no longer on disk) | | | |")
            continue
        files = ", ".join(f"{name} ({size:,} tokens)" for name, size in data) or "not recorded"
        lines.append(f"| {kind} | {step} | {f'{tokens:,}' if tokens else 'not recorded'} | {files} |")
    example = context_prompt([("头痛怎么办？", "多休息。")], "发热呢？", system="你是一名医生。")
    lines += ["", "## Prompt and decoding", "",
              "The prompt is the SFT format; `tokenizer_config.json`'s chat template writes it, and the "
              "answer follows the bos token:", "", "```", example.replace("\n", "\\n") + "<bos>", "```", "",
              "Decoding defaults (`generation_config.json`, chosen on a validation split): "
              + (", ".join(f"{k} {v}" for k, v in decoding.items() if k != "chosen_on") if decoding else "none stored") + ".",
              "", "## Scores", ""]
    if scores:
        base = scores.get("baselines", {}).get("copy_question", {})
        lines += [f"`eval.py` on {scores['n']} questions of {Path(scores['data']).name}: sacreBLEU "
                  f"{scores['bleu4']:.2f} {fmt_ci(scores.get('bleu4_ci95'))}, ROUGE-L {scores['rougeL']:.2f} "
                  f"{fmt_ci(scores.get('rougeL_ci95'))}, length ratio {scores['length_ratio']:.2f}, repeat rate "
                  f"{scores['repeat_rate']:.2f}, reference answers at {scores['answer_bpc']:.3f} bits per character"
                  + (f"; copying the question back scores sacreBLEU {base['bleu4']:.2f}, ROUGE-L {base['rougeL']:.2f}"
                     if base else "") + "."]
    else:
        lines.append("Not given to the export (`export.py --scores out/eval/metrics.json` adds `eval.py`'s).")
    lines += ["", "## Limits", "",
              "A model this small answers fluently but often wrongly: it is for learning how such models are "
              "built, not for medical advice.", "", "## Licenses", "", "See LICENSE.md."]
    return "\n".join(lines) + "\n"


def fmt_ci(ci):
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def source_files(ckpt_path):
    """The raw files a run trained on, as far as its out dir still says: config.json's --data,
    and for a token .bin the sources its meta records (data_process.py writes them)."""
    config = Path(ckpt_path).parent / "config.json"
    if not config.is_file():
        return []
    data = json.loads(config.read_text(encoding="utf-8")).get("data") or []
    found = []
    for path in [data] if isinstance(data, str) else data:
        meta = Path(path).with_suffix(".json")
        sources = json.loads(meta.read_text(encoding="utf-8")).get("sources") if path.endswith(".bin") and meta.is_file() else None
        found += [Path(p).name for p in sources] if sources else [Path(path).name]
    return found


def license_notice(ckpt, tokenizer):
    """LICENSE.md of the export: what binds the weights, named as far as the out dirs still know."""
    stages = training_stages(ckpt)
    files = sorted({name for _, _, _, data, path in stages
                    for name in (source_files(path) if path else []) or [file for file, _ in data]})
    tokenizer_line = ("The tokenizer is ChatGLM2-6B's: its use is under the ChatGLM2-6B model license." if
                      tokenizer.sha256 == CHATGLM2_SHA256 else
                      "The tokenizer was trained on the pretraining data above, whose licenses apply to it too.")
    return "\n".join([
        "# Licenses", "",
        "These weights were learned from the training files below. Their licenses, not this notice, decide how "
        "the weights may be used: some public Chinese corpora allow research or non-commercial use only "
        "(e.g. Alpaca-derived and BELLE instruction data). Check each file's source before you share or deploy "
        "the model.", "",
        *([f"- {name}" for name in files] or ["- (the checkpoints record no training files)"]), "",
        tokenizer_line, "",
        "The baby-llama2-chinese code that trained the model is not part of this export.", ""])
