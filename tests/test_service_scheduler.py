"""The worker's scheduler, pure and synchronous, on a tiny random model: continuous batching admits new jobs
while others decode, every job's answer equals Predictor.run (model/decoding.decode) on it alone, aborted
and late jobs leave the batch, and the batching policy holds its limits."""

import numpy as np
import pytest
import torch

from model.image import preprocess
from model.inference import TorchInference
from model.predictor import Ask, Predictor
from model.shapes import generate_scene
from service.jobs import Task, Tasker
from service.runner import Runner
from service.scheduler import Decode, Job, Prefill, Scheduler


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def predictor(tiny_model, tasks, one_thread):
    return Predictor(TorchInference(tiny_model), tasks)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in range(3)]


def asks_for(scenes):
    out = []
    for i, s in enumerate(scenes):
        w, h = s.image.size
        box = tuple(float(v) for v in s.objects[0].box)
        out += [Ask(i, "caption", max_new_tokens=4 + 5 * i), Ask(i, "refer", expression=s.expressions[0]),
                Ask(i, "describe", box=box, max_new_tokens=6), Ask(i, "propose", max_regions=3)]
    return out


def task_of(ask, scenes):
    return Task(ask.task, scenes[ask.image].image.size, ask.expression, ask.box, ask.max_new_tokens, ask.max_regions)


def job_of(job_id, ask, scenes, tasker, size, now=0.0, deadline=float("inf")):
    pixels = preprocess(scenes[ask.image].image, size)
    return Job(job_id, pixels, tasker.search(task_of(ask, scenes)), now, deadline)


def drive(sched, runner, tasker, tasks, arrivals, max_steps=500):
    """Run the worker's loop by hand; `arrivals` maps a step number to jobs added before it. Returns the answers
    and the batches run, in order."""
    answers, batches = {}, []
    for step in range(max_steps):
        for job in arrivals.get(step, []):
            sched.add(job)
        batch = sched.schedule(now=float(step))
        if batch is None:
            if not any(s > step for s in arrivals):
                break
            continue
        batches.append(batch)
        for job in sched.postprocess(batch, runner(batch)):
            answers[job.id] = tasker.answer(tasks[job.id], job.search)
    return answers, batches


def assert_same(a, b):
    """Same tokens (so same text and boxes); scores equal up to float reassociation across batch shapes."""
    if "regions" in a:
        assert len(a["regions"]) == len(b["regions"])
        for ra, rb in zip(a["regions"], b["regions"], strict=True):
            assert_same(ra, rb)
        return
    assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
    assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def to_server_shape(ask, answer):
    if ask.task == "caption":
        return {"caption": answer["text"], "score": answer["score"]}
    if ask.task == "refer":
        return {"box": answer["box"], "score": answer["score"]}
    if ask.task == "describe":
        return {"regions": [{"box": list(ask.box), "text": answer["text"], "score": answer["score"]}]}
    return answer


def test_staggered_jobs_equal_decode_alone(predictor, scenes):
    tasker, size = Tasker(predictor), predictor.image_size
    asks = asks_for(scenes)
    # jobs arrive over the first steps, so most join a batch that is already decoding
    arrivals, tasks = {}, {}
    for k, ask in enumerate(asks):
        arrivals.setdefault(k % 5 * 2, []).append(job_of(k, ask, scenes, tasker, size))
        tasks[k] = task_of(ask, scenes)
    sched = Scheduler(max_batch=3, max_wait=0.0, max_rows=64)
    answers, batches = drive(sched, Runner(predictor.inference, predictor.tasks.tok.pad_id), tasker, tasks, arrivals)
    assert sorted(answers) == list(range(len(asks)))
    assert max(len(b.jobs) for b in batches if isinstance(b, Prefill)) <= 3
    for k, ask in enumerate(asks):
        alone = predictor.run([scenes[ask.image].image], [Ask(0, ask.task, ask.expression, ask.box,
                                                              ask.max_new_tokens, ask.max_regions)])[0]
        assert_same(answers[k], to_server_shape(ask, alone))


