"""Forgetting measures that move: KL from the base model, the instruct model's own answers, and a
larger general multiple-choice set.

- ``kl``: the mean over every token of a general text of KL(base || tuned) between the two models'
  next-token distributions (nats per token). Each document is cut into the disjoint rolling
  windows of ``slayer eval``'s perplexity (:func:`loglik.rolling_windows`: every token predicted
  exactly once, the first from the prefix token), so the KL is averaged over exactly the
  positions perplexity scores. It is 0 only if the two distributions agree at every position.
  Memory stays bounded: rows are batched under a token budget (:func:`loglik.length_batches`)
  and, inside one compiled call, the logits are made from the final hidden states a block of
  positions at a time (``lax.map``), so at most ``logits_budget`` fp32 logits per model exist at
  once, whatever the vocabulary.
- ``instruct``: the base model answers a fixed set of chat prompts greedily (its chat template,
  at most ``max_new_tokens`` tokens, its own stop tokens included); the tuned model's mean
  log-likelihood per token of those answers (:func:`loglik.score_requests`, the one scorer) is the
  measure, beside the base model's own. The tuned model also answers greedily, and the
  (prompt, base answer, tuned answer) triples go into the result.
- :func:`make_general_mcq`: 400+ template questions with unambiguous answers (arithmetic,
  comparing numbers, the order of days, months and letters, plurals, opposites, capitals,
  categories of things), seeded and offline; written once into
  ``slayer_jax/data_samples/general_mcq_large.jsonl`` (``--mcq large``).
"""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.errors import SlayerError
from slayer_jax.evaluation.loglik import (
    encode,
    length_batches,
    prefix_token_id,
    rolling_windows,
    score_requests,
)
from slayer_jax.evaluation.scoring import SAMPLE_MCQ_LARGE, SAMPLES, read_jsonl, load_text
from slayer_jax.generate import Generator
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import Params, as_dtype, forward, unembed
from slayer_jax.storage import write_text_atomic

CHAT_PROMPTS = SAMPLES / "chat_prompts.jsonl"
GENERAL_MCQ_LARGE = SAMPLE_MCQ_LARGE
INSTRUCT_NEW_TOKENS = 64
LOGITS_BUDGET = 1 << 24  # fp32 logits per model per block: 64 MiB (SmolLM2: 341 positions of 49,152)

