"""Offline knowledge distillation from a teacher-logit cache version (`curate cache-teacher-logits`).

loss = alpha · CE(student, gold completion tokens) + (1 - alpha) · T² · D(teacher_T ‖ student_T)

with D one of `train/losses/` on the sparse top-k + residual view (``kd_target=tokens``) or on the label
verbalizers at the answer position (``kd_target=labels``). The teacher is never run and never densified.
Before any step the student's tokenizer must have the cache's fingerprint (otherwise cached ids and
positions mean different tokens) and the cache's parent dataset version must be in the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer

from curate.errors import CurateError
from curate.store import DatasetStore, Version
from train.config import KDConfig
from train.data import ListDataset
from train.kd_data import KDCollator, kd_features
from train.losses import DistillationLoss, get_loss
from train.run_folder import RunFolder, version_record
from train.runner import Prepared, RunResult, finished_result, step_token_scale, train_and_save
from train.token_rows import completion_ce, logprobs_at, supervised_positions

log = logging.getLogger(__name__)


def ce_and_distillation(logprobs: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor,
                        inputs: dict[str, Any], *, kd_loss: DistillationLoss, temperature: float,
                        kd_target: str = "tokens", label_token_ids: list[int] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold-token CE and the mean T²·D, over completion positions (tokens) or labelled examples (labels).

    ``logprobs`` [N, V] are the student's at the supervised (rows, pos); gold ids and teacher top-k ids are
    gathered in one pass, so KD costs one [N, k + 1] gather (and its backward scatter) where SFT pays [N, 1].
    """
    t = pos - inputs["answer_pos"][rows]  # cache row index: logits at prompt_len - 1 + t
    vocab = logprobs.shape[-1]
    if kd_target == "tokens":
        top_ids = inputs["kd_ids"][rows, t]
        tail = "kd_tail_ids" in inputs and kd_loss.uses_tail(temperature)
        tail_ids = [inputs["kd_tail_ids"][rows, t].clamp(min=0)] if tail else []  # -1 (no draw) is masked below
        picked = logprobs.gather(-1, torch.cat([top_ids, *tail_ids, targets.unsqueeze(-1)], dim=-1))
        ce = -picked[:, -1].mean()
        k = top_ids.shape[-1]
        if "kd_weights" in inputs:  # sampled cache: the loss's unbiased estimator over the drawn ids
            return ce, kd_loss.sampled_token_loss(picked[:, :-1], inputs["kd_logprobs"][rows, t],
                                                  inputs["kd_weights"][rows, t], temperature).mean()
        per = kd_loss.token_loss(picked[:, :k], inputs["kd_logprobs"][rows, t], inputs["kd_residual"][rows, t],
                                 temperature, complete=k >= vocab)
        if tail:  # the chain-rule tail term: with it the estimate of the full KL is unbiased
            per = per + kd_loss.tail_token_loss(picked[:, :k], inputs["kd_logprobs"][rows, t], picked[:, k:-1],
                                                inputs["kd_tail_ids"][rows, t] >= 0, inputs["kd_residual"][rows, t],
                                                inputs["kd_entropy"][rows, t])
        return ce, per.mean()
    if "label_token_ids" in inputs:  # per-subset words: each row's own label tokens [N, C]
        labels = inputs["label_token_ids"][rows]
    else:
        labels = torch.tensor(label_token_ids or [], dtype=torch.long, device=logprobs.device).expand(len(rows), -1)
    picked = logprobs.gather(-1, torch.cat([labels, targets.unsqueeze(-1)], dim=-1))
    ce = -picked[:, -1].mean()
    sel = (t == 0) & inputs["label_mask"][rows]
    if not bool(sel.any()):
        return ce, picked.sum() * 0.0
    teacher = inputs["label_logprobs"][rows[sel]]
    return ce, kd_loss.label_loss(picked[sel][:, :-1], teacher, temperature).mean()


