"""What DCKD and ADPA do around `train_and_save`: resolve the preference lineage, build pair features, load the
student, and after training evaluate preference accuracy (and the DPO teacher's reward margin) on held-out
pairs plus DFAR accuracy / F1 when the pairs were built from DFAR."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.store import DatasetStore, Version
from train.config import PreferenceDistillConfig
from train.data import ListDataset
from train.losses.preference import PreferenceLoss
from train.preference_distill import PairCollator, PairSide, pair_features, preference_parent
from train.run_folder import RunFolder, version_record
from train.runner import Prepared, RunResult, finished_result, train_and_save


def prepare_pairs(cfg: PreferenceDistillConfig, store: DatasetStore, source: Version,
                  pairs: list[tuple[PairSide, PairSide]], *, template: str, check_tokenizer: Callable[[Any], str],
                  tokenizer: Any | None = None, facts: dict[str, Any] | None = None) -> Prepared:
    """Features of the training pairs, the student (after its tokenizer is checked) and the evaluation rows."""
    from curate.models import load_tokenizer
    from train.modeling import load_student, model_ref

    notes: list[str] = []
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_ref(cfg.model, cfg.gguf_file, cfg.revision))
    fingerprint = check_tokenizer(tok)  # before any model is loaded: a mismatch is one line, at once
    feats = pair_features(pairs, cfg.max_length, notes)
    if not feats:
        raise CurateError(f"{source.ref} split {cfg.train_split!r} has no usable pairs")
    preferences, pairs_config = preference_parent(store, source)
    used = {cfg.train_split: len(feats)}
    datasets = [version_record(source, "default", used), version_record(preferences, pairs_config)]
    eval_rows = None
    dfar = _labelled_parent(store, preferences)
    if cfg.evaluate and dfar is not None and cfg.eval_split in dfar[0].splits(dfar[1]):
        from train.evaluate import read_eval_rows

        eval_rows = read_eval_rows(store, dfar[0].ref, dfar[1], cfg.eval_split, cfg.eval_limit, None)
        datasets.append(version_record(dfar[0], dfar[1], {f"{cfg.eval_split} (evaluation)": len(eval_rows.labels)}))
    model, tok, loaded = load_student(cfg, tok)
    loaded.update(tokenizer_fingerprint=fingerprint, preferences=preferences.ref, **(facts or {}))
    return Prepared(model=model, tokenizer=tok, train_dataset=ListDataset(feats), eval_dataset=None,
                    collator=PairCollator(tok.pad_token_id), datasets=datasets, facts=loaded, eval_rows=eval_rows,
                    template=template, notes=notes)


def _labelled_parent(store: DatasetStore, preferences: Version) -> tuple[Version, str] | None:
    """The labelled dataset (and config) a DFAR-built preferences version came from, for accuracy / F1."""
    for p in preferences.manifest.get("parents") or []:
        found = store.find_by_hash(p["name"], p["content_hash"])
        if found is not None and p.get("config") in found.configs():
            return found, p["config"]
    return None


def teacher_run(teacher: str | None) -> str | None:
    """The DPO run folder behind a cache's recorded teacher (its `merged` folder), if it is one."""
    from train.modeling import RUN_FILE

    if not teacher:
        return None
    p = Path(teacher)
    for cand in (p, p.parent):
        if (cand / RUN_FILE).is_file():
            return str(cand)
    return None


