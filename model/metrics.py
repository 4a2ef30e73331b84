"""Evaluation metrics: ScienceQA accuracy by category and COCO-caption BLEU / CIDEr-D.

ScienceQA: the model greedily continues "...Response: The answer is"; `parse_answer` reads the letter,
`scienceqa_metrics` scores it in the paper's Table-1 columns NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg. In the
formats that write a lecture or solution first, the model continues "...Response:" itself, `parse_generated`
reads the letter of its "The answer is X", and `generation_metrics` compares its solution with the gold one.

Captions: `bleu` and `cider_d` reproduce pycocoevalcap's `Bleu(4)` and `Cider()` (the numbers every
captioning paper reports) on whitespace-tokenised strings; tests/test_metrics.py checks the agreement.
coco-caption first runs Stanford's PTBTokenizer, which needs Java, so `tokenize` is a pure-Python
approximation of it; both implementations are then fed the same tokenised strings.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Mapping

import numpy as np

# ---------------------------------------------------------------------------------------------
# ScienceQA

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")   # paper Table 1 order
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def parse_answer(text: str, n_choices: int) -> int | None:
    """The option index named by the greedy continuation of "...Response: The answer is".

    The first capital ASCII letter anywhere in `text` is the answer (A -> 0, B -> 1, ...); no capital
    letter, or a letter past the last option, gives None, which is scored as wrong:
        " A."  -> 0      " C" (2 choices) -> None      "" -> None      " b" -> None
        " I think B" -> None (the first capital is "I", out of range for fewer than 9 options)
    """
    m = re.search(r"[A-Z]", text)
    if m is None:
        return None
    i = ord(m.group()) - ord("A")
    return i if i < n_choices else None


# "The answer is X", X a capital letter, in parentheses or not, and not the start of a word ("Blue")
ANSWER_SENTENCE = re.compile(r"The answer is \(?([A-Z])\b\)?")


def parse_generated(text: str, n_choices: int) -> int | None:
    """The option index named by the first "The answer is X" of a text the model wrote from the prompt
    (formats that put a lecture or solution first). None, scored as wrong, when there is no such sentence or
    X is past the last option:
        "Both are red. The answer is B." -> 1    "The answer is (B)" -> 1    "B." -> None
        "The answer is D." (3 choices) -> None  "The answer is A. The answer is B." -> 0
    """
    m = ANSWER_SENTENCE.search(text)
    if m is None:
        return None
    i = ord(m.group(1)) - ord("A")
    return i if i < n_choices else None


def answer_complete(text: str) -> bool:
    """The stop rule of generation: the text holds a whole answer sentence, "The answer is X" and its "."."""
    return re.search(ANSWER_SENTENCE.pattern + r"\.", text) is not None


def solution_text(text: str) -> str:
    """The text before the first "The answer is" (all of it without one), whitespace collapsed: the generated
    solution of an output, the gold one of a target."""
    return " ".join(text.split("The answer is", 1)[0].split())


def _field(record, key):
    return record[key] if isinstance(record, Mapping) else getattr(record, key)


def _columns_of(record) -> list[str]:
    """The Table-1 columns a test item counts in (TXT and IMG overlap; NO is neither)."""
    subject = _field(record, "subject")
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; expected one of {sorted(SUBJECTS)}")
    grade = _field(record, "grade")
    g = int(grade.removeprefix("grade")) if re.fullmatch(r"grade\d+", grade) else 0
    if not 1 <= g <= 12:
        raise ValueError(f"grade {grade!r} is not grade1..grade12")
    hint, image = bool(_field(record, "has_hint")), bool(_field(record, "has_image"))
    cols = [SUBJECTS[subject]]
    cols += ["TXT"] * hint + ["IMG"] * image + ["NO"] * (not hint and not image)
    cols += ["G1-6" if g <= 6 else "G7-12", "Avg"]
    return cols


def scienceqa_metrics(records) -> dict:
    """Accuracy in percent per column, e.g. {"NAT": 91.5, ..., "Avg": 92.0, "counts": {"NAT": 2200, ...}}.

    Each record (dict or object) has correct, subject, has_hint, has_image, grade. A column with no
    items has accuracy None (tiny evaluation sets often miss a whole subject or grade band).
    """
    n, right = Counter(), Counter()
    for r in records:
        for c in _columns_of(r):
            n[c] += 1
            right[c] += bool(_field(r, "correct"))
    out: dict = {c: 100.0 * right[c] / n[c] if n[c] else None for c in COLUMNS}
    out["counts"] = {c: n[c] for c in COLUMNS}
    return out


def _cell(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(metrics: dict, title: str | None = None) -> str:
    """Fixed-width text table in the paper's column order: accuracies (two decimals) and item counts."""
    lines = [title] if title else []
    lines.append(" " * 5 + "".join(f"{c:>8}" for c in COLUMNS))
    lines.append("acc  " + "".join(f"{_cell(metrics[c]):>8}" for c in COLUMNS))
    if "counts" in metrics:
        lines.append("n    " + "".join(f"{metrics['counts'][c]:>8}" for c in COLUMNS))
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict]) -> str:
    """{method name: scienceqa_metrics(...)} as a Markdown table."""
    lines = ["| Method | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def type_metrics(records) -> dict[str, dict]:
    """Accuracy per question type (ScienceQA's `category`): {type: {"acc", "n", "chance", "image"}}, in
    percent; chance = the mean of 1 / number of choices; image = the type's items have pictures."""
    out: dict[str, dict] = {}
    for r in records:
        t = out.setdefault(_field(r, "type"), {"right": 0, "n": 0, "chance": 0.0, "image": False})
        t["right"] += bool(_field(r, "correct"))
        t["n"] += 1
        t["chance"] += 1.0 / _field(r, "n_choices")
        t["image"] |= bool(_field(r, "has_image"))
    return {k: {"acc": 100.0 * t["right"] / t["n"], "n": t["n"], "chance": 100.0 * t["chance"] / t["n"],
                "image": t["image"]} for k, t in out.items()}


def generation_metrics(records) -> dict:
    """Answers read and solutions written, overall ("all") and per question type ("by_type"):
    {"n", "unparsed" (items with no answer read), "with_solution" (items with a gold solution), "solution_match"
    (% of those whose generated solution equals the gold one), "acc_match" / "acc_mismatch" (accuracy % on
    those that do / do not), "image"}; None where no item qualifies. A record's "solution_match" is None
    (or absent) when the item has no gold solution."""
    def summary(rs):
        scored = [r for r in rs if r.get("solution_match") is not None]
        match = [r for r in scored if r["solution_match"]]
        miss = [r for r in scored if not r["solution_match"]]
        pct = lambda part, whole: 100.0 * len(part) / len(whole) if whole else None
        return {"n": len(rs), "unparsed": sum(bool(r["unparsed"]) for r in rs), "with_solution": len(scored),
                "solution_match": pct(match, scored), "acc_match": pct([r for r in match if r["correct"]], match),
                "acc_mismatch": pct([r for r in miss if r["correct"]], miss),
                "image": any(r["has_image"] for r in rs)}

    by_type: dict[str, list] = {}
    for r in records:
        by_type.setdefault(r["type"], []).append(r)
    return {"all": summary(list(records)), "by_type": {k: summary(rs) for k, rs in by_type.items()}}


def generation_table(metrics: dict) -> str:
    """`generation_metrics` as a fixed-width table, picture types first, then text types, then all items."""
    width = max([len(t) for t in metrics["by_type"]] + [28])
    head = (f"{'question type':{width}} {'n':>5} {'unparsed':>9} {'with sol.':>10} {'sol. =':>7} "
            f"{'acc | =':>8} {'acc | ≠':>8}")

    def row(name, m):
        return (f"{name:{width}} {m['n']:>5} {m['unparsed']:>9} {m['with_solution']:>10} "
                f"{_cell(m['solution_match']):>7} {_cell(m['acc_match']):>8} {_cell(m['acc_mismatch']):>8}")

    by_type = metrics["by_type"]
    order = sorted(by_type, key=lambda k: (not by_type[k]["image"], k))
    return "\n".join([head] + [row(k, by_type[k]) for k in order] + [row("all", metrics["all"])])


# Hops: a step-wise solution read step by step (a step is a sentence). A step that states a number more often
# than the question, hint and earlier steps together did is a *fact* looked up (in the picture, or in the
# picture in words: "The red town is in column 4, row 4." after "... column 4, row 7." states 4 twice, a fact);
# a step whose numbers were all stated as often before is *derived* (a comparison of two numbers); the last
# step is the content answer ("So yes."); then the letter. Wording-free: it needs only sentences and numbers.
# A question and its answer are one step ("Is 2 less than 7? yes."): a step ends at "." or "!", not "?".

NUMBER = re.compile(r"\d+")
STEP_END = re.compile(r"(?<=[.!])\s+")


def solution_steps(solution: str) -> list[str]:
    """A solution's sentences: "The red shape is in row 2. Is 2 less than 7? yes. So yes." -> three steps."""
    return [s for s in STEP_END.split(solution.strip()) if s]


def step_kinds(steps: list[str], given: str) -> list[str]:
    """Each step's kind: "fact", "derived", "text" (no number) or "answer" (the last step); `given` is what
    the question states (its question and hint: numbers there are not looked up)."""
    seen, kinds = Counter(NUMBER.findall(given)), []                  # how often each number was stated
    for i, step in enumerate(steps):
        numbers = Counter(NUMBER.findall(step))
        kinds.append("answer" if i == len(steps) - 1 else "fact" if any(c > seen[n] for n, c in numbers.items())
                     else "derived" if numbers else "text")
        seen += numbers
    return kinds


def hop_record(gold: str, written: str, given: str, correct: bool) -> dict:
    """One item's hops, its written solution against the gold one, step by step:
    facts         the gold's fact steps;  names: those written with the same words (numbers aside);
    facts_right   those written exactly (the looked-up number right too);
    derived / derived_right   derived steps and those right, counted only where every fact is right;
    text / text_right         likewise the steps with no number (what a read found: "The shape nearest to
                              it is the yellow triangle."), counted only where every fact is right;
    answer        the content answer step right, where every earlier step is (None where one is not);
    letter        the letter right, where the content answer step is right (None where it is not)."""
    g, w = solution_steps(gold), solution_steps(written)
    kinds = step_kinds(g, given)
    at = lambda i: w[i] if i < len(w) else ""
    right = [at(i) == step for i, step in enumerate(g)]
    facts = [i for i, k in enumerate(kinds) if k == "fact"]
    after = all(right[i] for i in facts)                  # the later steps are scored where the facts are right
    derived = [i for i, k in enumerate(kinds) if k == "derived"] if after else []
    text = [i for i, k in enumerate(kinds) if k == "text"] if after else []
    return {"facts": len(facts), "names": sum(NUMBER.sub("#", at(i)) == NUMBER.sub("#", g[i]) for i in facts),
            "facts_right": sum(right[i] for i in facts), "derived": len(derived),
            "derived_right": sum(right[i] for i in derived), "text": len(text), "text_right": sum(right[i] for i in text),
            "answer": right[-1] if g and all(right[:-1]) else None,
            "letter": bool(correct) if g and right[-1] else None}


def hop_metrics(records) -> dict[str, dict]:
    """Per question type (and "all"), from records with a "hops" entry (hop_record), in percent:
    names (of fact steps), fact | name (of those with the names right, the number right too), derived | facts,
    text | facts, answer | steps, letter | answer; with the counts each is a share of."""
    groups: dict[str, list] = {"all": []}
    for r in records:
        if r.get("hops"):
            groups.setdefault(r["type"], []).append(r)
            groups["all"].append(r)

    def pct(a, b):
        return 100.0 * a / b if b else None

    out = {}
    for k, rs in groups.items():
        h = [r["hops"] for r in rs]
        total = {f: sum(x.get(f, 0) for x in h)             # text: absent from records of before 2026-12-05
                 for f in ("facts", "names", "facts_right", "derived", "derived_right", "text", "text_right")}
        answers = [x["answer"] for x in h if x["answer"] is not None]
        letters = [x["letter"] for x in h if x["letter"] is not None]
        out[k] = {"n": len(rs), "image": any(r["has_image"] for r in rs), "facts": total["facts"],
                  "names": pct(total["names"], total["facts"]), "fact": pct(total["facts_right"], total["names"]),
                  "derived_n": total["derived"], "derived": pct(total["derived_right"], total["derived"]),
                  "text_n": total["text"], "text": pct(total["text_right"], total["text"]),
                  "answer_n": len(answers), "answer": pct(sum(answers), len(answers)),
                  "letter_n": len(letters), "letter": pct(sum(letters), len(letters))}
    return out


def hop_table(hops: dict[str, dict], probe: dict | None = None) -> str:
    """`hop_metrics` as a fixed-width table (picture types first); `probe` adds the teacher-forced fact
    columns: {type: (% of items with every fact right with the true pictures, with shuffled ones; % of the
    facts' number tokens right, likewise)}."""
    width = max([len(t) for t in hops] + [28])
    head = (f"{'question type':{width}} {'n':>5} {'facts':>6} {'names':>7} {'fact|nm':>8} {'deriv|f':>8} "
            f"{'text|f':>7} {'ans|st':>7} {'lett|ans':>8}" + (f" {'probe':>7} {'shuffl.':>7} {'num':>7} {'num sh.':>7}" if probe else ""))
    rows = [head]
    for k in sorted((k for k in hops if k != "all"), key=lambda k: (not hops[k]["image"], k)) + ["all"]:
        m = hops[k]
        row = (f"{k:{width}} {m['n']:>5} {m['facts']:>6} {_cell(m['names']):>7} {_cell(m['fact']):>8} "
               f"{_cell(m['derived']):>8} {_cell(m.get('text')):>7} {_cell(m['answer']):>7} {_cell(m['letter']):>8}")
        if probe:
            row += "".join(f" {_cell(v):>7}" for v in probe.get(k, (None,) * 4))
        rows.append(row)
    return "\n".join(rows)


def mean_std(values: list[float], digits: int = 2) -> str:
    """"mean ± sample std" of several seeds' numbers; one number alone; "-" for none."""
    if len(values) > 1:
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{values[0]:.{digits}f}" if values else "-"


def seeds_tables(rows: dict[str, list[dict]], params: dict[str, int] | None = None) -> str:
    """Markdown tables of several runs per row, each cell mean ± std over the row's runs: the Table-1 columns
    (with the trainable parameter count when given), then IMG and each picture type with a chance row.
    rows[name] is a list of evaluation results, each with "metrics" (scienceqa_metrics) and "by_type"."""
    p = "#trainable | " if params else ""
    lines = [f"| row | {p}" + " | ".join(COLUMNS) + " |", "|---|" + "---|" * (len(COLUMNS) + bool(params))]
    for name, runs in rows.items():
        cells = [mean_std([r["metrics"][c] for r in runs if r["metrics"][c] is not None]) for c in COLUMNS]
        lines.append(f"| {name} | " + (f"{params[name]:,} | " if params else "") + " | ".join(cells) + " |")
    chance = {k: t["chance"] for runs in rows.values() for r in runs for k, t in r["by_type"].items() if t["image"]}
    types = sorted(chance)
    lines += ["", "| row | IMG | " + " | ".join(types) + " |", "|---|" + "---|" * (len(types) + 1)]
    for name, runs in rows.items():
        cells = [mean_std([r["metrics"]["IMG"] for r in runs if r["metrics"]["IMG"] is not None], 1)]
        cells += [mean_std([r["by_type"][k]["acc"] for r in runs if k in r["by_type"]], 1) for k in types]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| chance | | " + " | ".join(f"{chance[k]:.0f}" for k in types) + " |")
    return "\n".join(lines)


MIN_GAP = 10.0      # points: a share of a smaller gap is mostly noise (one item of 50 is 2 points)


def gap_closed(lsrm: float | None, blind: float | None, oracle: float | None) -> float | None:
    """Share (%) of the blind-to-oracle gap the visual memory closes: 100 (lsrm - blind) / (oracle - blind);
    None where there is no oracle, or no gap to close (the oracle beats blind by less than MIN_GAP points)."""
    if lsrm is None or blind is None or oracle is None or oracle - blind < MIN_GAP:
        return None
    return 100.0 * (lsrm - blind) / (oracle - blind)


def bounds_table(by_type: dict[str, dict], summary: dict[str, dict]) -> str:
    """Per question type, picture types first: n, chance, the frozen decoder blind, LSRM, the frozen decoder
    with the picture in words (oracle), and the gap closed. by_type[t] has n, chance, image, acc and
    blind/oracle accuracies (oracle None without descriptions); summary has the same for "IMG"."""
    width = max([len(t) for t in by_type] + [28])
    head = f"{'question type':{width}} {'n':>5} {'chance':>7} {'blind':>7} {'LSRM':>7} {'oracle':>7} {'gap closed':>11}"

    def row(name, t):
        g = gap_closed(t["acc"], t.get("blind"), t.get("oracle"))
        return (f"{name:{width}} {t['n']:>5} {_cell(t['chance']):>7} {_cell(t.get('blind')):>7} "
                f"{_cell(t['acc']):>7} {_cell(t.get('oracle')):>7} {('-' if g is None else f'{g:.1f}%'):>11}")

    pictures = sorted(k for k, t in by_type.items() if t["image"])
    texts = sorted(k for k, t in by_type.items() if not t["image"])
    lines = [head] + [row(k, by_type[k]) for k in pictures]
    lines += [row("all picture questions (IMG)", summary["IMG"])] if "IMG" in summary else []
    lines += [row(k, by_type[k]) for k in texts]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Caption tokenisation (coco-caption's PTBTokenizer, approximated)

# pycocoevalcap/tokenizer/ptbtokenizer.py drops these tokens after `PTBTokenizer -lowerCase`. The list
# is upper case, so the lower-cased bracket tokens -lrb- -rrb- ... survive; we reproduce that quirk.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CHARS = str.maketrans({**{k: f" {v} " for k, v in _BRACKETS.items()}, '"': " ", "`": " "})
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "ltd."}
_ACRONYM = re.compile(r"([A-Za-z]\.)+")                            # u.s. p.m. a. keep their period
_CLITICS = re.compile(r"(?<=\w)(n't|'s|'m|'re|'ve|'ll|'d)(?=\W|$)", re.I)    # do n't, man 's
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}


