"""Export a checkpoint to a Hugging Face Llama directory that transformers loads offline
(and through it vLLM, and llama.cpp's convert_hf_to_gguf.py):

    python export.py --ckpt out/sft --out out/hf
    python export.py --ckpt out/sft --out out/hf --gguf    # also model.gguf and a Modelfile

The directory holds config.json (LlamaForCausalLM), model.safetensors, generation_config.json,
tokenizer.json (built from the SentencePiece model so that it gives exactly our ids),
tokenizer_config.json, special_tokens_map.json and the SentencePiece tokenizer.model itself
(for converters that read it directly). Before the directory is renamed into place it is
loaded back with transformers, and its token ids and fp32 logits are checked against ours.
With --gguf it also holds model.gguf (for llama.cpp, written with the `gguf` package and read
back before the rename) and an Ollama Modelfile that reproduces the SFT prompt.
"""
import argparse
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_for_checkpoint
from prompt import chat_template, ollama_template

# -----------------------------------------------------------------------------
# defaults (flags override)
CKPT = "out/sft"
OUT = "out/hf"
DTYPE = "float32"
LOGITS_TOLERANCE = 1e-4  # max |logit difference| allowed between transformers and us, in fp32
# Strings the exported tokenizer must encode exactly as ours does; the first one also feeds
# the logits check.
CHECK_TEXTS = [
    "你好，请问头痛发热、咳嗽三天了应该怎么办？",
    "血压 140/90 mmHg，心率 88 次/分。\n建议：多休息，低盐饮食。",
    "  Mixed English 和中文, digits 2024年3月15日 and  double  spaces\n\ttab ½ ＡＢＣ",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# weights and config


def hf_weight_names(args):
    """Our state_dict names -> Hugging Face Llama's. Both use the rotate-half RoPE layout,
    so q/k projections are copied as they are, without permuting rows."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not args.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in per_layer.items()})
    return names


def hf_state_dict(model, dtype):
    names = hf_weight_names(model.args)
    state = model.state_dict()
    tied_head = {"output.weight"} if model.args.tie_embeddings else set()
    unmapped = set(state) - set(names) - tied_head
    if unmapped:
        raise ValueError(f"no Hugging Face Llama name for weights {sorted(unmapped)}")
    return {hf: state[ours].to(dtype).contiguous() for ours, hf in names.items()}


def hf_config(args, tok, dtype_name):
    """config.json for LlamaForCausalLM, in the long-standing key layout (top-level
    rope_theta, torch_dtype) that transformers 4.x and 5.x, vLLM and llama.cpp all read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype_name,
    }


def generation_config(tok):
    # Greedy decoding: deterministic, and what eval.py's BLEU measures. No length: callers
    # pass max_new_tokens, and a max_length here would only make transformers warn.
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "do_sample": False}


# -----------------------------------------------------------------------------
# tokenizer: a tokenizer.json that encodes exactly like the SentencePiece model

# SentencePiece model protobuf field numbers (sentencepiece_model.proto)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED = 1, 2, 3, 4
MODEL_BPE = 2


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _proto_fields(buf):
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, value


