"""Record parsers: HH prompt extraction, typed examples, bad input, truncation."""

import gzip
import json
import numpy as np
import pytest

from jaxalign.data import formats as F
from jaxalign.data.examples import PairExample, RankedExample, SFTExample, UnpairedExample
from jaxalign.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id


def enc(text, *, bos=False, eos=False):
  """Oracle encoding: UTF-8 bytes + 4 (ByteTokenizer's documented id map)."""
  ids = [b + 4 for b in text.encode("utf-8")]
  return np.asarray(([BOS] if bos else []) + ids + ([EOS] if eos else []), np.int32)


def write_jsonl(path, lines):
  """lines: dicts (dumped) or raw bytes (written verbatim)."""
  data = b"".join((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n"
                  for ln in lines)
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


# ------------------------------------------------------------------ HH extraction

@pytest.mark.parametrize("chosen, rejected, prompt, c, r", [
    # Single turn.
    ("\n\nHuman: Hi\n\nAssistant: Hello there.", "\n\nHuman: Hi\n\nAssistant: Go away.",
     "\n\nHuman: Hi\n\nAssistant:", " Hello there.", " Go away."),
    # Multi-turn, differing only in the last turn; the earlier assistant turn is shared.
    ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: Yes, D.",
     "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: Yes, E!",
     "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant:", " Yes, D.", " Yes, E!"),
    # A response that hallucinates further turns stays whole (prompt = shared part).
    ("\n\nHuman: Q\n\nAssistant: Fine.\n\nHuman: more\n\nAssistant: ok",
     "\n\nHuman: Q\n\nAssistant: No.",
     "\n\nHuman: Q\n\nAssistant:", " Fine.\n\nHuman: more\n\nAssistant: ok", " No."),
    # One completion is a prefix of the other.
    ("\n\nHuman: Q\n\nAssistant: Sure", "\n\nHuman: Q\n\nAssistant: Sure thing",
     "\n\nHuman: Q\n\nAssistant:", " Sure", " Sure thing"),
])
def test_hh_implicit_prompt(chosen, rejected, prompt, c, r):
  assert F.split_hh_pair(chosen, rejected) == (prompt, c, r)
  record = F.parse_object({"chosen": chosen, "rejected": rejected}, "hh")
  assert (record.kind, record.prompt, record.completions) == ("pair", prompt, (c, r))


# ------------------------------------------------------------------ good records

def test_each_format_yields_typed_examples(tmp_path):
  msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  cases = {
      "sft": ([{"prompt": "P", "completion": "C"}, {"messages": msgs}],
              [SFTExample(enc("P", bos=True), enc("C", eos=True)),
               SFTExample(enc("\n\nHuman: Hi\n\nAssistant:", bos=True), enc(" Yo", eos=True))]),
      # A message-list prompt: completions are assistant contents, rendered after
      # "\n\nAssistant:" with the template's space, as in the messages form.
      "pairwise": ([{"prompt": msgs[:1], "chosen": "a", "rejected": "b"}],
                   [PairExample(enc("\n\nHuman: Hi\n\nAssistant:", bos=True),
                                enc(" a", eos=True), enc(" b", eos=True))]),
      "hh": ([{"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected":
               "\n\nHuman: Hi\n\nAssistant: b"}],
             [PairExample(enc("\n\nHuman: Hi\n\nAssistant:", bos=True),
                          enc(" a", eos=True), enc(" b", eos=True))]),
      "unpaired": ([{"prompt": "P", "completion": "C", "label": False}],
                   [UnpairedExample(enc("P", bos=True), enc("C", eos=True), False)]),
      "ranked": ([{"prompt": "P", "responses": ["x", "yy", "z"], "scores": [1, 0.5, -2]}],
                 [RankedExample(enc("P", bos=True), (enc("x", eos=True), enc("yy", eos=True),
                                                      enc("z", eos=True)),
                                np.asarray([1, 0.5, -2], np.float32))]),
  }
  for fmt, (records, expected) in cases.items():
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    report = F.DataReport()
    got = F.load_examples(path, fmt, TOK, report=report)
    assert report.examples == len(expected) and report.num_errors == 0, fmt
    assert len(got) == len(expected), fmt
    for g, e in zip(got, expected):
      assert type(g) is type(e), fmt
      for field in e.__dataclass_fields__:
        gv, ev = getattr(g, field), getattr(e, field)
        if isinstance(ev, tuple):
          assert len(gv) == len(ev)
          for a, b in zip(gv, ev):
            np.testing.assert_array_equal(a, b)
        else:
          np.testing.assert_array_equal(gv, ev)
        if isinstance(gv, np.ndarray) and field != "scores":
          assert gv.dtype == np.int32


