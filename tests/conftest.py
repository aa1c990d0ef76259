"""Shared fixtures. Everything is offline and tiny: the tokenizer is a small SentencePiece
model trained here on generated Chinese text, never the ChatGLM2 file."""
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm_tokenizer import Tokenizer, train_sentencepiece  # noqa: E402

SYLLABLES = list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你"
                 "医生病人药治疗头痛发热咳嗽感冒胃肠心脏血压糖尿肝肾检查建议休息饮食运动")


def make_chinese_texts(n, seed=0, min_len=8, max_len=80):
    """Deterministic pseudo-Chinese documents with some repeated structure to learn."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        words = [rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(length // 2)]
        texts.append("".join(words) + "。" + str(rng.randint(0, 999)))
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny.model"
    train_sentencepiece(make_chinese_texts(400, seed=1), vocab_size=400, out_path=out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (more so on a busy machine)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
