"""Property tests for dpo_lit.data: validation, truncation, collation, chat, TRL parity."""
import copy
import json
import random
import time
import warnings

import pytest
import torch

import dpo_lit.data
from dpo_lit.data import (MAX_LINE_BYTES, ByteTokenizer, PreferenceCollator, check_record,
                          length_grouped_batches, load_preferences, tokenize_pair)
from conftest import need


GOOD = [{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "malformed JSON"),
    ('{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
    ('{"chosen": "b", "rejected": "c"}', "missing key 'prompt'"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', "field 'prompt' is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "field 'rejected' must be a string"),
    ('{"prompt": "a", "chosen": null, "rejected": "c"}', "field 'chosen' must be a string"),
    ('["a", "b", "c"]', "expected a dict"),
])
def test_jsonl_errors_name_file_line_and_problem(tmp_path, line, problem):
    good = [json.dumps(r) for r in GOOD]
    path = write_jsonl(tmp_path / "prefs.jsonl", good + ["", line] + good)
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert f"prefs.jsonl, line 4: {problem}" in str(e.value)
    assert "nothing loaded" in str(e.value)


def test_every_problem_reported_and_list_and_dataset_sources(tmp_path):
    bad = [GOOD[0], {"prompt": "a"}, {"prompt": "a", "chosen": " ", "rejected": "x"}]
    with pytest.raises(ValueError) as e:
        load_preferences(bad)
    assert "record 1: missing key 'chosen'" in str(e.value)
    assert "record 2: field 'chosen' is empty" in str(e.value)
    datasets = need("datasets")
    ds = datasets.Dataset.from_list(GOOD + [{"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(ValueError, match="dataset row 2: field 'chosen' is empty"):
        load_preferences(ds)
    assert load_preferences(datasets.Dataset.from_list(GOOD)) == GOOD
    with pytest.raises(ValueError, match="split"):
        load_preferences(datasets.DatasetDict(train=datasets.Dataset.from_list(GOOD)))
    with pytest.raises(ValueError, match="not a file"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="source must be"):
        load_preferences(42)


def test_bad_byte_names_file_line_and_offset(tmp_path):
    good = [json.dumps(r).encode() for r in GOOD]
    latin1 = b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'       # Latin-1, not UTF-8
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join(good + [b"", latin1] + good) + b"\n")
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    assert "prefs.jsonl, line 4: not UTF-8 (byte 0xe9 at offset 15 of the line)" in str(e.value)
    assert "nothing loaded" in str(e.value)


@pytest.mark.parametrize("seed", range(8))
def test_bad_byte_offset_is_where_it_was_put(tmp_path, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", " ", "é", "直", "😀"]) for _ in range(rng.randrange(0, 40)))
    head = b'{"prompt": "' + text.encode() + b" "
    bad = rng.choice([b"\xff", b"\x80", b"\xc3(", b"\xe2\x82"])      # each starts a bad sequence
    line = head + bad + b'", "chosen": "b", "rejected": "c"}'
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\r\n" + line + b"\r\n")
    with pytest.raises(ValueError, match=rf"p.jsonl, line 2: not UTF-8 \(byte 0x{bad[0]:02x} at "
                                         rf"offset {len(head)} of the line\)"):
        load_preferences(path)


def test_byte_order_mark_and_line_ends(tmp_path):
    lines = [json.dumps(r).encode() for r in GOOD]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\r\n\r\n" + lines[1])   # BOM, CRLF, no last end
    assert load_preferences(path) == GOOD


def test_over_long_line_refused_by_its_length_before_parsing(tmp_path, monkeypatch):
    big = json.dumps({"prompt": "x" * 10_000_000, "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD[0]).encode(), big, b'{"prompt": "a"}']) + b"\n")
    parsed = []
    loads = json.loads
    monkeypatch.setattr(dpo_lit.data.json, "loads",
                        lambda s, *a, **k: parsed.append(len(s)) or loads(s))
    start = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    seconds = time.perf_counter() - start
    msg = str(e.value)
    assert (f"prefs.jsonl, line 2: line is {len(big):,} bytes long, "
            f"over max_line_bytes={MAX_LINE_BYTES:,}") in msg
    assert "prefs.jsonl, line 3: missing key 'chosen'" in msg             # the rest still checked
    assert max(parsed) < 100                                              # long line never parsed
    assert seconds < 1.0, seconds                                            # about 0.02 s measured
    (tmp_path / "long.jsonl").write_bytes(big + b"\n")                     # loads when allowed
    assert len(load_preferences(tmp_path / "long.jsonl", max_line_bytes=None)[0]["prompt"]) == 10**7


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b""])
def test_line_length_limit_is_exact(tmp_path, end):
    line = json.dumps({"prompt": "p" * 40, "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "p.jsonl"
    path.write_bytes(line + end)
    assert len(load_preferences(path, max_line_bytes=len(line))) == 1
    with pytest.raises(ValueError, match=rf"line 1: line is {len(line)} bytes long, over "
                                         rf"max_line_bytes={len(line) - 1}"):
        load_preferences(path, max_line_bytes=len(line) - 1)
    assert len(load_preferences(path, max_line_bytes=None)) == 1
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError, match="max_line_bytes"):
            load_preferences(path, max_line_bytes=bad)


def test_identical_pairs_dropped_with_one_counting_warning(tmp_path):
    same = [{"prompt": f"p{i}", "chosen": "x", "rejected": "x"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD + same])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_preferences(path) == GOOD
    assert [str(w.message) for w in caught] == [
        "load_preferences dropped 3 record(s) whose chosen and rejected are identical"]
    with pytest.raises(ValueError, match="no usable"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_preferences(same)


def test_byte_tokenizer_roundtrip_and_ids():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(50):
        s = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x2FFF), 0x1F600]))
                    for _ in range(rng.randrange(0, 30)))
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == s
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == \
        (256, 257, None, 258)
    assert tok.decode([104, 105, 257, 256]) == "hi<eos><pad>"
    assert tok.decode(torch.tensor([104, 105, 257]), skip_special_tokens=True) == "hi"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])


