"""Render dataset cards (README.md with Hub YAML front matter) from a version's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCardData

CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(CARDS_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def card_front_matter(manifest: dict[str, Any]) -> str:
    """YAML the Hub reads: `configs` (data_files per split), `dataset_info`, license, task categories."""
    card = manifest.get("card", {})
    configs, infos = [], []
    for i, (config, splits) in enumerate(manifest["configs"].items()):
        entry: dict[str, Any] = {
            "config_name": config,
            "data_files": [{"split": s, "path": f"{config}/{s}-*.parquet"} for s in splits],
        }
        if config == card.get("default_config") or (i == 0 and not card.get("default_config")):
            entry["default"] = True
        configs.append(entry)
        infos.append(
            {
                "config_name": config,
                "features": manifest.get("features", {}).get(config, []),
                "splits": [{"name": s, "num_examples": info["num_rows"]} for s, info in splits.items()],
            }
        )
    data = DatasetCardData(
        license=card.get("license"),
        task_categories=card.get("task_categories"),
        language=card.get("language", ["en"]),
        pretty_name=card.get("pretty_name", manifest["name"]),
        tags=card.get("tags"),
        configs=configs,
        dataset_info=infos,
    )
    return data.to_yaml()


def render_dataset_card(manifest: dict[str, Any], template: str = "dataset_card.md.j2") -> str:
    body = _environment().get_template(template).render(m=manifest, card=manifest.get("card", {}))
    return f"---\n{card_front_matter(manifest)}\n---\n\n{body}"


def render_model_card(context: dict[str, Any], template: str = "model_card.md.j2") -> str:
    return _environment().get_template(template).render(**context)
