"""When to renew and how long to wait after a failure: pure functions of time."""

from __future__ import annotations

from datetime import datetime, timedelta

from trustmesh.pki import BACKDATE

__all__ = ["JITTER_FRACTION", "MAX_BACKOFF", "RENEW_FRACTION", "backoff_delay", "next_renewal"]

#: A certificate is renewed once this fraction of its lifetime has passed.
RENEW_FRACTION = 2 / 3
#: Jitter moves the renewal earlier by up to this fraction of the lifetime, so agents
#: enrolled together do not all renew in the same second.
JITTER_FRACTION = 1 / 12
#: Upper bound of the wait between two failed attempts to reach the CA, in seconds.
MAX_BACKOFF = 300.0


def next_renewal(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    jitter: float = 0.0,
    *,
    backdate: timedelta = BACKDATE,
) -> datetime:
    """Return when a certificate valid from ``not_before`` to ``not_after`` is renewed.

    The renewal point is at :data:`RENEW_FRACTION` (2/3) of the lifetime, moved earlier
    by ``jitter`` times :data:`JITTER_FRACTION` of the lifetime: never later than 2/3. A
    point already past gives ``now`` (renew at once). The lifetime counts from when the
    certificate was issued, ``not_before + backdate`` (the CA back-dates notBefore for
    clock skew), so a certificate of a few seconds is not renewed the moment it arrives.

    Args:
        not_before: Start of validity (timezone-aware).
        not_after: End of validity (timezone-aware).
        now: The current time (timezone-aware).
        jitter: In [0, 1]: 0 renews exactly at 2/3, 1 at 7/12 of the lifetime.
        backdate: How far the CA back-dates notBefore (ignored when it would leave
            no lifetime).

    Returns:
        The time to renew at, never before ``now``.

    Raises:
        ValueError: Naive datetimes, ``not_after`` not after ``not_before``, or a
            jitter outside [0, 1].

    .. versionadded:: 0.1
    """
    if any(t.tzinfo is None for t in (not_before, not_after, now)):
        raise ValueError("datetimes must be timezone-aware")
    if not_after <= not_before:
        raise ValueError("not_after must be after not_before")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter}")
    issued = not_before + backdate if not_before + backdate < not_after else not_before
    lifetime = (not_after - issued).total_seconds()
    fraction = RENEW_FRACTION - JITTER_FRACTION * jitter
    due = issued + timedelta(seconds=lifetime * fraction)
    return max(due, now)


def backoff_delay(
    attempt: int, *, base: float = 1.0, cap: float = MAX_BACKOFF, jitter: float = 0.0
) -> float:
    """Return the seconds to wait before retry number ``attempt`` (0 for the first).

    Doubles from ``base`` and stops growing at ``cap``; ``jitter`` shortens the wait by
    up to half ("equal jitter"), so failed agents do not retry in lockstep.

    Args:
        attempt: How many attempts failed in a row before this wait, minus one.
        base: The first wait, in seconds.
        cap: The longest wait, in seconds.
        jitter: In [0, 1]: 0 waits the full delay, 1 waits half of it.

    Raises:
        ValueError: A negative attempt, a non-positive base or cap, or jitter outside [0, 1].

    .. versionadded:: 0.1
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if base <= 0 or cap <= 0:
        raise ValueError("base and cap must be positive")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be within [0, 1], got {jitter}")
    # 2**attempt overflows a float past ~1000 attempts; the cap is reached long before.
    delay = cap if attempt >= 64 else min(cap, base * 2.0**attempt)
    return delay * (1.0 - jitter / 2)
