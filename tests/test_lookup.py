"""The one-hop look-up measurement (tiny_data/lookup.py): its items ask for the named object's own cell, its ideal
features label the right patches, and a short run trains what it says it trains."""
import pytest
import torch

import model.config as C
from model.assemble import make_tokenizer, model_from_config
from model.tokenizer import ByteTokenizer
from tiny_data import lookup, make_tiny_data as world


def test_ideal_labels_mark_the_patches_whose_centre_an_object_covers():
    kinds = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    red_square = dict(colour="red", shape="square", box=(8, 0, 23, 7))           # covers patch centres x 12, 20; y 4
    labels = lookup.ideal_labels([red_square], grid=8)
    assert labels.shape == (64,)
    expected = 1 + kinds.index(("red", "square"))
    assert labels[1] == labels[2] == expected
    assert int((labels != 0).sum()) == 2                                         # the background stays 0


@pytest.mark.parametrize("axis", ["x", "y"])
def test_each_item_asks_for_the_first_named_objects_cell(axis):
    cfg = C.get_config("tiny")
    tok = make_tokenizer(cfg)
    items = lookup.make_items(20, 3, cfg, tok, axis=axis)
    word = lookup.AXES[axis][0]
    for it in items:
        text = tok.decode(it["tokens"])
        assert text.endswith(word) and tok.decode([it["target"]]).strip() == str(it["cell"])
        assert 1 <= it["cell"] <= 8 and it["image"].dtype == torch.uint8
        name = text.split("Response: The ")[1].split(" is in")[0]                # the named object is in the picture
        assert 1 + [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES].index(name) in set(it["labels"].tolist())


def test_a_tokenizer_that_splits_the_digit_is_refused():
    cfg = C.get_config("tiny")
    with pytest.raises(ValueError, match="one token"):                           # bytes: " 3" is two tokens
        lookup.make_items(1, 0, cfg, ByteTokenizer())


@pytest.mark.parametrize("ideal", [False, True])
def test_a_short_run_scores_before_and_after(ideal, monkeypatch):
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.batch_size=4"])
    seen = {}
    real = lookup.use_ideal_features

    def spy(model, cfg):
        seen["ideal"] = real(model, cfg)
        seen["before"] = seen["ideal"].embed.weight.detach().clone()
        return seen["ideal"]
    monkeypatch.setattr(lookup, "use_ideal_features", spy)
    out = lookup.run(cfg, steps=2, ideal=ideal, n_train=8, n_test=6, log=lambda *a: None)
    assert [s for s, _ in out["scores"]] == [0, 2]
    for _, s in out["scores"]:
        assert set(s) == {"own", "own near", "shuffled", "shuffled near"}
        assert all(0 <= v <= 100 and (v * 6 / 100) == pytest.approx(round(v * 6 / 100)) for v in s.values())
    if ideal:
        w = seen["ideal"].embed.weight
        assert not torch.equal(w, seen["before"]) and not w[0].any()            # trained; the background stays 0


def test_the_words_lookup_asks_again_what_the_facts_say():
    cfg = C.get_config("tiny")
    tok = make_tokenizer(cfg)
    rng = __import__("random").Random(4)
    for _ in range(10):
        tokens, weights = lookup.words_lookup_document(rng, tok)
        assert len(tokens) == len(weights) and set(weights) == {0.1, 1.0}
        cut = weights.index(1.0)
        facts, asked = tok.decode(tokens[:cut]), tok.decode(tokens[cut:])
        for sentence in asked.strip().rstrip(".").split(". "):               # "The red circle is in column 2"
            name, rest = sentence.removeprefix("The ").split(" is in ")
            axis, digit = rest.split()
            fact = facts.split(f"The {name} is in ")[1].split(".")[0]          # "column 2, row 5"
            assert f"{axis} {digit}" in fact


def test_teaching_the_decoder_leaves_it_frozen_and_the_query_is_measured_per_block():
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.batch_size=4"])
    out = lookup.run(cfg, steps=1, ideal=False, n_train=8, n_test=6, teach_decoder=2, log=lambda *a: None)
    assert len(out["words"]) == 2 and all(0 <= w <= 100 for w in out["words"])
    assert [q["block"] for q in out["query"]] == list(range(cfg.llama.n_layers))
    assert all(q["mean"] > 0 and q["spread"] >= 0 and 0 <= q["name share"] <= 100 + 1e-6 for q in out["query"])
    for q in out["query"]:                                  # the name's part: the share of the spread, in norm
        assert q["name part"] == pytest.approx(q["spread"] * (q["name share"] / 100) ** 0.5, rel=1e-4)


def test_the_read_selection_compares_the_named_line_with_the_others_and_the_keys_parts():
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.pretrained=false"])
    tok = make_tokenizer(cfg)
    torch.manual_seed(0)
    model = model_from_config(cfg, torch.device("cpu"), log=lambda *a: None)
    items = lookup.make_items(6, 5, cfg, tok, axis="y")
    for it in items:
        assert it["axis"] == "y" and it["cell"] not in it["others"] and all(1 <= c <= 8 for c in it["others"])
    rows = lookup.read_selection(model, items, tok.pad_id)
    assert [r["block"] for r in rows] == list(range(cfg.llama.n_layers))
    assert all(r["z"] > 0 and r["z spread"] > 0 and r["p1"] > 0 for r in rows)
    with torch.no_grad():                              # no picture in the keys (Z = 0) and P1 = 0: alpha = SiLU(0)
        for proj in model.memory.projectors:
            proj.fc2.weight.zero_()
            proj.fc2.bias.zero_()
        model.memory.p1.zero_()
    for r in lookup.read_selection(model, items, tok.pad_id):
        assert r["z"] == r["z spread"] == r["p1"] == 0 and r["named"] == r["others"] == r["empty"] == 0
    one = items[:1]                                    # a key on the named row's 8 patch slots only
    with torch.no_grad():
        row = one[0]["cell"] - 1
        model.memory.p1[0, row * 8:(row + 1) * 8] = torch.randn(cfg.llama.dim)
    for r in lookup.read_selection(model, one, tok.pad_id):
        assert r["named"] != 0 and r["others"] == r["empty"] == 0


def test_a_runs_checkpoint_is_measured_with_its_own_adapters(tmp_path):
    from model.checkpoint import adapters_checkpoint, atomic_save, backbone_fingerprint
    from model.train import make_optimizer
    cfg = C.apply_overrides(C.get_config("tiny"), ["train.pretrained=false"])
    torch.manual_seed(0)
    model = model_from_config(cfg, torch.device("cpu"), log=lambda *a: None)
    with torch.no_grad():                              # adapters no fresh model has: no picture in Z, P1 = 0
        for proj in model.memory.projectors:
            proj.fc2.weight.zero_()
            proj.fc2.bias.zero_()
        model.memory.p1.zero_()
    atomic_save(adapters_checkpoint(cfg, model, 3, 1.0, make_optimizer(model, cfg), [], None,
                                    backbone_fingerprint(model)), tmp_path / "checkpoint.pt")
    out = lookup.run(None, 0, False, n_train=4, n_test=5, ckpt=str(tmp_path / "checkpoint.pt"), log=lambda *a: None)
    assert [s for s, _ in out["scores"]] == [0] and [s for s, _ in out["selection"]] == [0]
    assert all(r["z"] == r["p1"] == 0 and r["named"] == r["others"] == r["empty"] == 0 for r in out["selection"][0][1])
