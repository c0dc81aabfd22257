"""Render dataset cards (README.md with Hub YAML front matter) from a version's manifest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCardData
from markupsafe import Markup, escape

CARDS_DIR = Path(__file__).resolve().parent / "templates"  # package data: ships in the wheel
# Templates whose every `{{ value }}` is HTML-escaped: dataset cards quote data rows (duplicate statements,
# source paths, a pulled manifest's fields), and the Hub renders a card's Markdown, raw HTML included.
AUTOESCAPED = ("dataset_card.md.j2",)


def code_span(value: object, table: bool = False) -> Markup:
    """`value` as a Markdown inline code span: literal text (HTML inside is shown, not run), on one line,
    fenced with more backticks than any run inside it (CommonMark's rule) so it cannot close early; in a
    table (`table=True`) `|` is escaped too, which GFM requires even inside code spans."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if table:
        text = text.replace("|", "\\|")
    return Markup(f"{fence}{pad}{text}{pad}{fence}")


def table_cell(value: object) -> Markup:
    """Text for a Markdown table cell: HTML-escaped, `|` escaped, on one line."""
    return Markup(str(escape(" ".join(str(value).splitlines()))).replace("|", "\\|"))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(CARDS_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=lambda name: name in AUTOESCAPED,
    )
    env.filters["code"] = code_span
    env.filters["cell"] = table_cell
    return env


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
