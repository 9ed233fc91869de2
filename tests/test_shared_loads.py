"""fastfair.evaluation.shared.SharedLoads: a thing is reused only under the settings it was made with."""
import gc
import weakref

import numpy as np

from fastfair.evaluation.shared import SharedLoads


class Thing:
    pass


def test_the_same_settings_reuse_other_settings_make_anew_after_dropping_the_old():
    shared, made = SharedLoads(), []

    def make():
        made.append(Thing())
        return made[-1]

    first = shared.get("model", ("a", [1, 2]), make)
    assert shared.get("model", ("a", [1, 2]), make) is first and len(made) == 1  # equal, not identical, settings
    assert shared.get("judges", ("a", [1, 2]), make) is not first  # kinds are held apart
    old = weakref.ref(first)
    del first
    made.pop(0)

    def make_after_the_old_is_gone():
        gc.collect()
        assert old() is None, "the old thing is still held while the new one is made"
        return Thing()

    second = shared.get("model", ("b", [1, 2]), make_after_the_old_is_gone)
    assert shared.get("model", ("b", [1, 2]), make) is second
    assert shared.get("model", ("a", [1, 2]), make) is not second  # back to the first settings: made again


def test_settings_that_cannot_be_compared_make_anew_instead_of_failing():
    shared = SharedLoads()
    first = shared.get("x", np.arange(3), Thing)
    assert shared.get("x", np.arange(3), Thing) is not first  # an array's == is ambiguous: never reused
