"""User partitions: the one hash that puts a user in partition 0 … count-1, wherever it is computed.

Feature snapshots computed in partitions (`features.partitioned`, in polars and in Postgres)
and inference scoring in partitions (`inference.scoring.partition_users`) both use it, so a
user lands in the same partition in every pipeline.
"""

from dataclasses import dataclass

import polars as pl

# Knuth's multiplicative hash on the id's low 32 bits spreads consecutive (or strided) ids
# evenly; integer arithmetic only, so polars and Postgres compute the same bucket everywhere.
_MULTIPLIER = 2_654_435_761
_LOW_32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class Partition:
    """Partition `index` of `count`: the users whose id hashes to `index`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count}: need count >= 1 and 0 <= index < count")


def all_partitions(count: int) -> list[Partition]:
    """The `count` partitions that together hold every user."""
    return [Partition(index, count) for index in range(count)]


def partition_of(column: str, count: int) -> pl.Expr:
    """The partition (0 … count-1) of each integer id in `column`."""
    low = (pl.col(column) & _LOW_32).cast(pl.UInt64)  # < 2^32, so the product fits in 64 bits
    return (low * _MULTIPLIER % 2**32 % count).cast(pl.Int64)


def partition_sql(column: str, count: int) -> str:
    """`partition_of` as a Postgres expression on the bigint `column` (an already quoted name)."""
    # bigint is signed 64-bit: multiply the 16-bit halves separately so nothing overflows.
    # mod() rather than %, which psycopg would take for a placeholder.
    low = f"({column} & {_LOW_32})"
    high = f"((({low} >> 16) * {_MULTIPLIER}) & 65535) << 16"
    return f"mod((({high}) + ({low} & 65535) * {_MULTIPLIER}) & {_LOW_32}, {count})"


def in_partition(column: str, partition: Partition) -> pl.Expr:
    """Rows whose `column` id falls in `partition`."""
    return partition_of(column, partition.count) == partition.index