def test_message_prompt_plus_completion_equals_messages_form():
  msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Yo  there"}]
  a = F.parse_object({"messages": msgs}, "sft")
  b = F.parse_object({"prompt": msgs[:2], "completion": "Yo  there"}, "sft")
  assert a == b
  assert a.prompt + a.completions[0] == "Be nice.\n\nHuman: Hi\n\nAssistant: Yo  there"


def test_gzip_equals_plain_and_blank_lines_counted(tmp_path):
  records = [{"prompt": "p", "chosen": "c", "rejected": f"r{i}"} for i in range(5)]
  plain = write_jsonl(tmp_path / "a.jsonl", records + [b""])
  gz = write_jsonl(tmp_path / "a.jsonl.gz", records + [b""])
  rp, rg = F.DataReport(), F.DataReport()
  a = list(F.iter_text_records(plain, "pairwise", report=rp))
  b = list(F.iter_text_records(gz, "pairwise", report=rg))
  assert [x.completions for x in a] == [x.completions for x in b]
  assert len(a) == 5 and rp.blank_lines == rg.blank_lines == 1 and rp.lines == 6
  assert a[2].source == f"{plain}:3"


# ------------------------------------------------------------------ bad input

GOOD = {"pairwise": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "hh": {"chosen": "\n\nHuman: q\n\nAssistant: c",
               "rejected": "\n\nHuman: q\n\nAssistant: r"},
        "sft": {"prompt": "p", "completion": "c"},
        "unpaired": {"prompt": "p", "completion": "c", "label": True},
        "ranked": {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}}

