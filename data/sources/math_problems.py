"""Generated MathQA-style word problems with step-by-step rationales (the offline `math` domain).

No maths corpus ships with Python, so this domain is synthetic. The generator has its own fixed seed,
independent of the run seed, so every run and machine sees the same problems; only the train/eval
split (done later) depends on the run seed. Numbers are chosen so every answer is exact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from functools import lru_cache

GENERATOR_SEED = 20240917
GENERATOR_VERSION = 1  # bump when templates change, so cached corpora are rebuilt

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yara"]
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("shirt", "shirts"), ("lamp", "lamps"), ("mug", "mugs"), ("plant", "plants")]
VEHICLES = ["car", "train", "cyclist", "bus", "boat", "runner"]


def fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    if 100 % x.denominator == 0 or 1000 % x.denominator == 0:
        return f"{float(x):.3f}".rstrip("0").rstrip(".")
    return f"{x.numerator}/{x.denominator}"


def _options(rng: random.Random, answer: Fraction) -> tuple[str, str]:
    """Five MathQA-style options, one correct; returns (options line, letter of the answer)."""
    wrong: set[Fraction] = set()
    step = max(1, abs(answer) // 10) if answer.denominator == 1 else Fraction(1, answer.denominator)
    while len(wrong) < 4:
        cand = answer + step * rng.choice([-3, -2, -1, 1, 2, 3, 4, 5])
        if cand != answer and (cand >= 0 or answer < 0):
            wrong.add(cand)
    values = sorted(wrong)
    values.insert(rng.randrange(5), answer)
    letters = "abcde"
    line = " , ".join(f"{letter} ) {fmt(v)}" for letter, v in zip(letters, values, strict=False))
    return line, letters[values.index(answer)]


def _arithmetic(rng: random.Random) -> tuple[str, list[str], Fraction]:
    a, b, c = rng.randint(12, 999), rng.randint(2, 40), rng.randint(2, 25)
    d = rng.randint(2, 12)
    e = d * rng.randint(2, 60)
    q = rng.choice(["What is the value of", "Evaluate", "Compute", "Find the value of"])
    problem = f"{q} {a} + {b} × {c} − {e} ÷ {d}?"
    steps = ["Multiplication and division come before addition and subtraction.",
             f"{b} × {c} = {b * c}.", f"{e} ÷ {d} = {e // d}.",
             f"So the expression is {a} + {b * c} − {e // d} = {a + b * c} − {e // d} = {a + b * c - e // d}."]
    return problem, steps, Fraction(a + b * c - e // d)


def _percent_of(rng: random.Random) -> tuple[str, list[str], Fraction]:
    p = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 60, 75, 80, 125])
    base = rng.randint(2, 80) * 20
    ans = Fraction(p * base, 100)
    name = rng.choice(NAMES)
    problem = rng.choice([f"What is {p}% of {base}?",
                          (f"{name} has {base} marbles and gives away {p}% of them. How many marbles "
                           f"does {name} give away?"),
                          f"A survey asked {base} people and {p}% said yes. How many people said yes?"])
    steps = [f"{p}% means {p}/100.", f"{p}/100 × {base} = {p * base}/100 = {fmt(ans)}."]
    return problem, steps, ans


def _percent_change(rng: random.Random) -> tuple[str, list[str], Fraction]:
    price = rng.randint(4, 120) * 5
    up = rng.choice([10, 20, 25, 40, 50])
    down = rng.choice([10, 20, 25, 30, 50])
    item = rng.choice(ITEMS)[0]
    raised = Fraction(price * (100 + up), 100)
    final = raised * Fraction(100 - down, 100)
    problem = (f"The price of a {item} is ${price}. The price is first increased by {up}% and then the new "
               f"price is decreased by {down}%. What is the final price in dollars?")
    steps = [(f"After the increase: {price} × (100 + {up})/100 = {price} × {fmt(Fraction(100 + up, 100))} "
              f"= {fmt(raised)}."),
             (f"After the decrease: {fmt(raised)} × (100 − {down})/100 = {fmt(raised)} × "
              f"{fmt(Fraction(100 - down, 100))} = {fmt(final)}."),
             f"The net change is {fmt((final - price) / price * 100)}% of the original price."]
    return problem, steps, final


def _ratio(rng: random.Random) -> tuple[str, list[str], Fraction]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    while a == b:
        b = rng.randint(1, 9)
    total = (a + b) * rng.randint(3, 120)
    n1, n2 = rng.sample(NAMES, 2)
    share = Fraction(total * b, a + b)
    problem = (f"{n1} and {n2} share ${total} in the ratio {a} : {b}. How much does {n2} receive?")
    steps = [f"The ratio has {a} + {b} = {a + b} parts.", f"One part is {total} ÷ {a + b} = {total // (a + b)}.",
             f"{n2} gets {b} parts: {b} × {total // (a + b)} = {fmt(share)}."]
    return problem, steps, share


def _linear(rng: random.Random) -> tuple[str, list[str], Fraction]:
    x = rng.randint(-20, 30)
    a = rng.randint(2, 12)
    c = rng.randint(1, a - 1) if a > 2 else 1
    b = rng.randint(-50, 50)
    d = (a - c) * x + b  # a*x + b = c*x + d
    sb = f"+ {b}" if b >= 0 else f"− {-b}"
    sd = f"+ {d}" if d >= 0 else f"− {-d}"
    def term(k: int) -> str:
        return "x" if k == 1 else f"{k}x"

    problem = f"Solve for x: {term(a)} {sb} = {term(c)} {sd}."
    move = f"Subtract {b} from both sides: {term(a - c)} = {d} − {b}" if b >= 0 else \
        f"Add {-b} to both sides: {term(a - c)} = {d} + {-b}"
    steps = [f"Subtract {term(c)} from both sides: {term(a - c)} {sb} = {d}.",
             f"{move} = {d - b}.",
             f"Divide by {a - c}: x = {d - b} ÷ {a - c} = {x}." if a - c > 1 else f"So x = {x}.",
             f"Check: {a} × {x} {sb} = {a * x + b} and {c} × {x} {sd} = {c * x + d}."]
    return problem, steps, Fraction(x)


def _speed(rng: random.Random) -> tuple[str, list[str], Fraction]:
    speed = rng.randint(3, 40) * 5
    minutes = rng.choice([20, 30, 40, 45, 50, 75, 90, 105, 120, 150])
    dist = Fraction(speed * minutes, 60)
    v = rng.choice(VEHICLES)
    problem = (f"A {v} travels at a constant speed of {speed} km/h. How many kilometres does it cover in "
               f"{minutes} minutes?")
    steps = [f"{minutes} minutes = {minutes}/60 hours = {fmt(Fraction(minutes, 60))} hours.",
             f"Distance = speed × time = {speed} × {fmt(Fraction(minutes, 60))} = {fmt(dist)} km."]
    return problem, steps, dist


def _work(rng: random.Random) -> tuple[str, list[str], Fraction]:
    a, b = rng.sample([2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 18, 20, 24, 30], 2)
    n1, n2 = rng.sample(NAMES, 2)
    rate = Fraction(1, a) + Fraction(1, b)
    t = 1 / rate
    problem = (f"{n1} can paint a fence in {a} hours and {n2} can paint it in {b} hours. Working together "
               f"at these rates, how many hours do they need to paint the fence?")
    steps = [f"{n1} paints 1/{a} of the fence per hour and {n2} paints 1/{b}.",
             f"Together: 1/{a} + 1/{b} = {rate.numerator}/{rate.denominator} of the fence per hour.",
             f"Time = 1 ÷ ({rate.numerator}/{rate.denominator}) = {fmt(t)} hours."]
    return problem, steps, t


def _interest(rng: random.Random) -> tuple[str, list[str], Fraction]:
    principal = rng.randint(2, 100) * 100
    rate = rng.choice([2, 3, 4, 5, 6, 8, 10, 12])
    years = rng.randint(2, 8)
    interest = Fraction(principal * rate * years, 100)
    problem = (f"What is the simple interest on ${principal} at {rate}% per year for {years} years?")
    steps = ["Simple interest = principal × rate × time / 100.",
             f"= {principal} × {rate} × {years} / 100 = {principal * rate * years} / 100 = {fmt(interest)}."]
    return problem, steps, interest


def _average(rng: random.Random) -> tuple[str, list[str], Fraction]:
    n = rng.randint(3, 6)
    target = rng.randint(50, 95)
    scores = [rng.randint(40, 100) for _ in range(n)]
    missing = target * (n + 1) - sum(scores)
    while not 0 <= missing <= 150:
        scores = [rng.randint(40, 100) for _ in range(n)]
        missing = target * (n + 1) - sum(scores)
    name = rng.choice(NAMES)
    listed = ", ".join(map(str, scores))
    problem = (f"{name} scored {listed} on {n} tests. What must {name} score on the next test to have an "
               f"average of {target} over all {n + 1} tests?")
    steps = [f"The total needed is {target} × {n + 1} = {target * (n + 1)}.",
             f"The current total is {' + '.join(map(str, scores))} = {sum(scores)}.",
             f"Required score = {target * (n + 1)} − {sum(scores)} = {missing}."]
    return problem, steps, Fraction(missing)


def _ages(rng: random.Random) -> tuple[str, list[str], Fraction]:
    child = rng.randint(3, 20)
    k = rng.randint(2, 5)
    years = rng.randint(2, 15)
    n1, n2 = rng.sample(NAMES, 2)
    total = (k + 1) * child + 2 * years
    problem = (f"{n1} is {k} times as old as {n2}. In {years} years the sum of their ages will be {total}. "
               f"How old is {n2} now?")
    steps = [f"Let {n2}'s age be x, so {n1}'s age is {k}x.",
             f"In {years} years: (x + {years}) + ({k}x + {years}) = {total}.",
             f"{k + 1}x + {2 * years} = {total}, so {k + 1}x = {total - 2 * years}.",
             f"x = {total - 2 * years} ÷ {k + 1} = {child}."]
    return problem, steps, Fraction(child)


def _shopping(rng: random.Random) -> tuple[str, list[str], Fraction]:
    (_, p1), (_, p2) = rng.sample(ITEMS, 2)
    n1, n2 = rng.randint(2, 9), rng.randint(2, 9)
    c1, c2 = Fraction(rng.randint(4, 60), 4), Fraction(rng.randint(4, 60), 4)
    cost = n1 * c1 + n2 * c2
    bill = next(b for b in (20, 50, 100, 200, 500, 1000) if b >= cost)
    name = rng.choice(NAMES)
    problem = (f"{name} buys {n1} {p1} at ${fmt(c1)} each and {n2} {p2} at ${fmt(c2)} each, and pays with a "
               f"${bill} note. How much change does {name} get?")
    steps = [f"The {p1} cost {n1} × {fmt(c1)} = {fmt(n1 * c1)}.", f"The {p2} cost {n2} × {fmt(c2)} = {fmt(n2 * c2)}.",
             f"Total = {fmt(n1 * c1)} + {fmt(n2 * c2)} = {fmt(cost)}.",
             f"Change = {bill} − {fmt(cost)} = {fmt(bill - cost)}."]
    return problem, steps, bill - cost


def _fraction_of(rng: random.Random) -> tuple[str, list[str], Fraction]:
    den = rng.choice([3, 4, 5, 6, 8, 10])
    num = rng.randint(1, den - 1)
    den2 = rng.choice([2, 3, 4, 5])
    num2 = rng.randint(1, den2 - 1)
    total = den * den2 * rng.randint(2, 30)
    spent = Fraction(num, den) * total
    rest = total - spent
    second = Fraction(num2, den2) * rest
    name = rng.choice(NAMES)
    problem = (f"{name} had ${total}. {name} spent {num}/{den} of it on rent and then {num2}/{den2} of what "
               f"was left on food. How much money is left?")
    steps = [f"Rent: {num}/{den} × {total} = {fmt(spent)}; remaining {total} − {fmt(spent)} = {fmt(rest)}.",
             f"Food: {num2}/{den2} × {fmt(rest)} = {fmt(second)}.",
             f"Left: {fmt(rest)} − {fmt(second)} = {fmt(rest - second)}."]
    return problem, steps, rest - second


TEMPLATES: list[Callable[[random.Random], tuple[str, list[str], Fraction]]] = [
    _arithmetic, _percent_of, _percent_change, _ratio, _linear, _speed, _work, _interest, _average,
    _ages, _shopping, _fraction_of,
]


def problem_text(rng: random.Random) -> str:
    problem, steps, answer = rng.choice(TEMPLATES)(rng)
    options, letter = _options(rng, answer)
    return (f"Problem: {problem}\nOptions: {options}\nRationale: {' '.join(steps)}\n"
            f"Answer: {letter} ) {fmt(answer)}")


# The chat problems' own seed: SFT on them after pretraining on the `math` domain meets new numbers, not the
# pretraining documents again (the templates are the same).
CHAT_SEED = GENERATOR_SEED + 1


def math_conversations(max_bytes: int) -> Iterator[tuple[str, str, str]]:
    """(question, worked solution ending in the answer, answer) in a fixed order, until about `max_bytes` of
    question + solution text; the same sequence on every call. No options: the answer is the value itself."""
    rng = random.Random(CHAT_SEED)
    size = 0
    while size < max_bytes:
        problem, steps, answer = rng.choice(TEMPLATES)(rng)
        value = fmt(answer)
        solution = "\n".join(steps) + f"\nThe answer is {value}."
        size += len(problem.encode("utf-8")) + len(solution.encode("utf-8"))
        yield problem, solution, value


# The benchmark's own seed (eval/harness's embedded_math task): problems drawn apart from the pretraining documents
# and the SFT conversations, from the same templates.
BENCHMARK_SEED = GENERATOR_SEED + 2
# Problems the training streams hold within this much text (data.size_mb's default, per domain) are skipped: a few
# templates have small number ranges, and a benchmark item a model trained on would measure recall.
BENCHMARK_EXCLUDES_BYTES = 10_000_000
_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # what gsm8k's "#### N" answer regex reads: no fractions


@lru_cache(maxsize=4)
def benchmark_problems(count: int) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """`count` held-out (question, solution steps, answer) in a fixed order: from BENCHMARK_SEED, none among the
    first BENCHMARK_EXCLUDES_BYTES of the pretraining or SFT problems, no repeats, and only answers that are
    integers or decimals (gsm8k's format)."""
    seen = {doc.split("\n", 1)[0].removeprefix("Problem: ") for doc in math_documents(BENCHMARK_EXCLUDES_BYTES)}
    seen.update(question for question, _, _ in math_conversations(BENCHMARK_EXCLUDES_BYTES))
    rng = random.Random(BENCHMARK_SEED)
    out = []
    while len(out) < count:
        problem, steps, answer = rng.choice(TEMPLATES)(rng)
        value = fmt(answer)
        if problem in seen or not _GSM8K_NUMBER.fullmatch(value):
            continue
        seen.add(problem)
        out.append((problem, tuple(steps), value))
    return tuple(out)


def math_documents(max_bytes: int) -> list[str]:
    """Problems in a fixed order until `max_bytes` of UTF-8 text; the same list on every call."""
    rng = random.Random(GENERATOR_SEED)
    docs, size = [], 0
    while size < max_bytes:
        text = problem_text(rng)
        docs.append(text)
        size += len(text.encode("utf-8"))
    return docs


def provenance() -> dict:
    return {"origin": "generated by data/sources/math_problems.py (this project), not downloaded",
            "licence": "same as this project (generated text)",
            "generator_seed": GENERATOR_SEED, "generator_version": GENERATOR_VERSION,
            "templates": [t.__name__.lstrip("_") for t in TEMPLATES]}
