"""``slayer train``: load, (surgery), the masked sharded step in a loop with checkpoints and logs, export.

The step itself, its optimizer and shardings are :mod:`slayer_jax.training.step`'s; this module
runs it: the mesh and the model (:func:`run_mesh`, :func:`load_for_training`), the data, resume,
logs (:class:`RunLogs`), preemption (SIGTERM saves and stops), and the export with its record.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from slayer_jax import storage, surgery
from slayer_jax.data.pipeline import make_dataset
from slayer_jax.data.training_data import open_training_data
from slayer_jax.errors import SlayerError
from slayer_jax.io import load_any
from slayer_jax.io.checkpoint import TrainCheckpointer, tree_hash
from slayer_jax.io.hf import save_hf
from slayer_jax.modeling.config import ModelConfig
from slayer_jax.modeling.model import Params, as_dtype
from slayer_jax.parallel import multihost
from slayer_jax.parallel.sharding import batch_sharding, make_mesh
from slayer_jax.surgery import format_layer_map
from slayer_jax.training.step import (
    build_step,
    device_peak_flops,
    flops_per_token,
    hlo_fingerprint,
    loss_sums,
    lr_schedule,
    merge_params,
    split_params,
    tree_bytes,
    tree_size,
)


@dataclasses.dataclass
class TrainingModel:
    """A model ready to train: its params split by the trainable mask, and how it was made."""

    trainable: Params
    frozen: Params
    mask: Params
    layer_map: list[dict]
    plan: Any  # surgery.SurgeryPlan or None
    record: Any  # surgery.Record of the loaded model (plan.kind from_model), else None
    cfg: ModelConfig
    tokenizer: Any


def run_mesh(c):
    """The run's device mesh, checked against the batch and the processes."""
    n_dev = int(c.get("num_devices", 0) or 0)
    if n_dev and jax.process_count() > 1 and n_dev != jax.device_count():
        raise SlayerError(f"config: num_devices is {n_dev}; with {jax.process_count()} processes the mesh must span "
                          f"every device (num_devices=0)")
    mesh = make_mesh(c.mesh, devices=jax.devices()[:n_dev] if n_dev else None)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if int(c.batch_size) % (dp * int(c.get("grad_accum", 1))):
        raise SlayerError(f"config: batch_size {c.batch_size} must be divisible by data*fsdp ({dp}) x grad_accum "
                          f"({c.get('grad_accum', 1)}) for mesh {dict(mesh.shape)}")
    return mesh


def load_for_training(c, mesh) -> TrainingModel:
    """Load ``c.model`` straight into its shards as fp32 masters (each process reads only its
    devices' slices), apply the config's surgery (or the model's own record, ``plan.kind =
    from_model``) and split the params into the trainable and frozen trees."""
    params, cfg, tok = load_any(c.model, dtype=jnp.float32, mesh=mesh)
    if tok is None:
        raise SlayerError(f"{c.model}: no tokenizer files; training needs the model's tokenizer")
    plan = build_plan(c.plan, len(params["layers"]))
    record = None
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
    return TrainingModel(trainable, frozen, mask, lmap, plan, record, cfg, tok)


