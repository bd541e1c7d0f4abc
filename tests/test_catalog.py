from common.catalog import Catalog, item_card
from common.formats import Item, load_demo_catalog

ITEMS = [
    Item("1", "The Godfather (1972)", {"genre": ["crime"]}),
    Item("2", "The Godfather Part II (1974)"),
    Item("3", "Toy Story (1995)", {"genre": ["animation"], "director": ["John Lasseter"]}),
    Item("4", "Toy Story 2 (1999)"),
]


def test_fuzzy_match_tolerates_case_year_and_typos():
    catalog = Catalog(ITEMS)
    assert catalog.match("the godfather") == "The Godfather (1972)"
    assert catalog.match("Toy Storry (1995)") == "Toy Story (1995)"
    assert catalog.match("Godfather", exclude=["The Godfather (1972)"]) == "The Godfather Part II (1974)"


def test_match_all_never_duplicates():
    catalog = Catalog(ITEMS)
    matched = catalog.match_all(["Toy Story", "Toy Story (1995)", "toy story!"])
    assert len(matched) == len(set(matched)) == 3
    assert matched[0] == "Toy Story (1995)"


def test_duplicate_titles_collapse_and_cards_render():
    catalog = Catalog(ITEMS + [Item("9", "Toy Story (1995)")])
    assert len(catalog) == 4
    assert item_card(ITEMS[2]) == "Toy Story (1995); genre: animation; director: John Lasseter"


def test_dense_retrieval_with_embedded_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANCRS_CACHE", str(tmp_path))
    catalog = Catalog(load_demo_catalog())
    top = catalog.search(["animated film about a girl trapped in a spirit bathhouse", "mafia family patriarch"], k=3)
    assert top[0][0] == "Spirited Away (2001)"
    assert "The Godfather (1972)" in top[1]
    assert list((tmp_path / "index").glob("*.npy"))  # the index is cached
    again = Catalog(load_demo_catalog())
    assert (again.embeddings() == catalog.embeddings()).all()
