import pytest

from chatglm_tokenizer import TokenizerNotFound, find_tokenizer_model, load_tokenizer
from chatglm_tokenizer.tokenizer import ENV_VAR
from refusal import Refusal


def test_round_trip_and_special_ids(tiny_tokenizer):
    text = "医生建议多休息，每天运动30分钟。"
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.bos_id == 1 and tiny_tokenizer.eos_id == 2
    assert tiny_tokenizer.encode(text, bos=True, eos=True) == [1] + ids + [2]
    assert max(ids) < tiny_tokenizer.vocab_size == 400


def test_a_continuation_is_encoded_without_the_dummy_prefix(tiny_tokenizer):
    """dummy_prefix=False: no '▁' in front (where SentencePiece put a bare '▁' piece, the rest
    is the same pieces); decoding gives the text back either way."""
    t = tiny_tokenizer
    for text in ["建议多休息", "头痛发热怎么办", "检查血压123"]:
        plain, continued = t.encode(text), t.encode(text, dummy_prefix=False)
        assert t.id_to_piece(plain[0]).startswith("▁") and not t.id_to_piece(continued[0]).startswith("▁")
        if t.id_to_piece(plain[0]) == "▁":
            assert continued == plain[1:]
        assert t.decode(continued) == t.decode(plain) == text


def test_a_model_without_a_normalizer_entry_also_loses_the_dummy_prefix(tiny_tokenizer_path):
    import sentencepiece as spm
    from chatglm_tokenizer.proto import entries, without_dummy_prefix
    model = tiny_tokenizer_path.read_bytes()
    defaults = b"".join(raw for number, _, _, raw in entries(model) if number != 3)  # every normalizer setting default
    assert spm.SentencePieceProcessor(model_proto=defaults).encode("头痛", out_type=str)[0].startswith("▁")
    assert not spm.SentencePieceProcessor(model_proto=without_dummy_prefix(defaults)).encode(
        "头痛", out_type=str)[0].startswith("▁")


def test_unseen_characters_use_byte_fallback(tiny_tokenizer):
    text = "龘靐齉"  # never in the training text: byte pieces keep them, no <unk>
    ids = tiny_tokenizer.encode(text)
    assert 0 not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_bytes_that_form_no_character_are_dropped(tiny_tokenizer):
    """An answer cut inside a byte-fallback character, or a byte piece sampled among others,
    decodes without U+FFFD; decode_raw keeps the marks TextStream waits on."""
    ids = tiny_tokenizer.encode("头痛龘")
    byte_pieces = [i for i in ids if tiny_tokenizer.id_to_piece(i).startswith("<0x")]
    assert len(byte_pieces) == 3  # 龘 is three UTF-8 bytes
    assert tiny_tokenizer.decode(ids[:-1]) == "头痛"
    assert tiny_tokenizer.decode_raw(ids[:-1]).endswith("\ufffd")
    full = tiny_tokenizer.encode("头痛发热")
    assert tiny_tokenizer.decode(full[:-1] + [byte_pieces[0]] + full[-1:]) == "头痛发热"


def test_batch_encode_equals_single(tiny_tokenizer):
    texts = ["头痛发热怎么办", "", "心脏病的饮食", "检查血压123"]
    assert tiny_tokenizer.encode_batch(texts, num_threads=2) == [tiny_tokenizer.encode(t) for t in texts]
    assert [a.tolist() for a in tiny_tokenizer.encode_batch_numpy(texts, num_threads=1)] == [tiny_tokenizer.encode(t) for t in texts]


def test_identity_mismatch_is_refused(tiny_tokenizer):
    ident = tiny_tokenizer.identity()
    tiny_tokenizer.check_identity(ident, "x.bin")
    with pytest.raises(Refusal, match="other.bin"):
        tiny_tokenizer.check_identity({**ident, "sha256": "0" * 64, "name": "chatglm2"}, "other.bin")


def test_lookup_order_and_offline_message(tiny_tokenizer_path, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tiny_tokenizer_path))
    assert find_tokenizer_model() == tiny_tokenizer_path
    assert load_tokenizer().sha256 == load_tokenizer(tiny_tokenizer_path).sha256
    with pytest.raises(TokenizerNotFound, match="does not exist"):
        find_tokenizer_model(tmp_path / "missing.model")
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr("chatglm_tokenizer.tokenizer.DEFAULT_PATH", tmp_path / "absent.model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerNotFound) as err:
        find_tokenizer_model()
    assert "--tokenizer" in str(err.value) and "absent.model" in str(err.value)
