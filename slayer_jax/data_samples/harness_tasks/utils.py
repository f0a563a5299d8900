"""Local datasets for the slayer_* lm-eval tasks: JSONL files next to this file, no network."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def _dataset(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mcq(**kwargs):
    return _dataset("mcq.jsonl")


def load_texts(**kwargs):
    return _dataset("texts.jsonl")


def load_gen(**kwargs):
    return _dataset("gen.jsonl")
