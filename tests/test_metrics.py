"""metrics.py against values worked out by hand, sacreBLEU's own corpus score, and the
textbook LCS table; the bootstrap's determinism and its paired comparison."""
import math
import random

import numpy as np
import pytest
import sacrebleu

import metrics

# Two pairs worked by hand. sacreBLEU's zh tokens: every Chinese character is one token, "ok"
# is one token, the space is none:
#   hyp 感冒感冒了 (5) vs ref 感冒了要休息 (6): clipped matches 1-4 grams 3/5, 2/4, 1/3, 0/2
#   hyp 多喝水 ok  (4) vs ref 多喝水ok吧   (5): 4/4, 3/3, 2/2, 1/1
# corpus precisions 7/9, 5/7, 3/5, 1/3, lengths c=9, r=11, brevity penalty exp(1 - 11/9):
#   BLEU-4 = exp(-2/9) * (7/9 * 5/7 * 3/5 * 1/3)^(1/4) = exp(-2/9) / sqrt(3)
#   BLEU-1 = exp(-2/9) * 7/9;  BLEU-2 = exp(-2/9) * (7/9 * 5/7)^(1/2)
HYPS = ["感冒感冒了", "多喝水 ok"]
REFS = ["感冒了要休息", "多喝水ok吧"]
BP = math.exp(-2 / 9)
BLEU = {1: 100 * BP * 7 / 9, 2: 100 * BP * math.sqrt(5 / 9), 4: 100 * BP / math.sqrt(3)}
# ROUGE, F1 = 2 * overlap / (hyp count + ref count):
#   pair 1: unigrams 3 of 5 and 6 -> 6/11; bigrams 感冒, 冒了 of 4 and 5 -> 4/9; LCS 感冒了 = 3 -> 6/11
#   pair 2: unigrams 4 of 4 and 5 -> 8/9;  bigrams 3 of 3 and 4 -> 6/7;        LCS 4 -> 8/9
ROUGE = {"rouge1": 100 * (6 / 11 + 8 / 9) / 2, "rouge2": 100 * (4 / 9 + 6 / 7) / 2, "rougeL": 100 * (6 / 11 + 8 / 9) / 2}
# Distinct over both answers: unigrams 感 冒 感 冒 了 多 喝 水 ok: 7 distinct of 9;
# bigrams 感冒 冒感 感冒 冒了 多喝 喝水 水ok: 6 distinct of 7. Length ratio (5/6 + 4/5) / 2.
OTHER = {"distinct1": 100 * 7 / 9, "distinct2": 100 * 6 / 7, "length_ratio": (5 / 6 + 4 / 5) / 2}


def test_char_tokens_are_sacrebleu_zh_tokens():
    assert metrics.char_tokens("多喝水 ok，3.5mg") == ["多", "喝", "水", "ok", "，", "3.5mg"]
    assert metrics.char_tokens("COVID-19疫苗") == ["COVID-19", "疫", "苗"]


def test_every_metric_equals_its_hand_computed_value():
    scores, _ = metrics.score(HYPS, REFS, samples=0)
    for n, value in BLEU.items():
        assert scores[f"bleu{n}"] == pytest.approx(value, rel=1e-12)
    for key, value in {**ROUGE, **OTHER}.items():
        assert scores[key] == pytest.approx(value, rel=1e-12), key
    assert "bleu4_ci95" not in scores


def test_bleu_from_summed_statistics_equals_sacrebleu_corpus_score():
    rng = random.Random(0)
    chars = "感冒发热头痛要多喝水休息吃药了吗ok"
    hyps = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 30))) for _ in range(40)]
    refs = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 30))) for _ in range(40)]
    summed = metrics.bleu_stats(hyps, refs).sum(axis=0)
    for order in (1, 2, 3, 4):
        direct = sacrebleu.BLEU(tokenize="zh", max_ngram_order=order).corpus_score(hyps, [refs]).score
        assert metrics.bleu_from_stats(summed, order) == pytest.approx(direct, rel=1e-12)
    assert metrics.sacrebleu_signature() == f"nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:{sacrebleu.__version__}"


def test_bleu_smooths_an_order_without_matches_as_sacrebleu_does():
    # 感冒了多喝水 vs 感冒了要喝水 (6 tokens each, brevity penalty 1): matches 5/6, 3/5, 1/4, 0/3;
    # sacreBLEU's default "exp" smoothing scores the empty 4-gram order 1 / (2 * 3)
    summed = metrics.bleu_stats(["感冒了多喝水"], ["感冒了要喝水"]).sum(axis=0)
    assert metrics.bleu_from_stats(summed) == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, rel=1e-12)


def lcs_table(a, b):
    """The textbook dynamic program: L[i][j] = LCS of a[:i] and b[:j]."""
    L = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            L[i][j] = L[i - 1][j - 1] + 1 if x == y else max(L[i - 1][j], L[i][j - 1])
    return L[-1][-1]


