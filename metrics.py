"""Scores for generated answers: how close each answer comes to its reference, how varied the
answers are, and how sure we can be of the difference between two systems.

Every metric here sees the same tokens: sacreBLEU's "zh" tokenization, under which each
Chinese character (and each Chinese punctuation mark) is one token and other text is split
like English (mteval's 13a rules, so "COVID-19" and "3.5mg" stay whole). Chinese has no
spaces, so "characters" is the usual unit for Chinese QA scores. All scores are on 0-100.

  BLEU-n     corpus BLEU with n-grams up to n (Papineni et al. 2002), computed by sacreBLEU
             (Post 2018), the tool whose settings travel with the score as a signature such as
             nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0, so that scores from
             different papers can be compared. Clipped n-gram matches and n-gram counts are
             summed over the whole set before the precisions are combined, and the brevity
             penalty punishes answers that are shorter than the references in total. BLEU-4
             is the headline.
  ROUGE-n    F1 of the n-grams an answer shares with its reference (Lin 2004), averaged over
             questions; ROUGE-1 and ROUGE-2 here.
  ROUGE-L    F1 built from the longest common subsequence (LCS) of answer and reference:
             the longest run of tokens both contain in the same order, gaps allowed.
  Distinct-n the share of distinct n-grams among all n-grams of all answers (Li et al. 2016):
             a model that says the same thing to everyone scores near 0.
  length     the mean of len(answer) / len(reference), in tokens: BLEU's brevity penalty
             and ROUGE's recall both depend on it, so it explains many score changes.
  repeat     repeat_rate: the share of answers (0-1) in which some run of 10 characters occurs
             twice, the mark of a decoder caught in a loop ("你的描述，你的描述，…"); looping
             answers grow long, which lifts BLEU through its brevity penalty alone.

Bits per character (bpc) is the model's loss over a text in bits, divided by the text's
characters: nats per token / ln 2 x tokens / characters. Loss per token and perplexity
depend on the vocabulary (a 4096-piece token holds fewer characters than a 64793-id one), so
they cannot compare models with different tokenizers; bits per character can, over the same
text. val_bpc is it over the pretraining validation text, answer_bpc over the reference
answers under teacher forcing.

Noise. A set of a few hundred answers is a sample; another sample would score differently.
The bootstrap (Efron 1979; Koehn 2004 for MT) estimates how much: draw as many questions
as the set has, with replacement, score the draw, repeat ~1000 times; the middle 95% of
those scores is the confidence interval. For BLEU the draw sums each question's n-gram
counts (its sufficient statistics), so one resample costs a sum, not a re-tokenization. The
paired bootstrap compares two systems on the same draws of questions, which cancels the
variation that comes from which questions were drawn (both systems find some harder).

ROUGE is computed here rather than by the `rouge-score` package: that package's tokenizer
drops every Chinese character unless replaced, and its LCS fills the len(a) x len(b) table
in pure Python, many times slower than lcs_length below (README: "Evaluation and chat"); with
the model and two baselines to score, that would be a noticeable share of an eval's time.
"""
import math

import numpy as np
from sacrebleu.metrics import BLEU

MAX_ORDER = 4  # BLEU-1 .. BLEU-4
REPEAT_SPAN = 10  # characters: a run this long met twice in one answer marks a loop
BOOTSTRAP_SAMPLES = 1000
SACREBLEU = BLEU(tokenize="zh")  # sacreBLEU's defaults otherwise: exp smoothing, mixed case


def char_tokens(text):
    """Tokens of a text as sacreBLEU's zh tokenizer cuts them for BLEU (see the module
    docstring). The tokenizer caches its results, so each text is cut once for all metrics."""
    return SACREBLEU.tokenizer(text.rstrip()).split()


def ngrams(tokens, n):
    """All n-grams of a token list, with repeats, as tuples."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# -----------------------------------------------------------------------------
# BLEU through sacreBLEU, from per-question sufficient statistics

def bleu_stats(hypotheses, references):
    """(n_questions, 2 + 2 * MAX_ORDER) array: per question the hypothesis length, the
    reference length, the clipped n-gram matches for n = 1..4 and the n-gram counts for
    n = 1..4. Summing rows over any set of questions gives that set's corpus statistics."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses ({len(hypotheses)}) as references ({len(references)}), at least one")
    rows = []
    for hyp, ref in zip(hypotheses, references):
        s = SACREBLEU.corpus_score([hyp], [[ref]])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.array(rows, dtype=np.int64)


