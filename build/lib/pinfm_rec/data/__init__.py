"""Data pipeline of pinfm_rec: sources -> prepared event dirs -> leave-one-out splits -> loaders.

    info = prepare_dataset(spec)                     # DataSpec -> DatasetInfo (cached, validated)
    loader = build_loader(spec, info, "train", rank=r, world_size=w, seed=s)
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader: ...                     # SequenceBatch (see batch.py)

See schema.py for the on-disk format and the action vocabulary, data/README.md for the sources.
"""
from .batch import ACTION_KEY, ITEM_KEY, NEG_ITEM_KEY, SEQUENCE_KEYS, SURFACE_KEY, SequenceBatch
from .convert import DATA_DIR_ENV, resolve_data_path
from .convert_csv import ColumnMapping, convert_event_log
from .convert_movielens import convert_ml1m_raw, convert_ml1m_sasrec, convert_ml100k
from .convert_sasrec import convert_sasrec
from .loader import SequenceDataLoader, build_loader
from .prepare import DatasetInfo, DataSpec, SyntheticSpec, load_event_store, prepare_dataset, prepared_dir
from .schema import (
    ACTION_ENGAGE,
    ACTION_HIDE,
    ACTION_NAMES,
    ACTION_SAVE,
    ACTION_VIEW,
    NUM_ACTIONS,
    DataFormatError,
    DatasetMeta,
    validate_prepared,
    write_prepared,
)
from .splits import SplitRows, leave_one_out, train_item_counts
from .synthetic import generate_events, write_synthetic

__all__ = [
    "ACTION_ENGAGE", "ACTION_HIDE", "ACTION_KEY", "ACTION_NAMES", "ACTION_SAVE", "ACTION_VIEW", "ColumnMapping",
    "DATA_DIR_ENV", "DataFormatError", "DataSpec", "DatasetInfo", "DatasetMeta", "ITEM_KEY", "NEG_ITEM_KEY",
    "NUM_ACTIONS", "SEQUENCE_KEYS", "SURFACE_KEY", "SequenceBatch", "SequenceDataLoader", "SplitRows",
    "SyntheticSpec", "build_loader", "convert_event_log", "convert_ml1m_raw", "convert_ml1m_sasrec",
    "convert_ml100k", "convert_sasrec", "generate_events", "leave_one_out", "load_event_store", "prepare_dataset", "prepared_dir",
    "resolve_data_path", "train_item_counts", "validate_prepared", "write_prepared", "write_synthetic",
]
