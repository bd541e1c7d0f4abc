"""Fetch the real datasets from their public sources into the layout the loaders read (common/data.py, the scripts),
and check them.

    python -m common.fetch_data inspired             # or redial, ecpo, all; into ../shared/data
    python -m common.fetch_data all --data-dir data/real
    python -m common.fetch_data all --check-only     # check what is there, fetch nothing
    make data DATASET=inspired

Every file comes from a pinned commit of the repository that published it (the same commits as the shared mirror,
``../shared/data/README.md``), and is checked twice: its bytes against the git blob id the source repository records
for it (so a truncated or altered download is refused), and its rows (non-empty lines; entries of a JSON object or
list) against the count the loaders were written for. A file already present and correct is not fetched again.
Without network it says which files it could not fetch and how to get them by hand; it never leaves a partial file.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

INSPIRED = ("sweetpeach/Inspired", "782d7c1845d11f75d2542809c7f2a51b63ef0304")
UNICRS = ("ShupeiLi/UniCRS", "26469402746aeb06e7865b824a65818846c31161")
KGSF = ("Tamizh2907/KGSF---movie-recommender-system", "e91320ef960ed1141a19e7794630bf6cc71b9896")
CFCRS = ("wxl1999/CFCRS", "5fb9739db71527341b27c53184a7b6e3a23f7c05")
IEVALM = ("txy77/iEvaLM-CRS", "5a7ccf416ce324ef06c0513ad22c44fc574b4ec8")
REDIAL = ("ReDialData/website", "849e9eb1bb60e312f8bf4daa82fc10a285e9318b")  # the `data` branch
ECPO = ("XueyangFeng/ECPO", "7061dc744262f97b14c85a163a32474d9f804855")


@dataclass(frozen=True)
class Source:
    dest: str  # where the loaders read it, under --data-dir
    repo: tuple[str, str]  # (owner/name, commit)
    path: str  # the file in that repository
    blob: str  # the first 12 hex digits of its git blob id at that commit
    rows: int | None  # non-empty lines (.jsonl, .tsv, .csv) or entries (.json); None: not counted here

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo[0]}/{self.repo[1]}/{self.path}"


# Blob ids and row counts as read from the source repositories and the shared mirror (2026-12-02).
SOURCES: dict[str, list[Source]] = {
    "inspired": [
        Source("inspired/sweetpeach/dev.tsv", INSPIRED, "data/dialog_data/dev.tsv", "df159b0cccd3", 3539),
        Source("inspired/sweetpeach/test.tsv", INSPIRED, "data/dialog_data/test.tsv", "a0668367840b", 3439),
        Source(
            "inspired/sweetpeach/list_of_dialog_ids_with_movie_id_all.tsv",
            INSPIRED,
            "data/survey_data/list_of_dialog_ids_with_movie_id_all.tsv",
            "7cd38315c0b5",
            1002,
        ),
        Source(
            "inspired/unicrs/train_data_dbpedia.jsonl",
            UNICRS,
            "data/inspired/train_data_dbpedia.jsonl",
            "ad25631328d2",
            801,
        ),
        Source(
            "inspired/unicrs/valid_data_dbpedia.jsonl",
            UNICRS,
            "data/inspired/valid_data_dbpedia.jsonl",
            "b4eab67cf5ad",
            99,
        ),
        Source(
            "inspired/unicrs/test_data_dbpedia.jsonl",
            UNICRS,
            "data/inspired/test_data_dbpedia.jsonl",
            "0ca4a654b980",
            99,
        ),
        Source("inspired/unicrs/dbpedia_subkg.json", UNICRS, "data/inspired/dbpedia_subkg.json", "b082d2dbde99", 8543),
        Source("inspired/unicrs/entity2id.json", UNICRS, "data/inspired/entity2id.json", "0fcdccb9439b", 17320),
        Source("inspired/unicrs/relation2id.json", KGSF, "inspired/relation2id.json", "798b171d568b", 13),
        Source("inspired/cfcrs/kg.json", CFCRS, "data/inspired/kg.json", "97fe8c9a0dcc", 1096),
        Source("inspired/cfcrs/entity2id.json", CFCRS, "data/inspired/entity2id.json", "f61956154833", 4713),
        Source("inspired/cfcrs/entity2type.json", CFCRS, "data/inspired/entity2type.json", "bd2ba666ded3", 4713),
        Source("inspired/cfcrs/item_ids.json", CFCRS, "data/inspired/item_ids.json", "0744d047dc08", 1096),
        Source("inspired/cfcrs/relation2id.json", CFCRS, "data/inspired/relation2id.json", "a1d7cc99b0d4", 3),
        Source("inspired/cfcrs/type2id.json", CFCRS, "data/inspired/type2id.json", "a9bbaed3c2c2", 3),
        Source("inspired/cfcrs/valid_data.jsonl", CFCRS, "data/inspired/valid_data.jsonl", "b0ac29b88bc9", 99),
        Source("inspired/cfcrs/test_data.jsonl", CFCRS, "data/inspired/test_data.jsonl", "62211432a621", 99),
    ],
    "redial": [
        Source("redial/official/train_data.jsonl", REDIAL, "train_data", "bb882d7e3980", None),
        Source("redial/official/train_subset_500.jsonl", KGSF, "data/train_data.jsonl", "58b892a9cc44", 500),
        Source("redial/official/valid_subset_100.jsonl", KGSF, "data/valid_data.jsonl", "f30927c4369f", 100),
        Source("redial/official/test_data.jsonl", REDIAL, "test_data", "76a17ec7f930", 1342),
        Source("redial/official/movies_with_mentions.csv", REDIAL, "movies_with_mentions.csv", "d1a72b4f6caf", 6925),
        Source("redial/ievalm/kg.json", CFCRS, "data/redial/kg.json", "c54e5ca55a79", 6576),
        Source("redial/ievalm/entity2id.json", CFCRS, "data/redial/entity2id.json", "80597c8e6095", 24630),
        Source("redial/ievalm/entity2type.json", CFCRS, "data/redial/entity2type.json", "3a30f0dbb4e4", 24630),
        Source("redial/ievalm/item_ids.json", CFCRS, "data/redial/item_ids.json", "f647b6492255", 6576),
        Source("redial/ievalm/relation2id.json", CFCRS, "data/redial/relation2id.json", "3cf847f4ea09", 4),
        Source("redial/ievalm/id2info.json", IEVALM, "data/redial/id2info.json", "ed97cdb34b23", 6583),
        Source("redial/ievalm/valid_data.jsonl", IEVALM, "data/redial/valid_data.jsonl", "e727c422228d", 1000),
        Source(
            "redial/ievalm/valid_data_processed.jsonl",
            IEVALM,
            "data/redial_eval/valid_data_processed.jsonl",
            "a8395f4c8eb3",
            2716,
        ),
        Source(
            "redial/ievalm/test_data_processed.jsonl",
            IEVALM,
            "data/redial_eval/test_data_processed.jsonl",
            "54c1f379c27e",
            3341,
        ),
    ],
    "ecpo": [
        Source("ecpo/Book/Book_train.jsonl", ECPO, "user_simulator/task/Book_train.jsonl", "6d3a3ff356f4", 3739),
        Source("ecpo/Book/Book_test.jsonl", ECPO, "user_simulator/task/Book_test.jsonl", "5372d3325820", 193),
        Source("ecpo/Book/items.jsonl", ECPO, "user_simulator/persona/data/items.jsonl", "6ed6cba3b116", 3000),
        Source(
            "ecpo/Book/high_rating_items.jsonl",
            ECPO,
            "user_simulator/persona/data/high_rating_items.jsonl",
            "7b66cee51d47",
            1997,
        ),
        Source(
            "ecpo/Book/personas_v0.jsonl", ECPO, "user_simulator/persona/data/personas_v0.jsonl", "8cbe9caab0d9", 100
        ),
        Source(
            "ecpo/Book/processed_data_with_summaries.jsonl",
            ECPO,
            "user_simulator/persona/data/processed_data_with_summaries.jsonl",
            "5b73892e8685",
            100,
        ),
        Source("ecpo/Game/Game_train.jsonl", ECPO, "user_simulator/task/Game_train.jsonl", "4be41585466d", None),
        Source("ecpo/Game/Game_test.jsonl", ECPO, "user_simulator/task/Game_test.jsonl", "b518bca54206", 206),
        Source(
            "ecpo/Game/processed_data_with_summaries.jsonl",
            ECPO,
            "user_simulator/raw_data/Game/processed_data_with_summaries.jsonl",
            "bbca9f5205ba",
            100,
        ),
        Source("ecpo/Yelp/Yelp_train.jsonl", ECPO, "user_simulator/task/Yelp_train.jsonl", "b0b536c9cf87", None),
        Source("ecpo/Yelp/Yelp_test.jsonl", ECPO, "user_simulator/task/Yelp_test.jsonl", "6d79f88f105a", 207),
        Source(
            "ecpo/Yelp/processed_data_with_summaries.jsonl",
            ECPO,
            "user_simulator/raw_data/Yelp/processed_data_with_summaries.jsonl",
            "4df739335703",
            None,
        ),
    ],
}


@dataclass
class Args:
    dataset: tyro.conf.Positional[Literal["inspired", "redial", "ecpo", "all"]]
    """which dataset to fetch (all: the three)"""
    data_dir: str = "../shared/data"
    """where the loaders read the data (the scripts' --data-dir)"""
    check_only: bool = False
    """check the files already there against their sources; fetch nothing"""
    timeout: float = 60.0
    """seconds to wait on the network before giving up on a file"""


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's bytes: what the source repository's tree records for it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def count_rows(path: Path, data: bytes) -> int:
    if path.suffix == ".json":
        return len(json.loads(data))
    return sum(1 for line in data.decode("utf-8").splitlines() if line.strip())


def problem(source: Source, path: Path) -> str | None:
    """What is wrong with the file at ``path`` (None: it is the source's file)."""
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if git_blob_id(data).startswith(source.blob):
        return None
    try:
        rows = count_rows(path, data)
    except ValueError as error:
        return f"not the published file (unreadable: {error})"
    if source.rows is not None and rows != source.rows:
        return f"not the published file ({rows} rows, expected {source.rows})"
    return "not the published file (its bytes differ)"


def check(dataset: str, data_dir: str | Path) -> dict[str, str | None]:
    """{destination: its problem or None} for every file of ``dataset``."""
    return {s.dest: problem(s, Path(data_dir) / s.dest) for s in SOURCES[dataset]}


def fetch(source: Source, data_dir: Path, timeout: float) -> str | None:
    """Download one file into place (written only once its bytes check out); its problem, or None."""
    target = data_dir / source.dest
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        return f"could not download ({getattr(error, 'reason', error)})"
    if not git_blob_id(data).startswith(source.blob):
        return f"downloaded {len(data)} bytes that are not the published file (git blob {git_blob_id(data)[:12]})"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    partial.replace(target)
    return problem(source, target)


def main(args: Args) -> int:
    data_dir = Path(args.data_dir)
    datasets = list(SOURCES) if args.dataset == "all" else [args.dataset]
    failed = []
    for dataset in datasets:
        for source, issue in zip(SOURCES[dataset], check(dataset, data_dir).values(), strict=True):
            if issue is not None and not args.check_only:
                print(f"fetching {source.dest} <- {source.repo[0]}:{source.path}", flush=True)
                issue = fetch(source, data_dir, args.timeout)
            print(f"{'ok' if issue is None else 'FAIL':4}  {source.dest}" + (f": {issue}" if issue else ""))
            if issue is not None:
                failed.append(source)
    if not failed:
        print(f"{', '.join(datasets)}: every file matches its source, under {data_dir}")
        return 0
    print(f"\n{len(failed)} file(s) are not in place under {data_dir}.", file=sys.stderr)
    if not args.check_only:
        print(
            "Without network here, run the same command on a machine that has it and copy the folder over, or\n"
            "download each file by hand to its place (then rerun with --check-only):",
            file=sys.stderr,
        )
        for source in failed:
            print(f"  {source.url}\n    -> {data_dir / source.dest}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