def random_text(rng, lo, hi):
    return "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(lo, hi)))


@pytest.mark.parametrize("seed", range(10))
def test_collator_truncation_properties(seed):
    rng = random.Random(seed)
    tok = ByteTokenizer()
    max_length = rng.randrange(4, 40)
    mpl = rng.choice([None, rng.randrange(1, max_length)])
    recs = [{"prompt": random_text(rng, 1, 50), "chosen": random_text(rng, 1, 30),
             "rejected": random_text(rng, 1, 30)} for _ in range(rng.randrange(3, 9))]
    recs.append({"prompt": "q", "chosen": "a", "rejected": "b"})        # always fits
    coll = PreferenceCollator(tok, max_length=max_length, max_prompt_length=mpl)
    batch = coll(recs)
    kept = [r for r in recs if len(r["prompt"] if mpl is None else r["prompt"][-mpl:]) < max_length]
    assert coll.n_dropped == len(recs) - len(kept)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    B = len(kept)
    assert ids.shape[0] == 2 * B and ids.shape[1] <= max_length
    assert ids.dtype == am.dtype == torch.long and cm.dtype == torch.bool
    for i, r in enumerate(kept):
        p = r["prompt"] if mpl is None else r["prompt"][-mpl:]
        for row, key in ((i, "chosen"), (B + i, "rejected")):
            n = int(am[row].sum())
            assert am[row, :n].all() and not am[row, n:].any()             # right padding
            assert (ids[row, n:] == tok.pad_token_id).all()
            assert not cm[row, n:].any() and cm[row, len(p):n].all() and not cm[row, :len(p)].any()
            assert tok.decode(ids[row, :len(p)]) == p                      # prompt: kept end
            completion = ids[row, len(p):n].tolist()
            full = tok.encode(r[key]) + [tok.eos_token_id]
            assert 1 <= len(completion) and completion == full[:len(completion)]   # kept start
            assert len(completion) == min(len(full), max_length - len(p))
    again = coll([coll.tokenize(r) for r in kept])                       # pre-tokenised examples
    for k in batch:
        assert torch.equal(again[k], batch[k])


