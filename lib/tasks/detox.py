"""Detoxification, in the format of ParaDetox: rewrite a rude sentence politely,
keeping its meaning.

Rows are built from complaints (a subject and what is wrong with it) that both
versions share; the toxic version adds rude parts (a rude opener, a rude word
before the subject, an insulting tail) and the neutral version drops them or
says them politely. Text is lower case like most of ParaDetox.
"""

import functools
import importlib.util
import random
import re
from pathlib import Path
from collections import Counter
from dataclasses import dataclass

from .base import Task, exact_match_rate

# Words and phrases that make a sentence rude: the maintained list of the better-profanity package
# (916 words and spellings, less NOT_RUDE below) plus insults it leaves out (idiot, dumb, loser...),
# which real rude comments use as much as profanity. Every rude part below contains one; no neutral
# part does.
# Matched as whole words, ignoring case.
INSULTS = frozenset({
    "damn", "damned", "dammit", "goddamn", "hell", "crap", "crappy", "shit", "shitty", "bullshit",
    "stupid", "idiot", "idiots", "idiotic", "moron", "morons", "moronic", "dumb", "dumbass", "dumbasses",
    "jerk", "jerks", "loser", "losers", "freaking", "frigging", "bloody", "ass", "asshole", "assholes",
    "jackass", "bastard", "bastards", "screw", "screw you", "sucks", "suck", "pissed", "piss", "pisses",
    "brainless", "pathetic", "lousy", "piece of junk", "shut up", "wtf", "fuck", "fucking",
    "scumbag", "scumbags", "imbecile", "dipshit", "douchebag", "brain dead", "clueless idiot", "clown", "clowns",
    "retard", "retards", "retarded", "bitch", "bitches", "dick", "dicks",
})


# Words of better-profanity's list that ordinary and polite text uses (medicine, anatomy, history,
# drugs, identity, everyday words): counting them would call "he had a stroke" or "the nazi party" rude.
NOT_RUDE = frozenset({
    "len", "arian", "aryan", "areole", "drunk", "erect", "erotic", "facial", "fat", "god", "hemp", "heroin",
    "herpes", "hitler", "hiv", "homey", "hookah", "hooch", "kill", "leper", "lust", "lusty", "maxi", "menses",
    "meth", "murder", "naked", "napalm", "nazi", "nazism", "nude", "nudes", "opiate", "opium", "oral", "orally",
    "organ", "ovary", "ovum", "ovums", "pawn", "pcp", "pee", "penile", "penial", "pms", "pot", "potty", "prude",
    "pubic", "pubis", "racy", "rectal", "rectum", "rectus", "reich", "revue", "rum", "rump", "sadism", "sadist",
    "seaman", "seamen", "seduce", "sex", "sexual", "slave", "slope", "sniper", "snuff", "sperm", "steamy",
    "stoned", "strip", "stroke", "tampon", "teat", "teste", "testee", "testes", "testis", "thrust", "thug",
    "tinkle", "toots", "tramp", "trashy", "undies", "unwed", "urinal", "urine", "uterus", "uzi", "vagina",
    "valium", "viagra", "virgin", "vixen", "vodka", "vomit", "voyeur", "vulgar", "vulva", "weed", "womb",
    "woody", "xx", "yury", "gay", "gays", "queer", "queers", "lmao", "lmfao", "omg", "foobar", "ugly", "anus",
    "penis", "nipple", "labia", "glans", "gonad", "gonads", "hymen", "semen", "orgasm", "inbred", "incest",
    "molest", "rape", "raped", "raping", "rapist", "junkie", "junky", "paddy", "massa", "hebe", "willy",
})


@functools.cache
def rude_lexicon() -> frozenset[str]:
    """better-profanity's word list (read from the installed package's data file) without NOT_RUDE, and
    INSULTS."""
    spec = importlib.util.find_spec("better_profanity")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the detox metrics need the better-profanity package (pip install better-profanity)")
    wordlist = Path(list(spec.submodule_search_locations)[0]) / "profanity_wordlist.txt"
    words = {line.strip().lower() for line in wordlist.read_text(encoding="utf-8").splitlines() if line.strip()}
    return frozenset((words - NOT_RUDE) | INSULTS)


