"""Knowledge-injection benchmark: `slayer train` against a plain PyTorch + transformers loop.

What it does
------------
1. Builds the project's knowledge-injection probe (``slayer_jax.evaluation.probe``, the generator
   behind ``slayer data probe``; seeded, offline: ``--people`` fictional people, names made of
   syllables so no pretraining text can hold them; 5 attributes each from closed sets: birth city,
   university, field of study, employer, hobby) and writes it to ``OUT/task/`` (also probe.json
   and README.md: seed, counts, generator version):

   - ``train.jsonl`` (field ``text``): per person, 3 paraphrased biographies on *adjacent* lines
     (people in order, as a naive corpus would have them), then, for the first half of the people
     (the training split), 5 question-answer documents per person ("Question: Where was X
     born?\\nAnswer: Lisbon."), again person by person;
   - ``heldout.jsonl``: the same 5 question templates about the other half (never in train.jsonl):
     question, prompt, choices (true value + 3 seeded distractors from the attribute's set,
     shuffled), answer index, answer text;
   - ``train_questions.jsonl``: the training split's questions in the same format (in-distribution).

2. Trains, for each stack and seed, SmolLM2-135M-Instruct (fp32 HF dir from
   ``slayer_jax.io.assets.default_model_dir()``) expanded with 6 identity blocks after original
   layers 1, 3, 5, 7, 9, 11 (each the average of layers i and i+1 with o_proj and down_proj
   zeroed); only the new blocks train (embeddings, head, norms, old layers frozen). Optimizer:
   fp32 AdamW, peak LR 1e-3, linear warm-up from 0 over max(1, round(0.06 N)) steps then cosine
   to 0 at N, weight decay 0, betas (0.9, 0.999), eps 1e-8, global grad-norm clip 1.0. Every
   stack takes exactly N optimizer steps (``--steps``; default below).

   - ``torch``: independent of slayer_jax. The expansion is done on ``LlamaForCausalLM`` here and
     checked to be an identity (max |logit diff| < 1e-4 against the base model). Each epoch the
     documents are shuffled with the run's own seeded generator; each document is tokenised with
     add_special_tokens=False plus ``<|endoftext|>``; one document per row, right padding, loss =
     mean over the real next-token predictions of the step (separator prediction included). The
     E-epoch document stream is cut into N consecutive, near-equal groups: one group per step, so
     torch sees each document exactly E times in N steps (about the loss tokens of slayer).
   - ``slayer_before`` / ``slayer_after``: ``python -m slayer_jax.cli train --config
     configs/smollm2_slayer.py`` run as a subprocess inside a checkout (``--before`` /
     ``--after``; PYTHONPATH=<checkout>, JAX_PLATFORMS=cpu) with
     ``plan.kind=shallow plan.expand=6 plan.prune=0``, the optimizer above,
     ``data.source=train.jsonl data.seq_len=T batch_size=B steps=N seed=S``. If the checkout's
     base config has a ``data.separator`` key, ``--config.data.separator=auto`` is passed too, and
     if it has an ``epochs`` key, ``--config.epochs=0`` (so ``steps`` decides).
     Extra overrides per stack: ``--slayer-before-extra`` / ``--slayer-after-extra``.

   Default N: the documents are tokenised (+1 separator each); rows = ceil(tokens / (0.95 T))
   estimates slayer's packed rows; N = ceil(E * rows / B).

3. Evaluates every model (the base included) with ONE evaluator, transformers on the HF
   directory (slayer's ``export_dir``; torch's ``save_pretrained``), fp32, the base model's
   tokenizer:

   - MCQ accuracy (held-out and training-split questions): score of a choice = sum of
     log p(" " + value tokens | "Question: ...\\nAnswer:"), argmax over the 4 choices; chance 0.25;
   - exact match: greedy decoding of 12 tokens after the prompt; the first line, stripped, with a
     final period removed, equals the value (case-insensitive);
   - English perplexity: ``slayer_jax/data_samples/english_text.jsonl`` (field ``text``), each
     document tokenised alone (add_special_tokens=False), truncated to 256 tokens, exp(total NLL /
     predicted tokens) over all documents;
   - ``frozen_max_diff``: max |w - w_base| over every tensor that should be frozen (embeddings,
     final norm, the 30 original layers), a check that a stack trained only the new blocks.

4. Writes ``OUT/results.json`` (one record per run: stack, seed, steps, loss tokens, first/last
   loss, the metrics above, wall times) and ``OUT/results.md`` (mean +- sd over seeds per stack,
   plus the base model's row). Resumable: a (stack, seed) already in results.json is skipped.
   Trained models are deleted after evaluation unless ``--keep-models``.

Default sizes (for a 2-core CPU): 24 people (12 training split, 12 held out: 60 held-out questions),
8 epochs, T = 128, B = 4 rows per step: 132 documents, 4,506 tokens per epoch, N = 76 steps
(~35k loss tokens). Measured on an otherwise idle 2-core machine: slayer ~2.8 s/step (236 s per
run with start-up and export), torch ~2.9 s/step (238 s), evaluation ~25-30 s per model: about
40 min for 3 stacks x 3 seeds. At these sizes torch and slayer reach held-out MCQ ~0.42-0.45
(base 0.30) and training-question MCQ 0.85 (seed 0); 10 epochs (N = 95) gives ~0.55 at ~5.5 min per run.

    python bench/knowledge_injection.py --stacks torch,slayer_before,slayer_after --seeds 0,1,2 \\
        --out /tmp/ki --before /tmp/slayer_before --after .

(``git -C . worktree add /tmp/slayer_before 7d7ff09`` makes the "before" checkout.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slayer_jax.evaluation.probe import make_task, write_task

REPO = Path(__file__).resolve().parents[1]
ENGLISH = REPO / "slayer_jax" / "data_samples" / "english_text.jsonl"
EXPAND_AFTER = (1, 3, 5, 7, 9, 11)
SEPARATOR = "<|endoftext|>"
OPTIM = dict(peak_lr=1e-3, warmup_frac=0.06, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)


def log(msg: str) -> None:
    print(f"[ki {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================ the task
# The generator is the package's (slayer_jax.evaluation.probe: make_task, write_task), the one behind
# `slayer data probe` and `slayer eval --tasks probe`; the same (people, seed) gives the same files.


def doc_tokens(tok, docs: list[str]) -> list[list[int]]:
    """Each document's ids (add_special_tokens=False) + the <|endoftext|> separator."""
    sep = tok.convert_tokens_to_ids(SEPARATOR)
    assert tok.convert_ids_to_tokens(sep) == SEPARATOR, SEPARATOR
    return [list(ids) + [sep] for ids in tok(docs, add_special_tokens=False)["input_ids"]]


