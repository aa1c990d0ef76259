"""The ChatGLM2 SentencePiece tokenizer (or an own SentencePiece vocabulary), wrapped
directly over `sentencepiece` so that no transformers internals are involved.

Where the model file comes from, first match wins:
  1. an explicit path (`--tokenizer PATH` on every script),
  2. the environment variable BABYLLAMA_TOKENIZER,
  3. chatglm_tokenizer/tokenizer.model beside this file,
  4. a download of `tokenizer.model` from the Hub repo THUDM/chatglm2-6b.
"""
import hashlib
import os
from pathlib import Path

import sentencepiece as spm

from refusal import Refusal

from .proto import without_dummy_prefix

HUB_REPO = "THUDM/chatglm2-6b"
ENV_VAR = "BABYLLAMA_TOKENIZER"
DEFAULT_PATH = Path(__file__).resolve().parent / "tokenizer.model"
CHATGLM2_SHA256 = "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"
# ChatGLM2 has 64789 SentencePiece pieces plus its own special tokens after them; upstream's
# model (and every .bin made for it) uses 64793 ids, so that is its vocab size.
CHATGLM2_VOCAB_SIZE = 64793
UINT16_LIMIT = 65535


class TokenizerNotFound(Refusal, FileNotFoundError):
    """No tokenizer.model where one was looked for (scripts report it in one message)."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_from_hub():
    try:
        from huggingface_hub import hf_hub_download
        print(f"tokenizer: downloading tokenizer.model from the Hub repo {HUB_REPO} ...")
        return Path(hf_hub_download(HUB_REPO, "tokenizer.model"))  # shows its own progress bar
    except Exception as e:  # offline, no access, missing package: all end the same way
        raise TokenizerNotFound(
            f"no tokenizer.model found and the download from {HUB_REPO} failed ({type(e).__name__}: {e}).\n"
            f"Supply the file in one of two ways:\n"
            f"  - pass --tokenizer /path/to/tokenizer.model (or set {ENV_VAR}=/path/to/tokenizer.model), or\n"
            f"  - copy it to {DEFAULT_PATH}"
        ) from None


def find_tokenizer_model(path=None, download=True):
    """Return the path of the tokenizer model file, downloading ChatGLM2's as a last resort
    (download=False: never; for an own vocabulary, which no Hub repo holds)."""
    if path:
        path = Path(path)
        if not path.is_file():
            raise TokenizerNotFound(f"tokenizer model {path} does not exist")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise TokenizerNotFound(f"{ENV_VAR}={env} does not name an existing file")
        return Path(env)
    if DEFAULT_PATH.is_file():
        return DEFAULT_PATH
    if not download:
        raise TokenizerNotFound(f"no tokenizer.model given, in {ENV_VAR} or at {DEFAULT_PATH}")
    return _download_from_hub()


class Tokenizer:
    """SentencePiece tokenizer with the ids the rest of the project relies on:
    bos, eos, pad, vocab_size (every id < vocab_size <= 65535 so uint16 holds it)."""

    def __init__(self, model_path):
        self.path = Path(model_path).resolve()
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError):
            raise Refusal(f"{self.path} is not a SentencePiece tokenizer model: pass a tokenizer.model "
                          f"(data_process.py tokenizer writes one; ChatGLM2's is on the Hub, THUDM/chatglm2-6b)") from None
        self.sha256 = file_sha256(self.path)
        self._continuation = None
        self.n_pieces = self.sp.get_piece_size()
        if self.sha256 == CHATGLM2_SHA256:
            self.name, self.vocab_size = "chatglm2", CHATGLM2_VOCAB_SIZE
        else:
            self.name, self.vocab_size = f"sentencepiece-{self.n_pieces}", self.n_pieces
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise Refusal(f"{self.path}: the tokenizer needs bos and eos pieces (bos={self.bos_id}, eos={self.eos_id})")
        # ChatGLM2 has no pad piece and pads with unk; do the same for any model without one.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        if self.vocab_size > UINT16_LIMIT:
            raise Refusal(f"{self.path}: vocab size {self.vocab_size} does not fit uint16 token files")

    def encode(self, text, bos=False, eos=False, dummy_prefix=True):
        """Text -> ids. dummy_prefix=False encodes it as a continuation of earlier text: without
        the '▁' SentencePiece otherwise puts before the first word (an answer after the prompt)."""
        ids = (self.sp if dummy_prefix else self.continuation_sp()).encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def continuation_sp(self):
        """The same model with add_dummy_prefix off (made on first use)."""
        if self._continuation is None:
            self._continuation = spm.SentencePieceProcessor(
                model_proto=without_dummy_prefix(self.path.read_bytes()))
        return self._continuation

    def encode_batch(self, texts, num_threads=-1, dummy_prefix=True):
        """Encode many texts at once; sentencepiece runs them on num_threads threads (-1: all cores)."""
        return (self.sp if dummy_prefix else self.continuation_sp()).encode(list(texts), num_threads=num_threads)

    def encode_batch_numpy(self, texts, num_threads=-1, eos=False):
        """encode_batch, but each result is an int32 numpy array: faster, as no Python ints are
        made. eos=True ends each with eos_id."""
        return self.sp.encode_as_numpy(list(texts), num_threads=num_threads, add_eos=eos)

    def decode(self, ids):
        """The text of ids. Bytes that form no character (a byte piece sampled on its own, an
        answer cut inside a character) are dropped rather than shown as U+FFFD."""
        return self.decode_raw(ids).replace("\ufffd", "")

    def decode_raw(self, ids):
        """The text of ids with U+FFFD for bytes that form no character yet (TextStream waits on
        them). Ids past the SentencePiece pieces (ChatGLM2's extra specials) have no text."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.n_pieces])

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.n_pieces else f"<special_{int(i)}>"

    def identity(self):
        """What a .bin meta or a checkpoint records so a mismatch can be refused later."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "path": str(self.path)}

    def check_identity(self, recorded, what):
        """Raise if `recorded` (an identity() dict from a file's meta) names another tokenizer."""
        if not recorded or recorded.get("sha256") != self.sha256:
            got = (recorded or {}).get("name", "nothing")
            raise Refusal(
                f"{what} was made with tokenizer {got} (sha256 {(recorded or {}).get('sha256')}), "
                f"but this run uses {self.name} ({self.path}, sha256 {self.sha256})")


def load_tokenizer(path=None, download=True):
    return Tokenizer(find_tokenizer_model(path, download))


def train_sentencepiece(texts, vocab_size, out_path, model_type="bpe", character_coverage=0.9995,
                        input_sentence_size=2_000_000):
    """Train an own SentencePiece vocabulary that works wherever the ChatGLM2 file does:
    unk=0, bos=1, eos=2, pad=3, byte fallback (no unknown characters), digits split, and
    no normalization, so decode(encode(text)) gives back the text exactly."""
    if not 8 < vocab_size <= UINT16_LIMIT:
        raise Refusal(f"vocab size {vocab_size} must be in 9..{UINT16_LIMIT} so uint16 holds every id")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_path.with_name(out_path.stem + ".tmp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_prefix), vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, max_sentence_length=16384, num_threads=os.cpu_count() or 1,
        minloglevel=2)
    os.replace(f"{tmp_prefix}.model", out_path)  # atomic: a half-trained model never looks complete
    os.remove(f"{tmp_prefix}.vocab")
    return out_path
