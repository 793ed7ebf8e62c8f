"""The engine core and its scheduler, pure and synchronous, on a tiny random model: continuous batching admits
new requests while others decode, every request's result equals the Predictor's on it alone, aborted and late
requests leave the batch, and the batching policy holds its limits."""

import dataclasses

import numpy as np
import pytest

from model.core import EngineCore, Expired
from model.image import preprocess
from model.inference import TorchInference
from model.predictor import Predictor
from model.requests import Request, validate
from model.scheduler import Decode, Job, Prefill, Scheduler, SchedulerConfig, _fill_holes
from model.shapes import generate_scene


@pytest.fixture(scope="module")
def predictor(tiny_model, tasks, one_thread):
    return Predictor(TorchInference(tiny_model), tasks)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in range(3)]


class Recorder:
    """The core's runner, recording every batch it runs."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []

    def __call__(self, batch):
        self.batches.append(batch)
        return self.runner(batch)

    def reset(self):
        self.runner.reset()


def core_for(predictor, **config) -> tuple[EngineCore, Recorder]:
    core = EngineCore(predictor.inference, predictor.tasks, SchedulerConfig(**config))
    core.runner = Recorder(core.runner)
    return core, core.runner


def asks_for(scenes):
    out = []
    for i, s in enumerate(scenes):
        box = tuple(float(v) for v in s.objects[0].box)
        out += [(i, Request("caption", max_new_tokens=4 + 5 * i)), (i, Request("refer", expression=s.expressions[0])),
                (i, Request("describe", box=box, max_new_tokens=6)), (i, Request("ground", max_regions=3))]
    return out


def pixels_of(scene, predictor):
    return preprocess(scene.image, predictor.image_size)


def job_of(job_id, ask, scenes, predictor, now=0.0, deadline=float("inf")):
    """A scheduler job for (image index, request), its search as the core builds it."""
    i, request = ask
    size = scenes[i].image.size
    return Job(job_id, pixels_of(scenes[i], predictor), predictor.core.search(validate(request, size), size), now,
               deadline)


def add(core, job_id, ask, scenes, predictor, now=0.0, deadline=float("inf")):
    i, request = ask
    core.add(request, pixels_of(scenes[i], predictor), scenes[i].image.size, job_id, now, deadline)


def alone(predictor, ask, scenes):
    i, request = ask
    return predictor.run([scenes[i].image], [(0, request)])[0]


def assert_same(a, b):
    """Same tokens (so same text and boxes); scores equal up to float reassociation across batch shapes."""
    if a.regions is not None:
        assert len(a.regions) == len(b.regions)
        for ra, rb in zip(a.regions, b.regions, strict=True):
            assert ra.box == rb.box and ra.text == rb.text and ra.score == pytest.approx(rb.score, abs=1e-4)
        return
    assert dataclasses.replace(a, score=0.0) == dataclasses.replace(b, score=0.0)
    assert a.score == pytest.approx(b.score, abs=1e-4)


def drive(core, arrivals, max_steps=500):
    """Step the core once a tick; `arrivals` maps a tick to calls adding requests before it. Returns the results."""
    results = {}
    for tick in range(max_steps):
        for add_it in arrivals.get(tick, []):
            add_it(float(tick))
        for f in core.step(float(tick)):
            assert f.error is None
            results[f.id] = f.result
        if not core.busy and not any(t > tick for t in arrivals):
            break
    return results


def test_staggered_requests_equal_the_predictor_alone(predictor, scenes):
    asks = asks_for(scenes)
    core, rec = core_for(predictor, max_batch=3, max_rows=64)
    # requests arrive over the first ticks, so most join a batch that is already decoding
    arrivals = {}
    for k, ask in enumerate(asks):
        arrivals.setdefault(k % 5 * 2, []).append(lambda now, k=k, ask=ask: add(core, k, ask, scenes, predictor, now))
    results = drive(core, arrivals)
    assert sorted(results) == list(range(len(asks)))
    assert max(len(b.jobs) for b in rec.batches if isinstance(b, Prefill)) <= 3
    for k, ask in enumerate(asks):
        assert_same(results[k], alone(predictor, ask, scenes))


def test_requests_on_one_image_share_its_encoder_row(predictor, scenes):
    core, rec = core_for(predictor)
    pixels = pixels_of(scenes[0], predictor)
    for request in (Request("caption"), Request("refer", expression=scenes[0].expressions[0]), Request("ground")):
        core.add(request, pixels, scenes[0].image.size)
    core.add(Request("caption"), pixels_of(scenes[1], predictor), scenes[1].image.size)
    core.run()
    (prefill,) = [b for b in rec.batches if isinstance(b, Prefill)]
    assert len(prefill.jobs) == 4 and len(prefill.pixels) == 2
    assert [q.image for q in prefill.queries] == [0, 0, 0, 1]


def test_a_short_refer_joins_and_leaves_a_running_caption(predictor, scenes):
    cap, ref = (0, Request("caption", max_new_tokens=40)), (1, Request("refer", expression=scenes[1].expressions[0]))
    core, rec = core_for(predictor, max_batch=8, max_rows=64)
    order = []
    for tick in range(200):
        if tick == 0:
            add(core, 0, cap, scenes, predictor)
        if tick == 3:
            add(core, 1, ref, scenes, predictor, now=3.0)
        order += [f.id for f in core.step(float(tick))]
        if not core.busy:
            break
    assert order == [1, 0], "the refer finished while the caption was still decoding"
    # the refer was prefilled while the caption had rows in the running state, then decoded beside it
    batches = rec.batches
    i = next(i for i, b in enumerate(batches) if isinstance(b, Prefill) and b.jobs[0].id == 1)
    assert batches[i].base == 1 and isinstance(batches[i - 1], Decode)
    shared = [b for b in batches if isinstance(b, Decode) and {j.id for j in b.jobs} == {0, 1}]
    assert shared and all(len(b.src) == 2 for b in shared)


def test_aborted_and_late_requests_leave_the_batch(predictor, scenes):
    asks = [(0, Request("caption", max_new_tokens=30)), (1, Request("ground")), (2, Request("caption",
                                                                                          max_new_tokens=30))]
    core, rec = core_for(predictor, max_batch=8, max_rows=64)
    add(core, 0, asks[0], scenes, predictor)
    add(core, 1, asks[1], scenes, predictor)
    add(core, 2, asks[2], scenes, predictor, deadline=5.0)
    ground = core.scheduler.waiting[1]
    done, late = {}, []
    for tick in range(100):
        if tick == 3:
            assert core.abort(1)  # the ground search's rows go
        before, rows = len(rec.batches), len(ground.search.src)  # the rows its next decode step holds
        for f in core.step(float(tick)):
            if f.error is not None:
                late.append((f.id, tick, type(f.error)))
            else:
                done[f.id] = f.result
        if len(rec.batches) > before and isinstance(rec.batches[-1], Decode):
            assert rows > 1  # the corners it is following: several, once it has branched
            assert len(rec.batches[-1].src) == (1 + rows + 1 if tick < 3 else 1 + 1 if tick < 5 else 1)
        if not core.busy:
            break
    assert list(done) == [0] and late == [(2, 5, Expired)]
    assert core.take_stats().aborted == {"cancelled": 1, "deadline": 1}
    assert_same(done[0], alone(predictor, asks[0], scenes))


def test_a_failed_model_call_fails_its_requests_and_the_core_goes_on(predictor, scenes):
    core, rec = core_for(predictor)
    add(core, 0, (0, Request("caption")), scenes, predictor)

    class Broken:
        def __call__(self, batch):
            raise RuntimeError("device lost")

        def reset(self):
            pass
    rec.runner, working = Broken(), rec.runner
    (f,) = core.step()
    assert f.id == 0 and "failed" in str(f.error) and not core.busy
    rec.runner = working
    add(core, 1, (0, Request("caption")), scenes, predictor)
    (f,) = core.run()
    assert f.id == 1 and f.error is None and f.result.text is not None


def test_batching_policy(predictor, scenes):
    rows = predictor.core.region_options.max_rows  # a ground search's budget of rows
    sched = Scheduler(SchedulerConfig(max_batch=2, max_wait=1.0, max_rows=rows + 1))
    runner = predictor.core.runner
    sched.add(job_of(0, (0, Request("caption")), scenes, predictor, now=0.0))
    assert sched.next_wakeup(0.0) == 0.0
    batch = sched.schedule(0.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [0] and batch.base == 0, \
        "an idle core does not wait for company"
    sched.postprocess(batch, runner(batch))
    # a full batch goes at once; a ground search (32 rows) waits while the caption holds 1 of 33 rows
    for k in (1, 2):
        sched.add(job_of(k, (1, Request("caption")), scenes, predictor, now=2.0))
    sched.add(job_of(3, (1, Request("ground")), scenes, predictor, now=2.0))
    batch = sched.schedule(2.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [1, 2]
    assert batch.base == 1
    sched.postprocess(batch, np.zeros((2, predictor.tasks.tok.vocab_size), np.float32))
    assert isinstance(sched.schedule(9.0), Decode), "no room for 32 more rows next to 3 running ones"
    runner.reset()
    with pytest.raises(ValueError):
        Scheduler(SchedulerConfig(max_rows=rows - 1)).add(job_of(9, (0, Request("ground")), scenes, predictor))
    with pytest.raises(ValueError):
        SchedulerConfig(max_batch=0)


def test_under_load_a_long_job_waits_for_company_and_a_short_one_does_not(predictor, scenes):
    runner = predictor.core.runner
    sched = Scheduler(SchedulerConfig(max_batch=8, max_wait=1.0, max_rows=64, short_tokens=8, max_defer=5.0))

    def caption(k, now):
        return job_of(k, (0, Request("caption", max_new_tokens=30)), scenes, predictor, now=now)

    def step(now):
        batch = sched.schedule(now)
        sched.postprocess(batch, runner(batch))
        return batch
    sched.add(caption(0, 0.0))
    assert [j.id for j in step(0.0).jobs] == [0]
    sched.add(caption(1, 1.0))
    assert isinstance(step(1.5), Decode) and sched.next_wakeup(1.5) == 0.0, "decoding goes on while it waits"
    sched.add(caption(2, 1.6))
    batch = step(2.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [1, 2], "max_wait passed: both together"
    sched.add(job_of(3, (1, Request("refer", expression=scenes[1].expressions[0])), scenes, predictor, now=2.1))
    batch = step(2.1)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [3], "a short job goes at once"
    runner.reset()


def test_short_jobs_go_first_and_long_ones_wait_at_most_max_defer(predictor, scenes):
    runner = predictor.core.runner

    def caption(k, now):
        return job_of(k, (0, Request("caption", max_new_tokens=30)), scenes, predictor, now=now)

    def refer(k, now):
        return job_of(k, (1, Request("refer", expression=scenes[1].expressions[0])), scenes, predictor, now=now)

    assert refer(0, 0.0).search.most_tokens() == 5, "four corners and <eos>, whatever the budget"
    assert caption(0, 0.0).search.most_tokens() == 30
    assert job_of(0, (0, Request("ground")), scenes, predictor).search.most_tokens() > 8

    # a refer that arrives after a caption is prefilled first, alone; the caption waits while it decodes
    sched = Scheduler(SchedulerConfig(max_batch=8, max_wait=0.0, max_rows=64, short_tokens=8, max_defer=1.0))
    first = refer(1, 0.0)
    sched.add(caption(0, 0.0))
    sched.add(first)
    batch = sched.schedule(0.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [1]
    sched.postprocess(batch, runner(batch))
    steps = 0
    while sched.running:
        batch = sched.schedule(0.5)
        assert isinstance(batch, Decode) and [j.id for j in batch.jobs] == [1]
        sched.postprocess(batch, runner(batch))
        steps += 1
    # the prefill's logits give the first corner, four steps the other three and <eos>
    assert steps == 4 and len(first.search.best(1)[0].tokens) == 5
    batch = sched.schedule(0.5)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [0], "then the caption"
    sched.postprocess(batch, runner(batch))

    # a caption arriving while a refer decodes is held back at most max_defer, then joins the running batch
    sched.add(refer(2, 1.0))
    batch = sched.schedule(1.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [2] and batch.base == 1
    sched.postprocess(batch, runner(batch))
    sched.add(caption(3, 1.0))
    batch = sched.schedule(1.5)
    assert isinstance(batch, Decode) and {j.id for j in batch.jobs} == {0, 2}
    sched.postprocess(batch, runner(batch))
    batch = sched.schedule(2.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [3], "max_defer has passed"
    assert any(j.id == 2 for j in sched.running), "while the refer still runs"
    runner.reset()

    # shortness is what a job could generate when it arrived: a caption about to end holds nobody back
    nearly_done = caption(4, 2.0)
    sched.add(nearly_done)
    nearly_done.search.states[0].budget = 3
    assert nearly_done.search.most_tokens() == 3 and not sched.short(nearly_done)

    # short_tokens=0: strictly in arrival order, one prefill for both
    sched = Scheduler(SchedulerConfig(max_batch=8, max_wait=0.0, max_rows=64, short_tokens=0))
    sched.add(caption(0, 0.0))
    sched.add(refer(1, 0.0))
    batch = sched.schedule(0.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [0, 1]


def test_jobs_that_leave_are_replaced_by_the_last_ones_not_shifted(predictor, scenes):
    jobs = [job_of(k, (0, Request("caption")), scenes, predictor) for k in range(6)]
    order = lambda js: [j.id for j in js]  # noqa: E731
    assert order(_fill_holes(jobs, {0})) == [5, 1, 2, 3, 4], "the last job takes the leaver's place"
    assert order(_fill_holes(jobs, {1, 4})) == [0, 5, 2, 3]
    assert order(_fill_holes(jobs, {4, 5})) == [0, 1, 2, 3], "leavers at the end: nothing moves"
    assert order(_fill_holes(jobs, set(range(6)))) == []
    assert order(_fill_holes(jobs, set())) == order(jobs)


def test_an_answer_that_raises_fails_only_its_request(predictor, scenes):
    core, _ = core_for(predictor)
    add(core, 0, (0, Request("caption", max_new_tokens=3)), scenes, predictor)
    add(core, 1, (0, Request("refer", expression=scenes[0].expressions[0])), scenes, predictor)
    answer = core.answer

    def flaky(request, search, size):
        if request.task == "refer":
            raise RuntimeError("parser bug")
        return answer(request, search, size)
    core.answer = flaky
    done = {f.id: f for f in core.run()}
    assert isinstance(done[1].error, RuntimeError) and done[1].result is None
    assert done[0].error is None and done[0].result.text is not None and not core.busy