def test_collator_drops_and_errors():
    tok = ByteTokenizer()
    coll = PreferenceCollator(tok, max_length=8, pad_to_multiple_of=4)
    long = {"prompt": "x" * 8, "chosen": "a", "rejected": "b"}
    fits = {"prompt": "x" * 7, "chosen": "abc", "rejected": "b"}
    batch = coll([long, fits])
    assert coll.n_dropped == 1 and batch["input_ids"].shape == (2, 8)
    assert batch["completion_mask"].sum(1).tolist() == [1, 1]            # one token of room, no EOS
    with pytest.raises(ValueError, match="all 2 examples"):
        coll([long, long])
    assert coll.n_dropped == 3
    with pytest.raises(ValueError, match="empty"):
        coll([])
    with pytest.raises(ValueError, match="chosen has no tokens"):
        PreferenceCollator(tok, add_eos=False)(
            [{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}])
    with pytest.raises(ValueError, match="prompt_ids"):
        coll([{"prompt_ids": [1.5], "chosen_ids": [1], "rejected_ids": [2]}])
    with pytest.raises(ValueError, match="missing key"):
        coll([{"prompt": "a", "chosen": "b"}])
    for kw in ({"max_length": 1}, {"max_prompt_length": 0}, {"pad_to_multiple_of": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            PreferenceCollator(tok, **kw)
    no_eos = PreferenceCollator(tok, add_eos=False)([GOOD[1]])
    assert no_eos["completion_mask"].sum().item() == 2


def test_length_grouped_batches_properties():
    rng = random.Random(0)
    for trial in range(20):
        n, bs = rng.randrange(0, 300), rng.randrange(1, 20)
        lengths = [rng.randrange(1, 500) for _ in range(n)]
        for shuffle in (True, False):
            kw = dict(shuffle=shuffle, seed=trial, mega_batch_mult=3)
            batches = length_grouped_batches(lengths, bs, **kw)
            assert sorted(i for b in batches for i in b) == list(range(n))
            assert all(1 <= len(b) <= bs for b in batches)
            assert batches == length_grouped_batches(lengths, bs, **kw)
        if n:
            batches = length_grouped_batches(lengths, bs, shuffle=False)
            flat = [lengths[i] for b in batches for i in b]
            assert flat == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], 0)


EOS_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_tok():
    need("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Two plus two is four.",
              "Hello there, how are you?"] * 10
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = EOS_TEMPLATE
    return tok


CONV = {"prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "It is Lyon, I think."}]}


def test_chat_template_records(hf_tok, tmp_path):
    rec = check_record(CONV, hf_tok)
    assert rec["prompt"] == "<|system|>Be brief.<eos><|user|>Capital of France?<eos><|assistant|>"
    assert rec["chosen"] == "Paris.<eos>" and rec["rejected"] == "It is Lyon, I think.<eos>"
    implicit = {k: CONV["prompt"] + CONV[k] for k in ("chosen", "rejected")}
    assert check_record(implicit, hf_tok) == rec
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(CONV), json.dumps(implicit)])
    assert load_preferences(path, tokenizer=hf_tok) == [rec, rec]
    with pytest.raises(ValueError, match="chat.jsonl, line 1: .*tokenizer"):
        load_preferences(path)
    mixed = dict(CONV, chosen="Paris.")
    with pytest.raises(ValueError, match="mix strings"):
        check_record(mixed, hf_tok)
    with pytest.raises(ValueError, match="message 0"):
        check_record(dict(CONV, rejected=[{"role": "assistant", "content": None}]), hf_tok)
    coll = PreferenceCollator(hf_tok, max_length=64)
    batch = coll([CONV])                                               # the collator renders too
    ids, cm = batch["input_ids"], batch["completion_mask"]
    assert hf_tok.decode(ids[0][cm[0]]) == "Paris.<eos>"       # EOS from the template, not doubled
    assert hf_tok.decode(ids[1][cm[1]]) == "It is Lyon, I think.<eos>"
    assert batch["input_ids"][0][~cm[0] & batch["attention_mask"][0].bool()].tolist() == \
        hf_tok.encode(rec["prompt"], add_special_tokens=False)


