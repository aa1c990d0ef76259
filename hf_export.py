"""A checkpoint as a Hugging Face Llama directory that transformers loads offline (and through
it vLLM, and llama.cpp's convert_hf_to_gguf.py), and the checks that it computes what ours does.

Weights: our state_dict names map one to one onto LlamaForCausalLM's, and both use the
rotate-half RoPE layout, so the tensors are copied as they are. Tokenizer: tokenizer.json is
built from the SentencePiece model file itself (its protobuf read directly), as a BPE whose
merges are ranked by piece score, so that it gives exactly our ids. check_hf_dir loads the
written directory with transformers and compares token ids and fp32 logits with ours.
"""
import shutil
import struct
from pathlib import Path

import torch

from atomic import write_json_atomic
from chatglm_tokenizer.proto import fields
from prompt import chat_template
from refusal import Refusal

LOGITS_TOLERANCE = 1e-4  # max |logit difference| allowed between transformers and us, in fp32
# Strings the exported tokenizer must encode exactly as ours does; the first one also feeds
# the logits check.
CHECK_TEXTS = [
    "你好，请问头痛发热、咳嗽三天了应该怎么办？",
    "血压 140/90 mmHg，心率 88 次/分。\n建议：多休息，低盐饮食。",
    "  Mixed English 和中文, digits 2024年3月15日 and  double  spaces\n\ttab ½ ＡＢＣ",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(Refusal):
    """The export cannot represent the model, or does not compute what ours does."""


# -----------------------------------------------------------------------------
# weights and config

def hf_weight_names(model_args):
    """Our state_dict names -> Hugging Face Llama's. Both use the rotate-half RoPE layout,
    so q/k projections are copied as they are, without permuting rows."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model_args.tie_embeddings:
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
    for i in range(model_args.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in per_layer.items()})
    return names


def hf_state_dict(model, dtype):
    names = hf_weight_names(model.args)
    state = model.state_dict()
    tied_head = {"output.weight"} if model.args.tie_embeddings else set()
    unmapped = set(state) - set(names) - tied_head
    if unmapped:
        raise ExportError(f"no Hugging Face Llama name for weights {sorted(unmapped)}")
    return {hf: state[ours].to(dtype).contiguous() for ours, hf in names.items()}


def hf_config(model_args, tokenizer, dtype_name):
    """config.json for LlamaForCausalLM, in the long-standing key layout (top-level
    rope_theta, torch_dtype) that transformers 4.x and 5.x, vLLM and llama.cpp all read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_args.dim,
        "intermediate_size": model_args.hidden_dim,
        "num_hidden_layers": model_args.n_layers,
        "num_attention_heads": model_args.n_heads,
        "num_key_value_heads": model_args.n_kv_heads,
        "head_dim": model_args.dim // model_args.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model_args.norm_eps,
        "rope_theta": model_args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": model_args.max_seq_len,
        "vocab_size": model_args.vocab_size,
        "tie_word_embeddings": model_args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": dtype_name,
    }


def generation_config(tokenizer, decoding=None):
    """generation_config.json: the special ids, and the decoding defaults stored with the
    checkpoint (generate.py; greedy when there are none, which is what eval.py measures).
    Sampling settings appear only when sampling: transformers warns about them otherwise."""
    config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
              "do_sample": False}
    decoding = decoding or {}
    if decoding.get("temperature"):
        config.update(do_sample=True, temperature=decoding["temperature"], top_k=decoding.get("top_k") or 0,
                      top_p=decoding.get("top_p") or 1.0)  # top_k 0 and top_p 1 switch those filters off
    # transformers counts the prompt's tokens too in both repetition settings; ours count the answer's only
    for key in ("repetition_penalty", "no_repeat_ngram_size", "max_new_tokens"):
        if decoding.get(key) is not None:
            config[key] = decoding[key]
    return config


# -----------------------------------------------------------------------------
# tokenizer: a tokenizer.json that encodes exactly like the SentencePiece model

