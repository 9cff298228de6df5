"""Demonstration tasks in the Super-NaturalInstructions layout, generated from rules.

``python -m data_prep.demo --out DIR`` writes ``DIR/tasks/<task>.json`` (S-NI's fields: Definition, Positive
Examples, Instances, Categories, languages, ...) and ``DIR/splits/default/{train,test,excluded}_tasks.txt``; the
real S-NI prep (``python -m data_prep.sni --src DIR ...``) turns them into episodes. ``hypertrain demo`` uses it.

There are 42 tasks in four families (string edits, arithmetic, classification by rule, word lists), each a small
deterministic function with a one-sentence definition, so that a hypernetwork really has to read the
definition and the examples to tell them apart; the held-out test tasks are siblings of training tasks (last
letter vs. first letter, minimum vs. maximum, ...). The output depends only on ``--seed`` and the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import string
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Example = tuple[str, str]
Generator = Callable[[random.Random], Example]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


WORDS = _words(
    "apple river stone cloud garden window pencil rabbit orange silver candle forest bridge planet ladder "
    "basket mirror rocket castle dragon marble pillow summer winter butter circle doctor engine flower guitar "
    "hammer island jacket kitten lemon magnet needle ocean parrot quilt ribbon saddle tiger violin wagon "
    "yellow zebra anchor button carpet desert feather ginger harbor jungle kettle lantern meadow nickel "
    "oyster pepper rainbow sunset tunnel umbrella velvet walnut bottle cactus dinner elbow falcon "
    "cat dog sun map cup pen box hat bag egg fox owl bee ant cow pig ram yak elk bat"
)
ANIMALS = _words("cat dog fox owl bee ant cow pig rabbit tiger zebra kitten parrot falcon dragon horse mouse goat sheep duck")
FOODS = _words("apple orange lemon butter pepper ginger walnut bread cheese rice pasta soup cake pie carrot onion grape melon plum honey")
POSITIVE = _words("good great lovely nice wonderful happy excellent fun")
NEGATIVE = _words("bad awful terrible sad boring poor horrible ugly")
NEUTRAL = _words("the movie was and the food felt quite very really today our trip this place staff")
VOWELS = set("aeiou")


def _word(rng: random.Random, min_len: int = 2) -> str:
    while True:
        word = rng.choice(WORDS)
        if len(word) >= min_len:
            return word


def _sentence(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(low, high)))


def _numbers(rng: random.Random, low: int = 3, high: int = 6, top: int = 99) -> list[int]:
    return [rng.randint(0, top) for _ in range(rng.randint(low, high))]


def _list_text(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


# --------------------------------------------------------------------------------------------------
# Tasks: (name, family, definition, generator)
# --------------------------------------------------------------------------------------------------


def _palindrome(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        half = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 3)))
        word = half + (rng.choice(string.ascii_lowercase) if rng.random() < 0.5 else "") + half[::-1]
    else:
        word = _word(rng, 3)
    return word, "yes" if word == word[::-1] else "no"


def _sentiment(rng: random.Random) -> Example:
    words = rng.sample(NEUTRAL, rng.randint(3, 5))
    positive = rng.random() < 0.5
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words), "positive" if positive else "negative"


def _animal_or_food(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        return rng.choice(ANIMALS), "animal"
    return rng.choice(FOODS), "food"


def _question(rng: random.Random) -> Example:
    sentence = _sentence(rng)
    if rng.random() < 0.5:
        return sentence + "?", "question"
    return sentence + ".", "statement"


def _caesar(word: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)


def _two(rng: random.Random, top: int = 50) -> tuple[int, int]:
    return rng.randint(0, top), rng.randint(0, top)


STRING, MATH, CLASSIFY, WORDLIST = "String Edits", "Arithmetic", "Classification By Rule", "Word Lists"


def _task_table() -> list[tuple[str, str, str, Generator]]:
    def word_task(fn: Callable[[str], str], min_len: int = 2) -> Generator:
        def make(rng: random.Random) -> Example:
            word = _word(rng, min_len)
            return word, fn(word)

        return make

    def sentence_task(fn: Callable[[list[str]], str], low: int = 3, high: int = 6) -> Generator:
        def make(rng: random.Random) -> Example:
            words = rng.sample(WORDS, rng.randint(low, high))
            return " ".join(words), fn(words)

        return make

    def list_task(fn: Callable[[list[int]], str]) -> Generator:
        def make(rng: random.Random) -> Example:
            values = _numbers(rng)
            return _list_text(values), fn(values)

        return make

    def pair_task(fn: Callable[[int, int], str], fmt: str, top: int = 50) -> Generator:
        def make(rng: random.Random) -> Example:
            a, b = _two(rng, top)
            return fmt.format(a=a, b=b), fn(a, b)

        return make

    def number_task(fn: Callable[[int], str], top: int = 99) -> Generator:
        def make(rng: random.Random) -> Example:
            n = rng.randint(0, top)
            return str(n), fn(n)

        return make

    return [
        # string edits
        ("reverse_word", STRING, "Reverse the letters of the given word", word_task(lambda w: w[::-1])),
        ("uppercase_word", STRING, "Write the given word in capital letters", word_task(str.upper)),
        ("remove_vowels", STRING, "Remove every vowel (a, e, i, o, u) from the given word",
         word_task(lambda w: "".join(c for c in w if c not in VOWELS) or "-", 3)),
        ("double_letters", STRING, "Write every letter of the given word twice", word_task(lambda w: "".join(c * 2 for c in w))),
        ("sort_letters", STRING, "Sort the letters of the given word in alphabetical order", word_task(lambda w: "".join(sorted(w)))),
        ("first_letter", STRING, "Return the first letter of the given word", word_task(lambda w: w[0])),
        ("last_letter", STRING, "Return the last letter of the given word", word_task(lambda w: w[-1])),
        ("dash_letters", STRING, "Put a dash between every two letters of the given word", word_task("-".join)),
        ("repeat_word", STRING, "Repeat the given word three times, separated by spaces", word_task(lambda w: " ".join([w] * 3))),
        ("swap_ends", STRING, "Swap the first and the last letter of the given word",
         word_task(lambda w: w[-1] + w[1:-1] + w[0], 3)),
        ("next_letter", STRING, "Replace every letter of the given word with the next letter of the alphabet (z becomes a)",
         word_task(_caesar)),
        ("add_ing", STRING, "Add the ending 'ing' to the given word", word_task(lambda w: w + "ing")),
        ("capitalize_words", STRING, "Capitalize the first letter of every word of the given sentence",
         sentence_task(lambda ws: " ".join(w.capitalize() for w in ws))),
        ("remove_spaces", STRING, "Remove all spaces from the given sentence", sentence_task(lambda ws: "".join(ws), 2, 4)),
        # arithmetic
        ("add_numbers", MATH, "Add the two given numbers and answer with the sum", pair_task(lambda a, b: str(a + b), "{a} and {b}")),
        ("subtract_numbers", MATH, "Subtract the second number from the first and answer with the result",
         pair_task(lambda a, b: str(a - b), "{a} and {b}")),
        ("multiply_digits", MATH, "Multiply the two given numbers", pair_task(lambda a, b: str(a * b), "{a} times {b}", 9)),
        ("max_of_list", MATH, "Return the largest number of the given list", list_task(lambda v: str(max(v)))),
        ("min_of_list", MATH, "Return the smallest number of the given list", list_task(lambda v: str(min(v)))),
        ("sum_of_list", MATH, "Add up all numbers of the given list", list_task(lambda v: str(sum(v)))),
        ("count_numbers", MATH, "Count how many numbers the given list holds", list_task(lambda v: str(len(v)))),
        ("next_number", MATH, "Answer with the number that comes right after the given number", number_task(lambda n: str(n + 1))),
        ("double_number", MATH, "Multiply the given number by two", number_task(lambda n: str(2 * n))),
        ("digit_sum", MATH, "Add up the digits of the given number", number_task(lambda n: str(sum(map(int, str(n)))), 999)),
        # classification by rule
        ("sentiment_by_keyword", CLASSIFY,
         f"Classify the review as 'positive' if it contains one of the words {', '.join(POSITIVE)}, otherwise as 'negative'",
         _sentiment),
        ("even_or_odd", CLASSIFY, "Answer 'even' if the given number is even and 'odd' if it is odd",
         number_task(lambda n: "even" if n % 2 == 0 else "odd")),
        ("is_palindrome", CLASSIFY, "Answer 'yes' if the given word reads the same backwards, otherwise 'no'", _palindrome),
        ("starts_with_vowel", CLASSIFY, "Answer 'yes' if the given word starts with a vowel, otherwise 'no'",
         word_task(lambda w: "yes" if w[0] in VOWELS else "no")),
        ("high_or_low", CLASSIFY, "Answer 'high' if the given number is greater than 50, otherwise 'low'",
         number_task(lambda n: "high" if n > 50 else "low")),
        ("question_or_statement", CLASSIFY, "Answer 'question' if the sentence ends with a question mark, otherwise 'statement'",
         _question),
        ("animal_or_food", CLASSIFY, "Classify the given word as 'animal' or 'food'", _animal_or_food),
        ("larger_number", CLASSIFY, "Answer 'first' if the first number is larger than the second, otherwise 'second'",
         pair_task(lambda a, b: "first" if a > b else "second", "{a} and {b}")),
        ("long_or_short", CLASSIFY, "Answer 'long' if the given word has more than five letters, otherwise 'short'",
         word_task(lambda w: "long" if len(w) > 5 else "short")),
        ("contains_letter_e", CLASSIFY, "Answer 'yes' if the given word contains the letter e, otherwise 'no'",
         word_task(lambda w: "yes" if "e" in w else "no")),
        # word lists
        ("first_word", WORDLIST, "Return the first word of the given sentence", sentence_task(lambda ws: ws[0])),
        ("last_word", WORDLIST, "Return the last word of the given sentence", sentence_task(lambda ws: ws[-1])),
        ("count_words", WORDLIST, "Count the words of the given sentence", sentence_task(lambda ws: str(len(ws)), 2, 8)),
        ("sort_words", WORDLIST, "Sort the words of the given sentence alphabetically", sentence_task(lambda ws: " ".join(sorted(ws)))),
        ("reverse_word_order", WORDLIST, "Write the words of the given sentence in reverse order",
         sentence_task(lambda ws: " ".join(reversed(ws)))),
        ("longest_word", WORDLIST, "Return the longest word of the given sentence (the first one if there is a tie)",
         sentence_task(lambda ws: max(ws, key=len))),
        ("join_with_commas", WORDLIST, "Join the words of the given sentence with commas instead of spaces",
         sentence_task(lambda ws: ",".join(ws))),
        ("second_word", WORDLIST, "Return the second word of the given sentence", sentence_task(lambda ws: ws[1])),
    ]


TASKS: dict[str, tuple[str, str, Generator]] = {name: (family, definition, fn) for name, family, definition, fn in _task_table()}
FAMILIES = (STRING, MATH, CLASSIFY, WORDLIST)
DEFAULT_TEST_TASKS = ("last_letter", "swap_ends", "min_of_list", "double_number", "high_or_low",
                      "contains_letter_e", "last_word", "reverse_word_order")


def task_name(short: str) -> str:
    """The S-NI-style task name of a demo task (``demo_reverse_word``)."""
    return f"demo_{short}"


@dataclasses.dataclass
class DemoTasksConfig:
    """Options of ``python -m data_prep.demo``."""

    out: str
    seed: int = 0
    instances_per_task: int = 100
    num_train_tasks: int = 0
    """Training tasks to write (0: all 34); taken round-robin over the families so a few stay varied."""
    num_test_tasks: int = 0
    """Held-out test tasks to write (0: all 8 of DEFAULT_TEST_TASKS)."""
    train_names: tuple[str, ...] = ()
    """Explicit training tasks (short names of :data:`TASKS`), instead of the default split."""
    test_names: tuple[str, ...] = ()
    """Explicit test tasks; with ``train_names`` they may overlap (unseen instances of training tasks come from
    another ``seed``)."""

    def __post_init__(self) -> None:
        if self.instances_per_task < 4:
            raise ValueError(f"instances_per_task: must be >= 4, got {self.instances_per_task}")
        if self.num_train_tasks < 0 or self.num_test_tasks < 0:
            raise ValueError("num_train_tasks and num_test_tasks must be >= 0 (0: all)")
        unknown = [n for n in (*self.train_names, *self.test_names) if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown demo task(s) {unknown}; known: {', '.join(TASKS)}")


def _round_robin(names: Sequence[str]) -> list[str]:
    """``names`` reordered family by family (first of each family, then second, ...), keeping table order."""
    by_family = {family: [n for n in names if TASKS[n][0] == family] for family in FAMILIES}
    ordered: list[str] = []
    while any(by_family.values()):
        for family in FAMILIES:
            if by_family[family]:
                ordered.append(by_family[family].pop(0))
    return ordered


def split_tasks(cfg: DemoTasksConfig) -> tuple[list[str], list[str]]:
    """(training tasks, held-out test tasks), short names."""
    if cfg.train_names or cfg.test_names:
        return list(cfg.train_names), list(cfg.test_names)
    test = _round_robin(DEFAULT_TEST_TASKS)
    train = _round_robin([n for n in TASKS if n not in DEFAULT_TEST_TASKS])
    if cfg.num_train_tasks:
        train = train[: cfg.num_train_tasks]
    if cfg.num_test_tasks:
        test = test[: cfg.num_test_tasks]
    return train, test


def task_record(short: str, seed: int, instances: int) -> dict:
    """One task file's content: definition, two positive examples and ``instances`` distinct instances."""
    family, definition, make = TASKS[short]
    rng = random.Random(f"{seed}/{short}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < instances + 2 and attempts < 50 * (instances + 2):
        attempts += 1
        source, target = make(rng)
        if source not in seen:
            seen.add(source)
            examples.append((source, target))
    if len(examples) < instances + 2:
        examples += [make(rng) for _ in range(instances + 2 - len(examples))]  # few distinct inputs: allow repeats
    positives, rows = examples[:2], examples[2:]
    name = task_name(short)
    return {
        "Contributors": ["hypertrain data_prep.demo"],
        "Source": ["generated"],
        "URL": [""],
        "Categories": [family],
        "Reasoning": [],
        "Definition": [f"{definition}."],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Demo"],
        "Positive Examples": [
            {"input": source, "output": target, "explanation": "Follows the rule of the definition."}
            for source, target in positives
        ],
        "Negative Examples": [],
        "Instances": [
            {"id": f"{name}-{index:04d}", "input": source, "output": [target]} for index, (source, target) in enumerate(rows)
        ],
        "Instance License": ["CC0"],
    }


def generate(cfg: DemoTasksConfig) -> tuple[list[str], list[str]]:
    """Write the task files and split lists under ``cfg.out``; returns the (train, test) task names."""
    out = Path(cfg.out)
    train, test = split_tasks(cfg)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    splits = out / "splits" / "default"
    splits.mkdir(parents=True, exist_ok=True)
    for short in dict.fromkeys(train + test):
        record = task_record(short, cfg.seed, cfg.instances_per_task)
        (out / "tasks" / f"{task_name(short)}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    train_names, test_names = [task_name(t) for t in train], [task_name(t) for t in test]
    (splits / "train_tasks.txt").write_text("\n".join(train_names) + "\n", encoding="utf-8")
    (splits / "test_tasks.txt").write_text("\n".join(test_names) + "\n", encoding="utf-8")
    (splits / "excluded_tasks.txt").write_text("", encoding="utf-8")
    (out / "README.md").write_text(
        "Demonstration tasks generated by `python -m data_prep.demo` (S-NI layout: tasks/, splits/default/).\n"
        f"seed {cfg.seed}, {cfg.instances_per_task} instances per task, {len(train)} training and {len(test)} "
        "held-out test tasks.\n",
        encoding="utf-8",
    )
    return train_names, test_names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.splitlines()[0])
    defaults = DemoTasksConfig(out="")
    parser.add_argument("--out", required=True, help="directory to write tasks/ and splits/ into")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (default: %(default)s)")
    parser.add_argument("--instances-per-task", type=int, default=defaults.instances_per_task,
                        help="instances per task (default: %(default)s)")
    parser.add_argument("--num-train-tasks", type=int, default=0, help="training tasks (default: all 34)")
    parser.add_argument("--num-test-tasks", type=int, default=0, help="held-out test tasks (default: all 8)")
    args = parser.parse_args(argv)
    try:
        cfg = DemoTasksConfig(**vars(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train, test = generate(cfg)
    print(f"wrote {len(train)} training and {len(test)} test tasks to {cfg.out} "
          f"(prepare them with: python -m data_prep.sni --src {cfg.out} --split train|test --out ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
