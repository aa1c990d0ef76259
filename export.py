"""Export a checkpoint to a Hugging Face Llama directory that transformers loads offline
(and through it vLLM, and llama.cpp's convert_hf_to_gguf.py):

    python export.py --ckpt out/sft --out out/hf
    python export.py --ckpt out/sft --out out/hf --gguf    # also model.gguf and a Modelfile

The directory holds config.json (LlamaForCausalLM), model.safetensors, generation_config.json
(with the decoding defaults stored beside the checkpoint, see choose_decoding.py), tokenizer.json (built from the SentencePiece model so that it gives exactly our ids),
tokenizer_config.json, special_tokens_map.json and the SentencePiece tokenizer.model itself
(for converters that read it directly), and a model card (README.md) with LICENSE.md
(model_card.py). Before the directory is renamed into place it is
loaded back with transformers, and its token ids and fp32 logits are checked against ours
(hf_export.py). With --gguf it also holds model.gguf (for llama.cpp, written with the `gguf`
package and read back before the rename) and an Ollama Modelfile that reproduces the SFT
prompt (gguf_export.py).
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import cli
from atomic import naming_errors
from checkpoint import ANSWERING_KINDS, load_checkpoint, model_from_checkpoint, tokenizer_for_checkpoint
from generate import generation_config_path, read_generation_config
from gguf_export import GGUF_NAME, GGUF_QUANTS, check_gguf, ollama_modelfile, quantized_gguf_name, write_gguf
from model_card import license_notice, model_card, read_scores
from hf_export import CHECK_TEXTS, DTYPES, LOGITS_TOLERANCE, ExportError, check_hf_dir, write_hf_dir
from refusal import one_line_refusals

DEFAULTS = dict(ckpt="out/sft", out="out/hf", dtype="float32")


def export(ckpt_path, out, tokenizer_path=None, dtype_name=DEFAULTS["dtype"], force=False, with_gguf=False,
           gguf_quant=None, scores_path=None):
    """Checkpoint -> checked Hugging Face directory at `out`, written atomically; with_gguf
    adds the same model as out/model.gguf and an Ollama Modelfile for it, gguf_quant (q8_0)
    also a quantized copy, which the Modelfile then uses. Returns the max |logit difference|
    found by the check. The model card (README.md) shows scores_path's eval.py scores."""
    with_gguf = with_gguf or bool(gguf_quant)
    out = Path(out)
    source = Path(ckpt_path).resolve()
    if source == out.resolve() or out.resolve() in source.parents:
        raise ExportError(f"--out {out} holds --ckpt {ckpt_path}: --force would delete the checkpoint; "
                          f"choose another --out")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking:
        raise ExportError(f"--out {out}: {blocking} is a file, not a directory; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with naming_errors(out):  # before any work: the place to write must take a directory
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with naming_errors(out):
            return export_into(tmp, out, ckpt_path, tokenizer_path, dtype_name, with_gguf, gguf_quant, scores_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_into(tmp, out, ckpt_path, tokenizer_path, dtype_name, with_gguf, gguf_quant, scores_path):
    """Write the export into the empty directory tmp, check it, then rename it to out."""
    ckpt = load_checkpoint(ckpt_path)
    scores = read_scores(scores_path, ckpt) if scores_path else None
    if ckpt.get("kind") in ANSWERING_KINDS and "answer_encoding" not in ckpt:
        print(f"export: warning: {ckpt['path']} was trained with answers that start with the bare '▁' piece: "
              f"llama.cpp and llama-server show each answer with a leading space (ours and transformers' drop "
              f"it); fine-tune it again with sft.py, which now encodes answers without it", file=sys.stderr)
    if ckpt["model_args"].get("qk_norm"):
        raise ExportError(f"checkpoint {ckpt['path']} uses qk_norm, which LlamaForCausalLM cannot represent; "
                          f"it cannot be exported as a Llama model")
    decoding = read_generation_config(generation_config_path(ckpt["path"]))
    tokenizer = tokenizer_for_checkpoint(ckpt, tokenizer_path)
    model = model_from_checkpoint(ckpt)
    print(f"export: {ckpt['path']} ({model.num_params():,} parameters, tokenizer {tokenizer.name}) -> {out} "
          f"as {dtype_name}")
    write_hf_dir(tmp, model, tokenizer, dtype_name, decoding)
    (tmp / "README.md").write_text(model_card(ckpt, tokenizer, model.num_params(), decoding, scores), encoding="utf-8")
    (tmp / "LICENSE.md").write_text(license_notice(ckpt, tokenizer), encoding="utf-8")
    if with_gguf:
        write_gguf(tmp / GGUF_NAME, model, tokenizer, dtype_name)
        check_gguf(tmp / GGUF_NAME, model, tokenizer, dtype_name)
        if gguf_quant:
            write_gguf(tmp / quantized_gguf_name(gguf_quant), model, tokenizer, gguf_quant)
            check_gguf(tmp / quantized_gguf_name(gguf_quant), model, tokenizer, gguf_quant)
        modelfile = ollama_modelfile(tokenizer, model.args.max_seq_len, decoding,
                                     quantized_gguf_name(gguf_quant) if gguf_quant else GGUF_NAME)
        (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
    diff = check_hf_dir(tmp, model, tokenizer, dtype_name)  # rounds our weights to dtype_name: last
    replace_dir(tmp, out)
    print(f"export: transformers reloads {out}: tokenizer ids match on {len(CHECK_TEXTS)} strings, "
          f"max |logit diff| = {diff:.2e} (fp32, tolerance {LOGITS_TOLERANCE})")
    if with_gguf:
        print(f"export: {out / GGUF_NAME} reads back with the same tensors, vocabulary and special ids; "
              f"Ollama: ollama create NAME -f {out / 'Modelfile'}")
    return diff


def replace_dir(tmp, out):
    """Rename the complete tmp directory to out; an old out (--force) is moved aside first
    and removed only once the new one is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--ckpt", default=DEFAULTS["ckpt"], help="checkpoint file, or an out dir (its best.pt, else latest step)")
    parser.add_argument("--out", default=DEFAULTS["out"], help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model path (default: the one the checkpoint records, else the usual search)")
    parser.add_argument("--dtype", default=DEFAULTS["dtype"], choices=sorted(DTYPES), help="dtype of the exported weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--gguf", action="store_true",
                        help=f"also write {GGUF_NAME} (llama.cpp) and an Ollama Modelfile into --out")
    parser.add_argument("--scores", default=None, metavar="METRICS_JSON",
                        help="eval.py's metrics.json for this checkpoint, shown in the model card (README.md)")
    parser.add_argument("--gguf-quant", choices=GGUF_QUANTS, default=None,
                        help="also write a quantized GGUF (model-q8_0.gguf: 8.5 bits a weight), which the Modelfile uses; "
                             "implies --gguf")
    return parser.parse_args(argv)


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_refusals("export.py"):
        export(cfg.ckpt, cfg.out, cfg.tokenizer, cfg.dtype, cfg.force, cfg.gguf, cfg.gguf_quant, cfg.scores)


if __name__ == "__main__":
    main()
