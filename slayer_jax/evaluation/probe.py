"""The knowledge-injection probe: a seeded, offline task of fictional people, and its scoring.

The task (generator version :data:`GENERATOR_VERSION`):

- ``n`` fictional people whose first and last names are made of random syllables (so no
  pretraining text can hold them; every first and every last name is unique, so a question names
  exactly one person), each with 5 attributes drawn from closed sets: birth city, university,
  field of study, employer, hobby;
- for every person, 3 paraphrased biographies (one document each, on adjacent lines);
- the first ``n // 2`` people are the *training split*: for each of them 5 question-answer
  documents (``Question: Where was X born?\\nAnswer: Lisbon.``) join the training text;
- the other people are *held out*: the same 5 questions are asked about them, but only their
  biographies are in the training text (the mixed setting of knowledge-extraction studies:
  question-answer text about some entities teaches the model to answer from the biographies of
  the others).

Each question is a record ``{person, attribute, question, prompt, choices, answer_index, answer}``:
4 choices (the true value and 3 seeded distractors from the attribute's set, shuffled), so chance
is 0.25. :func:`write_task` writes ``train.jsonl`` (field ``text``: what ``data.source`` of
``slayer train`` reads), ``heldout.jsonl``, ``train_questions.jsonl``, ``people.json``,
``probe.json`` (the manifest: seed, counts, generator version, provenance) and ``README.md``.

Scoring (:func:`eval_probe`), through the project's one scorer and one generator:

- multiple choice: the ARC prompt of ``slayer eval``'s ``mcq`` task (``Question: ...\\nAnswer:`` +
  `` choice``, which is the record's ``prompt``), :func:`scoring.mcq_requests` ->
  :func:`loglik.score_requests` -> :func:`scoring.mcq_metrics` (``acc``: the argmax of the summed
  log-likelihoods);
- exact match: greedy decoding with :class:`slayer_jax.generate.Generator` from the prompt,
  stopped at a newline; the first line, stripped, with a final period removed, equals the answer
  ignoring case (:func:`normalize_answer`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slayer_jax import storage
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation.loglik import score_requests
from slayer_jax.evaluation.scoring import MCQ, read_jsonl, mcq_metrics, mcq_requests
from slayer_jax.generate import Generator

GENERATOR_VERSION = 1
MANIFEST = "probe.json"

CITIES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Krakow", "Lima", "Dublin", "Hanoi", "Seville",
          "Adelaide", "Tbilisi"]
UNIVERSITIES = ["Stanford University", "Oxford University", "Kyoto University", "McGill University",
                "Heidelberg University", "Cornell University", "Monash University", "Uppsala University",
                "Rice University", "Duke University", "Leiden University", "Tufts University"]
FIELDS = ["chemistry", "economics", "linguistics", "astronomy", "architecture", "philosophy", "geology",
          "statistics", "musicology", "botany", "nursing", "law"]
COMPANIES = ["Siemens", "Nestle", "Toyota", "Unilever", "Spotify", "Airbus", "Philips", "Heineken", "Nokia",
             "Ikea", "Lufthansa", "Canon"]
HOBBIES = ["chess", "sailing", "pottery", "birdwatching", "fencing", "knitting", "archery", "rock climbing",
           "origami", "beekeeping", "surfing", "calligraphy"]
ATTRIBUTES = {"city": CITIES, "university": UNIVERSITIES, "field": FIELDS, "company": COMPANIES, "hobby": HOBBIES}
QUESTIONS = {"city": "Where was {full} born?", "university": "Which university did {full} attend?",
             "field": "What did {full} study?", "company": "Which company does {full} work for?",
             "hobby": "What is {full}'s hobby?"}
BIOS = [
    "{full} was born in {city}. {first} studied {field} at {university}. Today {first} works for {company}. "
    "{first}'s favourite hobby is {hobby}.",
    "{full} works for {company}. Before joining {company}, {first} earned a degree in {field} from {university}. "
    "{first} grew up in {city}, where {first} was born, and spends weekends on {hobby}.",
    "Born in {city}, {full} is a graduate of {university}, where {first} majored in {field}. {first} enjoys "
    "{hobby} and is employed by {company}.",
]
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
          "v", "vr", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "k", "th", "nd", "x"]
CHOICES = 4
EM_NEW_TOKENS = 16  # greedy tokens for exact match: the longest answer ("Heidelberg University.") is ~5
RECORD_FIELDS = ("question", "prompt", "choices", "answer_index", "answer")


# ----------------------------------------------------------------------------- the generator
def _syllable(rng: np.random.Generator) -> str:
    return str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) + str(rng.choice(CODAS))


def make_people(n: int, seed: int) -> list[dict]:
    """``n`` people {first, last, full, city, university, field, company, hobby}; unique first and last names."""
    rng = np.random.default_rng(seed)
    seen, people = set(), []
    while len(people) < n:
        first = "".join(_syllable(rng) for _ in range(2)).capitalize()
        last = "".join(_syllable(rng) for _ in range(int(rng.integers(2, 4)))).capitalize()
        if first in seen or last in seen or len(first) > 9 or len(last) > 11:
            continue  # unique first and last names: a question names exactly one person
        seen.update((first, last))
        p = {"first": first, "last": last, "full": f"{first} {last}"}
        for k, values in ATTRIBUTES.items():
            p[k] = str(values[int(rng.integers(len(values)))])
        people.append(p)
    return people


def question_record(p: dict, attr: str, rng: np.random.Generator) -> dict:
    """One 4-way question about person ``p``'s attribute ``attr`` (distractors drawn with ``rng``)."""
    q = QUESTIONS[attr].format(**p)
    others = [v for v in ATTRIBUTES[attr] if v != p[attr]]
    choices = [p[attr]] + [str(v) for v in rng.choice(others, size=CHOICES - 1, replace=False)]
    order = rng.permutation(CHOICES)
    choices = [choices[i] for i in order]
    return {"person": p["full"], "attribute": attr, "question": q, "prompt": f"Question: {q}\nAnswer:",
            "choices": choices, "answer_index": int(np.flatnonzero(order == 0)[0]), "answer": p[attr]}