# SentencePiece model protobuf field numbers (sentencepiece_model.proto)
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED = 1, 2, 3, 4
MODEL_BPE = 2


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
    for number, value in fields(Path(path).read_bytes()):
        if number == 1:
            piece = dict(fields(value))
            score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
            spec["pieces"].append((piece[1].decode("utf-8"), score, piece.get(3, PIECE_NORMAL)))
        elif number in (2, 3):
            wanted = trainer_fields if number == 2 else normalizer_fields
            for field, field_value in fields(value):
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
        raise ExportError(f"tokenizer {sp_path}: cannot export SentencePiece {'; '.join(unsupported)}")
    if vocab_size < len(pieces):
        raise ExportError(f"model vocab_size {vocab_size} is smaller than the tokenizer's {len(pieces)} pieces")

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


def write_tokenizer(out_dir, tokenizer, max_seq_len, vocab_size):
    hf_tokenizer(tokenizer.path, vocab_size).save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    special = {"bos_token": tokenizer.id_to_piece(tokenizer.bos_id), "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
               "unk_token": tokenizer.id_to_piece(tokenizer.sp.unk_id()), "pad_token": tokenizer.id_to_piece(tokenizer.pad_id)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_seq_len, "chat_template": chat_template()}
    write_json_atomic(out_dir / "tokenizer_config.json", config)
    write_json_atomic(out_dir / "special_tokens_map.json", special)


# -----------------------------------------------------------------------------
# writing the directory and checking it against ours

def write_hf_dir(out_dir, model, tokenizer, dtype_name, decoding=None):
    from safetensors.torch import save

    model_args = model.args
    write_json_atomic(out_dir / "config.json", hf_config(model_args, tokenizer, dtype_name))
    write_json_atomic(out_dir / "generation_config.json", generation_config(tokenizer, decoding))
    weights = hf_state_dict(model, DTYPES[dtype_name])
    (out_dir / "model.safetensors").write_bytes(save(weights, metadata={"format": "pt"}))
    write_tokenizer(out_dir, tokenizer, model_args.max_seq_len, model_args.vocab_size)


def control_text(tokenizer):
    """A user's text holding the control pieces' own spelling (ChatGLM2's and ours: <s>, </s>, <unk>)."""
    bos, eos, unk = (tokenizer.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.unk_id()))
    return f"用户写的{bos}、{eos}和{unk}只是文字 {bos}"


def check_control_text(transformers_tokenizer, tokenizer):
    """User text never becomes control ids (our Tokenizer treats it as text). In transformers
    that holds when user text is encoded with split_special_tokens=True, which must give our
    ids exactly, and in apply_chat_template(..., sanitize_control_tokens=True), whose only
    control id must be the bos the template writes."""
    text, control = control_text(tokenizer), {tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.unk_id()}
    ours, theirs = tokenizer.encode(text), transformers_tokenizer.encode(text, split_special_tokens=True)
    if ours != theirs:
        raise ExportError(f"exported tokenizer disagrees on {text!r} (split_special_tokens=True):\n"
                         f"  ours {ours}\n  transformers {theirs}")
    chat = transformers_tokenizer.apply_chat_template([{"role": "system", "content": text}, {"role": "user", "content": text}],
                                      add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False)
    if [i for i in chat if i in control] != [tokenizer.bos_id]:
        raise ExportError(f"the exported chat template turns user text {text!r} into control ids: {list(chat)}")


def check_hf_dir(out_dir, model, tokenizer, dtype_name):
    """Load the directory with transformers (offline) and compare with our model and
    tokenizer; raise if they differ. Returns the max |logit difference|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    for text in CHECK_TEXTS:
        ours, theirs = tokenizer.encode(text), transformers_tokenizer.encode(text)
        if ours != theirs:
            raise ExportError(f"exported tokenizer disagrees on {text!r}:\n  ours {ours}\n  transformers {theirs}")
    check_control_text(transformers_tokenizer, tokenizer)
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True).eval()
    # Compare in fp32 against our weights rounded to the exported dtype, as transformers sees them.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(DTYPES[dtype_name]).float())
        ids = torch.tensor([tokenizer.encode(CHECK_TEXTS[0])[:model.args.max_seq_len]])
        diff = (model.eval().logits(ids) - hf_model(ids).logits.float()).abs().max().item()
    if not diff <= LOGITS_TOLERANCE:
        raise ExportError(f"transformers' logits differ from ours by {diff:.3g} (> {LOGITS_TOLERANCE})")
    return diff