def test_a_short_refer_joins_and_leaves_a_running_caption(predictor, scenes):
    tasker, size = Tasker(predictor), predictor.image_size
    cap = Ask(0, "caption", max_new_tokens=40)
    ref = Ask(1, "refer", expression=scenes[1].expressions[0])
    tasks = {0: task_of(cap, scenes), 1: task_of(ref, scenes)}
    sched = Scheduler(max_batch=8, max_wait=0.0, max_rows=64)
    arrivals = {0: [job_of(0, cap, scenes, tasker, size)], 3: [job_of(1, ref, scenes, tasker, size)]}
    runner = Runner(predictor.inference, predictor.tasks.tok.pad_id)
    order = []
    answers, batches = {}, []
    for step in range(200):
        for job in arrivals.get(step, []):
            sched.add(job)
        batch = sched.schedule(float(step))
        if batch is None:
            break
        batches.append(batch)
        for job in sched.postprocess(batch, runner(batch)):
            order.append(job.id)
            answers[job.id] = tasker.answer(tasks[job.id], job.search)
    assert order == [1, 0], "the refer finished while the caption was still decoding"
    # the refer was prefilled while the caption had rows in the running state, then decoded beside it
    i = next(i for i, b in enumerate(batches) if isinstance(b, Prefill) and b.jobs[0].id == 1)
    assert batches[i].base == 1 and isinstance(batches[i - 1], Decode)
    shared = [b for b in batches if isinstance(b, Decode) and {j.id for j in b.jobs} == {0, 1}]
    assert shared and all(len(b.src) == 2 for b in shared)
    for ask, k in ((cap, 0), (ref, 1)):
        alone = predictor.run([scenes[ask.image].image], [Ask(0, ask.task, ask.expression, ask.box,
                                                              ask.max_new_tokens)])[0]
        assert_same(answers[k], to_server_shape(ask, alone))


def test_aborted_and_late_jobs_leave_the_batch(predictor, scenes):
    tasker, size = Tasker(predictor), predictor.image_size
    asks = [Ask(0, "caption", max_new_tokens=30), Ask(1, "propose"), Ask(2, "caption", max_new_tokens=30)]
    tasks = {k: task_of(a, scenes) for k, a in enumerate(asks)}
    sched = Scheduler(max_batch=8, max_wait=0.0, max_rows=64)
    runner = Runner(predictor.inference, predictor.tasks.tok.pad_id)
    sched.add(job_of(0, asks[0], scenes, tasker, size))
    sched.add(job_of(1, asks[1], scenes, tasker, size))
    sched.add(job_of(2, asks[2], scenes, tasker, size, deadline=5.0))
    done, proposal = {}, sched.waiting[1]
    for step in range(100):
        if step == 3:
            assert sched.abort(1) is not None  # the proposal's rows go
        for job in sched.expire(float(step)):
            assert job.id == 2 and step == 5
        batch = sched.schedule(float(step))
        if batch is None:
            break
        if isinstance(batch, Decode):
            rows = len(proposal.search.src)  # the corners it is following: several, once it has branched
            assert rows > 1 and len(batch.src) == (1 + rows + 1 if step < 3 else 1 + 1 if step < 5 else 1)
        for job in sched.postprocess(batch, runner(batch)):
            done[job.id] = tasker.answer(tasks[job.id], job.search)
    assert list(done) == [0]
    assert sched.take_stats().aborted == {"cancelled": 1, "deadline": 1}
    alone = predictor.run([scenes[0].image], [Ask(0, "caption", max_new_tokens=30)])[0]
    assert_same(done[0], to_server_shape(asks[0], alone))


