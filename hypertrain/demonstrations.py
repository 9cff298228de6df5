"""K-shot hypernetwork inputs for P3 training: the text format, and the loader's draw from a pool of rows.

P3 training shards store each prompted row once (``hyper_input`` empty); the manifest says
``filters.demonstrations = {"drawn_by": "loader", "shots": K}``. Every shard holds rows of one subset at a time, in
groups the prep made (a pool: the rows of one subset within one shard). When the loader reads a shard it builds
each query's hypernetwork input from K other rows of its pool, drawn with a generator seeded by (seed, source,
pass, shard, position): the same every time that position is replayed (exact resume), different in every pass
(HART samples the demonstrations at each iteration), never the query itself nor a row with the very same input.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Sequence

from hypertrain.episode import Episode

DRAWN_BY_LOADER = "loader"


def render(pairs: Sequence[tuple[str, str]]) -> str:
    """The hypernetwork input: K demonstrations, each stripped, as ``Input: x\\nOutput: y``, one blank line apart.

    (T5's tokenizer maps newlines to spaces, so the ``Input:``/``Output:`` markers carry the structure.)
    """
    return "\n\n".join(f"Input: {x.strip()}\nOutput: {y.strip()}" for x, y in pairs)


def drawn_shots(manifest: dict) -> int:
    """K when the manifest's episodes get their demonstrations from the loader, else 0 (stored in the episodes)."""
    spec = manifest.get("filters", {}).get("demonstrations") or {}
    return int(spec.get("shots", 0)) if spec.get("drawn_by") == DRAWN_BY_LOADER else 0


@dataclasses.dataclass
class ShardPools:
    """The rows of one shard grouped into pools (one per task), with what the draw needs."""

    episodes: list[Episode]
    pools: dict[str, list[int]]
    """task → positions in the shard."""
    keys: list[str]
    """Per position: the stripped input, which a demonstration must not share with its query."""

    @classmethod
    def of(cls, episodes: list[Episode]) -> ShardPools:
        pools: dict[str, list[int]] = defaultdict(list)
        for position, episode in enumerate(episodes):
            pools[episode.task].append(position)
        return cls(episodes, dict(pools), [e.input.strip() for e in episodes])

    def with_demonstrations(self, position: int, shots: int, rng: random.Random, where: str) -> Episode:
        """The episode at ``position`` with ``shots`` demonstrations drawn from its pool."""
        episode = self.episodes[position]
        pool = self.pools[episode.task]
        key = self.keys[position]
        chosen: list[int] = []
        seen: set[int] = set()
        for _ in range(8 * shots + 64):  # rejection sampling: few repeats in a pool of distinct inputs
            candidate = pool[rng.randrange(len(pool))]
            if candidate not in seen and self.keys[candidate] != key:
                seen.add(candidate)
                chosen.append(candidate)
                if len(chosen) == shots:
                    break
        else:  # many repeated inputs: draw from the eligible rows directly
            eligible = [p for p in pool if self.keys[p] != key and p not in seen]
            if len(chosen) + len(eligible) < shots:
                raise ValueError(
                    f"{where}: {episode.id} has {len(chosen) + len(eligible)} rows with another input in its pool "
                    f"({len(pool)} rows of {episode.task}), needs {shots} (the prep should have skipped it)"
                )
            chosen += rng.sample(eligible, shots - len(chosen))
        demos = [(self.episodes[p].input, self.episodes[p].targets[0]) for p in chosen]
        return dataclasses.replace(episode, hyper_input=render(demos))


def demonstration_rng(seed: int, source: str, pass_index: int, shard: str, position: int) -> random.Random:
    """The draw's generator for one row in one pass: a pure function of where it is."""
    return random.Random(f"{seed}/{source}/demonstrations/{pass_index}/{shard}/{position}")
