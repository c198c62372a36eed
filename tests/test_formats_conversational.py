"""Conversational records, implicit prompts, the `prompt` format, Parquet, and chat templates.

The chat-template tokenizer here is a fake with the interface of
`jaxalign.data.hf_tokenizer.HFTokenizer` (`chat_template`, `encode_chat_split`,
`encode_chat`): byte ids (UTF-8 byte + 4) plus special ids that only the chat rendering
emits, so ids that came from plain-text encoding can never match the oracle. The oracle
for every chat-tokenized example is the whole conversation written out by hand with
`_conv_ids` (BOS, then per message: SOT ROLE content EOT).
"""

import gzip
import json

import numpy as np
import pytest

from jaxalign.data import formats as F
from jaxalign.data.examples import PairExample, PromptExample, SFTExample
from jaxalign.data.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
BOS, EOS = 2, 3
SOT, EOT = 260, 261
ROLE_ID = {"system": 262, "user": 263, "assistant": 264}


def _b(text):
  return [b + 4 for b in text.encode("utf-8")]


def _conv_ids(*turns, generation_prompt=False):
  """Oracle: [BOS] + (SOT ROLE content EOT) per (role, content) turn [+ SOT ASSISTANT]."""
  ids = [BOS]
  for role, content in turns:
    ids += [SOT, ROLE_ID[role]] + _b(content) + [EOT]
  return ids + ([SOT, ROLE_ID["assistant"]] if generation_prompt else [])


class FakeChatTokenizer:
  """Byte ids + a Jinja-free Python chat template with HFTokenizer's two chat methods.

  Template: [BOS], then for each message SOT, the role id, the content bytes, EOT; the
  generation prompt is SOT + the assistant id. An assistant turn's content and its EOT
  are its "assistant tokens" (what a `{% generation %}` block marks).
  """

  pad_id, unk_id, bos_id, eos_id = 0, 1, BOS, EOS
  chat_template = "<fake template>"
  vocab_size = 265

  def __init__(self, add_bos=True):
    self.add_bos = add_bos
    self.calls = []

  def encode(self, text):
    return np.asarray(_b(text), np.int32)

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4 and i < 260).decode("utf-8", "replace")

  def _render(self, messages, generation_prompt=False):
    ids, turn = [BOS], [-1]  # turn: index of the assistant message a token belongs to
    for k, m in enumerate(messages):
      assert set(m) == {"role", "content"}, m
      body = _b(m["content"]) + [EOT]
      owner = k if m["role"] == "assistant" else -1
      ids += [SOT, ROLE_ID[m["role"]]] + body
      turn += [-1, -1] + [owner] * len(body)
    if generation_prompt:
      ids += [SOT, ROLE_ID["assistant"]]
      turn += [-1, -1]
    return np.asarray(ids, np.int32), np.asarray(turn)

  def encode_chat_split(self, prompt_messages, completions):
    self.calls.append(("split", len(completions)))
    prompt, _ = self._render(prompt_messages, generation_prompt=True)
    out = []
    for c in completions:
      full, _ = self._render(list(prompt_messages) + list(c))
      assert np.array_equal(full[:prompt.size], prompt)
      out.append(full[prompt.size:])
    return prompt, out

  def encode_chat(self, messages, *, assistant_turns="final"):
    self.calls.append(("chat", assistant_turns))
    ids, turn = self._render(messages)
    if assistant_turns == "all":
      return ids, turn >= 0
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return ids, turn == last


def write_jsonl(path, records):
  data = "".join(json.dumps(r) + "\n" for r in records).encode()
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


def write_parquet(path, records, row_group_size=2):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
  return path


def U(text):
  return {"role": "user", "content": text}


def A(text):
  return {"role": "assistant", "content": text}


def S(text):
  return {"role": "system", "content": text}


# ------------------------------------------------------------------ parsing