TRACES: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- KL(base || tuned)
def kl_from_logits(base_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(softmax(base) || softmax(tuned)) over the last axis, fp32: sum_v p_v (log p_v - log q_v)."""
    lp = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg_base", "cfg", "dtype", "block"))
def token_kl(params_base: Params, params: Params, tokens_BxT, *, cfg_base: ModelConfig, cfg: ModelConfig, dtype,
             block: int):
    """Per position [B, T]: KL(base || tuned) of the next-token distributions, and whether the two
    argmax tokens agree. The logits are made ``block`` positions at a time from the final hidden states."""
    TRACES["token_kl"] += 1
    hb = forward(params_base, tokens_BxT, cfg_base, dtype=dtype, final_hidden=True)  # [B, T, D]
    ht = forward(params, tokens_BxT, cfg, dtype=dtype, final_hidden=True)
    B, T = tokens_BxT.shape

    def blocks(h):  # [B, T, D] -> [T / block, B, block, D]
        return h.reshape(B, T // block, block, h.shape[-1]).swapaxes(0, 1)

    def one(hs):
        lb = unembed(params_base, cfg_base, hs[0], dtype)
        lt = unembed(params, cfg, hs[1], dtype)
        return kl_from_logits(lb, lt), jnp.argmax(lb, axis=-1) == jnp.argmax(lt, axis=-1)

    kl, agree = jax.lax.map(one, (blocks(hb), blocks(ht)))  # [T / block, B, block]
    return kl.swapaxes(0, 1).reshape(B, T), agree.swapaxes(0, 1).reshape(B, T)


def _block(B: int, T: int, vocab: int, logits_budget: int) -> int:
    """The largest power-of-two divisor of T with B * block * vocab <= logits_budget (at least 1)."""
    b = T & -T
    while b > 1 and B * b * vocab > logits_budget:
        b //= 2
    return b


def kl_divergence(params_base: Params, cfg_base: ModelConfig, params: Params, cfg: ModelConfig,
                  docs_tokens: Sequence[Sequence[int]], prefix_token: int, max_length: int = 1024, *,
                  token_budget: int = 2048, logits_budget: int = LOGITS_BUDGET, dtype: Any = "float32",
                  progress: bool = False) -> dict[str, Any]:
    """Mean per-token KL(base || tuned) over every token of ``docs_tokens`` (rolling windows), the
    fraction of positions whose argmax agrees, and the largest per-document mean."""
    if cfg_base.vocab_size != cfg.vocab_size:
        raise SlayerError(f"--base: vocab_size {cfg_base.vocab_size}, the model's {cfg.vocab_size}; expected the "
                          f"base model the tuned one was made from (the same tokenizer)")
    dtype = as_dtype(dtype)
    rows = []
    for d, toks in enumerate(docs_tokens):
        for ctx, cont in rolling_windows(toks, prefix_token, max_length):
            inp = (list(ctx) + list(cont))[:-1]
            rows.append((d, inp, len(cont)))
    kl_doc = np.zeros(len(docs_tokens))
    n_doc = np.zeros(len(docs_tokens))
    agree = 0
    batches = length_batches(rows, token_budget)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="kl", unit="batch")
    for T, B, batch in it:
        toks = np.zeros((B, T), np.int32)
        for r, (_, inp, _) in enumerate(batch):
            toks[r, :len(inp)] = inp
        kl, ag = token_kl(params_base, params, jnp.asarray(toks), cfg_base=cfg_base, cfg=cfg, dtype=dtype,
                          block=_block(B, T, cfg.vocab_size, logits_budget))
        kl, ag = np.asarray(kl, np.float64), np.asarray(ag)
        for r, (d, inp, n) in enumerate(batch):
            L = len(inp)
            kl_doc[d] += kl[r, L - n:L].sum()
            n_doc[d] += n
            agree += int(ag[r, L - n:L].sum())
    total = float(n_doc.sum())
    if total == 0:
        raise SlayerError("kl: the text has no tokens; expected at least one non-empty document")
    per_doc = kl_doc[n_doc > 0] / n_doc[n_doc > 0]
    return {"kl": float(kl_doc.sum() / total), "top1_agree": agree / total, "kl_max_doc": float(per_doc.max()),
            "tokens": int(total), "documents": len(docs_tokens), "max_length": max_length}


def eval_kl(base_loaded, loaded, text: str | Path = "sample", *, max_length: int = 1024, limit: int | None = None,
            base: str | None = None, **kw) -> dict[str, Any]:
    """The ``kl`` task: KL(base || tuned) per token over the documents of a text file (or the shipped
    English sample), tokenised with the tuned model's tokenizer; the first ``limit`` documents if given."""
    pb, cb, _ = base_loaded
    params, cfg, tok = loaded
    docs = load_text(text)[:limit]
    toks = [encode(tok, d) for d in docs]
    out = kl_divergence(pb, cb, params, cfg, toks, prefix_token_id(tok), max_length, **kw)
    out["source"] = str(text)
    if base is not None:
        out["base"] = str(base)
    return out


# ----------------------------------------------------------------------------- the instruct model's answers
def load_chat_prompts(src: str | Path = "sample") -> list[str]:
    """Prompts from a JSONL file with a non-empty string field ``prompt`` (or the shipped sample)."""
    path = CHAT_PROMPTS if str(src) == "sample" else Path(src)
    out = []
    for n, row in read_jsonl(path):
        p = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(p, str) or not p.strip():
            raise SlayerError(f"{path}: line {n}: field 'prompt' is {p!r:.60}; expected a non-empty string")
        out.append(p)
    if not out:
        raise SlayerError(f"{path}: no prompts; expected one {{\"prompt\": ...}} a line")
    return out


def eval_instruct(base_loaded, loaded, prompts: str | Path | Sequence[str] = "sample", *,
                  max_new_tokens: int = INSTRUCT_NEW_TOKENS, limit: int | None = None, max_length: int = 1024,
                  dtype: Any = "float32", batch_size: int = 8, base_gen=None, gen=None, samples: int | None = None,
                  base: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The ``instruct`` task: the tuned model's mean log-likelihood per token of the base model's greedy
    chat answers (``ll_per_token``), the base model's own (``base_ll_per_token``), their difference
    (``ll_drop``), the fraction of answers that are still the tuned model's greedy continuation
    (``same_greedy``, teacher-forced) and the side-by-side answers (``samples``: the first N; all by default)."""
    pb, cb, tb = base_loaded
    params, cfg, tok = loaded
    if tb is None or not getattr(tb, "chat_template", None):
        raise SlayerError(f"{base or '--base'}: the tokenizer has no chat_template; expected an instruct model "
                          f"as the base of the instruct task")
    texts = list(prompts) if not isinstance(prompts, (str, Path)) else load_chat_prompts(prompts)
    texts = texts[:limit]
    base_gen = base_gen or Generator(pb, cb, tb, dtype=dtype, max_batch=batch_size)
    ctx = [base_gen.encode(p, chat=True) for p in texts]
    base_outs = base_gen.generate(ctx, max_new_tokens, temperature=0.0, progress=progress)
    reqs = [(c, o.tokens) for c, o in zip(ctx, base_outs)]
    tuned = score_requests(params, cfg, reqs, max_length=max_length, dtype=dtype)
    own = score_requests(pb, cb, reqs, max_length=max_length, dtype=dtype)
    n_tok = sum(len(o.tokens) for o in base_outs)
    gen = gen or Generator(params, cfg, tok, dtype=dtype, max_batch=batch_size)
    tuned_outs = gen.generate(ctx, max_new_tokens, temperature=0.0, progress=progress)
    ll, ll_base = sum(x[0] for x in tuned), sum(x[0] for x in own)
    side = [{"prompt": p, "base": b.text, "tuned": t.text, "base_tokens": len(b.tokens),
             "tuned_ll_per_token": x[0] / len(b.tokens)}
            for p, b, t, x in list(zip(texts, base_outs, tuned_outs, tuned))[:samples]]
    out = {"ll_per_token": ll / n_tok, "base_ll_per_token": ll_base / n_tok, "ll_drop": (ll_base - ll) / n_tok,
           "same_greedy": float(np.mean([x[1] for x in tuned])),
           "same_answer": float(np.mean([b.tokens == t.tokens for b, t in zip(base_outs, tuned_outs)])),
           "prompts": len(texts), "answer_tokens": n_tok, "max_new_tokens": max_new_tokens,
           "source": str(prompts) if isinstance(prompts, (str, Path)) else "list", "samples": side}
    if base is not None:
        out["base"] = str(base)
    return out


# ----------------------------------------------------------------------------- a larger general MCQ set
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "the United Kingdom": "London", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Canada": "Ottawa", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Kenya": "Nairobi", "South Korea": "Seoul", "Thailand": "Bangkok", "India": "New Delhi",
    "Indonesia": "Jakarta", "Cuba": "Havana", "Turkey": "Ankara", "Iran": "Tehran", "Chile": "Santiago",
    "the Czech Republic": "Prague", "Australia": "Canberra", "the United States": "Washington, D.C.",
}
# word -> (plural, wrong forms); regular words get their wrong forms from _wrong_plurals
PLURALS = {
    "child": ("children", ["childs", "childes", "childrens"]), "mouse": ("mice", ["mouses", "mousen", "meese"]),
    "man": ("men", ["mans", "manes", "mens"]), "woman": ("women", ["womans", "womanes", "womens"]),
    "tooth": ("teeth", ["tooths", "toothes", "teeths"]), "foot": ("feet", ["foots", "footes", "feets"]),
    "goose": ("geese", ["gooses", "goosen", "geeses"]), "person": ("people", ["persones", "peoples", "persen"]),
    "ox": ("oxen", ["oxes", "oxs", "oxens"]),
    "cat": ("cats", None), "dog": ("dogs", None), "book": ("books", None), "box": ("boxes", None),
    "fox": ("foxes", None), "bus": ("buses", None), "glass": ("glasses", None), "church": ("churches", None),
    "watch": ("watches", None), "dish": ("dishes", None), "brush": ("brushes", None), "baby": ("babies", None),
    "city": ("cities", None), "lady": ("ladies", None), "story": ("stories", None), "party": ("parties", None),
    "knife": ("knives", None), "leaf": ("leaves", None), "wolf": ("wolves", None), "shelf": ("shelves", None),
    "wife": ("wives", None), "half": ("halves", None), "day": ("days", None), "toy": ("toys", None),
    "key": ("keys", None), "boy": ("boys", None), "potato": ("potatoes", None), "tomato": ("tomatoes", None),
    "apple": ("apples", None), "house": ("houses", None), "chair": ("chairs", None),
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"),
             ("long", "short"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("wet", "dry"),
             ("young", "old"), ("win", "lose"), ("push", "pull"), ("true", "false"), ("first", "last"),
             ("inside", "outside"), ("always", "never"), ("buy", "sell"), ("left", "right"), ("day", "night"),
             ("heavy", "light"), ("clean", "dirty"), ("loud", "quiet"), ("begin", "end"), ("above", "below"),
             ("north", "south"), ("east", "west"), ("good", "bad"), ("cheap", "expensive"), ("wide", "narrow")]
# Words with another common opposite (old: new; light: dark; right: wrong; short: tall; lose: find; thin: fat)
# are never asked about, only given as answers; no word of one pair is an opposite of a word of another
# pair (so no distractor is a second right answer: hence no hard/soft beside loud/quiet)
AMBIGUOUS_OPPOSITE = {"old", "light", "right", "short", "lose", "thin"}
CATEGORIES = {
    "a fruit": ["apple", "banana", "pear", "grape", "mango", "lemon", "strawberry", "pineapple", "watermelon",
                "coconut"],
    "an animal": ["dog", "horse", "lion", "tiger", "rabbit", "elephant", "giraffe", "zebra", "monkey", "cow"],
    "a vehicle": ["car", "bus", "bicycle", "train", "truck", "motorcycle", "airplane", "boat", "tractor", "van"],
    "a piece of furniture": ["chair", "table", "sofa", "bed", "desk", "wardrobe", "bookshelf", "stool", "cupboard",
                             "bench"],
    "a colour": ["red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "grey"],
    "a musical instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "clarinet",
                             "saxophone"],
    "a tool": ["hammer", "screwdriver", "saw", "wrench", "drill", "shovel", "pliers", "chisel", "rake", "axe"],
}


def _wrong_plurals(w: str, right: str) -> list[str]:
    cands = [w + "s", w + "es", w, w + "en", w + "ses"]
    if w.endswith("y"):
        cands += [w[:-1] + "ies", w[:-1] + "ys"]
    if w.endswith(("f", "fe")):
        cands += [w.rstrip("e")[:-1] + "ves", w.rstrip("e")[:-1] + "fs"]
    return [c for c in dict.fromkeys(cands) if c != right]


def _number_choices(ans: int, rng: np.random.Generator, spread: Sequence[int]) -> list[str]:
    cands = [ans + d for d in spread if d and ans + d >= 0 and ans + d != ans]
    pick = rng.choice(len(cands), size=3, replace=False)
    return [str(cands[i]) for i in pick]


def make_general_mcq(seed: int = 0) -> list[dict]:
    """Template questions with one unambiguous answer each: {question, choices (4), answer, category}.

    Seeded (numpy PCG64), offline; answer positions balanced (each position in turn, after a shuffle)."""
    rng = np.random.default_rng(seed)
    qs: list[tuple[str, str, str, list[str]]] = []  # (category, question, right, wrong); "{options}" is
    # filled with the final choices in order ("12, 87, 45 or 3"): questions that only make sense with them

    def add(cat, q, right, wrong):
        wrong = [w for w in dict.fromkeys(str(x) for x in wrong) if w != str(right)]
        assert len(wrong) >= 3, (q, wrong)
        pick = rng.choice(len(wrong), size=3, replace=False)
        qs.append((cat, q, str(right), [wrong[i] for i in sorted(pick)]))

    seen = set()
    while len([q for q in qs if q[0] == "addition"]) < 50:
        a, b = (int(x) for x in rng.integers(2, 21, size=2))
        if (a, b) not in seen:
            seen.add((a, b))
            add("addition", f"What is {a} plus {b}?", a + b, _number_choices(a + b, rng, (-2, -1, 1, 2, 10)))
    while len([q for q in qs if q[0] == "subtraction"]) < 40:
        a, b = int(rng.integers(10, 31)), int(rng.integers(1, 10))
        if (a, -b) not in seen:
            seen.add((a, -b))
            add("subtraction", f"What is {a} minus {b}?", a - b, _number_choices(a - b, rng, (-2, -1, 1, 2, 2 * b)))
    while len([q for q in qs if q[0] == "multiplication"]) < 40:
        a, b = (int(x) for x in rng.integers(2, 10, size=2))
        if (a, b, "x") not in seen:
            seen.add((a, b, "x"))
            add("multiplication", f"What is {a} times {b}?", a * b, [a * b + d for d in (-a, a, -b, b, 1, -1)
                                                                     if d and a * b + d > 0] + [a + b])
    for i in range(40):
        nums = [int(x) for x in rng.choice(np.arange(1, 100), size=4, replace=False)]
        big = i % 2 == 0
        right = max(nums) if big else min(nums)
        add("comparison", f"Which number is the {'largest' if big else 'smallest'}: {{options}}?", right,
            [n for n in nums if n != right])
    for names, what in ((DAYS, "day of the week"), (MONTHS, "month")):
        for i, n in enumerate(names):
            nxt, prev = names[(i + 1) % len(names)], names[i - 1]
            add("order", f"Which {what} comes after {n}?", nxt, [x for x in names if x not in (nxt, n)])
            add("order", f"Which {what} comes before {n}?", prev, [x for x in names if x not in (prev, n)])
    letters = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    for i, c in enumerate(letters[:-1]):
        add("order", f"Which letter comes after {c} in the alphabet?", letters[i + 1],
            [x for x in letters[max(0, i - 3):i + 5] if x not in (c, letters[i + 1])])
    for w, (right, wrong) in PLURALS.items():
        add("plural", f'What is the plural of "{w}"?', right, wrong or _wrong_plurals(w, right))
    words = [w for pair in OPPOSITES for w in pair]
    for a, b in OPPOSITES:
        for x, y in ((a, b), (b, a)):
            if x in AMBIGUOUS_OPPOSITE:
                continue
            add("opposite", f'What is the opposite of "{x}"?', y, [w for w in words if w not in (x, y)])
    caps = list(CAPITALS.values())
    for country, city in CAPITALS.items():
        add("capital", f"What is the capital city of {country}?", city, [c for c in caps if c != city])
        name = country[4:] if country.startswith("the ") else country
        add("capital", f"{city} is the capital of which country?", name,
            [(c[4:] if c.startswith("the ") else c) for c in CAPITALS if c != country])
    cats = list(CATEGORIES)
    for cat in cats:
        for item in CATEGORIES[cat][:8]:
            others = [x for c in cats if c != cat for x in CATEGORIES[c]]
            add("category", f"Which of these is {cat}?", item, others)  # options not in the question:
            # SmolLM2-135M-Instruct scores 0.61 so, 0.30 with them listed ("...: apple, dog, car or saw?")
    order = rng.permutation(len(qs))
    out = []
    for k, i in enumerate(order):
        cat, q, right, wrong = qs[i]
        pos = k % 4
        wrong = [wrong[j] for j in rng.permutation(3)]
        choices = wrong[:pos] + [right] + wrong[pos:]
        q = q.replace("{options}", ", ".join(choices[:-1]) + " or " + choices[-1])
        out.append({"question": q, "choices": choices, "answer": pos, "category": cat})
    return out


def write_general_mcq(path: str | Path = GENERAL_MCQ_LARGE, seed: int = 0) -> Path:
    """Write :func:`make_general_mcq` as JSONL (the shipped file: ``write_general_mcq()``)."""
    rows = make_general_mcq(seed)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)