BAD_CASES = [
    # (id, format, bad line, reason, field named in the message or None)
    ("malformed_json", "pairwise", b'{"prompt": "p", "chosen": "c",', F.MALFORMED_JSON, None),
    ("not_object", "pairwise", b'["p", "c", "r"]', F.NOT_AN_OBJECT, None),
    ("invalid_utf8", "pairwise", b'{"prompt": "p\xff\xfe", "chosen": "c", "rejected": "r"}',
     F.INVALID_UTF8, None),
    ("missing_chosen", "pairwise", {"prompt": "p", "rejected": "r"}, F.MISSING_FIELD, "chosen"),
    ("missing_prompt", "pairwise", {"chosen": "c", "rejected": "r"}, F.MISSING_FIELD, "prompt"),
    ("mistyped_rejected", "pairwise", {"prompt": "p", "chosen": "c", "rejected": 7},
     F.WRONG_TYPE, "rejected"),
    ("mistyped_prompt", "pairwise", {"prompt": 1.5, "chosen": "c", "rejected": "r"},
     F.WRONG_TYPE, "prompt"),
    ("empty_chosen", "pairwise", {"prompt": "p", "chosen": "", "rejected": "r"},
     F.EMPTY_FIELD, "chosen"),
    ("blank_rejected", "pairwise", {"prompt": "p", "chosen": "c", "rejected": "  \n"},
     F.EMPTY_FIELD, "rejected"),
    ("chosen_eq_rejected", "pairwise", {"prompt": "p", "chosen": "same", "rejected": "same"},
     F.CHOSEN_EQUALS_REJECTED, "rejected"),
    ("hh_equal", "hh", {"chosen": "\n\nHuman: q\n\nAssistant: x",
                        "rejected": "\n\nHuman: q\n\nAssistant: x"},
     F.CHOSEN_EQUALS_REJECTED, "rejected"),
    ("hh_no_assistant", "hh", {"chosen": "\n\nHuman: q a", "rejected": "\n\nHuman: q b"},
     F.NO_ASSISTANT_TURN, "chosen"),
    ("hh_empty_response", "hh", {"chosen": "\n\nHuman: q\n\nAssistant:",
                                 "rejected": "\n\nHuman: q\n\nAssistant: r"},
     F.EMPTY_FIELD, "chosen"),
    ("over_long", "pairwise", {"prompt": "p" * 500, "chosen": "c", "rejected": "r"},
     F.RECORD_TOO_LONG, None),
    ("sft_bad_messages", "sft", {"messages": [{"role": "user", "content": "hi"}]},
     F.INVALID_MESSAGES, "messages"),
    ("sft_missing_completion", "sft", {"prompt": "p"}, F.MISSING_FIELD, "completion"),
    ("unpaired_int_label", "unpaired", {"prompt": "p", "completion": "c", "label": 1},
     F.WRONG_TYPE, "label"),
    ("unpaired_missing_label", "unpaired", {"prompt": "p", "completion": "c"},
     F.MISSING_FIELD, "label"),
    ("ranked_len_mismatch", "ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1]},
     F.LENGTH_MISMATCH, "scores"),
    ("ranked_one_response", "ranked", {"prompt": "p", "responses": ["a"], "scores": [1]},
     F.TOO_FEW_RESPONSES, "responses"),
    ("ranked_nan", "ranked", b'{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}',
     F.NON_FINITE_SCORE, "scores[1]"),
    ("ranked_str_score", "ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]},
     F.WRONG_TYPE, "scores[1]"),
    ("ranked_empty_response", "ranked", {"prompt": "p", "responses": ["a", ""], "scores": [1, 2]},
     F.EMPTY_FIELD, "responses[1]"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_raises_naming_file_line_field(tmp_path, case):
  _, fmt, bad, reason, field = case
  path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]])
  with pytest.raises(ValueError) as info:
    F.load_examples(path, fmt, TOK, max_record_chars=400)
  message = str(info.value)
  assert f"{path}:3" in message, message  # The bad record is on line 3.
  assert f"[reason: {reason}]" in message, message
  if field is not None:
    assert f"field '{field}'" in message, message
  assert info.value.reason == reason


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skipped_and_counted_by_reason(tmp_path, case):
  _, fmt, bad, reason, _ = case
  path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt], bad, GOOD[fmt], bad])
  report = F.DataReport()
  got = F.load_examples(path, fmt, TOK, on_error="skip", report=report, max_record_chars=400)
  assert len(got) == 2 and report.examples == 2 and report.records == 2
  assert dict(report.errors) == {reason: 2}
  assert [m.split(" ")[0] for m in report.error_samples[reason]] == [f"{path}:2:", f"{path}:4:"]


def test_report_keeps_only_first_samples(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [b"{bad"] * 7)
  report = F.DataReport(max_samples=3)
  assert F.load_examples(path, "pairwise", TOK, on_error="skip", report=report) == []
  assert report.errors[F.MALFORMED_JSON] == 7
  assert [s.split(" ")[0] for s in report.error_samples[F.MALFORMED_JSON]] == [
      f"{path}:1:", f"{path}:2:", f"{path}:3:"]
  assert "error malformed_json: 7" in report.summary()


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="unknown record format 'csv'"):
    list(F.iter_text_records("x.jsonl", "csv"))
  with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
    list(F.iter_text_records("x.jsonl", "hh", on_error="ignore"))
  with pytest.raises(ValueError, match="cannot open record file .*missing.jsonl"):
    list(F.iter_text_records("/nonexistent/missing.jsonl", "hh"))
  with pytest.raises(ValueError, match="max_prompt_length=8 must be smaller than max_length=8"):
    F.Truncation(max_length=8, max_prompt_length=8)
  with pytest.raises(ValueError, match="max_length must be a positive int"):
    F.Truncation(max_length=0)