def test_batching_policy(predictor, scenes):
    tasker, size = Tasker(predictor), predictor.image_size
    rows = predictor.region_options.max_rows  # a proposal's budget of rows
    sched = Scheduler(max_batch=2, max_wait=1.0, max_rows=rows + 1)
    sched.add(job_of(0, Ask(0, "caption"), scenes, tasker, size, now=0.0))
    assert sched.schedule(0.5) is None, "waits up to max_wait for company"
    assert sched.next_wakeup(0.5) == pytest.approx(0.5)
    batch = sched.schedule(1.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [0] and batch.base == 0
    sched.postprocess(batch, Runner(predictor.inference, predictor.tasks.tok.pad_id)(batch))
    # a full batch goes at once; a proposal (32 rows) waits while the caption holds 1 of 33 rows
    for k in (1, 2):
        sched.add(job_of(k, Ask(1, "caption"), scenes, tasker, size, now=2.0))
    sched.add(job_of(3, Ask(1, "propose"), scenes, tasker, size, now=2.0))
    batch = sched.schedule(2.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [1, 2]
    assert batch.base == 1
    sched.postprocess(batch, np.zeros((2, predictor.tasks.tok.vocab_size), np.float32))
    assert isinstance(sched.schedule(9.0), Decode), "no room for 32 more rows next to 3 running ones"
    with pytest.raises(ValueError):
        Scheduler(max_rows=rows - 1).add(job_of(9, Ask(0, "propose"), scenes, tasker, size))


def test_short_jobs_go_first_and_long_ones_wait_at_most_max_defer(predictor, scenes):
    tasker, size = Tasker(predictor), predictor.image_size
    runner = Runner(predictor.inference, predictor.tasks.tok.pad_id)

    def caption(k, now):
        return job_of(k, Ask(0, "caption", max_new_tokens=30), scenes, tasker, size, now=now)

    def refer(k, now):
        return job_of(k, Ask(1, "refer", expression=scenes[1].expressions[0]), scenes, tasker, size, now=now)

    assert refer(0, 0.0).search.most_tokens() == 5, "four corners and <eos>, whatever the budget"
    assert caption(0, 0.0).search.most_tokens() == 30
    assert job_of(0, Ask(0, "propose"), scenes, tasker, size).search.most_tokens() > 8

    # a refer that arrives after a caption is prefilled first, alone; the caption waits while it decodes
    sched = Scheduler(max_batch=8, max_wait=0.0, max_rows=64, short_tokens=8, max_defer=1.0)
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

    # shortness is what a job could generate when it arrived: a caption about to end holds nobody back
    nearly_done = caption(4, 2.0)
    sched.add(nearly_done)
    nearly_done.search.states[0].budget = 3
    assert nearly_done.search.most_tokens() == 3 and not sched.short(nearly_done)

    # short_tokens=0: strictly in arrival order, one prefill for both
    sched = Scheduler(max_batch=8, max_wait=0.0, max_rows=64, short_tokens=0)
    sched.add(caption(0, 0.0))
    sched.add(refer(1, 0.0))
    batch = sched.schedule(0.0)
    assert isinstance(batch, Prefill) and [j.id for j in batch.jobs] == [0, 1]


def test_jobs_that_leave_are_replaced_by_the_last_ones_not_shifted(predictor, scenes):
    from service.scheduler import _fill_holes

    tasker, size = Tasker(predictor), predictor.image_size
    jobs = [job_of(k, Ask(0, "caption"), scenes, tasker, size) for k in range(6)]
    order = lambda js: [j.id for j in js]  # noqa: E731
    assert order(_fill_holes(jobs, {0})) == [5, 1, 2, 3, 4], "the last job takes the leaver's place"
    assert order(_fill_holes(jobs, {1, 4})) == [0, 5, 2, 3]
    assert order(_fill_holes(jobs, {4, 5})) == [0, 1, 2, 3], "leavers at the end: nothing moves"
    assert order(_fill_holes(jobs, set(range(6)))) == []
    assert order(_fill_holes(jobs, set())) == order(jobs)
