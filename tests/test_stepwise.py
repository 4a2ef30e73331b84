"""The step-wise tiny decoder's teaching (tiny_data/stepwise.py): its documents say what they should (a
letter hop names the right letter, a solution's look-ups are copies of the picture in words, a copy
document repeats itself), its loss weights fall where they should, the teaching is deterministic, and
train.tiny_decoder picks the decoder (a bad value is a one-line error)."""
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import config as C
from model.errors import ConfigError
from model.llama import Transformer
from model.tokenizer import WordTokenizer
from tiny_data import pretrain as P
from tiny_data import stepwise as S

ROOT = Path(__file__).resolve().parents[1]
TINY = C.get_config("tiny-direct")             # the one-hop decoder; "tiny" is the step-wise one


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(ROOT / TINY.train.tokenizer)


def options(doc: str) -> dict[str, str]:
    line = re.search(r"^Options: (.*)$", doc, re.M).group(1)
    return {letter: text.strip() for letter, text in re.findall(r"\(([A-E])\) ([^(]*)", line)}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_a_letter_hop_names_the_letter_of_its_option(seed):
    doc = S.letter_hops_document(S.world.Rng(seed))
    said = re.findall(r"So (.+?)\. The answer is ([A-E])\.", doc.split("Response:")[1])
    assert said and all(options(doc)[letter] == text for text, letter in said)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_a_step_wise_solution_copies_its_look_ups_from_the_picture_in_words(seed):
    """Every number a picture question's solution looks up ("the red shape is in column 3", "The number of
    circles is 2") is in its context, about an object the solution's words name; and its letter is right."""
    doc = S.stepwise_document(S.world.Rng(seed), letter_share=0.0, direct_share=0.0)
    context, response = doc.split("\nContext: ")[1].split("\nOptions: ")[0], doc.split("Response:")[1]
    letter = re.search(r"The answer is ([A-E])\.$", response).group(1)
    assert f"So {options(doc)[letter]}." in response
    for subject, axis, n in re.findall(r"(?:^|\. |, )([A-Z]?[\w ]+?),? (?:is )?in (column|row) (\d)", response):
        words = set(subject.lower().split()) - {"the", "shape", "town", "owns"} - {n.lower() for n in S.world.NAMES}
        facts = re.findall(rf"The ([\w ]+?) (?:town )?is in column (\d), row (\d)\.", context)
        assert any(words <= set(name.split()) and (c if axis == "column" else r) == n for name, c, r in facts), \
            (subject, axis, n, context)
    for sentence in re.findall(r"The number of [\w ]+ is \d\.", response):
        assert sentence in context


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_the_relations_stage_draws_relations_whose_comparison_follows_the_question_restated(seed):
    doc = S.stepwise_document(S.world.Rng(seed), letter_share=0.0, direct_share=0.0, only=S.RELATIONAL)
    question = re.search(r"^Question: (.*)$", doc, re.M).group(1)
    assert question.startswith(("Is ", "Whose shape is "))
    assert f"{question[:-1]}: is " in doc.split("Response:")[1]


def test_an_unknown_stage_is_an_error_before_any_teaching(tok):
    llama = Transformer(TINY.llama)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match=r"^unknown step-wise stage 'relatoins' \(known: letters, steps, relations"):
        S.teach_stepwise(llama, tok, stages=("steps", "relatoins"))
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_loss_weights_fall_on_the_response_and_the_letters(tok):
    doc = S.letter_hops_document(S.world.Rng(3))
    ids, weights = S.weighted(doc, tok, prompt_weight=0.2, answer_weight=5.0, response_weight=1.0)
    assert len(ids) == len(weights)
    letters = [tok.decode([i]).strip() for i, w in zip(ids, weights) if w == 5.0]
    assert letters == re.findall(r"The answer is ([A-E])\.", doc)
    n_prompt = len(tok.encode(doc[:doc.index("Response:") + len("Response:")], bos=True))
    assert set(weights[:n_prompt]) == {0.2} and 0.2 not in weights[n_prompt:]


def test_a_copy_document_repeats_and_weighs_only_the_predictable_repeat(tok):
    ids, weights = S.copy_document(random.Random(7), tok)
    n = (len(ids) - 1) // 2
    assert ids[0] == tok.bos_id and ids[1:n + 1] == ids[n + 1:]
    assert weights == [0.0] * (n + 2) + [1.0] * (n - 1)


def test_teaching_changes_the_decoder_and_is_deterministic(tok):
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Transformer(TINY.llama).state_dict().items()}
    states = [P.stepwise_llm(TINY.llama, tok, {f"llama.{k}": v for k, v in start.items()}, log=lambda *_: None,
                             recipe=S.smoke_recipe()) for _ in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][f"llama.{k}"], v) for k, v in start.items())


def test_tiny_decoder_picks_the_decoder(tok, tmp_path, monkeypatch):
    """Without a committed lm_stepwise.pt: stages 1-5, stage 6 and stage 7 are each pretrained once into the cache."""
    committed = tmp_path / "backbones"                    # the committed direct decoder and ViT only
    committed.mkdir()
    for name in ("lm.pt", "vit.pt"):
        (committed / name).symlink_to(P.BACKBONES / name)
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.tiny_decoder=stepwise"])
    monkeypatch.setattr(P, "stepwise_llm", lambda cfg, tok, direct, log: {k: v + 1 for k, v in direct.items()})
    monkeypatch.setattr(P, "read_llm", lambda cfg, tok, vit, stages, log: {k: v * 2 for k, v in stages.items()})
    monkeypatch.setattr(P, "text_llm", lambda cfg, tok, read, log: {k: v - 3 for k, v in read.items()})
    lines = []
    taught = P.pretrained_llm(cfg, tok, cache_dir=tmp_path / "cache", log=lines.append, committed=committed)
    direct = P.pretrained_llm(TINY, tok, cache_dir=tmp_path / "cache", log=lambda *_: None, committed=committed)
    assert all(torch.equal(taught[k], (direct[k] + 1) * 2 - 3) for k in direct)
    assert lines[0] == f"decoder: the committed {committed / 'lm.pt'}"
    assert lines[1].startswith("pretraining lm_text (once; cached in ")
    assert lines[2].startswith("pretraining lm_read (once; cached in ")
    assert lines[3].startswith("pretraining lm_stepwise (once; cached in ")
    again = []
    P.pretrained_llm(cfg, tok, cache_dir=tmp_path / "cache", log=again.append, committed=committed)
    assert not any("pretraining" in line for line in again)                # the second time: from the cache


