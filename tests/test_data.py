"""common/data.py: the one assembly of a CRS dataset (which release each split comes from, no evaluated
conversation trained on), and the scripts that read it agreeing on it."""

import pytest

from common.data import load_crs_dataset
from tests.conftest import DATA, needs_data


@needs_data("inspired", "redial")
@pytest.mark.parametrize("dataset", ["inspired", "redial"])
def test_grsu_smtpo_and_rso_train_and_evaluate_on_the_same_conversations_and_items(dataset):
    import grsu
    import rso
    import smtpo

    shared = load_crs_dataset(dataset, DATA, "valid")
    train = {d.conversation_id or d.dialog_id for d in shared.train}
    evaluated = {d.conversation_id or d.dialog_id for d in shared.evaluated}
    assert train and evaluated and not train & evaluated
    dropped = {d.dialog_id for d in shared.dropped}
    assert len(dropped) == {"inspired": 0, "redial": 50}[dataset]  # ReDial: 50 training ones are iEvaLM's

    of = {d.dialog_id: d.conversation_id or d.dialog_id for d in shared.train + shared.evaluated}
    of |= {conversation: conversation for conversation in train | evaluated}

    def conversation(key: str) -> str:  # SMTPO's turn <dialogue>:<index>, RSO's seed <dialogue>
        return of[key.rsplit(":", 1)[0]] if key not in of else of[key]

    g = grsu.load_data(dataset, str(DATA), "valid")
    s = smtpo.load_data(smtpo.Args(dataset=dataset, data_dir=str(DATA), num_train=0, num_test=0))
    r = rso.load_data(rso.Args(dataset=dataset, data_dir=str(DATA), num_test=0))
    seen = {
        "grsu": ({t.conversation for t in g.train}, {t.conversation for t in g.evaluated}),
        "smtpo": ({conversation(x.key) for x in s.train + s.held_out}, {conversation(x.key) for x in s.evaluated}),
        "rso": ({conversation(x.key) for x in r.rl}, {conversation(x.key) for x in r.evaluated}),
    }
    for script, (trained, tested) in seen.items():
        assert trained and trained <= train, script
        assert tested and tested <= evaluated, script
    # every script evaluates almost all of the shared split's conversations (those with a target in the catalog);
    # RSO's INSPIRED validation plays only dev.tsv's dialogues its Planner's SFT held out
    assert len(seen["grsu"][1]) > 0.8 * len(evaluated) and len(seen["smtpo"][1]) > 0.8 * len(evaluated)
    kg = [item.title for item in shared.items]
    assert s.catalog.titles == r.catalog.titles == kg
    named = {t for d in shared.train for turn in d.turns for t in turn.items}
    ranked = [item.title for item in g.items]  # GRSU ranks what training names, too, once each
    assert ranked[: len(kg)] == kg and set(ranked[len(kg) :]) == named - set(kg) and len(set(ranked)) == len(ranked)