def test_conversational_records_carry_messages_and_hh_text():
  tmpl_prompt = "sys\n\nHuman: Hi\n\nAssistant:"
  r = F.parse_object({"prompt": [S("sys"), {"role": "human", "content": "Hi"}],
                      "chosen": [{"role": "gpt", "content": "Yo"}], "rejected": [A("No")]},
                     "pairwise")
  assert r.kind == "pair" and r.conversational
  assert r.prompt_messages == (S("sys"), U("Hi"))  # Role aliases read canonically.
  assert r.completion_messages == ((A("Yo"),), (A("No"),))
  assert (r.prompt, r.completions) == (tmpl_prompt, (" Yo", " No"))
  # A string completion after a message prompt is one assistant message.
  r2 = F.parse_object({"prompt": [S("sys"), U("Hi")], "chosen": "Yo", "rejected": "No"},
                      "pairwise")
  assert r2 == r
  # Standard records carry no messages.
  r3 = F.parse_object({"prompt": "p", "chosen": "c", "rejected": "r"}, "pairwise")
  assert r3.prompt_messages is None and r3.completion_messages is None
  assert not r3.conversational
  # A multi-message completion renders whole after the prompt (text form).
  r4 = F.parse_object({"prompt": [U("q")], "completion": [A("a"), U("more"), A("b")],
                       "label": True}, "unpaired")
  assert r4.completions == (" a\n\nHuman: more\n\nAssistant: b",)
  assert r4.prompt + r4.completions[0] == "\n\nHuman: q\n\nAssistant: a\n\nHuman: more" \
      "\n\nAssistant: b"


def test_sft_messages_split_at_first_assistant_turn_text_at_final():
  msgs = [S("s"), U("q1"), A("a1"), U("q2"), A("a2")]
  r = F.parse_object({"messages": msgs}, "sft")
  assert r.prompt_messages == tuple(msgs[:2])
  assert r.completion_messages == (tuple(msgs[2:]),)
  # Text form (byte / SentencePiece tokenizers) unchanged: the final turn is the completion.
  assert r.prompt == "s\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
  assert r.completions == (" a2",)
  # prompt/completion with the same split is the same record.
  assert F.parse_object({"prompt": msgs[:2], "completion": msgs[2:]}, "sft") == r


@pytest.mark.parametrize("chosen, rejected, prompt, c, r", [
    # Differ in the final assistant turn.
    ([U("q"), A("yes")], [U("q"), A("no")], [U("q")], [A("yes")], [A("no")]),
    # Multi-turn, shared first exchange.
    ([S("s"), U("q"), A("a"), U("q2"), A("x")], [S("s"), U("q"), A("a"), U("q2"), A("y")],
     [S("s"), U("q"), A("a"), U("q2")], [A("x")], [A("y")]),
    # Differ at a user turn: both completions start at the last shared assistant turn.
    ([U("q"), A("a"), U("u1"), A("x")], [U("q"), A("a"), U("u2"), A("y")],
     [U("q")], [A("a"), U("u1"), A("x")], [A("a"), U("u2"), A("y")]),
    # One conversation continues the other.
    ([U("q"), A("a")], [U("q"), A("a"), U("more"), A("b")],
     [U("q")], [A("a")], [A("a"), U("more"), A("b")]),
])
def test_implicit_prompt_pairs(chosen, rejected, prompt, c, r):
  rec = F.parse_object({"chosen": chosen, "rejected": rejected}, "pairwise")
  assert rec.prompt_messages == tuple(prompt)
  assert rec.completion_messages == (tuple(c), tuple(r))
  explicit = F.parse_object({"prompt": prompt, "chosen": c, "rejected": r}, "pairwise")
  assert explicit == rec


def test_hh_records_carry_messages():
  rec = F.parse_object({"chosen": "\n\nHuman: Hi\n\nAssistant: ok\n\nHuman: more"
                                  "\n\nAssistant: Fine.",
                        "rejected": "\n\nHuman: Hi\n\nAssistant: ok\n\nHuman: more"
                                    "\n\nAssistant: No."}, "hh")
  assert rec.prompt == "\n\nHuman: Hi\n\nAssistant: ok\n\nHuman: more\n\nAssistant:"
  assert rec.completions == (" Fine.", " No.")
  assert rec.prompt_messages == (U("Hi"), A("ok"), U("more"))
  assert rec.completion_messages == ((A("Fine."),), (A("No."),))
  # A response that hallucinates a further turn keeps it as messages.
  rec = F.parse_object({"chosen": "\n\nHuman: Q\n\nAssistant: Fine.\n\nHuman: x\n\nAssistant: y",
                        "rejected": "\n\nHuman: Q\n\nAssistant: No."}, "hh")
  assert rec.completion_messages == ((A("Fine."), U("x"), A("y")), (A("No."),))


