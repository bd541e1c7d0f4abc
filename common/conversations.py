"""The conversation harness every agent method plugs into: a CRA (any function from dialogue histories to replies)
talks with a user simulator (``ailo_sim.AILO``), batched across conversations, and each finished conversation is
written as one trajectory record. ``ecpo.py`` and ``rso.py`` run their agents through it; ``ailo_sim.py``'s CLI runs
a zero-shot CRA through it.

    trajectories = run_episodes(tasks, cra, simulator, max_turns=5, records=run.records("trajectories.jsonl"))
    episode_metrics(trajectories, max_turns)   # eval/sr, eval/recall, EC ratings per turn
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from tqdm import tqdm

from common.data import Task
from common.metrics import mentions_title, success_rate
from common.tracking import RecordFile


def render_history(history: list[dict]) -> str:
    if not history:
        return "(no messages yet)"
    return "\n".join(f"{'User' if m['role'] == 'user' else 'System'}: {m['content']}" for m in history)


@dataclass
class CRAReply:
    """What a CRA returns for one conversation turn."""

    text: str  # the user-visible response p_t
    retrieved: list[str] = field(default_factory=list)  # titles the CRA's retrieval returned this turn (for R)
    record: dict = field(default_factory=dict)  # anything the CRA wants kept with the turn (prompt, action, ...)


# A CRA maps (episode keys, histories) to one reply per conversation. Histories use chat roles from the
# CRA's side: "user" is the simulated user, "assistant" the CRA. Keys let a stateful CRA keep a scratchpad.
CRA = Callable[[list[str], list[list[dict]]], list[CRAReply]]


class Simulator(Protocol):
    """What the harness needs of a user simulator (``ailo_sim.AILO`` is one): ``start`` opens each task's
    conversation and returns its users and opening turns; ``step`` answers one CRA response per live user and
    rates it. A user has ``history`` (chat roles from the CRA's side) and ``ended``."""

    def start(self, tasks: list[Task]) -> tuple[list, list]: ...

    def step(self, users: list, cra_responses: list[str], final: bool = False) -> list: ...


def run_episodes(
    tasks: list[Task],
    cra: CRA,
    simulator: Simulator,
    max_turns: int,
    batch_size: int = 16,
    records: RecordFile | None = None,
    on_episode: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run each task's conversation for up to ``max_turns`` CRA responses, ``batch_size`` at a time.

    Returns one trajectory dict per task: per-turn system response, retrieval, user policy and reply,
    EC reason and rating, plus ``success`` (SR: a CRA response contains the target title) and ``recall``
    (R: the target appeared in a retrieval result). With ``records``, finished trajectories are appended as
    they complete and tasks already in the file are skipped (their stored trajectories are returned).
    """
    done = {r["key"]: r for r in records.records()} if records else {}
    todo = [t for t in tasks if t.task_id not in done]
    finished: dict[str, dict] = {}
    progress = tqdm(total=len(todo), desc="conversations", disable=not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        users, openings = simulator.start(chunk)
        trajectories = [
            {
                "key": t.task_id,
                "task_id": t.task_id,
                "user_id": t.persona.user_id,
                "target": t.target.title,
                "persona": asdict(t.persona),
                "opening": {"policy": o.policy, "user": o.response},
                "turns": [],
                "success": False,
                "recall": False,
            }
            for t, o in zip(chunk, openings)
        ]
        for turn in range(1, max_turns + 1):
            live = [i for i, u in enumerate(users) if not u.ended]
            if not live:
                break
            replies = cra([chunk[i].task_id for i in live], [list(users[i].history) for i in live])
            final = turn == max_turns
            answers = simulator.step([users[i] for i in live], [r.text for r in replies], final=final)
            for i, reply, answer in zip(live, replies, answers):
                target, trajectory = chunk[i].target.title, trajectories[i]
                trajectory["turns"].append(
                    {
                        "turn": turn,
                        "system": reply.text,
                        "retrieved": reply.retrieved,
                        "cra": reply.record,
                        "mentions_target": mentions_title(reply.text, target),
                        "user_policy": answer.policy,
                        "user": answer.response,
                        "ec_reason": answer.ec_reason,
                        "ec_rating": answer.ec_rating,
                        "end": answer.end,
                    }
                )
                trajectory["success"] |= mentions_title(reply.text, target)
                trajectory["recall"] |= target in reply.retrieved
                if users[i].ended:
                    trajectory["num_turns"] = turn
                    trajectory["ended_by_user"] = not final
                    finished[trajectory["key"]] = trajectory
                    if records:
                        records.append(trajectory)
                    if on_episode:
                        on_episode(trajectory)
                    progress.update(1)
    progress.close()
    return [done.get(t.task_id) or finished[t.task_id] for t in tasks]


def episode_metrics(trajectories: list[dict], max_turns: int) -> dict[str, float]:
    """eval/sr, eval/recall and the EC ratings (overall and per turn) over finished trajectories."""
    ratings = [(t["turn"], t["ec_rating"]) for tr in trajectories for t in tr["turns"] if t["ec_rating"] is not None]
    metrics = {
        "eval/sr": success_rate([t["success"] for t in trajectories]),
        "eval/recall": success_rate([t["recall"] for t in trajectories]),
        "rollout/episodes": len(trajectories),
        "rollout/turns_mean": sum(t["num_turns"] for t in trajectories) / max(len(trajectories), 1),
        "rollout/ended_by_user": success_rate([t["ended_by_user"] for t in trajectories]),
        "rollout/ec_rating_missing": sum(t["ec_rating"] is None for tr in trajectories for t in tr["turns"]),
    }
    if ratings:
        metrics["rollout/ec_rating_mean"] = sum(r for _, r in ratings) / len(ratings)
    for turn in range(1, max_turns + 1):
        at_turn = [r for t, r in ratings if t == turn]
        if at_turn:
            metrics[f"rollout/ec_rating_turn{turn}"] = sum(at_turn) / len(at_turn)
    return metrics


def print_trajectory(trajectory: dict) -> None:
    print(
        f"\n=== {trajectory['task_id']} | target: {trajectory['target']} | "
        f"SR={int(trajectory['success'])} R={int(trajectory['recall'])}"
    )
    print(f"  USER   [{trajectory['opening']['policy']}] {trajectory['opening']['user']}")
    for t in trajectory["turns"]:
        print(f"  SYSTEM {t['cra'].get('action') or t['system']}")  # an agent's action where it keeps one
        print(f"         EC rating {t['ec_rating']}: {(t['ec_reason'] or '')[:160]}")
        if t["user"]:
            print(f"  USER   [{t['user_policy']}] {t['user']}")
