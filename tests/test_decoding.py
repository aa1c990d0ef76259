"""Decoding defaults stored with a checkpoint: choose_decoding.py picks them on validation
questions and writes generation_config.json; eval.py, chat.py and serve.py fill unset flags
from it; export.py carries it into the Hugging Face directory."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import choose_decoding  # noqa: E402
import eval as qa_eval  # noqa: E402
import serve  # noqa: E402
from engine import generate  # noqa: E402
from export import export  # noqa: E402
from generate import read_generation_config  # noqa: E402
from refusal import Refusal  # noqa: E402
from sampling import Sampling  # noqa: E402
from test_eval import qa_rows, save_tiny_checkpoint, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sft_dir(tmp_path, tiny_tokenizer):
    save_tiny_checkpoint(tmp_path / "sft" / "best.pt", tiny_tokenizer, "sft")
    return tmp_path / "sft"


def write_config(sft_dir, **settings):
    (sft_dir / "generation_config.json").write_text(json.dumps(settings), encoding="utf-8")


def test_a_flag_beats_the_stored_config_which_beats_the_script_default(sft_dir):
    write_config(sft_dir, repetition_penalty=1.3, max_new_tokens=20)
    cfg = qa_eval.parse_args(["--ckpt", str(sft_dir), "--data", "x.jsonl", "--max-new-tokens", "7"])
    assert qa_eval.resolve_decoding(cfg, qa_eval.GENERATION) == sft_dir / "generation_config.json"
    assert (cfg.max_new_tokens, cfg.repetition_penalty, cfg.temperature) == (7, 1.3, 0.0)

    (sft_dir / "generation_config.json").unlink()
    cfg = qa_eval.parse_args(["--ckpt", str(sft_dir), "--data", "x.jsonl"])
    assert qa_eval.resolve_decoding(cfg, qa_eval.GENERATION) is None
    assert (cfg.max_new_tokens, cfg.repetition_penalty) == (None, 1.0)  # eval.py's own defaults


def test_serve_takes_the_stored_config_as_its_request_defaults(sft_dir):
    write_config(sft_dir, repetition_penalty=1.2, max_new_tokens=20, temperature=0.0)
    cfg = serve.parse_args(["--ckpt", str(sft_dir), "--top-p", "0.5"])
    assert (cfg.repetition_penalty, cfg.max_new_tokens, cfg.temperature, cfg.top_p) == (1.2, 20, 0.0, 0.5)


@pytest.mark.parametrize("text, named", [("{not json", "unreadable"), ("[1, 2]", "not a JSON object"),
                                          ('{"repetition_penalty": -1}', "repetition_penalty=-1"),
                                          ('{"max_new_tokens": 0}', "max_new_tokens=0")])
def test_a_damaged_or_out_of_range_config_is_refused_naming_the_file(sft_dir, text, named):
    (sft_dir / "generation_config.json").write_text(text, encoding="utf-8")
    with pytest.raises(Refusal, match=named) as e:
        read_generation_config(sft_dir / "generation_config.json")
    assert "generation_config.json" in str(e.value)


def test_the_rule_takes_the_best_bleu_among_settings_that_do_not_loop():
    loops = {"sacrebleu": 5.0, "repeat_rate": 0.4}
    good = {"sacrebleu": 3.0, "repeat_rate": 0.05}
    worse = {"sacrebleu": 2.0, "repeat_rate": 0.0}
    assert choose_decoding.pick([loops, good, worse], 0.10) is good
    assert choose_decoding.pick([loops, {"sacrebleu": 1.0, "repeat_rate": 0.3}], 0.10)["repeat_rate"] == 0.3


def test_an_answer_cut_at_n_tokens_is_the_answer_a_limit_of_n_gives(sft_dir, tiny_tokenizer):
    """What lets one generation score every length limit (greedy, with a repetition penalty)."""
    from checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(sft_dir)).eval()
    prompts = [tiny_tokenizer.encode(r["question"]) + [tiny_tokenizer.bos_id] for r in qa_rows(3)]
    sampling = Sampling(repetition_penalty=1.3)
    long = generate(model, prompts, 16, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id, sampling)
    short = generate(model, prompts, 5, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id, sampling)
    assert [ids[:5] for ids in long] == short


def test_choose_decoding_writes_the_setting_eval_then_uses(tmp_path, sft_dir, capsys):
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": r["question"], "answer": r["answer"]} for r in qa_rows(4)])
    choose_decoding.main(["--ckpt", str(sft_dir), "--data", str(val), "--repetition-penalties", "1.0", "1.5",
                          "--no-repeat-ngram-sizes", "2", "--max-new-tokens", "4", "12"])
    stored = json.loads((sft_dir / "generation_config.json").read_text(encoding="utf-8"))
    candidates = stored["chosen_on"]["candidates"]
    assert len(candidates) == 6 and stored["chosen_on"]["n"] == 4
    assert {(c["repetition_penalty"], c["no_repeat_ngram_size"], c["max_new_tokens"]) for c in candidates} == {
        (1.0, 0, 4), (1.0, 0, 12), (1.5, 0, 4), (1.5, 0, 12), (1.0, 2, 4), (1.0, 2, 12)}
    assert all(c["repeat_rate"] == 0 for c in candidates if c["no_repeat_ngram_size"])
    best = choose_decoding.pick(candidates, 0.10)
    keys = ("repetition_penalty", "no_repeat_ngram_size", "max_new_tokens")
    assert [stored[k] for k in keys] == [best[k] for k in keys]
    assert "<- chosen" in capsys.readouterr().out

    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(2))
    qa_eval.evaluate(qa_eval.parse_args(["--ckpt", str(sft_dir), "--data", str(qa), "--out-dir", str(tmp_path / "ev")]))
    config = json.loads((tmp_path / "ev" / "config.json").read_text(encoding="utf-8"))
    assert [config[k] for k in keys] == [stored[k] for k in keys]
    assert config["decoding_from"].endswith("generation_config.json")


def test_choose_decoding_refuses_a_pretrained_checkpoint(tmp_path, tiny_tokenizer):
    save_tiny_checkpoint(tmp_path / "pre" / "best.pt", tiny_tokenizer, "pretrain")
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "问题", "answer": "回答"}])
    with pytest.raises(SystemExit) as e:
        choose_decoding.main(["--ckpt", str(tmp_path / "pre"), "--data", str(val)])
    assert e.value.code != 0 and not (tmp_path / "pre" / "generation_config.json").exists()


def test_export_carries_the_stored_decoding_into_generation_config_json(tmp_path, sft_dir):
    from transformers import GenerationConfig
    write_config(sft_dir, repetition_penalty=1.25, max_new_tokens=30, temperature=0.0, no_repeat_ngram_size=3)
    export(sft_dir, tmp_path / "hf", with_gguf=True)
    loaded = GenerationConfig.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert (loaded.repetition_penalty, loaded.max_new_tokens, loaded.do_sample) == (1.25, 30, False)
    assert loaded.no_repeat_ngram_size == 3
    modelfile = (tmp_path / "hf" / "Modelfile").read_text(encoding="utf-8")
    assert "PARAMETER repeat_penalty 1.25\n" in modelfile and "PARAMETER num_predict 30\n" in modelfile
