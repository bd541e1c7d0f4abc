"""The data fetcher: its table of sources against the real (mirrored) files, and fetching with the network replaced
by the mirror (this machine has none)."""

import io
import shutil
import urllib.error
import urllib.request

import pytest

from common import fetch_data
from common.data import load_crs_dataset
from common.fetch_data import SOURCES, Args, check, count_rows
from tests.conftest import DATA, needs_data


@needs_data("inspired", "redial", "ecpo")
def test_the_mirrored_files_are_the_published_ones_with_the_rows_the_loaders_expect():
    for dataset, sources in SOURCES.items():
        problems = check(dataset, DATA)
        for source in sources:
            path = DATA / source.dest
            if source.rows is None:  # the files too large for the mirror: only their blob id is known
                assert problems[source.dest] == "missing" or problems[source.dest] is None
                continue
            assert problems[source.dest] is None, (source.dest, problems[source.dest])
            assert count_rows(path, path.read_bytes()) == source.rows


def serve_from_mirror(monkeypatch, damage: str | None = None):
    """urlopen answered from the mirror, the file at ``damage`` with its last line dropped."""
    by_url = {s.url: s for sources in SOURCES.values() for s in sources}

    def urlopen(url, timeout):
        source = by_url[url]
        if not (DATA / source.dest).exists():
            raise urllib.error.URLError("not in the mirror")
        data = (DATA / source.dest).read_bytes()
        if source.dest == damage:
            data = b"\n".join(data.rstrip(b"\n").split(b"\n")[:-1]) + b"\n"
        return io.BytesIO(data)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@needs_data("inspired")
def test_fetch_puts_each_file_where_the_loaders_read_it(monkeypatch, tmp_path, capsys):
    serve_from_mirror(monkeypatch)
    assert fetch_data.main(Args("inspired", data_dir=str(tmp_path))) == 0
    assert all(p is None for p in check("inspired", tmp_path).values())
    data = load_crs_dataset("inspired", tmp_path, "valid")
    assert (len(data.train), len(data.evaluated), len(data.items)) == (801, 99, 1096)
    # a second run finds everything in place and fetches nothing
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: pytest.fail(f"fetched {url} again"))
    capsys.readouterr()
    assert fetch_data.main(Args("inspired", data_dir=str(tmp_path))) == 0
    assert "fetching" not in capsys.readouterr().out


@needs_data("inspired/cfcrs/test_data.jsonl", "inspired/cfcrs/valid_data.jsonl")
def test_a_damaged_download_is_refused_and_never_written(monkeypatch, tmp_path, capsys):
    serve_from_mirror(monkeypatch, damage="inspired/cfcrs/valid_data.jsonl")
    assert fetch_data.main(Args("inspired", data_dir=str(tmp_path))) == 1
    assert check("inspired", tmp_path)["inspired/cfcrs/valid_data.jsonl"] == "missing"
    assert "valid_data.jsonl: downloaded" in capsys.readouterr().out
    # a damaged file already in place is reported by its rows
    shutil.copy(DATA / "inspired/cfcrs/test_data.jsonl", tmp_path / "inspired/cfcrs/valid_data.jsonl")
    assert check("inspired", tmp_path)["inspired/cfcrs/valid_data.jsonl"] == (
        "not the published file (its bytes differ)"
    )
    lines = (DATA / "inspired/cfcrs/valid_data.jsonl").read_text().splitlines()[:-1]
    (tmp_path / "inspired/cfcrs/valid_data.jsonl").write_text("\n".join(lines) + "\n")
    assert check("inspired", tmp_path)["inspired/cfcrs/valid_data.jsonl"] == (
        "not the published file (98 rows, expected 99)"
    )


def test_without_network_it_says_what_to_download_and_where(monkeypatch, tmp_path, capsys):
    def no_network(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert fetch_data.main(Args("ecpo", data_dir=str(tmp_path))) == 1
    out, err = capsys.readouterr()
    assert "could not download (Name or service not known)" in out
    source = SOURCES["ecpo"][0]
    assert f"{source.url}\n    -> {tmp_path / source.dest}" in err
    assert not any(tmp_path.rglob("*"))  # nothing partial left behind


@needs_data("redial")
def test_redial_trains_on_the_whole_official_split_once_it_is_fetched(tmp_path):
    shutil.copytree(DATA / "redial", tmp_path / "redial")
    subsets = load_crs_dataset("redial", tmp_path, "valid")
    # stand-in for the fetched 10,006-conversation file: the 500-conversation subset under its name
    shutil.copy(tmp_path / "redial/official/train_subset_500.jsonl", tmp_path / "redial/official/train_data.jsonl")
    whole = load_crs_dataset("redial", tmp_path, "valid")
    assert len(whole.train) + len(whole.dropped) == 500
    assert len(subsets.train) + len(subsets.dropped) == 600