def test_corrupt_gzip_raises_with_path(tmp_path):
  path = tmp_path / "broken.jsonl.gz"
  path.write_bytes(b"this is not gzip")
  with pytest.raises(ValueError, match="broken.jsonl.gz"):
    list(F.iter_text_records(path, "hh"))


# ------------------------------------------------------------------ truncation

def test_truncation_keeps_prompt_end_and_completion_start(tmp_path):
  prompt = "\n\nHuman: first turn\n\nAssistant: ok\n\nHuman: LAST\n\nAssistant:"
  path = write_jsonl(tmp_path / "t.jsonl", [
      {"prompt": prompt, "chosen": " abcdefghij", "rejected": " xyz"}])
  report = F.DataReport()
  [ex] = F.load_examples(path, "pairwise", TOK, report=report,
                         truncation=F.Truncation(max_length=30, max_prompt_length=24))
  # Oracle: BOS + the last 23 bytes of the prompt; completions cut to 30 - 24 = 6 tokens.
  np.testing.assert_array_equal(ex.prompt, np.concatenate([[BOS], enc(prompt[-23:])]))
  assert TOK.decode(ex.prompt).endswith("Human: LAST\n\nAssistant:")
  np.testing.assert_array_equal(ex.chosen, enc(" abcde"))  # Cut: no EOS.
  np.testing.assert_array_equal(ex.rejected, enc(" xyz", eos=True))  # Fits: keeps EOS.
  assert dict(report.truncation) == {F.PROMPT_TRUNCATED: 1, F.COMPLETION_TRUNCATED: 1}


def test_no_truncation_when_it_fits(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "abc", "completion": "de"}])
  report = F.DataReport()
  [ex] = F.load_examples(path, "sft", TOK, report=report,
                         truncation=F.Truncation(max_length=7, max_prompt_length=4))
  assert len(ex.prompt) + len(ex.completion) == 7 and not report.truncation


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_vanished_completions_are_counted_not_raised(tmp_path, on_error):
  path = write_jsonl(tmp_path / "t.jsonl", [
      {"prompt": "p" * 20, "chosen": "c", "rejected": "r"},   # No room: dropped.
      {"prompt": "p", "chosen": "same-start-1", "rejected": "same-start-2"},  # Equal cuts.
      {"prompt": "p", "chosen": "c", "rejected": "r"},        # Kept.
  ])
  report = F.DataReport()
  got = F.load_examples(path, "pairwise", TOK, on_error=on_error, report=report,
                        truncation=F.Truncation(max_length=8))
  assert len(got) == 1 and report.examples == 1 and report.records == 3
  assert report.truncation[F.COMPLETION_TRUNCATED_AWAY] == 1
  assert report.truncation[F.IDENTICAL_AFTER_TRUNCATION] == 1
  assert report.truncation_samples[F.COMPLETION_TRUNCATED_AWAY] == [f"{path}:1"]
  assert report.num_dropped == 2 and report.num_errors == 0


def test_truncate_function_against_slices():
  rng = np.random.default_rng(0)
  for _ in range(50):
    p = np.concatenate([[BOS], rng.integers(4, 200, rng.integers(0, 30))]).astype(np.int32)
    cs = [rng.integers(4, 200, rng.integers(1, 30)).astype(np.int32) for _ in range(3)]
    max_len, max_p = int(rng.integers(10, 50)), int(rng.integers(2, 10))
    max_p = min(max_p, max_len - 1)
    tp, tcs, outcomes = F.truncate(p, cs, F.Truncation(max_len, max_p), bos_id=BOS)
    # Independent restatement of the policy with plain slicing.
    want_p = p if len(p) <= max_p else np.concatenate([[BOS], p[-(max_p - 1):]])
    np.testing.assert_array_equal(tp, want_p)
    for c, tc in zip(cs, tcs):
      np.testing.assert_array_equal(tc, c[:max(max_len - len(want_p), 0)])
      assert len(tp) + len(tc) <= max_len
    assert (F.PROMPT_TRUNCATED in outcomes) == (len(p) > max_p)
    assert (F.COMPLETION_TRUNCATED_AWAY in outcomes) == any(len(t) == 0 for t in tcs)


