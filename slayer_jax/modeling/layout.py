"""The frozen tree's scan layout: runs of identical frozen layers stored stacked, so the train step
compiles one loop body per run instead of one block per layer.

The model's layer stack is a plain list (``params["layers"]``) everywhere users see it: surgery,
checkpoints, export, the trainable tree and its optimizer state. Only the *frozen* tree that the
jitted step reads is converted, once and on device, into the scan layout:

    frozen["layers"] = [layer, layer, {"stacked": run}, layer, {"stacked": run}, layer]

where ``run`` is a layer dict whose leaves carry a leading axis k (the k consecutive layers it
replaces, in order). A run is a maximal stretch of >= 2 consecutive *fully* frozen layers of equal
structure (same keys, shapes and dtypes) -- e.g. the deep frozen tail of the S strategy and the
"frozen, frozen" pairs between new blocks. Stacked leaves are sharded like their layers' leaves
with a leading unsplit axis (:mod:`slayer_jax.parallel.sharding`, by the ``"stacked"`` key, never by layer
index). :func:`slayer_jax.modeling.model.forward` runs a stacked entry as ``jax.lax.scan`` of the same block
function; :func:`merge_for_forward` combines the list-layout trainable tree (``None`` where frozen)
with a scan-layout frozen tree. Stacking inside the jitted step instead would copy the frozen
weights every step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from slayer_jax.parallel.sharding import STACKED

Params = dict[str, Any]
Runs = tuple[tuple[int, int], ...]  # (first layer index, length) per stacked run, ascending


def _is_none(x: Any) -> bool:
    return x is None


def is_stacked(entry: Any) -> bool:
    """A ``params["layers"]`` entry that holds a stacked run of layers."""
    return isinstance(entry, dict) and len(entry) == 1 and STACKED in entry


def is_scan_layout(tree: Params) -> bool:
    return any(is_stacked(e) for e in tree.get("layers", ()))


def run_length(entry: Params) -> int:
    return int(jax.tree_util.tree_leaves(entry[STACKED])[0].shape[0])


def _fully_frozen(layer: Params) -> bool:
    leaves = jax.tree_util.tree_leaves(layer, is_leaf=_is_none)
    return bool(leaves) and all(x is not None for x in leaves)


def _signature(layer: Params):
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def scan_runs(frozen_layers: Sequence[Params], min_len: int = 2) -> Runs:
    """Maximal runs of >= ``min_len`` consecutive fully frozen layers with the same structure,
    as ``((start, length), ...)``. Works on arrays or ShapeDtypeStructs (shapes only)."""
    runs, i, n = [], 0, len(frozen_layers)
    while i < n:
        if not _fully_frozen(frozen_layers[i]):
            i += 1
            continue
        sig, j = _signature(frozen_layers[i]), i + 1
        while j < n and _fully_frozen(frozen_layers[j]) and _signature(frozen_layers[j]) == sig:
            j += 1
        if j - i >= min_len:
            runs.append((i, j - i))
        i = j
    return tuple(runs)


def _relayout(frozen: Params, runs: Runs, stack) -> Params:
    layers, out, i = frozen["layers"], [], 0
    for start, k in runs:
        out.extend(layers[i:start])
        out.append({STACKED: jax.tree_util.tree_map(lambda *xs: stack(xs), *layers[start:start + k])})
        i = start + k
    out.extend(layers[i:])
    return {**frozen, "layers": out}


def to_scan_layout(frozen: Params, runs: Runs | None = None) -> Params:
    """The scan layout of a list-layout frozen tree (``runs``: default :func:`scan_runs`). Arrays are
    stacked (a copy: do it once, e.g. jitted with the stacked shardings as ``out_shardings``);
    ShapeDtypeStructs give ShapeDtypeStructs (without shardings)."""
    if is_scan_layout(frozen):
        raise ValueError("to_scan_layout: the tree is already in the scan layout")
    runs = scan_runs(frozen["layers"]) if runs is None else tuple(runs)

    def stack(xs):
        if isinstance(xs[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
        return jnp.stack(xs)

    return _relayout(frozen, runs, stack)


def from_scan_layout(frozen: Params) -> Params:
    """The list layout back (a tree already in the list layout is returned as it is)."""
    out = []
    for e in frozen["layers"]:
        if is_stacked(e):
            out.extend(jax.tree_util.tree_map(lambda x, i=i: x[i], e[STACKED]) for i in range(run_length(e)))
        else:
            out.append(e)
    return {**frozen, "layers": out}


def runs_of(frozen: Params) -> Runs:
    """The runs a scan-layout tree holds, in list-layout layer indices."""
    runs, i = [], 0
    for e in frozen["layers"]:
        k = run_length(e) if is_stacked(e) else 1
        if is_stacked(e):
            runs.append((i, k))
        i += k
    return tuple(runs)


def _merge(trainable: Any, frozen: Any) -> Any:
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def merge_for_forward(trainable: Params, frozen: Params) -> Params:
    """The params :func:`slayer_jax.modeling.model.forward` reads: a list-layout ``trainable`` (``None`` where
    frozen) merged with ``frozen`` in either layout. A stacked run is passed through as it is; the
    trainable layers it stands for must be all ``None``."""
    if not is_scan_layout(frozen):
        return _merge(trainable, frozen)
    out = _merge({**trainable, "layers": []}, {**frozen, "layers": []})
    layers, i, tl = [], 0, trainable["layers"]
    for e in frozen["layers"]:
        if is_stacked(e):
            k = run_length(e)
            if any(x is not None for x in jax.tree_util.tree_leaves(tl[i:i + k], is_leaf=_is_none)):
                raise ValueError(f"merge_for_forward: layers {i}..{i + k - 1} are stacked as frozen but "
                                 f"have trainable leaves")
            layers.append(e)
            i += k
        else:
            layers.append(_merge(tl[i], e))
            i += 1
    if i != len(tl):
        raise ValueError(f"merge_for_forward: frozen covers {i} layers, trainable has {len(tl)}")
    out["layers"] = layers
    return out


# ----------------------------------------------------------------------------- the step's frozen input
class FrozenLayoutStep:
    """The jitted train step of :func:`slayer_jax.training.train.build_step` with the frozen layout it takes.

    ``runs`` (possibly empty: the list layout) and ``shardings`` (the frozen tree's shardings in that
    layout) are fixed when the step is built. ``lower`` accepts the frozen tree (arrays or
    ShapeDtypeStructs) in either layout; calling the step needs the frozen tree in its layout:
    convert it once with :meth:`to_step_layout` (on device) and back with :meth:`to_list_layout`."""

    def __init__(self, jitted, runs: Runs, shardings: Any, list_shardings: Any):
        self.jitted, self.runs, self.shardings, self.list_shardings = jitted, tuple(runs), shardings, list_shardings
        self._to_step = self._to_list = None

    def _abstract(self, frozen: Params) -> Params:
        if not self.runs or is_scan_layout(frozen):
            return frozen
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      to_scan_layout(jax.eval_shape(lambda t: t, frozen), self.runs), self.shardings)

    def lower(self, state, frozen, batch):
        return self.jitted.lower(state, self._abstract(frozen), batch)

    def __call__(self, state, frozen, batch):
        if self.runs and not is_scan_layout(frozen):
            raise ValueError("the step takes the frozen tree in the scan layout: convert it once with "
                             "program.step.to_step_layout(frozen)")
        return self.jitted(state, frozen, batch)

    def to_step_layout(self, frozen: Params) -> Params:
        """The frozen tree in the step's layout, stacked on device into the stacked shardings (a copy
        of the stacked layers: until the caller drops the list-layout tree both are held)."""
        if not self.runs or is_scan_layout(frozen):
            return frozen
        if self._to_step is None:
            self._to_step = jax.jit(functools.partial(to_scan_layout, runs=self.runs), out_shardings=self.shardings)
        return self._to_step(frozen)

    def to_list_layout(self, frozen: Params) -> Params:
        """The list layout back (for export, evaluation hooks), on device into the list shardings."""
        if not is_scan_layout(frozen):
            return frozen
        if self._to_list is None:
            self._to_list = jax.jit(from_scan_layout, out_shardings=self.list_shardings)
        return self._to_list(frozen)
