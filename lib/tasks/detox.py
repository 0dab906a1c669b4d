"""Detoxification, in the format of ParaDetox: rewrite a rude sentence politely,
keeping its meaning.

Rows are built from complaints (a subject and what is wrong with it) that both
versions share; the toxic version adds rude parts (a rude opener, a rude word
before the subject, an insulting tail) and the neutral version drops them or
says them politely. Text is lower case like most of ParaDetox.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass

from .base import Task, exact_match_rate

# Words and phrases that make a sentence rude. Every rude part below contains
# one; no neutral part does. Matched as whole words, ignoring case.
RUDE_LEXICON = frozenset({
    "damn", "damned", "dammit", "goddamn", "hell", "crap", "crappy", "shit", "shitty", "bullshit",
    "stupid", "idiot", "idiots", "idiotic", "moron", "morons", "moronic", "dumb", "dumbass",
    "jerk", "jerks", "loser", "losers", "freaking", "frigging", "bloody", "ass", "asshole",
    "jackass", "bastard", "bastards", "screw", "screw you", "sucks", "suck", "pissed", "piss",
    "brainless", "pathetic", "lousy", "piece of junk", "shut up", "wtf", "fuck", "fucking",
    "scumbag", "imbecile", "dipshit", "douchebag", "brain dead", "clueless idiot",
})

RUDE_WORD_PATTERN = re.compile(
    r"\b(?:" + "|".join(re.escape(w) for w in sorted(RUDE_LEXICON, key=len, reverse=True)) + r")\b",
    flags=re.IGNORECASE,
)

# Rude words that go between a subject's determiner and noun.
THING_INSULTS = ("damn", "stupid", "freaking", "crappy", "bloody", "lousy", "goddamn", "shitty")
PERSON_INSULTS = ("stupid", "idiot", "damn", "dumb", "freaking", "bloody", "brainless", "moronic")

# (rude, neutral) pairs: the neutral part says the same politely, or nothing.
OPENERS = (
    ("what the hell", ""), ("holy crap", "wow"), ("damn it", ""), ("god damn it", ""),
    ("ugh, screw this", "ugh"), ("are you kidding me, what the hell", "are you kidding me"),
    ("wtf", "seriously"), ("for fuck's sake", "honestly"),
)
GENERAL_TAILS = (
    ("this is such crap", "this is not good"), ("it totally sucks", "it is really bad"),
    ("screw it", "i give up"), ("what a load of bullshit", "this is unacceptable"),
    ("i am so pissed off", "i am very upset"), ("this is so damn annoying", "this is very annoying"),
)
MACHINE_TAILS = GENERAL_TAILS + (
    ("what a stupid piece of junk", "it is not good"), ("i hate this damn thing", "i do not like it"),
    ("this shitty thing is useless", "it is useless"),
)
PERSON_TAILS = GENERAL_TAILS + (
    ("what an idiot", "that is annoying"), ("what a moron", "this is frustrating"),
    ("such a jerk", "that is not nice"), ("what a loser", ""), ("i swear they are brain dead", ""),
    ("what a clueless idiot", "they do not know what they are doing"), ("pathetic", "that is disappointing"),
    ("screw them", "i am done with them"),
)


@dataclass(frozen=True)
class Situation:
    """Complaints that fit together: any subject with any problem, and the rude
    words and tails that suit them. A subject is (determiner, noun) so a rude
    word can go between the two."""

    subjects: tuple[tuple[str, str], ...]
    problems: tuple[str, ...]
    insults: tuple[str, ...]
    tails: tuple[tuple[str, str], ...]


SITUATIONS = (
    Situation(  # software and gadgets
        (("this", "printer"), ("my", "laptop"), ("the", "new update"), ("this", "app"), ("the", "website"),
         ("my", "phone"), ("the", "wifi"), ("this", "keyboard")),
        ("is broken again", "keeps crashing", "is so slow today", "froze in the middle of my work",
         "deleted my files", "never works when i need it", "will not turn on", "logged me out again"),
        THING_INSULTS, MACHINE_TAILS,
    ),
    Situation(  # household
        (("the", "heating"), ("this", "washing machine"), ("the", "fridge"), ("the", "elevator"),
         ("the", "shower"), ("this", "dishwasher")),
        ("stopped working again", "is leaking all over the floor", "makes a noise all night",
         "broke down after a week", "took three weeks to fix", "is falling apart"),
        THING_INSULTS, MACHINE_TAILS,
    ),
    Situation(  # transport
        (("the", "bus"), ("this", "train"), ("the", "subway"), ("this", "traffic jam"), ("the", "airport shuttle")),
        ("is late again", "has not moved for an hour", "skipped my stop", "is packed as usual",
         "made me miss my flight", "was cancelled without warning"),
        THING_INSULTS, GENERAL_TAILS,
    ),
    Situation(  # food
        (("this", "pizza"), ("the", "coffee here"), ("my", "soup"), ("the", "burger"), ("this", "cake"),
         ("the", "delivery")),
        ("is cold again", "tastes like cardboard", "took two hours to arrive", "is way too salty",
         "cost me twenty dollars", "is missing half the order"),
        THING_INSULTS, GENERAL_TAILS,
    ),
    Situation(  # weather
        (("this", "rain"), ("the", "weather"), ("this", "heat"), ("the", "wind"), ("this", "snow")),
        ("ruined my weekend", "will not stop", "cancelled our picnic", "is killing my plants",
         "flooded the street again", "kept me awake all night"),
        THING_INSULTS, GENERAL_TAILS,
    ),
    Situation(  # work
        (("my", "boss"), ("the", "manager"), ("my", "coworker"), ("the", "new intern"), ("our", "client"),
         ("the", "team lead")),
        ("never listens", "is late to every meeting", "took credit for my work", "keeps interrupting me",
         "forgot the deadline again", "changed the plan again", "sent me fifty emails today"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
    Situation(  # neighbours
        (("my", "neighbour"), ("the", "guy upstairs"), ("the", "woman next door"), ("our", "landlord")),
        ("plays loud music every night", "parked in my spot again", "never cleans up after the dog",
         "keeps slamming the door", "yelled at my kids", "blocked the driveway"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
    Situation(  # traffic
        (("that", "driver"), ("the", "cyclist"), ("this", "taxi driver"), ("the", "guy behind me")),
        ("cut me off", "ran the red light", "keeps honking at me", "almost hit me",
         "is driving in the wrong lane", "took my parking space"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
    Situation(  # sports
        (("the", "referee"), ("our", "coach"), ("that", "player"), ("the", "goalkeeper"), ("the", "umpire")),
        ("lost us the game", "ruined the whole match", "made a terrible mistake", "messed up in the final minute",
         "was awful all season", "argued with the fans again"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
    Situation(  # school
        (("the", "teacher"), ("my", "classmate"), ("the", "professor"), ("my", "roommate")),
        ("never answers my messages", "lost my notes", "was late again", "wasted the whole afternoon",
         "made me redo the whole project", "ignored my question"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
    Situation(  # shops and service
        (("the", "cashier"), ("the", "waiter"), ("the", "customer service guy"), ("the", "salesman")),
        ("ignored me for ten minutes", "charged me twice", "got my order wrong", "kept me waiting forever",
         "lied about the price", "was rude to my mother"),
        PERSON_INSULTS, PERSON_TAILS,
    ),
)
# Neutral clauses both versions keep, for variety in length; they fit any complaint.
ADDITIONS = (
    "", "", "", " and i am tired of it", " and nobody does anything about it", " and i have had enough",
    " and it is only monday", " and i still have to deal with it",
)
RUDE_PART_SHARE = 0.6  # chance that each rude part appears; every row gets at least one


def contains_rude_word(text: str) -> bool:
    return RUDE_WORD_PATTERN.search(text) is not None


def rude_word_rate(texts: list[str]) -> float:
    """Share of texts with a word of RUDE_LEXICON; compare a model's outputs
    with the same rate of the toxic inputs (`toxic_input_rude_word_rate`)."""
    return sum(contains_rude_word(t) for t in texts) / len(texts)


def toxic_input_rude_word_rate(rows: list[dict]) -> float:
    return rude_word_rate([row["en_toxic_comment"] for row in rows])


def character_ngrams(text: str, n: int) -> Counter:
    squeezed = "".join(text.split())
    return Counter(squeezed[start:start + n] for start in range(len(squeezed) - n + 1))


def chrf(hypotheses: list[str], references: list[str], max_order: int = 6, beta: float = 2.0) -> float:
    """Corpus-level chrF (Popovic 2015) on a 0..100 scale, as sacrebleu's corpus_chrf.

    Character n-grams of orders 1..max_order, whitespace removed, are matched
    and counted over the whole corpus; precision and recall are averaged over
    the orders that occur, then combined as an F-score in which recall weighs
    beta times as much as precision.
    """
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        hypothesis_total = reference_total = matched = 0
        for hypothesis, reference in zip(hypotheses, references, strict=True):
            hypothesis_grams, reference_grams = character_ngrams(hypothesis, n), character_ngrams(reference, n)
            hypothesis_total += sum(hypothesis_grams.values())
            reference_total += sum(reference_grams.values())
            matched += sum((hypothesis_grams & reference_grams).values())
        if hypothesis_total and reference_total:
            precisions.append(matched / hypothesis_total)
            recalls.append(matched / reference_total)
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


class DetoxTask(Task):
    name = "detox"
    hub_dataset = "s-nlp/paradetox"
    fields = ("en_toxic_comment", "en_neutral_comment")
    answer_field = "en_neutral_comment"
    prompt_template = "<Toxic>: {en_toxic_comment}\n<Neutral>:"
    max_new_tokens = 64
    metrics = ("chrf", "rude_word_rate", "exact_match")
    # chrF rises only when the output keeps the meaning and drops the rude
    # parts; rude_word_rate alone would reward an empty answer.
    headline_metric = "chrf"

    def make_row(self, rng: random.Random) -> dict:
        situation = rng.choice(SITUATIONS)
        determiner, noun = rng.choice(situation.subjects)
        problem = rng.choice(situation.problems) + rng.choice(ADDITIONS)
        opener = rng.choice(OPENERS) if rng.random() < RUDE_PART_SHARE else ("", "")
        tail = rng.choice(situation.tails) if rng.random() < RUDE_PART_SHARE else ("", "")
        no_other_rude_part = not opener[0] and not tail[0]
        insult = rng.choice(situation.insults) if no_other_rude_part or rng.random() < RUDE_PART_SHARE else ""
        toxic = [opener[0], " ".join(filter(None, (determiner, insult, noun, problem))), tail[0]]
        neutral = [opener[1], f"{determiner} {noun} {problem}", tail[1]]
        return {
            "en_toxic_comment": ", ".join(filter(None, toxic)),
            "en_neutral_comment": ", ".join(filter(None, neutral)),
        }

    def compute_metrics(self, predictions: list[str], rows: list[dict]) -> dict[str, float]:
        """chrf is corpus-level and on a 0..100 scale; the others are shares in 0..1."""
        references = self.references(rows)
        return {
            "chrf": chrf(predictions, references),
            "rude_word_rate": rude_word_rate(predictions),
            "exact_match": exact_match_rate(predictions, references),
        }
