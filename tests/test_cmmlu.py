import json
import math

import pytest
import torch

import cmmlu
import eval as qa_eval
from refusal import Refusal
from test_eval import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER = ",Question,A,B,C,D,Answer\n"
ROW = {"Question": " 成人有几块骨？ ", "A": "206", "B": "100", "C": "300", "D": "12", "Answer": "A"}


def write_csv(path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{i},{r['Question']},{r['A']},{r['B']},{r['C']},{r['D']},{r['Answer']}\n" for i, r in enumerate(rows)]
    path.write_text(header + "".join(lines), encoding="utf-8")
    return path


def test_prompt_text_equals_the_hand_written_one():
    # 0-shot: the subject's description, the stripped question, the four options, "答案："
    assert cmmlu.build_prompt("anatomy", ROW, []) == (
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
        "成人有几块骨？\nA. 206\nB. 100\nC. 300\nD. 12\n答案：")
    shot = {"Question": "心脏有几个腔？", "A": "2", "B": "3", "C": "4", "D": "5", "Answer": "C"}
    assert cmmlu.build_prompt("virology", ROW, [shot, shot]) == (
        "以下是关于病毒学的单项选择题，请直接给出正确答案的选项。\n\n"
        + "心脏有几个腔？\nA. 2\nB. 3\nC. 4\nD. 5\n答案： C\n\n" * 2
        + "成人有几块骨？\nA. 206\nB. 100\nC. 300\nD. 12\n答案：")


def test_few_shot_examples_are_the_first_dev_rows_only(tmp_path):
    tests = [{**ROW, "Question": f"测试题{i}"} for i in range(3)]
    devs = [{**ROW, "Question": f"例题{i}", "Answer": "BCDAB"[i]} for i in range(5)]
    write_csv(tmp_path / "test" / "genetics.csv", tests)
    write_csv(tmp_path / "dev" / "genetics.csv", devs)
    (rows, shots), = cmmlu.read_subjects(tmp_path, 2).values()
    assert [r["Question"] for r in rows] == ["测试题0", "测试题1", "测试题2"]
    assert [s["Question"] for s in shots] == ["例题0", "例题1"]
    prompt = cmmlu.build_prompt("genetics", rows[1], shots)
    assert "例题0" in prompt and "例题1" in prompt and "例题2" not in prompt
    assert "测试题0" not in prompt and prompt.endswith("测试题1\nA. 206\nB. 100\nC. 300\nD. 12\n答案：")
    assert "答案： B\n\n" in prompt and "答案： C\n\n" in prompt
    assert cmmlu.read_subjects(tmp_path, 0)["genetics"][1] == []  # 0-shot reads no dev file


class CharTokenizer:
    """One id per character (the space and letters included), no dummy prefix."""

    def __init__(self, alphabet):
        self.ids = {c: i for i, c in enumerate(dict.fromkeys(alphabet))}
        self.pad_id = len(self.ids)

    def encode(self, text):
        return [self.ids[c] for c in text]


class BigramModel(torch.nn.Module):
    """The next token's logits are a table row picked by the current token, so every score can
    be worked out by hand."""

    def __init__(self, table, max_seq_len):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding.from_pretrained(torch.eye(table.shape[0]))
        self.output = torch.nn.Linear(table.shape[0], table.shape[1], bias=False)
        self.output.weight.data = table.T.clone()
        self.args = type("Args", (), {"max_seq_len": max_seq_len})

    def hidden_states(self, tokens):
        return self.tok_embeddings(tokens)


def test_choice_scores_equal_the_hand_computed_log_probabilities():
    prompt = cmmlu.build_prompt("anatomy", ROW, [])
    tok = CharTokenizer(prompt + " ABCD")
    V = tok.pad_id + 1
    table = torch.zeros(V, V)
    table[tok.ids[" "], tok.ids["A"]] = math.log(3)
    table[tok.ids[" "], tok.ids["B"]] = math.log(2)
    model = BigramModel(table, max_seq_len=16)
    requests, cut = cmmlu.choice_requests(tok, prompt, max_seq_len=16)
    assert cut and all(len(inp) == 16 for inp, _ in requests)  # cut from the left, as lm-eval cuts
    assert [choice for _, choice in requests] == [[tok.ids[" "], tok.ids[c]] for c in "ABCD"]
    # each choice is " X": log p(" " | "：") = -ln V (a row of zeros), then p(X | " ") from its row
    after_space = math.log(V - 2 + 3 + 2)
    expected = [-math.log(V) + math.log(3) - after_space, -math.log(V) + math.log(2) - after_space,
                -math.log(V) - after_space, -math.log(V) - after_space]
    scores = cmmlu.choice_logprobs(model, requests, tok.pad_id, batch_size=4)
    assert scores == pytest.approx(expected, abs=1e-5)
    record, = cmmlu.score_questions([{**ROW, "subject": "anatomy", "line": 2}], [scores])
    assert record["prediction"] == record["prediction_norm"] == "A"


def test_shared_rows_put_every_choice_inside_one_input():
    requests = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([5, 6, 7, 1], [2]), ([4, 6], [3])]
    rows, placed = cmmlu.shared_rows(requests)
    assert sorted(rows) == [[4, 6], [5, 6, 7, 1]]
    assert placed[0] == placed[1] == (rows.index([5, 6, 7, 1]), 3) and placed[2] == (rows.index([5, 6, 7, 1]), 4)


