"""Layer surgery as pure functions on the params pytree, and the plans that drive it.

Transforms never mutate their input, and layers they do not touch keep the very same leaf
objects, so an expansion costs only the memory of the new blocks:

- :func:`remove_layers` drops layers;
- :func:`insert_layers` adds a block after given layers, initialised as a ``"copy"`` of layer i
  (LLaMA Pro) or the ``"average"`` of layers i and i+1 (SLayer), with ``o_proj`` and
  ``down_proj`` (and their biases) zeroed so the block starts as an exact identity;
- :func:`reinit_layer` replaces a layer by the average of itself and its successor.

A :class:`Plan` is a small frozen, JSON-serialisable record of what to do, always in the
*original* model's layer numbering. :func:`apply_plan` runs it and returns the new params, a
trainable mask of the same tree structure, and a layer map saying where each new layer came
from. The mask is derived from each layer's provenance in that map (inserted / refreshed),
never from matching names, so ``layers.2`` can never select ``layers.20``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slayer_jax.errors import SlayerError, first_line
from slayer_jax.modeling.model import Params
from slayer_jax.storage import as_path

INITS = ("average", "copy")
# A new block's init when none is given follows the plan's kind: the S strategy (shallow) averages
# the two neighbouring layers; LLaMA Pro (uniform) copies the layer it follows.
DEFAULT_INIT = {"shallow": "average", "uniform": "copy"}


def default_init(kind: str) -> str:
    """The init a ``kind`` of plan uses unless told otherwise (:data:`DEFAULT_INIT`)."""
    return DEFAULT_INIT.get(kind, "average")
PRUNE_MODES = ("deepest", "keep_last")
ZEROED = ("o_proj", "down_proj")  # the residual-branch outputs: zero => the block is an identity


# ----------------------------------------------------------------------------- transforms
def _check_indices(name: str, indices: Sequence[int], n: int) -> list[int]:
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name}: index {bad[0]} is out of range for a model with {n} layers")
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        raise ValueError(f"{name}: duplicate index {dup}")
    return idx


def _with_layers(params: Params, layers: list) -> Params:
    out = dict(params)  # shallow: embed / norm / lm_head keep their very objects
    out["layers"] = layers
    return out


def remove_layers(params: Params, indices: Sequence[int]) -> Params:
    n = len(params["layers"])
    drop = set(_check_indices("remove_layers", indices, n))
    if len(drop) == n and n > 0:
        raise ValueError(f"remove_layers: removing all {n} layers leaves no model")
    return _with_layers(params, [layer for i, layer in enumerate(params["layers"]) if i not in drop])


# ----------------------------------------------------------------------------- the new-block rule
# The one definition of a new block, used by surgery below and by the importance sweeps
# (scoring's slots build their variants with these two functions, on stacked layers).
def block_sources(n_layers: int, after: int, init: str) -> tuple[int, int]:
    """Which two layers a block inserted after layer ``after`` is the mean of: ``"copy"`` is
    (after, after); ``"average"`` is (after, after + 1), a copy for the last layer."""
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {list(INITS)}")
    return (after, after + 1) if init == "average" and after + 1 < n_layers else (after, after)


def build_block(a: Params, b: Params, outputs: Any = True) -> Params:
    """The mean of layers ``a`` and ``b`` (in fp32, cast back; a == b gives a bit-exact copy),
    with its residual-branch outputs (:data:`ZEROED`) kept (``True``), zeroed (``False``: the
    block is an exact identity) or scaled by a traced gate (the sweeps; gate 0 zeroes them)."""
    block = jax.tree_util.tree_map(
        lambda x, y: ((x.astype(jnp.float32) + y.astype(jnp.float32)) / 2).astype(x.dtype), a, b)
    if outputs is True:
        return block
    block = dict(block)
    for role in ZEROED:
        if outputs is False:
            block[role] = jax.tree_util.tree_map(jnp.zeros_like, block[role])
        else:
            block[role] = jax.tree_util.tree_map(
                lambda w: jnp.where(outputs == 0, jnp.zeros_like(w), w * jnp.asarray(outputs).astype(w.dtype)),
                block[role])
    return block


def new_block(params: Params, after: int, init: str = "average", identity: bool = True) -> tuple[Params, tuple]:
    """The block to insert after layer ``after``, and the layers it was built from."""
    layers = params["layers"]
    i, j = block_sources(len(layers), after, init)
    if init == "average" and i == j:
        warnings.warn(f"insert_layers: no layer after {after} to average with; using a copy of layer {after}",
                      stacklevel=3)
    return build_block(layers[i], layers[j], outputs=not identity), tuple(sorted({i, j}))


def insert_layers(params: Params, after: Sequence[int], init: str = "average", identity: bool = True) -> Params:
    """Insert one new block after each original layer in ``after`` (original numbering)."""
    n = len(params["layers"])
    after = set(_check_indices("insert_layers", after, n))
    out = []
    for i, layer in enumerate(params["layers"]):
        out.append(layer)
        if i in after:
            out.append(new_block(params, i, init, identity)[0])
    return _with_layers(params, out)


def reinit_layer(params: Params, i: int, init: str = "average") -> Params:
    """Replace layer ``i`` by the average of layers i and i+1 (or a fresh copy of itself)."""
    n = len(params["layers"])
    (i,) = _check_indices("reinit_layer", [i], n)
    if init == "average" and i + 1 >= n:
        raise ValueError(f"reinit_layer: layer {i} is the last of {n}; there is no layer {i + 1} to average with")
    block, _ = new_block(params, i, init, identity=False)
    layers = list(params["layers"])
    layers[i] = block
    return _with_layers(params, layers)


# ----------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do to an ``num_layers``-layer model, in its original layer numbering.

    expand_after: a new block goes after each of these layers.
    prune: these layers are removed.
    refresh: these layers are re-initialised as the average of layers i and i+1 (taken before
        pruning) and made trainable: the paper's refreshed last layer.
    """

    num_layers: int
    expand_after: tuple[int, ...] = ()
    prune: tuple[int, ...] = ()
    refresh: tuple[int, ...] = ()
    init: str = "average"
    identity: bool = True
    train_embed: bool = False
    train_norm: bool = False
    train_head: bool = False
    lora_rank: int = 0  # > 0: a LoRA adapter of this rank on every projection of every frozen layer
    lora_alpha: float = 16.0  # adapter output scale alpha / rank
    name: str = "explicit"
    notes: str = ""

    def __post_init__(self):
        for f in ("expand_after", "prune", "refresh"):
            object.__setattr__(self, f, tuple(sorted(int(i) for i in getattr(self, f))))
        self.validate()

    @property
    def num_new_layers(self) -> int:
        return self.num_layers + len(self.expand_after) - len(self.prune)

    def validate(self) -> None:
        L = self.num_layers
        if not isinstance(L, int) or L <= 0:
            raise ValueError(f"num_layers: expected a positive integer, got {L!r}")
        for name in ("expand_after", "prune", "refresh"):
            _check_indices(f"plan.{name}", getattr(self, name), L)
        if len(self.prune) >= L:
            raise ValueError(f"plan.prune: pruning {len(self.prune)} of {L} layers leaves no original layer")
        if self.init not in INITS:
            raise ValueError(f"plan.init: {self.init!r} is not one of {list(INITS)}")
        for i in self.refresh:
            if i in self.prune:
                raise ValueError(f"plan.refresh: layer {i} is also pruned")
            if i + 1 >= L:
                raise ValueError(f"plan.refresh: layer {i} has no successor to average with")
        for i in self.expand_after:
            if i in self.prune:
                raise ValueError(f"plan.expand_after: layer {i} is pruned; a block after it would lose its anchor")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"plan.lora_rank: expected an integer >= 0, got {self.lora_rank!r}")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not self.lora_alpha > 0 or not math.isfinite(self.lora_alpha)):
            raise ValueError(f"plan.lora_alpha: expected a positive number, got {self.lora_alpha!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"plan: unknown field {unknown[0]!r}; expected some of {sorted(fields)}")
        if "num_layers" not in d:
            raise ValueError("plan: field 'num_layers' is missing")
        for f in ("expand_after", "prune", "refresh"):
            v = d.get(f, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ValueError(f"plan: field '{f}' is {v!r}; expected a list of layer numbers")
        for f in ("identity", "train_embed", "train_norm", "train_head"):
            if f in d and not isinstance(d[f], bool):
                raise ValueError(f"plan: field '{f}' is {d[f]!r}; expected true or false")
        if "lora_rank" in d and (isinstance(d["lora_rank"], bool) or not isinstance(d["lora_rank"], int)):
            raise ValueError(f"plan: field 'lora_rank' is {d['lora_rank']!r}; expected an integer >= 0")
        if "lora_alpha" in d and (isinstance(d["lora_alpha"], bool) or not isinstance(d["lora_alpha"], (int, float))):
            raise ValueError(f"plan: field 'lora_alpha' is {d['lora_alpha']!r}; expected a positive number")
        for f in ("init", "name", "notes"):
            if f in d and not isinstance(d[f], str):
                raise ValueError(f"plan: field '{f}' is {d[f]!r}; expected a string")
        if isinstance(d["num_layers"], bool) or not isinstance(d["num_layers"], int):
            raise ValueError(f"plan: field 'num_layers' is {d['num_layers']!r}; expected a positive integer")
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _spread(region: int, n: int) -> list[int]:
    """n positions evenly over ``region`` layers: after layer k*(region//n) - 1, k = 1..n."""
    split = region // n
    return [k * split - 1 for k in range(1, n + 1)]


def uniform(L: int, n: int, init: str = DEFAULT_INIT["uniform"], **kw) -> Plan:
    """LLaMA Pro: with split = L // n, a new block after each layer k*split - 1 (k = 1..n)."""
    if not 0 < n <= L:
        raise ValueError(f"n_expand: {n} must be between 1 and the layer count {L}")
    return Plan(L, expand_after=tuple(_spread(L, n)), init=init, name="uniform",
                notes=f"LLaMA Pro uniform expansion: split={L // n}", **kw)


def prune_layers(L: int, n_prune: int, mode: str | Sequence[int] = "deepest") -> tuple[int, ...]:
    """Which layers to prune: the deepest n, the n just below the kept final layer, or a list."""
    if not isinstance(mode, str):
        idx = tuple(_check_indices("prune", mode, L))
        if n_prune and len(idx) != n_prune:
            raise ValueError(f"prune: {len(idx)} explicit indices given but n_prune={n_prune}")
        return idx
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune mode: {mode!r} is not one of {list(PRUNE_MODES)} or a list of indices")
    if not 0 <= n_prune < L - (1 if mode == "keep_last" else 0):
        raise ValueError(f"n_prune: {n_prune} does not fit a {L}-layer model with mode {mode!r}")
    if mode == "deepest":
        return tuple(range(L - n_prune, L))
    return tuple(range(L - 1 - n_prune, L - 1))


def shallow(L: int, n_expand: int, n_prune: int = 0, prune: str | Sequence[int] = "deepest",
            refresh_last: bool = False, half: int | None = None, init: str = "average", **kw) -> Plan:
    """The SLayer S strategy: ``n_expand`` averaged identity blocks spread over the first half
    (after layer k*(half//n) - 1), ``n_prune`` deep layers removed, optionally the new last
    layer refreshed (average of itself and the pruned layer after it) and trainable.

    For L=32, n_expand=8, n_prune=2 this is the paper: blocks after 1, 3, ..., 15 (indices
    2, 5, ..., 23 of 40), layers 30 and 31 pruned, 38 layers; refresh_last refreshes layer 29.
    """
    half = L // 2 if half is None else half
    if not 0 < n_expand <= half:
        raise ValueError(f"n_expand: {n_expand} new blocks do not fit the first half ({half} layers) of a "
                         f"{L}-layer model")
    pruned = prune_layers(L, n_prune, prune)
    refresh: tuple[int, ...] = ()
    if refresh_last:
        kept = [i for i in range(L) if i not in pruned]
        last = kept[-1]
        if last + 1 >= L:
            raise ValueError("refresh_last: the final layer is kept, so there is no pruned successor to average "
                             "with; use prune='deepest'")
        refresh = (last,)
    return Plan(L, expand_after=tuple(_spread(half, n_expand)), prune=pruned, refresh=refresh, init=init,
                name="shallow", notes=f"S strategy: {n_expand} blocks over the first {half} layers, "
                f"prune {list(pruned)}", **kw)


def explicit(L: int, expand_after: Sequence[int] = (), prune: Sequence[int] = (), refresh: Sequence[int] = (),
             init: str = "average", **kw) -> Plan:
    return Plan(L, expand_after=tuple(expand_after), prune=tuple(prune), refresh=tuple(refresh), init=init,
                name="explicit", **kw)


def from_profile(importance: Sequence[float], n_expand: int, n_prune: int = 0, keep_final: bool = True,
                 region: str = "first_half", init: str = "average", **kw) -> Plan:
    """Placement from a measured per-layer importance profile (higher = more important).

    New blocks go after the ``n_expand`` most important layers of ``region`` ("first_half" or
    "all"); the ``n_prune`` least important layers of the second half are pruned, never the
    final layer when ``keep_final``. The reasoning is written into ``notes``.
    """
    L = len(importance)
    scores = [float(s) for s in importance]
    cand = list(range(L // 2)) if region == "first_half" else list(range(L))
    if region not in ("first_half", "all"):
        raise ValueError(f"region: {region!r} is not 'first_half' or 'all'")
    if not 0 < n_expand <= len(cand):
        raise ValueError(f"n_expand: {n_expand} does not fit the {len(cand)} candidate layers of {region!r}")
    expand = sorted(sorted(cand, key=lambda i: -scores[i])[:n_expand])
    deep = [i for i in range(L // 2, L) if not (keep_final and i == L - 1)]
    if n_prune > len(deep):
        raise ValueError(f"n_prune: {n_prune} exceeds the {len(deep)} prunable deep layers")
    pruned = sorted(sorted(deep, key=lambda i: scores[i])[:n_prune])
    notes = (f"expand after the {n_expand} most important layers of {region}: "
             + ", ".join(f"{i} ({scores[i]:.4g})" for i in expand)
             + (f"; prune the {n_prune} least important deep layers: "
                + ", ".join(f"{i} ({scores[i]:.4g})" for i in pruned) if n_prune else ""))
    return Plan(L, expand_after=tuple(expand), prune=tuple(pruned), init=init, name="from_profile", notes=notes, **kw)


PLAN_KINDS = ("none", "shallow", "uniform", "lora", "file", "from_model")


def plan_from(kind: str, num_layers: int, *, expand: int = 0, prune: int = 0, prune_mode: str = "deepest",
              prune_layers: Sequence[int] = (), refresh_last: bool = False, init: str = "", file: str = "",
              train_head: bool = False, lora_rank: int = 0, lora_alpha: float = 16.0) -> Plan | None:
    """The plan a ``kind`` names (``slayer surgery``'s flags and ``slayer train``'s plan block
    both come here): ``shallow`` (S strategy), ``uniform`` (LLaMA Pro), ``lora`` (no new layers: a
    rank-``lora_rank`` adapter on every frozen projection), ``file`` (a plan .json or a record);
    ``none`` and ``from_model`` (no new surgery) give None. ``init`` "" is the kind's own. A
    ``lora_rank`` > 0 adds adapters to the frozen layers of a shallow or uniform plan too."""

    if kind in ("none", "from_model", None):
        return None
    if kind == "lora":
        if lora_rank <= 0:
            raise ValueError(f"plan.lora_rank: {lora_rank}; the lora plan needs a rank >= 1")
        return Plan(num_layers, lora_rank=int(lora_rank), lora_alpha=float(lora_alpha), train_head=train_head,
                    name="lora", notes=f"LoRA baseline: rank {lora_rank}, alpha {lora_alpha:g}, every projection")
    if lora_rank:
        kw_lora = {"lora_rank": int(lora_rank), "lora_alpha": float(lora_alpha)}
    else:
        kw_lora = {}
    init = init or default_init(kind)
    kw = ({"train_head": True} if train_head else {}) | kw_lora
    if kind == "shallow":
        prune_arg = list(prune_layers) if prune_layers else prune_mode
        return shallow(num_layers, expand, len(prune_layers) if prune_layers else prune, prune=prune_arg,
                       refresh_last=refresh_last, init=init, **kw)
    if kind == "uniform":
        return uniform(num_layers, expand, init=init, **kw)
    if kind == "file":
        path = Path(file)
        if not path.is_file():
            raise SlayerError(f"{path}: plan file not found; expected a plan .json (or an exported config.json)")
        try:
            d = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:  # not JSON or UTF-8, a 4300-digit number, nested too deeply
            raise SlayerError(f"{path}: not valid JSON ({first_line(e)[:100]})") from None
        d = d.get(RECORD_KEY, d) if isinstance(d, dict) else d  # an exported config.json: its record
        d = d.get("plan", d) if isinstance(d, dict) else d
        if not isinstance(d, dict):
            raise SlayerError(f"{path}: plan: expected an object with num_layers, expand_after, prune, ...")
        try:
            return Plan.from_json(d)
        except (TypeError, ValueError) as e:
            raise SlayerError(f"{path}: {e}") from None
    raise ValueError(f"plan.kind: {kind!r} is not one of {list(PLAN_KINDS)}")


def prepare_for_training(params: Params, plan: Plan | None, *, record: Record | None = None,
                         full_finetune: bool = False) -> tuple[Params, Params, list[dict[str, Any]]]:
    """(params, trainable mask, layer map) to train: ``plan`` applied; else the model's own
    ``record`` (an exported expanded model: train on what it records as trainable, no new
    surgery); else the whole model. ``full_finetune`` makes everything trainable either way."""
    if plan is not None:
        params = apply_plan(params, plan)[0]
    return (params, *training_mask(params, plan, record=record, full_finetune=full_finetune))


def training_mask(params: Params, plan: Plan | None, *, record: Record | None = None,
                  full_finetune: bool = False) -> tuple[Params, list[dict[str, Any]]]:
    """The mask and layer map of :func:`prepare_for_training`, over the params after the plan
    (arrays or shapes: nothing is computed)."""
    if plan is not None:
        lmap = layer_map(plan)
        mask = trainable_mask(params, [r["trainable"] for r in lmap], plan.train_embed, plan.train_norm,
                              plan.train_head, adapters=bool(plan.lora_rank))
    elif record is not None:
        mask, lmap = record.mask(params), [dict(r) for r in record.layer_map]
    else:
        lmap = original_layer_map(len(params["layers"]), trainable=True)
        mask = jax.tree_util.tree_map(lambda _: True, params)
    if full_finetune:
        mask = jax.tree_util.tree_map(lambda _: True, params)
        lmap = [dict(r, trainable=True) for r in lmap]
    return mask, lmap


# ----------------------------------------------------------------------------- apply
def layer_map(plan: Plan) -> list[dict[str, Any]]:
    """For each layer of the new model: its index, kind, source layers (original numbering)
    and whether it is trainable."""
    out: list[dict[str, Any]] = []
    prune, refresh, after = set(plan.prune), set(plan.refresh), set(plan.expand_after)
    L = plan.num_layers
    for i in range(L):
        if i not in prune:
            if i in refresh:
                out.append({"kind": "refreshed", "from": [i, i + 1], "trainable": True})
            else:
                out.append({"kind": "original", "from": [i], "trainable": False}
                           | ({"adapter": plan.lora_rank} if plan.lora_rank else {}))
        if i in after:
            src = sorted(set(block_sources(L, i, plan.init)))
            out.append({"kind": "inserted", "from": src, "trainable": True})
    for j, rec in enumerate(out):
        rec["index"] = j
    return out


def trainable_mask(params: Params, layers_trainable: Sequence[bool], train_embed: bool = False,
                   train_norm: bool = False, train_head: bool = False, adapters: bool = False) -> Params:
    """A bool pytree over ``params``: whole layers by the given flags, the rest by role; with
    ``adapters``, every LoRA factor (role ``lora_a`` / ``lora_b``) as well."""
    if len(layers_trainable) != len(params["layers"]):
        raise ValueError(f"mask: {len(layers_trainable)} layer flags for {len(params['layers'])} layers")
    role = {"embed": train_embed, "norm": train_norm, "lm_head": train_head}
    mask: Params = {k: jax.tree_util.tree_map(lambda _: bool(role[k]), v) for k, v in params.items() if k != "layers"}
    mask["layers"] = [jax.tree_util.tree_map_with_path(
        lambda path, _, t=bool(t): t or (adapters and getattr(path[-1], "key", None) in ADAPTER_FACTORS), layer)
        for layer, t in zip(params["layers"], layers_trainable)]
    return mask


# ----------------------------------------------------------------------------- LoRA adapters
ADAPTER_FACTORS = ("lora_a", "lora_b")  # the trainable factors; "lora_scale" (alpha / rank) stays frozen
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_adapters(layer: Params, rank: int, alpha: float, key: jax.Array) -> Params:
    """The layer with a LoRA adapter on each projection: ``lora_a`` [in, rank] ~ N(0, 1/in),
    ``lora_b`` [rank, out] zeros (so the layer computes exactly what it did), ``lora_scale`` =
    alpha / rank. The kernel and everything else keep their very leaf objects."""
    out = dict(layer)
    for j, name in enumerate(PROJECTIONS):
        kernel = layer[name]["kernel"]
        d_in, d_out = kernel.shape
        a = jax.random.normal(jax.random.fold_in(key, j), (d_in, rank), jnp.float32) / np.sqrt(d_in)
        out[name] = dict(layer[name], lora_a=a.astype(kernel.dtype), lora_b=jnp.zeros((rank, d_out), kernel.dtype),
                         lora_scale=jnp.asarray(alpha / rank, jnp.float32))
    return out



def apply_plan(params: Params, plan: Plan) -> tuple[Params, Params, list[dict[str, Any]]]:
    """Run ``plan``: returns (new_params, trainable_mask, layer_map)."""
    n = len(params["layers"])
    if n != plan.num_layers:
        raise ValueError(f"plan.num_layers: the plan is for {plan.num_layers} layers but the model has {n}")
    old = params["layers"]
    refreshed = {i: new_block(params, i, "average", identity=False)[0] for i in plan.refresh}
    layers = []
    lmap = layer_map(plan)
    for rec in lmap:
        if rec["kind"] == "original":
            layers.append(old[rec["from"][0]])
        elif rec["kind"] == "refreshed":
            layers.append(refreshed[rec["from"][0]])
        else:
            layers.append(new_block(params, rec["from"][0], plan.init, plan.identity)[0])
    if plan.lora_rank:
        key = jax.random.PRNGKey(0)
        layers = [add_adapters(layer, plan.lora_rank, plan.lora_alpha, jax.random.fold_in(key, j))
                  if rec.get("adapter") else layer for j, (layer, rec) in enumerate(zip(layers, lmap))]
    new_params = _with_layers(params, layers)
    return new_params, training_mask(new_params, plan)[0], lmap


# ----------------------------------------------------------------------------- the record
# How a model was made, under config.json's "slayer" key: written by `slayer surgery`, by
# `slayer train`'s export, and carried through `slayer convert` / `slayer export`; read back by
# :func:`read_record`. One writer (:func:`surgery_record`), one reader, for every path.
RECORD_KEY = "slayer"
REST = ("embed", "norm", "lm_head")  # what is trainable besides whole layers, by role
KINDS = ("original", "inserted", "refreshed")
# The optimizer's parameter groups (training.step.param_groups): a leaf's provenance, the kind of its
# layer in the layer map, or its role: a LoRA factor, or what it is outside the layers.
GROUPS = (*KINDS, "adapter", *REST)


def original_layer_map(n_layers: int, trainable: bool) -> list[dict[str, Any]]:
    """The layer map of a model trained as it is (no surgery)."""
    return [{"index": i, "kind": "original", "from": [i], "trainable": trainable} for i in range(n_layers)]


def surgery_record(plan: Plan | None, lmap: list[dict[str, Any]], mask: Params | None = None,
                   trained_steps: int = 0) -> dict[str, Any]:
    """The record to store (JSON). ``mask``: the trainable mask, whose embed / norm / lm_head flags
    are recorded (default: the plan's ``train_*`` flags)."""
    if mask is not None:
        rest = {k: bool(jax.tree_util.tree_leaves(mask[k])) and all(jax.tree_util.tree_leaves(mask[k]))
                for k in REST if k in mask}
    else:
        rest = {"embed": bool(plan and plan.train_embed), "norm": bool(plan and plan.train_norm),
                "lm_head": bool(plan and plan.train_head)}
    return json.loads(json.dumps({  # plain JSON types, as read back
        "plan": plan.to_json() if plan else None, "layer_map": lmap,
        "trainable_layers": [r["index"] for r in lmap if r["trainable"]], "trainable_rest": rest,
        "trained_steps": int(trained_steps)}))


@dataclasses.dataclass(frozen=True)
class Record:
    """A model's record, read back: its plan (None: trained without surgery), layer map, what
    else is trainable, and how many steps it was trained."""

    plan: Plan | None
    layer_map: list[dict[str, Any]]
    trainable_rest: dict[str, bool]
    trained_steps: int

    def mask(self, params: Params) -> Params:
        """The trainable mask it records, over ``params``."""
        if len(self.layer_map) != len(params["layers"]):
            raise ValueError(f"slayer.layer_map: {len(self.layer_map)} entries but the model has "
                             f"{len(params['layers'])} layers")
        return trainable_mask(params, [r["trainable"] for r in self.layer_map],
                              *(self.trainable_rest.get(k, False) for k in REST))

    def to_json(self) -> dict[str, Any]:
        return surgery_record(self.plan, self.layer_map, trained_steps=self.trained_steps) | {
            "trainable_rest": dict(self.trainable_rest)}


def _record_error(where: str, field: str, expected: str) -> SlayerError:
    return SlayerError(f"{where}: {RECORD_KEY}.{field}: expected {expected}")


def parse_record(d: Any, where: str = "config.json") -> Record:
    """Check and read a stored record (the JSON under the ``slayer`` key)."""
    if not isinstance(d, dict):
        raise _record_error(where, "", "an object")
    lmap = d.get("layer_map")
    if not isinstance(lmap, list) or not lmap:
        raise _record_error(where, "layer_map", "a non-empty list of layers")
    for j, r in enumerate(lmap):
        ok = (isinstance(r, dict) and type(r.get("index")) is int and r["index"] == j and r.get("kind") in KINDS
              and isinstance(r.get("trainable"), bool) and isinstance(r.get("from"), list)
              and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in r["from"]))
        if not ok:
            raise _record_error(where, f"layer_map[{j}]", f'{{"index": {j}, "kind": one of {list(KINDS)}, '
                                f'"from": [layer numbers], "trainable": true|false}}')
    plan = None
    if d.get("plan") is not None:
        if not isinstance(d["plan"], dict):
            raise _record_error(where, "plan", "an object or null")
        try:
            plan = Plan.from_json(d["plan"])
        except (TypeError, ValueError) as e:
            raise _record_error(where, "plan", f"a valid plan ({e})") from None
    rest = d.get("trainable_rest")
    if rest is None:  # records written before trainable_rest: the plan's flags
        rest = {"embed": bool(plan and plan.train_embed), "norm": bool(plan and plan.train_norm),
                "lm_head": bool(plan and plan.train_head)}
    if not isinstance(rest, dict) or not all(k in REST and isinstance(v, bool) for k, v in rest.items()):
        raise _record_error(where, "trainable_rest", f"an object of {list(REST)} -> true|false")
    steps = d.get("trained_steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise _record_error(where, "trained_steps", "an integer >= 0")
    return Record(plan, [dict(r) for r in lmap], dict(rest), steps)


def read_record(model: Any) -> Record | None:
    """The record of a model directory (HF export or slayer checkpoint, local or gs://), or None
    for a model without one (as downloaded, a GGUF file)."""

    path = as_path(model) / "config.json"
    try:
        if not path.exists():
            return None
        d = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None  # unreadable configs are the importer's to report
    if not isinstance(d, dict) or d.get(RECORD_KEY) is None:
        return None
    return parse_record(d[RECORD_KEY], str(path))


def record_config(record: Record | dict | None) -> dict | None:
    """The ``extra_config`` that stores ``record`` in an exported config.json."""
    if record is None:
        return None
    return {RECORD_KEY: record.to_json() if isinstance(record, Record) else record}


def format_layer_map(lmap) -> str:
    rows = [f"{'new':>4}  {'kind':<10} {'from (original)':<16} trainable"]
    for r in lmap:
        src = " avg ".join(map(str, r["from"]))
        rows.append(f"{r['index']:>4}  {r['kind']:<10} {src:<16} {'yes' if r['trainable'] else ''}")
    return "\n".join(rows)


def count_trainable(params: Params, mask: Params) -> int:

    return int(sum(np.prod(p.shape) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(mask)) if m))


def restore(params: Params, model_dir) -> tuple[Plan | None, Params, list[dict[str, Any]]] | None:
    """(plan, trainable_mask, layer_map) of an imported model with a record, or None if it has none."""
    record = read_record(model_dir)
    if record is None:
        return None
    return record.plan, record.mask(params), record.layer_map
