"""Measuring a piece of work: its best time over repeats, and its peak memory in a fresh process of its own."""
import multiprocessing
import queue as queues
import resource
import time


def best_time(fn, repeat):
    """Fastest of `repeat` runs (the least disturbed by whatever else the machine does)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def in_child(target, *args):
    """Run target(*args, queue) in a fresh process, so that its peak memory is its own; return its result."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except queues.Empty:
            if not process.is_alive():
                raise SystemExit(f"the measured process failed (exit status {process.exitcode})")
    process.join()
    return result


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
