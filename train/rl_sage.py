"""`curate train rl-sage`: online RL of a small model with a SaGE-consistency reward.

Trainer: TRL's ``GRPOTrainer``. The installed TRL no longer ships PPO; of its group-based online trainers
GRPO is the one whose reward functions receive the dataset's own columns (``question_id``) next to the
sampled completions, which is exactly what a *paraphrase-group* reward needs, and with ``beta = 0`` (the
default here) it keeps no reference model, so a CPU run holds one copy of the weights. RLOO's leave-one-out
baseline would work too but offers nothing extra for this reward.

Reward: rows are the paraphrases of each question, kept in question order (``shuffle_dataset=False``) so a
generation batch holds whole questions when ``batch_size × grad_accum / num_generations`` is a multiple of
``paraphrases``. A sampled answer's reward is its share of the SaGE graph: the mean edge weight
(``0.8·cos(answers) + 0.2·cos(RoTs)``, answers alone without an RoT model) to every *other* non-empty answer
of the same question in the batch, other paraphrases and other samples alike. Empty answers get 0 and are not
part of anyone's group (the scorer leaves them out too). Optional terms: a format term (``format_weight``,
1 for a non-empty answer that ended before the length limit) and GRPO's KL penalty (``kl_beta``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import CurateError
from train.config import RLSageConfig
from train.run_folder import RunFolder

log = logging.getLogger(__name__)


def group_consistency(question_ids: Sequence[object], answer_emb: np.ndarray, rot_emb: np.ndarray | None = None,
                      empty: Sequence[bool] | None = None, *, w_answer: float = 0.8,
                      w_rot: float = 0.2) -> list[float]:
    """Per answer: mean edge weight to the other non-empty answers of its question (0 when it has none or is
    empty). Embeddings are unit rows, so cosines are dot products."""
    a = np.asarray(answer_emb, dtype=np.float64)
    w = a @ a.T
    if rot_emb is not None:
        r = np.asarray(rot_emb, dtype=np.float64)
        w = w_answer * w + w_rot * (r @ r.T)
    n = len(question_ids)
    is_empty = np.zeros(n, dtype=bool) if empty is None else np.asarray(empty, dtype=bool)
    qids = np.asarray([str(q) for q in question_ids])
    out = []
    for i in range(n):
        if is_empty[i]:
            out.append(0.0)
            continue
        peers = (qids == qids[i]) & ~is_empty
        peers[i] = False
        out.append(float(w[i, peers].mean()) if peers.any() else 0.0)
    return out


class SageReward:
    """The GRPO reward function: ``(prompts, completions, question_id=..., **kw) -> list[float]``.

    With ``rot_model`` the RoT of every non-empty answer comes from the LLM client (cached, retried); without
    it the reward needs nothing but the embedding model (offline). Keeps the last batch's mean for logging.
    """

    __name__ = "sage_consistency"  # TRL names the logged reward column after the function

    def __init__(self, embedding_model: str, *, rot_client: Any = None, format_weight: float = 0.0,
                 max_completion_tokens: int | None = None, tokenizer: Any = None) -> None:
        from curate.sage import resolve_embedding_model

        self.encoder = resolve_embedding_model(embedding_model)
        self.rot_client = rot_client
        self.format_weight = format_weight
        self.max_tokens = max_completion_tokens
        self.tokenizer = tokenizer
        self.history: list[float] = []

    def _rots(self, prompts: list[str], answers: list[str], empty: list[bool]) -> list[str]:
        from curate.prompts import clean_rot, rot_messages

        todo = [i for i, e in enumerate(empty) if not e]
        replies = self.rot_client.complete_many([rot_messages(prompts[i], answers[i]) for i in todo])
        rots = [""] * len(answers)
        for i, rep in zip(todo, replies, strict=True):
            rots[i] = clean_rot(rep.text) if rep.ok else ""
        return rots

    def __call__(self, prompts: list[Any], completions: list[Any], question_id: list[Any] | None = None,
                 paraphrased: list[str] | None = None, completion_ids: list[list[int]] | None = None,
                 **_: Any) -> list[float]:
        from curate.sage import embed_texts

        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        answers = [t.strip() for t in texts]
        empty = [not t for t in answers]
        qids = question_id if question_id is not None else list(range(len(answers)))
        emb = embed_texts([t or " " for t in answers], self.encoder)
        rot_emb = None
        if self.rot_client is not None:
            rots = self._rots(paraphrased or [str(p) for p in prompts], answers, empty)
            empty = [e or not r for e, r in zip(empty, rots, strict=True)]
            rot_emb = embed_texts([r or " " for r in rots], self.encoder)
        rewards = group_consistency(qids, emb, rot_emb, empty)
        if self.format_weight and completion_ids is not None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            for i, ids in enumerate(completion_ids):
                ended = (eos in ids) or (self.max_tokens is not None and len(ids) < self.max_tokens)
                rewards[i] += self.format_weight * float(ended and not empty[i])
        self.history.append(float(np.mean(rewards)) if rewards else float("nan"))
        return rewards


def prompt_rows(cfg: RLSageConfig, tok: Any) -> tuple[Any, dict[str, Any], str]:
    """The training dataset (prompt text, question_id, paraphrased) in question order, its lineage record,
    and a label for the run folder name."""
    import polars as pl
    from datasets import Dataset

    from builders.sage_eval import prompt_ids, read_questions
    from curate.store import DatasetStore

    store = DatasetStore(cfg.store)
    df, sources, parents, described = read_questions(cfg.questions, store, limit=cfg.limit_questions)
    df = df.filter(pl.col("paraphrase_idx") < cfg.paraphrases)
    if df.height == 0:
        raise CurateError(f"{described}: no paraphrases to train on")
    texts = [tok.decode(prompt_ids(tok, p, cfg.template)) for p in df["paraphrased"]]
    ds = Dataset.from_dict({"prompt": texts, "question_id": df["question_id"].to_list(),
                            "paraphrased": df["paraphrased"].to_list()})
    if parents:  # a store dataset: recorded as any run records its data (`curate eval` finds it by hash)
        record = {**parents[0], "rows_used": {"train": df.height}}
    else:  # a question file: a dataset-shaped record (a valid name; never found in a store) with its source
        record = {"name": "sage-questions", "tag": None, "content_hash": sources[0].sha256, "config": None,
                  "rows_used": {"train": df.height}, "sources": [s.__dict__ for s in sources]}
    label = Path(cfg.questions).stem if Path(cfg.questions).suffix else cfg.questions
    return ds, record, label


def _rot_client(cfg: RLSageConfig, store_root: Path) -> Any:
    if not cfg.rot_model:
        return None
    from builders.sage_responses import _Endpoint
    from curate.llm import LLMClient, LLMConfig

    endpoint = _Endpoint.resolve(cfg.rot_base_url)
    from curate.store import DatasetStore

    return LLMClient(LLMConfig(model=cfg.rot_model, base_url=endpoint.url, temperature=0.0, max_tokens=128,
                               cache_dir=endpoint.cache_dir(DatasetStore(str(store_root)))))


def run_rl_sage(cfg: RLSageConfig, console: Any = None) -> Any:
    """Train with GRPO and the SaGE reward; the run folder holds the adapter (or merged weights), run.json,
    metrics.json (reward per step) and a reward plot. Returns `train.runner.RunResult`."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from curate.store import DatasetStore
    from train.modeling import load_student
    from train.runner import RunResult, train_interruptibly

    say: Callable[..., None] = console.print if console is not None else (lambda *a, **k: None)
    cfg.validate()
    model, tok, facts = load_student(cfg)
    tok.padding_side = "left"  # generation pads on the left
    ds, record, label = prompt_rows(cfg, tok)
    run = RunFolder.prepare(cfg, label)
    store = DatasetStore(cfg.store)
    reward = SageReward(cfg.embedding_model, rot_client=_rot_client(cfg, store.root),
                        format_weight=cfg.format_weight, max_completion_tokens=cfg.max_completion_length,
                        tokenizer=tok)
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(run.checkpoints), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, report_to="none", use_cpu=use_cpu,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.rl_temperature, beta=cfg.kl_beta, shuffle_dataset=False, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=not use_cpu, max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup, lr_scheduler_type=cfg.lr_scheduler, weight_decay=cfg.weight_decay,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    run.start(cfg, [record], {**facts, "method": cfg.method, "template": cfg.template,
                              "trainer": "trl.GRPOTrainer", "reward": "sage_consistency"})
    resume = str(run.resume_from) if cfg.resume and run.resume_from else None
    output, seconds = train_interruptibly(trainer, run, cfg.method, resume)
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    for i, r in enumerate(rewards, 1):
        say(f"step {i}: mean SaGE reward {r:.4f}", highlight=False)
    if cfg.use_lora:
        trainer.model.save_pretrained(str(run.adapter))
        tok.save_pretrained(str(run.adapter))
    if cfg.save_merged or not cfg.use_lora:
        merged = trainer.model.merge_and_unload() if cfg.use_lora else trainer.model
        merged.save_pretrained(str(run.merged))
        tok.save_pretrained(str(run.merged))
    metrics = {"train": {**output.metrics, "global_step": output.global_step, "wall_seconds": round(seconds, 2)},
               "reward_per_step": rewards, "log_history": trainer.state.log_history}
    run.write_json("metrics.json", metrics)
    _plot_rewards(rewards, run.plots / "reward.png", run.path.name)
    return RunResult(run, metrics)


def _plot_rewards(rewards: list[float], out: Path, title: str) -> Path | None:
    if not rewards:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(rewards) + 1), rewards, marker="o")
    ax.set(xlabel="step", ylabel="mean SaGE-consistency reward", title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out
