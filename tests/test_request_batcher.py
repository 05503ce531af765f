"""The serving batcher (trainer/request_batcher.py): a batch is what has queued by the time the model is
free, each caller gets its own result, a lone request is not held back, and a failing or abandoned
request does not take the others down. Plain asyncio, no Ray."""
import asyncio
import pickle
import threading
import time

import pytest

from trainer.request_batcher import Batcher
from trainer.serve_requests import BadRequest


class Model:
    """A batch function that records its batch sizes and takes `seconds` per batch (in the worker thread)."""

    def __init__(self, seconds: float = 0.0, fail_on=None):
        self.seconds, self.fail_on, self.sizes = seconds, fail_on, []
        self.started = threading.Event()

    def __call__(self, items: list) -> list:
        self.sizes.append(len(items))
        self.started.set()
        time.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [x * 10 for x in items]


def test_requests_that_arrive_while_the_model_is_busy_form_one_batch():
    """`ray.serve.batch` would run these as several small batches formed while the first was running; here
    all 12 that queued during it are the next batch."""
    model = Model(seconds=0.3)

    async def main():
        b = Batcher(model, max_batch_size=16, wait_s=0.005)
        first = asyncio.ensure_future(b.submit(0))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        later = []
        for i in range(1, 13):  # staggered over ~0.06 s: many wait_s windows, all inside the first batch
            later.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.005)
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(main())
    assert first == 0 and later == [i * 10 for i in range(1, 13)]
    assert model.sizes == [1, 12]


def test_batches_are_capped_and_each_caller_gets_its_own_result():
    model = Model(seconds=0.05)

    async def main():
        b = Batcher(model, max_batch_size=4, wait_s=0.01)
        return await asyncio.gather(*(b.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert max(model.sizes) == 4 and sum(model.sizes) == 10 and model.sizes[0] == 4


def test_a_lone_request_waits_only_its_window():
    model = Model()

    async def main():
        b = Batcher(model, max_batch_size=16, wait_s=0.05)
        t = time.monotonic()
        out = await b.submit(7)
        return out, time.monotonic() - t

    out, waited = asyncio.run(main())
    assert out == 70 and model.sizes == [1]
    assert 0.04 <= waited < 2.0  # the window, not a fill-the-batch wait


def test_a_failing_batch_fails_its_callers_only_and_the_next_batch_runs():
    model = Model(seconds=0.05, fail_on=3)

    async def main():
        b = Batcher(model, max_batch_size=8, wait_s=0.01)
        bad = await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
        good = await asyncio.gather(*(b.submit(i) for i in (5, 6)))
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(e, ValueError) and "bad item 3" in str(e) for e in bad)
    assert good == [50, 60]


def test_a_caller_that_gave_up_is_not_run():
    model = Model(seconds=0.2)

    async def main():
        b = Batcher(model, max_batch_size=8, wait_s=0.001)
        first = asyncio.ensure_future(b.submit(1))
        while not model.started.is_set():
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected while queued
        return await first, await kept

    assert asyncio.run(main()) == (10, 30)
    assert model.sizes == [1, 1]


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Model(), 0, 0.01)


def test_a_bad_request_crosses_processes_as_itself():
    """A reader replica returns a BadRequest to the HTTP ingress through Ray's pickling."""
    e = pickle.loads(pickle.dumps(BadRequest("k", "must be between 1 and 4, got 9", status=400)))
    assert isinstance(e, BadRequest) and (e.field, e.status) == ("k", 400)
    assert str(e) == "field 'k': must be between 1 and 4, got 9"