# ------------------------------------------------------------------ CLI

def _cli_file(tmp_path):
  return write_jsonl(tmp_path / "cli.jsonl", [
      {"prompt": "ab", "chosen": "c", "rejected": "rr"},
      b"{not json",
      {"prompt": "abcdef", "chosen": "cc", "rejected": "r"},
      {"prompt": "a", "chosen": "ccccc", "rejected": "r"},
  ])


def test_cli_counts_errors_and_length_stats(tmp_path, capsys):
  from jaxalign.data import __main__ as cli
  path = _cli_file(tmp_path)
  args = cli._parser().parse_args([str(path), "--format", "pairwise", "--tokenizer", "bytes",
                                   "--on-error", "skip", "--max-length", "7",
                                   "--max-prompt-length", "5"])
  summary = cli.run(args)
  rep = summary["report"]
  assert (rep["lines"], rep["records"], rep["examples"]) == (4, 3, 3)
  assert rep["errors"] == {F.MALFORMED_JSON: 1}
  # Byte tokenizer: prompt = 1 (BOS) + bytes; completion = bytes + 1 (EOS).
  raw_prompt = [3, 7, 2]  # Sorted: 2, 3, 7.
  s = summary["lengths_before_truncation"]["prompt"]
  assert s["mean"] == pytest.approx(sum(raw_prompt) / 3, abs=1e-12)
  assert s["p50"] == 3 and s["max"] == 7
  assert s["p95"] == pytest.approx(3 + 0.9 * (7 - 3), abs=1e-12)  # Linear interpolation.
  # After truncation: line 3's 7-token prompt keeps BOS + its last 4 bytes (5), so its
  # 3-token chosen is cut to 7 - 5 = 2; line 4's 6-token chosen is cut to 7 - 2 = 5.
  after = summary["lengths"]
  assert after["prompt"]["max"] == 5 and after["total"]["max"] == 7
  assert rep["truncation"] == {F.PROMPT_TRUNCATED: 1, F.COMPLETION_TRUNCATED: 2}
  text = cli.format_text(summary)
  assert "malformed_json: 1" in text and f"{path}:2:" in text


def test_cli_layouts_and_trained_tokenizer(tmp_path, capsys):
  from jaxalign.data import __main__ as cli
  path = _cli_file(tmp_path)
  assert cli.main([str(path), "--format", "pairwise", "--on-error", "skip",
                   "--vocab-size", "300", "--examples-per-batch", "2", "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["tokenizer"].startswith("trained on the input")
  layouts = summary["layouts"]
  assert set(layouts) == {"padded", "packed", "prefix_shared"}
  for stats in layouts.values():
    assert 0 <= stats["pad_fraction"] < 1
    assert stats["tokens_per_example"] >= stats["real_tokens_per_example"] > 0
  # Prefix sharing stores each prompt once instead of twice.
  assert layouts["prefix_shared"]["real_tokens_per_example"] < \
      layouts["padded"]["real_tokens_per_example"]


def test_cli_raise_mode_exits_with_location(tmp_path, capsys):
  from jaxalign.data import __main__ as cli
  path = _cli_file(tmp_path)
  assert cli.main([str(path), "--format", "pairwise", "--tokenizer", "bytes"]) == 1
  err = capsys.readouterr().err
  assert f"{path}:2: record is not valid JSON" in err and "--on-error skip" in err