def bleu_from_stats(summed, order=MAX_ORDER):
    """Corpus BLEU-`order` (0-100) from summed statistics, with sacreBLEU's own formula and
    its default smoothing (an n-gram order with no match counts as a small, halving precision)."""
    correct, total = summed[2:2 + MAX_ORDER], summed[2 + MAX_ORDER:]
    return BLEU.compute_bleu([int(c) for c in correct[:order]], [int(t) for t in total[:order]],
                             int(summed[0]), int(summed[1]), smooth_method=SACREBLEU.smooth_method,
                             max_ngram_order=order).score


def sacrebleu_signature():
    """The settings string that makes a sacreBLEU score reproducible; report it with the score."""
    return str(SACREBLEU.get_signature())


# -----------------------------------------------------------------------------
# ROUGE over characters

def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, in O(len(b)) operations on
    len(a)-bit integers (the bit-parallel algorithm of Allison & Dix 1986, in Hyyro's 2004 form).

    The textbook method fills a table L[i][j] = LCS(a[:i], b[:j]) cell by cell. Down a column
    of that table the values grow by 0 or 1 per row, so a column is a bit vector. Here `v` keeps
    those steps inverted (bit i is 0 where L grows at row i + 1) and moves one column per token
    of b: `u` marks the unused positions of a that match the token, and the addition's carry
    moves each such mark to the first match in its stretch of positions. The LCS length is the
    number of 0 bits at the end. tests/test_metrics.py checks it against the table."""
    match = {}  # token -> bit mask of its positions in a
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def f1(overlap, hyp_count, ref_count):
    """Harmonic mean of precision overlap/hyp_count and recall overlap/ref_count (0 if no overlap)."""
    return 0.0 if overlap == 0 else 2 * overlap / (hyp_count + ref_count)


def rouge_n(hyp, ref, n):
    """ROUGE-n F1 of one token list against one reference: n-gram matches, each counted at
    most as often as it occurs in the reference."""
    hyp_grams, ref_grams = ngrams(hyp, n), ngrams(ref, n)
    ref_counts = {}
    for g in ref_grams:
        ref_counts[g] = ref_counts.get(g, 0) + 1
    overlap = 0
    for g in hyp_grams:
        if ref_counts.get(g, 0) > 0:
            ref_counts[g] -= 1
            overlap += 1
    return f1(overlap, len(hyp_grams), len(ref_grams))


def rouge_scores(hypotheses, references):
    """Per question ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-100): a (n_questions, 3) array."""
    rows = []
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = char_tokens(hyp), char_tokens(ref)
        rows.append([rouge_n(hyp, ref, 1), rouge_n(hyp, ref, 2), f1(lcs_length(hyp, ref), len(hyp), len(ref))])
    return 100 * np.array(rows, dtype=np.float64)


# -----------------------------------------------------------------------------
# variety and length

def distinct_n(hypotheses, n):
    """Distinct-n (0-100): distinct n-grams / all n-grams, over all answers together."""
    grams = [g for hyp in hypotheses for g in ngrams(char_tokens(hyp), n)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def length_ratio(hypotheses, references):
    """Mean over questions of answer tokens / reference tokens."""
    return float(np.mean([len(char_tokens(h)) / max(len(char_tokens(r)), 1) for h, r in zip(hypotheses, references)]))


def repeats_itself(text, span=REPEAT_SPAN):
    """Whether some run of `span` characters occurs at least twice in text (overlaps count)."""
    seen = set()
    for i in range(len(text) - span + 1):
        run = text[i:i + span]
        if run in seen:
            return True
        seen.add(run)
    return False


def repeat_rate(hypotheses, span=REPEAT_SPAN):
    """The share of answers (0-1) that repeat some run of `span` characters."""
    return sum(map(repeats_itself, hypotheses, [span] * len(hypotheses))) / len(hypotheses) if hypotheses else 0.0


def bits_per_char(nats_per_token, n_tokens, n_chars):
    """A loss of nats_per_token over a text of n_tokens tokens and n_chars characters, in bits
    per character: the total loss in bits shared out over the characters."""
    if n_tokens < 1 or n_chars < 1:
        raise ValueError(f"bits per character needs a non-empty text: {n_tokens} tokens, {n_chars} characters")
    return nats_per_token / math.log(2) * n_tokens / n_chars


# -----------------------------------------------------------------------------
# the bootstrap

def resample_indices(n, samples, seed):
    """`samples` draws of n question indices with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bleu_of_draws(stats, draws):
    """Corpus BLEU-4 of every draw: each draw's rows summed, then scored."""
    return np.array([bleu_from_stats(s) for s in stats[draws].sum(axis=1)])