class KDTrainer(Trainer):
    """`transformers.Trainer` whose loss mixes gold-token CE with a sparse distillation divergence."""

    loss_is_scaled_for_ga = None  # scaled by `step_token_scale` exactly when Trainer passes num_items_in_batch

    def __init__(self, *args: Any, kd_loss: DistillationLoss, alpha: float, temperature: float,
                 kd_target: str = "tokens", label_token_ids: list[int] | None = None, per_row_labels: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd_loss = kd_loss
        self.alpha = alpha
        self.temperature = temperature
        self.kd_target = kd_target
        self.label_token_ids = label_token_ids or []  # empty with per-row label ids (they come in the batch)
        if kd_target == "labels" and not self.label_token_ids and not per_row_labels:
            raise CurateError("--kd-target labels needs a cache with label_token_ids (a labelled parent dataset)")
        self._parts = {"ce": 0.0, "kd": 0.0, "n": 0}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        rows, pos, targets = supervised_positions(inputs["labels"])
        logprobs = logprobs_at(model, inputs["input_ids"], inputs["attention_mask"], rows, pos)
        scale = step_token_scale(self, targets.numel(), num_items_in_batch)
        if self.alpha < 1.0 and rows.numel():
            ce, kd = ce_and_distillation(logprobs, rows, pos, targets, inputs, kd_loss=self.kd_loss,
                                         temperature=self.temperature, kd_target=self.kd_target,
                                         label_token_ids=self.label_token_ids)
            # label KD is a mean over examples, not tokens: its share of an accumulated step is 1 / steps
            kd_scale = (scale if self.kd_target == "tokens" or num_items_in_batch is None
                        else 1.0 / self.current_gradient_accumulation_steps)
            loss = self.alpha * ce * scale + (1.0 - self.alpha) * kd * kd_scale
        else:  # the no-teacher baseline: same data and code path, no KD term computed
            ce = completion_ce(logprobs, targets)
            kd = torch.zeros((), device=ce.device)
            loss = ce * scale
        if model.training:
            self._parts["ce"] += float(ce.detach())
            self._parts["kd"] += float(kd.detach())
            self._parts["n"] += 1
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the CE and KD parts (averaged since the last log) next to the combined training loss."""
        if "loss" in logs and self._parts["n"]:
            logs["ce"] = self._parts["ce"] / self._parts["n"]
            logs["kd"] = self._parts["kd"] / self._parts["n"]
            self._parts = {"ce": 0.0, "kd": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)


def get_cache(store: DatasetStore, spec: str, recipe: str = "just cache-teacher-logits") -> Version:
    try:
        return store.get(spec)
    except CurateError as e:
        name = spec.partition("@")[0]
        if name in store.names():  # the dataset exists: the version asked for does not (the error lists them)
            raise
        raise CurateError(f"{e}; write a teacher-logit cache first: curate cache-logits ({recipe})") from None


def resolve_parent(store: DatasetStore, cache: Version) -> tuple[Version, dict[str, Any]]:
    """The dataset version the cache was computed from, by content hash; a clear error when it is missing."""
    parents = cache.manifest.get("parents") or []
    if not parents:
        raise CurateError(f"{cache.ref} records no parent dataset version; it cannot be used for KD")
    p = parents[0]
    found = store.find_by_hash(p["name"], p["content_hash"])
    if found is None:
        raise CurateError(
            f"{cache.ref} was computed from {p['name']}@{p.get('tag', '?')} (content hash {p['content_hash'][:16]}), "
            f"which is not in store {store.root}: rebuild it with the same inputs (just build-dfar) or pull it"
        )
    return found, p


def check_tokenizer(tok: Any, params: dict[str, Any], cache: Version, student: str) -> str:
    from curate.models import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    want = params.get("tokenizer_fingerprint")
    if fp != want:
        raise CurateError(
            f"student {student} has tokenizer fingerprint {fp[:12]} but {cache.ref} was cached with "
            f"{str(want)[:12]} (teacher {params.get('teacher')}): cached token ids would not line up; use a student "
            "that shares the teacher's tokenizer"
        )
    return fp


@dataclass
class KDPrepared(Prepared):
    """`Prepared` plus what the KD trainer needs from the cache, read once."""

    cache: Version | None = None
    label_token_ids: list[int] = field(default_factory=list)
    per_row_labels: bool = False  # the cache's subsets have their own label words (ids per row)


def cache_template(cfg: Any, cache: Version, params: dict[str, Any], *, method: str = "KD",
                   source: str = "cache") -> str:
    """The cache's template: KD (and DCKD, ADPA on an advantage table) train on the cached token ids, so a
    different ``cfg.template`` is refused."""
    template = params.get("template", "plain")
    if cfg.template is not None and cfg.template != template:
        raise CurateError(f"template {cfg.template!r} differs from {cache.ref}'s {template!r}: {method} trains on "
                          f"the {source}'s tokenization; leave template out (or set it to the {source}'s)")
    return template


def prepare_kd(cfg: KDConfig, tokenizer: Any | None = None, *, cache: Version | None = None) -> KDPrepared:
    """Resolve cache + parent, refuse a mismatched tokenizer, build features, then load the student."""
    from curate.logit_codec import cache_params, load_cache
    from curate.models import load_tokenizer
    from train.modeling import load_student, model_ref

    store = DatasetStore(cfg.store)
    cache = cache if cache is not None else get_cache(store, cfg.cache)
    params = cache_params(cache)
    template = cache_template(cfg, cache, params)
    parent, parent_rec = resolve_parent(store, cache)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_ref(cfg.model, cfg.gguf_file, cfg.revision))
    fingerprint = check_tokenizer(tok, params, cache, cfg.model)
    label_ids = [int(x) for x in params.get("label_token_ids") or []]
    by_subset = {s: [int(x) for x in ids] for s, ids in (params.get("label_token_ids_by_subset") or {}).items()}
    num_labels = len(label_ids) or max((len(ids) for ids in by_subset.values()), default=0)
    if cfg.kd_target == "labels" and not num_labels:
        raise CurateError(f"--kd-target labels: {cache.ref} has no label_token_ids (its parent has no labels)")
    kd_loss = get_loss(cfg.loss)
    if params.get("select") == "sample" and cfg.kd_target == "tokens":
        kd_loss.check_sampled(cfg.temperature)  # a one-line refusal before any training
    tail_note = None
    if params.get("tail_samples") and cfg.kd_target == "tokens" and not kd_loss.uses_tail(cfg.temperature):
        tail_note = (f"{cache.ref} has tail draws; --loss {cfg.loss} at --temperature {cfg.temperature} cannot use "
                     "them (only forward_kl at temperature 1 has their estimator): trained on the kept ids + bucket")
    all_ids = label_ids + [i for ids in by_subset.values() for i in ids]
    if all_ids and max(all_ids) >= len(tok):
        raise CurateError(f"{cache.ref} label token ids {all_ids} are outside the student's vocabulary")
    # which cache is said up front: without --cache the latest version of the default name is taken
    log.info("distilling from %s (teacher %s, split %s)", cache.ref, params.get("teacher"), cfg.train_split)
    examples = load_cache(cache, cfg.train_split)
    parent_config = parent_rec.get("config") or params.get("parent_config")
    notes = [tail_note] if tail_note else []
    examples = _mix_by_subset(cfg, examples, parent, parent_config, notes)
    if cfg.limit:
        examples = examples[: cfg.limit]
    feats = [f for f in (kd_features(e, cfg.max_length) for e in examples) if f is not None]
    if len(feats) < len(examples):
        notes.append(f"{len(examples) - len(feats)} cached rows dropped: no completion token within max_length")
    if not feats:
        raise CurateError(f"{cache.ref} split {cfg.train_split!r} has no usable rows")
    if cfg.kd_target == "labels" and not any("label_logprobs" in f for f in feats):
        raise CurateError(f"--kd-target labels: no row of {cache.ref} carries label log-probs")
    used = {cfg.train_split: len(examples)}
    eval_ds = None
    if cfg.eval_steps and cfg.eval_split in cache.splits("default"):
        ev = load_cache(cache, cfg.eval_split)[: cfg.eval_limit or None]
        eval_ds = ListDataset([f for f in (kd_features(e, cfg.max_length) for e in ev) if f is not None])
    eval_rows = None
    if cfg.evaluate and parent_config and cfg.eval_split in parent.splits(parent_config):
        from train.evaluate import read_eval_rows

        eval_rows = read_eval_rows(store, f"{parent.name}@{parent.tag}", parent_config, cfg.eval_split,
                                   cfg.eval_limit, cfg.subsets or params.get("subsets"))
        used[f"{cfg.eval_split} (evaluation, parent)"] = len(eval_rows.labels)
    model, tok, facts = load_student(cfg, tok)
    facts.update(tokenizer_fingerprint=fingerprint, teacher=params.get("teacher"), cache_k=params.get("k"),
                 cache_quantization=params.get("quantization"))
    datasets = [version_record(cache, "default", used), version_record(parent, parent_config)]
    return KDPrepared(model=model, tokenizer=tok, train_dataset=ListDataset(feats), eval_dataset=eval_ds,
                      collator=KDCollator(tok.pad_token_id, num_labels=num_labels, per_row_labels=bool(by_subset)),
                      datasets=datasets,
                      facts=facts, eval_rows=eval_rows, template=template, notes=notes,
                      label_prefix=params.get("label_prefix", " "), cache=cache, label_token_ids=label_ids,
                      per_row_labels=bool(by_subset))


def _mix_by_subset(cfg: KDConfig, examples: list[Any], parent: Version, parent_config: str | None,
                   notes: list[str]) -> list[Any]:
    """Cached rows of the chosen subsets of the parent (by id), in the seeded order SFT uses; unchanged when
    the parent has no subset column."""
    from train.data import check_subsets, mix_rows

    table = (parent.read(parent_config, cfg.train_split)
             if parent_config and cfg.train_split in parent.splits(parent_config) else None)
    if table is None or "subset" not in table.column_names:
        if cfg.subsets:
            raise CurateError(f"{parent.ref} {parent_config}/{cfg.train_split} has no subset column: "
                              "--subsets does not apply")
        return examples
    by_id = dict(zip(table["id"].to_pylist(), table["subset"].to_pylist(), strict=True))
    subsets = sorted({by_id.get(e.id) for e in examples} - {None})
    if cfg.subsets:
        check_subsets(cfg.subsets, subsets, f"{parent.ref} {parent_config}/{cfg.train_split} (cached rows)")
        examples = [e for e in examples if by_id.get(e.id) in cfg.subsets]
    examples = [examples[i] for i in mix_rows(len(examples), cfg.seed)]
    counts = {s: sum(by_id.get(e.id) == s for e in examples) for s in sorted(cfg.subsets or subsets)}
    notes.append(f"subsets mixed in seeded order (seed {cfg.seed}): "
                 + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return examples


def run_kd(cfg: KDConfig, *, tokenizer: Any | None = None, console: Any = None) -> RunResult:
    """One KD run end to end: checks first (cache, parent, tokenizer), then train, save, evaluate."""
    cache = get_cache(DatasetStore(cfg.store), cfg.cache)
    run = RunFolder.prepare(cfg, f"{cache.name}-{cache.tag}")
    if (done := finished_result(run, console)) is not None:  # before the model loads
        return done
    # Every refusal (template, parent, tokenizer, labels) happens here, before a step.
    prep = prepare_kd(cfg, tokenizer, cache=cache)
    kwargs = {"kd_loss": get_loss(cfg.loss), "alpha": cfg.alpha, "temperature": cfg.temperature,
              "kd_target": cfg.kd_target, "label_token_ids": prep.label_token_ids,
              "per_row_labels": prep.per_row_labels}
    return train_and_save(cfg, prep, KDTrainer, run, trainer_kwargs=kwargs, console=console)
