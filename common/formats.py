"""Readers of the published file formats of INSPIRED, ReDial and ECPO, and of the bundled demo data: each reads one
file as its release wrote it, and nothing more (which dialogues train and which are evaluated is common/data.py's).

Everything loads into plain dataclasses: ``Item``, ``Turn`` / ``Dialogue`` and ``Task`` (a ``Persona`` plus a target
item). A missing file or a malformed row raises ``InputError`` naming the file and line.
"""

from __future__ import annotations

import csv
import html
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


class InputError(ValueError):
    """Input a run cannot use: a data file missing or malformed, a flag or an environment variable out of range, an
    earlier stage's output missing. ``main`` prints it as one ``error: ...`` line."""


@dataclass
class Item:
    item_id: str
    title: str
    attributes: dict[str, Any] = field(default_factory=dict)  # genre, director, star, plot, categories, ...


@dataclass
class Turn:
    role: str  # "seeker" or "recommender"
    text: str
    items: list[str] = field(default_factory=list)  # titles mentioned (for a recommendation turn: the labels)
    strategy: str | None = None  # INSPIRED's sociable-strategy label, where annotated
    entities: list[str] = field(default_factory=list)  # other entities annotated (genres, people), where annotated


@dataclass
class Dialogue:
    dialog_id: str
    turns: list[Turn]
    # Items annotated anywhere before the last turn, where a format annotates the context as a whole instead of
    # turn by turn (iEvaLM's ``entity``); None where the turns carry their own items.
    context_items: list[str] | None = None
    # The source conversation, where a dialogue is one slice of it (iEvaLM: one line per recommendation turn).
    conversation_id: str | None = None


@dataclass
class Persona:
    """AILO's four dimensions (Activities, Interests, Language, Orientations)."""

    user_id: str
    activities: str
    interests: str = ""
    language: dict[str, str] = field(default_factory=dict)  # Information Density, Expression Style, Tone
    orientations: str = ""

    def as_text(self) -> str:
        parts = [self.activities, self.interests, *self.language.values(), self.orientations]
        return " ".join(p for p in parts if p)


@dataclass
class Task:
    key: str
    persona: Persona
    target: Item


# ---------------------------------------------------------------- file reading