@functools.cache
def rude_word_pattern() -> re.Pattern:
    words = sorted(rude_lexicon(), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", flags=re.IGNORECASE)


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
JUDGEMENT_SHARE = 0.5  # share of rows that judge a person rather than complain about a situation
RUDE_PART_SHARE = 0.6  # chance that each rude part appears; every row gets at least one

# Judgements of people, the other half of real rude comments (forums, news comments): a subject, a rude
# predicate and its polite rewrite, which changes more than the rude word ("is a fucking idiot" ->
# "is not very smart"), and an optional reason both versions keep.
JUDGED = (
    "this guy", "that woman", "these people", "the president", "our mayor", "the author", "this reporter",
    "my ex", "the other team", "those politicians", "the admins", "the government", "this commenter",
    "the police", "my brother", "the landlord", "the company", "these trolls", "the critics", "the fans",
)
JUDGEMENTS = (  # (rude, polite), third person; the plural forms follow
    ("is a fucking idiot", "is not very smart"), ("is full of shit", "is not telling the truth"),
    ("can go to hell", "should leave"), ("is a lying piece of shit", "is lying"),
    ("is a stupid bitch", "is not nice"), ("is such a dick", "is very rude"),
    ("does not know shit", "does not know much"), ("is a complete moron", "is not thinking clearly"),
    ("is an asshole", "is unpleasant"), ("is a damn clown", "is not serious"),
    ("should shut the fuck up", "should be quiet"), ("is fucking useless", "is not helpful"),
    ("is a bunch of crap", "is not good"), ("screwed everything up", "made a mess of things"),
    ("is a dumbass", "made a poor decision"), ("acts like a retard", "acts unwisely"),
    ("is a pathetic loser", "is disappointing"), ("is a fucking joke", "is not credible"),
    ("pisses me off", "annoys me"), ("is a scumbag", "is dishonest"),
)
PLURAL_VERBS = {"is": "are", "does": "do", "acts": "act", "pisses": "piss", "screwed": "screwed",
                "should": "should", "can": "can"}
PLURAL_NOUNS = {"a fucking idiot": "fucking idiots", "a lying piece of shit": "lying pieces of shit",
                "a stupid bitch": "stupid bitches", "such a dick": "such dicks", "a complete moron": "complete morons",
                "an asshole": "assholes", "a damn clown": "damn clowns", "a bunch of crap": "a bunch of crap",
                "a dumbass": "dumbasses", "a retard": "retards", "a pathetic loser": "pathetic losers",
                "a fucking joke": "a fucking joke", "a scumbag": "scumbags", "not very smart": "not very smart"}
PLURAL_SUBJECTS = frozenset({"these people", "those politicians", "the admins", "the police", "the other team",
                             "these trolls", "the critics", "the fans"})
REASONS = (
    "", "", "", " and everyone knows it", " for saying that", " if they think this will work",
    " because they never read the facts", " after what happened yesterday", " and i am done listening",
    " with all these excuses", " for voting for this", " and should be ashamed",
)


def plural_predicate(predicate: str) -> str:
    """'is a fucking idiot' -> 'are fucking idiots': the predicate for a plural subject."""
    verb, _, rest = predicate.partition(" ")
    verb = PLURAL_VERBS.get(verb, verb)
    for singular, plural in PLURAL_NOUNS.items():
        if rest.startswith(singular):
            rest = plural + rest[len(singular):]
            break
    return f"{verb} {rest}"


def judgement_row(rng: random.Random) -> tuple[str, str]:
    subject = rng.choice(JUDGED)
    rude, polite = rng.choice(JUDGEMENTS)
    if subject in PLURAL_SUBJECTS:
        rude, polite = plural_predicate(rude), plural_predicate(polite)
    reason = rng.choice(REASONS)
    return f"{subject} {rude}{reason}", f"{subject} {polite}{reason}"


def contains_rude_word(text: str) -> bool:
    return rude_word_pattern().search(text) is not None


def rude_word_rate(texts: list[str]) -> float:
    """Share of texts with a word of rude_lexicon(); compare a model's outputs
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
    notebook = "03_detoxify_text.ipynb"  # rendered from notebooks/templates by tools/render_notebooks.py, run by jobs/finetune_detox.py
    title = "detoxification"
    hub_dataset = "s-nlp/paradetox"
    fields = ("en_toxic_comment", "en_neutral_comment")
    answer_field = "en_neutral_comment"
    prompt_template = "<Toxic>: {en_toxic_comment}\n<Neutral>:"
    chat_request = "Rewrite this text politely, keeping its meaning:\n{en_toxic_comment}"
    max_new_tokens = 64
    metrics = ("chrf", "rude_word_rate", "copy_rate", "exact_match")
    # chrF rises only when the output keeps the meaning and drops the rude
    # parts; rude_word_rate alone would reward an empty answer.
    headline_metric = "chrf"
    recipes = {
        "cpu": dict(train_rows=500, max_seq_length=256, batch_size=2, learning_rate=1e-3),
        "gpu": dict(train_rows=10000, max_seq_length=256, batch_size=16, learning_rate=1e-3, num_epochs=1.0,
                    eval_rows=300),
    }
    chart_scale = {"chrf": 100.0}  # chrF is a 0-100 score

    def make_row(self, rng: random.Random) -> dict:
        if rng.random() < JUDGEMENT_SHARE:
            toxic, neutral = judgement_row(rng)
            return {"en_toxic_comment": toxic, "en_neutral_comment": neutral}
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
        inputs = [row["en_toxic_comment"] for row in rows]
        return {
            "chrf": chrf(predictions, references),
            "rude_word_rate": rude_word_rate(predictions),
            "copy_rate": exact_match_rate(predictions, inputs),  # outputs that repeat the input unchanged
            "exact_match": exact_match_rate(predictions, references),
        }

    def baselines(self, rows: list[dict]) -> dict[str, list[str]]:
        """Copying the input scores a high chrF on real data (most of a sentence survives a rewrite): an
        adapter is only useful where it beats this row."""
        return {"copy the input": [row["en_toxic_comment"] for row in rows]}
