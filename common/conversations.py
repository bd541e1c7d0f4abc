"""A dialogue as every script writes it: a dataset's turns as chat messages, and a history as prompts render it."""

from __future__ import annotations


def chat_roles(turns, *, one_line: bool = False) -> list[dict]:
    """A dataset dialogue's turns (``Turn``, common/formats.py) as chat messages, the recommender's side: the seeker
    is "user", the recommender "assistant"; turns without text are left out. ``one_line`` squeezes each text's
    whitespace into single spaces, for prompts that write one message per line (``render_history``)."""
    return [
        {
            "role": "user" if t.role == "seeker" else "assistant",
            "content": " ".join(t.text.split()) if one_line else t.text,
        }
        for t in turns
        if t.text.strip()
    ]


def render_history(history: list[dict]) -> str:
    if not history:
        return "(no messages yet)"
    return "\n".join(f"{'User' if m['role'] == 'user' else 'System'}: {m['content']}" for m in history)
