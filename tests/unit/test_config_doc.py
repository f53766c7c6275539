"""docs/config.md is generated from the typed config (``python -m avatar.config_doc``, ``make docs``): this test fails
when the file no longer matches the declarations, so the reference cannot drift."""

from __future__ import annotations

from avatar import config_doc
from avatar.config import PathKind, Range
from avatar.validate import RULES, _field_type, declared_fields


def test_docs_config_md_is_current():
    text = config_doc.render()
    current = config_doc.DEFAULT_PATH.read_text(encoding="utf-8")
    assert current == text, "docs/config.md is stale: run `make docs` (python -m avatar.config_doc --write)"


def test_every_field_and_rule_is_in_the_reference():
    text = config_doc.render()
    keys = [key for key, _, _ in declared_fields()]
    assert len(keys) > 100
    for key, f, hint in declared_fields():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        declared = f.metadata.get("range") or f.metadata.get("path")
        if isinstance(declared, Range):
            assert declared.describe(_field_type(hint)[0] is int) in row, row
        elif isinstance(declared, PathKind):
            assert f"{declared.value}: " in row, row
    for rule in RULES:
        assert rule.text in text


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert config_doc.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_doc.main(["--write", str(stale)]) == 0
    assert config_doc.main(["--check", str(stale)]) == 0
