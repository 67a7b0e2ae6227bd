"""The per-node device lock: a measurement excludes training, trainings share, a waiting measurement is not
starved."""

import multiprocessing as mp
import time

from search.devicelock import DeviceLock


def _hold(folder, mode, seconds, log, start_delay=0.0):
    time.sleep(start_delay)
    lock = DeviceLock(folder, "test")
    with getattr(lock, mode)():
        log.put((mode, "in", time.monotonic()))
        time.sleep(seconds)
        log.put((mode, "out", time.monotonic()))


def _run(folder, plan):
    ctx = mp.get_context("fork")
    log = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(folder, mode, secs, log, delay)) for mode, secs, delay in plan]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    events = []
    while not log.empty():
        events.append(log.get())
    return sorted(events, key=lambda e: e[2])


def test_trainings_share_and_a_measurement_is_alone(tmp_path):
    events = _run(
        tmp_path, [("shared", 0.6, 0.0), ("shared", 0.6, 0.05), ("exclusive", 0.3, 0.2), ("shared", 0.3, 0.3)]
    )
    # both first trainings were inside together
    first_two = [e for e in events[:2]]
    assert [e[:2] for e in first_two] == [("shared", "in"), ("shared", "in")]
    ex_in = next(e[2] for e in events if e[:2] == ("exclusive", "in"))
    ex_out = next(e[2] for e in events if e[:2] == ("exclusive", "out"))
    for mode, _what, t in events:
        if mode == "shared":
            # no training is inside the lock while the measurement holds it
            assert not (ex_in < t < ex_out), events
    # the training that arrived after the measurement started waited for it (no starvation)
    late_in = [e[2] for e in events if e[:2] == ("shared", "in")][-1]
    assert late_in >= ex_out