def test_prompt_format_keeps_other_fields_read_only(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "What is 2+2?", "answer": "4", "meta": {"level": [1, 2]}},
      {"prompt": [S("Be brief."), U("Capital of France?")], "answer": "Paris"},
  ])
  records = list(F.iter_text_records(path, "prompt"))
  assert [r.kind for r in records] == ["prompt", "prompt"]
  assert records[0].fields == {"answer": "4", "meta": {"level": [1, 2]}}
  assert records[0].completions == () and records[0].prompt_messages is None
  assert records[1].prompt == "Be brief.\n\nHuman: Capital of France?\n\nAssistant:"
  with pytest.raises(TypeError, match="read-only"):
    records[0].fields["answer"] = "5"
  with pytest.raises(TypeError, match="read-only"):
    records[0].fields.update(x=1)
  assert json.loads(json.dumps(records[0].fields)) == {"answer": "4", "meta": {"level": [1, 2]}}
  import pickle
  assert pickle.loads(pickle.dumps(records[0])) == records[0]
  examples = F.load_examples(path, "prompt", BYTES)
  assert all(isinstance(e, PromptExample) for e in examples)
  np.testing.assert_array_equal(examples[0].prompt, [BOS] + _b("What is 2+2?"))
  assert examples[1].fields["answer"] == "Paris"
  # Chat template: the prompt is rendered with the generation prompt.
  tok = FakeChatTokenizer()
  ex = F.load_examples(path, "prompt", tok)[1]
  np.testing.assert_array_equal(
      ex.prompt, _conv_ids(("system", "Be brief."), ("user", "Capital of France?"),
                           generation_prompt=True))


# ------------------------------------------------------------------ errors

GOOD = {"pairwise": {"prompt": [U("q")], "chosen": [A("c")], "rejected": [A("r")]},
        "sft": {"messages": [U("q"), A("a")]},
        "unpaired": {"prompt": [U("q")], "completion": [A("c")], "label": True},
        "ranked": {"prompt": [U("q")], "responses": [[A("a")], "b"], "scores": [1, 2]},
        "prompt": {"prompt": [U("q")], "answer": 3}}

BAD = [
    # (id, format, record, reason, field named)
    ("chosen_ends_with_user", "pairwise",
     {"prompt": [U("q")], "chosen": [A("a"), U("u")], "rejected": [A("r")]},
     F.INVALID_MESSAGES, "chosen[1]"),
    ("rejected_starts_with_user", "pairwise",
     {"prompt": [U("q")], "chosen": [A("a")], "rejected": [U("u"), A("r")]},
     F.INVALID_MESSAGES, "rejected[0]"),
    ("implicit_no_shared_prompt", "pairwise",
     {"chosen": [U("q1"), A("a")], "rejected": [U("q2"), A("b")]},
     F.NO_SHARED_PROMPT, ("chosen", "rejected")),
    ("implicit_ends_with_user", "pairwise",
     {"chosen": [U("q"), A("a"), U("u")], "rejected": [U("q"), A("b")]},
     F.INVALID_MESSAGES, "chosen[2]"),
    ("implicit_equal", "pairwise", {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]},
     F.CHOSEN_EQUALS_REJECTED, "rejected"),
    ("implicit_text_needs_prompt", "pairwise", {"chosen": "a", "rejected": "b"},
     F.MISSING_FIELD, "prompt"),
    ("mixed_forms", "pairwise", {"prompt": "q", "chosen": [A("a")], "rejected": "r"},
     F.WRONG_TYPE, "chosen"),
    ("bad_role", "pairwise", {"prompt": [U("q"), {"role": "tool", "content": "x"}],
                              "chosen": "a", "rejected": "b"},
     F.INVALID_MESSAGES, "prompt[1]"),
    ("content_not_str", "pairwise", {"prompt": [{"role": "user", "content": ["x"]}],
                                     "chosen": "a", "rejected": "b"},
     F.INVALID_MESSAGES, "prompt[0]"),
    ("message_not_object", "pairwise", {"prompt": [U("q"), "hello"], "chosen": "a",
                                        "rejected": "b"},
     F.INVALID_MESSAGES, "prompt[1]"),
    ("system_not_first", "sft", {"messages": [U("q"), S("s"), A("a")]},
     F.INVALID_MESSAGES, "messages[1]"),
    ("system_in_completion", "pairwise",
     {"prompt": [U("q")], "chosen": [A("a"), S("s"), A("b")], "rejected": [A("r")]},
     F.INVALID_MESSAGES, "chosen[1]"),
    ("empty_assistant", "pairwise",
     {"prompt": [U("q")], "chosen": [A("  ")], "rejected": [A("r")]},
     F.EMPTY_FIELD, "chosen[0]"),
    ("empty_completion_list", "unpaired", {"prompt": [U("q")], "completion": [], "label": True},
     F.EMPTY_FIELD, "completion"),
    ("sft_ends_with_user", "sft", {"messages": [U("q"), A("a"), U("u")]},
     F.INVALID_MESSAGES, "messages[2]"),
    ("sft_empty_last", "sft", {"messages": [U("q"), A("a"), U("u"), A("")]},
     F.EMPTY_FIELD, "messages[3]"),
    ("ranked_response_ends_with_user", "ranked",
     {"prompt": [U("q")], "responses": [[A("a")], [A("b"), U("c")]], "scores": [1, 2]},
     F.INVALID_MESSAGES, "responses[1][1]"),
    ("ranked_response_messages_after_text", "ranked",
     {"prompt": "q", "responses": ["a", [A("b")]], "scores": [1, 2]},
     F.WRONG_TYPE, "responses[1]"),
    ("prompt_empty", "prompt", {"prompt": "  ", "answer": 1}, F.EMPTY_FIELD, "prompt"),
    ("prompt_empty_messages", "prompt", {"prompt": []}, F.EMPTY_FIELD, "prompt"),
    ("prompt_missing", "prompt", {"question": "q"}, F.MISSING_FIELD, "prompt"),
]