def test_template_that_is_not_prefix_consistent_is_refused(hf_tok):
    import copy
    bad = copy.deepcopy(hf_tok)
    bad.chat_template = EOS_TEMPLATE.replace("<|assistant|>{% endif %}",
                                             "<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError,
                       match="record 0: the chat template does not render the prompt as a prefix"):
        load_preferences([CONV], tokenizer=bad)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_end_to_end_with_transformers(hf_tok, arch):
    import transformers
    from dpo_lit.logprobs import concatenated_forward, sequence_logps
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    V = len(hf_tok)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=128, n_embd=24, n_layer=2, n_head=2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128))
    model.eval()
    data = load_preferences([CONV, GOOD[0], {"prompt": "Hello there,", "chosen": " how are you?",
                                             "rejected": " go away, go away, please go away now."}],
                            tokenizer=hf_tok)
    coll = PreferenceCollator(hf_tok, max_length=40, max_prompt_length=16)
    batch = coll(data)
    out = concatenated_forward(model, batch)
    fused = concatenated_forward(model, batch, fused=True)
    for k in out:
        torch.testing.assert_close(fused[k], out[k], rtol=1e-5, atol=1e-5)
    for i, ex in enumerate(data):
        t = coll.tokenize(ex)
        for key in ("chosen", "rejected"):
            seq = torch.tensor([t["prompt_ids"] + t[f"{key}_ids"]])
            m = torch.zeros_like(seq, dtype=torch.bool)
            m[0, len(t["prompt_ids"]):] = True
            alone = sequence_logps(model(seq).logits, seq, m)
            torch.testing.assert_close(out[f"{key}_logps"][i], alone[0], rtol=1e-5, atol=1e-4)
            assert out[f"{key}_counts"][i].item() == len(t[f"{key}_ids"])


# ----- conversational records tokenised as TRL 1.16 does -----

def bpe_tokenizer(corpus, specials, template, use_regex=True):
    "An offline byte-level BPE tokenizer with a chat template (nothing downloaded)."
    need("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"] + specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = template
    return tok


# ChatML: a turn ends with <|im_end|> and a newline; the EOS token is another one
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The capital of France is Paris.", "Two plus two is four.", "Hello there, how are you?",
          "system user assistant", "Be brief."] * 10


def msg(role, content):
    return {"role": role, "content": content}


EXPLICIT = [
    {"prompt": [msg("user", "Capital of France?")],
     "chosen": [msg("assistant", "Paris.")], "rejected": [msg("assistant", "Lyon.")]},
    {"prompt": [msg("system", "Be brief."), msg("user", "Two plus two?")],   # rejected truncated
     "chosen": [msg("assistant", "Four.")],
     "rejected": [msg("assistant", "Hello there, how are you? The capital of France is Paris, "
                                   "and two plus two is five, or so I am told.")]},
    {"prompt": [msg("user", "Hello there!"), msg("assistant", "Hello."),
                msg("user", "How are you?")],
     "chosen": [msg("assistant", "Fine, thanks.")], "rejected": [msg("assistant", "Go away.")]},
    {"prompt": [msg("user", "Two plus two? " * 30)],                               # prompt fills it
     "chosen": [msg("assistant", "Four.")], "rejected": [msg("assistant", "Five.")]},
]
IMPLICIT = [{k: r["prompt"] + r[k] for k in ("chosen", "rejected")} for r in EXPLICIT]
PLAIN = [{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon, I think."},
         {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."}]
MAX_LENGTH = 48


def trl_batches(tok, sources, max_length=MAX_LENGTH):
    "TRL 1.16's own collated batch and number of kept examples, for each named list of records."
    need("trl")
    datasets = need("datasets")
    import transformers
    from trl import DPOConfig as TRLConfig, DPOTrainer as TRLTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=8, n_layer=1, n_head=1))
    names = list(sources)
    args = TRLConfig(output_dir="unused", bf16=False, fp16=False, report_to=[],
                     max_length=max_length, use_cpu=True, save_strategy="no")
    data = {k: datasets.Dataset.from_list(v) for k, v in sources.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TRLTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             processing_class=tok, train_dataset=data[names[0]], eval_dataset=data)
    out = {}
    for name in names:
        rows = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for r in trainer.eval_dataset[name]]
        out[name] = (trainer.data_collator(rows), len(rows))
    return out


def assert_same_batch(ours, theirs):
    "Token ids and masks are integers: compared exactly."
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["completion_mask"], theirs["completion_mask"].bool())


@pytest.fixture(scope="module")
def chatml_tok():
    return bpe_tokenizer(CORPUS, ["<|im_start|>", "<|im_end|>"], CHATML)


@pytest.fixture(scope="module")
def trl_chatml(chatml_tok, tmp_path_factory):
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trl"))                       # TRL's output_dir lands here
    try:
        return trl_batches(chatml_tok, {"explicit": EXPLICIT, "implicit": IMPLICIT, "plain": PLAIN})
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name, records", [("explicit", EXPLICIT), ("implicit", IMPLICIT),
                                           ("plain", PLAIN)])
