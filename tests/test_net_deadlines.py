"""
epsproxy.net.deadlines: many deadlines of one length on one reactor timer, driven by a
Clock.  The internal endpoint's token and pairing deadlines over real sockets are in
tests/test_rendezvous_server.py and tests/test_deadlines.py.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from epsproxy.net.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.expired: list[str] = []
        self.d: Deadlines[str] = Deadlines(self.clock, 5, self.expired.append)

    def timers(self) -> int:
        return len(self.clock.getDelayedCalls())

    def test_keys_expire_in_order_on_one_timer(self) -> None:
        for key in "abc":
            self.d.add(key)
            self.clock.advance(1)
        self.assertEqual((len(self.d), self.timers()), (3, 1))
        self.clock.advance(1.9)  # t=4.9
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)  # t=5: a's deadline
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["a", "b"])
        self.assertNotIn("b", self.d)
        self.assertIn("c", self.d)
        self.d.discard("c")  # met: the last key, the timer stops
        self.assertEqual((len(self.d), self.timers()), (0, 0))
        self.clock.advance(10)
        self.assertEqual(self.expired, ["a", "b"])

    def test_adding_again_moves_the_deadline(self) -> None:
        self.d.add("a")
        self.d.add("b")
        self.clock.advance(4)
        self.d.add("a")  # a now expires at 9, after b
        self.assertEqual(self.d.keys(), ["b", "a"])
        self.clock.advance(1)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(3.9)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b", "a"])
        self.assertEqual(self.timers(), 0)

    def test_discarding_the_first_key_keeps_the_others_on_time(self) -> None:
        self.d.add("a")
        self.clock.advance(2)
        self.d.add("b")  # due at 7
        self.d.discard("a")  # the timer (set for 5) stays: it finds nothing due then
        self.clock.advance(3)
        self.assertEqual((self.expired, self.timers()), ([], 1))
        self.clock.advance(2)
        self.assertEqual(self.expired, ["b"])
        self.d.discard("unknown")  # nothing happens

    def test_keys_added_while_expiring_and_clear(self) -> None:
        def expire(key: str) -> None:
            self.expired.append(key)
            if key == "a":
                self.d.add("again")  # due 5 s after a's expiry

        d = self.d = Deadlines(self.clock, 5, expire)
        d.add("a")
        self.clock.advance(1)
        d.add("b")
        self.clock.advance(4)  # t=5: a expires, adds "again" (due 10); b is due at 6
        self.assertEqual((self.expired, d.keys(), self.timers()), (["a"], ["b", "again"], 1))
        self.clock.advance(1)
        self.assertEqual(self.expired, ["a", "b"])
        d.clear()  # shutdown: nothing expires, no timer left
        self.assertEqual((len(d), self.timers()), (0, 0))
        self.clock.advance(10)
        self.assertEqual(self.expired, ["a", "b"])

    def test_a_new_timeout_applies_to_later_keys(self) -> None:
        self.d.add("a")
        self.d.timeout = 1
        self.d.add("b")  # due at 1, behind a (due at 5): it waits for a's timer
        self.clock.advance(1)
        self.assertEqual(self.expired, [])
        self.clock.advance(4)
        self.assertEqual(self.expired, ["a", "b"])
        self.d.add("c")
        self.clock.advance(1)
        self.assertEqual(self.expired, ["a", "b", "c"])
