"""Masked, sharded training: only the trainable subtree gets gradients and optimizer state.

The params tree is split by the trainable mask into two trees of the same structure, with
``None`` where a leaf belongs to the other side:

- ``trainable``: differentiated, updated, and the only tree the optimizer sees, so frozen
  leaves hold no Adam state at all (not even zeros: ``optax.masked(set_to_zero)`` chained
  after Adam would still allocate both moments for every parameter);
- ``frozen``: passed into the jitted step as a plain argument, a constant of the loss. XLA
  then drops the weight-gradient matmuls of every frozen layer and all backward work below
  the lowest trainable layer (checked on the compiled cost analysis in the tests).

Weight decay applies to trainable kernels and embeddings only (never norms or biases);
gradient clipping is by the global norm over the trainable leaves only. Gradient
accumulation sums per-token losses and gradients over microbatches and divides by the total
token weight once, so it is the same update as one step on the large batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from slayer_jax import data as data_lib
from slayer_jax import storage, surgery
from slayer_jax.data.training_data import open_training_data
from slayer_jax.errors import SlayerError
from slayer_jax.io import load_any
from slayer_jax.io.checkpoint import TrainCheckpointer, tree_hash
from slayer_jax.io.hf import save_hf
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.layout import FrozenLayoutStep, merge_for_forward, scan_runs, to_scan_layout
from slayer_jax.modeling.loss import loss_sums_from_hidden, token_nll  # noqa: F401 -- token_nll: one implementation (loss.py)
from slayer_jax.modeling.model import Params, as_dtype, forward
from slayer_jax.parallel import multihost
from slayer_jax.parallel.sharding import batch_sharding, make_mesh, opt_state_specs, param_shardings, param_specs
from slayer_jax.surgery import format_layer_map

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids: int32 [B, T]; weights: f32 [B, T]


# ----------------------------------------------------------------------------- split / merge
def _is_none(x: Any) -> bool:
    return x is None


def split_params(params: Params, mask: Params) -> tuple[Params, Params]:
    """(trainable, frozen): same structure, ``None`` at the other side's leaves."""
    trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def merge_params(trainable: Params, frozen: Params) -> Params:
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


def decay_mask(tree: Params) -> Params:
    """True for kernels and embeddings; norms ("scale") and biases are never decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), tree)


# ----------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Defaults as LLaMA Pro: peak 2e-4, 6% warmup then cosine, weight decay 0.1, clip 1.0."""

    total_steps: int
    peak_lr: float = 2e-4
    warmup_frac: float = 0.06
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    warmup = max(1, int(round(c.warmup_frac * c.total_steps))) if c.warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.peak_lr, warmup_steps=warmup, decay_steps=max(c.total_steps, warmup + 1),
        end_value=c.peak_lr * c.min_lr_ratio)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(c.clip_norm),
        optax.adamw(lr_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
    )


# ----------------------------------------------------------------------------- loss / step
@dataclasses.dataclass(frozen=True)
class StepConfig:
    cfg: ModelConfig
    dtype: str = "float32"
    remat: str | None = None
    grad_accum: int = 1
    attention: str = "auto"  # slayer_jax.modeling.attention.BACKENDS: splash on TPU, cuDNN on GPU (bf16), xla elsewhere
    loss_chunk: int = 0  # vocabulary columns per step of the chunked loss; 0 = full logits


def loss_sums(trainable: Params, frozen: Params, batch: Batch, sc: StepConfig, act_sharding=None):
    """(sum of weighted token NLL, sum of weights) for one (micro)batch."""
    params = merge_for_forward(trainable, frozen)  # frozen in the list or the scan layout (slayer_jax.modeling.layout)
    x = forward(params, batch["inputs"], sc.cfg, batch["positions"], batch["segment_ids"], dtype=as_dtype(sc.dtype),
                remat=sc.remat, act_sharding=act_sharding, attention=sc.attention, final_hidden=True)
    return loss_sums_from_hidden(x, params, sc.cfg, batch["targets"], batch["weights"], as_dtype(sc.dtype),
                                 chunk=sc.loss_chunk or None)


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int = 0) -> dict[str, Any]:
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
            "rng": jax.random.key_data(jax.random.PRNGKey(seed))}


