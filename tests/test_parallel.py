import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch

from safereact_interp.activations import collect_residuals
from safereact_interp.diagnose import DiagnoseConfig, diagnose
from safereact_interp.directions import compute_directions
from safereact_interp.errors import ConfigError
from safereact_interp.parallel import SideJobError, can_fork, side_job, split_work
from safereact_interp.patching import layer_sweep
from safereact_interp.prompts import EvalPrompts, bundled_prompts
from safereact_interp.scoring import GenerationConfig, evaluate_model, generate

SMALL = dict(n_train=12, n_val=8, n_test=6)
FAST = DiagnoseConfig(generation=GenerationConfig(max_new_tokens=4, capability_max_new_tokens=6))

needs_fork = pytest.mark.skipif(not can_fork(), reason="forking needs Linux, 2 or more torch threads and no CUDA")


class RecordingProgress:
    """A progress factory that stores each bar's description, total and advances."""

    def __init__(self):
        self.bars = []

    @contextmanager
    def __call__(self, description, total):
        bar = {"description": description, "total": total, "done": 0, "closed": False}
        self.bars.append(bar)
        yield lambda n: bar.__setitem__("done", bar["done"] + n)
        bar["closed"] = True


def child_pid(progress):
    return os.getpid(), torch.get_num_threads()


@needs_fork
def test_job_runs_in_child():
    threads = torch.get_num_threads()
    with side_job(child_pid, "pid") as job:
        assert torch.get_num_threads() == threads - threads // 2
        pid, child_threads = job.result()
    assert pid != os.getpid()
    assert child_threads == threads // 2


@needs_fork
def test_threads_restored_after_result():
    threads = torch.get_num_threads()
    with side_job(child_pid, "pid") as job:
        job.result()
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == threads


def test_disabled_runs_here():
    with side_job(child_pid, "pid", enabled=False) as job:
        pid, _ = job.result()
    assert pid == os.getpid()


def failing(progress):
    raise ConfigError("invalid value 7; pass 3")


@needs_fork
def test_child_error_reraised():
    with pytest.raises(ConfigError, match="invalid value 7") as caught:
        with side_job(failing, "failing job") as job:
            job.result()
    assert isinstance(caught.value.__cause__, SideJobError)
    assert "in failing" in str(caught.value.__cause__)


class TwoArgumentError(Exception):
    def __init__(self, value, fix):
        super().__init__(f"invalid value {value}; {fix}")


def failing_oddly(progress):
    raise TwoArgumentError(7, "pass 3")


@needs_fork
def test_unpicklable_error_keeps_traceback():
    with pytest.raises(SideJobError, match="TwoArgumentError: invalid value 7"):
        with side_job(failing_oddly, "odd job") as job:
            job.result()


def killed(progress):
    os.kill(os.getpid(), signal.SIGKILL)


@needs_fork
def test_killed_child_reported():
    with pytest.raises(SideJobError, match="exit code -9"):
        with side_job(killed, "killed job") as job:
            job.result()


def counting(progress):
    with progress("counting", 5) as advance:
        for _ in range(5):
            advance(1)
    return "done"


@needs_fork
def test_progress_forwarded():
    recording = RecordingProgress()
    with side_job(counting, "counting job", progress=recording) as job:
        assert job.result() == "done"
    assert recording.bars == [{"description": "counting", "total": 5, "done": 5, "closed": True}]


def sleeping(progress):
    time.sleep(60)


@needs_fork
def test_body_error_stops_child():
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with side_job(sleeping, "sleeping job") as job:
            raise KeyboardInterrupt
    assert not job._process.is_alive()
    assert time.perf_counter() - start < 30


@needs_fork
def test_parallel_diagnosis_equals_serial(planted_pair):
    prompts = EvalPrompts.bundled(**SMALL)
    serial = diagnose(planted_pair, prompts, FAST)
    parallel = diagnose(planted_pair, prompts, FAST, parallel=True)
    assert parallel.diagnosis == serial.diagnosis
    assert parallel.evaluations["base"].records == serial.evaluations["base"].records
    assert torch.equal(parallel.activations_base.harmful, serial.activations_base.harmful)


@needs_fork
def test_parallel_sweep_equals_serial(planted_pair):
    harmful, harmless = bundled_prompts("harmful"), bundled_prompts("harmless")
    directions = compute_directions(collect_residuals(planted_pair.base, harmful.train.head(8), range(4)).pooled(),
                                    collect_residuals(planted_pair.base, harmless.train.head(8), range(4)).pooled(),
                                    (0, 1, 2, 3))
    prompts = harmful.val.head(6)
    serial = layer_sweep(planted_pair, prompts, directions, alphas=(0.0, 1.0))
    parallel = layer_sweep(planted_pair, prompts, directions, alphas=(0.0, 1.0), parallel=True)
    # One thread and two can sum in different orders, so scores agree up to float rounding.
    for kind in ("residual", "direction"):
        for patched, expected in zip(parallel.per_prompt[kind], serial.per_prompt[kind]):
            assert patched == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert parallel.ablation == pytest.approx(serial.ablation, rel=1e-4, abs=1e-5)


@needs_fork
def test_split_work_covers_items():
    parts = split_work(lambda items, advance: [os.getpid(), list(items)], list(range(5)), "items")
    assert parts[0][1] == [0, 2, 4]
    assert parts[1][1] == [1, 3]
    assert parts[0][0] != parts[1][0]


def test_split_work_disabled_runs_once():
    parts = split_work(lambda items, advance: list(items), list(range(5)), "items", enabled=False)
    assert parts == [[0, 1, 2, 3, 4]]


@needs_fork
def test_parallel_generation_equals_serial(tiny_model):
    prompts = bundled_prompts("harmful").test.head(20)
    advanced = []
    serial = generate(tiny_model, prompts, max_new_tokens=5, batch_size=4)
    parallel = generate(tiny_model, prompts, max_new_tokens=5, batch_size=4, progress=advanced.append,
                        parallel=True)
    assert parallel == serial
    assert sum(advanced) == 20


@needs_fork
def test_parallel_evaluation_equals_serial(tiny_model):
    prompts = EvalPrompts.bundled(**SMALL)
    sets = {"harmful": prompts.harmful_test, "harmless": prompts.harmless_test}
    generation = GenerationConfig(max_new_tokens=4, capability_max_new_tokens=6)
    advanced = []
    serial = evaluate_model(tiny_model, sets, prompts.capability_test, generation=generation)
    parallel = evaluate_model(tiny_model, sets, prompts.capability_test, generation=generation,
                              progress=advanced.append, parallel=True)
    assert parallel == serial
    assert sum(advanced) == sum(len(prompt_set) for prompt_set in sets.values()) + len(prompts.capability_test)
