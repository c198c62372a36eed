"""A TFDS builder that turns local record files into an array_record dataset.

The files are anything ``formats.iter_text_records`` reads: ``.jsonl``, ``.jsonl.gz``
or ``.parquet``, in any of ``formats.FORMATS``.

It works without TensorFlow: ``file_format="array_record"`` writes with array_record,
and ``builder.as_data_source()`` reads with random access (what grain needs). The
dataset stores validated *text* records (``formats.TextRecord``), not token ids, so one
prepared dataset serves any tokenizer; tokenization happens in the grain pipeline. A
record's conversation (``prompt_messages``, ``completion_messages``) and a ``prompt``
record's extra ``fields`` are stored as one JSON text feature, ``extra_json``.

Records keep file order (``disable_shuffling``): record i of a split is the i-th valid
record of its files. The prepared dataset lives in
``data_dir/jsonl_records_builder/<fingerprint>/<version>``, where the fingerprint (the
builder config name) hashes the format, the parsing options and each file's path, size
and modification time: TFDS reuses a prepared dataset only for unchanged inputs, and
edited files are rebuilt instead of read stale.

    builder = JsonlRecordsBuilder(files={"train": ["a.jsonl.gz"]}, fmt="hh",
                                  data_dir="/tmp/hh_ds", on_error="skip")
    builder.download_and_prepare()
    source = builder.as_data_source()["train"]   # len(), source[i] -> feature dict
    record = record_from_features(source[0])       # -> formats.TextRecord

``tensorflow_datasets`` is imported when ``JsonlRecordsBuilder`` is first looked up
(or ``build_data_sources`` called), not with this module: the training pipeline
imports ``record_from_features`` even when its records come from memory, and there
TFDS would only cost import time and memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxalign.data import formats
from jaxalign.data.tokenizer import ChatTemplate

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

_NO_LABEL = -1


def _extra_json(record: formats.TextRecord) -> str:
  extra: dict[str, Any] = {}
  if record.prompt_messages is not None:
    extra["prompt_messages"] = list(record.prompt_messages)
  if record.completion_messages is not None:
    extra["completion_messages"] = [list(c) for c in record.completion_messages]
  if record.fields is not None:
    extra["fields"] = dict(record.fields)
  return json.dumps(extra, ensure_ascii=False) if extra else ""


def record_to_features(record: formats.TextRecord) -> dict[str, Any]:
  return {
      "kind": record.kind,
      "prompt": record.prompt,
      "completions": list(record.completions),
      "scores": np.asarray(record.scores or (), np.float32),
      "label": _NO_LABEL if record.label is None else int(record.label),
      "source": record.source,
      "extra_json": _extra_json(record),
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_from_features(features: Mapping[str, Any]) -> formats.TextRecord:
  """A decoded TFDS example (bytes for text) back to the TextRecord it was built from."""
  kind = _text(features["kind"])
  label = int(features["label"])
  scores = tuple(float(s) for s in features["scores"])
  extra_text = _text(features.get("extra_json", b""))
  extra = json.loads(extra_text) if extra_text else {}
  conversation = {}
  if "prompt_messages" in extra:
    conversation["prompt_messages"] = tuple(extra["prompt_messages"])
  if "completion_messages" in extra:
    conversation["completion_messages"] = tuple(tuple(c) for c in extra["completion_messages"])
  if "fields" in extra:
    conversation["fields"] = formats.FrozenFields(extra["fields"])
  return formats.TextRecord(
      kind=kind,
      prompt=_text(features["prompt"]),
      completions=tuple(_text(c) for c in features["completions"]),
      label=None if label == _NO_LABEL else bool(label),
      scores=scores if kind == "ranked" else None,
      source=_text(features["source"]),
      **conversation,
  )


class _JsonlRecordsMethods:
  """``JsonlRecordsBuilder``'s methods, kept apart from its TFDS base class.

  The builder class itself is created on first use (``_builder_class``), so these live
  here at module level where they can be read and tested like any other code.
  """

  def __init__(self, *, files: Mapping[str, Sequence[str | os.PathLike]], fmt: str,
               on_error: formats.OnError = "raise", template: ChatTemplate | None = None,
               max_record_chars: int = formats.DEFAULT_MAX_RECORD_CHARS,
               file_format: str = "array_record", **kwargs):
    if fmt not in formats.FORMATS:
      raise ValueError(f"unknown record format {fmt!r}; choose one of "
                       f"{', '.join(formats.FORMATS)}")
    if not files:
      raise ValueError("files must map at least one split name to record files, e.g. "
                       "{'train': ['data.jsonl']}")
    self._files = {split: [os.fspath(p) for p in paths] for split, paths in files.items()}
    self._fmt = fmt
    self._on_error = on_error
    self._template = template or ChatTemplate()
    self._max_record_chars = max_record_chars
    # Filled while preparing: errors by reason for each split.
    self.reports: dict[str, formats.DataReport] = {}
    if "config" not in kwargs:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      kwargs["config"] = tfds.core.BuilderConfig(
          name=self._fingerprint(), description=f"{fmt} records from {self._files}")
    super().__init__(file_format=file_format, **kwargs)

  def _fingerprint(self) -> str:
    inputs: dict[str, Any] = {"fmt": self._fmt, "on_error": self._on_error,
                              "max_record_chars": self._max_record_chars,
                              "template": dataclasses.asdict(self._template), "files": {}}
    for split, paths in sorted(self._files.items()):
      entries = []
      for path in paths:
        try:
          st = os.stat(path)
        except OSError as e:
          raise ValueError(f"record file {path} (split '{split}') cannot be read: {e}") from e
        entries.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
      inputs["files"][split] = entries
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return f"records_{digest[:16]}"

  def _info(self) -> tfds.core.DatasetInfo:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.core.DatasetInfo(
        builder=self,
        description="Validated jaxalign text records parsed from local record files.",
        features=tfds.features.FeaturesDict({
            "kind": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "completions": tfds.features.Sequence(tfds.features.Text()),
            "scores": tfds.features.Sequence(np.float32),
            "label": np.int8,  # -1 = no label; 0 / 1 for unpaired (KTO) records.
            "source": tfds.features.Text(),  # "file:line" or "file:row N"
            # JSON: prompt_messages, completion_messages, fields ("" = none).
            "extra_json": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    return {split: self._generate_examples(split, paths)
            for split, paths in self._files.items()}

  def _generate_examples(self, split: str, paths: Sequence[str]):
    report = self.reports.setdefault(split, formats.DataReport())
    index = 0
    for path in paths:
      for record in formats.iter_text_records(
          path, self._fmt, on_error=self._on_error, report=report,
          template=self._template, max_record_chars=self._max_record_chars):
        yield index, record_to_features(record)
        index += 1


@functools.cache
def _builder_class() -> type[tfds.core.GeneratorBasedBuilder]:
  # Cached: TFDS registers builder classes by name and refuses a second definition.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class JsonlRecordsBuilder(_JsonlRecordsMethods, tfds.core.GeneratorBasedBuilder):
    """Local .jsonl / .jsonl.gz / .parquet record files -> array_record.

    Any of ``formats.FORMATS``; the methods are ``_JsonlRecordsMethods``'.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Text records: kind, prompt, completions, scores, label, source.",
                     "1.1.0": "extra_json: the conversation as messages, and prompt fields."}

  # Found by pickle and repr as the module attribute it has always been.
  JsonlRecordsBuilder.__qualname__ = "JsonlRecordsBuilder"
  globals()["JsonlRecordsBuilder"] = JsonlRecordsBuilder
  return JsonlRecordsBuilder


def __getattr__(name: str) -> Any:
  if name == "JsonlRecordsBuilder":
    return _builder_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_data_sources(files: Mapping[str, Sequence[str | os.PathLike]], fmt: str,
                       data_dir: str | os.PathLike, *, on_error: formats.OnError = "raise",
                       **builder_kwargs) -> tuple[dict[str, Any], dict[str, formats.DataReport]]:
  """Prepares (or reuses) the dataset; returns (split -> random-access source, reports).

  The reports are empty for splits that were already prepared by an earlier call.
  """
  builder = _builder_class()(files=files, fmt=fmt, on_error=on_error,
                             data_dir=os.fspath(data_dir), **builder_kwargs)
  builder.download_and_prepare()
  return dict(builder.as_data_source()), builder.reports
