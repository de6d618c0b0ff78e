"""BM25's parameters: k1, b and the stemmer, fitted on validation pairs and saved as bm25.json.

`mixret finetune` fits them on its validation slice (the pairs the fusion weight is fitted on; never training
nor test pairs) over a small grid, and saves them as bm25.json next to fusion.json in the model folder.
`mixret index` copies that file into the EMB_DIR, with the model it came from, so `search --mode bm25` needs no
model; search, serve (from the EMB_DIR) and evaluate (from the model folder) build their BM25 with them. A model
folder or an EMB_DIR without bm25.json (from before the fit existed, or a model that was never fine-tuned) gets
the defaults, which are BM25 exactly as it was before: bm25s's k1 1.5 and b 0.75, words stemmed.

The grid's best is the one with the highest validation R@1, then MRR@10 (the relevant document ranked after
every document scoring the same as it); the defaults win every tie they are in.

bm25.json: {"k1": 0.9, "b": 0.5, "stemmer": true, "fitted": {"on", "pairs", "selected_by", "results": [{"k1",
"b", "stemmer", "r@1", "mrr@10"}, ...]}, "trained_on": [the pairs file's record, as a model's config holds it],
"model": null, or in an EMB_DIR {"path", "hash"} of the model folder it was copied from}.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mixret import io
from mixret.errors import MixretError
from mixret.search import BM25_B, BM25_K1, BM25Index

BM25_NAME = "bm25.json"
GRID_K1 = (0.6, 0.9, 1.2, 1.5, 2.0)
GRID_B = (0.3, 0.5, 0.75, 0.9)
GRID_STEMMER = (True, False)
SELECTED_BY = ("validation R@1, then MRR@10; ties to the defaults (k1 1.5, b 0.75, stemmer on), else to the first "
               "of the grid (stemmer on, then the smallest k1, then the smallest b)")


@dataclass
class BM25Params:
    """How BM25 scores: k1, b and whether words are stemmed; with the record of their fit when fitted."""
    k1: float = BM25_K1
    b: float = BM25_B
    stemmer: bool = True
    fitted: dict = field(default_factory=dict)     # the pairs, the rule and every grid point's scores
    trained_on: list | None = None                 # the pairs file the validation pairs came from (sources_record)
    model: dict | None = None                      # in an EMB_DIR: {"path", "hash"} of the model it came from

    def __post_init__(self):
        if isinstance(self.k1, bool) or not isinstance(self.k1, (int, float)) or not self.k1 >= 0:
            raise MixretError(f"BM25 k1 must be a number >= 0, got {self.k1!r}")
        if isinstance(self.b, bool) or not isinstance(self.b, (int, float)) or not 0 <= self.b <= 1:
            raise MixretError(f"BM25 b must be a number between 0 and 1, got {self.b!r}")
        if not isinstance(self.stemmer, bool):
            raise MixretError(f"BM25 stemmer must be true or false, got {self.stemmer!r}")

    @property
    def values(self) -> tuple[float, float, bool]:
        return float(self.k1), float(self.b), self.stemmer

    @property
    def is_default(self) -> bool:
        return self.values == BM25Params().values

    def index(self, texts: Sequence[str], keep_terms: bool = False) -> BM25Index:
        return BM25Index(texts, k1=self.k1, b=self.b, stemmer=self.stemmer, keep_terms=keep_terms)

    def describe(self) -> str:
        """"k1 0.9, b 0.5, stemmer on", with "(defaults)" or "(fitted on ...)"."""
        how = "defaults" if not self.fitted else f"fitted on {self.fitted.get('on', 'validation pairs')}"
        return f"k1 {self.k1:g}, b {self.b:g}, stemmer {'on' if self.stemmer else 'off'} ({how})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "BM25 parameters") -> "BM25Params":
        if not isinstance(d, dict):
            raise MixretError(f"{source}: expected a JSON object with k1, b and stemmer, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixretError(f"{source}: unknown BM25 option(s) {unknown}; expected {sorted(known)}")
        missing = sorted({"k1", "b", "stemmer"} - set(d))
        if missing:
            raise MixretError(f"{source}: BM25 parameters lack {', '.join(missing)}")
        try:
            return cls(**d)
        except MixretError as e:
            raise MixretError(f"{source}: {e}") from None


# -- the fit ----------------------------------------------------------------------------------

def gold_ranks(index: BM25Index, queries: Sequence[str]) -> np.ndarray:
    """1-based rank [Q] of document i for query i, after every document scoring the same as it."""
    ranks = np.empty(len(queries))
    for i, tokens in enumerate(index.tokenize(queries)):
        s = index.token_scores(tokens)                                          # [M]
        ranks[i] = (s >= s[i]).sum()
    return ranks


def fit_bm25(queries: Sequence[str], documents: Sequence[str], on: str, trained_on: list | None = None,
             k1s: Sequence[float] = GRID_K1, bs: Sequence[float] = GRID_B,
             stemmers: Sequence[bool] = GRID_STEMMER) -> BM25Params:
    """The grid point (k1 x b x stemmer) with the best R@1, then MRR@10, of query i against documents (document
    i is its relevant one), as `best_point` picks it. `on` says which pairs these are, for the record."""
    from mixret.fusion import mrr_at
    if len(queries) != len(documents) or len(queries) < 2:
        raise MixretError(f"fitting BM25 needs at least 2 validation pairs, got {len(queries)} queries and "
                          f"{len(documents)} documents")
    results = []
    for stemmer in stemmers:
        for k1 in k1s:
            for b in bs:
                ranks = gold_ranks(BM25Index(documents, k1, b, stemmer), queries)      # [Q]
                results.append({"k1": float(k1), "b": float(b), "stemmer": bool(stemmer),
                                "r@1": round(float((ranks == 1).mean()), 5), "mrr@10": round(mrr_at(ranks, 10), 5)})
    best = best_point(results)
    return BM25Params(best["k1"], best["b"], best["stemmer"], trained_on=trained_on,
                      fitted={"on": on, "pairs": len(queries), "selected_by": SELECTED_BY, "results": results})


def best_point(results: list[dict]) -> dict:
    """The result ({"k1", "b", "stemmer", "r@1", "mrr@10"}, as rounded in the record) with the highest R@1, then
    MRR@10; on a tie the defaults, else the first of the list."""
    default = BM25Params().values
    in_order = sorted(results, key=lambda r: (r["k1"], r["b"], r["stemmer"]) != default)   # the defaults first
    return max(in_order, key=lambda r: (r["r@1"], r["mrr@10"]))                              # the first of the best


# -- where they live --------------------------------------------------------------------------

def load_bm25(directory: str | os.PathLike | None) -> BM25Params | None:
    """The BM25 parameters in directory/bm25.json (a model folder or an EMB_DIR); None without the file."""
    if directory is None:
        return None
    path = Path(directory) / BM25_NAME
    if not path.is_file():
        return None
    return BM25Params.from_dict(io.read_json(path, "BM25 parameters"), str(path))


def save_bm25(directory: str | os.PathLike, params: BM25Params) -> None:
    io.write_json(Path(directory) / BM25_NAME, params.to_dict())


def model_bm25(model_dir: str | os.PathLike | None) -> tuple[BM25Params, str]:
    """The BM25 parameters saved with a model (defaults without them) -> (params, a sentence saying which)."""
    params = load_bm25(model_dir)
    if params is not None:
        return params, f"BM25 {params.describe()}, from {Path(model_dir) / BM25_NAME}"
    why = f"{model_dir} has no {BM25_NAME}" if model_dir is not None else "no model folder given"
    return BM25Params(), f"BM25 {BM25Params().describe()}: {why}"


def emb_dir_bm25(emb_dir: str | os.PathLike, meta: dict) -> BM25Params:
    """The BM25 parameters `mixret index` copied into an EMB_DIR (defaults without them); refused when they came
    from another model than the one that made the embeddings (meta: the EMB_DIR's meta.json)."""
    params = load_bm25(emb_dir)
    if params is None:
        return BM25Params()
    made_by, copied_from = meta.get("model_hash"), (params.model or {}).get("hash")
    if made_by is not None and copied_from != made_by:
        origin = (f"came from a model of weights hash {copied_from}" if copied_from is not None
                  else "name no model they came from")
        raise MixretError(f"{Path(emb_dir) / BM25_NAME}: these BM25 parameters {origin}, the embeddings from one of "
                          f"hash {made_by}; expected those of the model that made the embeddings (copy them with "
                          f"`mixret index {emb_dir}`)")
    return params


def copy_to_emb_dir(emb_dir: str | os.PathLike, meta: dict) -> BM25Params:
    """Put the BM25 parameters of the model that made an EMB_DIR's embeddings (meta.json's model_path) into it
    -> the parameters its searches will use. A model without them leaves the defaults (an earlier copy is
    removed); a model folder that is gone, or holds other weights than those that made the embeddings, too,
    with a warning."""
    import warnings
    target = Path(emb_dir) / BM25_NAME
    model_dir = meta.get("model_path")
    params = None
    if model_dir is not None and (Path(model_dir) / io.WEIGHTS_NAME).is_file():
        weights_hash = io.file_hash(Path(model_dir) / io.WEIGHTS_NAME)
        if weights_hash == meta.get("model_hash"):
            params = load_bm25(model_dir)
        else:
            warnings.warn(f"{model_dir} holds other weights than those that made the embeddings in {emb_dir}: "
                          f"its {BM25_NAME} is not used; BM25 keeps its defaults", stacklevel=2)
    elif model_dir is not None:
        warnings.warn(f"{model_dir}: the model that made the embeddings in {emb_dir} is not there; BM25 keeps its "
                      f"defaults", stacklevel=2)
    if params is None:
        target.unlink(missing_ok=True)
        return BM25Params()
    params.model = {"path": str(model_dir), "hash": meta.get("model_hash")}
    save_bm25(emb_dir, params)
    return params
