"""Device mesh and parameter sharding rules by tensor role.

Mesh axes are ``("data", "fsdp", "tensor")``. A parameter's PartitionSpec comes from its
*role*, the dict key that names it (``q_proj``, ``down_proj``, ``embed``, ...), never from
its layer index, so the rules still hold after layers are inserted, removed or moved.

Kernels are [in, out]. Column-parallel projections (q/k/v/gate/up, lm_head) put their output
dim on ``tensor`` and their input dim on ``fsdp``; row-parallel ones (o/down) the reverse, as
in Megatron/MaxText. A dimension the mesh axis does not divide is left replicated, and
:func:`explain` says so, instead of failing at compile time.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from slayer_jax.errors import SlayerError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # activations: batch is split over both data-parallel axes
# A run of k layers stored as one entry (slayer_jax.modeling.layout's scan layout): its leaves gain a leading
# [k] axis, never split; the rest of the spec is the layers' own, by role.
STACKED = "stacked"

# A LoRA adapter on a projection (surgery's "lora" plans): lora_a [in, r] splits its input dim as the
# kernel does, lora_b [r, out] its output dim; the rank and the scalar lora_scale are never split.
COLUMN_LORA = {"lora_a": ("fsdp", None), "lora_b": (None, "tensor"), "lora_scale": ()}
ROW_LORA = {"lora_a": ("tensor", None), "lora_b": (None, "fsdp"), "lora_scale": ()}

# role -> spec per leaf name; role is the dict key directly above the leaf
RULES: dict[str, dict[str, tuple]] = {
    "embed": {"embedding": ("tensor", "fsdp")},  # [V, D]
    "lm_head": {"kernel": ("fsdp", "tensor")},  # [D, V]
    "q_proj": {"kernel": ("fsdp", "tensor"), "bias": ("tensor",), **COLUMN_LORA},
    "k_proj": {"kernel": ("fsdp", "tensor"), "bias": ("tensor",), **COLUMN_LORA},
    "v_proj": {"kernel": ("fsdp", "tensor"), "bias": ("tensor",), **COLUMN_LORA},
    "o_proj": {"kernel": ("tensor", "fsdp"), "bias": (None,), **ROW_LORA},
    "gate_proj": {"kernel": ("fsdp", "tensor"), "bias": ("tensor",), **COLUMN_LORA},
    "up_proj": {"kernel": ("fsdp", "tensor"), "bias": ("tensor",), **COLUMN_LORA},
    "down_proj": {"kernel": ("tensor", "fsdp"), "bias": (None,), **ROW_LORA},
    "attn_norm": {"scale": (None,)},
    "mlp_norm": {"scale": (None,)},
    "norm": {"scale": (None,)},
}


def parse_mesh(spec: str | dict | Sequence[int]) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' | {'data': 2, ...} | (2, 2, 2) -> {'data': 2, 'fsdp': 2, 'tensor': 2}."""
    if isinstance(spec, str):
        out = {}
        for part in filter(None, spec.split(",")):
            k, _, v = part.partition("=")
            if k.strip() not in AXES or not v.strip().lstrip("-").isdigit():
                raise SlayerError(f"mesh: '{part}' is not AXIS=N with AXIS in {list(AXES)}")
            out[k.strip()] = int(v)
    elif isinstance(spec, dict):
        out = dict(spec)
    else:
        out = dict(zip(AXES, spec))
    unknown = set(out) - set(AXES)
    if unknown:
        raise SlayerError(f"mesh: unknown axis '{sorted(unknown)[0]}'; expected {list(AXES)}")
    return {a: int(out.get(a, 1)) for a in AXES}


def make_mesh(spec: str | dict | Sequence[int] = "data=-1", devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One axis may be -1: it takes the remaining devices."""
    shape = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise SlayerError(f"mesh: only one axis may be -1, got {free}")
    known = math.prod(s for s in shape.values() if s != -1)
    if free:
        if n % known:
            raise SlayerError(f"mesh: {shape} does not divide the {n} devices")
        shape[free[0]] = n // known
    if math.prod(shape.values()) != n:
        raise SlayerError(f"mesh: data*fsdp*tensor = {math.prod(shape.values())} ({shape}) but there are "
                          f"{n} devices")
    return Mesh(np.asarray(devices).reshape([shape[a] for a in AXES]), AXES)


def _role_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    keys = [getattr(k, "key", None) for k in path]
    leaf, role = keys[-1], keys[-2] if len(keys) > 1 else None
    rule = RULES.get(role, {}).get(leaf)
    if rule is None:
        raise SlayerError(f"sharding: no rule for parameter role '{role}/{leaf}' "
                          f"(at {jax.tree_util.keystr(path)}); add one to slayer_jax.parallel.sharding.RULES")
    stacked = STACKED in keys  # stacked layers: the layer's spec behind an unsplit leading axis
    if stacked:
        shape = shape[1:]
    dims = [None] if stacked else []
    for axis, size in zip(rule, shape):
        dims.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    return P(*dims)


def param_specs(params: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for every leaf of ``params`` (arrays or ShapeDtypeStructs), by role."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _role_spec(p, tuple(x.shape), mesh), params)


def opt_state_specs(opt_state: Any, trainable: Any, trainable_specs: Any) -> Any:
    """Optimizer state by the same role rules as the parameters: Adam's moments mirror the
    trainable tree, so each moment leaf gets its parameter's spec (matched by key path suffix);
    scalars (counts) are replicated."""
    by_path = {}
    for (path, _), spec in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                               jax.tree_util.tree_leaves(trainable_specs, is_leaf=lambda s: isinstance(s, P))):
        by_path[jax.tree_util.keystr(path)] = spec

    def pick(path, x):
        s = jax.tree_util.keystr(path)
        for p, spec in by_path.items():
            if s.endswith(p):
                return spec
        if x.ndim:
            raise SlayerError(f"sharding: optimizer leaf {s} matches no parameter")
        return P()

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def explain(params: Any, mesh: Mesh) -> list[str]:
    """Human-readable lines: leaves whose rule wanted an axis the mesh could not split."""
    lines = []

    def visit(path, x):
        keys = [getattr(k, "key", None) for k in path]
        rule = RULES.get(keys[-2], {}).get(keys[-1], ())
        got, shape = tuple(_role_spec(path, tuple(x.shape), mesh)), tuple(x.shape)
        if STACKED in keys:
            got, shape = got[1:], shape[1:]
        for want, have, size in zip(rule, got, shape):
            if want is not None and have is None:
                lines.append(f"{jax.tree_util.keystr(path)}: dim {size} not divisible by {want}="
                             f"{mesh.shape[want]}; replicated")

    jax.tree_util.tree_map_with_path(visit, params)
    return lines


def shard_bytes_per_device(params: Any, specs: Any, mesh: Mesh) -> int:
    """Bytes one device holds for ``params`` under ``specs`` (shapes divided by the split axes)."""
    total = 0
    for x, spec in zip(jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for axis in tuple(spec):
            for a in (axis if isinstance(axis, tuple) else (axis,)):
                if a is not None:
                    n //= mesh.shape[a]
        total += n
    return total