def _named(field):
  if isinstance(field, tuple):
    return "fields " + " and ".join(f"'{f}'" for f in field)
  return f"field '{field}'"


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_bad_conversational_record_names_file_line_field(tmp_path, monkeypatch, case, ext):
  _, fmt, bad, reason, field = case
  records = [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]]
  if ext == "parquet":
    # A Parquet column has one type, and these rows mix types on purpose, so each row
    # is stored as JSON text and decoded back by wrapping the row reader (the reader's
    # own conversion of nested columns is tested below).
    path = write_parquet(tmp_path / "d.parquet", [{"j": json.dumps(r)} for r in records])
    where = f"{path}:row 2"
    read_rows = F.iter_parquet_rows
    monkeypatch.setattr(F, "iter_parquet_rows",
                        lambda p: ((i, json.loads(row["j"])) for i, row in read_rows(p)))
  else:
    path = write_jsonl(tmp_path / "d.jsonl", records)
    where = f"{path}:3"
  with pytest.raises(ValueError) as info:
    F.load_examples(path, fmt, BYTES)
  message = str(info.value)
  assert f"{where}: {_named(field)}" in message, message
  assert f"[reason: {reason}]" in message and info.value.reason == reason
  report = F.DataReport()
  got = F.load_examples(path, fmt, BYTES, on_error="skip", report=report)
  assert len(got) == 3 and dict(report.errors) == {reason: 1}
  assert report.error_samples[reason][0].startswith(where + ":")


def test_error_messages_read_well():
  with pytest.raises(F.RecordError) as info:
    F.parse_object({"prompt": [U("q")], "chosen": [A("a"), U("u")], "rejected": [A("r")]},
                   "pairwise")
  assert "is the last message of 'chosen' but has role 'user'" in str(info.value)
  with pytest.raises(F.RecordError) as info:
    F.parse_object({"chosen": [U("q1"), A("a")], "rejected": [U("q2"), A("b")]}, "pairwise")
  assert "share no prompt" in str(info.value) and "'prompt'" in str(info.value)


# ------------------------------------------------------------------ Parquet

def test_parquet_nested_messages_equal_jsonl(tmp_path):
  records = [
      {"prompt": [S("s"), U(f"q{i}")], "chosen": [A(f"good {i} ü")], "rejected": [A(f"bad {i}")]}
      for i in range(5)]
  pq_path = write_parquet(tmp_path / "d.parquet", records, row_group_size=2)
  import pyarrow.parquet as pq
  meta = pq.ParquetFile(pq_path).metadata
  assert meta.num_row_groups == 3  # Several row groups are streamed.
  schema = str(pq.read_schema(pq_path).field("chosen").type)
  assert schema.startswith("list<") and "struct<" in schema  # Nested messages column.
  jl = write_jsonl(tmp_path / "d.jsonl", records)
  rp, rj = F.DataReport(), F.DataReport()
  a = list(F.iter_text_records(pq_path, "pairwise", report=rp))
  b = list(F.iter_text_records(jl, "pairwise", report=rj))
  assert [dataclass_without_source(x) for x in a] == [dataclass_without_source(x) for x in b]
  assert [x.source for x in a] == [f"{pq_path}:row {i}" for i in range(5)]
  assert rp.lines == rp.records == 5