def _split_micro(batch: Batch, n: int) -> Batch:
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"grad_accum: batch size {x.shape[0]} is not divisible by {n} microbatches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map(f, batch)


def train_step(state: dict[str, Any], frozen: Params, batch: Batch, *, sc: StepConfig,
               tx: optax.GradientTransformation, act_sharding=None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro(carry, mb):
        g_acc, l_acc, w_acc = carry
        (l, w), g = grad_fn(state["trainable"], frozen, mb, sc, act_sharding)
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if sc.grad_accum > 1:
        (g_sum, l_sum, w_sum), _ = jax.lax.scan(micro, init, _split_micro(batch, sc.grad_accum))
    else:
        (g_sum, l_sum, w_sum), _ = micro(init, batch)
    denom = jnp.maximum(w_sum, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, g_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": l_sum / denom, "tokens": w_sum, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics


def compile_step(sc: StepConfig, tx: optax.GradientTransformation, state_shardings=None, frozen_shardings=None,
                 batch_sharding=None, act_sharding=None, donate: bool = True) -> Callable:
    """jit the step with explicit in/out shardings (None: let jit decide, e.g. one device)."""
    step = functools.partial(train_step, sc=sc, tx=tx, act_sharding=act_sharding)
    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                  out_shardings=(state_shardings, None))
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kw)


# ----------------------------------------------------------------------------- the step as it runs
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


@dataclasses.dataclass
class StepProgram:
    """The train step a run executes, built once by :func:`build_step` for ``slayer train``,
    ``slayer plan`` (on CPU devices or a TPU topology), the tests and the benchmarks, so what is
    planned is what runs: the optimizer, every sharding (parameters and optimizer state by the
    same role rules), and the jitted step."""

    mesh: Any
    sc: StepConfig
    ocfg: OptimConfig
    tx: optax.GradientTransformation
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    act_sharding: Any
    step: Callable  # jitted (state, frozen, batch) -> (state, metrics), state donated
    init: Callable  # jitted trainable -> state, placed by state_shardings

    def abstract_inputs(self, trainable, frozen, global_rows: int, seq_len: int):
        """``(state, frozen, batch)`` as ShapeDtypeStructs with their shardings: what the step is
        lowered for (no arrays needed)."""
        state = jax.eval_shape(self.init, trainable)
        place = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        batch = {k: jax.ShapeDtypeStruct((global_rows, seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                         sharding=self.batch_sharding) for k in BATCH_KEYS}
        return place(state, self.state_shardings), place(frozen, self.frozen_shardings), batch

    def lower(self, trainable, frozen, global_rows: int, seq_len: int):
        return self.step.lower(*self.abstract_inputs(trainable, frozen, global_rows, seq_len))


def build_step(c, cfg: ModelConfig, mesh, trainable, frozen, total_steps: int) -> StepProgram:
    """The :class:`StepProgram` of config ``c`` for ``mesh`` (real devices, or a TPU topology's for
    an ahead-of-time compile). ``trainable``/``frozen`` may be arrays or ShapeDtypeStructs: only
    their shapes and dtypes are read."""


    ocfg = OptimConfig(total_steps=int(total_steps), **{k: v for k, v in c.optim.items()})
    tx = make_optimizer(ocfg)
    seed = int(c.get("seed", 0))
    rep = NamedSharding(mesh, PartitionSpec())
    tr_sh, fr_sh = param_shardings(trainable, mesh), param_shardings(frozen, mesh)
    opt_abs = jax.eval_shape(functools.partial(init_state, tx=tx, seed=seed), trainable)["opt_state"]
    opt_sh = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                    opt_state_specs(opt_abs, trainable, param_specs(trainable, mesh)),
                                    is_leaf=lambda x: isinstance(x, PartitionSpec))
    st_sh = {"step": rep, "trainable": tr_sh, "opt_state": opt_sh, "rng": rep}
    b_sh = batch_sharding(mesh)
    act_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    sc = StepConfig(cfg, dtype=c.dtype, remat=(c.get("remat", None) or None), grad_accum=int(c.get("grad_accum", 1)),
                    attention=c.get("attention", "auto") or "auto", loss_chunk=int(c.get("loss_chunk", 0) or 0))
    # The step reads the frozen tree in the scan layout (runs of identical frozen layers stacked, one
    # loop body each: slayer_jax.modeling.layout); frozen_shardings stay the list layout's, the interface.
    runs = scan_runs(frozen["layers"]) if c.get("scan_layers", False) else ()
    step_fr_sh = param_shardings(to_scan_layout(jax.eval_shape(lambda t: t, frozen), runs), mesh) if runs else fr_sh
    step = FrozenLayoutStep(compile_step(sc, tx, st_sh, step_fr_sh, b_sh, act_sh), runs, step_fr_sh, fr_sh)
    init = jax.jit(functools.partial(init_state, tx=tx, seed=seed), out_shardings=st_sh)
    return StepProgram(mesh, sc, ocfg, tx, st_sh, fr_sh, b_sh, act_sh, step, init)


