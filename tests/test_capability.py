import random

from safereact_interp.capability import Problem, extract_answer, generate_problems, is_correct, solution_text


def test_generation_deterministic():
    assert [p.text for p in generate_problems(20, seed=5)] == [p.text for p in generate_problems(20, seed=5)]


def test_generation_excludes():
    first = generate_problems(30, seed=1)
    second = generate_problems(30, seed=1, exclude={problem.text for problem in first})
    assert not {p.text for p in first} & {p.text for p in second}


def test_solutions_are_correct():
    rng = random.Random(0)
    for problem in generate_problems(90, seed=3):
        assert is_correct(solution_text(problem, rng), problem), problem


def test_answer_after_think_block():
    problem = Problem("What is 2 + 3?", "5", ("2 + 3 = 5",), "expression")
    assert is_correct("<think>\n2 + 3 = 5, or maybe 7\n</think>\nThe answer is 5.", problem)
    assert not is_correct("<think>\nI think it is 5", problem)
    assert not is_correct("<think>\n2+3=5\n</think>\nThe answer is 7.", problem)


def test_answer_without_think_block():
    problem = Problem("What is 2 + 3?", "5", ("2 + 3 = 5",), "expression")
    assert is_correct("Two plus three gives 5.", problem)
    assert extract_answer("No number here.", problem) is None


def test_name_answers():
    problem = Problem("Ana is taller than Ben. Who is the shortest?", "Ben", (), "ordering", choices=("Ana", "Ben"))
    assert is_correct("So the shortest is Ben.", problem)
    assert not is_correct("Ben is shorter, so the answer is Ana.", problem)