def test_the_committed_step_wise_decoder_fits_and_needs_no_pretraining(tok, tmp_path, monkeypatch):
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.tiny_decoder=stepwise"])

    def no(*a, **k):
        raise AssertionError("pretrained although the committed step-wise decoder fits")
    monkeypatch.setattr(P, "stepwise_llm", no)
    monkeypatch.setattr(P, "read_llm", no)
    monkeypatch.setattr(P, "text_llm", no)
    lines = []
    state = P.pretrained_llm(cfg, tok, cache_dir=tmp_path, log=lines.append)
    assert lines[-1] == f"step-wise decoder: the committed {P.BACKBONES / 'lm_stepwise.pt'}"
    direct = P.pretrained_llm(TINY, tok, cache_dir=tmp_path, log=lambda *_: None)
    assert state.keys() == direct.keys() and any(not torch.equal(state[k], direct[k]) for k in direct)
    assert not list(tmp_path.iterdir())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_a_picture_document_weighs_the_numbers_to_read_from_the_picture(seed):
    """Prompt 0 (the picture is not in it), response 1, the letter 5, and fact_weight on each number the
    solution says that the question and hint do not: the ones only the picture (the memory) can give."""
    tok = WordTokenizer(ROOT / TINY.train.tokenizer)
    ids, weights, picture = S.picture_document(S.world.Rng(seed), tok, TINY.vit.image_size, fact_weight=7.0)
    doc = tok.decode(ids)
    assert picture.shape == (3, TINY.vit.image_size, TINY.vit.image_size) and picture.dtype == torch.uint8
    assert "Context: " not in doc or not re.search(r"is in (column|row) \d", doc.split("Response:")[0])
    n_prompt = len(tok.encode(doc[:doc.index("Response:") + len("Response:")], bos=True))
    assert set(weights[:n_prompt]) == {0.0}
    stated = set(re.findall(r"\d", doc.split("Response:")[0].split("\nOptions:")[0]))
    for i in range(n_prompt, len(ids)):
        word = tok.decode([ids[i]]).strip()
        if word.isdigit() and word not in stated:
            assert weights[i] == 7.0, (word, doc)
        else:
            assert weights[i] in (1.0, 5.0)
    assert [tok.decode([i]).strip() for i, w in zip(ids, weights) if w == 5.0] == \
        re.findall(r"The answer is ([A-E])\.", doc)


def test_reading_a_memory_changes_only_the_decoder_and_is_deterministic(tok):
    torch.manual_seed(0)
    start = {f"llama.{k}": v.clone() for k, v in Transformer(TINY.llama).state_dict().items()}
    vit = {f"visual.{k}": v for k, v in __import__("model.vit", fromlist=["x"]).VisionTransformer(
        TINY.vit).state_dict().items()}
    recipe = {**S.READ_RECIPE, **S.READ_SMOKE, "docs": 2, "own": 2, "lookups": 2, "copies": 2}
    states = [P.read_llm(TINY, tok, vit, start, log=lambda *_: None, recipe=recipe) for _ in range(2)]
    assert states[0].keys() == start.keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in start)
    assert any(not torch.equal(states[0][k], v) for k, v in start.items())


def test_stage_7_changes_the_decoder_is_deterministic_and_dwells_on_the_question_and_hint_types(tok):
    torch.manual_seed(0)
    start = {f"llama.{k}": v.clone() for k, v in Transformer(TINY.llama).state_dict().items()}
    recipe = {**S.TEXT_RECIPE, **S.TEXT_SMOKE}
    states = [P.text_llm(TINY.llama, tok, start, log=lambda *_: None, recipe=recipe) for _ in range(2)]
    assert states[0].keys() == start.keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in start)
    assert any(not torch.equal(states[0][k], v) for k, v in start.items())
    picture = {t.make for t in S.world.QTYPES if t.make in S.world.PICTURE_TYPES}
    assert set(S.FOCUS) == {t.make for t in S.world.QTYPES} - picture | {S.world.q_map_farthest}


def test_an_unknown_tiny_decoder_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^train.tiny_decoder must be direct or stepwise, got 'chatty'$"):
        C.apply_overrides(C.get_config("tiny"), ["train.tiny_decoder=chatty"])


def test_the_look_up_by_name_scores_the_digit_after_each_kind_of_name(tok):
    three = tok.encode(" 3", bos=False)[0]

    class SaysThree(torch.nn.Module):                  # predicts " 3" after every token
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens):
            return torch.nn.functional.one_hot(torch.full(tokens.shape, three), tok.vocab_size).float()
    scores = S.words_lookup_by_name(SaysThree(), tok, n=200)
    assert set(scores) == {"full name", "by colour", "by shape"}
    # the cells are 1-8: a constant " 3" is right about one time in eight, and never always or never
    assert all(3 < v < 30 for v in scores.values()), scores