def hlo_fingerprint(lowered) -> str:
    """sha256 of a lowered step's StableHLO text: equal fingerprints, equal programs."""

    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


# ----------------------------------------------------------------------------- accounting
def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def tree_size(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def flops_per_token(cfg: ModelConfig, n_layers: int, seq_len: int, lowest_trainable: int | None = None,
                    n_trainable_layers: int = 0, head_trainable: bool = False) -> dict[str, float]:
    """Training FLOPs per token, counted two ways (matmuls + attention, PaLM-style, causal
    attention not halved):

    - ``full``: 3 x forward, as if every weight were trained: the usual MFU numerator;
    - ``masked``: the work the masked step actually needs: the forward pass, activation
      gradients from the loss down to the lowest trainable layer, and weight gradients for
      the trainable layers only.
    """
    d, f, h, k, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.head_dim, cfg.vocab_size)
    matmul = 2 * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)  # per layer, forward, per token
    attn = 2 * 2 * seq_len * h * hd
    head = 2 * d * v
    fwd = n_layers * (matmul + attn) + head
    full = 3 * fwd
    if lowest_trainable is None:
        return {"full": float(full), "masked": float(full)}
    act_grad = head + (n_layers - lowest_trainable) * (matmul + 2 * attn)
    weight_grad = n_trainable_layers * matmul + (head if head_trainable else 0)
    return {"full": float(full), "masked": float(fwd + act_grad + weight_grad)}


# ----------------------------------------------------------------------------- the run
PEAK_FLOPS = {  # dense bf16 peak per device, for MFU
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "v5p": 459e12, "v5e": 197e12, "v5 lite": 197e12,
    "v6e": 918e12, "v6 lite": 918e12, "v4": 275e12,
}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for key, flops in PEAK_FLOPS.items():
        if key in kind:
            return flops
    return None


def build_plan(pc, num_layers: int):
    """The surgery plan named by a config's ``plan`` block (None = no new surgery)."""

    return surgery.plan_from(pc.get("kind", "none"), num_layers, expand=int(pc.get("expand", 0)),
                             prune=int(pc.get("prune", 0)), prune_mode=pc.get("prune_mode", "deepest"),
                             prune_layers=tuple(pc.get("prune_layers", ()) or ()),
                             refresh_last=bool(pc.get("refresh_last", False)), init=pc.get("init", "") or "",
                             file=pc.get("file", "") or "", train_head=bool(pc.get("train_head", False)))