def _word(tok: str) -> str:
    """PTB's treatment of one whitespace-separated piece (case as written), as space-separated tokens."""
    if tok in _BRACKETS.values() or tok.lower() in ("'s", "'m", "'re", "'ve", "'ll", "'d"):
        return tok
    tok = tok.strip("-")                                            # "-word", "word-", a lone "-"
    if tok.endswith(".") and tok.lower() not in _ABBREVIATIONS and not _ACRONYM.fullmatch(tok):
        tok = tok[:-1]                                              # sentence-final period
    tok = tok.rstrip("'")                                           # dogs' -> dogs, closing quote
    if not re.match(r"'\d", tok):                                   # opening quote, but '80s stays
        tok = tok.lstrip("'")
    tok = _SPLIT_WORDS.get(tok.lower(), tok)
    return _CLITICS.sub(r" \1", tok)


def tokenize(caption: str) -> str:
    """Lower-cased PTB tokens joined by spaces, punctuation dropped as coco-caption does.

        "A man's dog, running." -> "a man 's dog running"      "Don't stop!" -> "do n't stop"
        "1,000 people at 3:30 p.m." -> "1,000 people at 3:30 p.m."

    Checked against the real PTBTokenizer on caption-like text (tests/test_metrics.py, when Java is
    present). Known differences, all rare in captions: abbreviations beyond a short list ("no. 5"), a
    single letter's period (PTB keeps or splits it by context: "a. on", "a." at the end, "A. The"),
    "'cause" / "'til" / "rock'n'roll" / "y'all", "5 1/2" (one token for PTB), currency normalisation
    (€ -> $), symbols other than the ones split below, pieces glued without spaces ("dog.it's").
    """
    s = caption.replace("\n", " ").translate(_CHARS)              # brackets -> -lrb- ..., drop " `
    s = re.sub(r"\.{2,}", ". ", s)                                  # "wait...what", "U.S.." -> "U.S."
    s = re.sub(r"--+|;", " ", s)                                    # dashes, semicolons
    s = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", s)                   # commas/colons, not 1,000 or 3:30
    s = re.sub(r"([?!]+|[$%&+#=*^~|<>°])", r" \1 ", s)              # "?" alone is dropped, "??" is kept
    words = " ".join(_word(t) for t in s.split()).lower().split()
    return " ".join(w for w in words if w not in PUNCTUATIONS)     # PTB's -lowerCase also comes last


