"""The input pipeline: the same inputs in the same order as a synchronous loop, errors raised
where the step needs its input, and a prompt stop."""

import threading
import time

import pytest

from wlbtrain.data.prefetch import InputPipeline, StepInput


def counting_producer(log):
    """A producer with state that advances per call, like the packer."""
    state = {"n": 0}

    def produce(step):
        state["n"] += step
        log.append((threading.current_thread().name, step))
        return StepInput(step, [[(step, 0, 1)]], dict(state), [], 0.0)

    return produce


@pytest.mark.parametrize("background", [False, True])
def test_inputs_come_in_step_order_with_the_state_after_each(background):
    log = []
    with InputPipeline(counting_producer(log), range(3, 9), background) as inputs:
        got = [inputs.next() for _ in range(6)]
    assert [g.step for g in got] == list(range(3, 9))
    # the state travelling with each step is the state right after producing it
    assert [g.state["n"] for g in got] == [sum(range(3, s + 1)) for s in range(3, 9)]
    threads = {name for name, _ in log}
    assert (threads == {"wlbtrain-input"}) if background else ("wlbtrain-input" not in threads)


def test_it_runs_one_step_ahead_and_no_further():
    log = []
    inputs = InputPipeline(counting_producer(log), range(1, 100))
    inputs.next()
    time.sleep(0.3)
    # step 1 taken; step 2 waits in the queue; step 3 is made and waits for room
    assert [s for _, s in log] == [1, 2, 3]
    inputs.close()


def test_a_producer_error_is_raised_by_next():
    def produce(step):
        if step == 2:
            raise ValueError("piece outside document 7")
        return StepInput(step, [], {}, [], 0.0)

    with InputPipeline(produce, range(1, 5)) as inputs:
        assert inputs.next().step == 1
        with pytest.raises(ValueError, match="document 7"):
            inputs.next()


def test_close_stops_a_producer_waiting_for_room():
    inputs = InputPipeline(lambda s: StepInput(s, [], {}, [], 0.0), range(1, 10 ** 9))
    time.sleep(0.1)
    start = time.perf_counter()
    inputs.close()
    assert time.perf_counter() - start < 2
    assert not inputs._thread.is_alive()
