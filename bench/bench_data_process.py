"""Benchmark `data_process.py pretrain`: tokens/s and peak memory, beside (in the same run)
  (a) the naive baseline: one process, one document at a time, every id kept in one Python
      list, one array at the end (upstream's method), and
  (b) the machine's limit: single-thread sentencepiece encode speed x cores.
Peak memory is also measured on the corpus repeated 4x, which must not need more of it.

  python bench/bench_data_process.py ../shared/data/pretrain/*.jsonl [--tokenizer PATH] [--repeat N]

Targets: >= 1.8x the naive baseline, >= 80% of (b), peak RSS at 4x <= 1.2x that at 1x and < 1 GB.
"""
import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
from chatglm_tokenizer import load_tokenizer  # noqa: E402
from corpus import iter_records, stop_at_bad  # noqa: E402

TOKENIZER = ROOT / "../shared/data/tokenizer/chatglm2/tokenizer.model"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # taskset counts


def naive(files, tokenizer_path, out):
    """Upstream's method, run as a child process by the benchmark."""
    t0 = time.time()
    tokenizer = load_tokenizer(tokenizer_path)
    all_ids = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                ids = tokenizer.encode(json.loads(line)["text"])
                if len(ids) > 5:
                    all_ids += ids + [tokenizer.eos_id]
    np.array(all_ids, dtype=np.uint16).tofile(out)
    print(json.dumps({"tokens": len(all_ids), "seconds": time.time() - t0}))


def process_tree_memory(pid):
    """(sum of RSS, sum of PSS) in bytes over pid and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(children)
        frontier = children
    rss = pss = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.endswith("kB\n")}
            rss, pss = rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
        except (OSError, ValueError):
            pass
    return rss, pss


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, workers included
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd):
    """Run cmd; return (wall seconds, peak tree RSS, peak tree PSS, stdout, CPU seconds of the tree)."""
    t0, cpu0 = time.time(), children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    peak = [0, 0]

    def poll():
        while proc.poll() is None:
            rss, pss = process_tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)
    poller = threading.Thread(target=poll)
    poller.start()
    out = proc.communicate()[0]
    seconds = time.time() - t0
    poller.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed with exit code {proc.returncode}")
    return seconds, peak[0], peak[1], out, children_cpu() - cpu0


def corpus_texts(files):
    """The documents' texts, all in memory: what the bare encoders are timed on."""
    return [record["text"] for path in files for _, record in iter_records(path, stop_at_bad)]


def encode_limit(files, tokenizer_path):
    """Single-thread encode speed on texts already in memory (nothing else counted), as
    (plain encode() one text at a time, the faster of that and batched numpy encoding,
    the latter per CPU-second)."""
    tokenizer = load_tokenizer(tokenizer_path)
    texts = corpus_texts(files)
    speeds, cpu_speeds = [], []
    for encode in (lambda: sum(len(tokenizer.sp.encode(t)) for t in texts),
                   lambda: sum(map(len, tokenizer.encode_batch_numpy(texts, num_threads=1)))):
        t0, cpu0 = time.time(), time.process_time()
        tokens = encode()
        speeds.append(tokens / (time.time() - t0))
        cpu_speeds.append(tokens / (time.process_time() - cpu0))
    return speeds[0], max(speeds), max(cpu_speeds)


_bare = {}  # what forked encoder processes inherit: the tokenizer and the texts


def _encode_share(k):
    texts = _bare["texts"][k::CORES]
    return sum(map(len, _bare["tokenizer"].encode_batch_numpy(texts, num_threads=1)))


def parallel_bare_encode(files, tokenizer_path):
    """Bare encoding on all cores at once (texts already in memory in each process): what the
    cores deliver right now, when other work shares the machine."""
    _bare.update(tokenizer=load_tokenizer(tokenizer_path), texts=corpus_texts(files))
    with ProcessPoolExecutor(CORES, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(abs, range(CORES)))  # workers started before the clock
        t0 = time.time()
        tokens = sum(pool.map(_encode_share, range(CORES)))
        seconds = time.time() - t0
    _bare.clear()
    return tokens / seconds


def ours(files, tokenizer_path, out, workers):
    cmd = [sys.executable, "data_process.py", "pretrain", "--input", *map(str, files), "--out", str(out),
           "--tokenizer", str(tokenizer_path), "--force", "--workers", str(workers)]
    wall, rss, pss, _, cpu = run_measured(cmd)
    metas = [json.loads(Path(f"{out}{s}.json").read_text()) for s in ("", "_val") if Path(f"{out}{s}.json").exists()]
    return sum(m["n_tokens"] for m in metas), metas[0]["summary"]["seconds"], wall, rss, pss, cpu


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("corpus", nargs="+", help="JSONL files with a 'text' field")
    parser.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer model")
    parser.add_argument("--workers", type=int, default=CORES, help="data_process.py --workers")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of (b), (a) and the 1x run; the best of each counts")
    parser.add_argument("--naive-child", default=None, help=argparse.SUPPRESS)  # internal: run the baseline
    return parser


