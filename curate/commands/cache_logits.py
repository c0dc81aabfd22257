"""`curate cache-logits`: run a teacher once over a dataset version and store a compact top-k logit cache.

Runs resume by themselves (finished work units are kept in the store's work dir). Sharding: either
``--shard i --num-shards n`` per process, then one ``--merge``; or under ``torchrun`` / ``accelerate launch``,
where each rank takes its shard and rank 0 merges after a barrier.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Annotated

import typer

from curate.commands._app import StoreOpt, app, console, friendly_errors
from curate.errors import CurateError
from curate.logit_codec import DEFAULT_SCHEME, SCHEMES
from curate.store import DatasetStore


def _label_words(spec: str | None) -> dict[int, str] | None:
    """`ethical,unethical` -> {0: 'ethical', 1: 'unethical'} (label values in order)."""
    if not spec:
        return None
    words = [w.strip() for w in spec.split(",")]
    if any(not w for w in words):
        raise CurateError(f"--label-words wants comma-separated words, got {spec!r}")
    return dict(enumerate(words))


def _distributed() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun / accelerate launch with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


@app.command("cache-logits")
@friendly_errors
def cache_logits_cmd(
    dataset: Annotated[str, typer.Option(help="Parent dataset (name or name@tag).")] = "dfar",
    config: Annotated[str, typer.Option(help="Parent config with id, prompt, completion (dfar: l or lr).")] = "lr",
    split: Annotated[str | None, typer.Option(help="Comma-separated splits (default: all).")] = None,
    teacher: Annotated[str, typer.Option(help="Hub id, local folder, .gguf file, or 'smollm2'.")] = "smollm2",
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside --teacher (a hub repo or folder).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 …")] = "auto",
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="bitsandbytes 8-bit (CUDA only).")] = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="bitsandbytes 4-bit (CUDA only).")] = False,
    k: Annotated[int, typer.Option(help="Top-k entries kept per completion token.")] = 64,
    quantization: Annotated[str, typer.Option(help=f"Log-prob storage: {', '.join(SCHEMES)}.")] = DEFAULT_SCHEME,
    template: Annotated[str, typer.Option(help="plain (prompt + completion) or chat (chat template).")] = "plain",
    label_words: Annotated[
        str | None, typer.Option(help="Label words in label order, e.g. ethical,unethical (default: the rows').")
    ] = None,
    label_prefix: Annotated[str, typer.Option(help="Text before the label word in the completion.")] = " ",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    chunk_size: Annotated[int, typer.Option(help="Examples per resumable work unit.")] = 64,
    max_length: Annotated[int, typer.Option(help="Longer examples lose completion tokens (reported).")] = 1024,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows of each split (0: all).")] = None,
    shard: Annotated[int | None, typer.Option(help="This process's shard (with --num-shards).")] = None,
    num_shards: Annotated[int, typer.Option(help="Split the work units across this many processes.")] = 1,
    merge: Annotated[bool, typer.Option("--merge", help="Only merge finished shards into one version.")] = False,
    max_units: Annotated[
        int | None, typer.Option(help="Stop after computing N work units (time-boxed jobs; rerun to resume).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Cache dataset name (default <parent>-<config>-logits).")] = None,
    store: StoreOpt = None,
) -> None:
    """Cache a teacher's top-k log-probs, residual mass and label log-probs for offline KD."""
    from builders.teacher_logits import LogitCacheParams, ShardReport, cache_teacher_logits

    params = LogitCacheParams(
        dataset=dataset, config=config, splits=[s.strip() for s in split.split(",")] if split else None,
        teacher=teacher, gguf_file=gguf_file, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit, k=k, quantization=quantization, template=template,
        label_words=_label_words(label_words), label_prefix=label_prefix, max_length=max_length,
        batch_size=batch_size, chunk_size=chunk_size, limit=limit or None, name=name,
    )
    dist = _distributed()
    if dist is not None and shard is None and not merge:
        rank, world, local = dist
        shard, num_shards = rank, world
        if device == "auto":
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
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    style = "green" if result.created else "cyan"
    console.print(f"[{style}]{result.summary()}[/]")
    p = result.version.manifest["params"]
    console.print(f"  {p['completion_tokens']:,} completion tokens, {p['bytes_per_token']} bytes/token "
                  f"(k={p['k']}, {p['quantization']})")
    console.print(f"  {result.version.path}")


def _merge_on_rank0(st: DatasetStore, params: object, result: object, dist: tuple[int, int, int]) -> object:
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
        return cache_teacher_logits(st, params, shard=0, num_shards=world, merge_only=True)  # type: ignore[arg-type]
    finally:
        tdist.barrier()
        tdist.destroy_process_group()