def dataclass_without_source(record):
  import dataclasses
  return dataclasses.replace(record, source="")


def test_parquet_standard_columns_and_errors(tmp_path):
  path = write_parquet(tmp_path / "s.parquet", [
      {"prompt": "p0", "completion": "c0", "label": True},
      {"prompt": "p1", "completion": None, "label": False},  # Null = wrong type.
      {"prompt": "p2", "completion": "c2", "label": True},
  ])
  with pytest.raises(ValueError, match=r"s.parquet:row 1: field 'completion' must be a "
                                       r"string, got null"):
    F.load_examples(path, "unpaired", BYTES)
  report = F.DataReport()
  got = F.load_examples(path, "unpaired", BYTES, on_error="skip", report=report)
  assert len(got) == 2 and dict(report.errors) == {F.WRONG_TYPE: 1}
  np.testing.assert_array_equal(got[1].prompt, [BOS] + _b("p2"))


def test_parquet_prompt_fields_and_non_json_values(tmp_path):
  import datetime
  path = write_parquet(tmp_path / "p.parquet", [
      {"prompt": "2+2?", "answer": 4, "when": None},
      {"prompt": "3+3?", "answer": 6, "when": datetime.datetime(2024, 1, 1)},
  ])
  with pytest.raises(ValueError, match=r"p.parquet:row 1: field 'when' holds a datetime"):
    list(F.iter_text_records(path, "prompt"))
  report = F.DataReport()
  [rec] = F.iter_text_records(path, "prompt", on_error="skip", report=report)
  assert rec.fields == {"answer": 4, "when": None}
  assert dict(report.errors) == {F.NOT_JSON_VALUE: 1}


def test_parquet_unreadable_and_too_long(tmp_path):
  bad = tmp_path / "bad.parquet"
  bad.write_bytes(b"not parquet at all")
  with pytest.raises(ValueError, match="cannot open record file .*bad.parquet"):
    list(F.iter_text_records(bad, "prompt"))
  path = write_parquet(tmp_path / "long.parquet", [{"prompt": "x" * 50}, {"prompt": "y"}])
  report = F.DataReport()
  got = list(F.iter_text_records(path, "prompt", on_error="skip", report=report,
                                 max_record_chars=20))
  assert len(got) == 1 and dict(report.errors) == {F.RECORD_TOO_LONG: 1}


# ------------------------------------------------------------------ chat-template tokenizer

def test_chat_tokenizer_renders_whole_conversations():
  tok = FakeChatTokenizer()
  rec = F.parse_object({"prompt": [S("sys"), U("Hi")], "chosen": [A("Yo")],
                        "rejected": [A("No"), U("why?"), A("Because.")]}, "pairwise")
  ex = F.tokenize_record(rec, tok)
  assert isinstance(ex, PairExample)
  for comp, turns in ((ex.chosen, [("assistant", "Yo")]),
                      (ex.rejected, [("assistant", "No"), ("user", "why?"),
                                     ("assistant", "Because.")])):
    full = _conv_ids(("system", "sys"), ("user", "Hi"), *turns)
    np.testing.assert_array_equal(np.concatenate([ex.prompt, comp]), full)
  np.testing.assert_array_equal(ex.prompt, _conv_ids(("system", "sys"), ("user", "Hi"),
                                                     generation_prompt=True))
  assert ex.prompt.dtype == ex.chosen.dtype == np.int32
  assert tok.calls == [("split", 2)]


