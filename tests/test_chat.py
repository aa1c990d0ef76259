"""chat.py as a user meets it: default flags on small contexts, Ctrl-C, cut prompts said
aloud, undecodable input, and a checkpoint whose own tokenizer has moved."""
import io
import shutil
import time

import pytest
import torch

import chat
import generate
from engine import BatchEngine
from sampling import Sampling
from checkpoint import save_checkpoint
from chatglm_tokenizer import Tokenizer, TokenizerNotFound
from model import ModelArgs, Transformer
from prompt import context_prompt, sft_prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_checkpoint(path, tok, kind="sft", max_seq_len=64):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    save_checkpoint(path, {"kind": kind, "model_args": args.to_dict(), "tokenizer": tok.identity(),
                           "model": Transformer(args).state_dict(), "step": 3})
    return path


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, tiny_tokenizer):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sft") / "best.pt", tiny_tokenizer)


def type_lines(monkeypatch, data: bytes):
    """Stand-in for a terminal (or pipe) that the user types `data` into."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def record_prompts(monkeypatch, stop_after=None):
    """Note each prompt submitted to the engine; with stop_after, the user presses Ctrl-C
    after that many tokens of every answer (one token per engine step)."""
    prompts = []
    submit, step = BatchEngine.submit, BatchEngine.step

    def recording_submit(engine, prompt_ids, *a, **kw):
        prompts.append(list(prompt_ids))
        engine.steps_left = stop_after
        return submit(engine, prompt_ids, *a, **kw)

    def interruptible_step(engine):
        if engine.steps_left == 0:
            raise KeyboardInterrupt
        if engine.steps_left is not None:
            engine.steps_left -= 1
        return step(engine)
    monkeypatch.setattr(BatchEngine, "submit", recording_submit)
    monkeypatch.setattr(BatchEngine, "step", interruptible_step)
    return prompts


@pytest.mark.parametrize("max_seq_len, expected", [(64, 32), (256, 128), (1024, 256)])
def test_default_answer_length_fits_every_context(tmp_path, tiny_tokenizer, capsys, max_seq_len, expected):
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", tiny_tokenizer, max_seq_len=max_seq_len)
    chat.main(["--ckpt", str(ckpt), "--prompt", "头痛怎么办", "--temperature", "0"])
    assert f"up to {expected} new tokens of the model's {max_seq_len}-token context" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"must be in 1..{max_seq_len - 2} to leave room"):
        chat.main(["--ckpt", str(ckpt), "--prompt", "x", "--max-new-tokens", str(max_seq_len)])


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(monkeypatch, capsys, sft_ckpt, tiny_tokenizer):
    prompts = record_prompts(monkeypatch, stop_after=3)
    type_lines(monkeypatch, "头痛怎么办\n还发热呢\n".encode())
    chat.main(["--ckpt", str(sft_ckpt), "--max-new-tokens", "20"])  # returns: no KeyboardInterrupt escapes
    out = capsys.readouterr().out
    assert out.count("[stopped]") == 2
    first_answer = out.split("> ")[1].split("  [stopped]")[0]
    # the second prompt holds the first turn, with the answer shown before Ctrl-C
    assert prompts[1] == sft_prompt_ids(tiny_tokenizer, context_prompt([("头痛怎么办", first_answer)], "还发热呢"))


def test_ctrl_c_in_a_one_shot_answer_exits_130(monkeypatch, sft_ckpt):
    record_prompts(monkeypatch, stop_after=2)
    with pytest.raises(SystemExit) as stop:
        chat.main(["--ckpt", str(sft_ckpt), "--prompt", "头痛怎么办"])
    assert stop.value.code == 130


def test_ctrl_c_or_ctrl_d_at_the_prompt_ends_cleanly(monkeypatch, sft_ckpt):
    type_lines(monkeypatch, b"")  # Ctrl-D: the end of input
    assert chat.main(["--ckpt", str(sft_ckpt)]) is None

    def ctrl_c(prompt):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", ctrl_c)
    assert chat.main(["--ckpt", str(sft_ckpt)]) is None


def test_undecodable_line_is_refused_and_the_session_goes_on(monkeypatch, capsys, sft_ckpt):
    prompts = record_prompts(monkeypatch)
    type_lines(monkeypatch, b"\xff\xfe\xb7\xa2\xc8\xc8\n" + "头痛怎么办\n".encode())  # a GBK line, then UTF-8
    chat.main(["--ckpt", str(sft_ckpt), "--max-new-tokens", "4"])
    assert "that line is not valid utf-8 text and was ignored" in capsys.readouterr().err
    assert len(prompts) == 1  # the valid line was answered
    with pytest.raises(SystemExit, match="--prompt is not valid UTF-8"):
        chat.main(["--ckpt", str(sft_ckpt), "--prompt", b"\xb7\xa2".decode("utf-8", "surrogateescape")])


def test_commands_help_reset_unknown_and_the_system_text(monkeypatch, capsys, sft_ckpt, tiny_tokenizer):
    prompts = record_prompts(monkeypatch)
    type_lines(monkeypatch, "/help\n头痛怎么办\n/reset\n/frobnicate\n还发热呢\n/quit\n不会问到\n".encode())
    chat.main(["--ckpt", str(sft_ckpt), "--max-new-tokens", "4", "--system", "你是医生。"])
    out, err = capsys.readouterr()
    assert "/reset" in out and "/quit" in out and "the conversation is forgotten" in err
    assert "unknown command /frobnicate; /help lists the commands" in err
    # two questions answered, the second without the first turn (reset), both after the system text;
    # no command reached the model, and nothing after /quit did
    assert prompts == [sft_prompt_ids(tiny_tokenizer, context_prompt([], q, "你是医生。")) for q in ("头痛怎么办", "还发热呢")]


def test_ctrl_c_before_the_first_token_leaves_no_empty_turn(monkeypatch, sft_ckpt, tiny_tokenizer):
    prompts = record_prompts(monkeypatch, stop_after=0)
    type_lines(monkeypatch, "头痛怎么办\n还发热呢\n".encode())
    chat.main(["--ckpt", str(sft_ckpt), "--max-new-tokens", "8"])
    assert prompts[1] == sft_prompt_ids(tiny_tokenizer, context_prompt([], "还发热呢"))


def test_cut_prompts_are_announced(sft_ckpt, tiny_tokenizer, capsys):
    ckpt, model, tokenizer = generate.load_for_inference(str(sft_ckpt), device="cpu")
    engine = BatchEngine(model, tokenizer.eos_id, tokenizer.pad_id, max_batch=1)
    session = chat.Session(engine, tokenizer, True, max_new_tokens=32, sampling=Sampling())
    session.history = [("头痛发热怎么办" * 2, "多休息多喝水" * 2)] * 3
    ids = session.prompt_ids("咳嗽呢")
    assert len(ids) <= 32 and ids[-1] == tokenizer.bos_id
    err = capsys.readouterr().err
    assert "of the conversation: it no longer fits the 64-token context beside a 32-token answer" in err
    assert len(session.history) < 3  # the dropped turns are forgotten, so the note comes once
    session.prompt_ids("头痛发热怎么办" * 20)
    assert "the question was cut to its last 31 tokens" in capsys.readouterr().err
    pretrain = chat.Session(engine, tokenizer, False, max_new_tokens=32, sampling=Sampling())
    ids = pretrain.prompt_ids("医生建议" * 30)
    assert len(ids) == 32 and ids[0] == tokenizer.eos_id and ids[1:] == tokenizer.encode("医生建议" * 30)[-31:]
    assert "the text was cut to its last 31 tokens" in capsys.readouterr().err


def test_moved_own_tokenizer_is_named_at_once(tmp_path, tiny_tokenizer_path, monkeypatch):
    moved = tmp_path / "moved" / "own.model"
    moved.parent.mkdir()
    shutil.copy(tiny_tokenizer_path, moved)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt" / "best.pt", Tokenizer(moved))
    moved.unlink()
    monkeypatch.delenv("BABYLLAMA_TOKENIZER", raising=False)
    monkeypatch.setattr("chatglm_tokenizer.tokenizer.DEFAULT_PATH", tmp_path / "absent.model")

    def no_hub(*a, **kw):
        raise AssertionError("an own tokenizer is never looked for on the Hub")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_hub)
    started = time.time()
    with pytest.raises(SystemExit) as err:
        chat.main(["--ckpt", str(ckpt), "--prompt", "x"])
    assert time.time() - started < 5
    message = str(err.value)
    assert str(moved) in message and "--tokenizer PATH" in message and "chatglm2" not in message.lower()
    assert isinstance(TokenizerNotFound(""), FileNotFoundError)  # so every script reports it in one message
    chat.main(["--ckpt", str(ckpt), "--prompt", "x", "--tokenizer", str(tiny_tokenizer_path), "--max-new-tokens", "2"])


def test_keys_typed_during_an_answer_are_not_echoed_nor_kept():
    import os
    import pty
    import select
    import termios
    master, slave = pty.openpty()
    with os.fdopen(slave, "rb", buffering=0) as terminal:
        before = termios.tcgetattr(slave)
        with chat.keys_held_back(terminal):
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & termios.ECHO and not lflag & termios.ICANON and lflag & termios.ISIG
            os.write(master, b"typed while it answers\n")
            time.sleep(0.2)
        assert termios.tcgetattr(slave) == before
        assert select.select([slave], [], [], 0.2)[0] == []  # nothing left to read as the next line
        echoed = select.select([master], [], [], 0.2)[0]
        assert not echoed or b"typed" not in os.read(master, 1024)
        with chat.keys_held_back(io.StringIO()):  # not a terminal: nothing to do
            pass
    os.close(master)
