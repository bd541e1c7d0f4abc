"""common/formats.py: each reader on the real files where they are here, on the demo data, and on malformed rows
(the error names file:line and what was expected)."""

import pytest

from common.formats import (
    InputError,
    load_cfcrs_dialogues,
    load_cfcrs_kg,
    load_demo_catalog,
    load_demo_tasks,
    load_ecpo_items,
    load_ecpo_personas,
    load_ecpo_reviews,
    load_ecpo_tasks,
    load_ievalm_turns,
    load_inspired_tsv,
    load_movie_info,
    load_redial_movies_csv,
    load_redial_official,
    load_unicrs_jsonl,
)
from tests.conftest import DATA, needs_data


@needs_data("inspired/sweetpeach/dev.tsv")
def test_inspired_strategy_tsv():
    dialogues = load_inspired_tsv(DATA / "inspired/sweetpeach/dev.tsv")
    assert len(dialogues) == 99
    turns = [t for d in dialogues for t in d.turns]
    assert {t.role for t in turns} == {"recommender", "seeker"}
    strategies = {t.strategy for t in turns if t.role == "recommender" and t.strategy}
    assert {"credibility", "personal_opinion", "similarity"} <= strategies
    assert any("Dark Phoenix (2019)" in t.items for t in turns)
    assert any(len(t.items) == 2 for t in turns)  # "A (1994); B (2016)" splits into two titles


@needs_data("inspired/cfcrs", "inspired/unicrs/valid_data_dbpedia.jsonl")
def test_inspired_unicrs_and_cfcrs_kg():
    dialogues = load_unicrs_jsonl(DATA / "inspired/unicrs/valid_data_dbpedia.jsonl")
    assert len(dialogues) == 99 and dialogues[0].turns[0].text == "Hello how are you today?"
    items = {i.title: i for i in load_cfcrs_kg(DATA / "inspired/cfcrs")}
    assert len(items) == 1096
    assert items["Antlers (2020)"].attributes["director"] == ["Scott Cooper"]
    assert "horror" in items["Antlers (2020)"].attributes["genre"]


@needs_data("redial/official/movies_with_mentions.csv", "redial/official/train_subset_500.jsonl")
def test_redial_official_replaces_mentions_and_merges_messages():
    dialogues = load_redial_official(DATA / "redial/official/train_subset_500.jsonl")
    assert len(dialogues) == 500
    first = dialogues[0]
    assert first.dialog_id == "15875"
    assert all("@1" not in t.text for t in first.turns)
    assert any("Ghostbusters (1984)" in t.items for t in first.turns)
    assert all(a.role != b.role for a, b in zip(first.turns, first.turns[1:]))  # merged runs alternate
    movies = load_redial_movies_csv(DATA / "redial/official/movies_with_mentions.csv")
    assert len(movies) == 6924 and movies[0].title == "Headhunter (2009)"


@needs_data("redial/ievalm/id2info.json", "redial/ievalm/valid_data_processed.jsonl", "redial/movie2info.json")
def test_ievalm_turns_and_movie_info():
    dialogues = load_ievalm_turns(DATA / "redial/ievalm/valid_data_processed.jsonl")
    assert len(dialogues) == 2716
    first = dialogues[0]
    assert first.turns[-1].role == "recommender" and first.turns[-1].items == [
        "The Shining (1980)",
        "What Lies Beneath (2000)",
    ]
    assert first.turns[-2].role == "seeker" and "Babadook" in first.turns[-2].text
    by_id = {i.item_id: i for i in load_movie_info(DATA / "redial/ievalm/id2info.json")}
    assert by_id["100026"].title == "Pari (1995)" and by_id["100026"].attributes["director"] == ["Dariush Mehrjui"]
    by_title = {i.title: i for i in load_movie_info(DATA / "redial/movie2info.json")}
    assert "Pari (1995)" in by_title


@needs_data(
    "ecpo/Book/Book_train.jsonl",
    "ecpo/Book/items.jsonl",
    "ecpo/Book/personas_v0.jsonl",
    "ecpo/Game/processed_data_with_summaries.jsonl",
    "ecpo/Yelp/Yelp_test.jsonl",
)
def test_ecpo_tasks_items_personas_reviews():
    tasks = load_ecpo_tasks(DATA / "ecpo/Book/Book_train.jsonl")
    assert len(tasks) == 3739
    assert tasks[0].target.title.startswith("Murder Most Witchy")
    assert tasks[0].persona.activities.startswith("Exploration-oriented")
    assert set(tasks[0].persona.language) == {"Information Density", "Expression Style", "Tone"}
    assert len(load_ecpo_tasks(DATA / "ecpo/Yelp/Yelp_test.jsonl")) == 207
    assert len(load_ecpo_items(DATA / "ecpo/Book/items.jsonl")) > 1000
    personas = load_ecpo_personas(DATA / "ecpo/Book/personas_v0.jsonl")
    assert len(personas) == 100 and "Decision-Making Style" in personas[0].activities
    reviews = load_ecpo_reviews(DATA / "ecpo/Game/processed_data_with_summaries.jsonl")
    assert len(reviews) == 100 and all(r and "Rating" in r[0] for r in reviews.values())