@pytest.mark.parametrize("fmt, record", [
    ("sft", {"prompt": [U("Hi")], "completion": [A("Yo")]}),
    ("sft", {"messages": [U("Hi"), A("Yo")]}),
    ("unpaired", {"prompt": [U("Hi")], "completion": "Yo", "label": False}),
    ("ranked", {"prompt": [U("Hi")], "responses": ["Yo", [A("Hey")]], "scores": [0, 1]}),
    ("hh", {"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"}),
    ("pairwise", {"chosen": [U("Hi"), A("Yo")], "rejected": [U("Hi"), A("Hey")]}),
])
def test_every_conversational_format_uses_the_chat_template(fmt, record):
  ex = F.tokenize_record(F.parse_object(record, fmt), FakeChatTokenizer())
  comps = {"sft": lambda e: [e.completion], "unpaired": lambda e: [e.completion],
           "ranked": lambda e: list(e.responses),
           "hh": lambda e: [e.chosen, e.rejected],
           "pairwise": lambda e: [e.chosen, e.rejected]}[fmt](ex)
  answers = ["Yo", "Hey"]
  for comp, answer in zip(comps, answers):
    np.testing.assert_array_equal(np.concatenate([ex.prompt, comp]),
                                  _conv_ids(("user", "Hi"), ("assistant", answer)))
  if fmt == "sft":
    assert ex.loss_mask is None  # One assistant turn: all of the completion is scored.


def test_multi_turn_sft_loss_mask_marks_exactly_the_assistant_turns():
  tok = FakeChatTokenizer()
  msgs = [S("Be terse."), U("q1"), A("a1!"), U("q2?"), A("a2"), U("third q"), A("a3.")]
  ex = F.tokenize_record(F.parse_object({"messages": msgs}, "sft"), tok)
  assert tok.calls == [("chat", "all")]
  # Oracle, written out segment by segment: the prompt runs up to (excluding) the first
  # assistant content token; then each turn with its scored flag.
  prompt = _conv_ids(("system", "Be terse."), ("user", "q1"), generation_prompt=True)
  segments = [(_b("a1!") + [EOT], True), ([SOT, ROLE_ID["user"]] + _b("q2?") + [EOT], False),
              ([SOT, ROLE_ID["assistant"]], False), (_b("a2") + [EOT], True),
              ([SOT, ROLE_ID["user"]] + _b("third q") + [EOT], False),
              ([SOT, ROLE_ID["assistant"]], False), (_b("a3.") + [EOT], True)]
  np.testing.assert_array_equal(ex.prompt, prompt)
  np.testing.assert_array_equal(ex.completion, [t for seg, _ in segments for t in seg])
  np.testing.assert_array_equal(ex.loss_mask, [f for seg, f in segments for _ in seg])
  # Together they are the whole conversation as the template renders it.
  np.testing.assert_array_equal(
      np.concatenate([ex.prompt, ex.completion]),
      _conv_ids(*[(m["role"], m["content"]) for m in msgs]))
  # Byte tokenizer (no chat template): today's text form, final turn only, no mask.
  ex_b = F.tokenize_record(F.parse_object({"messages": msgs}, "sft"), BYTES)
  assert ex_b.loss_mask is None and BYTES.decode(ex_b.completion) == " a3."


def test_prompt_with_assistant_turns_scores_only_the_completion():
  tok = FakeChatTokenizer()
  rec = F.parse_object({"prompt": [U("q1"), A("a1"), U("q2")],
                        "completion": [A("b1"), U("q3"), A("b2")]}, "sft")
  ex = F.tokenize_record(rec, tok)
  np.testing.assert_array_equal(
      ex.prompt, _conv_ids(("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                           generation_prompt=True))
  scored = ex.completion[ex.loss_mask]
  np.testing.assert_array_equal(scored, _b("b1") + [EOT] + _b("b2") + [EOT])


def test_loss_mask_through_truncation_and_batching(tmp_path):
  from jaxalign.data import batching
  tok = FakeChatTokenizer()
  msgs = [U("q"), A("abc"), U("uuuuuu"), A("xyz")]
  path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}] * 2)
  [full] = F.load_examples(path, "sft", tok)[:1]
  p = full.prompt.size
  # Cut the completion inside the user turn: the mask is cut with it.
  report = F.DataReport()
  [ex, _] = F.load_examples(path, "sft", tok, report=report,
                            truncation=F.Truncation(max_length=p + 8))
  np.testing.assert_array_equal(ex.completion, full.completion[:8])
  np.testing.assert_array_equal(ex.loss_mask, full.loss_mask[:8])
  assert report.truncation[F.COMPLETION_TRUNCATED] == 2
  batch = batching.make_batch([ex], batching.LayoutConfig("packed", (32,), 1,
                                                          rows_per_batch=1))
  rows, cols = np.nonzero(batch["seq_ids"] == 0)
  np.testing.assert_array_equal(batch["targets"][rows, cols], _b("abc") + [EOT])
  # A mask that keeps no scored token after the cut drops the example, counted.
  ids = np.arange(10, 16, dtype=np.int32)
  rec = F.TextRecord("sft", "", ("",), source="f:1")
  report = F.DataReport()
  out = F.truncate_encoded(rec, np.asarray([BOS], np.int32), [ids], F.Truncation(max_length=3),
                           bos_id=BOS, report=report,
                           loss_masks=[np.asarray([0, 0, 0, 1, 1, 1], bool)])
  assert out is None and report.truncation == {F.COMPLETION_TRUNCATED_AWAY: 1}