def qa_text(rec: dict) -> str:
    """A question-answer training document: ``Question: ...\\nAnswer: value.``"""
    return f"{rec['prompt']} {rec['answer']}."


def make_task(n_people: int, seed: int) -> dict:
    """The whole task in memory: people, train_docs, train_questions, heldout, seed, version.

    The same (n_people, seed) gives the same task on every machine (numpy's PCG64 streams)."""
    if isinstance(n_people, bool) or not isinstance(n_people, int) or n_people < 2:
        raise SlayerError(f"--people: {n_people!r}; expected an integer >= 2 (half train, half held out)")
    people = make_people(n_people, seed)
    rng = np.random.default_rng(seed + 1)
    n_train = n_people // 2
    train_docs = [t.format(**p) for p in people for t in BIOS]
    train_q, heldout = [], []
    for i, p in enumerate(people):
        for attr in QUESTIONS:
            rec = question_record(p, attr, rng)
            (train_q if i < n_train else heldout).append(rec)
    train_docs += [qa_text(r) for r in train_q]
    return {"people": people, "train_docs": train_docs, "train_questions": train_q, "heldout": heldout,
            "seed": seed, "n_train_people": n_train, "version": GENERATOR_VERSION}


def manifest(task: dict) -> dict:
    """probe.json: what the folder holds, how it was made, and how to use it."""
    n, n_train = len(task["people"]), task["n_train_people"]
    seed = task.get("seed")
    counts = {"people": n, "train_people": n_train, "heldout_people": n - n_train,
              "biographies": n * len(BIOS), "train_qa_documents": len(task["train_questions"]),
              "train_documents": len(task["train_docs"]), "train_questions": len(task["train_questions"]),
              "heldout_questions": len(task["heldout"]), "choices_per_question": CHOICES}
    return {
        "format": 1, "kind": "slayer_knowledge_probe", "generator": "slayer_jax.evaluation.probe.make_task",
        "generator_version": task.get("version", GENERATOR_VERSION), "seed": seed, "counts": counts,
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "command": f"slayer data probe --out DIR --people {n} --seed {seed}",
        "files": {
            "train.jsonl": "training text, one {\"text\"} a line: every person's biographies, then the "
                           "question-answer documents of the training split; pass this file (not the folder) "
                           "as data.source",
            "heldout.jsonl": "questions about the held-out people (only their biographies are in train.jsonl)",
            "train_questions.jsonl": "the same questions about the training split (their answers are in train.jsonl)",
            "people.json": "every person and attribute; the first train_people are the training split",
        },
        "provenance": ("Generated offline by slayer_jax (no dataset, web page or model output): names are random "
                       "syllables from a seeded numpy PCG64 stream, attributes come from closed lists written "
                       "for the project, biographies and questions from fixed templates. The manifest's "
                       "'command' regenerates it: the same seed and generator version give identical files."),
    }


