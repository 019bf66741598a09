"""The test set: inputs and targets read from JSONL, CSV, parquet, a DataFrame or an MLflow dataset."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tunelens.errors import TunelensError

READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, dtype=False),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".parquet": pd.read_parquet,
}


@dataclass(frozen=True)
class EvalDataset:
    """Paired test rows: the model sees `inputs[i]`, the reference answer is `targets[i]`."""

    inputs: list[str]
    targets: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.inputs)


def _frame(data, source: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise TunelensError(f"dataset {path} has an unknown format: use one of "
                                f"{', '.join(READERS)}")
        if not path.is_file():
            raise TunelensError(f"dataset {path} does not exist")
        try:
            return reader(path)
        except (ValueError, OSError) as exc:
            raise TunelensError(f"dataset {path} cannot be read as {path.suffix}: "
                                f"{str(exc).splitlines()[0]}") from None
    # MLflow datasets: PandasDataset has .df; genai evaluation datasets have .to_df().
    for attribute in ("df", "to_df", "to_pandas"):
        value = getattr(data, attribute, None)
        if value is not None:
            frame = value() if callable(value) else value
            if isinstance(frame, pd.DataFrame):
                return frame
    raise TunelensError(f"cannot read a dataset from {source}: pass a JSONL/CSV/parquet path, a "
                        "pandas DataFrame or an MLflow dataset")


def load_dataset(data, *, inputs_column: str = "inputs",
                 targets_column: str = "targets") -> EvalDataset:
    """Read `data` and check it has non-empty text columns `inputs_column` and `targets_column`."""
    source = str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__
    frame = _frame(data, source)
    missing = [c for c in (inputs_column, targets_column) if c not in frame.columns]
    if missing:
        raise TunelensError(f"dataset {source} has no column {' or '.join(map(repr, missing))} "
                            f"(columns: {', '.join(map(str, frame.columns)) or 'none'}); rename "
                            "them or set evaluation.inputs_column / targets_column")
    if len(frame) == 0:
        raise TunelensError(f"dataset {source} is empty: it needs at least one row")
    for column in (inputs_column, targets_column):
        blank = frame[column].isna()
        if blank.any():
            raise TunelensError(f"dataset {source}: column {column!r} is empty in "
                                f"{int(blank.sum())} row(s), first at row {int(blank.idxmax())}")
    return EvalDataset(inputs=[str(v) for v in frame[inputs_column]],
                       targets=[str(v) for v in frame[targets_column]], source=source)


def content_digest(dataset: EvalDataset) -> str:
    """sha256 over the rows themselves (inputs and targets as JSON), so the same test set saved as
    JSONL, CSV or parquet, or passed as a DataFrame, has one digest."""
    rows = json.dumps([dataset.inputs, dataset.targets], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(rows.encode()).hexdigest()