def eval_batches_of(c, tok, global_rows: int) -> list[dict] | None:
    """``data.eval_source`` packed once into up to ``eval_batches`` global batches (None without one)."""
    if not c.data.get("eval_source"):
        return None
    ev = make_dataset(c.data.eval_source, tok, int(c.data.seq_len), mode=c.data.get("mode", "text"),
                      field=c.data.get("field", None) or None,
                      separator=c.data.get("separator", "auto") or "auto").pack()
    n_eval = min(int(c.get("eval_batches", 4)) * global_rows, len(ev["inputs"]) // global_rows * global_rows)
    return [{k: v[i:i + global_rows] for k, v in ev.items()} for i in range(0, n_eval, global_rows)]


def run_flops_per_token(c, cfg: ModelConfig, lmap, plan) -> dict[str, float]:
    """:func:`flops_per_token` for this run's layer map: the full and the masked step's work (LoRA
    adapters' own rank-r weight gradients are left out: they are below 1% of a layer's matmuls)."""
    trainable_idx = [r["index"] for r in lmap if r["trainable"]]
    reached = trainable_idx + [r["index"] for r in lmap if r.get("adapter")]  # gradients flow down to these
    n_layers = len(lmap)
    full_ft = bool(c.get("full_finetune", False))
    fpt = flops_per_token(cfg, n_layers, int(c.data.seq_len), min(reached) if reached else n_layers,
                          len(trainable_idx), bool(c.plan.get("train_head", False)) or full_ft)
    if full_ft or plan is None:
        fpt["masked"] = fpt["full"]
    return fpt


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
    mesh = run_mesh(c)
    multihost.require_shared_dir(workdir)
    m = load_for_training(c, mesh)
    trainable, frozen, plan, lmap, tok = m.trainable, m.frozen, m.plan, m.layer_map, m.tokenizer

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
    eval_batches = eval_batches_of(c, tok, global_rows)

    program = build_step(c, m.cfg, mesh, trainable, frozen, steps,  # the same builder `slayer plan` compiles
                         layer_kinds=[r["kind"] for r in lmap])
    trainable = jax.device_put(trainable, program.state_shardings["trainable"])
    frozen = jax.device_put(frozen, program.frozen_shardings)
    state = program.init(trainable)
    lowered = program.lower(trainable, frozen, global_rows, int(c.data.seq_len))
    step_hlo = hlo_fingerprint(lowered)
    step_fn = lowered.compile()

    meta = {"model": str(c.model), "base_hash": tree_hash(frozen) if c.checkpoint.get("hash_base", True) else None,
            "plan": plan.to_json() if plan else None, "layer_map": lmap,
            "model_config": m.cfg.to_hf_dict(len(lmap)), "trainable": surgery.count_trainable(
                merge_params(trainable, frozen), m.mask), "config": json.loads(c.to_json_best_effort())}
    frozen = program.step.to_step_layout(frozen)  # once, on device (the hash above is the list layout's)
    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=int(c.checkpoint.keep),
                             async_save=bool(c.checkpoint.get("async_save", True)))
    start = 0
    latest = ckpt.latest_step()
    if is_main:
        print(describe_run(plan=plan, lmap=lmap, n_trainable=meta["trainable"],
                           n_params=tree_size(trainable) + tree_size(frozen), opt_bytes=tree_bytes(state["opt_state"]),
                           source=data_info.source, stats=data_info.stats, separator=data_info.separator,
                           sft=data_info.sft, tokenizer=tok, packing_note=data_info.packing_note,
                           rows_per_epoch=data_info.rows_per_epoch, global_batch=global_rows,
                           steps=steps, epochs=epochs, workdir=workdir, latest=latest,
                           resume=bool(c.checkpoint.get("resume", True)), mesh=mesh), flush=True)
    if latest is not None and c.checkpoint.get("resume", True):
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, start = ckpt.restore(abstract, loader, meta)
        if is_main:
            print(f"resumed from step {start}", flush=True)

    eval_fn = jax.jit(functools.partial(loss_sums, sc=dataclasses.replace(program.sc, remat=None, grad_accum=1),
                                        act_sharding=program.act_sharding))

    def eval_loss(st) -> float:
        tot, cnt = 0.0, 0.0
        for b in eval_batches:
            l, w = eval_fn(st["trainable"], frozen, multihost.global_batch(b, b_sh, global_rows))
            tot, cnt = tot + multihost.replicated_value(l), cnt + multihost.replicated_value(w)
        return float(tot / max(cnt, 1.0))  # a Python float: it goes into metrics.jsonl

    fpt = run_flops_per_token(c, m.cfg, lmap, plan)
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
        history.append({"step": 0, **eval_hook(0, merge_params(state["trainable"],
                                                                program.step.to_list_layout(frozen)))})
        t_last = time.perf_counter()
    notice = multihost.PreemptionNotice()  # SIGTERM: save at this step, on every process, and stop
    preempted = False
    try:
        every = int(c.checkpoint.every)
        while step < steps:
            if (step + 1) % every == 0 or step + 1 == steps:
                # the step about to run completes an interval: the previous save commits first, so
                # a kill at any moment loses < 2 intervals (orbax alone waits when the next save
                # starts, one step later: a kill just before it would lose two whole intervals)
                ckpt.wait()
            t_step = time.perf_counter()
            batch = next(loader)
            state, mets = step_fn(state, frozen, multihost.global_batch(batch, b_sh, global_rows))
            mets = {k: float(multihost.replicated_value(v)) for k, v in mets.items()}
            loss = mets["loss"]
            step += 1
            if not math.isfinite(loss):
                raise SlayerError(f"step {step}: loss is {loss}; stopping. The last good checkpoint "
                                  f"(step {ckpt.latest_step()}) in {ckpt.directory} is intact")
            tokens_since += float(mets["tokens"])
            rec = {"step": step, "loss": loss, "grad_norm": float(mets["grad_norm"]),
                   "lr": float(lr_schedule(program.ocfg)(step - 1)), "tokens": float(mets["tokens"]),
                   "step_s": time.perf_counter() - t_step}
            if step % int(c.log_every) == 0 or step == steps:
                tps = tokens_since / (time.perf_counter() - t_last)
                rec["tokens_per_s"] = tps
                for kind in ("full", "masked"):
                    achieved = tps * fpt[kind] / jax.device_count()
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
            if preempted or step % every == 0 or step == steps:
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
            print(f"slayer: preempted (SIGTERM) at step {step} of {steps}: checkpoint committed in {ckpt.directory}; "
                  f"run the same command again to resume", file=sys.stderr, flush=True)
        return {"history": history, "preempted_at": step, "export_dir": None, "layer_map": lmap, "plan": plan,
                "step_hlo": step_hlo}

    final = merge_params(state["trainable"], program.step.to_list_layout(frozen))
    export_dir = None
    if c.get("export_dir"):
        before = m.record.trained_steps if m.record is not None else 0
        written = surgery.surgery_record(plan, lmap, m.mask, trained_steps=before + steps)
        export_dir = save_hf(final, m.cfg, c.export_dir, tokenizer=tok, extra_config=surgery.record_config(written),
                             overwrite=True, progress=is_main)
    run_status("complete")
    return {"params": final, "cfg": m.cfg, "tokenizer": tok, "history": history, "layer_map": lmap,
            "preempted_at": None, "plan": plan, "mask": m.mask, "pack_stats": data_info.stats,
            "export_dir": export_dir, "flops_per_token": fpt, "opt_state_bytes": tree_bytes(state["opt_state"]),
            "step_hlo": step_hlo}


def build_plan(pc, num_layers: int):
    """The surgery plan named by a config's ``plan`` block (None = no new surgery)."""

    return surgery.plan_from(pc.get("kind", "none"), num_layers, expand=int(pc.get("expand", 0)),
                             prune=int(pc.get("prune", 0)), prune_mode=pc.get("prune_mode", "deepest"),
                             prune_layers=tuple(pc.get("prune_layers", ()) or ()),
                             refresh_last=bool(pc.get("refresh_last", False)), init=pc.get("init", "") or "",
                             file=pc.get("file", "") or "", train_head=bool(pc.get("train_head", False)),
                             lora_rank=int(pc.get("lora_rank", 0) or 0), lora_alpha=float(pc.get("lora_alpha", 16.0)))


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
