"""The load bench's report from a recorded run (agent.bench.load), without servers."""

from agent.bench.load import Record, memory_growth, render


def _record() -> Record:
    record = Record(started=0.0)
    record.turns = [(0, 10.0, 900.0, None), (0, 20.0, 1100.0, None), (1, 15.0, 1000.0, None),
                    (1, 25.0, None, "no response (heard '')")]
    record.chats = [(0, 5.0, 400.0, None), (1, 6.0, None, "503 draining")]
    record.memory = [(0.0, [1000, 2000, 100]), (30.0, [1500, 2100, 100]),
                     (60.0, [2048, 2048, 100]), (120.0, [2100, 2048, 110])]
    return record


def test_memory_is_compared_after_the_first_minute():
    assert memory_growth(_record(), 0) == (2048, 2100, 100 * 52 / 2048)
    assert memory_growth(_record(), 1)[2] == 0.0


def test_the_table_counts_turns_failures_and_chats_per_replica():
    table = render(_record(), sessions=2, rps=0.5, minutes=2, backend="cpu", load=0.3)
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert rows[0].startswith("| 1 | 2 | 0 | 1000 ms | 1090 ms | 1 | 0 | 400 ms |")
    assert rows[1].startswith("| 2 | 1 | 1 | 1000 ms | 1000 ms | 1 | 1 | — |")
    assert "+2.5%" in rows[0] and "Redis:" in table
