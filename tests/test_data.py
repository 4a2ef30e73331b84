"""The toy datasets and their readers: determinism, layout, balance, prompts, batching,
image preprocessing, and one loud, one-line DataError per kind of bad input."""
import collections
import json
import random
import shutil
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from model.data import (CAPTION_PROMPT, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DataError, VLDataset,
                        check_images, collate, load_image, load_pixels, normalize, preprocess_image, read_coco,
                        read_scienceqa)
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_data.pretrain import answer_index
from model.tokenizer import ByteTokenizer, WordTokenizer, load_tokenizer
from tiny_data import draw_scene, text_corpus
from tiny_data import make_tiny_data as gen

ROOT = Path(__file__).resolve().parents[1]
SQA, COCO = ROOT / "tiny_data" / "scienceqa", ROOT / "tiny_data" / "coco"
COMMITTED_WITH_PILLOW = "13.0.0"       # PNG bytes depend on the deflate library Pillow ships with
TOK = ByteTokenizer()


def files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(path: Path) -> bytes:
    with Image.open(path) as img:
        return img.mode.encode() + bytes(img.size) + img.tobytes()


# ---------------------------------------------------------------------------------------------
# The generator

def test_generator_is_deterministic(tmp_path):
    for out in ("a", "b"):
        gen.make_scienceqa(tmp_path / out / "scienceqa", {"train": 30, "val": 10, "test": 20})
        gen.make_coco(tmp_path / out / "coco", {"train": 6, "restval": 2, "val": 2, "test": 3})
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 40
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert text_corpus(7, 50) == text_corpus(7, 50) != text_corpus(8, 50)
    img1, objs1 = draw_scene(random.Random(3))
    img2, objs2 = draw_scene(random.Random(3))
    assert objs1 == objs2 and img1.tobytes() == img2.tobytes()


def test_committed_files_equal_a_regeneration(tmp_path):
    gen.main(tmp_path)
    gen.make_scienceqa(tmp_path / "scienceqa_stepwise", shuffle=True, facts=True)      # the `tiny` preset's set
    assert (tmp_path / "words.txt").read_bytes() == (ROOT / "tiny_data" / "words.txt").read_bytes()
    for name in ("scienceqa", "scienceqa_stepwise", "coco"):
        new, old = files(tmp_path / name), files(ROOT / "tiny_data" / name)
        assert new.keys() == old.keys(), f"{name}: files differ; rerun python tiny_data/make_tiny_data.py"
        for k in new:
            if k.endswith(".json"):
                assert new[k].read_bytes() == old[k].read_bytes(), f"{name}/{k} differs from a regeneration"
            else:
                assert pixels(new[k]) == pixels(old[k]), f"{name}/{k}: pixels differ from a regeneration"
                if PIL.__version__ == COMMITTED_WITH_PILLOW:
                    assert new[k].read_bytes() == old[k].read_bytes(), f"{name}/{k}: bytes differ"