def read_sentencepiece_model(path):
    """The parts of a SentencePiece model file that decide how it encodes, read from its
    protobuf bytes directly (so the protobuf package is not needed). Defaults are the
    .proto's own."""
    spec = {"pieces": [], "model_type": 1, "byte_fallback": False, "unk_id": 0,
            "treat_whitespace_as_suffix": False, "precompiled_charsmap": b"",
            "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    trainer_fields = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback", 40: "unk_id"}
    normalizer_fields = {2: "precompiled_charsmap", 3: "add_dummy_prefix",
                         4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, value in _proto_fields(Path(path).read_bytes()):
        if number == 1:
            piece = dict(_proto_fields(value))
            score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
            spec["pieces"].append((piece[1].decode("utf-8"), score, piece.get(3, PIECE_NORMAL)))
        elif number in (2, 3):
            wanted = trainer_fields if number == 2 else normalizer_fields
            for field, field_value in _proto_fields(value):
                if field in wanted:  # varints come as ints: cast to the default's type (bool, int, bytes)
                    spec[wanted[field]] = type(spec[wanted[field]])(field_value)
    return spec


def placeholder_pieces(n_pieces, vocab_size):
    """Names for the ids past the SentencePiece pieces (ChatGLM2's 4 extra ids): they decode
    to nothing, as in our Tokenizer."""
    return [f"<special_{i}>" for i in range(n_pieces, vocab_size)]


def hf_tokenizer(sp_path, vocab_size):
    """A `tokenizers` BPE tokenizer equal to the SentencePiece model: same vocab and ids,
    merges ranked by piece score (SentencePiece's BPE merges the best-scoring pair first),
    the same whitespace escaping and dummy prefix, byte fallback, and no bos/eos added.
    Ids from the pieces' end up to the model's vocab_size (ChatGLM2's 4 extra ids) become
    placeholder special tokens so every id the model can emit decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    spec = read_sentencepiece_model(sp_path)
    pieces = spec["pieces"]
    unsupported = []
    if spec["model_type"] != MODEL_BPE:
        unsupported.append(f"model type {spec['model_type']} (only BPE, type {MODEL_BPE}, is supported)")
    if spec["remove_extra_whitespaces"] or spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"]:
        unsupported.append("whitespace options other than remove_extra_whitespaces=false, "
                           "escape_whitespaces=true, treat_whitespace_as_suffix=false")
    if any(kind == PIECE_USER_DEFINED for _, _, kind in pieces):
        unsupported.append("user-defined pieces")
    if unsupported:
        raise ValueError(f"tokenizer {sp_path}: cannot export SentencePiece {'; '.join(unsupported)}")
    if vocab_size < len(pieces):
        raise ValueError(f"model vocab_size {vocab_size} is smaller than the tokenizer's {len(pieces)} pieces")

    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == PIECE_NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[spec["unk_id"]][0],
                                     fuse_unk=True, byte_fallback=spec["byte_fallback"]))

    steps = [normalizers.Precompiled(spec["precompiled_charsmap"])] if spec["precompiled_charsmap"] else []
    steps.append(normalizers.Replace(" ", "▁"))
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: like SentencePiece, BPE runs over the whole normalized text.
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        undo.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(undo)

    specials = [piece for piece, _, kind in pieces if kind in (PIECE_UNKNOWN, PIECE_CONTROL)]
    specials += placeholder_pieces(len(pieces), vocab_size)
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return tokenizer


def write_tokenizer(out_dir, tok, max_seq_len, vocab_size):
    hf_tokenizer(tok.path, vocab_size).save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(tok.path, out_dir / "tokenizer.model")
    special = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
               "unk_token": tok.id_to_piece(tok.sp.unk_id()), "pad_token": tok.id_to_piece(tok.pad_id)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_seq_len, "chat_template": chat_template()}
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


# -----------------------------------------------------------------------------
# GGUF: one file that llama.cpp (and Ollama) run, written with the `gguf` package

GGUF_NAME = "model.gguf"
GGUF_FILE_TYPES = {"float32": "ALL_F32", "bfloat16": "MOSTLY_BF16", "float16": "MOSTLY_F16"}


def interleave_rope_rows(w, n_heads):
    """q/k projection rows from the rotate-half RoPE layout (ours and Hugging Face's: a head's
    dimension i pairs with i + head_dim/2) to the interleaved layout of llama.cpp's Llama
    (dimension 2i pairs with 2i+1): the same rotation, with the rows reordered."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, dtype_name):
    """GGUF tensor name -> (numpy array, GGML type). Names come from the gguf package's Llama
    map of the Hugging Face names. The weights are those of the Hugging Face export (rounded
    to dtype_name); 1-D tensors (the norms) are stored as fp32, as llama.cpp expects."""
    import gguf

    args = model.args
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)
    tensors = {}
    for hf_name, t in hf_state_dict(model, DTYPES[dtype_name]).items():
        if hf_name.endswith("q_proj.weight"):
            t = interleave_rope_rows(t, args.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = interleave_rope_rows(t, args.n_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if t.dim() == 1 or dtype_name == "float32":
            tensors[name] = (t.float().numpy(), gguf.GGMLQuantizationType.F32)
        elif dtype_name == "float16":
            tensors[name] = (t.numpy(), gguf.GGMLQuantizationType.F16)
        else:  # numpy has no bf16: its bit patterns as uint16
            tensors[name] = (t.view(torch.int16).numpy().view("uint16"), gguf.GGMLQuantizationType.BF16)
    return tensors


def gguf_vocab(tok, vocab_size):
    """(tokens, scores, token types) of the SentencePiece model for llama.cpp's "llama"
    (SentencePiece) tokenizer; SentencePiece's piece types are GGUF's token types."""
    spec = read_sentencepiece_model(tok.path)
    pieces = spec["pieces"] + [(p, 0.0, PIECE_CONTROL) for p in placeholder_pieces(len(spec["pieces"]), vocab_size)]
    return [p for p, _, _ in pieces], [score for _, score, _ in pieces], [kind for _, _, kind in pieces], spec


def write_gguf(path, model, tok, dtype_name):
    """The model, its SentencePiece vocabulary, special ids and chat template as one GGUF file."""
    import gguf

    args = model.args
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("baby-llama2-chinese")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType[GGUF_FILE_TYPES[dtype_name]])
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.dim // args.n_heads)
    w.add_value_length(args.dim // args.n_heads)
    w.add_rope_dimension_count(args.dim // args.n_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    tokens, scores, types, spec = gguf_vocab(tok, args.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.sp.unk_id())
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)  # the SFT prompt has bos at its end, from the chat template
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spec["add_dummy_prefix"])
    w.add_remove_extra_whitespaces(spec["remove_extra_whitespaces"])
    w.add_chat_template(chat_template())
    for name, (array, ggml_type) in gguf_tensors(model, dtype_name).items():
        w.add_tensor(name, array, raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ollama_modelfile(tok, max_seq_len):
    """An Ollama Modelfile for the GGUF beside it (`ollama create NAME -f Modelfile`): our
    prompt as its template, the model's context, and greedy decoding like generation_config.json."""
    return (f"FROM ./{GGUF_NAME}\n"
            f'TEMPLATE """{ollama_template(tok.id_to_piece(tok.bos_id))}"""\n'
            f"PARAMETER num_ctx {max_seq_len}\n"
            "PARAMETER temperature 0\n"
            "PARAMETER repeat_penalty 1\n")


def check_gguf(path, model, tok, dtype_name):
    """Read the GGUF file back with the gguf package's reader: every tensor's bytes and the
    vocabulary and special ids must be what was meant to be written."""
    import gguf

    reader = gguf.GGUFReader(path)
    expected = gguf_tensors(model, dtype_name)
    found = {t.name: t for t in reader.tensors}
    if sorted(found) != sorted(expected):
        raise ValueError(f"{path}: tensors {sorted(found)} differ from {sorted(expected)}")
    for name, (array, ggml_type) in expected.items():
        t = found[name]
        if t.tensor_type != ggml_type or t.data.tobytes() != array.tobytes():
            raise ValueError(f"{path}: tensor {name} does not read back as written")
    field = reader.get_field
    tokens = gguf_vocab(tok, model.args.vocab_size)[0]
    ids = [field(f"tokenizer.ggml.{k}_token_id").contents() for k in ("bos", "eos", "padding")]
    if field("tokenizer.ggml.tokens").contents() != tokens or ids != [tok.bos_id, tok.eos_id, tok.pad_id]:
        raise ValueError(f"{path}: the vocabulary or special ids do not read back as written")


# -----------------------------------------------------------------------------
# export and check


def _write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_hf_dir(out_dir, model, tok, dtype_name):
    from safetensors.torch import save

    args = model.args
    _write_json(out_dir / "config.json", hf_config(args, tok, dtype_name))
    _write_json(out_dir / "generation_config.json", generation_config(tok))
    weights = hf_state_dict(model, DTYPES[dtype_name])
    (out_dir / "model.safetensors").write_bytes(save(weights, metadata={"format": "pt"}))
    write_tokenizer(out_dir, tok, args.max_seq_len, args.vocab_size)


def control_text(tok):
    """A user's text holding the control pieces' own spelling (ChatGLM2's and ours: <s>, </s>, <unk>)."""
    bos, eos, unk = (tok.id_to_piece(i) for i in (tok.bos_id, tok.eos_id, tok.sp.unk_id()))
    return f"用户写的{bos}、{eos}和{unk}只是文字 {bos}"


def check_control_text(hf_tok, tok):
    """User text never becomes control ids (our Tokenizer treats it as text). In transformers
    that holds when user text is encoded with split_special_tokens=True, which must give our
    ids exactly, and in apply_chat_template(..., sanitize_control_tokens=True), whose only
    control id must be the bos the template writes."""
    text, control = control_text(tok), {tok.bos_id, tok.eos_id, tok.sp.unk_id()}
    ours, theirs = tok.encode(text), hf_tok.encode(text, split_special_tokens=True)
    if ours != theirs:
        raise ValueError(f"exported tokenizer disagrees on {text!r} (split_special_tokens=True):\n"
                         f"  ours {ours}\n  transformers {theirs}")
    chat = hf_tok.apply_chat_template([{"role": "system", "content": text}, {"role": "user", "content": text}],
                                      add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False)
    if [i for i in chat if i in control] != [tok.bos_id]:
        raise ValueError(f"the exported chat template turns user text {text!r} into control ids: {list(chat)}")


def check_hf_dir(out_dir, model, tok, dtype_name):
    """Load the directory with transformers (offline) and compare with our model and
    tokenizer; raise if they differ. Returns the max |logit difference|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    for text in CHECK_TEXTS:
        ours, theirs = tok.encode(text), hf_tok.encode(text)
        if ours != theirs:
            raise ValueError(f"exported tokenizer disagrees on {text!r}:\n  ours {ours}\n  transformers {theirs}")
    check_control_text(hf_tok, tok)
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True).eval()
    # Compare in fp32 against our weights rounded to the exported dtype, as transformers sees them.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(DTYPES[dtype_name]).float())
        ids = torch.tensor([tok.encode(CHECK_TEXTS[0])[:model.args.max_seq_len]])
        diff = (model.eval().logits(ids) - hf_model(ids).logits.float()).abs().max().item()
    if not diff <= LOGITS_TOLERANCE:
        raise ValueError(f"transformers' logits differ from ours by {diff:.3g} (> {LOGITS_TOLERANCE})")
    return diff


def export(ckpt_path, out, tokenizer_path=None, dtype_name=DTYPE, force=False, with_gguf=False):
    """Checkpoint -> checked Hugging Face directory at `out`, written atomically; with_gguf
    adds the same model as out/model.gguf and an Ollama Modelfile for it. Returns the max
    |logit difference| found by the check."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["model_args"].get("qk_norm"):
        raise ValueError(f"checkpoint {ckpt['path']} uses qk_norm, which LlamaForCausalLM cannot represent; "
                         f"it cannot be exported as a Llama model")
    tok = tokenizer_for_checkpoint(ckpt, tokenizer_path)
    model = model_from_checkpoint(ckpt)
    print(f"export: {ckpt['path']} ({model.num_params():,} parameters, tokenizer {tok.name}) -> {out} as {dtype_name}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_hf_dir(tmp, model, tok, dtype_name)
        if with_gguf:
            write_gguf(tmp / GGUF_NAME, model, tok, dtype_name)
            check_gguf(tmp / GGUF_NAME, model, tok, dtype_name)
            (tmp / "Modelfile").write_text(ollama_modelfile(tok, model.args.max_seq_len), encoding="utf-8")
        diff = check_hf_dir(tmp, model, tok, dtype_name)  # rounds our weights to dtype_name: last
        if out.exists():  # --force: move the old one aside only once the new one is complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: transformers reloads {out}: tokenizer ids match on {len(CHECK_TEXTS)} strings, "
          f"max |logit diff| = {diff:.2e} (fp32, tolerance {LOGITS_TOLERANCE})")
    if with_gguf:
        print(f"export: {out / GGUF_NAME} reads back with the same tensors, vocabulary and special ids; "
              f"Ollama: ollama create NAME -f {out / 'Modelfile'}")
    return diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=CKPT, help="checkpoint file, or an out dir (its best.pt, else latest step)")
    parser.add_argument("--out", default=OUT, help="Hugging Face directory to write")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model path (default: the one the checkpoint records, else the usual search)")
    parser.add_argument("--dtype", default=DTYPE, choices=sorted(DTYPES), help="dtype of the exported weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")
    parser.add_argument("--gguf", action="store_true",
                        help=f"also write {GGUF_NAME} (llama.cpp) and an Ollama Modelfile into --out")
    a = parser.parse_args()
    try:
        export(a.ckpt, a.out, a.tokenizer, a.dtype, a.force, a.gguf)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export.py: {e}") from None


if __name__ == "__main__":
    main()