def default_steps(token_lists: list[list[int]], epochs: float, seq_len: int, batch: int) -> tuple[int, int]:
    rows = math.ceil(sum(len(t) for t in token_lists) / (0.95 * seq_len))
    return max(1, math.ceil(epochs * rows / batch)), rows


# ============================================================================ torch stack
def right_pad(seqs: list[list[int]], pad_id: int):
    """(ids, attention mask), torch int64 ``[len(seqs), longest]``, right padded with ``pad_id``."""
    import torch

    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
    return ids, mask


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """optax.warmup_cosine_decay_schedule(0, peak, w, total, 0)(step) / peak, w = max(1, round(frac*total))."""
    w = max(1, int(round(warmup_frac * total))) if warmup_frac > 0 else 0
    decay = max(total, w + 1)
    if step < w:
        return step / w
    t = min(step - w, decay - w) / (decay - w)
    return 0.5 * (1 + math.cos(math.pi * t))


def expand_llama(model, after=EXPAND_AFTER):
    """Insert an averaged, output-zeroed copy of layers (i, i+1) after each original layer i."""
    import torch

    layers = list(model.model.layers)
    new, inserted = [], []
    for i, layer in enumerate(layers):
        new.append(layer)
        if i in after:
            block = copy.deepcopy(layer)
            nxt = layers[i + 1].state_dict()
            with torch.no_grad():
                for name, p in block.named_parameters():
                    p.copy_((p + nxt[name]) / 2)
                    if name.startswith(("self_attn.o_proj", "mlp.down_proj")):
                        p.zero_()
            inserted.append(len(new))
            new.append(block)
    for j, layer in enumerate(new):
        layer.self_attn.layer_idx = j
    model.model.layers = torch.nn.ModuleList(new)
    model.config.num_hidden_layers = len(new)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[0]] * len(new)
    return model, inserted


