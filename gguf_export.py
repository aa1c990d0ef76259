"""A checkpoint as one GGUF file that llama.cpp (and Ollama) run, written with the `gguf`
package, plus an Ollama Modelfile whose template reproduces the SFT prompt.

The weights are those of the Hugging Face export (hf_export.py), with one difference:
llama.cpp's Llama applies RoPE to interleaved pairs of dimensions, where ours and Hugging
Face's rotate halves, so the q/k projection rows are reordered (the same rotation). The
vocabulary is the SentencePiece model's pieces with their scores and types. check_gguf reads
the file back and compares every tensor's bytes, the vocabulary and the special ids.
"""
import torch

from generate import default_max_new_tokens
from hf_export import DTYPES, PIECE_CONTROL, ExportError, hf_state_dict, placeholder_pieces, read_sentencepiece_model
from prompt import chat_template, ollama_template

GGUF_NAME = "model.gguf"
GGUF_FILE_TYPES = {"float32": "ALL_F32", "bfloat16": "MOSTLY_BF16", "float16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
# Quantized files, beside model.gguf: Q8_0 stores each run of 32 weights of a row as 32 int8
# values and one fp16 scale (8.5 bits a weight, a quarter of fp32), which llama.cpp
# multiplies without converting back; the norms stay fp32.
GGUF_QUANTS = ("q8_0",)


def quantized_gguf_name(quant):
    return f"model-{quant}.gguf"


def interleave_rope_rows(w, n_heads):
    """q/k projection rows from the rotate-half RoPE layout (ours and Hugging Face's: a head's
    dimension i pairs with i + head_dim/2) to the interleaved layout of llama.cpp's Llama
    (dimension 2i pairs with 2i+1): the same rotation, with the rows reordered."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, dtype_name):
    """GGUF tensor name -> (numpy array, GGML type). Names come from the gguf package's Llama
    map of the Hugging Face names. The weights are those of the Hugging Face export (rounded
    to dtype_name, or from fp32 to q8_0); 1-D tensors (the norms) are stored as fp32, as
    llama.cpp expects, and so are matrices whose rows do not split into Q8_0's blocks of 32."""
    import gguf
    from gguf.quants import quantize

    model_args = model.args
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model_args.n_layers)
    tensors = {}
    for hf_name, t in hf_state_dict(model, DTYPES.get(dtype_name, torch.float32)).items():
        if hf_name.endswith("q_proj.weight"):
            t = interleave_rope_rows(t, model_args.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = interleave_rope_rows(t, model_args.n_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if dtype_name == "q8_0" and t.dim() == 2 and t.shape[1] % 32 == 0:
            tensors[name] = (quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        elif t.dim() == 1 or dtype_name in ("float32", "q8_0"):
            tensors[name] = (t.float().numpy(), gguf.GGMLQuantizationType.F32)
        elif dtype_name == "float16":
            tensors[name] = (t.numpy(), gguf.GGMLQuantizationType.F16)
        else:  # numpy has no bf16: its bit patterns as uint16
            tensors[name] = (t.view(torch.int16).numpy().view("uint16"), gguf.GGMLQuantizationType.BF16)
    return tensors


def gguf_vocab(tokenizer, vocab_size):
    """(tokens, scores, token types) of the SentencePiece model for llama.cpp's "llama"
    (SentencePiece) tokenizer; SentencePiece's piece types are GGUF's token types."""
    spec = read_sentencepiece_model(tokenizer.path)
    pieces = spec["pieces"] + [(p, 0.0, PIECE_CONTROL) for p in placeholder_pieces(len(spec["pieces"]), vocab_size)]
    return [p for p, _, _ in pieces], [score for _, score, _ in pieces], [kind for _, _, kind in pieces], spec


def write_gguf(path, model, tokenizer, dtype_name):
    """The model, its SentencePiece vocabulary, special ids and chat template as one GGUF file."""
    import gguf

    model_args = model.args
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("baby-llama2-chinese")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType[GGUF_FILE_TYPES[dtype_name]])
    w.add_vocab_size(model_args.vocab_size)
    w.add_context_length(model_args.max_seq_len)
    w.add_embedding_length(model_args.dim)
    w.add_block_count(model_args.n_layers)
    w.add_feed_forward_length(model_args.hidden_dim)
    w.add_head_count(model_args.n_heads)
    w.add_head_count_kv(model_args.n_kv_heads)
    w.add_key_length(model_args.dim // model_args.n_heads)
    w.add_value_length(model_args.dim // model_args.n_heads)
    w.add_rope_dimension_count(model_args.dim // model_args.n_heads)
    w.add_rope_freq_base(model_args.rope_theta)
    w.add_layer_norm_rms_eps(model_args.norm_eps)
    tokens, scores, types, spec = gguf_vocab(tokenizer, model_args.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.sp.unk_id())
    w.add_pad_token_id(tokenizer.pad_id)
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


def ollama_modelfile(tokenizer, max_seq_len, decoding=None, gguf_name=GGUF_NAME):
    """An Ollama Modelfile for the GGUF beside it (`ollama create NAME -f Modelfile`): our
    prompt as its template, the model's context, and the decoding of generation_config.json
    (greedy, and the stored repetition penalty over the whole context and answer length, else
    eval.py's default length); it stops at the eos piece, as our answers do."""
    decoding = decoding or {}
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(tokenizer.id_to_piece(tokenizer.bos_id))}"""',
             f"PARAMETER num_ctx {max_seq_len}", f"PARAMETER temperature {decoding.get('temperature') or 0:g}",
             f"PARAMETER repeat_penalty {decoding.get('repetition_penalty') or 1:g}",
             "PARAMETER repeat_last_n -1",  # -1: the whole context, as our penalty counts every token seen
             f"PARAMETER num_predict {decoding.get('max_new_tokens') or default_max_new_tokens(max_seq_len)}",
             f'PARAMETER stop "{tokenizer.id_to_piece(tokenizer.eos_id)}"']
    if decoding.get("no_repeat_ngram_size"):
        lines.append(f"# generation_config.json's no_repeat_ngram_size {decoding['no_repeat_ngram_size']} has no Ollama "
                     f"parameter: answers here can repeat runs that eval.py's cannot")
    return "\n".join(lines) + "\n"


def check_gguf(path, model, tokenizer, dtype_name):
    """Read the GGUF file back with the gguf package's reader: every tensor's bytes and the
    vocabulary and special ids must be what was meant to be written."""
    import gguf

    reader = gguf.GGUFReader(path)
    expected = gguf_tensors(model, dtype_name)
    found = {t.name: t for t in reader.tensors}
    if sorted(found) != sorted(expected):
        raise ExportError(f"{path}: tensors {sorted(found)} differ from {sorted(expected)}")
    for name, (array, ggml_type) in expected.items():
        t = found[name]
        if t.tensor_type != ggml_type or t.data.tobytes() != array.tobytes():
            raise ExportError(f"{path}: tensor {name} does not read back as written")
    field = reader.get_field
    tokens = gguf_vocab(tokenizer, model.args.vocab_size)[0]
    ids = [field(f"tokenizer.ggml.{k}_token_id").contents() for k in ("bos", "eos", "padding")]
    if field("tokenizer.ggml.tokens").contents() != tokens or ids != [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]:
        raise ExportError(f"{path}: the vocabulary or special ids do not read back as written")