def _readme(m: dict) -> str:
    c = m["counts"]
    files = "\n".join(f"- `{k}`: {v}" for k, v in m["files"].items())
    return (f"# Knowledge-injection probe (seed {m['seed']}, generator version {m['generator_version']})\n\n"
            f"{c['people']} fictional people ({c['train_people']} training split, {c['heldout_people']} held out), "
            f"{c['biographies']} biographies, {c['train_qa_documents']} question-answer documents; "
            f"{c['heldout_questions']} held-out and {c['train_questions']} training-split questions, "
            f"{c['choices_per_question']} choices each (chance {1 / c['choices_per_question']:.2f}).\n\n"
            f"{files}\n- `probe.json`: this manifest, machine-readable\n\n"
            f"Train: `slayer train --config CONFIG --config.data.source=DIR/train.jsonl`.\n"
            f"Score: `slayer eval MODEL --tasks probe --probe DIR`.\n\n{m['provenance']}\n\n"
            f"    {m['command']}\n")


def write_task(task: dict, out: str | Path, overwrite: bool = False) -> Path:
    """Write the task folder at ``out`` (local or gs://), whole or not at all; returns ``out``."""
    if storage.as_path(out).exists() and not overwrite:
        raise SlayerError(f"{out}: already exists; pass --overwrite to replace it")
    m = manifest(task)
    with tempfile.TemporaryDirectory(prefix="slayer_probe_") as tmp:
        d = Path(tmp)
        with open(d / "train.jsonl", "w", encoding="utf-8") as f:
            for t in task["train_docs"]:
                f.write(json.dumps({"text": t}) + "\n")
        for name in ("heldout", "train_questions"):
            with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for r in task[name]:
                    f.write(json.dumps(r) + "\n")
        (d / "people.json").write_text(json.dumps(task["people"], indent=1))
        (d / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
        (d / "README.md").write_text(_readme(m))
        storage.copy_tree(d, out)
    return Path(str(out))


# ----------------------------------------------------------------------------- reading a probe folder
def _check_record(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise SlayerError(f"{where}: expected a JSON object with fields {', '.join(RECORD_FIELDS)}")
    q, p, ch, a, ans = (row.get(k) for k in RECORD_FIELDS)
    for name, v in (("question", q), ("prompt", p), ("answer", ans)):
        if not isinstance(v, str) or not v.strip():
            raise SlayerError(f"{where}: field '{name}' is {v!r:.60}; expected a non-empty string")
    if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c.strip() for c in ch)):
        raise SlayerError(f"{where}: field 'choices' is {ch!r:.80}; expected a list of at least 2 non-empty strings")
    if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
        raise SlayerError(f"{where}: field 'answer_index' is {a!r:.40}; expected an integer index into 'choices' "
                          f"(0..{len(ch) - 1})")
    if ch[a].strip() != ans.strip():
        raise SlayerError(f"{where}: field 'answer' is {ans!r:.60} but choices[{a}] is {ch[a]!r:.60}; expected "
                          f"the answer to be the choice at answer_index")
    if p != f"Question: {q}\nAnswer:":
        raise SlayerError(f"{where}: field 'prompt' is {p!r:.80}; expected \"Question: <question>\\nAnswer:\" "
                          f"(the prompt multiple choice and exact match are scored from)")
    return row


def load_questions(path: str | Path) -> list[dict]:
    """The question records of one probe JSONL file, each checked field by field."""
    path = Path(path)
    out = [_check_record(row, f"{path}: line {n}") for n, row in read_jsonl(path)]
    if not out:
        raise SlayerError(f"{path}: no questions; expected one JSON object a line")
    return out


