"""Which nodes are live (coordinator/liveness.py): seen within the peer TTL on the monotonic clock,
seeded from the store's wall-clock stamps after a restart, forgetting keys that aged out."""

from grpo_swarm.coordinator.liveness import Liveness


class Clocks:
    def __init__(self):
        self.mono, self.wall = 100.0, 1_700_000_000_000

    def step(self, s: float) -> None:
        self.mono += s
        self.wall += int(1000 * s)


def _liveness(c: Clocks, ttl_s: float = 3.0) -> Liveness:
    return Liveness(ttl_s, clock=lambda: c.mono, wall_ms=lambda: c.wall)


def test_live_is_most_recent_first_and_ages_out_at_the_ttl():
    c = Clocks()
    lv = _liveness(c)
    lv.seen("a")
    c.step(1.0)
    lv.seen("b")
    c.step(1.0)
    lv.seen("a")  # seen again: now the most recent
    assert lv.live() == ["a", "b"]
    c.step(2.0)  # b last seen 3 s ago: still live at the TTL
    assert lv.live() == ["a", "b"]
    c.step(0.5)
    assert lv.live() == ["a"]
    assert len(lv._seen) == 1  # forgotten, not only hidden: free keys do not pile up
    assert lv.last_seen_ms("a") == c.wall - 2500


def test_a_wall_clock_step_changes_nothing():
    c = Clocks()
    lv = _liveness(c)
    lv.seen("a")
    c.wall += 3_600_000  # an hour ahead, at once
    assert lv.live() == ["a"]
    c.wall -= 7_200_000  # and back past where it was
    c.step(3.5)
    assert lv.live() == []


def test_restore_seeds_from_wall_clock_stamps():
    c = Clocks()
    lv = _liveness(c)
    lv.restore([("old", c.wall - 5000), ("b", c.wall - 2000), ("a", c.wall - 500), ("ahead", c.wall + 60_000)])
    assert lv.live() == ["ahead", "a", "b"]  # a stamp in the future counts as now; "old" is past the TTL
    c.step(1.1)
    assert lv.live() == ["ahead", "a"]
