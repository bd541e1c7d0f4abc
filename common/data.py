"""The experimental protocol over the dialogue datasets: which release of INSPIRED, ReDial or the demo each split comes
from, how two releases are joined (titles given back their years, a conversation known by its opening), and the rule
that no evaluated conversation is trained on. The file formats themselves are read by common/formats.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.formats import (
    DEMO_DIR,
    Dialogue,
    InputError,
    Item,
    load_cfcrs_dialogues,
    load_cfcrs_kg,
    load_demo_catalog,
    load_ievalm_turns,
    load_redial_official,
    load_unicrs_jsonl,
)


def bare_title(title: str) -> str:
    return re.sub(r"\s*\(\d{4}\)\s*$", "", title).strip().lower()


def restore_years(dialogues: list[Dialogue], catalog: list[Item]) -> None:
    """UniCRS's INSPIRED files name movies without their year ("Knives Out"); map each to the one catalog title
    with that name ("Knives Out (2019)"), where there is exactly one."""
    by_bare: dict[str, list[str]] = {}
    for item in catalog:
        by_bare.setdefault(bare_title(item.title), []).append(item.title)
    for dialogue in dialogues:
        for turn in dialogue.turns:
            turn.items = [
                by_bare[bare_title(t)][0] if len(by_bare.get(bare_title(t), [])) == 1 else t for t in turn.items
            ]


@dataclass
class CRSDataset:
    """A conversational-recommendation dataset as every script that learns from its dialogues reads it: one assembly,
    so they train and evaluate on the same conversations and draw from the same items."""

    train: list[Dialogue]  # the training dialogues, none of them a conversation of the evaluated split
    evaluated: list[Dialogue]  # the split --eval-split names
    dropped: list[Dialogue]  # training dialogues left out because the evaluated split holds them
    items: list[Item]  # the dataset's movie KG: every item with its attributes


def fingerprint(dialogue: Dialogue) -> str | None:
    """A conversation's first four utterances, normalized: how two releases of one conversation are told to be the
    same where their ids differ (INSPIRED's UniCRS and CFCRS splits)."""
    texts = [" ".join(t.text.lower().split()) for t in dialogue.turns if t.text.strip()][:4]
    return "\n".join(texts) if len(texts) == 4 else None


def load_crs_dataset(dataset: str, data_dir: str | Path, eval_split: str) -> CRSDataset:
    """The demo, INSPIRED or ReDial: training dialogues, the evaluated split and the KG's items.

    * demo: data/demo's dialogues_train / dialogues_test and its catalog.
    * inspired: UniCRS's train split (CFCRS ships none; the same conversations, their titles given back their
      years from the KG), CFCRS's ``{valid,test}_data.jsonl``, CFCRS's KG.
    * redial: the official train split (``train_data.jsonl``, or where only the mirrored subsets are there, those),
      iEvaLM's evaluated split and KG. The evaluated split is iEvaLM's processed recommendation turns (one Dialogue
      per turn, ``conversation_id`` naming its conversation).

    Training never sees an evaluated conversation, matched by id or, where two releases' ids differ, by its opening
    (``fingerprint``): 50 of ReDial's 600 mirrored training conversations are in iEvaLM's validation file; no
    INSPIRED training dialogue is in CFCRS's splits."""
    root = Path(data_dir)
    if dataset == "demo":
        items = load_demo_catalog()
        train = load_unicrs_jsonl(DEMO_DIR / "dialogues_train.jsonl")
        evaluated = load_unicrs_jsonl(DEMO_DIR / "dialogues_test.jsonl")
    elif dataset == "inspired":
        items = load_cfcrs_kg(root / "inspired" / "cfcrs")
        train = load_unicrs_jsonl(root / "inspired" / "unicrs" / "train_data_dbpedia.jsonl")
        restore_years(train, items)
        evaluated = load_cfcrs_dialogues(root / "inspired" / "cfcrs" / f"{eval_split}_data.jsonl")
    elif dataset == "redial":
        items = load_cfcrs_kg(root / "redial" / "ievalm")  # CFCRS's KG format: star, director, genre, writer
        official = root / "redial" / "official"
        if (official / "train_data.jsonl").exists():  # the whole official train split, where it was fetched
            train = load_redial_official(official / "train_data.jsonl")
        else:
            train = load_redial_official(official / "train_subset_500.jsonl")
            train += load_redial_official(official / "valid_subset_100.jsonl")
        evaluated = load_ievalm_turns(root / "redial" / "ievalm" / f"{eval_split}_data_processed.jsonl")
    else:
        raise InputError(f"unknown dataset {dataset!r}: demo, inspired or redial")
    held = ({d.conversation_id or d.dialog_id for d in evaluated} | {fingerprint(d) for d in evaluated}) - {None}
    kept = [d for d in train if d.dialog_id not in held and fingerprint(d) not in held]
    dropped = [d for d in train if d.dialog_id in held or fingerprint(d) in held]
    return CRSDataset(kept, evaluated, dropped, items)