def test_demo_data_is_consistent():
    catalog = load_demo_catalog()
    tasks = load_demo_tasks()
    assert len(catalog) >= 30 and len(tasks) >= 30
    titles = {i.title for i in catalog}
    assert all(t.target.title in titles for t in tasks)
    assert all(
        t.persona.activities.split()[0] in ("Efficiency-seeking", "Detail-oriented", "Exploration-oriented")
        for t in tasks
    )


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl: file not found"):
        load_ecpo_tasks(tmp_path / "nope.jsonl")
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"UserID": "u", "Persona": {"Activities": "x"}, "Items": [{"ItemName": "A"}]}\n{"UserID": "u2"\n')
    with pytest.raises(InputError, match=r"tasks.jsonl:2:17: invalid JSON"):  # line 2, column 17: where it was cut
        load_ecpo_tasks(bad)
    bad.write_text('{"UserID": "u", "Persona": {"Activities": "x"}, "Items": []}\n')
    with pytest.raises(InputError, match=r"tasks.jsonl:1: 'Items' must be a non-empty list"):
        load_ecpo_tasks(bad)
    bad.write_text('{"UserID": "u", "Items": [{"ItemName": "A"}]}\n')
    with pytest.raises(InputError, match=r"tasks.jsonl:1: missing field 'Persona'"):
        load_ecpo_tasks(bad)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("dialog_id\tspeaker\n1\tSEEKER\n")
    with pytest.raises(InputError, match=r"dev.tsv:1: header lacks columns \['text'\]"):
        load_inspired_tsv(tsv)


def test_malformed_rows_of_each_format_name_file_line_and_expectation(tmp_path):
    import json

    redial = tmp_path / "redial.jsonl"
    row = {"conversationId": "1", "initiatorWorkerId": 0, "movieMentions": [["111", "Heat (1995)"]],
           "messages": [{"text": "hi @111", "senderWorkerId": 0}]}  # fmt: skip
    redial.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"redial.jsonl:1: 'movieMentions' must map movie ids to titles, not list"):
        load_redial_official(redial)
    ievalm = tmp_path / "ievalm.jsonl"
    ievalm.write_text(
        json.dumps({"dialog_id": "1", "turn_id": 2, "context": ["hi"], "rec": "Heat (1995)", "resp": "x"})
    )
    with pytest.raises(InputError, match=r"ievalm.jsonl:1: 'rec' must be a list of titles, not str"):
        load_ievalm_turns(ievalm)
    cfcrs = tmp_path / "cfcrs.jsonl"
    cfcrs.write_text(
        json.dumps({"dialog_id": "d", "dialog": [{"role": "Seeker", "text": "hi", "movie": "Heat (1995)"}]})
    )
    with pytest.raises(InputError, match=r"cfcrs.jsonl:1: 'movie' must be a list of titles, not str"):
        load_cfcrs_dialogues(cfcrs)
    unicrs = tmp_path / "unicrs.jsonl"
    unicrs.write_text(json.dumps([{"role": "SEEKER", "text": "hi", "movie_name": "Heat"}]) + "\n")
    with pytest.raises(InputError, match=r"unicrs.jsonl:1: 'movie_name' must be a list of titles"):
        load_unicrs_jsonl(unicrs)
    header = "dialog_id\tutt_id\tspeaker\ttext\tmovies\tgenres\tpeople\texpert_label\textra"
    tsv = tmp_path / "dev.tsv"
    tsv.write_text(header + "\n" + "\t".join(["1", "0", "SEEKER", "hello", "", ""]) + "\n")  # cut to 6 of 9
    with pytest.raises(InputError, match=r"dev.tsv:2: row has 6 columns where the header has 9"):
        load_inspired_tsv(tsv)


def test_redial_text_is_unescaped(tmp_path):
    import json

    path = tmp_path / "redial.jsonl"
    row = {"conversationId": "1", "initiatorWorkerId": 0, "movieMentions": {"111": "Heat (1995)"},
           "messages": [{"text": "I&quot;m a fan of @111 &amp; more", "senderWorkerId": 0}]}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    (dialogue,) = load_redial_official(path)
    assert dialogue.turns[0].text == 'I"m a fan of Heat (1995) & more' and dialogue.turns[0].items == ["Heat (1995)"]


@needs_data("redial/official/train_subset_500.jsonl")
def test_real_redial_training_text_has_no_entities_left():
    dialogues = load_redial_official(DATA / "redial" / "official" / "train_subset_500.jsonl")
    assert not any("&quot;" in t.text or "&amp;" in t.text or "&gt;" in t.text for d in dialogues for t in d.turns)
