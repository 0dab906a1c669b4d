"""Instruction following, in the format of GPTeacher-General-Instruct, with
answers that can be checked.

Every kind of instruction is a deterministic transformation of its input
(reorder a list, count words, pull out an email), a lookup in a small fixed
table (opposites, plurals, sums of two digits), or a multi-line answer in the
shapes real instruction data uses (numbered and bulleted lists, short Python and
JavaScript functions, a formatted SQL query, a greeting in a role): a
135M-parameter model can learn these from a few hundred examples, and exact
match (whitespace normalized) can grade them.
Case conversion is left out on purpose: exact match ignores case, so it could
not tell a right answer from a copy of the input.
"""

import random
import re

from .base import Task, exact_match_rate

WORDS = (
    "apple", "river", "candle", "window", "pencil", "garden", "rocket", "violin", "blanket", "mirror",
    "tiger", "orange", "bridge", "cloud", "forest", "hammer", "island", "jacket", "kettle", "lemon",
    "marble", "needle", "ocean", "pillow", "quilt", "saddle", "tunnel", "umbrella", "valley", "wagon",
    "yogurt", "zebra", "anchor", "basket", "cactus", "dragon", "engine", "feather", "guitar", "helmet",
    "igloo", "jungle", "ladder", "magnet", "noodle", "parrot", "rabbit", "sandal", "teapot", "walnut",
)
FIRST_NAMES = (
    "anna", "ben", "carla", "diego", "emma", "farid", "grace", "hugo", "ines", "jonas", "keiko", "liam",
    "maya", "nora", "omar", "paula", "ravi", "sofia", "tom", "yuki",
)
LAST_NAMES = ("smith", "garcia", "chen", "novak", "okafor", "rossi", "berg", "silva", "kim", "moreau")
EMAIL_DOMAINS = ("example.com", "mail.org", "company.net", "school.edu", "shop.io", "post.co")
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("tall", "short"),
    ("young", "old"), ("rich", "poor"), ("early", "late"), ("easy", "difficult"), ("strong", "weak"),
    ("wet", "dry"), ("full", "empty"), ("open", "closed"), ("clean", "dirty"), ("loud", "quiet"),
    ("hard", "soft"), ("thick", "thin"), ("high", "low"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("true", "false"), ("wide", "narrow"), ("deep", "shallow"), ("heavy", "light"), ("polite", "rude"),
    ("smooth", "rough"), ("right", "wrong"), ("near", "far"), ("good", "bad"), ("beautiful", "ugly"),
    ("awake", "asleep"), ("alive", "dead"), ("public", "private"), ("simple", "complex"),
    ("positive", "negative"), ("ancient", "modern"), ("sharp", "dull"), ("brave", "cowardly"),
)
# Words whose opposite is not unique (old: young or new; light: heavy or dark): asked about only from the
# other side of their pair, so every question has one right answer.
AMBIGUOUS = frozenset({"old", "short", "light", "right", "hard", "dull", "small", "thin",
                       "slow", "rough", "modern", "quiet", "dead", "low", "simple"})