def test_lcs_length_by_hand_and_against_the_table():
    assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA (Cormen et al.'s example)
    assert metrics.lcs_length(list("感冒感冒了"), list("感冒了要休息")) == 3
    assert metrics.lcs_length([], list("abc")) == metrics.lcs_length(list("abc"), []) == 0
    rng = random.Random(1)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        assert metrics.lcs_length(a, b) == lcs_table(a, b)


def test_rouge_l_differs_from_rouge_1_when_order_matters():
    # 水喝多 vs 多喝水: every unigram matches (ROUGE-1 = 100) but the longest in-order run is 1
    scores = metrics.rouge_scores(["水喝多"], ["多喝水"])[0]
    assert scores[0] == pytest.approx(100) and scores[1] == 0 and scores[2] == pytest.approx(100 / 3)


def test_bootstrap_is_deterministic_under_a_seed_and_brackets_the_score():
    rng = random.Random(2)
    refs = ["".join(rng.choice("感冒发热头痛要多喝水休息") for _ in range(20)) for _ in range(60)]
    hyps = [r[:10] + "".join(rng.choice("感冒发热头痛要多喝水休息") for _ in range(10)) for r in refs]
    first, _ = metrics.score(hyps, refs, samples=200, seed=7)
    again, _ = metrics.score(hyps, refs, samples=200, seed=7)
    other, _ = metrics.score(hyps, refs, samples=200, seed=8)
    assert first["bleu4_ci95"] == again["bleu4_ci95"] and first["rougeL_ci95"] == again["rougeL_ci95"]
    assert first["bleu4_ci95"] != other["bleu4_ci95"]
    for key in ("bleu4", "rougeL"):
        low, high = first[f"{key}_ci95"]
        assert low < first[key] < high


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = random.Random(3)
    refs = ["".join(rng.choice("感冒发热头痛要多喝水休息") for _ in range(20)) for _ in range(80)]
    good = [r[:rng.randint(8, 16)] + "吃药" for r in refs]  # shares much more with each reference
    bad = [r[:rng.randint(2, 6)] + "吃药吃药吃药" for r in refs]
    _, a = metrics.score(good, refs, samples=0)
    _, b = metrics.score(bad, refs, samples=0)
    result = metrics.paired_bootstrap(a, b, samples=300, seed=0)
    for key in ("bleu4", "rougeL"):
        r = result[key]
        assert r["delta"] == pytest.approx(r["a"] - r["b"]) and r["delta"] > 0
        assert 0 < r["ci95"][0] < r["delta"] < r["ci95"][1]
        assert r["p"] == pytest.approx(1 / 301)  # no draw strays as far as the whole difference
    same = metrics.paired_bootstrap(a, a, samples=300, seed=0)
    assert same["bleu4"]["delta"] == 0 and same["bleu4"]["p"] == 1.0
    assert metrics.paired_bootstrap(a, b, samples=300, seed=0) == result
    with pytest.raises(ValueError, match="same questions"):
        metrics.paired_bootstrap(a, {"bleu_stats": b["bleu_stats"][:5], "rougeL": b["rougeL"][:5]})


def test_distinct_is_low_for_one_answer_given_to_everyone():
    assert metrics.distinct_n(["多喝水"] * 10, 1) == pytest.approx(100 * 3 / 30)
    assert metrics.distinct_n([""], 2) == 0.0
    assert np.isfinite(metrics.length_ratio(["多喝水"], ["多"]))


def test_repeat_rate_counts_answers_that_loop():
    looping = "你好，根据你的描述，你的描述，你的描述，"  # "你的描述，你的描述" holds the 10-char run twice
    assert metrics.repeats_itself(looping)
    assert not metrics.repeats_itself("建议您到医院做个心电图检查，明确诊断后再用药。")
    assert not metrics.repeats_itself("一二三四五六七八九十" * 1 + "一二三四五六七八九")  # 9 of 10 again: no
    assert metrics.repeats_itself("一二三四五六七八九十" * 2)
    assert metrics.repeat_rate([looping, "不会重复的一句话", "也不重复", "好好好好好好好好好好好"]) == 0.5
    assert metrics.score([looping], ["参考"], samples=0)[0]["repeat_rate"] == 1.0


def test_bits_per_char_by_hand():
    # 2 tokens of loss ln 4 nats each = 2 bits each, 4 bits over 8 characters: 0.5 bit per character
    assert metrics.bits_per_char(math.log(4), 2, 8) == pytest.approx(0.5)
    # the same text under a finer vocabulary: 4 tokens at half the loss each, the same bpc
    assert metrics.bits_per_char(math.log(2), 4, 8) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.bits_per_char(1.0, 0, 8)