def preference_eval_step(cfg: PreferenceDistillConfig, preferences: str, teacher: str | None, template: str,
                         notes: list[str]) -> Callable[[Any, Any, RunFolder], tuple[str, dict[str, Any], list[Path]]]:
    """`train_and_save`'s extra evaluation: held-out preference accuracy of the trained student and, when the
    teacher is a DPO run, its reward margin under the teacher's reference and beta (and the teacher's own)."""

    def step(model: Any, tok: Any, run: RunFolder) -> tuple[str, dict[str, Any], list[Path]]:
        from train.preference_eval import (
            PreferenceEvalConfig,
            dpo_facts,
            preference_metrics,
            read_pairs,
            run_info,
            score_pairs,
            tokenize_pairs,
            write_preference_eval,
        )

        store = DatasetStore(cfg.store)
        version = store.get(preferences)
        table = read_pairs(version, "pairs", cfg.eval_split, cfg.eval_limit)
        pairs = tokenize_pairs(tok, table, template=template, max_length=cfg.max_length, append_eos=False,
                               where=f"{version.ref} pairs/{cfg.eval_split}")
        policy = score_pairs(model, tok, pairs.pairs, batch_size=cfg.batch_size)
        reference = teacher_scores = None
        run_dir = teacher_run(teacher)
        ref_path, beta = dpo_facts(run_info(run_dir))
        if run_dir is None or ref_path is None or beta is None:
            notes.append(f"no reward margin: the cached teacher {teacher} is not a DPO run folder reachable "
                         "from here (its reference and beta are unknown)")
        else:
            from train.preference_eval import load_model

            ecfg = PreferenceEvalConfig(device=cfg.device, dtype=cfg.dtype)
            reference = score_pairs(load_model(str(ref_path), ecfg)[0], tok, pairs.pairs, batch_size=cfg.batch_size)
            teacher_scores = score_pairs(load_model(run_dir, ecfg)[0], tok, pairs.pairs, batch_size=cfg.batch_size)
        metrics, records = preference_metrics([p.id for p in pairs.pairs], policy, reference, beta, teacher_scores)
        plot = write_preference_eval(run.path / "preference_eval", metrics, records, title=run.path.name)
        return "preference_eval", metrics, [plot]

    return step


def run_preference_distill(cfg: PreferenceDistillConfig, data_name: str, prepare: Callable[[], Prepared],
                           loss: PreferenceLoss, trainer_cls: type, *, console: Any = None) -> RunResult:
    """Run folder first (refusals before any step), then prepare, train, save and evaluate."""
    run = RunFolder.prepare(cfg, data_name)
    if (done := finished_result(run, console)) is not None:  # before the model loads
        return done
    prep = prepare()
    kwargs: dict[str, Any] = {"pref_loss": loss}
    teacher = prep.facts.get("teacher")
    if cfg.on_policy:
        from train.on_policy import OnPolicyRejected

        check_same_teacher(cfg.teacher_model, teacher, "--teacher-model", "teacher")
        check_same_teacher(cfg.reference_model, prep.facts.get("reference"), "--reference-model", "reference")
        kwargs["on_policy"] = OnPolicyRejected.from_config(cfg, prep.tokenizer, loss)
    step = None
    preferences = DatasetStore(cfg.store).get(prep.facts["preferences"])
    if cfg.eval_split in preferences.splits("pairs"):
        step = preference_eval_step(cfg, preferences.ref, teacher, prep.template, prep.notes)
    elif cfg.evaluate:
        prep.notes.append(f"no preference evaluation: {preferences.ref} has no {cfg.eval_split!r} pairs (build it "
                          "with a test split, e.g. --test-fraction)")
    return train_and_save(cfg, prep, trainer_cls, run, trainer_kwargs=kwargs, console=console, extra_eval=step)


def check_same_teacher(given: str | None, recorded: str | None, flag: str, role: str) -> None:
    """--on-policy scores new samples with `given`; refuse a model other than the one the offline rows came
    from (a run would otherwise mix two teachers)."""
    from train.modeling import model_ref

    if given is None or recorded is None:
        return
    same = Path(model_ref(given).location).resolve() == Path(model_ref(recorded).location).resolve() \
        if Path(given).exists() and Path(recorded).exists() else given == recorded
    if not same:
        raise CurateError(f"{flag} {given} is not the {role} the offline rows were scored with ({recorded}): "
                          "one run would mix two teachers")