def load_llama(path, **kw):
    import torch
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    return m.eval()


def run_torch(base_dir: Path, train_ids: list[list[int]], steps: int, epochs: int, seed: int, out_dir: Path,
              pad_id: int) -> dict:
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    base = load_llama(base_dir)
    model, inserted = expand_llama(load_llama(base_dir))
    probe = torch.tensor([ids[:-1] for ids in train_ids[:4]][0:1])
    eng = json.loads(ENGLISH.read_text().splitlines()[0])["text"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    probe2 = torch.tensor([tok(eng, add_special_tokens=False)["input_ids"][:128]])
    with torch.no_grad():
        diff = max(float((base(p).logits - model(p).logits).abs().max()) for p in (probe, probe2))
    del base
    if not diff < 1e-4:
        raise AssertionError(f"torch expansion is not an identity: max |logit diff| = {diff}")
    log(f"torch: expanded to {len(model.model.layers)} layers, new blocks at {inserted}; identity max diff {diff:.2e}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for j in inserted:
        for p in model.model.layers[j].parameters():
            p.requires_grad_(True)
            params.append(p)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=OPTIM["peak_lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, OPTIM["warmup_frac"]))
    rng = np.random.default_rng(seed)
    stream = np.concatenate([rng.permutation(len(train_ids)) for _ in range(epochs)])
    groups = np.array_split(stream, steps)
    model.train()
    history, tokens_total = [], 0
    t_train = time.perf_counter()
    for s, g in enumerate(groups):
        docs = [train_ids[i] for i in g]
        ids, mask = right_pad(docs, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100)
        n_tok = int((tgt != -100).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, OPTIM["clip_norm"])
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        tokens_total += n_tok
        history.append({"step": s + 1, "loss": loss.item(), "tokens": n_tok, "docs": len(docs),
                        "grad_norm": float(gnorm), "lr": lr})
        if s == 0 or (s + 1) % 5 == 0 or s + 1 == steps:
            log(f"torch seed {seed} step {s + 1}/{steps} loss {history[-1]['loss']:.4f} docs {len(docs)} lr {lr:.2e} "
                f"({(time.perf_counter() - t_train) / (s + 1):.2f} s/step)")
    train_s = time.perf_counter() - t_train
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    model.save_pretrained(str(out_dir / "hf"))
    return {"steps": steps, "loss_tokens": tokens_total, "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"], "mean_loss_last10": float(np.mean([h["loss"] for h in history[-10:]])),
            "trainable_params": n_train, "identity_max_diff": diff, "train_s": train_s,
            "run_s": time.perf_counter() - t0, "hf_dir": str(out_dir / "hf")}


# ============================================================================ slayer stacks
def run_slayer(checkout: Path, train_file: Path, steps: int, seq_len: int, batch: int, seed: int, out_dir: Path,
               extra: list[str]) -> dict:
    checkout = checkout.resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a stale workdir would resume from its checkpoint
    out_dir.mkdir(parents=True)
    overrides = [
        "plan.kind=shallow", "plan.expand=6", "plan.prune=0",
        f"data.source={train_file.resolve()}", f"data.seq_len={seq_len}", f"batch_size={batch}",
        "num_devices=1", "mesh=data=1", f"seed={seed}", f"steps={steps}",
        f"workdir={out_dir.resolve() / 'work'}", f"export_dir={out_dir.resolve() / 'hf'}",
        "log_every=1", "eval_every=100000", "checkpoint.every=100000",
        f"optim.peak_lr={OPTIM['peak_lr']}", f"optim.weight_decay={OPTIM['weight_decay']}",
        f"optim.b1={OPTIM['b1']}", f"optim.b2={OPTIM['b2']}", f"optim.warmup_frac={OPTIM['warmup_frac']}",
        f"optim.clip_norm={OPTIM['clip_norm']}", "optim.min_lr_ratio=0.0", "dtype=float32",
    ]
    cfg_src = (checkout / "slayer_jax" / "configs.py").read_text()
    if "c.data.separator" in cfg_src:
        overrides.append("data.separator=auto")
    if "c.epochs" in cfg_src:
        overrides.append("epochs=0")  # 0 = train `steps` steps: every stack takes exactly N steps
    overrides += [e.removeprefix("--config.") for e in extra]
    cmd = [sys.executable, "-m", "slayer_jax.cli", "train", "--config", "configs/smollm2_slayer.py",
           *[f"--config.{o}" for o in overrides]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(checkout))
    (out_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with open(out_dir / "train.log", "w") as f:
        proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
    run_s = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out_dir / "train.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"slayer train in {checkout} exited {proc.returncode}:\n" + "\n".join(tail))
    hist = [json.loads(line) for line in (out_dir / "work" / "metrics.jsonl").read_text().splitlines() if line]
    shutil.rmtree(out_dir / "work" / "checkpoints", ignore_errors=True)
    return {"steps": len(hist), "loss_tokens": int(sum(h["tokens"] for h in hist)), "first_loss": hist[0]["loss"],
            "last_loss": hist[-1]["loss"], "mean_loss_last10": float(np.mean([h["loss"] for h in hist[-10:]])),
            "train_s": float(sum(h["step_s"] for h in hist)), "first_step_s": hist[0]["step_s"],
            "run_s": run_s, "hf_dir": str(out_dir / "hf"), "overrides": overrides,
            "checkout_commit": _git_head(checkout)}


def _git_head(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return None


# ============================================================================ the evaluator
class Evaluator:
    """One procedure for every model: transformers LlamaForCausalLM on an HF dir, fp32, base tokenizer."""

    def __init__(self, base_dir: Path, task: dict, ppl_tokens: int = 256, batch: int = 32):
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.pad = self.tok.convert_tokens_to_ids(SEPARATOR)
        self.task, self.batch = task, batch
        texts = [json.loads(line)["text"] for line in ENGLISH.read_text().splitlines() if line.strip()]
        self.english = [ids[:ppl_tokens] for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]
        self.base_sd = {k: v.clone() for k, v in load_llama(base_dir).state_dict().items()}

    def _enc(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def _right_pad(self, seqs: list[list[int]]):
        return right_pad(seqs, self.pad)

    def _nll_rows(self, model, seqs: list[list[int]], starts: list[int]) -> list[tuple[float, int]]:
        """Per sequence: (sum of -log p(token j) for j >= start, count), right padded batches."""
        torch = self.torch
        out = []
        per_call = max(1, min(self.batch, 2048 // max(len(s) for s in seqs)))  # logits stay <= 2048 x V
        for b in range(0, len(seqs), per_call):
            chunk, st = seqs[b:b + per_call], starts[b:b + per_call]
            ids, mask = self._right_pad(chunk)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                tgt = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            for r, s in enumerate(chunk):
                v = tgt[r, st[r] - 1:len(s) - 1]
                out.append((float(-v.sum()), int(v.numel())))
        return out

    def mcq(self, model, recs: list[dict], per_call: int = 16) -> tuple[float, list[int]]:
        """Sum of log p(choice tokens | prompt) per choice, argmax. The prompts run once (left padded,
        explicit positions, KV cache); the 4 continuations of each run on its cache repeated 4x."""
        torch = self.torch
        prompts = [self._enc(r["prompt"]) for r in recs]
        conts = [[self._enc(" " + c) for c in r["choices"]] for r in recs]
        scores = np.zeros((len(recs), 4))
        for b in range(0, len(recs), per_call):
            chunk = list(range(b, min(b + per_call, len(recs))))
            P = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), P), self.pad, dtype=torch.long)
            pmask = torch.zeros((len(chunk), P), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, P - len(prompts[i]):] = torch.tensor(prompts[i])
                pmask[r, P - len(prompts[i]):] = 1
            pos = (pmask.cumsum(-1) - 1).clamp(min=0)
            cs = [c for i in chunk for c in conts[i]]
            cids, cmask = self._right_pad(cs)
            plen = pmask.sum(-1).repeat_interleave(4)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=pmask, position_ids=pos, use_cache=True)
                first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(4, 0)
                cache = out.past_key_values
                cache.batch_repeat_interleave(4)
                mask = torch.cat([pmask.repeat_interleave(4, 0), cmask], 1)
                cpos = plen[:, None] + torch.arange(cids.shape[1])[None, :]
                logp = torch.log_softmax(model(input_ids=cids, attention_mask=mask, position_ids=cpos,
                                               past_key_values=cache).logits.float(), -1)
            for r, c in enumerate(cs):
                s = float(first[r, c[0]]) + sum(float(logp[r, t - 1, c[t]]) for t in range(1, len(c)))
                scores[chunk[r // 4], r % 4] = s
        self.last_scores = scores
        picks = [int(np.argmax(scores[i])) for i in range(len(recs))]
        return float(np.mean([pk == r["answer_index"] for pk, r in zip(picks, recs)])), picks

    def mcq_reference(self, model, recs: list[dict]) -> tuple[float, list[int]]:
        """The same scores without a cache: every (prompt + choice) forwarded whole (slow; for checking)."""
        seqs, starts = [], []
        for r in recs:
            p = self._enc(r["prompt"])
            for c in r["choices"]:
                seqs.append(p + self._enc(" " + c))
                starts.append(len(p))
        nll = self._nll_rows(model, seqs, starts)
        self.last_scores = -np.array([a for a, _ in nll]).reshape(len(recs), 4)
        picks = [int(np.argmin([nll[4 * i + j][0] for j in range(4)])) for i in range(len(recs))]
        return float(np.mean([pk == r["answer_index"] for pk, r in zip(picks, recs)])), picks

    def exact_match(self, model, recs: list[dict], new_tokens: int = 12) -> tuple[float, list[str]]:
        torch = self.torch
        outs = []
        for b in range(0, len(recs), self.batch):
            prompts = [self._enc(r["prompt"]) for r in recs[b:b + self.batch]]
            L = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), L), self.pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), L), dtype=torch.long)
            for r, p in enumerate(prompts):  # left padding
                ids[r, L - len(p):] = torch.tensor(p)
                mask[r, L - len(p):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=self.pad, eos_token_id=None, num_beams=1)
            outs += self.tok.batch_decode(gen[:, L:], skip_special_tokens=True)
        def norm(s):
            s = s.strip().split("\n")[0].strip()
            return s[:-1].strip().lower() if s.endswith(".") else s.lower()
        hits = [norm(o) == r["answer"].lower() for o, r in zip(outs, recs)]
        return float(np.mean(hits)), outs

    def perplexity(self, model) -> float:
        nll = self._nll_rows(model, self.english, [1] * len(self.english))
        return math.exp(sum(a for a, _ in nll) / sum(n for _, n in nll))

    def frozen_max_diff(self, model) -> float | None:
        """max |w - w_base| over embeddings, final norm and the original layers (found by the expansion map)."""
        sd = model.state_dict()
        n = model.config.num_hidden_layers
        base_n = sum(1 for k in self.base_sd if k.endswith("input_layernorm.weight"))
        if n == base_n:
            orig = list(range(n))
        else:
            orig = [j for j in range(n) if j not in expanded_positions(base_n)]
            if len(orig) != base_n:
                return None
        worst = 0.0
        for k, v in self.base_sd.items():
            key = k
            if k.startswith("model.layers."):
                i = int(k.split(".")[2])
                key = k.replace(f"model.layers.{i}.", f"model.layers.{orig[i]}.", 1)
            if key in sd:
                worst = max(worst, float((sd[key] - v).abs().max()))
        return worst

    def evaluate(self, hf_dir: str | Path) -> dict:
        t0 = time.perf_counter()
        self.torch.manual_seed(0)
        model = load_llama(hf_dir)
        res = {"layers": model.config.num_hidden_layers}
        res["heldout_mcq"], picks = self.mcq(model, self.task["heldout"])
        res["heldout_em"], outs = self.exact_match(model, self.task["heldout"])
        res["train_q_mcq"], _ = self.mcq(model, self.task["train_questions"])
        res["train_q_em"], _ = self.exact_match(model, self.task["train_questions"])
        res["english_ppl"] = self.perplexity(model)
        res["frozen_max_diff"] = self.frozen_max_diff(model)
        res["heldout_samples"] = [{"q": r["question"], "answer": r["answer"], "generated": o,
                                   "mcq_pick": r["choices"][p]} for r, o, p in
                                  list(zip(self.task["heldout"], outs, picks))[:10]]
        res["eval_s"] = time.perf_counter() - t0
        return res


