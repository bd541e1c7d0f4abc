"""common/conversations.py: a dataset dialogue's turns as chat messages, and a history as prompts render it."""

from common.conversations import chat_roles, render_history
from common.formats import Turn


def test_chat_roles_take_the_recommenders_side_and_leave_out_empty_turns():
    turns = [Turn("seeker", "Hi!  Any\nthriller?"), Turn("recommender", "  "), Turn("recommender", "Try Heat (1995).")]
    assert chat_roles(turns) == [
        {"role": "user", "content": "Hi!  Any\nthriller?"},  # the text as the dataset has it
        {"role": "assistant", "content": "Try Heat (1995)."},
    ]
    squeezed = chat_roles(turns, one_line=True)
    assert squeezed[0]["content"] == "Hi! Any thriller?"  # one line per message, as render_history writes them
    assert render_history(squeezed) == "User: Hi! Any thriller?\nSystem: Try Heat (1995)."
    assert render_history([]) == "(no messages yet)"
