"""Integer helpers shared by the modules that count blocks, tokens and buckets."""


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for non-negative integers."""
    return -(-a // b)


def bucket(n: int, sizes: list[int]) -> int | None:
    """The smallest of the sorted `sizes` that holds n (None: none does)."""
    return next((s for s in sizes if s >= n), None)


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