def test_standard_records_with_a_chat_tokenizer_are_plain_text():
  rec = F.parse_object({"prompt": "Q: 1+1", "chosen": " 2", "rejected": " 3"}, "pairwise")
  ex = F.tokenize_record(rec, FakeChatTokenizer(add_bos=True))
  np.testing.assert_array_equal(ex.prompt, [BOS] + _b("Q: 1+1"))
  np.testing.assert_array_equal(ex.chosen, _b(" 2") + [EOS])
  ex = F.tokenize_record(rec, FakeChatTokenizer(add_bos=False))
  np.testing.assert_array_equal(ex.prompt, _b("Q: 1+1"))
  np.testing.assert_array_equal(ex.rejected, _b(" 3") + [EOS])


def test_pipeline_tokenize_fn_carries_the_loss_mask():
  from jaxalign.data import pipeline
  msgs = [U("q"), A("a"), U("u"), A("b")]
  rec = F.parse_object({"messages": msgs}, "sft")
  got = pipeline.make_tokenize_fn(FakeChatTokenizer())(rec)
  want = F.tokenize_record(rec, FakeChatTokenizer())
  assert isinstance(got, SFTExample) and got.loss_mask is not None
  np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
  np.testing.assert_array_equal(got.completion, want.completion)


# ------------------------------------------------------------------ TFDS, CLI

def test_tfds_round_trips_conversational_and_prompt_records(tmp_path):
  from jaxalign.data import tfds_builder as TB
  pairs = write_jsonl(tmp_path / "c.jsonl", [
      {"prompt": [S("s"), U("q")], "chosen": [A("a"), U("more"), A("b")], "rejected": "r"},
      {"prompt": "text", "chosen": "x", "rejected": "y"}])
  hh = write_jsonl(tmp_path / "hh.jsonl", [
      {"chosen": "\n\nHuman: h\n\nAssistant: x", "rejected": "\n\nHuman: h\n\nAssistant: y"}])
  prompts = write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "2+2?", "answer": "4"}, {"prompt": [U("3+3?")], "answer": "6"}])
  for fmt, path in (("pairwise", pairs), ("hh", hh), ("prompt", prompts)):
    sources, _ = TB.build_data_sources({"train": [path]}, fmt, tmp_path / fmt)
    got = [TB.record_from_features(r) for r in sources["train"]]
    want = list(F.iter_text_records(path, fmt))
    assert got == want, fmt
    assert want[0].conversational == (fmt != "prompt")
  assert isinstance(got[0].fields, F.FrozenFields) and got[1].fields == {"answer": "6"}


def test_cli_reads_parquet_and_prompt_format(tmp_path, capsys):
  from jaxalign.data import __main__ as cli
  path = write_parquet(tmp_path / "p.parquet", [
      {"prompt": [U("2+2?")], "answer": "4"}, {"prompt": [S("s"), U("3+3?")], "answer": "6"}])
  assert cli.main([str(path), "--format", "prompt", "--tokenizer", "bytes", "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["report"]["records"] == 2 and summary["conversational_records"] == 2
  assert summary["lengths"]["prompt"]["count"] == 2
  assert "note" in summary["layouts"]
  msgs = tmp_path / "m.parquet"
  write_parquet(msgs, [{"messages": [U("q"), A("a"), U("u"), A("b")]}])
  assert cli.main([str(msgs), "--format", "sft", "--tokenizer", "bytes"]) == 0
  out = capsys.readouterr().out
  assert "1 conversational" in out and "padded" in out
