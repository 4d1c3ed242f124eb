"""The README's settings table is the reference people read: it must list every
setting with its current default."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_lists_every_setting_with_its_default():
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in README.read_text().splitlines()
        if line.startswith("| `RLHF_")
    }
    for name, field in Settings.model_fields.items():
        variable = f"`RLHF_{name.upper()}`"
        assert variable in rows, f"README settings table lacks {variable}"
        expected = "unset" if field.default is None else f"`{field.default}`"
        assert rows[variable] == expected, f"{variable}: README says {rows[variable]}"