def _require(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found (docs/data.md says where each dataset goes)")
    return path


def read_json(path: str | Path) -> Any:
    path = _require(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each non-empty line."""
    path = _require(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}:{err.pos + 1}: invalid JSON: {err.msg}") from None


def _field(row: Any, key: str, path: Path | str, number: int) -> Any:
    if not isinstance(row, dict) or key not in row:
        raise InputError(f"{path}:{number}: missing field {key!r}")
    return row[key]


def _titles(row: dict, key: str, path: Path | str, number: int) -> list[str]:
    """A list-of-titles field (absent or null: empty). A string would be split into characters, so it is refused."""
    value = row.get(key) if isinstance(row, dict) else None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}:{number}: {key!r} must be a list of titles, not {type(value).__name__} {value!r:.60}")
    return list(value)


# ---------------------------------------------------------------- ECPO / AILO (Amazon Book, Game; Yelp)


def _persona_from_task(user_id: str, raw: dict, path, number) -> Persona:
    if not isinstance(raw, dict) or "Activities" not in raw:
        raise InputError(f"{path}:{number}: Persona must be an object with 'Activities'")
    return Persona(
        user_id=user_id,
        activities=raw["Activities"],
        interests=raw.get("Interests", ""),
        language=dict(raw.get("Linguistics") or raw.get("Language") or {}),
        orientations=raw.get("Orientations", ""),
    )


def _ecpo_item(raw: dict, path, number) -> Item:
    title = _field(raw, "ItemName", path, number)
    attributes = {k: raw[k] for k in ("Categories", "Description", "Price") if raw.get(k) not in (None, "", [])}
    return Item(
        item_id=str(raw.get("ItemID") or title), title=title, attributes={k.lower(): v for k, v in attributes.items()}
    )


def load_ecpo_tasks(path: str | Path) -> list[Task]:
    """``{UserID, Persona: {Activities, Linguistics}, Items: [...]}`` per line; one task per line whose
    target is the line's first item, as in the released evaluation code."""
    tasks = []
    for number, row in read_jsonl(path):
        user_id = str(_field(row, "UserID", path, number))
        items = _field(row, "Items", path, number)
        if not isinstance(items, list) or not items:
            raise InputError(f"{path}:{number}: 'Items' must be a non-empty list")
        target = _ecpo_item(items[0], path, number)
        persona = _persona_from_task(user_id, _field(row, "Persona", path, number), path, number)
        tasks.append(Task(key=f"{Path(path).stem}:{number}", persona=persona, target=target))
    return tasks


def load_ecpo_items(path: str | Path) -> list[Item]:
    """The item pool ``items.jsonl``: ``{UserID, ItemID, ItemName, Price, Categories, Description}``."""
    items: dict[str, Item] = {}
    for number, row in read_jsonl(path):
        item = _ecpo_item(row, path, number)
        items.setdefault(item.title, item)
    return list(items.values())


def load_ecpo_reviews(path: str | Path) -> dict[str, list[dict]]:
    """``processed_data_with_summaries.jsonl``: user id -> that user's reviews (for persona building)."""
    return {
        str(_field(row, "UserID", path, n)): list(_field(row, "ReviewList", path, n)) for n, row in read_jsonl(path)
    }


def load_ecpo_personas(path: str | Path) -> list[Persona]:
    """``personas_v0.jsonl`` (``{UserID, FilledValues: {...}}``), mapped onto AILO's four dimensions:
    Behavioral Traits -> Activities, Content Preferences -> Interests, Linguistic Traits -> Language,
    Experience Feedback -> Orientations."""

    def flat(section: Any) -> str:
        return " ".join(f"{k}: {v}" for k, v in section.items()) if isinstance(section, dict) else str(section or "")

    personas = []
    for number, row in read_jsonl(path):
        values = _field(row, "FilledValues", path, number)
        personas.append(
            Persona(
                user_id=str(_field(row, "UserID", path, number)),
                activities=flat(values.get("Behavioral Traits")),
                interests=flat(values.get("Content Preferences")),
                language=dict(values.get("Linguistic Traits") or {}),
                orientations=flat(values.get("Experience Feedback")),
            )
        )
    return personas


# ---------------------------------------------------------------- INSPIRED


def load_inspired_tsv(path: str | Path) -> list[Dialogue]:
    """The original strategy-annotated TSV (one utterance per row). The strategy column is
    ``expert_label`` in the released dev/test files and ``first_label`` in the README."""
    path = _require(path)
    csv.field_size_limit(sys.maxsize)
    dialogues: dict[str, Dialogue] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"dialog_id", "speaker", "text"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path}:1: header lacks columns {sorted(missing)}")
        label_column = "expert_label" if "expert_label" in reader.fieldnames else "first_label"
        for number, row in enumerate(reader, 2):
            if None in row.values() or None in row:  # a short row pads with None, a long one keys its rest with None
                columns = len([v for k, v in row.items() if k is not None and v is not None])
                raise InputError(
                    f"{path}:{number}: row has {columns} columns where the header has {len(reader.fieldnames)}"
                )
            movies = [m.strip() for m in (row.get("movies") or "").split(";") if m.strip()]
            turn = Turn(
                role=row["speaker"].strip().lower(),
                text=row["text"],
                items=movies,
                strategy=(row.get(label_column) or "").strip() or None,
            )
            dialogues.setdefault(row["dialog_id"], Dialogue(row["dialog_id"], [])).turns.append(turn)
    return list(dialogues.values())


def load_unicrs_jsonl(path: str | Path) -> list[Dialogue]:
    """UniCRS preprocessing: each line is a list of turns ``{text, role, movie_name, ...}``."""
    dialogues = []
    for number, row in read_jsonl(path):
        if not isinstance(row, list):
            raise InputError(f"{path}:{number}: expected a list of turns")
        turns = [
            Turn(
                role=str(_field(t, "role", path, number)).lower(),
                text=_field(t, "text", path, number),
                items=_titles(t, "movie_name", path, number),
                entities=_titles(t, "entity_name", path, number),
            )
            for t in row
        ]
        dialogues.append(Dialogue(f"{Path(path).stem}:{number}", turns))
    return dialogues


def load_cfcrs_kg(folder: str | Path) -> list[Item]:
    """CFCRS INSPIRED movie KG: ``kg.json`` (head id -> [[relation id, tail id]]), ``entity2id.json``,
    ``relation2id.json``, ``item_ids.json`` -> one Item per movie with star/director/genre lists."""
    folder = Path(folder)
    kg, entity2id = read_json(folder / "kg.json"), read_json(folder / "entity2id.json")
    relation2id, item_ids = read_json(folder / "relation2id.json"), read_json(folder / "item_ids.json")
    id2entity = {v: k for k, v in entity2id.items()}
    id2relation = {v: k for k, v in relation2id.items()}
    items = []
    for item_id in item_ids:
        if item_id not in id2entity:
            raise InputError(f"{folder / 'item_ids.json'}: item id {item_id} is not in entity2id.json")
        attributes: dict[str, list[str]] = {}
        for relation, tail in kg.get(str(item_id), []):
            attributes.setdefault(id2relation.get(relation, str(relation)), []).append(id2entity.get(tail, str(tail)))
        items.append(Item(item_id=str(item_id), title=id2entity[item_id], attributes=attributes))
    return items


def load_cfcrs_dialogues(path: str | Path) -> list[Dialogue]:
    """CFCRS INSPIRED splits: ``{dialog_id, dialog: [{role, text, movie: ["Title (year)", ...], ...}]}`` per line.
    Unlike UniCRS's files, the movie names carry their year, as in the CFCRS KG."""
    dialogues = []
    for number, row in read_jsonl(path):
        turns = _field(row, "dialog", path, number)
        if not isinstance(turns, list):
            raise InputError(f"{path}:{number}: 'dialog' must be a list of turns")
        dialogues.append(
            Dialogue(
                str(row.get("dialog_id", f"{Path(path).stem}:{number}")),
                [
                    Turn(
                        role=str(_field(t, "role", path, number)).lower(),
                        text=_field(t, "text", path, number),
                        items=_titles(t, "movie", path, number),
                        entities=_titles(t, "entity", path, number),
                    )
                    for t in turns
                ],
            )
        )
    return dialogues


# ---------------------------------------------------------------- ReDial


_MENTION = re.compile(r"@(\d+)")


def load_redial_official(path: str | Path) -> list[Dialogue]:
    """Official ReDial JSONL. ``@<movieId>`` mentions become titles from the line's ``movieMentions``;
    consecutive messages of one worker merge into one turn; the initiator is the seeker."""
    dialogues = []
    for number, row in read_jsonl(path):
        mentions = _field(row, "movieMentions", path, number) or {}
        if not isinstance(mentions, dict):
            raise InputError(
                f"{path}:{number}: 'movieMentions' must map movie ids to titles, not {type(mentions).__name__}"
            )
        mentions = {k: html.unescape(" ".join(str(v).split())) for k, v in mentions.items()}
        seeker = _field(row, "initiatorWorkerId", path, number)
        turns: list[Turn] = []
        last_sender = None
        messages = _field(row, "messages", path, number)
        if not isinstance(messages, list):
            raise InputError(f"{path}:{number}: 'messages' must be a list")
        for message in messages:
            text = html.unescape(str(_field(message, "text", path, number)))  # the official text keeps &quot; etc.
            items = [mentions[m] for m in _MENTION.findall(text) if m in mentions]
            text = _MENTION.sub(lambda m, names=mentions: names.get(m.group(1), m.group(0)), text)
            sender = _field(message, "senderWorkerId", path, number)
            if turns and sender == last_sender:
                turns[-1].text += " " + text
                turns[-1].items += items
            else:
                turns.append(Turn(role="seeker" if sender == seeker else "recommender", text=text, items=items))
            last_sender = sender
        dialogues.append(Dialogue(str(row.get("conversationId", f"{Path(path).stem}:{number}")), turns))
    return dialogues


def load_redial_movies_csv(path: str | Path) -> list[Item]:
    """``movies_with_mentions.csv``: movieId, movieName, nbMentions."""
    path = _require(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"movieId", "movieName"} <= set(reader.fieldnames or []):
            raise InputError(f"{path}:1: header must have movieId and movieName")
        items = []
        for number, row in enumerate(reader, 2):
            if not row.get("movieId") or row.get("movieName") is None:
                raise InputError(f"{path}:{number}: empty movieId or movieName")
            items.append(
                Item(row["movieId"], " ".join(row["movieName"].split()), {"mentions": int(row.get("nbMentions") or 0)})
            )
    return items


def load_ievalm_turns(path: str | Path) -> list[Dialogue]:
    """iEvaLM's processed recommendation turns ``{dialog_id, turn_id, context, rec, resp, entity}``: one Dialogue
    per line, the context turns followed by the recommender turn whose ``items`` are the labels ``rec``. The context
    alternates speakers and its last utterance is the seeker's; it carries no items of its own, but ``entity``
    annotates every entity and item mentioned in it (the @-mentions of the official data), kept as
    ``context_items``. A line without ``entity`` gets the labels whose full title the context names as whole
    words ("Saw (2003)" is not named by "chainsaw", nor "It (2017)" by "it")."""
    dialogues = []
    for number, row in read_jsonl(path):
        context = _field(row, "context", path, number)
        if not isinstance(context, list):
            raise InputError(f"{path}:{number}: 'context' must be a list of utterances")
        context = [str(c) for c in context if c]
        n = len(context)
        turns = [
            Turn(role="seeker" if (n - 1 - i) % 2 == 0 else "recommender", text=text) for i, text in enumerate(context)
        ]
        _field(row, "rec", path, number)
        turns.append(
            Turn(role="recommender", text=_field(row, "resp", path, number), items=_titles(row, "rec", path, number))
        )
        if "entity" in row:
            context_items = _titles(row, "entity", path, number)
        else:  # no annotations: a label counts as mentioned where the context names its full title as whole words
            named = [
                t for t in turns[-1].items if re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", " ".join(context), re.I)
            ]
            context_items = named
        dialog_id = str(row.get("dialog_id"))
        dialogues.append(Dialogue(f"{dialog_id}:{row.get('turn_id')}", turns, context_items, conversation_id=dialog_id))
    return dialogues


def load_movie_info(path: str | Path) -> list[Item]:
    """Movie attribute files: iEvaLM's ``id2info.json`` (id -> {name, genre, plot, ...}) or a title-keyed
    map such as ``movie2info.json`` / ``movie2attrs.json`` (title -> {genre, director, star, ...})."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object mapping ids or titles to attributes")
    items = []
    for key, info in data.items():
        if not isinstance(info, dict):
            raise InputError(f"{path}: entry {key!r} is not an object")
        title = info.get("name", key)
        items.append(Item(item_id=str(key), title=title, attributes={k: v for k, v in info.items() if k != "name"}))
    return items


# ---------------------------------------------------------------- the bundled demo


def load_demo_catalog(folder: str | Path = DEMO_DIR) -> list[Item]:
    """``catalog.jsonl``: {item_id, title, year, genres, director, stars, plot}."""
    path = Path(folder) / "catalog.jsonl"
    items = []
    for number, row in read_jsonl(path):
        items.append(
            Item(
                item_id=_field(row, "item_id", path, number),
                title=_field(row, "title", path, number),
                attributes={
                    "year": row.get("year"),
                    "genre": row.get("genres", []),
                    "director": row.get("director", []),
                    "star": row.get("stars", []),
                    "plot": row.get("plot", ""),
                },
            )
        )
    return items


def load_demo_tasks(folder: str | Path = DEMO_DIR) -> list[Task]:
    """``tasks.jsonl``: {user_id, persona: {Activities, Interests, Language, Orientations}, target: title}."""
    path = Path(folder) / "tasks.jsonl"
    by_title = {item.title: item for item in load_demo_catalog(folder)}
    tasks = []
    for number, row in read_jsonl(path):
        user_id = _field(row, "user_id", path, number)
        target = _field(row, "target", path, number)
        if target not in by_title:
            raise InputError(f"{path}:{number}: target {target!r} is not in catalog.jsonl")
        tasks.append(
            Task(
                key=user_id,
                persona=_persona_from_task(user_id, _field(row, "persona", path, number), path, number),
                target=by_title[target],
            )
        )
    return tasks
