"""A stand-in for the benchmarks' PeakMemory that records when its window starts and is read."""


def recording_peak_memory(events: list, peak_bytes: int):
    """A PeakMemory class whose ``start()`` and ``peak()`` append "start" and "peak" to ``events``; ``peak()``
    returns ``peak_bytes``."""

    class Memory:
        def __init__(self, device):
            pass

        def start(self):
            events.append("start")

        def peak(self):
            events.append("peak")
            return peak_bytes

    return Memory
