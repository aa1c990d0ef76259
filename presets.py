"""Public corpora by name: `--preset NAME` downloads a Hugging Face Hub dataset into --raw-dir
and hands its files to data_process.py as if they had been named with --input.

PRESETS lists, per command (pretrain, sft, eval, prefs), each preset's Hub dataset, the files taken
from it and, for pretraining, the record field that holds a document's text. Without network
the download fails with the `hf download` command that fetches the same files elsewhere.
"""
from pathlib import Path

from corpus import DataError, expand_inputs, known_format

PRESETS = {  # name -> Hub dataset repo, the files to take, how to read them
    "pretrain": {
        "wikipedia-cn": dict(repo="pleisto/wikipedia-cn-20230720-filtered", files=["*.json"], text_field="completion"),
        "medical": dict(repo="shibing624/medical", files=["pretrain/*"], text_field="text"),
    },
    "sft": {
        "alpaca-zh": dict(repo="shibing624/alpaca-zh", files=["*.json"]),
        "belle-0.5m": dict(repo="BelleGroup/train_0.5M_CN", files=["*.json"]),
        "medical": dict(repo="shibing624/medical", files=["finetune/train_zh*", "finetune/valid_zh*"]),
    },
    "eval": {
        "medical": dict(repo="shibing624/medical", files=["finetune/test_zh*"]),
    },
    "prefs": {
        "medical": dict(repo="shibing624/medical", files=["reward/train.json", "reward/valid.json"]),
    },
}


def resolve_inputs(inputs, presets, raw_dir, kind):
    """The files of the --input specs, then those the --preset names download."""
    files = expand_inputs(inputs)
    for name in presets:
        files += download_preset(kind, name, Path(raw_dir))
    if not files:
        raise DataError("no input: pass --input PATH_OR_GLOB... or --preset NAME")
    return files


def preset_text_field(presets):
    """The text field of the first pretraining preset named that has one, else None."""
    return next((PRESETS["pretrain"][p].get("text_field") for p in presets), None)


def download_preset(kind, name, raw_dir):
    if name not in PRESETS[kind]:
        raise DataError(f"unknown {kind} preset {name!r} (known: {', '.join(PRESETS[kind])})")
    preset = PRESETS[kind][name]
    local_dir = raw_dir / preset["repo"].replace("/", "__")
    print(f"preset {name}: downloading {preset['files']} of the Hub dataset {preset['repo']} into {local_dir}")
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id=preset["repo"], repo_type="dataset", allow_patterns=preset["files"],
                          local_dir=local_dir)  # shows its own progress bars
    except Exception as e:  # offline, no access, missing package: all end the same way
        raise DataError(
            f"preset {name}: downloading the Hub dataset {preset['repo']} failed ({type(e).__name__}: {e}).\n"
            f"Without network, fetch its files {preset['files']} elsewhere, e.g.\n"
            f"  hf download {preset['repo']} --repo-type dataset "
            + " ".join(f"--include '{p}'" for p in preset["files"]) +
            f" --local-dir {local_dir}\nthen pass them with --input.") from None
    files = sorted(p for pattern in preset["files"] for p in local_dir.glob(pattern) if p.is_file() and known_format(p))
    if not files:
        raise DataError(f"preset {name}: no input files matching {preset['files']} in {local_dir}")
    return files
