"""demo.py without network: one message that says how to run it on local data."""
import sys
from pathlib import Path

import pytest

import demo


def test_demo_without_network_names_data_dir(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):  # what hf_hub_download raises once its retries give up
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.\nPlease check your connection.")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--data-dir", "", "--work-dir", str(tmp_path / "work"),
                                      "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        demo.main()
    message = str(stop.value.code)
    assert "DATA_DIR=path/to/data" in message and "shibing624/medical" in message
    assert "LocalEntryNotFoundError: An error happened" in message and "Please check" not in message  # one line of it
    assert len(message.splitlines()) == 2


@pytest.mark.parametrize("preset", sorted(demo.LADDER))
def test_every_rung_is_commands_its_scripts_accept(tmp_path, preset):
    """The rungs are never run here (minutes to hours), so each stage's command line is parsed by
    the script it names: a flag that one of them does not take fails here, not after an hour."""
    import choose_decoding
    import data_process
    import eval as qa_eval
    import pretrain
    import sft
    parsers = {"data_process.py": data_process.build_parser().parse_args, "pretrain.py": pretrain.parse_args,
               "sft.py": sft.parse_args, "choose_decoding.py": choose_decoding.parse_args, "eval.py": qa_eval.parse_args}
    data = tmp_path / "data"
    for part in ("pretrain", "sft", "medical_qa", "tokenizer/chatglm2"):
        (data / part).mkdir(parents=True)
    for name in ("medical_dialogues.jsonl", "laws.jsonl"):
        (data / "pretrain" / name).write_text('{"text": "x"}\n', encoding="utf-8")
    for name in ("medical_chatmed.jsonl", "general_belle.jsonl"):
        (data / "sft" / name).write_text("{}\n", encoding="utf-8")
    (data / "medical_qa" / "qa.jsonl").write_text("{}\n", encoding="utf-8")
    (data / "tokenizer" / "chatglm2" / "tokenizer.model").write_bytes(b"")

    commands = demo.stages(demo.LADDER[preset], data, tmp_path / "work", tmp_path / "out")
    assert [name for name, _ in commands][-4:] == ["pretrain", "sft", "decoding", "eval"]
    for name, command in commands:
        script, *args = [str(a) for a in command]
        parsers[script](args)
    pretrain_inputs = next(c for n, c in commands if n == "data: pretrain")
    chosen = [Path(str(a)).name for a in pretrain_inputs if str(a).endswith(".jsonl")]
    assert chosen == (["laws.jsonl", "medical_dialogues.jsonl"] if preset == "gpu" else ["medical_dialogues.jsonl"])
    uses_chatglm2 = any(str(a).endswith("chatglm2/tokenizer.model") for a in pretrain_inputs)
    assert uses_chatglm2 == (preset == "gpu")


def test_the_gpu_rung_without_the_chatglm2_tokenizer_says_where_it_goes(tmp_path):
    data = tmp_path / "data"
    for part in ("pretrain", "sft", "medical_qa"):
        (data / part).mkdir(parents=True)
        (data / part / "a.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(demo.Refusal, match="chatglm2/tokenizer.model"):
        demo.stages(demo.LADDER["gpu"], data, tmp_path / "work", tmp_path / "out")
