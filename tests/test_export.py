"""export.py: a tiny checkpoint exported to a Hugging Face directory and loaded back with
transformers, offline; logits, token ids and greedy generations compared with ours."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere below

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from chatglm_tokenizer import Tokenizer  # noqa: E402
from conftest import ROOT, make_chinese_texts  # noqa: E402
from export import export  # noqa: E402
from hf_export import hf_tokenizer  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from prompt import chat_template, messages_prompt, sft_prompt_ids  # noqa: E402
from refusal import Refusal  # noqa: E402

TEXT = "医生你好，我头痛发热三天了，咳嗽，应该吃什么药？"
MIXED_TEXTS = ["", " ", "  两个空格", "\n", "第一行\n\n第二行 ", "体温38.5度，血压140/90", "Hello 世界  tabs\tand\r\nCRLF",
               "全角ＡＢＣ　½ 😀", "▁已有前缀", "2024年3月15日 12:30"]
CHATGLM2_PATH = ROOT.parent / "shared" / "data" / "tokenizer" / "chatglm2" / "tokenizer.model"


def save_tiny_checkpoint(tmp_path, tok, seed=0, **model_kw):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=64, **model_kw)
    model = Transformer(args)
    with torch.no_grad():  # far from init (norm weights != 1, larger logits), so a swapped or
        for p in model.parameters():  # misplaced tensor cannot hide
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / "ckpt" / "best.pt"
    save_checkpoint(path, {"kind": "sft", "model_args": args.to_dict(), "tokenizer": tok.identity(),
                           "model": model.state_dict(), "step": 0})
    return path, model.eval()


def our_greedy(model, ids, n_new, eos_id):
    ids = list(ids)
    for _ in range(n_new):
        with torch.no_grad():
            next_id = int(model.logits(torch.tensor([ids]))[0, -1].argmax())
        ids.append(next_id)
        if next_id == eos_id:
            break
    return ids


@pytest.mark.parametrize("model_kw", [
    {"rope_theta": 500000.0, "norm_eps": 1e-6},  # tied head; non-default rope/eps must carry over
    {"n_kv_heads": 2},  # grouped-query attention
    {"tie_embeddings": False},  # separate lm_head
], ids=["tied", "gqa", "untied"])
def test_export_reloads_in_transformers_with_equal_logits(tmp_path, tiny_tokenizer, model_kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt_path, model = save_tiny_checkpoint(tmp_path, tiny_tokenizer, **model_kw)
    out = tmp_path / "hf"
    reported = export(ckpt_path, out)
    assert reported <= 1e-4

    config = json.loads((out / "config.json").read_text())
    args = model.args
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (args.n_kv_heads, args.hidden_dim)
    assert config["tie_word_embeddings"] == args.tie_embeddings
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not args.tie_embeddings)

    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tiny_tokenizer.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == tiny_tokenizer.decode(ids)

    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf_model(x).logits - model.logits(x)).abs().max().item()
    assert diff <= 1e-4

    prompt = ids + [tiny_tokenizer.bos_id]  # an SFT prompt: question ids, then bos
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=6)  # greedy: generation_config.json's default
    assert hf_out[0].tolist() == our_greedy(model, prompt, 6, tiny_tokenizer.eos_id)


def test_export_bfloat16_weights(tmp_path, tiny_tokenizer):
    ckpt_path, model = save_tiny_checkpoint(tmp_path, tiny_tokenizer, seed=1)
    diff = export(ckpt_path, tmp_path / "hf", dtype_name="bfloat16")
    assert diff <= 1e-4  # against our weights rounded to bf16, computed in fp32
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, model.tok_embeddings.weight.detach().to(torch.bfloat16))


def test_chat_template_gives_the_sft_prompt(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    ckpt_path, _ = save_tiny_checkpoint(tmp_path, tiny_tokenizer)
    export(ckpt_path, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    messages = [{"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "多休息"},
                {"role": "user", "content": "还发热呢"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tiny_tokenizer.encode("问：头痛怎么办\n答：多休息\n还发热呢") + [tiny_tokenizer.bos_id]
    assert list(ids) == expected
    with_system = [{"role": "system", "content": "你是医生"}, *messages]
    ids = hf_tok.apply_chat_template(with_system, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == sft_prompt_ids(tiny_tokenizer, messages_prompt(with_system))


def test_export_refuses_qk_norm_and_existing_out(tmp_path, tiny_tokenizer):
    ckpt_path, _ = save_tiny_checkpoint(tmp_path, tiny_tokenizer, qk_norm=True)
    with pytest.raises(Refusal, match="qk_norm"):
        export(ckpt_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    ckpt_path, _ = save_tiny_checkpoint(tmp_path, tiny_tokenizer)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(Refusal, match="already exists"):
        export(ckpt_path, out)
    export(ckpt_path, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temp dirs left behind


def check_same_ids(sp_tok, texts):
    hf = hf_tokenizer(sp_tok.path, sp_tok.vocab_size)
    ours = sp_tok.encode_batch(texts)
    theirs = [e.ids for e in hf.encode_batch(texts)]
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts encode differently, e.g. {mismatched[0]!r}"
    return hf


def test_tokenizer_json_equals_sentencepiece_on_tiny_vocab(tiny_tokenizer):
    texts = MIXED_TEXTS + make_chinese_texts(300, seed=7) + [" ".join(make_chinese_texts(5, seed=8))]
    check_same_ids(tiny_tokenizer, texts)


@pytest.mark.skipif(not CHATGLM2_PATH.is_file(), reason="ChatGLM2 tokenizer.model not available")
def test_tokenizer_json_equals_sentencepiece_on_chatglm2():
    tok = Tokenizer(CHATGLM2_PATH)
    hf = check_same_ids(tok, MIXED_TEXTS + make_chinese_texts(200, seed=9) + ["Python's f-strings: f'{x!r}' 和 中文混排"])
    # The model has 64793 ids, the SentencePiece file 64789 pieces: the rest are placeholders.
    assert (tok.vocab_size, hf.get_vocab_size()) == (64793, 64793)
    assert hf.decode(tok.encode("你好") + [64790]) == "你好"


def gguf_field(reader, key):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("model_kw, dtype_name", [({"n_kv_heads": 2, "rope_theta": 500000.0}, "float32"),
                                                  ({"tie_embeddings": False}, "bfloat16")], ids=["gqa-f32", "untied-bf16"])
def test_gguf_reads_back_with_our_weights_vocabulary_and_template(tmp_path, tiny_tokenizer, model_kw, dtype_name):
    from gguf import GGMLQuantizationType, GGUFReader

    tok = tiny_tokenizer
    ckpt_path, model = save_tiny_checkpoint(tmp_path, tok, **model_kw)
    export(ckpt_path, tmp_path / "hf", dtype_name=dtype_name, with_gguf=True)
    reader = GGUFReader(tmp_path / "hf" / "model.gguf")
    args = model.args

    expected = {"general.architecture": "llama", "llama.context_length": args.max_seq_len,
                "llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
                "llama.feed_forward_length": args.hidden_dim, "llama.attention.head_count": args.n_heads,
                "llama.attention.head_count_kv": args.n_kv_heads, "llama.rope.freq_base": args.rope_theta,
                "llama.attention.layer_norm_rms_epsilon": pytest.approx(args.norm_eps),
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": tok.bos_id,
                "tokenizer.ggml.eos_token_id": tok.eos_id, "tokenizer.ggml.unknown_token_id": tok.sp.unk_id(),
                "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": False,
                "tokenizer.chat_template": chat_template()}
    assert {k: gguf_field(reader, k) for k in expected} == expected
    assert gguf_field(reader, "tokenizer.ggml.tokens") == [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    kinds = [2 if tok.sp.is_unknown(i) else 3 if tok.sp.is_control(i) else 6 if tok.sp.is_byte(i) else 1
             for i in range(tok.vocab_size)]  # GGUF token types: normal 1, unknown 2, control 3, byte 6
    assert gguf_field(reader, "tokenizer.ggml.token_type") == kinds
    assert gguf_field(reader, "tokenizer.ggml.scores") == pytest.approx([tok.sp.get_score(i) for i in range(tok.vocab_size)])

    # weights: as exported (rounded to dtype_name), norms in fp32; q/k rows reordered so that
    # row 2i and 2i+1 of a head hold its dimensions i and i + head_dim/2 (llama.cpp's rope pairs)
    tensors = {t.name: t for t in reader.tensors}
    hd = args.dim // args.n_heads
    pairs = [r // 2 + (r % 2) * (hd // 2) for r in range(hd)]

    def rope_rows(w, n):
        return w[[h * hd + r for h in range(n) for r in pairs]]

    def stored(name, shape):
        t = tensors[name]
        if t.tensor_type == GGMLQuantizationType.BF16:
            bits = torch.from_numpy(t.data.view("uint16").astype("int32")).to(torch.int32) << 16
            return bits.view(torch.float32).reshape(shape)
        assert t.tensor_type == GGMLQuantizationType.F32
        return torch.from_numpy(t.data.copy()).reshape(shape)

    exported = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    ours = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not args.tie_embeddings:
        ours["output.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        ours.update({f"blk.{i}.attn_q.weight": rope_rows(att.wq.weight, args.n_heads),
                     f"blk.{i}.attn_k.weight": rope_rows(att.wk.weight, args.n_kv_heads),
                     f"blk.{i}.attn_v.weight": att.wv.weight, f"blk.{i}.attn_output.weight": att.wo.weight,
                     f"blk.{i}.ffn_gate.weight": ffn.w1.weight, f"blk.{i}.ffn_down.weight": ffn.w2.weight,
                     f"blk.{i}.ffn_up.weight": ffn.w3.weight, f"blk.{i}.attn_norm.weight": layer.attention_norm.weight,
                     f"blk.{i}.ffn_norm.weight": layer.ffn_norm.weight})
    assert sorted(tensors) == sorted(ours)
    for name, w in ours.items():
        assert torch.equal(stored(name, w.shape), w.detach().to(exported).float()), name
    assert (tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32)

    modelfile = (tmp_path / "hf" / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./model.gguf\n") and f"PARAMETER num_ctx {args.max_seq_len}" in modelfile
    assert f"PARAMETER num_predict {min(256, args.max_seq_len // 2)}\n" in modelfile  # eval.py's default length
    assert 'PARAMETER stop "</s>"\n' in modelfile


def test_gguf_quant_q8_0_writes_a_quantized_file_close_to_the_weights(tmp_path, tiny_tokenizer):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    ckpt_path, model = save_tiny_checkpoint(tmp_path, tiny_tokenizer)
    export(ckpt_path, tmp_path / "hf", gguf_quant="q8_0")
    full = {t.name: t for t in GGUFReader(tmp_path / "hf" / "model.gguf").tensors}
    quantized = {t.name: t for t in GGUFReader(tmp_path / "hf" / "model-q8_0.gguf").tensors}
    assert sorted(quantized) == sorted(full)
    for name, t in quantized.items():
        w = np.asarray(full[name].data, dtype=np.float32).reshape(np.asarray(full[name].data).shape)
        if w.ndim == 1:
            assert t.tensor_type == GGMLQuantizationType.F32 and np.array_equal(np.asarray(t.data), w), name
            continue
        assert t.tensor_type == GGMLQuantizationType.Q8_0, name
        back = dequantize(np.asarray(t.data), GGMLQuantizationType.Q8_0).reshape(w.shape)
        blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True) / 127  # each block's step
        assert np.all(np.abs(back - w).reshape(blocks.shape[0], -1, 32) <= blocks * 0.75), name  # half a step + fp16 scale
        assert not np.array_equal(back, w)  # really quantized
    modelfile = (tmp_path / "hf" / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")


def test_the_model_card_follows_the_training_chain_and_shows_only_its_own_scores(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=32)
    state = Transformer(args).state_dict()
    (tmp_path / "pre").mkdir()
    (tmp_path / "corpus.json").write_text(json.dumps({"sources": ["raw/wiki.jsonl", "raw/dialogues.jsonl"]}))
    (tmp_path / "pre" / "config.json").write_text(json.dumps({"data": [str(tmp_path / "corpus.bin")]}))
    save_checkpoint(tmp_path / "pre" / "best.pt", {"kind": "pretrain", "model_args": args.to_dict(), "tokenizer": tok.identity(),
                                                   "model": state, "step": 40, "tokens": 5120,
                                                   "train_data": [["corpus.bin", 9000]]})
    sft_path = tmp_path / "sft" / "best.pt"
    save_checkpoint(sft_path, {"kind": "sft", "model_args": args.to_dict(), "tokenizer": tok.identity(), "model": state,
                               "step": 7, "tokens": 896, "train_data": [["qa.jsonl", 300]],
                               "init": str(tmp_path / "pre" / "best.pt")})
    metrics = {"checkpoint": str(sft_path), "n": 20, "data": "eval/medical.jsonl", "bleu4": 3.21, "bleu4_ci95": [2.5, 4.0],
               "rougeL": 15.5, "rougeL_ci95": [14.0, 17.0], "length_ratio": 0.9, "repeat_rate": 0.05, "answer_bpc": 5.1,
               "baselines": {"copy_question": {"bleu4": 2.0, "rougeL": 13.0}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    export(sft_path, tmp_path / "hf", scores_path=tmp_path / "metrics.json")
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "| sft | 7 | 896 | qa.jsonl (300 tokens) |" in card and "| pretrain | 40 | 5,120 | corpus.bin (9,000 tokens) |" in card
    assert "sacreBLEU 3.21 [2.50, 4.00], ROUGE-L 15.50 [14.00, 17.00]" in card and "sacreBLEU 2.00, ROUGE-L 13.00" in card
    notice = (tmp_path / "hf" / "LICENSE.md").read_text(encoding="utf-8")
    assert "- dialogues.jsonl\n- qa.jsonl\n- wiki.jsonl\n" in notice  # the .bin's recorded sources, not the .bin
    metrics["checkpoint"] = str(tmp_path / "pre" / "best.pt")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(Refusal, match=r"--scores .*metrics.json scores .*pre/best.pt, not .*sft/best.pt"):
        export(sft_path, tmp_path / "hf2", scores_path=tmp_path / "metrics.json")
    assert not (tmp_path / "hf2").exists()


def test_a_corrupted_gguf_is_detected(tmp_path, tiny_tokenizer):
    from gguf_export import check_gguf, write_gguf

    _, model = save_tiny_checkpoint(tmp_path, tiny_tokenizer)
    path = tmp_path / "model.gguf"
    write_gguf(path, model, tiny_tokenizer, "float32")
    check_gguf(path, model, tiny_tokenizer, "float32")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(Refusal, match="does not read back as written"):
        check_gguf(path, model, tiny_tokenizer, "float32")


def test_user_text_with_literal_control_pieces_stays_text_on_both_sides(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer
    ckpt_path, _ = save_tiny_checkpoint(tmp_path, tok)
    export(ckpt_path, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "我输入了<s>、</s>和<unk>这几个字"
    control = {tok.bos_id, tok.eos_id, tok.sp.unk_id()}
    ours = tok.encode(text)  # what chat.py and eval.py encode
    assert not control & set(ours)
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == ours
    messages = [{"role": "system", "content": "系统<s>"}, {"role": "user", "content": text},
                {"role": "assistant", "content": "回答</s>"}, {"role": "user", "content": text}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True,
                                     return_dict=False)
    assert list(ids) == sft_prompt_ids(tok, messages_prompt(messages))  # only the final bos is a control id
    # without those flags transformers matches the control pieces' spelling in user text
    assert control & set(hf_tok(text)["input_ids"])