def expanded_positions(n_orig: int, after=EXPAND_AFTER) -> list[int]:
    pos, j = [], 0
    for i in range(n_orig):
        j += 1
        if i in after:
            pos.append(j)
            j += 1
    return pos


# ============================================================================ report
METRICS = [("heldout_mcq", "held-out MCQ acc", 3), ("heldout_em", "held-out EM", 3),
           ("train_q_mcq", "train-q MCQ acc", 3), ("train_q_em", "train-q EM", 3),
           ("english_ppl", "English ppl", 2), ("last_loss", "last loss", 3), ("loss_tokens", "loss tokens", 0),
           ("run_s", "run s", 0)]


def _fmt(vals: list[float], nd: int) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} ± {statistics.stdev(vals):.{nd}f}"


def write_report(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    lines = [f"# Knowledge injection: {results['task']['people']} people, {results['task']['epochs']} epochs, "
             f"N = {results['task']['steps']} steps, T = {results['task']['seq_len']}, B = {results['task']['batch']}",
             "", "mean ± sd over seeds (chance MCQ = 0.25)", "",
             "| stack | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    if "base" in results:
        b = results["base"]
        lines.append("| base (no training) | - | " + " | ".join(
            _fmt([b.get(k)], nd) if k in b else "-" for k, _, nd in METRICS) + " |")
    for stack in dict.fromkeys(r["stack"] for r in runs):
        rs = [r for r in runs if r["stack"] == stack]
        lines.append(f"| {stack} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(
            _fmt([r.get(k) for r in rs], nd) for k, _, nd in METRICS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", default="torch,slayer_before,slayer_after",
                    help="comma-separated; a slayer stack may add overrides: slayer_after+data.separator=eos")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--people", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="slayer rows of seq_len tokens per step")
    ap.add_argument("--steps", type=int, default=0, help="0 = ceil(epochs * est. rows / batch)")
    ap.add_argument("--task-seed", type=int, default=1234)
    ap.add_argument("--before", default="/tmp/slayer_before", help="checkout for slayer_before")
    ap.add_argument("--after", default=str(REPO), help="checkout for slayer_after")
    ap.add_argument("--slayer-before-extra", default="", help="comma-separated key=value overrides")
    ap.add_argument("--slayer-after-extra", default="", help="comma-separated key=value overrides")
    ap.add_argument("--model", default="", help="base HF dir (default: slayer_jax.io.assets.default_model_dir())")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    a = ap.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.model:
        base_dir = Path(a.model)
    else:
        from slayer_jax.io.assets import default_model_dir

        base_dir = Path(default_model_dir())
    while not (base_dir / "model.safetensors").is_file():
        log(f"waiting for {base_dir}/model.safetensors")
        time.sleep(30)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    task = make_task(a.people, a.task_seed)
    write_task(task, out / "task", overwrite=True)
    train_ids = doc_tokens(tok, task["train_docs"])
    est_steps, est_rows = default_steps(train_ids, a.epochs, a.seq_len, a.batch)
    steps = a.steps or est_steps
    task_info = {"people": a.people, "epochs": a.epochs, "seq_len": a.seq_len, "batch": a.batch, "steps": steps,
                 "est_rows": est_rows, "documents": len(train_ids), "tokens_per_epoch": sum(map(len, train_ids)),
                 "loss_tokens_per_epoch": sum(len(t) - 1 for t in train_ids), "task_seed": a.task_seed,
                 "heldout_questions": len(task["heldout"]), "train_questions": len(task["train_questions"]),
                 "base": str(base_dir)}
    log(f"task: {json.dumps(task_info)}")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": []}
    if results.get("task") and {k: results["task"].get(k) for k in ("people", "epochs", "seq_len", "batch", "steps",
                                                                      "task_seed")} != \
            {k: task_info[k] for k in ("people", "epochs", "seq_len", "batch", "steps", "task_seed")}:
        raise SystemExit(f"{res_path} was made with other sizes ({results['task']}); use another --out")
    results["task"] = task_info
    ev = Evaluator(base_dir, task)
    if not a.no_base and "base" not in results:
        log("evaluating the base model")
        results["base"] = {"stack": "base", **ev.evaluate(base_dir)}
        log(f"base: { {k: v for k, v in results['base'].items() if k != 'heldout_samples'} }")
        write_report(out, results)
    for stack in a.stacks.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            if any(r["stack"] == stack and r["seed"] == seed for r in results["runs"]):
                log(f"{stack} seed {seed}: in results.json, skipped")
                continue
            run_dir = out / "runs" / f"{stack}_s{seed}"
            log(f"{stack} seed {seed}: training {steps} steps")
            if stack == "torch":
                rec = run_torch(base_dir, train_ids, steps, a.epochs, seed, run_dir, ev.pad)
            elif stack.split("+")[0] in ("slayer_before", "slayer_after"):
                # "slayer_after+data.separator=eos": an ablation, the overrides after "+" on top of the stack's
                name, *more = stack.split("+")
                checkout = Path(a.before if name == "slayer_before" else a.after)
                extra = [e for e in getattr(a, f"{name}_extra").split(",") if e] + more
                rec = run_slayer(checkout, out / "task" / "train.jsonl", steps, a.seq_len, a.batch, seed, run_dir,
                                 extra)
            else:
                raise SystemExit(f"unknown stack {stack!r}; expected torch, slayer_before or slayer_after "
                                 f"(+key=value overrides for an ablation)")
            log(f"{stack} seed {seed}: trained in {rec['run_s']:.0f} s, loss {rec['first_loss']:.3f} -> "
                f"{rec['last_loss']:.3f}; evaluating")
            rec = {"stack": stack, "seed": seed, **rec, **ev.evaluate(rec["hf_dir"])}
            log(f"{stack} seed {seed}: " + ", ".join(f"{k} {rec[k]:.3f}" for k in
                                                     ("heldout_mcq", "heldout_em", "train_q_mcq", "train_q_em",
                                                      "english_ppl")) + f", frozen diff {rec['frozen_max_diff']}")
            if not a.keep_models:
                shutil.rmtree(rec["hf_dir"], ignore_errors=True)
            results["runs"].append(rec)
            write_report(out, results)
    write_report(out, results)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