def describe_run(*, plan, lmap, n_trainable: int, n_params: int, opt_bytes: int, source: str, stats, separator,
                 sft: bool, tokenizer, packing_note: str, rows_per_epoch: int | None, global_batch: int, steps: int, epochs: float, workdir,
                 latest: int | None, resume: bool, mesh=None) -> str:
    """What ``slayer train`` is about to do, printed before the first step."""

    T = stats.seq_len
    if plan is None:
        head = f"plan: none: {len(lmap)} layers as loaded"
    else:
        head = (f"plan: {plan.name}: {plan.num_layers} -> {plan.num_new_layers} layers; new blocks after original "
                f"layers {list(plan.expand_after)} (init {plan.init})"
                + (f"; pruned {list(plan.prune)}" if plan.prune else "")
                + (f"; refreshed {list(plan.refresh)}" if plan.refresh else ""))
    sep = ("none (SFT: the chat template's own tokens)" if sft else "none" if separator is None
           else f"{tokenizer.convert_ids_to_tokens(int(separator))!r} (id {separator})")
    if rows_per_epoch is None:  # not packed ahead (a `steps` run): the rows' lower bound, full rows
        rows_per_epoch = math.ceil(stats.tokens / T)
        packing = f"packing: at least {rows_per_epoch:,} rows of {T} per epoch"
    else:
        packing = f"packing: {rows_per_epoch:,} rows of {T} per epoch (fill {stats.tokens / (rows_per_epoch * T):.0%})"
    loss_per_step = stats.loss_tokens / max(1, rows_per_epoch) * global_batch
    lines = [
        head,
        format_layer_map(lmap),
        f"trainable: {n_trainable:,} of {n_params:,} parameters ({100 * n_trainable / max(1, n_params):.1f}%); "
        f"optimizer state {opt_bytes / 2**20:.0f} MiB",
        f"data: {source}: {stats.documents:,} documents -> {stats.tokens:,} tokens ({stats.loss_tokens:,} in the loss)"
        + (f", {stats.split} split into {stats.chunks} pieces" if stats.split else "")
        + (f", {stats.dropped} longer than {T} dropped" if stats.dropped else "")
        + (f", {stats.empty} empty skipped" if stats.empty else "") + f"; separator {sep}",
        f"{packing}; {packing_note}",
        f"steps: {steps:,} x {global_batch} rows = {global_batch * T:,} tokens per step (~{loss_per_step:,.0f} in the "
        f"loss); {'at most ' if epochs <= 0 else ''}{steps * global_batch / max(1, rows_per_epoch):.2f} epochs"
        + (f" (epochs={epochs:g})" if epochs > 0 else ""),
    ]
    if mesh is not None:
        lines.append(f"devices: {jax.process_count()} process(es) x {jax.local_device_count()} "
                     f"{jax.devices()[0].platform} devices; mesh {', '.join(f'{k}={v}' for k, v in mesh.shape.items())}; "
                     f"{global_batch // max(1, jax.process_count())} rows per process per step")
    if latest is None:
        lines.append(f"workdir: {workdir} (no checkpoint: starting at step 0)")
    elif resume:
        lines.append(f"workdir: {workdir} has a checkpoint at step {latest}: resuming from it "
                     f"(checkpoint.resume=False or another workdir starts over)")
    else:
        lines.append(f"workdir: {workdir} has a checkpoint at step {latest}; checkpoint.resume=False: starting at "
                     f"step 0")
    return "\n".join(lines)


class RunLogs:
    """Process 0's logs of a run: ``metrics.jsonl`` and TensorBoard events under the workdir (local
    or gs://). Opening them may fail (the caller turns that into an error on every process); once
    training runs, a failed write only warns, once, so a full disk or a GCS hiccup on process 0
    cannot kill it while the other processes wait in the next step. On resume from step ``start``
    the log keeps only the lines of steps up to ``start`` (the later ones are redone)."""

    def __init__(self, workdir, start: int):


        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics = storage.LineLog(workdir / "metrics.jsonl")
        self.metrics.keep(lambda line: json.loads(line).get("step", 0) <= start)
        self.writer = storage.summary_writer(workdir / "tb")
        self.warned = False

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- logging must not stop a pod
            if not self.warned:
                import sys

                print(f"warning: writing the run's logs failed ({type(e).__name__}: {e}); training goes on, "
                      f"later failures are not reported", file=sys.stderr, flush=True)
                self.warned = True

    TRAIN_KEYS = ("loss", "grad_norm", "lr", "tokens", "step_s", "tokens_per_s")  # and flops_per_s_*, mfu_*

    @classmethod
    def tag(cls, key: str) -> str:
        """TensorBoard tag: the step's own figures under ``train/``, evaluations under ``eval/``."""
        if key in cls.TRAIN_KEYS or key.startswith(("flops_per_s_", "mfu_")):
            return f"train/{key}"
        return f"eval/{key.removeprefix('eval_')}"

    def record(self, rec: dict) -> None:

        self._safely(self.metrics.append, json.dumps(rec))
        for k, v in rec.items():
            if k != "step" and v is not None:
                self._safely(self.writer.add_scalar, self.tag(k), v, rec["step"])

    def flush(self) -> None:
        self._safely(self.metrics.flush)
        self._safely(self.writer.flush)

    def close(self) -> None:
        self._safely(self.metrics.flush)
        self._safely(self.writer.close)


