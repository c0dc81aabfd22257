"""ETHICS builder on the real data: all five subsets, the common view, the missing cm_train.csv."""

from __future__ import annotations

import pytest

from builders.ethics import EthicsConfig, build_ethics
from curate.sql_views import query


@pytest.fixture(scope="module")
def ethics(tmp_path_factory):
    from curate.store import DatasetStore

    from .conftest import shared

    st = DatasetStore(tmp_path_factory.mktemp("ethics-store"))
    return build_ethics(st, shared("ethics")), st


def test_all_subsets_and_splits(ethics) -> None:
    r, st = ethics
    v = r.version
    assert set(v.configs()) == {"commonsense", "deontology", "justice", "utilitarianism", "virtue", "text_label",
                              "instruct"}
    assert v.splits("commonsense") == ["test", "test_hard", "ambig"]
    assert v.splits("virtue") == ["train", "test", "test_hard"]
    # row counts equal the real files' line counts (one header line; utilitarianism has none)
    assert v.manifest["configs"]["justice"]["train"]["num_rows"] == 21791
    assert v.manifest["configs"]["utilitarianism"]["train"]["num_rows"] == 13738
    assert v.manifest["configs"]["virtue"]["train"]["num_rows"] == 28245


def test_missing_file_is_recorded(ethics) -> None:
    r, _ = ethics
    assert r.version.manifest["params"]["missing_files"] == ["commonsense/cm_train.csv"]
    assert any("cm_train.csv" in n for n in r.notes)
    assert "cm_train.csv" in r.version.card_path.read_text()


def test_schemas(ethics) -> None:
    _, st = ethics
    v = query("SELECT scenario, trait, label FROM ethics__virtue WHERE split='train' LIMIT 1", st).row(0)
    assert "[SEP]" not in v[0] and v[1] == "discredit" and v[2] == 0
    d = query("SELECT excuse FROM ethics__deontology LIMIT 1", st).item()
    assert d.startswith("No because")
    amb = query("SELECT count(*), count(label) FROM ethics__commonsense WHERE split='ambig'", st).row(0)
    assert amb == (995, 0)  # 995 quoted multi-line records
    util = query("SELECT baseline, less_pleasant FROM ethics__utilitarianism WHERE split='test' LIMIT 1", st).row(0)
    assert util[0].startswith("I applied to adopt")


def test_text_label_view(ethics) -> None:
    _, st = ethics
    df = query("SELECT subset, count(*) AS n FROM ethics GROUP BY ALL ORDER BY 1", st)
    assert df["subset"].to_list() == ["commonsense", "deontology", "justice", "virtue"]
    assert query("SELECT count(*) FROM ethics WHERE label IS NULL", st).item() == 0


def test_subset_selection(store, ethics_source) -> None:
    r = build_ethics(store, ethics_source, EthicsConfig(subsets=("justice",), limit=10))
    assert set(r.version.configs()) == {"justice", "text_label", "instruct"}
    assert r.version.num_rows("justice") == 30