PLURALS = (
    ("child", "children"), ("mouse", "mice"), ("city", "cities"), ("box", "boxes"), ("knife", "knives"),
    ("tooth", "teeth"), ("foot", "feet"), ("man", "men"), ("woman", "women"), ("person", "people"),
    ("goose", "geese"), ("leaf", "leaves"), ("wolf", "wolves"), ("baby", "babies"), ("bus", "buses"),
    ("dish", "dishes"), ("church", "churches"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("cactus", "cacti"),
    ("half", "halves"), ("life", "lives"), ("story", "stories"), ("party", "parties"), ("glass", "glasses"),
    ("watch", "watches"), ("fox", "foxes"), ("ox", "oxen"), ("house", "houses"), ("book", "books"),
    ("key", "keys"), ("toy", "toys"), ("shelf", "shelves"), ("loaf", "loaves"),
)
SEPARATORS = (("hyphen", "-"), ("underscore", "_"), ("slash", "/"), ("plus sign", "+"))


def word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def reverse_list(rng):
    items = word_list(rng)
    instruction = rng.choice((
        "Reverse the order of the words in this list.", "List these items in reverse order.",
        "Write the following words backwards, starting from the last one.", "Put these words in the opposite order.",
    ))
    return instruction, ", ".join(items), ", ".join(reversed(items))


def sort_list(rng):
    items = word_list(rng)
    instruction = rng.choice((
        "Sort these words alphabetically.", "Put the following words in alphabetical order.",
        "Arrange this list from A to Z.",
    ))
    return instruction, ", ".join(items), ", ".join(sorted(items))


def first_item(rng):
    items = word_list(rng)
    instruction = rng.choice((
        "What is the first item in this list?", "Return the first word of the list.",
        "Which word comes first in the following list?",
    ))
    return instruction, ", ".join(items), items[0]


def last_item(rng):
    items = word_list(rng)
    instruction = rng.choice((
        "What is the last item in this list?", "Return the final word of the list.",
        "Which word comes last in the following list?",
    ))
    return instruction, ", ".join(items), items[-1]


def count_words(rng):
    words = rng.sample(WORDS, rng.randint(2, 7))
    instruction = rng.choice((
        "How many words are in the following text?", "Count the words in this sentence.",
        "Tell me the number of words in the text below.",
    ))
    return instruction, " ".join(words), str(len(words))


def join_words(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    separator_name, separator = rng.choice(SEPARATORS)
    instruction = rng.choice((
        f"Join these words with a {separator_name}.", f"Combine the following words using a {separator_name}.",
        f"Connect the words below with a {separator_name} between each pair.",
    ))
    return instruction, " ".join(words), separator.join(words)


def extract_email(rng):
    name = rng.choice(FIRST_NAMES)
    address = rng.choice((name, f"{name}.{rng.choice(LAST_NAMES)}")) + "@" + rng.choice(EMAIL_DOMAINS)
    sentence = rng.choice((
        f"Please send the report to {address} before Friday.", f"You can reach {name.title()} at {address}.",
        f"Contact {address} for more information.", f"My new address is {address}, please update it.",
        f"Questions about the order go to {address} and nowhere else.",
    ))
    instruction = rng.choice((
        "Extract the email address from the text.", "What email address is mentioned here?",
        "Find the email address in the following sentence.",
    ))
    return instruction, sentence, address


def extract_number(rng):
    number = rng.randint(1, 500)
    sentence = rng.choice((
        f"The train leaves from platform {number} tonight.", f"She bought {number} apples at the market.",
        f"Our team scored {number} points last season.", f"The room number is {number}.",
        f"We planted {number} trees along the river.", f"The package weighs {number} grams.",
    ))
    instruction = rng.choice((
        "What number appears in this sentence?", "Extract the number from the text.",
        "Find the number mentioned below.",
    ))
    return instruction, sentence, str(number)


def opposite(rng):
    word, answer = rng.choice(OPPOSITES)[::rng.choice((1, -1))]
    if word in AMBIGUOUS:
        word, answer = answer, word
    if rng.random() < 0.5:
        instruction = rng.choice((
            "What is the opposite of the following word?", "Give an antonym for this word.",
            "Write the opposite of the word below.",
        ))
        return instruction, word, answer
    instruction = rng.choice((f'What is the opposite of "{word}"?', f"Give the opposite of the word {word}."))
    return instruction, "", answer


def plural(rng):
    noun, answer = rng.choice(PLURALS)
    if rng.random() < 0.5:
        instruction = rng.choice((
            "Write the plural form of this noun.", "What is the plural of the following word?",
            "Give the plural of the noun below.",
        ))
        return instruction, noun, answer
    instruction = rng.choice((f"What is the plural of {noun}?", f'Write the plural of "{noun}".'))
    return instruction, "", answer


def add_digits(rng):
    first, second = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        instruction = rng.choice(("Add these two numbers.", "What is the sum of the following numbers?"))
        return instruction, f"{first} and {second}", str(first + second)
    instruction = rng.choice((f"What is {first} plus {second}?", f"Add {first} and {second}."))
    return instruction, "", str(first + second)


# Multi-line answers, in the shapes real instruction data uses most (GPTeacher's code and role-play rows):
# lists one item a line, short functions, a formatted query, a greeting in a role.
def numbered_list(rng):
    items = word_list(rng)
    instruction = rng.choice(("List these items one per line, numbered.", "Number the following items, one a line.",
                              "Turn this into a numbered list."))
    return instruction, ", ".join(items), "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def bullet_list(rng):
    items = word_list(rng)
    instruction = rng.choice(("Write each word on its own line as a bullet point.", "Make a bulleted list of these words."))
    return instruction, " ".join(items), "\n".join(f"- {item}" for item in items)


FUNCTIONS = (  # (what it returns, name, Python body, JavaScript body)
    ("the sum of a list of numbers", "total", "return sum(values)", "return values.reduce((a, b) => a + b, 0);"),
    ("the largest number in a list", "largest", "return max(values)", "return Math.max(...values);"),
    ("the smallest number in a list", "smallest", "return min(values)", "return Math.min(...values);"),
    ("the number of items in a list", "count_items", "return len(values)", "return values.length;"),
    ("the first item of a list", "first_item", "return values[0]", "return values[0];"),
    ("a list in reverse order", "reverse_list", "return values[::-1]", "return [...values].reverse();"),
    ("a list sorted from smallest to largest", "sort_list", "return sorted(values)",
     "return [...values].sort((a, b) => a - b);"),
)


def write_function(rng):
    purpose, name, python_body, javascript_body = rng.choice(FUNCTIONS)
    language = rng.choice(("Python", "JavaScript"))
    instruction = rng.choice((f"Write a {language} function that returns {purpose}.",
                              f"Create a {language} function named {name} that returns {purpose}."))
    if language == "Python":
        return instruction, "", f"def {name}(values):\n    {python_body}"
    camel = re.sub(r"_(\w)", lambda match: match.group(1).upper(), name)
    return instruction, "", f"function {camel}(values) {{\n  {javascript_body}\n}}"


def write_query(rng):
    table = rng.choice(("employees", "orders", "students", "products", "customers"))
    column = rng.choice(("age", "price", "salary", "score", "quantity"))
    number = rng.randint(2, 99) * 10
    instruction = rng.choice(("Write a SQL query for this request.", "Translate the request into SQL."))
    request = f"select every row of {table} whose {column} is greater than {number}, highest {column} first"
    return instruction, request, f"SELECT *\nFROM {table}\nWHERE {column} > {number}\nORDER BY {column} DESC;"


ROLES = (("librarian", "city library", "find a book"), ("chef", "restaurant", "choose a dish"),
         ("tour guide", "old town", "plan your visit"), ("pharmacist", "pharmacy", "find the right medicine"),
         ("park ranger", "national park", "pick a trail"), ("shopkeeper", "bookshop", "find a gift"))


def greet_in_role(rng):
    role, place, help_with = rng.choice(ROLES)
    visitor = rng.choice(FIRST_NAMES).title()
    instruction = f"You are a {role}. Greet the visitor by name and offer your help."
    response = f"Hello {visitor}, and welcome to the {place}!\nI am the {role} here, and I would be glad to help you {help_with}."
    return instruction, f"The visitor is {visitor}.", response


KINDS = (
    reverse_list, sort_list, first_item, last_item, count_words, join_words, extract_email, extract_number,
    opposite, plural, add_digits, numbered_list, bullet_list, write_function, write_query, greet_in_role,
)


def word_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits, the tokens ROUGE compares."""
    return re.findall(r"[a-z0-9]+", text.lower())


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: the longest common subsequence of word tokens,
    as precision over the prediction and recall over the reference."""
    predicted, expected = word_tokens(prediction), word_tokens(reference)
    common = longest_common_subsequence(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


class InstructionTask(Task):
    name = "instruction"
    notebook = "01_instruction_following.ipynb"  # rendered from notebooks/templates by tools/render_notebooks.py, run by jobs/finetune_instruction.py
    title = "instruction-following"
    hub_dataset = "teknium/GPTeacher-General-Instruct"
    fields = ("instruction", "input", "response")
    optional_fields = ("input",)  # most instructions need no input
    answer_field = "response"
    prompt_template = "<Instruction>: {instruction}\n<Input>: {input}\n<Response>:"
    chat_request = "{instruction}\n\n{input}"
    max_new_tokens = 256  # real answers run to paragraphs and code
    metrics = ("exact_match", "rouge_l")
    headline_metric = "rouge_l"  # real answers are long: overlap, not identity
    recipes = {
        "cpu": dict(train_rows=1200, max_seq_length=256, batch_size=2, learning_rate=1e-3),
        "gpu": dict(train_rows=6000, max_seq_length=1024, batch_size=16, learning_rate=5e-4, num_epochs=1.0,
                    eval_rows=100),
    }

    def make_row(self, rng: random.Random) -> dict:
        instruction, input_text, response = rng.choice(KINDS)(rng)
        return {"instruction": instruction, "input": input_text, "response": response}

    def compute_metrics(self, predictions: list[str], rows: list[dict]) -> dict[str, float]:
        """exact_match ignores case and surrounding whitespace and punctuation;
        rouge_l is the mean ROUGE-L F1 over rows."""
        references = self.references(rows)
        rouge_scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
        return {
            "exact_match": exact_match_rate(predictions, references),
            "rouge_l": sum(rouge_scores) / len(rouge_scores),
        }