RUN_STATUS = "run_status.json"  # {"state": "running" | "preempted" | "complete", "step": N, "steps": M}


def run(config, eval_hook: Callable[[int, Params], dict[str, float]] | None = None) -> dict[str, Any]:
    """load -> (surgery) -> masked sharded training -> HF export. Returns a summary dict.

    ``config`` is an ml_collections ConfigDict as in ``configs/``. ``eval_hook(step, params)``,
    if given, runs at step 0 and every ``eval_every`` steps on the merged params; its metrics
    are logged with the step's record (used by the demo for domain-vs-forgetting curves).
    """



    c = config
    multihost.initialize(c.get("distributed"))
    workdir = storage.as_path(c.workdir)  # local, shared or gs://
    is_main = jax.process_index() == 0
    n_dev = int(c.get("num_devices", 0) or 0)
    if n_dev and jax.process_count() > 1 and n_dev != jax.device_count():
        raise SlayerError(f"config: num_devices is {n_dev}; with {jax.process_count()} processes the mesh must span "
                          f"every device (num_devices=0)")
    mesh = make_mesh(c.mesh, devices=jax.devices()[:n_dev] if n_dev else None)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if int(c.batch_size) % (dp * int(c.get("grad_accum", 1))):
        raise SlayerError(f"config: batch_size {c.batch_size} must be divisible by data*fsdp ({dp}) x grad_accum "
                          f"({c.get('grad_accum', 1)}) for mesh {dict(mesh.shape)}")
    multihost.require_shared_dir(workdir)
    # Straight into the shards, as fp32 masters: each process reads only its devices' slices, and
    # the surgery below runs on the sharded arrays.
    params, cfg, tok = load_any(c.model, dtype=jnp.float32, mesh=mesh)
    if tok is None:
        raise SlayerError(f"{c.model}: no tokenizer files; training needs the model's tokenizer")
    plan = build_plan(c.plan, len(params["layers"]))
    record = None  # plan.kind from_model: continue training a model slayer made, as its record says
    if c.plan.get("kind") == "from_model":
        record = surgery.read_record(c.model)
        if record is None:
            raise SlayerError(f"{c.model}: plan.kind is from_model but the model has no slayer record in its "
                              f"config.json (it was not made by slayer surgery or slayer train)")
    params, mask, lmap = surgery.prepare_for_training(params, plan, record=record,
                                                      full_finetune=bool(c.get("full_finetune", False)))
    if record is not None:
        plan = record.plan  # the record keeps naming the surgery that made the model
    trainable, frozen = split_params(params, mask)
    del params
    if c.get("frozen_dtype", ""):  # frozen weights need no fp32 master copy
        frozen = jax.tree_util.tree_map(lambda x: x.astype(as_dtype(c.frozen_dtype)), frozen)

    seq_len = int(c.data.seq_len)
    separator = c.data.get("separator", "auto") or "auto"
    # Every process reads the same sequence of global batches and hands its devices only their
    # rows (multihost.global_batch), so a run is the same whatever the number of processes. A
    # prepared corpus reads only this process's rows of each global batch; an in-memory one packs
    # the whole (small) corpus on every process.
    global_rows = int(c.batch_size)
    b_sh = batch_sharding(mesh)  # = the step program's batch sharding
    epochs = float(c.get("epochs", 0) or 0)
    loader, data_info = open_training_data(
        c.data, tok, seed=int(c.seed), batch_size=global_rows, process_index=0, process_count=1,
        count_rows=epochs > 0, progress=is_main, local_rows=multihost.local_rows(b_sh, global_rows))
    steps = data_info.steps(epochs=epochs, steps=int(c.steps), global_batch=global_rows)
    rows_per_epoch, stats = data_info.rows_per_epoch, data_info.stats
    eval_batches = None
    if c.data.get("eval_source"):
        ev = data_lib.make_dataset(c.data.eval_source, tok, seq_len, mode=c.data.get("mode", "text"),
                                   field=c.data.get("field", None) or None,
                                   separator=separator).pack()
        n_eval = min(int(c.get("eval_batches", 4)) * global_rows, len(ev["inputs"]) // global_rows * global_rows)
        eval_batches = [{k: v[i:i + global_rows] for k, v in ev.items()} for i in range(0, n_eval, global_rows)]

    program = build_step(c, cfg, mesh, trainable, frozen, steps)  # the same builder `slayer plan` compiles
    ocfg = program.ocfg
    trainable = jax.device_put(trainable, program.state_shardings["trainable"])
    frozen = jax.device_put(frozen, program.frozen_shardings)
    state = program.init(trainable)
    lowered = program.lower(trainable, frozen, global_rows, seq_len)
    step_hlo = hlo_fingerprint(lowered)
    step_fn = lowered.compile()

    meta = {"model": str(c.model), "base_hash": tree_hash(frozen) if c.checkpoint.get("hash_base", True) else None,
            "plan": plan.to_json() if plan else None, "layer_map": lmap,
            "model_config": cfg.to_hf_dict(len(lmap)), "trainable": surgery.count_trainable(
                merge_params(trainable, frozen), mask), "config": json.loads(c.to_json_best_effort())}
    frozen = program.step.to_step_layout(frozen)  # once, on device (the hash above is the list layout's)
    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=int(c.checkpoint.keep),
                             async_save=bool(c.checkpoint.get("async_save", True)))
    start = 0
    latest = ckpt.latest_step()
    if is_main:
        print(describe_run(plan=plan, lmap=lmap, n_trainable=meta["trainable"],
                           n_params=tree_size(trainable) + tree_size(frozen), opt_bytes=tree_bytes(state["opt_state"]),
                           source=data_info.source, stats=stats, separator=data_info.separator,
                           sft=data_info.sft, tokenizer=tok, packing_note=data_info.packing_note,
                           rows_per_epoch=rows_per_epoch,
                           global_batch=int(c.batch_size),
                           steps=steps, epochs=float(c.get("epochs", 0) or 0), workdir=workdir, latest=latest,
                           resume=bool(c.checkpoint.get("resume", True)), mesh=mesh), flush=True)
    if latest is not None and c.checkpoint.get("resume", True):
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, start = ckpt.restore(abstract, loader, meta)
        if is_main:
            print(f"resumed from step {start}", flush=True)

    def eval_loss(st) -> float:
        tot, cnt = 0.0, 0.0
        for b in eval_batches:
            l, w = _eval_fn(st["trainable"], frozen, multihost.global_batch(b, b_sh, global_rows))
            tot, cnt = tot + multihost.replicated_value(l), cnt + multihost.replicated_value(w)
        return float(tot / max(cnt, 1.0))  # a Python float: it goes into metrics.jsonl

    _eval_fn = jax.jit(functools.partial(loss_sums, sc=dataclasses.replace(program.sc, remat=None, grad_accum=1),
                                         act_sharding=program.act_sharding))
    n_layers = len(lmap)
    trainable_idx = [r["index"] for r in lmap if r["trainable"]]
    fpt = flops_per_token(cfg, n_layers, int(c.data.seq_len), min(trainable_idx) if trainable_idx else n_layers,
                          len(trainable_idx), bool(c.plan.get("train_head", False)) or c.get("full_finetune", False))
    if c.get("full_finetune", False) or plan is None:
        fpt["masked"] = fpt["full"]
    peak = device_peak_flops()
    def run_status(state: str) -> None:  # what a launcher reads to tell a finished run from a preempted one
        if is_main:
            storage.write_text_atomic(workdir / RUN_STATUS, json.dumps({"state": state, "step": step, "steps": steps}))

    step = start
    with multihost.together(f"workdir {workdir}"):  # process 0 opens the logs; a failure stops every process
        logs = RunLogs(workdir, start) if is_main else None
        run_status("running")
    history = []
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not is_main)
    t_last, tokens_since = time.perf_counter(), 0.0
    if eval_hook is not None and start == 0:
        rec0 = {"step": 0, **eval_hook(0, merge_params(state["trainable"], program.step.to_list_layout(frozen)))}
        history.append(rec0)
        t_last = time.perf_counter()
    notice = multihost.PreemptionNotice()  # SIGTERM: save at this step, on every process, and stop
    preempted = False
    try:
        while step < steps:
            t_step = time.perf_counter()
            batch = next(loader)
            state, m = step_fn(state, frozen, multihost.global_batch(batch, b_sh, global_rows))
            m = {k: float(multihost.replicated_value(v)) for k, v in m.items()}
            loss = m["loss"]
            step += 1
            if not math.isfinite(loss):
                raise SlayerError(f"step {step}: loss is {loss}; stopping. The last good checkpoint "
                                  f"(step {ckpt.latest_step()}) in {ckpt.directory} is intact")
            tokens_since += float(m["tokens"])
            rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                   "lr": float(lr_schedule(ocfg)(step - 1)), "tokens": float(m["tokens"])}
            rec["step_s"] = time.perf_counter() - t_step
            if step % int(c.log_every) == 0 or step == steps:
                dt = time.perf_counter() - t_last
                tps = tokens_since / dt
                rec["tokens_per_s"] = tps
                n_dev = jax.device_count()
                for kind in ("full", "masked"):
                    achieved = tps * fpt[kind] / n_dev
                    rec[f"flops_per_s_{kind}"] = achieved
                    rec[f"mfu_{kind}"] = achieved / peak if peak else None
                t_last, tokens_since = time.perf_counter(), 0.0
            if eval_batches and (step % int(c.eval_every) == 0 or step == steps):
                rec["eval_loss"] = eval_loss(state)
            if eval_hook is not None and (step % int(c.eval_every) == 0 or step == steps):
                rec.update(eval_hook(step, merge_params(state["trainable"], program.step.to_list_layout(frozen))))
                t_last = time.perf_counter()  # keep evaluation out of tokens/s
            history.append(rec)
            if is_main:
                logs.record(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            preempted = notice.reached(step)
            if preempted or step % int(c.checkpoint.every) == 0 or step == steps:
                ckpt.save(step, state, loader, meta)
                if is_main:  # remote logs are written out once per checkpoint
                    logs.flush()
            if preempted:
                break
    finally:
        notice.close()
        bar.close()
        ckpt.close()  # waits for the last save to commit
        if logs is not None:
            logs.close()

    if preempted:
        run_status("preempted")
        if is_main:
            import sys

            print(f"slayer: preempted (SIGTERM) at step {step} of {steps}: checkpoint committed in {ckpt.directory}; "
                  f"run the same command again to resume", file=sys.stderr, flush=True)
        return {"history": history, "preempted_at": step, "export_dir": None, "layer_map": lmap, "plan": plan,
                "step_hlo": step_hlo}

    final = merge_params(state["trainable"], program.step.to_list_layout(frozen))
    export_dir = None
    if c.get("export_dir"):
        before = record.trained_steps if record is not None else 0
        written = surgery.surgery_record(plan, lmap, mask, trained_steps=before + steps)
        export_dir = save_hf(final, cfg, c.export_dir, tokenizer=tok, extra_config=surgery.record_config(written),
                             overwrite=True, progress=is_main)
    run_status("complete")
    return {"params": final, "cfg": cfg, "tokenizer": tok, "history": history, "layer_map": lmap, "preempted_at": None,
            "plan": plan, "mask": mask, "pack_stats": stats, "export_dir": export_dir,
            "flops_per_token": fpt, "opt_state_bytes": tree_bytes(state["opt_state"]), "step_hlo": step_hlo}