def test_eval_task_cmmlu_end_to_end(tmp_path, tiny_tokenizer):
    ckpt = save_tiny_checkpoint(tmp_path / "sft" / "best.pt", tiny_tokenizer, "sft")
    for subject, answers in (("anatomy", "ABCDA"), ("nutrition", "BBB")):
        write_csv(tmp_path / "mcq" / "test" / f"{subject}.csv",
                  [{**ROW, "Question": f"头痛发热{i}", "Answer": a} for i, a in enumerate(answers)])
        write_csv(tmp_path / "mcq" / "dev" / f"{subject}.csv", [{**ROW, "Answer": "D"}] * 5)
    out = tmp_path / "out"
    qa_eval.main(["--task", "cmmlu", "--ckpt", str(ckpt), "--data", str(tmp_path / "mcq"),
                           "--out-dir", str(out), "--shots", "5", "--batch-size", "3", "--device", "cpu"])
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert m["n"] == len(records) == 8 and m["shots"] == 5
    assert m["accuracy"] == pytest.approx(sum(r["prediction"] == r["answer"] for r in records) / 8)
    assert m["subjects"]["nutrition"]["n"] == 3 and m["baselines"]["most_common_answer"] == {"letter": "B", "accuracy": 0.5}
    assert m["baselines"]["chance"] == 0.25 and m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    # the batched shared-row scores equal each choice scored on its own
    from generate import load_for_inference
    _, model, tok = load_for_inference(str(ckpt), None, "cpu")
    rows, shots = cmmlu.read_subjects(tmp_path / "mcq", 5)["anatomy"]
    requests, _ = cmmlu.choice_requests(tok, cmmlu.build_prompt("anatomy", rows[0], shots), model.args.max_seq_len)
    with torch.no_grad():
        for (inp, choice), got in zip(requests, records[0]["logprobs"]):
            logp = torch.log_softmax(model.logits(torch.tensor([inp]))[0], dim=-1)
            n = len(inp)
            assert got == pytest.approx(sum(float(logp[n - len(choice) + j, t]) for j, t in enumerate(choice)), abs=1e-4)


@pytest.mark.parametrize("header, rows, message", [
    (",Question,A,B,C,Answer\n", [ROW], "no column D"),
    (HEADER, [{**ROW, "Answer": "E"}], "anatomy.csv:2: Answer 'E' is not one of A, B, C, D"),
    (HEADER, [], "anatomy.csv: no questions"),
])
def test_bad_cmmlu_files_are_refused_naming_file_and_row(tmp_path, header, rows, message):
    write_csv(tmp_path / "test" / "anatomy.csv", rows, header=header)
    with pytest.raises(Refusal, match=message):
        cmmlu.read_subjects(tmp_path, 0)


def test_missing_dev_file_unknown_subject_and_bom_header(tmp_path):
    write_csv(tmp_path / "test" / "anatomy.csv", [ROW], header="\ufeff" + HEADER)
    assert cmmlu.read_subjects(tmp_path, 0)["anatomy"][0][0]["Answer"] == "A"  # a BOM is not a column name
    with pytest.raises(Refusal, match=r"dev/anatomy.csv: no such file; --shots 5"):
        cmmlu.read_subjects(tmp_path, 5)
    write_csv(tmp_path / "test" / "poetry.csv", [ROW])
    with pytest.raises(Refusal, match="subject 'poetry' has no description"):
        cmmlu.read_subjects(tmp_path, 0)