# ---------------------------------------------------------------------------------------------
# BLEU and CIDEr-D on tokenised strings, as pycocoevalcap computes them

def _check(refs: dict, hyps: dict):
    if refs.keys() != hyps.keys():
        raise ValueError(f"refs and hyps cover different images: {len(refs.keys() ^ hyps.keys())} "
                         f"ids in only one of them, e.g. {next(iter(refs.keys() ^ hyps.keys()))!r}")
    empty = [i for i, r in refs.items() if not r]
    if empty:
        raise ValueError(f"no reference captions for image {empty[0]!r}")


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of all k-grams, k = 1..n, as tuples."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(refs: dict[object, list[str]], hyps: dict[object, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's BleuScorer with option "closest" (Papineni et al. 2002).

        p_k    = (sum_i clip_k(i) + tiny) / (sum_i guess_k(i) + small)  clip: hyp k-gram count capped by
                                                                          its max count in one reference
        BLEU-k = BP * (p_1 ... p_k)^(1/k)
        BP     = exp(1 - r/c) if c < r else 1                            c = sum of hypothesis lengths,
                                                                          r = sum of closest ref lengths
    tiny = 1e-15, small = 1e-9 keep 0/0 at 0; c/r is computed as (c + tiny) / (r + small) as there.
    """
    _check(refs, hyps)
    tiny, small = 1e-15, 1e-9
    clipped, guess = [0] * n, [0] * n
    c = r = 0
    for i, ref_list in refs.items():
        h = hyps[i].split()
        rs = [x.split() for x in ref_list]
        max_ref = Counter()
        for x in rs:
            max_ref |= _ngrams(x, n)                                # | is the element-wise max
        for g, count in _ngrams(h, n).items():
            clipped[len(g) - 1] += min(count, max_ref[g])
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        c += len(h)
        r += min((abs(len(x) - len(h)), len(x)) for x in rs)[1]    # closest length, ties -> shorter
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (clipped[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1 / (k + 1)))
    ratio = (c + tiny) / (r + small)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * bp for s in scores]


def cider_d(refs: dict[object, list[str]], hyps: dict[object, str], n: int = 4, sigma: float = 6.0):
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's CiderScorer: (corpus score, per-image scores).

    For each k-gram order k = 1..n, a caption becomes a tf-idf vector over its k-grams g:
        w(g)   = tf(g) * (log N - log max(1, df(g)))       N = number of images evaluated,
                                                           df(g) = images whose references contain g
    and, for image i with hypothesis h and references r_1..r_m:
        sim_k(h, r) = sum_g min(w_h(g), w_r(g)) * w_r(g) / (|w_h| |w_r|)      clipped cosine
                      * exp(-(l_h - l_r)^2 / (2 sigma^2))                    gaussian length penalty
        CIDEr-D(i)  = 10 / m * sum_j mean_k sim_k(h, r_j)
    The corpus score is the mean over images. The IDF comes from the references of the evaluated images
    only, so the score of one image depends on the others.
    """
    _check(refs, hyps)
    ref_counts = {i: [_ngrams(x.split(), n) for x in rs] for i, rs in refs.items()}
    df = Counter(g for counts in ref_counts.values() for g in set().union(*counts))
    log_n = math.log(len(refs))

    def vectors(counts: Counter):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        # pycocoevalcap's "length" counts bigrams (its `n == 1` tests the 0-based order), i.e. words - 1
        # for a non-empty caption; this only matters against an empty caption, and we keep it.
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norms, length

    per_image = []
    for i, counts_list in ref_counts.items():
        vh, nh, lh = vectors(_ngrams(hyps[i].split(), n))
        total = np.zeros(n)
        for counts in counts_list:
            vr, nr, lr = vectors(counts)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    dot /= nh[k] * nr[k]
                total[k] += dot * penalty
        per_image.append(10.0 * total.mean() / len(counts_list))
    per_image = np.array(per_image)
    return float(per_image.mean()), per_image


def caption_metrics(refs: dict[object, list[str]], hyps: dict[object, str]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr on raw captions (tokenised here), ×100 as papers report them: the paper's
    CIDEr 123.9 (the paper's) is pycocoevalcap's 1.239."""
    refs_t = {i: [tokenize(x) for x in rs] for i, rs in refs.items()}
    hyps_t = {i: tokenize(h) for i, h in hyps.items()}
    out = {f"BLEU-{k + 1}": 100 * b for k, b in enumerate(bleu(refs_t, hyps_t))}
    out["CIDEr"] = 100 * cider_d(refs_t, hyps_t)[0]
    return out