def test_scenes_are_visible_and_unambiguous():
    rng = random.Random(0)
    for _ in range(200):
        img, objects = draw_scene(rng)
        small = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=float)
        assert 2 <= len(objects) <= 4 and img.size == (64, 64) and img.mode == "RGB"
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)      # "the red circle" is unique
        for o in objects:
            colour = np.array(gen.COLOURS[o["colour"]], dtype=float)
            assert img.getpixel((o["x"], o["y"])) == gen.COLOURS[o["colour"]]
            assert 14 <= o["size"] <= 18
            # still there at the ViT's 32 px: nearer its own colour than the background's
            seen = small[o["y"] // 2, o["x"] // 2]
            assert np.abs(seen - colour).sum() < np.abs(seen - np.array(gen.BACKGROUND)).sum()
        for a in objects:              # boxes never touch
            for b in objects:
                if a is not b:
                    ha, hb = a["size"] / 2, b["size"] / 2
                    assert abs(a["x"] - b["x"]) >= ha + hb or abs(a["y"] - b["y"]) >= ha + hb


def test_the_picture_in_words_states_what_the_questions_ask():
    objects = [dict(colour="red", shape="circle", x=10, y=10), dict(colour="blue", shape="square", x=50, y=12),
               dict(colour="green", shape="triangle", x=30, y=50)]
    words = gen.scene_in_words(objects)
    # the objects in order along each direction: the first listed is the one nearest that edge (a question
    # asks only about clear orders); the counts; the one shape beside another
    assert "Left to right: red circle, green triangle, blue square." in words
    assert "Bottom to top: green triangle, blue square, red circle." in words
    assert "Counts: 1 red, 1 green, 1 blue, 0 yellow; 1 circles, 1 squares, 1 triangles." in words
    assert "The only shape to the right of the green triangle is the blue square." in words
    assert "The only shape below the red circle" not in words                  # the square is level with it
    town = [dict(colour="red", shape="square", x=10, y=10), dict(colour="blue", shape="square", x=40, y=14)]
    assert gen.scene_in_words(town, "map") == ("West to east: red town, blue town. East to west: blue town, red town. "
                                               "North to south: red town, blue town. South to north: blue town, red "
                                               "town. The red town is west of the blue town.")


def test_solutions_are_steps_that_lead_to_the_answer():
    """Each solution is facts, then a comparison of two explicit numbers asked in the question's direction and
    answered as they say (a relation's after the question restated, word for word), then the content answer
    that follows from it; the places are the 8x8 grid's columns and rows (1..8, from the left and from the top)."""
    import re
    rng = gen.Rng(7)
    for make in (gen.q_relation, gen.q_owner, gen.q_compare_count):
        for _ in range(60):
            q = make(rng)
            assert q.solution.endswith(f" So {q.answer}.")
            facts = re.findall(r"(?:in (?:column|row)|is) (\d)\.", q.solution)
            m = re.search(r"(?:^|\. )([^.:]+: is|Is) (\w+'s )?(\d) (less|more) than (\w+'s )?(\d)\? (yes|no)\.", q.solution)
            asked, (a, op, b, said) = m[1], (int(m[3]), m[4], int(m[6]), m[7])
            assert asked == ("Is" if make is gen.q_compare_count else f"{q.question[:-1]}: is")
            assert [a, b] == [int(f) for f in facts[:2]] and a != b
            assert (said == "yes") == ((a < b) if op == "less" else (a > b))
            if make is gen.q_owner:                               # yes: the owner asked about first wins
                first, second = m[2][:-3], m[5][:-3]                # "Ivy's " -> "Ivy"
                assert q.solution.startswith(f"{first} owns ") and {first, second} == set(q.choices)
                assert (said == "yes") == (q.answer == first)
                assert op == ("less" if "higher up" in q.question or "farther left" in q.question else "more")
            else:                                                  # the content answer copies the yes/no
                assert q.answer == said
                assert op == ("less" if "left of" in q.question or "above" in q.question else "more")
            if make is not gen.q_compare_count:                  # a place: the object's cell on the question's axis
                assert 1 <= a <= 8 and 1 <= b <= 8
    relation = next(q for q in iter(lambda: gen.q_relation(rng), None) if "left of" in q.question)
    a, b = re.findall(r"in column (\d)", relation.solution)
    assert (int(a) < int(b)) == (relation.answer == "yes")
    for obj in relation.scene:
        assert gen.cell(obj, "x") == obj["x"] * 8 // gen.IMAGE_SIZE + 1


def test_the_least_or_most_is_a_chain_of_named_comparisons():
    """An extreme position, the shape beside another (the one closest to that edge) and the map's farthest town:
    the objects, each one's place on the question's axis, then one named comparison at a time, the best so far
    first, its op the edge's (less toward the left or top), each answered as its numbers say; the last best is
    the answer. Shapes are listed in palette order, then shape order: never by place, which would give the
    answer away."""
    import re
    rng = gen.Rng(11)
    for make in (gen.q_extreme, gen.q_colour_beside, gen.q_map_farthest):
        for _ in range(80):
            q = make(rng)
            names = re.findall(r"The (\w+ \w+) is in (?:column|row) (\d)\.", q.solution)
            axis = "x" if "column" in q.solution else "y"
            by_name = {(f"{o['colour']} town" if make is gen.q_map_farthest else gen.name(o)): o for o in q.scene}
            assert sorted(by_name) == sorted(n for n, _ in names) and len(names) == len(q.scene)
            assert all(gen.cell(by_name[n], axis) == int(c) for n, c in names)
            if make is not gen.q_map_farthest:
                assert q.solution.startswith(f"The shapes are {gen.join_and([f'the {n}' for n, _ in names])}. ")
                assert [by_name[n] for n, _ in names] == sorted(q.scene, key=gen.canonical)
            steps = re.findall(r"the (\w+ \w+)'s (\d) (less|more) than the (\w+ \w+)'s (\d)\? (yes|no)\.", q.solution)
            assert len(steps) == len(names) - 1
            best = names[0][0]
            for (a, x, op, b, y, said), (nxt, _) in zip(steps, names[1:]):
                assert (a, b) == (best, nxt) and op == ("less" if re.search(r"left|top|above|west|north", q.question)
                                                        else "more")
                assert (said == "yes") == (int(x) < int(y) if op == "less" else int(x) > int(y))
                best = a if said == "yes" else b
            last = q.solution.rsplit(". ", 2)[-2] + "."            # the best named, then the content answer
            if make is gen.q_extreme:
                edge = re.search(r"closest to the (.+) of the picture", q.question)[1]
                assert last == f"The {best} is closest to the {edge}." and q.answer == by_name[best]["colour"]
            elif make is gen.q_colour_beside:
                side = re.search(r"(right|left|above|below)", q.question)[1]
                edge = {"above": "top", "below": "bottom"}.get(side, f"{side} side")
                assert last == f"The {best} is closest to the {edge}." and q.answer == by_name[best]["colour"]
            else:
                assert last == f"The {best} is {q.answer}."
            assert q.solution.endswith(f" So {q.answer}.")


def test_shuffled_choices_keep_the_answer_and_spread_the_letters(tmp_path):
    gen.make_scienceqa(tmp_path, sizes={"train": 300, "val": 4, "test": 4}, shuffle=True)
    problems = json.loads((tmp_path / "problems.json").read_text())
    committed = json.loads((SQA / "problems.json").read_text())
    fixed = collections.Counter(tuple(p["choices"]) for p in committed.values() if p["category"] == "Counting shapes")
    assert len(fixed) == 1                                       # the committed set lists them in one order
    counts = [tuple(p["choices"]) for p in problems.values() if p["category"] == "Counting shapes"]
    assert len(set(counts)) > 1                                  # shuffled: several orders
    letters = collections.Counter(p["answer"] for p in problems.values() if len(p["choices"]) == 2)
    assert min(letters.values()) > 0.35 * sum(letters.values())
    for p in problems.values():
        assert p["solution"].endswith(f" So {p['choices'][p['answer']]}.")


def test_facts_describe_the_picture_in_the_solutions_wording(tmp_path):
    """--facts: the same set, only each picture's description (the oracle's context) in scene_facts' wording,
    which states every number a shapes question's solution looks up."""
    sizes = {"train": 60, "val": 4, "test": 4}
    gen.make_scienceqa(tmp_path / "words", sizes=sizes, shuffle=True)
    gen.make_scienceqa(tmp_path / "facts", sizes=sizes, shuffle=True, facts=True)
    words, facts = (json.loads((tmp_path / d / "problems.json").read_text()) for d in ("words", "facts"))
    assert words.keys() == facts.keys()
    for pid, p in facts.items():
        assert {k: v for k, v in p.items() if k != "description"} == \
            {k: v for k, v in words[pid].items() if k != "description"}
        if p["category"] == "Comparing numbers of shapes":      # both counts, as the solution states them
            for fact in p["solution"].split(". ")[:2]:
                assert fact.rstrip(".") + "." in p["description"]
        if p["image"]:
            assert p["description"].startswith("The ") and " is in column " in p["description"]
            assert " is in column " not in words[pid]["description"]


def test_text_corpus_uses_the_fine_tuning_format():
    docs = text_corpus(11, 300)
    questions = [d for d in docs if d.startswith("Question: ")]
    assert 150 < len(questions) < 300 and len(set(docs)) > 250
    for d in questions:
        prompt, answer = d.split("\nResponse:")
        assert "\nContext: " in prompt and "\nOptions: (A) " in prompt
        letter = answer.removeprefix(" The answer is ").removesuffix(".")
        assert answer == f" The answer is {letter}." and f"({letter}) " in prompt
    # pictures in words: their context describes the scene as the oracle bound does
    assert any("Left to right: " in d and "Counts: " in d and d.startswith("Question: ") for d in docs)


# ---------------------------------------------------------------------------------------------
# The committed data

@pytest.fixture(scope="module")
def sqa():
    return {s: read_scienceqa(SQA, s) for s in ("train", "val", "test", "trainval", "minival", "minitest")}


def test_committed_scienceqa_reads_cleanly(sqa):
    splits = json.loads((SQA / "pid_splits.json").read_text())
    assert {s: len(e) for s, e in sqa.items()} == {s: len(splits[s]) for s in sqa}
    assert (len(sqa["train"]), len(sqa["val"]), len(sqa["test"])) == (2400, 400, 800)
    assert not {e.id for e in sqa["train"]} & {e.id for e in sqa["test"]}
    check_images(sqa["test"])                               # every test picture decodes
    share = sum(e.image is not None for e in sqa["train"]) / len(sqa["train"])
    assert 0.55 <= share <= 0.65


def test_committed_coco_reads_cleanly():
    train, val, test = (read_coco(COCO, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == ((450 + 150) * 5, 100, 150)   # restval joins train
    for e in val + test:
        assert e.prompt == CAPTION_PROMPT and len(e.info["references"]) == 5
        assert len(set(e.info["references"])) == 5 and e.target == " " + e.info["references"][0]
    assert {e.image for e in train}.isdisjoint({e.image for e in test})
    check_images(test)


def test_every_metric_column_has_40_test_items(sqa):
    columns = collections.Counter()
    for e in sqa["test"]:
        i = e.info
        columns[{"natural science": "NAT", "social science": "SOC", "language science": "LAN"}[i["subject"]]] += 1
        columns["TXT"] += i["has_hint"]
        columns["IMG"] += i["has_image"]
        columns["NO"] += not i["has_hint"] and not i["has_image"]
        columns["G1-6" if int(i["grade"][5:]) <= 6 else "G7-12"] += 1
    for col in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"):
        assert columns[col] >= 40, (col, columns)
    assert columns["TXT"] + columns["IMG"] + columns["NO"] > len(sqa["test"])       # IMG and TXT overlap


def test_answers_are_balanced(sqa):
    problems = json.loads((SQA / "problems.json").read_text())
    for split in ("train", "test"):
        letters = collections.defaultdict(collections.Counter)
        for e in sqa[split]:
            letters[len(e.info["choices"])][e.info["answer"]] += 1
        # choices keep a fixed order per question type, so letters are only as even as the answers dealt
        # within each choice set: each letter within 15% of 1/k
        for k, counts in letters.items():
            assert len(counts) == k and max(counts.values()) <= 1.15 * sum(counts.values()) / k + 1, (split, k, counts)
    # within a category with few distinct answers (yes/no, 0-3, colours, directions), all equally often
    by_category = collections.defaultdict(collections.Counter)
    for p in problems.values():
        by_category[p["category"]][p["choices"][p["answer"]]] += 1
    for cat, counts in by_category.items():
        if len(counts) <= 4:
            assert max(counts.values()) <= 1.1 * min(counts.values()), (cat, counts)
    # a blind guesser that knows which choice texts won most often in training is no better than chance
    won = collections.defaultdict(lambda: [1, 2])
    for e in sqa["train"]:
        for i, c in enumerate(e.info["choices"]):
            won[c][0] += i == e.info["answer"]
            won[c][1] += 1
    pictures = [e for e in sqa["test"] if e.image is not None]
    blind = np.mean([max(range(len(e.info["choices"])), key=lambda i: won[e.info["choices"][i]][0] /
                         won[e.info["choices"][i]][1]) == e.info["answer"] for e in pictures])
    chance = np.mean([1 / len(e.info["choices"]) for e in pictures])
    assert blind < chance + 0.05, (blind, chance)


def test_each_picture_type_has_one_full_set_of_choices():
    """A picture answer's letter is a fixed function of the answer: one choice list per type (names of
    owners and towns vary, their number does not), and every choice of it comes up as an answer."""
    problems = json.loads((SQA / "problems.json").read_text())
    by_category = collections.defaultdict(list)
    for p in problems.values():
        if p["image"]:
            by_category[p["category"]].append(p)
    assert len(by_category) == 9
    for cat, ps in by_category.items():
        lists = {tuple(p["choices"]) for p in ps}
        assert len({len(c) for c in lists}) == 1, cat
        if cat not in ("Spatial relations with owners", "Cardinal directions on a map"):
            assert len(lists) == 1, (cat, list(lists)[:3])
            assert {p["answer"] for p in ps} == set(range(len(ps[0]["choices"]))), cat


# ---------------------------------------------------------------------------------------------
# Prompts, tokens, batches

def test_prompt_and_target(sqa):
    problems = json.loads((SQA / "problems.json").read_text())
    for e in sqa["test"][:50]:
        p = problems[e.id]
        options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(p["choices"]))
        assert e.prompt == f"Question: {p['question']}\nContext: {p['hint'] or 'N/A'}\nOptions: {options}\nResponse:"
        assert e.target == f" The answer is {'ABCDE'[p['answer']]}."
        assert e.info["has_image"] == (p["image"] is not None) == (e.image is not None)
    with_captions = {e.id: e for e in read_scienceqa(SQA, "test", captions=True)}
    captions = json.loads((SQA / "captions.json").read_text())["captions"]
    e = next(e for e in sqa["test"] if e.image is not None and not e.info["has_hint"])
    assert f"Context: {captions[e.id]}\n" in with_captions[e.id].prompt


def test_dataset_items_and_left_truncation(sqa):
    ex = sqa["test"][:8]
    item = VLDataset(ex, TOK, 32)[0]
    prompt, target = TOK.encode(ex[0].prompt), TOK.encode(ex[0].target)
    assert item["tokens"] == [TOK.bos_id] + prompt + target + [TOK.eos_id]
    assert item["n_prompt"] == 1 + len(prompt)
    short = VLDataset(ex, TOK, 32, max_len=40)[0]
    assert len(short["tokens"]) == 40 and short["tokens"][0] == TOK.bos_id
    assert short["tokens"][short["n_prompt"]:] == target + [TOK.eos_id]          # the answer survives
    assert short["tokens"][1:short["n_prompt"]] == prompt[-(short["n_prompt"] - 1):]   # the prompt's end survives
    ds = VLDataset(ex, TOK, 32)
    for i, e in enumerate(ex):
        it = ds[i]
        assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.uint8   # the model normalises it
        assert it["has_image"] == float(e.image is not None)
        if e.image is None:
            assert not it["image"].any()
    assert ds.cache == {}                                         # no cache unless asked for


def test_image_cache_is_uint8_and_bounded(sqa):
    """Decoded pictures are kept as uint8 up to cache_mb, then no more are added; a cached picture gives the
    same tensor as a fresh decode, and normalised, the floats of load_image."""
    ex = [e for e in sqa["train"] if e.image is not None][:20]
    ds = VLDataset(ex, TOK, 256, cache_mb=1)                       # 3 x 256 x 256 bytes: five fit in 1 MB
    first = [ds[i]["image"] for i in range(len(ex))]
    assert len(ds.cache) == 5 and all(p.dtype == torch.uint8 and p.shape == (3, 256, 256) for p in ds.cache.values())
    again = [ds[i]["image"] for i in range(len(ex))]
    for i, e in enumerate(ex):
        assert torch.equal(first[i], again[i]) and torch.equal(first[i], load_pixels(e.image, 256))
        assert torch.equal(normalize(first[i]), load_image(e.image, 256))


@pytest.mark.parametrize("mode", ["clip", "squash"])
def test_preprocessing_in_two_steps_is_bit_exact(mode):
    """uint8 pixels then normalising gives the very floats of the one-step float32 formula (so a cached
    picture changes no number)."""
    img = Image.open(next(SQA.glob("images/train/*/image.png"))).convert("RGB").resize((40, 30))
    mean, std = (CLIP_MEAN, CLIP_STD) if mode == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    x = preprocess_image(img, 24, mode)
    if mode == "clip":
        img = img.resize((32, 24), Image.BICUBIC).crop((4, 0, 28, 24))
    else:
        img = img.resize((24, 24), Image.BICUBIC)
    one_step = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(x, (one_step - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))


def test_normalize_takes_uint8_batches_and_passes_floats():
    """A batch of uint8 pictures is normalised as each picture alone; floats are normalised already (returned
    as they are); other dtypes are refused."""
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mode in ("clip", "squash"):
        x = normalize(pixels, mode)
        assert x.dtype == torch.float32 and all(torch.equal(x[i], normalize(pixels[i], mode)) for i in range(4))
        assert normalize(x, mode) is x
    assert not torch.equal(normalize(pixels, "clip"), normalize(pixels, "squash"))
    with pytest.raises(TypeError, match="uint8"):
        normalize(pixels.long())


def test_large_sets_are_checked_when_read(tmp_path):
    """Past check_images' limit pictures are not decoded up front (minutes at COCO's size); a corrupt one is a
    one-line DataError naming it when it is read."""
    root, problems, _ = scienceqa_slice(tmp_path)
    pid = next(p for p in problems if problems[p]["image"])
    path = root / "images" / "test" / pid / "image.png"
    path.write_bytes(b"this is not a png" * 10)
    examples = read_scienceqa(root, "test")
    assert check_images(examples, decode_up_to=0) is False             # no decoding: no error yet
    raises(lambda: check_images(examples), path, "not a readable image")
    raises(lambda: VLDataset(examples, TOK, 32)[[e.id for e in examples].index(pid)], path, "not a readable image")


def test_collate_supervises_only_the_answer(sqa):
    ex = sqa["test"][:6]
    ds = VLDataset(ex, TOK, 32)
    items = [ds[i] for i in range(len(ex))]
    b = collate(items, TOK.pad_id)
    longest = max(len(it["tokens"]) for it in items)
    assert b["tokens"].shape == b["targets"].shape == (6, longest - 1)
    assert b["images"].shape == (6, 3, 32, 32) and b["images"].dtype == torch.uint8
    assert b["has_image"].tolist() == [it["has_image"] for it in items]
    for row, (it, e) in enumerate(zip(items, ex)):
        seq, n = it["tokens"], it["n_prompt"]
        tgt = b["targets"][row]
        kept = tgt[tgt != -100].tolist()
        assert kept == TOK.encode(e.target) + [TOK.eos_id]                      # answer + EOS, nothing else
        assert (tgt[:n - 1] == -100).all() and (tgt[len(seq) - 1:] == -100).all()
        assert tgt[n - 1].item() == seq[n]                                      # position t predicts t+1
        assert b["tokens"][row].tolist() == (seq + [TOK.pad_id] * longest)[:longest - 1]   # right-padded
    assert (b["targets"][:, -1] != -100).any()                                  # trimmed: last column is used


# ---------------------------------------------------------------------------------------------
# Images

def test_load_image_both_preprocessings(tmp_path):
    # 60x30: a 30x30 red centre between two blue bands
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (15, 0, 45, 30))
    img.save(tmp_path / "x.png")
    clip = load_image(tmp_path / "x.png", 30, "clip")              # short side already 30: crop only
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert clip.shape == (3, 30, 30) and clip.dtype == torch.float32
    torch.testing.assert_close(clip, red.view(3, 1, 1).expand(3, 30, 30))
    squash = load_image(tmp_path / "x.png", 30, "squash")          # the whole image, blue bands included
    blue = (torch.tensor([0, 0, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert squash.shape == (3, 30, 30)
    torch.testing.assert_close(squash[:, :, 0], blue.view(3, 1).expand(3, 30), atol=0.05, rtol=0)
    torch.testing.assert_close(squash[:, :, 15], ((torch.tensor([1.0, 0, 0]) - torch.tensor(IMAGENET_MEAN)) /
                                                  torch.tensor(IMAGENET_STD)).view(3, 1).expand(3, 30))
    # a committed picture at the tiny ViT's size
    path = next(SQA.glob("images/test/*/image.png"))
    for mode in ("clip", "squash"):
        x = load_image(path, 32, mode)
        assert x.shape == (3, 32, 32) and x.isfinite().all()
        assert torch.equal(normalize(load_pixels(path, 32, mode), mode), x)       # the same floats in two steps
    with pytest.raises(ValueError, match="preprocess"):
        load_image(path, 32, "crop")


# ---------------------------------------------------------------------------------------------
# Bad inputs: each one a DataError, one line, naming the file and the problem

def scienceqa_slice(tmp_path: Path, n: int = 6) -> tuple[Path, dict, dict]:
    """A tmp copy of the first n test problems (images included)."""
    problems = json.loads((SQA / "problems.json").read_text())
    pids = json.loads((SQA / "pid_splits.json").read_text())["test"][:n]
    root = tmp_path / "sqa"
    for pid in pids:
        if problems[pid]["image"]:
            shutil.copytree(SQA / "images" / "test" / pid, root / "images" / "test" / pid)
    root.mkdir(exist_ok=True)
    small = {pid: problems[pid] for pid in pids}
    splits = {"test": pids}
    write(root, small, splits)
    return root, small, splits


def write(root: Path, problems: dict, splits: dict):
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))


def raises(fn, *needles) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


def test_slice_reads(tmp_path):
    root, problems, _ = scienceqa_slice(tmp_path)
    assert [e.id for e in read_scienceqa(root, "test")] == list(problems)


def test_missing_image_file(tmp_path):
    root, problems, _ = scienceqa_slice(tmp_path)
    pid = next(p for p in problems if problems[p]["image"])
    (root / "images" / "test" / pid / "image.png").unlink()
    raises(lambda: read_scienceqa(root, "test"), f"images/test/{pid}/image.png", "not found")


def test_corrupt_image(tmp_path):
    root, problems, _ = scienceqa_slice(tmp_path)
    pid = next(p for p in problems if problems[p]["image"])
    path = root / "images" / "test" / pid / "image.png"
    path.write_bytes(b"this is not a png" * 10)
    examples = read_scienceqa(root, "test")          # the reader only checks existence ...
    raises(lambda: check_images(examples), path, "not a readable image")
    raises(lambda: load_image(path, 32), path, "not a readable image")
    good = (SQA / "images" / "test" / pid / "image.png").read_bytes()
    path.write_bytes(good[:len(good) // 2])          # ... a truncated PNG fails when decoded too
    raises(lambda: VLDataset(examples, TOK, 32)[[e.id for e in examples].index(pid)], path, "not a readable image")


def test_problem_missing_a_field(tmp_path):
    root, problems, splits = scienceqa_slice(tmp_path)
    pid = next(iter(problems))
    del problems[pid]["choices"]
    write(root, problems, splits)
    raises(lambda: read_scienceqa(root, "test"), "problems.json", f"problem '{pid}'", "missing field 'choices'")


def test_answer_outside_choices(tmp_path):
    root, problems, splits = scienceqa_slice(tmp_path)
    pid = next(iter(problems))
    problems[pid]["answer"] = 5
    write(root, problems, splits)
    msg = raises(lambda: read_scienceqa(root, "test"), "problems.json", f"problem '{pid}'")
    assert msg.endswith(f"has answer 5 outside its {len(problems[pid]['choices'])} choices")


def test_pid_without_problem(tmp_path):
    root, problems, splits = scienceqa_slice(tmp_path)
    splits["test"].append("99999")
    write(root, problems, splits)
    raises(lambda: read_scienceqa(root, "test"), "pid_splits.json", "'99999'", "has no problem")


def test_invalid_json(tmp_path):
    root, _, _ = scienceqa_slice(tmp_path)
    (root / "problems.json").write_text('{"1": {"question": "Why?",}')
    raises(lambda: read_scienceqa(root, "test"), "problems.json", "invalid JSON", "line 1")
    (root / "problems.json").unlink()
    raises(lambda: read_scienceqa(root, "test"), "problems.json", "file not found")


def test_unknown_split(tmp_path):
    root, _, _ = scienceqa_slice(tmp_path)
    raises(lambda: read_scienceqa(root, "dev"), "pid_splits.json", "no split 'dev'", "test")
    raises(lambda: read_coco(COCO, "restval"), "dataset_coco.json", "no split 'restval'")


def test_bad_coco(tmp_path):
    data = json.loads((COCO / "dataset_coco.json").read_text())
    root = tmp_path / "coco"
    root.mkdir()
    images = [im for im in data["images"] if im["split"] == "test"][:3]
    for im in images:
        (root / im["filepath"]).mkdir(exist_ok=True)
        shutil.copy(COCO / im["filepath"] / im["filename"], root / im["filepath"] / im["filename"])
    file = root / "dataset_coco.json"
    file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    assert len(read_coco(root, "test")) == 3
    (root / images[1]["filepath"] / images[1]["filename"]).unlink()
    raises(lambda: read_coco(root, "test"), images[1]["filename"], "not found")
    del images[0]["sentences"]
    file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    raises(lambda: read_coco(root, "test"), "dataset_coco.json", "images[0]", "missing field 'sentences'")
    file.write_text("{")
    raises(lambda: read_coco(root, "test"), "dataset_coco.json", "invalid JSON")



# ---------------------------------------------------------------------------------------------
# The tiny presets' tokenizer: bytes plus the words of tiny_data/words.txt

WORDS = WordTokenizer(ROOT / "tiny_data" / "words.txt")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_word_tokenizer_round_trips_any_text(text):
    ids = WORDS.encode(text, bos=True, eos=True)
    assert ids[0] == WORDS.bos_id and ids[-1] == WORDS.eos_id and all(0 <= i < WORDS.vocab_size for i in ids)
    assert WORDS.decode(ids) == text


def test_word_tokenizer_reads_the_toy_language_in_words(sqa):
    e = sqa["test"][0]
    text = e.prompt + e.target
    ids = WORDS.encode(text)
    assert len(ids) * 2.5 < len(TOK.encode(text))                   # ~3.3x fewer tokens than bytes
    assert [WORDS.decode([i]) for i in WORDS.encode(" The answer is B.")] == [" The", " answer", " is", " B", "."]
    assert load_tokenizer(ROOT / "tiny_data" / "words.txt").encode(text) == ids
    assert WORDS.vocab_size <= 1024                                  # the tiny decoder's vocab_size


def test_word_list_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "words.txt"
    bad.write_text('" red"\nnot json\n')
    with pytest.raises(ValueError, match=r"words.txt: line 2 is not a JSON string"):
        WordTokenizer(bad)
    bad.write_text('" red"\n" red"\n')
    with pytest.raises(ValueError, match="repeats a word"):
        WordTokenizer(bad)


@pytest.mark.parametrize("tok", [TOK, WORDS], ids=["bytes", "words"])
def test_pretraining_weights_the_answer_letter(tok):
    doc = "Question: Q?\nContext: N/A\nOptions: (A) x (B) y\nResponse: The answer is B."
    ids = tok.encode(doc, bos=True, eos=True)
    assert tok.decode([ids[answer_index(tok, doc, ids)]]).strip() == "B"
    assert answer_index(tok, "A caption.", tok.encode("A caption.", bos=True)) is None
