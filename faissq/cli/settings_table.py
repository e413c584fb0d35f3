"""Render the Settings model as the Markdown table in the README (kept true by a test)."""

from __future__ import annotations

from pydantic import BaseModel

from faissq.config import Settings

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One row per leaf field: variable, default, description."""
    rows: list[str] = []
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, f"{env}__"))
            continue
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `{env}` | {shown} | {field.description or ''} |")
    return rows


def settings_table() -> str:
    """The whole table, between its begin/end markers."""
    lines = [BEGIN, "| variable | default | meaning |", "|---|---|---|"]
    lines += _rows(Settings, "FAISSQ_")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
