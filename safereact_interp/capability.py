"""Capability problems: multi-step arithmetic and logic with checkable answers.

The capability role C of the toolkit needs problems whose answers a program can check, and the
bundled model organism needs worked chain-of-thought solutions to learn from. One generator makes
both: each `Problem` carries its text, its answer and the reasoning steps that reach it, and
`solution_text` renders those steps as a think block in one of several phrasings, so the
post-trained organism learns to reason rather than to copy one template.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

NAMES = (
    "Ana", "Ben", "Carla", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kira", "Leo",
    "Maya", "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Wes", "Yara",
)
ITEMS = (
    ("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("ticket", "tickets"),
    ("sticker", "stickers"), ("marble", "marbles"), ("cookie", "cookies"), ("card", "cards"),
    ("book", "books"), ("shell", "shells"),
)


@dataclass(frozen=True)
class Problem:
    """A capability problem: the question, its answer and the steps of a worked solution."""

    text: str
    answer: str
    steps: tuple[str, ...]
    kind: str
    choices: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"text": self.text, "answer": self.answer, "steps": list(self.steps),
                "kind": self.kind, "choices": list(self.choices)}


def _shopping(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    count, price, extra = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
    cost = count * price + extra
    paid = (cost // 10 + 1) * 10 + rng.choice((0, 10))
    text = (f"{name} buys {count} {items} at {price} dollars each and a bag for {extra} dollars, "
            f"and pays with {paid} dollars. How much change does {name} get?")
    steps = (f"The {items} cost {count} × {price} = {count * price} dollars.",
             f"With the bag the total is {count * price} + {extra} = {cost} dollars.",
             f"The change is {paid} − {cost} = {paid - cost} dollars.")
    return Problem(text, str(paid - cost), steps, "shopping")


def _expression(rng: random.Random) -> Problem:
    a, b, c, d = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 6), rng.randint(1, 20)
    total = a + b
    product = total * c
    if rng.random() < 0.5:
        text = f"Calculate ({a} + {b}) × {c} − {d}."
        result = product - d
        last = f"Then {product} − {d} = {result}."
    else:
        text = f"Calculate ({a} + {b}) × {c} + {d}."
        result = product + d
        last = f"Then {product} + {d} = {result}."
    steps = (f"Inside the brackets, {a} + {b} = {total}.", f"Next, {total} × {c} = {product}.", last)
    return Problem(text, str(result), steps, "expression")


def _rows(rng: random.Random) -> Problem:
    rows, per_row, broken = rng.randint(3, 9), rng.randint(3, 9), rng.randint(1, 8)
    total = rows * per_row
    text = (f"A hall has {rows} rows of {per_row} chairs. {broken} chairs are broken. "
            "How many chairs can be used?")
    steps = (f"There are {rows} × {per_row} = {total} chairs.",
             f"Without the broken ones, {total} − {broken} = {total - broken} chairs can be used.")
    return Problem(text, str(total - broken), steps, "rows")


def _ages(rng: random.Random) -> Problem:
    first, second, third = rng.sample(NAMES, 3)
    youngest, factor, gap = rng.randint(3, 12), rng.randint(2, 3), rng.randint(1, 9)
    middle = youngest * factor
    oldest = middle + gap
    word = "twice" if factor == 2 else "three times"
    text = (f"{third} is {youngest} years old. {second} is {word} as old as {third}, and {first} is "
            f"{gap} years older than {second}. How old is {first}?")
    steps = (f"{second} is {factor} × {youngest} = {middle} years old.",
             f"{first} is {middle} + {gap} = {oldest} years old.")
    return Problem(text, str(oldest), steps, "ages")


def _sequence(rng: random.Random) -> Problem:
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    terms = [start + step * index for index in range(4)]
    text = f"What number comes next in the sequence {', '.join(map(str, terms))}?"
    steps = (f"Each term is {step} more than the one before: {terms[1]} − {terms[0]} = {step}.",
             f"The next term is {terms[-1]} + {step} = {terms[-1] + step}.")
    return Problem(text, str(terms[-1] + step), steps, "sequence")


def _sharing(rng: random.Random) -> Problem:
    friends, each, eaten = rng.randint(2, 6), rng.randint(3, 9), rng.randint(1, 2)
    total = friends * each
    item, items = rng.choice(ITEMS)
    text = (f"{total} {items} are shared equally among {friends} friends, and then each friend "
            f"gives away {eaten}. How many {items} does each friend have now?")
    steps = (f"Each friend first gets {total} ÷ {friends} = {each} {items}.",
             f"After giving away {eaten}, each has {each} − {eaten} = {each - eaten}.")
    return Problem(text, str(each - eaten), steps, "sharing")


def _comparison(rng: random.Random) -> Problem:
    first, second, third = rng.sample(NAMES, 3)
    base, more, fewer = rng.randint(4, 20), rng.randint(2, 9), rng.randint(1, 5)
    item, items = rng.choice(ITEMS)
    text = (f"{first} has {base} {items}. {second} has {more} more than {first}, and {third} has "
            f"{fewer} fewer than {second}. How many {items} does {third} have?")
    steps = (f"{second} has {base} + {more} = {base + more} {items}.",
             f"{third} has {base + more} − {fewer} = {base + more - fewer} {items}.")
    return Problem(text, str(base + more - fewer), steps, "comparison")


def _remainder(rng: random.Random) -> Problem:
    divisor = rng.randint(3, 9)
    quotient, remainder = rng.randint(3, 12), rng.randint(1, divisor - 1)
    number = divisor * quotient + remainder
    text = f"What is the remainder when {number} is divided by {divisor}?"
    steps = (f"{divisor} × {quotient} = {divisor * quotient}, the largest multiple of {divisor} not above {number}.",
             f"The remainder is {number} − {divisor * quotient} = {remainder}.")
    return Problem(text, str(remainder), steps, "remainder")


def _ordering(rng: random.Random) -> Problem:
    tall, middle, short = rng.sample(NAMES, 3)
    statements = [f"{tall} is taller than {middle}.", f"{middle} is taller than {short}."]
    rng.shuffle(statements)
    if rng.random() < 0.5:
        question, answer = "Who is the shortest?", short
        last = f"So {short} is the shortest."
    else:
        question, answer = "Who is the tallest?", tall
        last = f"So {tall} is the tallest."
    text = " ".join(statements) + " " + question
    steps = (f"From the two statements, the order from tallest to shortest is {tall}, {middle}, {short}.", last)
    return Problem(text, answer, steps, "ordering", choices=(tall, middle, short))


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "shopping": _shopping, "expression": _expression, "rows": _rows, "ages": _ages,
    "sequence": _sequence, "sharing": _sharing, "comparison": _comparison,
    "remainder": _remainder, "ordering": _ordering,
}


def generate_problems(n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """Generate `n` distinct problems, cycling through the kinds, deterministically from `seed`.

    Problems whose text is in `exclude` are skipped, which keeps training problems out of the
    evaluation splits.
    """
    rng = random.Random(seed)
    kinds = list(GENERATORS)
    seen = set(exclude or ())
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct problems with seed {seed}")
        problem = GENERATORS[kinds[len(problems) % len(kinds)]](rng)
        if problem.text in seen:
            continue
        seen.add(problem.text)
        problems.append(problem)
    return problems


_OPENINGS = ("", "Let me work through this step by step.\n", "I'll solve it in steps.\n",
             "Let me think.\n")
_FINALS = ("The answer is {answer}.", "So the answer is {answer}.", "Answer: {answer}",
           "The final answer is {answer}.")


def solution_text(problem: Problem, rng: random.Random) -> str:
    """Render a worked solution as `<think>` reasoning followed by the final answer."""
    opening = rng.choice(_OPENINGS)
    numbered = rng.random() < 0.3
    lines = [f"Step {index}: {step}" if numbered else step for index, step in enumerate(problem.steps, 1)]
    final = rng.choice(_FINALS).format(answer=problem.answer)
    return f"<think>\n{opening}" + "\n".join(lines) + f"\n</think>\n{final}"


_ANSWER_PATTERN = re.compile(r"answer(?: is)?\s*[:=]?\s*\**\s*(-?\d+|[A-Z][a-z]+)", re.IGNORECASE)
_NUMBER_PATTERN = re.compile(r"-?\d+")


def final_answer_text(response: str) -> str | None:
    """Return the part of a response after its reasoning block; None if the block never closes."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


def extract_answer(response: str, problem: Problem) -> str | None:
    """Extract the final answer: an explicit "answer is X" after the reasoning block, else the
    last number (or, for name answers, the last candidate name) in that part of the response."""
    tail = final_answer_text(response)
    if tail is None:
        return None
    matches = _ANSWER_PATTERN.findall(tail)
    if matches:
        return matches[-1]
    if problem.choices:
        positions = [(tail.rfind(choice), choice) for choice in problem.choices if choice in tail]
        return max(positions)[1] if positions else None
    numbers = _NUMBER_PATTERN.findall(tail)
    return numbers[-1] if numbers else None


def is_correct(response: str, problem: Problem) -> bool:
    """Whether the response's extracted final answer equals the problem's answer."""
    answer = extract_answer(response, problem)
    return answer is not None and answer.strip().lower() == problem.answer.lower()