def measure_round(round_, files, tokenizer_path, tmp, workers, best):
    """One round of (b), (b'), (a) and data_process on the corpus; keeps the best speeds in
    `best`; returns the naive run's peak RSS and ours (RSS, PSS)."""
    plain, single, single_cpu = encode_limit(files, tokenizer_path)
    limit = single * CORES
    print(f"[{round_}] (b) limit: single-thread encode {single:,.0f} tokens/s x {CORES} cores = {limit:,.0f} tokens/s "
          f"({single_cpu:,.0f} tokens per CPU-second; plain encode() one text at a time: {plain:,.0f} tokens/s)")
    parallel = parallel_bare_encode(files, tokenizer_path)
    print(f"[{round_}] (b') bare encode on {CORES} processes at once: {parallel:,.0f} tokens/s")

    wall, naive_rss, _, out, _ = run_measured([sys.executable, __file__, *map(str, files), "--tokenizer",
                                               str(tokenizer_path), "--naive-child", str(tmp / "naive.bin")])
    naive_tokens, seconds = json.loads(out)["tokens"], json.loads(out)["seconds"]
    print(f"[{round_}] (a) naive: {naive_tokens:,} tokens in {seconds:.1f}s = {naive_tokens / seconds:,.0f} tokens/s "
          f"({naive_tokens / wall:,.0f} with interpreter start), peak RSS {naive_rss / 2**20:,.0f} MiB")

    tokens, seconds1, wall, rss1, pss1, _ = ours(files, tokenizer_path, tmp / "x1", workers)
    print(f"[{round_}] data_process 1x: {tokens:,} tokens in {seconds1:.1f}s = {tokens / seconds1:,.0f} tokens/s "
          f"({tokens / wall:,.0f} with interpreter start), peak RSS {rss1 / 2**20:,.0f} MiB "
          f"(PSS {pss1 / 2**20:,.0f} MiB, all processes)")
    for key, value in (("limit", limit), ("plain_limit", plain * CORES), ("parallel", parallel),
                       ("naive", naive_tokens / seconds), ("ours", tokens / seconds1), ("single_cpu", single_cpu)):
        best[key] = max(best[key], value)
    return naive_rss, rss1, pss1


def measure_4x(files, tokenizer_path, tmp, workers, best):
    """data_process on the corpus repeated 4x (symlinks): (peak RSS, peak PSS, CPU efficiency)."""
    copies = tmp / "x4_inputs"
    copies.mkdir()
    for k in range(4):
        for f in files:
            (copies / f"{k}_{f.name}").symlink_to(f)
    tokens4, seconds4, _, rss4, pss4, cpu4 = ours(sorted(copies.iterdir()), tokenizer_path, tmp / "x4", workers)
    print(f"data_process 4x: {tokens4:,} tokens in {seconds4:.1f}s = {tokens4 / seconds4:,.0f} tokens/s, "
          f"peak RSS {rss4 / 2**20:,.0f} MiB (PSS {pss4 / 2**20:,.0f} MiB)")
    # CPU per token (all processes, interpreter start included) vs the bare encoder: the share
    # of the limit reachable on otherwise idle cores, whatever else runs on the machine now
    efficiency = tokens4 / cpu4 / best["single_cpu"]
    print(f"CPU efficiency 4x: {tokens4 / cpu4:,.0f} tokens per CPU-second = {efficiency:.2f} of the bare encoder")
    return rss4, pss4, efficiency


def print_checks(best, rss1, rss4):
    tps, naive_tps, limit = best["ours"], best["naive"], best["limit"]
    checks = [("throughput vs naive", tps / naive_tps, ">= 1.8x", tps / naive_tps >= 1.8),
              ("throughput vs limit", tps / limit, ">= 0.80", tps / limit >= 0.8),
              ("peak RSS 4x / 1x", rss4 / rss1, "<= 1.2", rss4 <= 1.2 * rss1),
              ("peak RSS 4x (GiB)", rss4 / 2**30, "< 1 GB", rss4 < 1e9)]
    for name, value, target, ok in checks:
        print(f"  {name:22s} {value:6.2f}  target {target:8s} {'PASS' if ok else 'MISS'}")
    print(f"  (throughput vs the limit by plain encode(): {tps / best['plain_limit']:.2f}; vs bare encoding on all "
          f"{CORES} cores at the same time: {tps / best['parallel']:.2f})")


def main():
    cfg = build_parser().parse_args()
    files = [Path(f).resolve() for f in cfg.corpus]
    tokenizer_path = Path(cfg.tokenizer).resolve()
    if cfg.naive_child:
        return naive(files, tokenizer_path, cfg.naive_child)

    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} files, {size / 1e6:.1f} MB; {CORES} cores; tokenizer {tokenizer_path.name}")
    best = {"limit": 0, "plain_limit": 0, "parallel": 0, "naive": 0, "ours": 0, "single_cpu": 0}  # best of --repeat rounds, alike for all
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(cfg.repeat):
            naive_rss, rss1, pss1 = measure_round(round_, files, tokenizer_path, Path(tmp), cfg.workers, best)
        rss4, pss4, efficiency = measure_4x(files, tokenizer_path, Path(tmp), cfg.workers, best)
    print_checks(best, rss1, rss4)
    print(json.dumps(dict(naive_tokens_per_s=round(best["naive"]), limit_tokens_per_s=round(best["limit"]),
                          tokens_per_s=round(best["ours"]), parallel_bare_tokens_per_s=round(best["parallel"]),
                          cpu_efficiency_4x=round(efficiency, 3),
                          naive_peak_rss=naive_rss, peak_rss_1x=rss1, peak_rss_4x=rss4, peak_pss_1x=pss1, peak_pss_4x=pss4)))


if __name__ == "__main__":
    main()
