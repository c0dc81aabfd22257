"""`curate cache-logits`: run a teacher once over a dataset version and store a compact top-k logit cache.

Runs resume by themselves (finished work units are kept in the store's work dir). Sharding: either
``--shard i --num-shards n`` per process, then one ``--merge``; or under ``torchrun`` / ``accelerate launch``,
where each rank takes its shard and rank 0 merges after a barrier. The options that say what is cached
are generated from `LogitCacheConfig` (its model options are the ones `curate train` and `curate eval` use).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Annotated, Any

import typer

from builders.teacher_logits import LogitCacheConfig, preset_values
from curate.commands._app import StoreOpt, app, build_app, console, friendly_errors, safe
from curate.commands._options import config_options
from curate.configs import COMMAND_LINE, build_config
from curate.errors import CurateError
from curate.store import DatasetStore


def _distributed() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun / accelerate launch with more than one process.

    Read from the launcher's environment rather than accelerate's `PartialState`, which would start a process
    group (NCCL on GPU) up front: shards work independently and need only a gloo barrier before rank 0 merges."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


@app.command("cache-logits")
@friendly_errors
@config_options(LogitCacheConfig)
def cache_logits_cmd(
    shard: Annotated[int | None, typer.Option(help="This process's shard (with --num-shards).")] = None,
    num_shards: Annotated[int, typer.Option(help="Split the work units across this many processes.")] = 1,
    merge: Annotated[bool, typer.Option("--merge", help="Only merge finished shards into one version.")] = False,
    max_units: Annotated[
        int | None, typer.Option(help="Stop after computing N work units (time-boxed jobs; rerun to resume).")
    ] = None,
    store: StoreOpt = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Cache a teacher's top-k (or top-p, or sampled) log-probs, residual mass and label log-probs for offline KD."""
    from builders.teacher_logits import ShardReport, cache_teacher_logits

    given = dict(options or {})
    if given.get("limit") == 0:
        given["limit"] = None  # 0: all rows
    # a preset is the lowest layer: explicit options win (an explicit --top-p / --select sample replaces its
    # entry selection rather than conflicting with it)
    preset = preset_values(given.get("preset"), given)
    params = build_config(LogitCacheConfig, [(preset, f"--preset {given.get('preset')}"), (given, COMMAND_LINE)])
    dist = _distributed()
    if dist is not None and shard is None and not merge:
        rank, world, local = dist
        shard, num_shards = rank, world
        if params.device == "auto":
            import torch

            params.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if shard is None:
        shard = 0
    elif num_shards == 1:
        raise CurateError("--shard needs --num-shards > 1")
    st = DatasetStore(store)
    result = cache_teacher_logits(st, params, shard=shard, num_shards=num_shards, merge=num_shards == 1,
                                  merge_only=merge, max_units=max_units)
    if dist is not None and not merge:
        result = _merge_on_rank0(st, params, result, dist)
    if isinstance(result, ShardReport):
        console.print(f"[cyan]{result.summary()}[/]")
        if result.done_units == result.total_units and dist is None:
            console.print("all units done: merge with the same options plus --merge")
        return
    if result is None:
        return
    for note in result.notes:
        console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    style = "green" if result.created else "cyan"
    console.print(f"[{style}]{safe(result.summary())}[/]")
    p = result.version.manifest["params"]
    console.print(f"  {p['completion_tokens']:,} completion tokens, {p['bytes_per_token']} bytes/token "
                  f"({selection_text(p)}, {p['quantization']})", highlight=False)
    console.print(f"  {safe(result.version.path)}", highlight=False)


def selection_text(p: dict[str, Any]) -> str:
    """How a cache chose its entries, from its recorded params (a sampled cache has no k of its own)."""
    if p.get("select") == "sample":
        text = f"{p.get('samples')} draws" + (f" at proposal temperature {p['proposal_temperature']}"
                                               if p.get("proposal_temperature", 1.0) != 1.0 else "")
    elif p.get("select") == "at-ids":
        text = f"at the ids of {p['at_ids']['name']}@{p['at_ids']['tag']}"
    elif p.get("entry_cost") is not None:
        text = f"entry cost {p['entry_cost']}, k {p.get('k_min', 1)}–{p['k']}"
    elif p.get("top_p") is not None:
        text = f"top-p {p['top_p']}, k {p.get('k_min', 1)}–{p['k']}"
    else:
        text = f"k={p['k']}"
    if p.get("tail_samples"):
        text += f" + {p['tail_samples']} tail draws"
    return f"--preset {p['preset']}: {text}" if p.get("preset") else text


def _merge_on_rank0(st: DatasetStore, params: LogitCacheConfig, result: object,
                    dist: tuple[int, int, int]) -> object:
    """Under torchrun: wait for every rank (gloo barrier, no GPU needed), then rank 0 writes the version."""
    import torch.distributed as tdist

    from builders.teacher_logits import cache_teacher_logits

    rank, world, _ = dist
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=12))
    tdist.barrier()
    try:
        if rank != 0:
            return result
        return cache_teacher_logits(st, params, shard=0, num_shards=world, merge_only=True)
    finally:
        tdist.barrier()
        tdist.destroy_process_group()


@build_app.command("advantage")
@friendly_errors
def build_advantage_cmd(
    teacher: Annotated[str, typer.Option(help="The DPO teacher's logit cache (name or name@tag).")],
    reference: Annotated[str, typer.Option(help="The reference's cache, made `cache-logits --at-ids <teacher>`.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default <teacher-cache>-advantage).")] = None,
    sides: Annotated[str, typer.Option(help="Sides that get advantages (chosen,rejected); others keep input_ids "
                                            "with empty lists.")] = "rejected",
    step: Annotated[float, typer.Option(help="Nats per int8 code; range +-127 steps (larger values clamped).")] = (
        1 / 16),
    encoding: Annotated[str, typer.Option(help="i8 (codes) or i8-delta (differences along each token).")] = "i8",
    store: StoreOpt = None,
) -> None:
    """Build the ADPA advantage table A = log p_T - log p_ref at the teacher cache's kept ids."""
    from builders.advantage import build_advantage

    result = build_advantage(DatasetStore(store), teacher, reference, name=name,
                             sides=tuple(s.strip() for s in sides.split(",") if s.strip()), step=step,
                             encoding=encoding)  # type: ignore[arg-type]
    for note in result.notes:
        console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    console.print(f"[{'green' if result.created else 'cyan'}]{safe(result.summary())}[/]")
    p = result.version.manifest["params"]
    console.print(f"  {p['advantage_tokens']:,} advantage tokens, {p['bytes_per_token']} bytes/token "
                  f"(k={p['k']}, {p['advantage_encoding']}, step {p['step']:.4g})")
    console.print(f"  {safe(result.version.path)}", highlight=False)
