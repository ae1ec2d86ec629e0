"""Offline generators of RULER-style synthetic long-context tasks (Hsieh et al., 2024), written from
the paper's description: needle retrieval (single, multi-key, multi-value, multi-query), variable
tracking, common- and frequent-word extraction, and question answering over local documents.

Every task is built from a haystack of ``n`` units (filler sentences, sentences of local text, needle
lines, list entries, words or documents) and a seed; :func:`fit_units` picks ``n`` so that the whole
prompt (instruction + haystack + question) has as many tokens as the target allows, measured with
the real tokenizer. Keys and values are drawn before the haystack, so they do not change while the
haystack is fitted. Natural text is the prose of the local text files (:mod:`bench.prose`: runs of
comment and docstring lines without code characters). Nothing is downloaded.

Each prompt ends with its question and an answer prefix (a plain prompt, no chat template); the
question starts with a blank line so the context can be compressed alone (see
:func:`bench.inputs.split_question`).
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from bench.prose import english_words, paragraphs, sentences
from flashmem.prompts import FILLER

# ---------------------------------------------------------------------------------------------
# word lists (keys, names, answers of the QA facts)
# ---------------------------------------------------------------------------------------------
ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively misty noble odd pale quiet "
    "rapid silent tidy upper vivid warm young zesty bold crisp damp early fierce grand humble"
).split()
NOUNS = (
    "anchor badger canyon dolphin ember falcon garden harbor island jungle kettle lantern meadow "
    "needle orchard pebble quarry river saddle tunnel valley walnut yard zephyr beacon cellar "
    "fountain glacier hammock ladder"
).split()
FIRST_NAMES = (
    "Alma Bruno Celia Dario Edith Felix Greta Hugo Ines Jonas Karla Leon Mira Nils Olga Pavel Rosa "
    "Soren Tilda Udo Vera Walter Xenia Yusuf Zora Anton Bettina Casper Delia Emil"
).split()
LAST_NAMES = (
    "Albright Brennan Castell Dunmore Eckhart Fairley Garrow Holloway Ingram Jessup Kittredge Lowell "
    "Marchetti Norcross Oakley Pemberton Quinlan Radcliffe Stanhope Thackery Underhill Vance Whitlock "
    "Yardley Zimmer"
).split()
JOBS = (
    "baker carpenter pilot librarian surgeon tailor plumber florist jeweler potter architect "
    "blacksmith chemist locksmith sculptor translator"
).split()
INSTRUMENTS = "cello harp oboe trumpet banjo accordion clarinet bassoon viola flute tuba mandolin".split()
SYLLABLES = "bar dun el fen gar hol ist kel lor mar nor ost pel quin ros sel tam ur vel wyn".split()

NEEDLE_INSTRUCTION = (
    "Some special magic {kinds} are hidden in the text below. Memorize them; a question about them "
    "follows the text."
)
NEEDLE = "One of the special magic {kinds} for {key} is: {value}."


@dataclass(frozen=True)
class Built:
    """A task prompt: ``context + question`` is the whole text; ``query`` is what the question asks
    about (a key, a value, or "" when it asks about the context as a whole)."""

    context: str
    question: str
    references: list[str]
    query: str

    @property
    def text(self) -> str:
        return self.context + self.question


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "all": fraction of the references in the output; "part": 1 if any is
    max_new_tokens: int
    build: Callable[[int, float, int], Built]  # (units, depth, seed) -> prompt
    what: str


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def _window(items: tuple[str, ...], start: int, n: int) -> list[str]:
    return [items[(start + i) % len(items)] for i in range(n)]


def number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def uuid_str(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def distinct(draw: Callable[[], str], k: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """``k`` distinct draws, none in ``exclude``."""
    out: dict[str, None] = {}
    while len(out) < k:
        v = draw()
        if v not in exclude:
            out.setdefault(v, None)
    return list(out)


def insert_at(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """``units`` with each ``(depth, text)`` inserted before unit ``round(depth * len(units))``
    (depth 0: first, 1: after the last), in order of depth."""
    out = list(units)
    n = len(units)
    for offset, (depth, text) in enumerate(sorted(items, key=lambda x: x[0])):
        out.insert(min(n, max(0, round(depth * n))) + offset, text)
    return out


# ---------------------------------------------------------------------------------------------
# needle in a haystack
# ---------------------------------------------------------------------------------------------
def _needle_question(keys: list[str], kinds: str, multi: bool) -> str:
    joined = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    kind = kinds if multi or len(keys) > 1 else kinds[:-1]
    what, are = ("What are all the", "are") if multi or len(keys) > 1 else ("What is the", "is")
    return (
        f"\n\n{what} special magic {kind} for {joined} mentioned in the text above? "
        f"The special magic {kind} for {joined} mentioned in the text above {are}"
    )


NOISE = tuple(s.strip() + "." for s in FILLER.split(".") if s.strip())  # the filler's 5 sentences


def _haystack(kind: str, rng_start: int, n: int) -> list[str]:
    if kind == "noise":
        return _window(NOISE, 0, n)
    pool = sentences()
    return _window(pool, rng_start % len(pool), n)


def niah(
    *,
    haystack: str,
    value: str = "number",
    keys: int = 1,
    values: int = 1,
    distractors: int = 0,
    key_kind: str = "word",
) -> Callable[[int, float, int], Built]:
    """A needle task: ``keys`` keys asked at once, each with ``values`` values (all references),
    ``distractors`` other keys' needles, haystack ``"noise"`` (the filler's sentences), ``"text"`` (local
    prose) or ``"needles"`` (only distractor needles: ``n`` of them)."""
    kinds = "numbers" if value == "number" else "uuids"

    def build(n: int, depth: float, seed: int) -> Built:
        rng = random.Random(seed)
        draw_key = (lambda: word_key(rng)) if key_kind == "word" else (lambda: uuid_str(rng))
        draw_value = (lambda: number(rng)) if value == "number" else (lambda: uuid_str(rng))
        asked = distinct(draw_key, keys)
        vals = {k: distinct(draw_value, values) for k in asked}
        n_other = n if haystack == "needles" else distractors
        others = distinct(draw_key, n_other, exclude=tuple(asked))
        other_needles = [NEEDLE.format(kinds=kinds, key=k, value=draw_value()) for k in others]
        # depths: the first asked needle at `depth`, the others at seeded positions
        placed = []
        for i, k in enumerate(asked):
            for j, v in enumerate(vals[k]):
                d = depth if i == 0 and j == 0 else rng.random()
                placed.append((d, NEEDLE.format(kinds=kinds, key=k, value=v)))
        start = rng.randrange(1 << 30)
        if haystack == "needles":
            units = insert_at(other_needles, placed)
        else:
            units = _haystack(haystack, start, n)
            units = insert_at(units, placed + [(rng.random(), t) for t in other_needles])
        context = NEEDLE_INSTRUCTION.format(kinds=kinds) + "\n\n" + " ".join(units)
        refs = [v for k in asked for v in vals[k]]
        return Built(context, _needle_question(asked, kinds, values > 1), refs, asked[0])

    return build


# ---------------------------------------------------------------------------------------------
# variable tracking
# ---------------------------------------------------------------------------------------------
VT_INSTRUCTION = (
    "Remember every variable assignment in the text below; a question about the chain of "
    "assignments follows the text. For example, after VAR QPRTS = 41062 and VAR MZKLA = VAR QPRTS, "
    "both QPRTS and MZKLA hold the value 41062."
)


def variable_tracking(hops: int = 4) -> Callable[[int, float, int], Built]:
    """One chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (``hops`` links) in filler sentences, its
    statements in order from ``depth / 2`` over half of the haystack; references: every name."""

    def build(n: int, depth: float, seed: int) -> Built:
        rng = random.Random(seed)
        names = distinct(lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)), hops + 1)
        names = [x for x in names if x not in ("QPRTS", "MZKLA")] or names
        value = str(rng.randint(10_000, 99_999))
        lines = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
        ]
        at = [depth / 2 + 0.5 * i / max(1, len(lines) - 1) for i in range(len(lines))]
        units = insert_at(_haystack("noise", 0, n), list(zip(at, lines)))
        question = (
            f"\n\nQuestion: which variables hold the value {value}? "
            f"Answer: the variables that hold the value {value} are"
        )
        return Built(VT_INSTRUCTION + "\n\n" + " ".join(units), question, names, value)

    return build


# ---------------------------------------------------------------------------------------------
# common / frequent words
# ---------------------------------------------------------------------------------------------
def common_words(common: int = 10, rare_freq: int = 3) -> Callable[[int, float, int], Built]:
    """A numbered list of local words: ``common`` words ``common_freq`` times each (the caller sets it
    from the target length: :func:`cwe_common_freq`) and ``n`` rare words ``rare_freq`` times each,
    shuffled; references: the common words."""

    def build(n: int, depth: float, seed: int, common_freq: int = 10) -> Built:
        rng = random.Random(seed)
        words = list(english_words())
        chosen = rng.sample(words, common + n)
        top, rare = chosen[:common], chosen[common:]
        entries = top * common_freq + rare * rare_freq
        rng.shuffle(entries)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        context = (
            "Below is a numbered list of words. Some words occur many times, the others only a few "
            "times. Memorize the words that occur most often.\n\n" + body
        )
        question = (
            f"\n\nQuestion: what are the {common} most common words in the list above? "
            f"Answer: the {common} words that occur most often in the list are:"
        )
        return Built(context, question, top, "")

    return build


def cwe_common_freq(target_tokens: int) -> int:
    """How often each common word occurs at a target length: 10 at 2K tokens, 20 at 4K, 30 from 6K."""
    return max(10, min(30, 10 * round(target_tokens / 2048)))


def frequent_words(top: int = 3, alpha: float = 2.0, vocab: int = 200) -> Callable[[int, float, int], Built]:
    """``n`` coded words (5 random letters each, from a vocabulary of ``vocab``) whose counts follow a
    Zipf law of exponent ``alpha`` (rank r: ``n r^-alpha / H``, at least 1), shuffled; references:
    the ``top`` most frequent."""

    def build(n: int, depth: float, seed: int) -> Built:
        rng = random.Random(seed)
        vocab_words = distinct(lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(5)), vocab)
        harmonic = sum(r**-alpha for r in range(1, vocab + 1))
        counts = [max(1, round(n * r**-alpha / harmonic)) for r in range(1, vocab + 1)]
        entries = [w for w, c in zip(vocab_words, counts) for _ in range(c)]
        rng.shuffle(entries)
        context = (
            "Read the coded text below and keep track of how often each coded word appears.\n\n"
            + " ".join(entries)
        )
        question = (
            f"\n\nQuestion: what are the {top} most frequent coded words in the text above? "
            f"Answer: the {top} most frequent coded words are:"
        )
        return Built(context, question, vocab_words[:top], "")

    return build


# ---------------------------------------------------------------------------------------------
# question answering over local documents
# ---------------------------------------------------------------------------------------------
QA_INSTRUCTION = "Answer the question from the documents below. Give a short phrase only, no other words."


def _place(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _qa1_fact(rng: random.Random, person: str) -> tuple[str, str, str]:
    """(fact, question, answer) of one of three relations."""
    kind = rng.randrange(3)
    if kind == 0:
        town = _place(rng) + "ton"
        return f"{person} was born in the town of {town}.", f"In which town was {person} born?", town
    if kind == 1:
        job = rng.choice(JOBS)
        return f"{person} works as a {job}.", f"What is the job of {person}?", job
    inst = rng.choice(INSTRUMENTS)
    return f"{person} plays the {inst}.", f"Which instrument does {person} play?", inst


def qa(hops: int) -> Callable[[int, float, int], Built]:
    """``n`` documents (local prose paragraphs); one fact (``hops`` 1) or two chained facts (``hops``
    2: "P was born in T." + "T lies in the country of C.") added to documents, with two distractor
    facts of the same kind about other people; reference: the answer phrase."""

    def build(n: int, depth: float, seed: int) -> Built:
        rng = random.Random(seed)
        people = distinct(lambda: _person(rng), 3)
        if hops == 1:
            fact, q, answer = _qa1_fact(rng, people[0])
            facts = [fact] + [_qa1_fact(rng, p)[0] for p in people[1:]]
        else:
            towns = distinct(lambda: _place(rng) + "ford", 3)
            countries = distinct(lambda: _place(rng) + "ia", 3)
            answer = countries[0]
            q = f"In which country was {people[0]} born?"
            facts = [f"{people[0]} was born in {towns[0]}.", f"{towns[0]} lies in the country of {answer}."]
            facts += [
                f"{p} was born in {t}. {t} lies in the country of {c}."
                for p, t, c in zip(people[1:], towns[1:], countries[1:])
            ]
        paras = paragraphs()
        start = rng.randrange(len(paras))
        docs = [[p if p[-1] in ".?!" else p + "."] for p in _window(paras, start, max(n, 1))]
        where = [min(n - 1, int(depth * n))] + [rng.randrange(n) for _ in facts[1:]]
        for i, fact in zip(where, facts):
            docs[i].append(fact)
        body = "\n\n".join(f"Document {i + 1}: {' '.join(d)}" for i, d in enumerate(docs[:n]))
        question = f"\n\nQuestion: {q}\nAnswer:"
        return Built(QA_INSTRUCTION + "\n\n" + body, question, [answer], people[0])

    return build


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah_single_1", "all", 12, niah(haystack="noise"), "filler haystack, number"),
        Task("niah_single_2", "all", 12, niah(haystack="text"), "local text, number"),
        Task("niah_single_3", "all", 28, niah(haystack="text", value="uuid"), "local text, UUID"),
        Task("niah_multikey_1", "all", 12, niah(haystack="text", distractors=3), "3 distractor keys"),
        Task("niah_multikey_2", "all", 12, niah(haystack="needles"), "haystack of needles"),
        Task(
            "niah_multikey_3",
            "all",
            28,
            niah(haystack="needles", value="uuid", key_kind="uuid"),
            "needles, UUID keys and values",
        ),
        Task("niah_multivalue", "all", 48, niah(haystack="text", values=4), "4 values of one key"),
        Task("niah_multiquery", "all", 48, niah(haystack="text", keys=4), "4 keys asked at once"),
        Task("vt", "all", 30, variable_tracking(), "variable tracking, 4 hops"),
        Task("cwe", "all", 60, common_words(), "10 most common words of a list"),
        Task("fwe", "all", 24, frequent_words(), "3 most frequent coded words (Zipf)"),
        Task("qa_1", "part", 16, qa(1), "one fact in local documents"),
        Task("qa_2", "part", 16, qa(2), "two chained facts"),
    )
}


def build(task: str, n: int, depth: float, seed: int, target_tokens: int) -> Built:
    """Task ``task``'s prompt with ``n`` haystack units (``target_tokens`` sets cwe's frequency)."""
    t = TASKS[task]
    if task == "cwe":
        return t.build(n, depth, seed, common_freq=cwe_common_freq(target_tokens))
    return t.build(n, depth, seed)


def fit_units(count: Callable[[int], int], target: int, *, first: int = 8, max_iter: int = 40) -> int:
    """The largest ``n >= 1`` with ``count(n) <= target`` near the estimate (``count``: tokens of
    the prompt built with ``n`` units, about linear in ``n``): secant steps from two probes, then
    unit steps. Raises ``ValueError`` when even one unit is over the target."""
    cache: dict[int, int] = {}

    def c(n: int) -> int:
        if n not in cache:
            cache[n] = count(n)
        return cache[n]

    if c(1) > target:
        raise ValueError(f"the prompt is {c(1)} tokens with one haystack unit, over the target {target}")
    lo, n = 1, max(2, first)
    for _ in range(max_iter):
        if c(n) <= target:
            lo = max(lo, n)
        per = max((c(n) - c(1)) / (n - 1), 1e-6)
        guess = max(1, n + int((target - c(n)) / per))
        if guess == n or (guess in cache and abs(guess - n) <= 1):
            break
        n = guess
    n = max(lo, n) if c(max(lo, n)) <= target else lo
    while n > 1 and c(n) > target:
        n -= 1
    while c(n + 1) <= target:
        n += 1
    return n


def score(metric: str, output: str, references: list[str]) -> float:
    """RULER's string match: ``"all"``: the fraction of ``references`` contained in ``output``;
    ``"part"``: 1.0 if any is; both case-insensitive."""
    out = output.lower()
    hits = [r.lower() in out for r in references]
    if not hits:
        raise ValueError("no references to score against")
    if metric == "all":
        return sum(hits) / len(hits)
    if metric == "part":
        return float(any(hits))
    raise ValueError(f"metric must be 'all' or 'part', got {metric!r}")
