"""feed.Started: the first fetch runs while the caller does other work; items, order and errors are
those of the plain iterator."""

from __future__ import annotations

import threading

import pytest

from raycat.train.feed import Started


def test_the_first_item_is_fetched_before_iteration_and_the_rest_follow_in_order():
    fetched = threading.Event()
    threads = []

    def items():
        threads.append(threading.current_thread())
        fetched.set()
        yield from range(5)
        threads.append(threading.current_thread())

    early = Started(items())
    # Nobody iterates yet: the thread has already fetched the first item.
    assert fetched.wait(5)
    assert list(early) == [0, 1, 2, 3, 4]
    # The first fetch in the background thread, the rest in the caller's.
    assert threads[0] is not threading.current_thread()
    assert threads[1] is threading.current_thread()


def test_an_empty_iterator_gives_nothing():
    assert list(Started(iter(()))) == []


def test_a_fetch_error_is_raised_where_the_items_are_iterated():
    def items():
        raise OSError("examples.parquet: no such file")
        yield  # a generator

    early = Started(items())
    with pytest.raises(OSError, match="no such file"):
        list(early)


def test_iterating_goes_on_where_the_consumer_left_off():
    import itertools

    batches = iter(Started(iter(range(10))))
    assert list(itertools.islice(batches, 3)) == [0, 1, 2]
    assert list(itertools.islice(batches, 3)) == [3, 4, 5]