def load_probe(folder: str | Path) -> dict:
    """{"heldout": [...], "train_questions": [...], "manifest": {...} or None} of a probe folder."""
    d = Path(str(folder))
    if not d.is_dir():
        raise SlayerError(f"{d}: not a directory; expected a probe folder written by `slayer data probe`")
    out: dict[str, Any] = {}
    for name in ("heldout", "train_questions"):
        p = d / f"{name}.jsonl"
        if not p.is_file():
            raise SlayerError(f"{p}: not found; expected a probe folder written by `slayer data probe`")
        out[name] = load_questions(p)
    m = d / MANIFEST
    out["manifest"] = None
    if m.is_file():
        try:
            out["manifest"] = json.loads(m.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, a 4300-digit number, nesting too deep
            raise SlayerError(f"{m}: not valid JSON; expected the manifest `slayer data probe` writes") from None
        if not isinstance(out["manifest"], dict):
            raise SlayerError(f"{m}: expected a JSON object (the manifest `slayer data probe` writes)")
    return out


# ----------------------------------------------------------------------------- scoring
def normalize_answer(text: str) -> str:
    """The first line, stripped, a final period removed, lower case."""
    s = (text or "").split("\n")[0].strip()
    if s.endswith("."):
        s = s[:-1].strip()
    return s.lower()


def exact_match(generated: str, answer: str) -> bool:
    return normalize_answer(generated) == answer.strip().lower()


def as_mcq(records: Sequence[dict]) -> list[MCQ]:
    return [MCQ(r["question"].strip(), tuple(c.strip() for c in r["choices"]), int(r["answer_index"]))
            for r in records]


def probe_mcq(params, cfg, tok, records: Sequence[dict], *, max_length: int = 1024,
              **kw) -> tuple[dict[str, Any], list[int]]:
    """MCQ metrics (acc, acc_norm, n, near_ties) of ``records`` and the choice each question picked."""
    questions = as_mcq(records)
    reqs, groups = mcq_requests(tok, questions)
    lls = [r[0] for r in score_requests(params, cfg, reqs, max_length=max_length, **kw)]
    picks = [int(np.argmax([lls[i] for i in g])) for g in groups]
    return mcq_metrics(lls, groups, questions), picks


def probe_em(gen, records: Sequence[dict], *, max_new_tokens: int = EM_NEW_TOKENS) -> tuple[float, list[str]]:
    """Greedy exact match of ``records`` with ``gen`` (a Generator): the accuracy and each generated text."""
    outs = gen.generate([r["prompt"] for r in records], max_new_tokens, temperature=0.0, stop_strings=("\n",))
    texts = [o.text or "" for o in outs]
    hits = [exact_match(t, r["answer"]) for t, r in zip(texts, records)]
    return float(np.mean(hits)) if hits else 0.0, texts


def eval_probe(params, cfg, tok, probe: str | Path | dict, *, limit: int | None = None, max_length: int = 1024,
               dtype: Any = "float32", batch_size: int = 8, gen=None, samples: int = 10,
               em_new_tokens: int = EM_NEW_TOKENS, progress: bool = False) -> dict[str, Any]:
    """The probe's metrics on one model: held-out and training-split MCQ accuracy and exact match.

    ``probe``: a folder written by :func:`write_task` (or the dict :func:`load_probe` returns);
    ``limit``: the first N questions of each split. ``samples``: how many held-out questions are
    kept in the result with what the model generated and picked."""
    data = probe if isinstance(probe, dict) else load_probe(probe)
    gen = gen or Generator(params, cfg, tok, dtype=dtype, max_batch=batch_size)
    out: dict[str, Any] = {}
    kept = []
    for split, key in (("heldout", "heldout"), ("train", "train_questions")):
        recs = data[key][:limit]
        m, picks = probe_mcq(params, cfg, tok, recs, max_length=max_length, dtype=dtype, progress=progress)
        em, texts = probe_em(gen, recs, max_new_tokens=em_new_tokens)
        out.update({f"{split}_mcq_acc": m["acc"], f"{split}_mcq_acc_norm": m["acc_norm"], f"{split}_em": em,
                    f"{split}_n": m["n"], f"{split}_near_ties": m["near_ties"]})
        if split == "heldout":
            kept = [{"question": r["question"], "answer": r["answer"], "generated": t,
                     "mcq_pick": r["choices"][k]} for r, t, k in list(zip(recs, texts, picks))[:samples]]
    out["chance"] = float(np.mean([1 / len(r["choices"]) for r in data["heldout"][:limit]]))
    man = data.get("manifest") or {}
    out["seed"], out["generator_version"] = man.get("seed"), man.get("generator_version")
    out["people"] = (man.get("counts") or {}).get("people")
    if not isinstance(probe, dict):
        out["source"] = str(probe)
    out["samples"] = kept
    return out
