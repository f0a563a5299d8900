"""Layer importance: angular distance, Block Influence, removal and expansion sweeps, plots, a plan.

Per-layer measures (all taken from each layer's own input ``x_l`` and output ``x_{l+1}``, i.e.
the residual stream entries of :func:`slayer_jax.modeling.model.forward` ``return_hidden``, never from
the post-final-norm state):

- angular distance (Gromov et al. 2024) ``d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi``,
  for the last token of each text window (Gromov's choice) and as the mean over all tokens,
  for blocks of n = 1..k layers: the ``[k, L]`` block-size x start-layer matrix. The angle is
  computed as ``2 atan2(|u - v|, |u + v|)`` of the unit vectors, which equals arccos(u.v) but
  stays exact near 0, so a block whose output equals its input scores exactly 0;
- Block Influence (ShortGPT) ``BI_l = 1 - mean over tokens of cos(x_l, x_{l+1})``;
- removal sweep: the model without layer l, for every l;
- expansion sweep: the model with one extra, function-changing block after layer l (a plain
  copy of l, or the average of l and l+1; not zeroed, since an identity block changes nothing).

Both sweeps report perplexity on a text set and multiple-choice accuracy by summed
log-likelihood (and length-normalised), and each one's change from the intact model.
Each sweep kind compiles once: the variant is data (a slot index/gate vector handed to
:func:`slayer_jax.evaluation.scoring.layer_logprobs`), never a new trace.

:func:`run_importance` computes the profile, :func:`recommend_plan` turns it into a
:class:`slayer_jax.surgery.Plan`, :func:`write_outputs` writes ``importance.csv``,
``importance.json``, the PNG plots and ``recommended_plan.json``; :func:`add_cli` registers
``slayer importance``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from slayer_jax import surgery
from slayer_jax.errors import SlayerError
from slayer_jax.evaluation import scoring
from slayer_jax.evaluation.scoring import TRACES, EvalSet
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import Params, as_dtype

SWEEPS = ("removal", "expansion")
PLAN_METRICS = ("removal_nll", "removal_acc", "expansion_nll", "expansion_acc", "angular_mean", "angular_last",
                "bi", "combined")
SHAPE_METRICS = ("angular_last", "angular_mean", "bi", "removal_nll_increase", "removal_acc_drop",
                 "expansion_nll_increase", "expansion_acc_drop")


# ----------------------------------------------------------------------------- hidden-state metrics
def _pair_sums_impl(h_NxBxTxD, w_all_BxT, w_last_BxT, max_block: int) -> dict[str, jax.Array]:
    """Weighted sums over tokens of cos and angular distance between states l and l+n: [max_block, N-1]."""
    h = h_NxBxTxD.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))
    u = h / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
    L = h.shape[0] - 1
    out: dict[str, list] = {"cos_all": [], "ang_all": [], "cos_last": [], "ang_last": []}
    for n in range(1, max_block + 1):
        a, b = u[: L + 1 - n], u[n:]
        diff2 = jnp.sum((a - b) ** 2, axis=-1)
        cos = 1.0 - 0.5 * diff2  # = a.b for unit vectors, and exactly 1 when a == b
        ang = 2.0 * jnp.arctan2(jnp.sqrt(diff2), jnp.sqrt(jnp.sum((a + b) ** 2, axis=-1))) / jnp.pi
        for key, val, w in (("cos_all", cos, w_all_BxT), ("ang_all", ang, w_all_BxT),
                            ("cos_last", cos, w_last_BxT), ("ang_last", ang, w_last_BxT)):
            s = jnp.sum(val * w[None], axis=(1, 2))
            out[key].append(jnp.pad(s, (0, n - 1)))
    return {k: jnp.stack(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("max_block",))
def _pair_sums(h, w_all, w_last, max_block: int):
    TRACES["pair_sums"] += 1
    return _pair_sums_impl(h, w_all, w_last, max_block)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "max_block"))
def _model_pair_sums(rest, stacked, a_S, b_S, gate_S, tokens, pos, seg, branch, w_all, w_last, *,
                     cfg: ModelConfig, dtype, max_block: int):
    TRACES["model_pair_sums"] += 1
    _, h = scoring.run_slots(rest, stacked, a_S, b_S, gate_S, tokens, pos, seg, branch, cfg, dtype, collect=True)
    return _pair_sums_impl(h, w_all, w_last, max_block)


def _finalize(sums: dict[str, np.ndarray], n_all: float, n_last: float) -> dict[str, Any]:
    k, L = sums["cos_all"].shape
    valid = np.array([[l + n <= L for l in range(L)] for n in range(1, k + 1)])

    def mat(key, count):
        m = np.asarray(sums[key], np.float64) / max(count, 1e-30)
        return np.where(valid, m, np.nan)

    ang_last, ang_all = mat("ang_last", n_last), mat("ang_all", n_all)
    cos_last, cos_all = mat("cos_last", n_last), mat("cos_all", n_all)
    return {"angular_last": ang_last, "angular_mean": ang_all, "cos_last": cos_last, "cos_mean": cos_all,
            "per_layer": {"angular_last": ang_last[0], "angular_mean": ang_all[0], "bi": 1.0 - cos_all[0],
                          "bi_last": 1.0 - cos_last[0]},
            "tokens": float(n_all), "last_tokens": float(n_last)}


def block_metrics(hidden: Sequence[Any] | Any, token_weight=None, last_weight=None,
                  max_block: int | None = None) -> dict[str, Any]:
    """Angular distance and BI from residual states ``hidden`` (L+1 entries of [B, T, D], entry l =
    layer l's input).

    token_weight [B, T]: which tokens enter the all-token means (default all). last_weight
    [B, T]: which tokens are "the last token" (default position T-1 of each row). Returns the
    ``[max_block, L]`` matrices ``angular_last``, ``angular_mean``, ``cos_last``, ``cos_mean``
    (entry [n-1, l] is the block of n layers starting at layer l; NaN where l + n > L) and
    ``per_layer`` = {angular_last, angular_mean, bi, bi_last} for n = 1.
    """
    h = jnp.stack([jnp.asarray(x) for x in hidden]) if isinstance(hidden, (list, tuple)) else jnp.asarray(hidden)
    if h.ndim == 3:
        h = h[:, None]
    _, B, T, _ = h.shape
    L = h.shape[0] - 1
    w_all = np.ones((B, T), np.float32) if token_weight is None else np.asarray(token_weight, np.float32)
    if last_weight is None:
        last_weight = np.zeros((B, T), np.float32)
        last_weight[:, -1] = 1.0
    w_last = np.asarray(last_weight, np.float32)
    k = L if max_block is None else int(max_block)
    sums = jax.device_get(_pair_sums(h, jnp.asarray(w_all), jnp.asarray(w_last), max_block=k))
    return _finalize(sums, float(w_all.sum()), float(w_last.sum()))


def model_block_metrics(params: Params, es: EvalSet, cfg: ModelConfig, max_block: int | None = None,
                        dtype="float32") -> dict[str, Any]:
    """:func:`block_metrics` of the intact model over the text windows of ``es`` (one compile)."""
    L = len(params["layers"])
    k = L if max_block is None else max(1, min(int(max_block), L))
    rest, stacked = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    a, b, g = (jnp.asarray(x) for x in scoring.identity_order(L))
    total = None
    if not es.n_text:
        raise SlayerError("text: no text windows; expected text for the hidden-state metrics")
    for sl in es.batches(text_only=True):
        s = _model_pair_sums(rest, stacked, a, b, g, *es.device_arrays(sl)[:4], jnp.asarray(es.text_weight[sl]),
                             jnp.asarray(es.last_weight[sl]), cfg=cfg, dtype=as_dtype(dtype), max_block=k)
        s = jax.device_get(s)
        total = s if total is None else {key: total[key] + s[key] for key in s}
    return _finalize(total, float(es.text_weight.sum()), float(es.last_weight.sum()))


# ----------------------------------------------------------------------------- sweeps
def removal_slots(L: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L slots, layer ``r`` gated to an exact identity: the model without layer r."""
    a, b, g = scoring.identity_order(L)
    g[r] = 0.0
    return a, b, g


def expansion_slots(L: int, after: int, init: str = "copy", identity: bool = False):
    """L+1 slots: a new block after layer ``after`` (copy of it, or the average with the next layer;
    for the last layer "average" falls back to a copy, as in :func:`surgery.new_block`)."""
    src_a, src_b = surgery.block_sources(L, after, init)  # the surgery's own rule
    a = np.array(list(range(after + 1)) + [src_a] + list(range(after + 1, L)), np.int32)
    b = a.copy()
    b[after + 1] = src_b
    g = np.ones(L + 1, np.float32)
    if identity:
        g[after + 1] = 0.0
    return a, b, g


def _drops(base: dict[str, float], m: dict[str, float]) -> dict[str, float]:
    out = dict(m)
    if "nll" in m:
        out["nll_increase"] = m["nll"] - base["nll"]
        out["ppl_increase"] = m["ppl"] - base["ppl"]
    if "acc" in m:
        out["acc_drop"] = base["acc"] - m["acc"]
        out["acc_norm_drop"] = base["acc_norm"] - m["acc_norm"]
    return out


def sweep(params: Params, es: EvalSet, cfg: ModelConfig, kind: str, init: str = "copy", dtype="float32",
          layers: Sequence[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate the intact model and each variant of one sweep kind; one compile for all of them.

    kind "removal": without layer l; "expansion": with an extra block after layer l (``init``).
    The intact baseline runs in the same compiled function (removal: all gates open;
    expansion: the extra slot gated to an identity), so a sweep is L+1 passes.
    Returns {"kind", "baseline", "layers": [per-variant metrics with drops], "wall_s",
    "compile_count", "passes", "first_pass_s"}.
    """
    if kind not in SWEEPS:
        raise ValueError(f"sweep kind: {kind!r} is not one of {list(SWEEPS)}")

    L = len(params["layers"])
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    rest, stacked = scoring.non_layer(params), scoring.stack_layers(params["layers"])
    if kind == "removal":
        base_slots, variant = scoring.identity_order(L), functools.partial(removal_slots, L)
    else:
        base_slots = expansion_slots(L, L - 1, "copy", identity=True)
        variant = functools.partial(expansion_slots, L, init=init)
    traces0 = sum(TRACES.values())
    t0 = time.perf_counter()
    base = scoring.score_slots(rest, stacked, base_slots, es, cfg, dtype).metrics(es)
    first = time.perf_counter() - t0
    rows = []
    bar = tqdm(layers, desc=f"{kind} sweep", unit="layer", disable=not progress, file=sys.stderr)
    for l in bar:
        m = scoring.score_slots(rest, stacked, variant(l), es, cfg, dtype).metrics(es)
        rows.append({"layer": l, **_drops(base, m)})
        if "ppl" in m:
            bar.set_postfix(ppl=f"{m['ppl']:.3g}")
    wall = time.perf_counter() - t0
    return {"kind": kind, "init": init if kind == "expansion" else None, "baseline": base, "layers": rows,
            "wall_s": wall, "first_pass_s": first, "passes": len(layers) + 1,
            "compile_count": sum(TRACES.values()) - traces0}


# ----------------------------------------------------------------------------- the profile
def run_importance(params: Params, es: EvalSet, cfg: ModelConfig, sweeps: Sequence[str] = SWEEPS,
                   init: str = "copy", max_block: int | None = None, dtype="float32",
                   progress: bool = True) -> dict[str, Any]:
    """Hidden-state metrics, then each requested sweep; returns the profile (JSON-ready except arrays)."""
    L = len(params["layers"])
    t0 = time.perf_counter()
    hidden = model_block_metrics(params, es, cfg, max_block, dtype)
    hidden_s = time.perf_counter() - t0
    results = {k: sweep(params, es, cfg, k, init=init, dtype=dtype, progress=progress) for k in sweeps}
    rows = []
    for l in range(L):
        row: dict[str, Any] = {"layer": l}
        for key in ("angular_last", "angular_mean", "bi"):
            row[key] = float(hidden["per_layer"][key][l])
        for kind, res in results.items():
            for key, val in res["layers"][l].items():
                if key != "layer":
                    row[f"{kind}_{key}"] = val
        rows.append(row)
    baseline = next(iter(results.values()))["baseline"] if results else \
        scoring.score_params(params, es, cfg, dtype).metrics(es)
    profile = {
        "num_layers": L, "eval": es.describe(), "baseline": baseline,
        "settings": {"expansion_init": init, "max_block": int(hidden["angular_last"].shape[0]),
                     "dtype": str(np.dtype(as_dtype(dtype))), "sweeps": list(sweeps)},
        "layers": rows,
        "block_matrix": {k: hidden[k] for k in ("angular_last", "angular_mean", "cos_mean")},
        "timing": {"hidden_metrics_s": hidden_s,
                   **{f"{k}_sweep_s": r["wall_s"] for k, r in results.items()},
                   **{f"{k}_first_pass_s": r["first_pass_s"] for k, r in results.items()}},
        "compiles": {k: r["compile_count"] for k, r in results.items()},
        "sweep_baselines": {k: r["baseline"] for k, r in results.items()},
    }
    profile["shape"] = shape_summary(rows)
    return profile


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties share their mean rank
        idx = np.where(x == v)[0]
        ranks[idx] = ranks[idx].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def shape_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """For each measure: first-half vs second-half mean, Spearman correlation with depth (all
    layers, and without the first and last layer, which are special in most models), argmax."""
    L = len(rows)
    out = {}
    for key in SHAPE_METRICS:
        if key not in rows[0]:
            continue
        v = np.array([r[key] for r in rows], np.float64)
        idx = np.arange(L)
        first, second = v[: L // 2].mean(), v[L // 2:].mean()
        out[key] = {"first_half_mean": float(first), "second_half_mean": float(second),
                    "spearman_vs_depth": spearman(idx, v),
                    "spearman_vs_depth_inner": spearman(idx[1:-1], v[1:-1]) if L > 3 else float("nan"),
                    "argmax_layer": int(np.nanargmax(v)),
                    "shallow_larger": bool(first > second)}
    return out


# ----------------------------------------------------------------------------- plan
def plan_scores(rows: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    """Per-layer importance (higher = more important) for :func:`surgery.from_profile`."""
    single = {"removal_nll": "removal_nll_increase", "removal_acc": "removal_acc_drop",
              "expansion_nll": "expansion_nll_increase", "expansion_acc": "expansion_acc_drop",
              "angular_mean": "angular_mean", "angular_last": "angular_last", "bi": "bi"}
    if metric == "combined":
        parts = [k for k in ("removal_nll_increase", "expansion_nll_increase", "angular_mean") if k in rows[0]]
        return np.mean([_ranks(np.array([r[k] for r in rows], np.float64)) for k in parts], axis=0) / (len(rows) - 1)
    if metric not in single:
        raise SlayerError(f"--plan-metric: {metric!r}; expected one of {list(PLAN_METRICS)}")
    key = single[metric]
    if key not in rows[0]:
        raise SlayerError(f"--plan-metric: {metric!r} needs the {key.split('_')[0]} sweep, which was not run; "
                          f"expected it in --sweeps or another --plan-metric")
    return np.array([r[key] for r in rows], np.float64)


def recommend_plan(profile: dict[str, Any], metric: str = "removal_nll", n_expand: int | None = None,
                   n_prune: int | None = None, region: str = "first_half", init: str = "average"):
    """A :class:`surgery.Plan` from the profile: expand after the most important layers of
    ``region``, prune the least important deep layers (never the final one). Defaults scale the
    paper's 8 new blocks and 2 pruned layers of 32: round(L/4) and round(L/16). Returns
    (plan, reasoning dict); the plan's ``notes`` carries the reasoning as text."""

    rows, L = profile["layers"], profile["num_layers"]
    n_expand = max(1, round(L / 4)) if n_expand is None else int(n_expand)
    n_prune = round(L / 16) if n_prune is None else int(n_prune)
    scores = plan_scores(rows, metric)
    try:
        plan = surgery.from_profile(scores.tolist(), n_expand, n_prune, keep_final=True, region=region, init=init)
    except ValueError as e:
        raise SlayerError(f"plan: {e}") from None
    shape = profile.get("shape", {})
    key = {"removal_nll": "removal_nll_increase", "removal_acc": "removal_acc_drop",
           "expansion_nll": "expansion_nll_increase", "expansion_acc": "expansion_acc_drop"}.get(metric, metric)
    sh = shape.get(key)
    shape_txt = (f"; on this profile the first half averages {sh['first_half_mean']:.4g} vs "
                 f"{sh['second_half_mean']:.4g} for the second (Spearman vs depth {sh['spearman_vs_depth']:+.2f})"
                 if sh else "")
    why = (f"slayer importance: importance = {metric} ({_METRIC_TEXT.get(metric, metric)}); higher = the model "
           f"loses more without it. {plan.notes}{shape_txt}. New blocks are inserted as identity "
           f"(o_proj/down_proj zeroed, init {init}), so the expanded model starts equal to the base; "
           f"pruning changes the function, so evaluate the pruned model before training.")
    plan = surgery.Plan.from_json({**plan.to_json(), "notes": why})
    reasoning = {"metric": metric, "metric_meaning": _METRIC_TEXT.get(metric, metric), "region": region,
                 "n_expand": n_expand, "n_prune": n_prune, "scores": [float(s) for s in scores],
                 "expand_after": list(plan.expand_after), "prune": list(plan.prune), "text": why}
    return plan, reasoning


_METRIC_TEXT = {
    "removal_nll": "increase of text NLL (log perplexity) when the layer is removed",
    "removal_acc": "drop of multiple-choice accuracy when the layer is removed",
    "expansion_nll": "increase of text NLL when a function-changing copy is inserted after the layer",
    "expansion_acc": "drop of multiple-choice accuracy when a copy is inserted after the layer",
    "angular_mean": "all-token mean angular distance between the layer's input and output",
    "angular_last": "last-token angular distance between the layer's input and output",
    "bi": "ShortGPT Block Influence, 1 - mean token cosine of the layer's input and output",
    "combined": "mean rank of removal NLL increase, expansion NLL increase and angular distance",
}


# ----------------------------------------------------------------------------- outputs
def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def plot_profile(profile: dict[str, Any], out_dir: Path, title: str = "") -> list[Path]:
    """importance_metrics.png, importance_drops.png, importance_blocks.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, L = profile["layers"], profile["num_layers"]
    x = np.arange(L)
    col = {k: np.array([r.get(k, np.nan) for r in rows], np.float64) for k in rows[0]}
    base = profile["baseline"]
    paths = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        _atomic_write(out_dir / name, buf.getvalue())
        paths.append(out_dir / name)

    has = {k: k in rows[0] for k in ("removal_nll", "expansion_nll", "removal_acc", "expansion_acc")}
    panels = [("angular distance", [("angular_last", "last token"), ("angular_mean", "all-token mean")], None),
              ("Block Influence (1 - mean cos)", [("bi", "BI")], None)]
    for kind in SWEEPS:
        if has[f"{kind}_nll"]:
            panels.append((f"{kind}: perplexity", [(f"{kind}_ppl", "without layer l" if kind == "removal"
                                                    else "copy after layer l")], ("ppl", "log")))
        if has[f"{kind}_acc"]:
            panels.append((f"{kind}: MCQ accuracy", [(f"{kind}_acc", "acc"), (f"{kind}_acc_norm", "acc_norm")],
                           ("acc", "linear")))
    ncol = 2
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 3.2 * nrow), squeeze=False)
    for ax, (name, series, ref) in zip(axes.flat, panels):
        for key, label in series:
            ax.plot(x, col[key], marker="o", ms=3, label=label)
        if ref is not None:
            ax.axhline(base[ref[0]], color="gray", ls="--", lw=1, label=f"intact ({base[ref[0]]:.3g})")
            ax.set_yscale(ref[1])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title} per-layer importance ({L} layers)".strip(), fontsize=11)
    fig.tight_layout()
    save(fig, "importance_metrics.png")

    if has["removal_nll"] or has["expansion_nll"]:
        kinds = [k for k in SWEEPS if has[f"{k}_nll"]]
        two = any(has[f"{k}_acc"] for k in kinds)
        fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 3.6), squeeze=False)
        ax = axes[0, 0]
        for k in kinds:
            ax.plot(x, col[f"{k}_nll_increase"], marker="o", ms=3, label=k)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_title("text NLL increase (log PPL ratio) vs intact", fontsize=10)
        if two:
            ax2 = axes[0, 1]
            for k in kinds:
                if has[f"{k}_acc"]:
                    ax2.plot(x, col[f"{k}_acc_drop"], marker="o", ms=3, label=k)
            ax2.axhline(0, color="gray", lw=1)
            ax2.set_title(f"MCQ accuracy drop vs intact (acc {base.get('acc', float('nan')):.3f})", fontsize=10)
        for a in axes.flat:
            a.set_xlabel("layer")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"{title} removal vs expansion (init {profile['settings']['expansion_init']})".strip(),
                     fontsize=11)
        fig.tight_layout()
        save(fig, "importance_drops.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, key, name in zip(axes.flat, ("angular_last", "angular_mean"), ("last token", "all-token mean")):
        m = np.asarray(profile["block_matrix"][key], np.float64)
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis",
                       extent=(-0.5, m.shape[1] - 0.5, 0.5, m.shape[0] + 0.5))
        ax.set_xlabel("start layer l")
        ax.set_ylabel("block size n")
        ax.set_title(f"angular distance d(x_l, x_l+n), {name}", fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save(fig, "importance_blocks.png")
    return paths


def write_outputs(profile: dict[str, Any], out_dir: str | Path, plan=None, reasoning: dict | None = None,
                  plots: bool = True, title: str = "") -> list[Path]:
    """importance.csv, importance.json, the plots and recommended_plan.json; each written atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlayerError(f"{out}: exists and is not a directory; expected an output directory for --out")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    _atomic_write(out / "importance.csv", to_csv(profile["layers"]))
    paths.append(out / "importance.csv")
    doc = dict(profile)
    if plan is not None:
        doc["plan"] = {"file": "recommended_plan.json", "plan": plan.to_json(), "reasoning": reasoning}
        _atomic_write(out / "recommended_plan.json", plan.dumps() + "\n")
        paths.append(out / "recommended_plan.json")
    _atomic_write(out / "importance.json", json.dumps(_jsonable(doc), indent=1) + "\n")
    paths.append(out / "importance.json")
    if plots:
        paths += plot_profile(profile, out, title)
    return paths


def format_table(profile: dict[str, Any]) -> str:
    rows = profile["layers"]
    cols = [c for c in ("angular_last", "angular_mean", "bi", "removal_ppl", "removal_acc", "expansion_ppl",
                        "expansion_acc") if c in rows[0]]
    lines = ["layer " + " ".join(f"{c:>13}" for c in cols)]
    for r in rows:
        lines.append(f"{r['layer']:>5} " + " ".join(f"{r[c]:>13.4g}" for c in cols))
    return "\n".join(lines)
