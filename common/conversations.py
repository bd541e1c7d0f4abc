"""A dialogue history as every script writes it into its prompts (``User: ... / System: ...``)."""

from __future__ import annotations


def render_history(history: list[dict]) -> str:
    if not history:
        return "(no messages yet)"
    return "\n".join(f"{'User' if m['role'] == 'user' else 'System'}: {m['content']}" for m in history)
