"""The T5-convention tokenizer, checked against transformers' T5 tokenizer and the tokenizers library."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from llmjax.data.bundled.corpus import generate_corpus
from llmjax.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

VOCAB_SIZE, NUM_EXTRA_IDS = 600, 100
VARIED_TEXTS = [
    "Hello <extra_id_0> world. 12345 café ☃ </s>x",
    "  leading  spaces\tand\nnewlines  ",
    "",
    "<extra_id_99><extra_id_5>end",
    'Numbers: 3.14, 2024-05-01, $99! (really?) "quoted" — dash…',
    "ﬁnance Ｆｕｌｌ width ½",
    "emoji 🙂🙂 zh 中文",
    "<pad><unk> x</s>",
    "<extra_id_100> is not a sentinel, <extra_id_7> is",
    "non\u00a0breaking and zero\u200bwidth",
    "The duck thanked the wise owl, and from that day on they were good friends.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(generate_corpus(400, seed=0), out_dir, vocab_size=VOCAB_SIZE,
                                num_extra_ids=NUM_EXTRA_IDS)
    return tokenizer, out_dir


@pytest.fixture(scope="module")
def hf_tokenizers(trained):
    transformers = pytest.importorskip("transformers")
    _, out_dir = trained
    return {"auto": transformers.AutoTokenizer.from_pretrained(out_dir),
            "t5_fast": transformers.T5TokenizerFast.from_pretrained(out_dir)}


def test_t5_vocabulary_layout(trained):
    tokenizer, _ = trained
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.sentinel_id(0) == VOCAB_SIZE - 1
    assert tokenizer.sentinel_id(99) == VOCAB_SIZE - 100
    assert tokenizer.id_to_token(VOCAB_SIZE - 1) == "<extra_id_0>"
    assert tokenizer.encode("<extra_id_0><extra_id_42>", add_eos=False) == [VOCAB_SIZE - 1, VOCAB_SIZE - 43]
    with pytest.raises(TokenizerError, match="sentinel index 100 out of range: this tokenizer has 100"):
        tokenizer.sentinel_id(100)


def test_sentinel_ids_match_transformers(trained, hf_tokenizers):
    tokenizer, _ = trained
    for hf in hf_tokenizers.values():
        assert len(hf) == VOCAB_SIZE
        assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
        assert hf.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)]) == [
            tokenizer.sentinel_id(i) for i in range(100)]


def test_encode_appends_eos_and_round_trips(trained):
    tokenizer, _ = trained
    for text in generate_corpus(30, seed=9):
        ids = tokenizer.encode(text)
        assert ids[-1] == 1 and 1 not in ids[:-1] and 2 not in ids  # the corpus has no unknown characters
        assert tokenizer.encode(text, add_eos=False) == ids[:-1]
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("") == [1]
    assert tokenizer.decode(tokenizer.encode("a <extra_id_3> b"), skip_special_tokens=False) == "a<extra_id_3> b</s>"


@pytest.mark.parametrize("name", ["auto", "t5_fast"])
def test_same_ids_and_text_as_transformers(trained, hf_tokenizers, name):
    tokenizer, _ = trained
    hf = hf_tokenizers[name]
    for text in VARIED_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf(text).input_ids, text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    assert 2 in tokenizer.encode("emoji 🙂🙂 zh 中文")  # unknown characters were exercised


def test_tokenizer_json_alone_gives_same_ids(trained):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer, out_dir = trained
    raw = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for text in VARIED_TEXTS:
        ids = tokenizer.encode(text)
        assert raw.encode(text).ids == ids, text
        assert raw.decode(ids) == tokenizer.decode(ids), text


def test_spiece_model_alone_gives_same_ids(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer, out_dir = trained
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(out_dir / name, tmp_path / name)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)  # converted from spiece.model
    assert [hf(text).input_ids for text in VARIED_TEXTS] == [tokenizer.encode(text) for text in VARIED_TEXTS]


def test_encode_batch_matches_transformers_padding_and_truncation(trained, hf_tokenizers):
    tokenizer, _ = trained
    hf = hf_tokenizers["t5_fast"]
    texts = generate_corpus(5, seed=2) + ["", "Short one."]
    ids, mask = tokenizer.encode_batch(texts, max_length=24)
    assert ids.shape == mask.shape == (7, 24) and ids.dtype == mask.dtype == np.int32
    expected = hf(texts, max_length=24, padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert (ids[:5, -1] == 1).all()  # truncated rows keep eos last
    assert ids[5, 0] == 1 and mask[5].sum() == 1  # the empty text is just eos

    longest, longest_mask = tokenizer.encode_batch(texts[5:], padding="longest")
    lengths = [len(tokenizer.encode(t)) for t in texts[5:]]
    assert longest.shape == (2, max(lengths))
    np.testing.assert_array_equal(longest_mask.sum(1), lengths)
    np.testing.assert_array_equal(longest * (1 - longest_mask), 0)  # padding is pad id 0

    capped, _ = tokenizer.encode_batch(texts, max_length=10, padding="longest")
    assert capped.shape == (7, 10)
    no_eos, no_eos_mask = tokenizer.encode_batch(texts[:1], max_length=8, add_eos=False)
    assert no_eos[0].tolist() == tokenizer.encode(texts[0], add_eos=False)[:8] and no_eos_mask.all()


def test_encode_batch_errors(trained):
    tokenizer, _ = trained
    texts = ["Short.", "This sentence is certainly much longer than eight tokens in total."]
    length = len(tokenizer.encode(texts[1]))
    with pytest.raises(TokenizerError, match=f"text 1 has {length} tokens, more than max_length=8; "
                                             "raise max_length or pass truncation=True"):
        tokenizer.encode_batch(texts, max_length=8, truncation=False)
    with pytest.raises(TokenizerError, match='padding="max_length" needs max_length'):
        tokenizer.encode_batch(texts)
    with pytest.raises(TokenizerError, match="padding must be one of"):
        tokenizer.encode_batch(texts, max_length=8, padding="left")
    with pytest.raises(TokenizerError, match="takes a list of texts"):
        tokenizer.encode_batch("one text", max_length=8)
    with pytest.raises(TokenizerError, match=r"outside this tokenizer's vocabulary \[0, 600\)"):
        tokenizer.decode([5, 600])


def test_decode_batch(trained):
    tokenizer, _ = trained
    texts = ["The cat sat.", "Hello <extra_id_1> there"]
    ids, _ = tokenizer.encode_batch(texts, padding="longest")
    assert tokenizer.decode_batch(ids) == ["The cat sat.", "Hello there"]


def test_load_from_directory_or_file(trained, tmp_path):
    tokenizer, out_dir = trained
    from_dir = Tokenizer.load(out_dir)
    from_file = Tokenizer.load(out_dir / "spiece.model")
    assert from_dir.vocab_size == from_file.vocab_size == VOCAB_SIZE
    assert from_dir.encode(VARIED_TEXTS[0]) == tokenizer.encode(VARIED_TEXTS[0])
    # Without a tokenizer_config.json, T5's 100 sentinels; the config's extra_ids wins otherwise.
    shutil.copy(out_dir / "spiece.model", tmp_path / "spiece.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 10}))
    assert Tokenizer.load(tmp_path).vocab_size == VOCAB_SIZE - 90
    assert Tokenizer.load(tmp_path, num_extra_ids=0).vocab_size == VOCAB_SIZE - 100


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match=f"directory {tmp_path} has no spiece.model; pass a SentencePiece"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="missing.model: no such file"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_non_t5_sentencepiece_model_is_refused(tmp_path):
    # SentencePiece's own defaults: unk=0, bos=1, eos=2.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generate_corpus(50)), model_prefix=str(tmp_path / "m"),
                                   vocab_size=100, minloglevel=2, num_threads=1)
    with pytest.raises(TokenizerError, match="T5 conventions need .* and no bos"):
        Tokenizer.load(tmp_path / "m.model")


def test_training_is_deterministic_and_validated(tmp_path):
    texts = generate_corpus(100, seed=1)
    first = train_tokenizer(texts, tmp_path / "a", vocab_size=300, num_extra_ids=20)
    second = train_tokenizer(texts, tmp_path / "b", vocab_size=300, num_extra_ids=20)
    assert first.model_proto == second.model_proto
    assert (tmp_path / "a" / "spiece.model").read_bytes() == first.model_proto
    assert first.vocab_size == 300 and first.sentinel_id(19) == 280
    with pytest.raises(TokenizerError, match="cannot train 99900 pieces from this text"):
        train_tokenizer(texts, tmp_path / "c", vocab_size=100_000)
    with pytest.raises(TokenizerError, match="leaves 2 pieces after 100 sentinels"):
        train_tokenizer(texts, tmp_path / "c", vocab_size=102)
    with pytest.raises(TokenizerError, match="model_type must be 'unigram'"):
        train_tokenizer(texts, tmp_path / "c", vocab_size=300, model_type="bpe")