def test_same_token_ids_and_completion_mask_as_trl(chatml_tok, trl_chatml, name, records):
    theirs, kept = trl_chatml[name]
    coll = PreferenceCollator(chatml_tok, max_length=MAX_LENGTH)
    ours = coll(records)
    assert_same_batch(ours, theirs)
    assert len(records) - coll.n_dropped == kept
    if name != "plain":                                            # the records exercise every path
        assert coll.n_dropped == 1 and ours["attention_mask"].sum(1).max() == MAX_LENGTH
        rendered = coll(load_preferences(records, tokenizer=chatml_tok))   # rendered first
        assert_same_batch(rendered, theirs)
        old = PreferenceCollator(chatml_tok, max_length=MAX_LENGTH, add_eos=True)(records)
        assert not torch.equal(old["input_ids"], theirs["input_ids"])      # 0.1.0's extra EOS


def test_conversational_completion_is_the_template_turn(chatml_tok):
    eos, end = chatml_tok.eos_token_id, chatml_tok.convert_tokens_to_ids("<|im_end|>")
    for rec in EXPLICIT[:3]:
        pair = tokenize_pair(rec, chatml_tok)
        implicit = {k: rec["prompt"] + rec[k] for k in ("chosen", "rejected")}
        assert tokenize_pair(implicit, chatml_tok) == pair
        for key in ("chosen", "rejected"):
            whole = chatml_tok.apply_chat_template(rec["prompt"] + rec[key], tokenize=True,
                                                   return_dict=True)
            assert pair["prompt_ids"] + pair[f"{key}_ids"] == list(whole["input_ids"])
            assert eos not in pair[f"{key}_ids"] and pair[f"{key}_ids"][-2] == end
            assert chatml_tok.decode(pair[f"{key}_ids"]) == rec[key][0]["content"] + "<|im_end|>\n"
        forced = tokenize_pair(rec, chatml_tok, add_eos=True)
        assert forced["chosen_ids"] == pair["chosen_ids"] + [eos]
        assert forced["prompt_ids"] == pair["prompt_ids"]
    plain = tokenize_pair(PLAIN[0], chatml_tok)
    assert plain["chosen_ids"][-1] == eos and plain["chosen_ids"].count(eos) == 1
    bare = tokenize_pair(PLAIN[0], chatml_tok, add_eos=False)
    assert bare["chosen_ids"] == plain["chosen_ids"][:-1]
    for bad in ("yes", None, 1):
        with pytest.raises(ValueError, match="add_eos"):
            PreferenceCollator(chatml_tok, add_eos=bad)


def test_rendered_records_keep_their_format_through_files_and_datasets(chatml_tok, tmp_path):
    datasets = need("datasets")
    rendered = load_preferences(EXPLICIT[:3], tokenizer=chatml_tok)
    assert all(r["conversational"] is True for r in rendered)
    path = write_jsonl(tmp_path / "rendered.jsonl", [json.dumps(r) for r in rendered])
    coll = PreferenceCollator(chatml_tok, max_length=MAX_LENGTH)
    expected = coll(EXPLICIT[:3])
    mixed = datasets.Dataset.from_list(rendered + [dict(PLAIN[0], conversational=None)])
    for source in (path, mixed):
        again = load_preferences(source)
        assert again[:3] == rendered
        batch = coll(again[:3])
        for k in expected:
            assert torch.equal(batch[k], expected[k])


def test_tokens_merging_across_the_prompt_boundary_as_trl(tmp_path, monkeypatch):
    # without the pre-tokenizer's split, BPE merges ": " across the end of the generation prompt
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    corpus = ["user: Capital of France?\nassistant: Paris.\n", "assistant: Lyon.\n"] * 20
    tok = bpe_tokenizer(corpus, [], template, use_regex=False)
    records = [{"prompt": [msg("user", "Capital of France?")],
                "chosen": [msg("assistant", "Paris.")], "rejected": [msg("assistant", "Lyon.")]}]
    with pytest.warns(UserWarning, match="prompt token"):
        ours = PreferenceCollator(tok, max_length=MAX_LENGTH)(records)
    monkeypatch.chdir(tmp_path)
    theirs, _ = trl_batches(tok, {"merge": records})["merge"]
    assert_same_batch(ours, theirs)