def interval(values):
    """The middle 95% of bootstrap values (the percentile interval), as [low, high]."""
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def confidence_intervals(stats, rouge_l, samples=BOOTSTRAP_SAMPLES, seed=0):
    """95% bootstrap intervals of corpus BLEU-4 and mean ROUGE-L, over the same draws."""
    draws = resample_indices(len(stats), samples, seed)
    return {"bleu4": interval(bleu_of_draws(stats, draws)), "rougeL": interval(rouge_l[draws].mean(axis=1))}


def difference(a_score, b_score, a_draws, b_draws):
    """A - B on the whole set, its 95% interval over the draws, and a two-sided p-value: how
    often a draw's difference strays from the observed one by at least the observed amount,
    i.e. how often chance alone would give a difference this large if the true one were 0
    (Berg-Kirkpatrick et al. 2012; sacreBLEU's paired bootstrap counts the same way)."""
    delta, deltas = a_score - b_score, a_draws - b_draws
    p = (1 + np.sum(np.abs(deltas - delta) >= abs(delta))) / (len(deltas) + 1)
    return {"a": float(a_score), "b": float(b_score), "delta": float(delta), "ci95": interval(deltas), "p": float(p)}


def paired_bootstrap(a, b, samples=BOOTSTRAP_SAMPLES, seed=0):
    """Paired bootstrap of system A against system B on the same questions: both are scored
    on the same draws. a and b are score()'s per-question data. -> {"bleu4": ..., "rougeL": ...},
    each as difference() gives it."""
    if len(a["rougeL"]) != len(b["rougeL"]):
        raise ValueError(f"paired bootstrap needs the same questions: {len(a['rougeL'])} vs {len(b['rougeL'])}")
    draws = resample_indices(len(a["rougeL"]), samples, seed)
    bleu_a, bleu_b = (bleu_from_stats(s["bleu_stats"].sum(axis=0)) for s in (a, b))
    return {"bleu4": difference(bleu_a, bleu_b, bleu_of_draws(a["bleu_stats"], draws),
                                bleu_of_draws(b["bleu_stats"], draws)),
            "rougeL": difference(a["rougeL"].mean(), b["rougeL"].mean(),
                                 a["rougeL"][draws].mean(axis=1), b["rougeL"][draws].mean(axis=1))}


# -----------------------------------------------------------------------------
# everything at once

def score(hypotheses, references, samples=BOOTSTRAP_SAMPLES, seed=0):
    """All scores of answers against references -> (scores dict, per-question data for a
    paired comparison). samples=0 skips the confidence intervals."""
    stats = bleu_stats(hypotheses, references)
    rouge = rouge_scores(hypotheses, references)
    summed = stats.sum(axis=0)
    scores = {**{f"bleu{n}": bleu_from_stats(summed, n) for n in range(1, MAX_ORDER + 1)},
              "rouge1": float(rouge[:, 0].mean()), "rouge2": float(rouge[:, 1].mean()),
              "rougeL": float(rouge[:, 2].mean()),
              "distinct1": distinct_n(hypotheses, 1), "distinct2": distinct_n(hypotheses, 2),
              "length_ratio": length_ratio(hypotheses, references), "repeat_rate": repeat_rate(hypotheses)}
    if samples:
        ci = confidence_intervals(stats, rouge[:, 2], samples, seed)
        scores.update(bleu4_ci95=ci["bleu4"], rougeL_ci95=ci["rougeL"])
    return scores, {"bleu_stats": stats, "rougeL": rouge[:, 2]}
